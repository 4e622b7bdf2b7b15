// Built-in chat templates for the supported model families, reproducing the official Hugging Face
// Jinja templates' output text. The text contains the BOS string where the official template emits
// bos_token; encode it with add_special_tokens=false so the literal BOS maps to its id once:
//   tok.encode(apply_chat_template(family, msgs, true), /*add_special_tokens=*/false)
// equals HF apply_chat_template(msgs, tokenize=True, add_generation_prompt=True).
#pragma once

#include <filesystem>
#include <string>
#include <string_view>
#include <vector>

namespace duo {

class Tokenizer;

enum class ChatFamily {
  kLlama2,   // <s>[INST] <<SYS>>\n..\n<</SYS>>\n\n.. [/INST] .. </s>
  kLlama3,   // <|begin_of_text|><|start_header_id|>role<|end_header_id|>\n\n..<|eot_id|>
  kMistral,  // <s>[INST] (system\n\n)user [/INST]assistant</s>
  kChatML,   // <|im_start|>role\n..<|im_end|>\n (Qwen2: default system prompt)
};

struct ChatMessage {
  std::string role;  // "system", "user" or "assistant"
  std::string content;
};

// BOS / EOS strings written into the text. Defaults are the family's usual tokens.
struct ChatTokens {
  std::string bos;
  std::string eos;
};
ChatTokens default_chat_tokens(ChatFamily family);

std::string_view chat_family_name(ChatFamily family);

// Rule, first match wins:
//   1. the vocabulary has <|start_header_id|>                           -> kLlama3
//   2. the vocabulary has <|im_start|>                                  -> kChatML
//   3. model_type is "mistral"/"mixtral", or the vocab has [INST]       -> kMistral
//   4. tokenizer_config.json's chat_template uses "[INST]" without
//      "<<SYS>>" (a Mistral-style template on a llama-type checkpoint)  -> kMistral
//   5. otherwise                                                        -> kLlama2
ChatFamily detect_chat_family(const Tokenizer& tokenizer, std::string_view model_type);
// Loads the tokenizer of model_dir and applies the rule above.
ChatFamily detect_chat_family(const std::filesystem::path& model_dir, std::string_view model_type);

// Throws duo::Error for roles the family's template rejects (e.g. non-alternating Mistral turns).
std::string apply_chat_template(ChatFamily family, const std::vector<ChatMessage>& messages,
                                bool add_generation_prompt);
std::string apply_chat_template(ChatFamily family, const std::vector<ChatMessage>& messages,
                                bool add_generation_prompt, const ChatTokens& tokens);

}  // namespace duo
