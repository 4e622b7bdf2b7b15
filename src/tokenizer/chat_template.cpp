#include "tokenizer/chat_template.h"

#include "core/error.h"
#include "tokenizer/tokenizer.h"

namespace duo {
namespace {

// Concatenation by appends (GCC 12 -O3 reports a false -Wrestrict on "lit" + std::string chains).
template <class... Parts>
std::string cat(const Parts&... parts) {
  std::string out;
  (out.append(parts), ...);
  return out;
}

// Python str.strip() for ASCII whitespace (what Jinja's trim / .strip() do for typical text).
std::string strip(std::string_view s) {
  const char* ws = " \t\n\r\v\f";
  size_t a = s.find_first_not_of(ws);
  if (a == std::string_view::npos) return {};
  size_t b = s.find_last_not_of(ws);
  return std::string(s.substr(a, b - a + 1));
}

// An optional leading system message: its text, whether there is one, and the first other index.
struct LeadingSystem {
  std::string system;
  bool has_system = false;
  size_t start = 0;
};

LeadingSystem leading_system(const std::vector<ChatMessage>& msgs) {
  if (!msgs.empty() && msgs[0].role == "system") return {msgs[0].content, true, 1};
  return {};
}

std::string llama2(const std::vector<ChatMessage>& msgs, const ChatTokens& t) {
  // meta-llama/Llama-2-*-chat-hf template.
  const auto [system, has_system, start] = leading_system(msgs);
  std::string out;
  for (size_t i = start; i < msgs.size(); ++i) {
    const auto& m = msgs[i];
    check((m.role == "user") == ((i - start) % 2 == 0), "chat template llama2: conversation roles ",
          "must alternate user/assistant/user/assistant/...");
    std::string content = m.content;
    if (i == start && has_system) content = cat("<<SYS>>\n", system, "\n<</SYS>>\n\n", m.content);
    if (m.role == "user") {
      out += cat(t.bos, "[INST] ", strip(content), " [/INST]");
    } else if (m.role == "assistant") {
      out += cat(" ", strip(content), " ", t.eos);
    }
  }
  return out;
}

std::string llama3(const std::vector<ChatMessage>& msgs, bool gen, const ChatTokens& t) {
  // meta-llama/Meta-Llama-3-8B-Instruct template.
  std::string out;
  for (size_t i = 0; i < msgs.size(); ++i) {
    if (i == 0) out += t.bos;
    out += cat("<|start_header_id|>", msgs[i].role, "<|end_header_id|>\n\n", strip(msgs[i].content),
               "<|eot_id|>");
  }
  if (gen) out += "<|start_header_id|>assistant<|end_header_id|>\n\n";
  return out;
}

std::string mistral(const std::vector<ChatMessage>& msgs, const ChatTokens& t) {
  // Mistral-7B-Instruct v0.2 style; an optional leading system message is prepended to the first
  // user message, separated by a blank line.
  const auto [system, has_system, start] = leading_system(msgs);
  std::string out = t.bos;
  for (size_t i = start; i < msgs.size(); ++i) {
    const auto& m = msgs[i];
    check((m.role == "user") == ((i - start) % 2 == 0), "chat template mistral: conversation ",
          "roles must alternate user/assistant/user/assistant/...");
    if (m.role == "user") {
      std::string content = (i == start && has_system) ? cat(system, "\n\n", m.content) : m.content;
      out += cat("[INST] ", content, " [/INST]");
    } else if (m.role == "assistant") {
      out += cat(m.content, t.eos);
    } else {
      fail("chat template mistral: unsupported role '", m.role, "'");
    }
  }
  return out;
}

std::string chatml(const std::vector<ChatMessage>& msgs, bool gen) {
  // Qwen2-Instruct template.
  std::string out;
  for (size_t i = 0; i < msgs.size(); ++i) {
    if (i == 0 && msgs[0].role != "system")
      out += "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n";
    out += cat("<|im_start|>", msgs[i].role, "\n", msgs[i].content, "<|im_end|>\n");
  }
  if (gen) out += "<|im_start|>assistant\n";
  return out;
}

}  // namespace

ChatTokens default_chat_tokens(ChatFamily family) {
  switch (family) {
    case ChatFamily::kLlama3:
      return {"<|begin_of_text|>", "<|eot_id|>"};
    case ChatFamily::kChatML:
      return {"", "<|im_end|>"};
    case ChatFamily::kLlama2:
    case ChatFamily::kMistral:
      break;
  }
  return {"<s>", "</s>"};
}

std::string_view chat_family_name(ChatFamily family) {
  switch (family) {
    case ChatFamily::kLlama2:
      return "llama2";
    case ChatFamily::kLlama3:
      return "llama3";
    case ChatFamily::kMistral:
      return "mistral";
    case ChatFamily::kChatML:
      return "chatml";
  }
  return "unknown";
}

ChatFamily detect_chat_family(const Tokenizer& tok, std::string_view model_type) {
  if (tok.token_to_id("<|start_header_id|>")) return ChatFamily::kLlama3;
  if (tok.token_to_id("<|im_start|>")) return ChatFamily::kChatML;
  if (model_type == "mistral" || model_type == "mixtral" || tok.token_to_id("[INST]"))
    return ChatFamily::kMistral;
  const std::string& tmpl = tok.chat_template_text();
  if (tmpl.find("[INST]") != std::string::npos && tmpl.find("<<SYS>>") == std::string::npos)
    return ChatFamily::kMistral;
  return ChatFamily::kLlama2;
}

ChatFamily detect_chat_family(const std::filesystem::path& model_dir, std::string_view model_type) {
  return detect_chat_family(*Tokenizer::load(model_dir), model_type);
}

std::string apply_chat_template(ChatFamily family, const std::vector<ChatMessage>& messages,
                                bool add_generation_prompt) {
  return apply_chat_template(family, messages, add_generation_prompt, default_chat_tokens(family));
}

std::string apply_chat_template(ChatFamily family, const std::vector<ChatMessage>& messages,
                                bool add_generation_prompt, const ChatTokens& tokens) {
  switch (family) {
    case ChatFamily::kLlama2:
      return llama2(messages, tokens);  // the official template has no generation prompt
    case ChatFamily::kLlama3:
      return llama3(messages, add_generation_prompt, tokens);
    case ChatFamily::kMistral:
      return mistral(messages, tokens);  // likewise
    case ChatFamily::kChatML:
      return chatml(messages, add_generation_prompt);
  }
  fail("apply_chat_template: unknown chat family");
}

}  // namespace duo
