#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "core/error.h"
#include "core/file_util.h"
#include "tokenizer/chat_template.h"
#include "tokenizer/tokenizer.h"

namespace fs = std::filesystem;
using duo::ChatFamily;
using duo::ChatMessage;

namespace {

fs::path fixtures() {
  return fs::path(DUO_SOURCE_DIR) / "tests/fixtures/tokenizers";
}

ChatFamily family_of(const std::string& name) {
  if (name == "llama2") return ChatFamily::kLlama2;
  if (name == "llama3") return ChatFamily::kLlama3;
  if (name == "mistral") return ChatFamily::kMistral;
  if (name == "chatml") return ChatFamily::kChatML;
  duo::fail("unknown family ", name);
}

// Texts and ids rendered by transformers from the official Jinja templates (cases.json "chat").
TEST(ChatTemplate, MatchesHuggingFaceRendering) {
  const auto doc = duo::read_json_file(fixtures() / "cases.json");
  int checked = 0;
  for (const auto& [dir, list] : doc.at("chat").items()) {
    auto tok = duo::Tokenizer::load(fixtures() / dir);
    for (const auto& c : list) {
      std::vector<ChatMessage> msgs;
      for (const auto& m : c["messages"]) msgs.push_back({m["role"], m["content"]});
      const std::string family = c["family"];
      const std::string want = c["text"];
      SCOPED_TRACE(dir + " " + family + ": " + want);
      std::string text =
          duo::apply_chat_template(family_of(family), msgs, c["add_generation_prompt"].get<bool>());
      EXPECT_EQ(text, want);
      EXPECT_EQ(tok->encode(text, false), c["ids"].get<std::vector<int32_t>>());
      ++checked;
    }
  }
  EXPECT_EQ(checked, 12);
}

const std::vector<ChatMessage> kConversation = {
    {"system", "Be brief."},
    {"user", "Hi"},
    {"assistant", "Hello."},
    {"user", "Bye"},
};

TEST(ChatTemplate, Llama2Exact) {
  EXPECT_EQ(
      duo::apply_chat_template(ChatFamily::kLlama2, kConversation, true),
      "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello. </s><s>[INST] Bye [/INST]");
  EXPECT_EQ(duo::apply_chat_template(ChatFamily::kLlama2, {{"user", "Hi"}}, false),
            "<s>[INST] Hi [/INST]");
}

TEST(ChatTemplate, Llama3Exact) {
  EXPECT_EQ(duo::apply_chat_template(ChatFamily::kLlama3, kConversation, true),
            "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
            "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\nHello.<|eot_id|>"
            "<|start_header_id|>user<|end_header_id|>\n\nBye<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n");
  EXPECT_EQ(duo::apply_chat_template(ChatFamily::kLlama3, {{"user", "Hi"}}, false),
            "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>");
}

TEST(ChatTemplate, MistralExact) {
  EXPECT_EQ(duo::apply_chat_template(ChatFamily::kMistral, kConversation, true),
            "<s>[INST] Be brief.\n\nHi [/INST]Hello.</s>[INST] Bye [/INST]");
  EXPECT_THROW(duo::apply_chat_template(ChatFamily::kMistral, {{"assistant", "x"}}, true),
               duo::Error);
}

TEST(ChatTemplate, ChatMLExact) {
  EXPECT_EQ(duo::apply_chat_template(ChatFamily::kChatML, kConversation, true),
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
            "<|im_start|>assistant\nHello.<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n"
            "<|im_start|>assistant\n");
  EXPECT_EQ(duo::apply_chat_template(ChatFamily::kChatML, {{"user", "Hi"}}, false),
            "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
            "<|im_start|>user\nHi<|im_end|>\n");
}

TEST(ChatTemplate, DetectFamily) {
  EXPECT_EQ(duo::detect_chat_family(fixtures() / "bytelevel", "llama"), ChatFamily::kLlama3);
  EXPECT_EQ(duo::detect_chat_family(fixtures() / "bytelevel_chatml", "qwen2"), ChatFamily::kChatML);
  EXPECT_EQ(duo::detect_chat_family(fixtures() / "sentencepiece", "llama"), ChatFamily::kLlama2);
  EXPECT_EQ(duo::detect_chat_family(fixtures() / "sentencepiece_json", "mistral"),
            ChatFamily::kMistral);
  EXPECT_EQ(duo::chat_family_name(ChatFamily::kChatML), "chatml");
}

}  // namespace

namespace {

TEST(ChatTemplate, DetectFromTemplateText) {
  const fs::path dir = fs::temp_directory_path() / "duo_tok_chat_detect";
  fs::remove_all(dir);
  fs::create_directories(dir);
  fs::copy_file(fixtures() / "sentencepiece/tokenizer.model", dir / "tokenizer.model");
  auto write_config = [&](const nlohmann::json& j) {
    std::ofstream(dir / "tokenizer_config.json") << j.dump();
  };
  write_config({{"chat_template", "{{ bos_token }}{{ '[INST] ' + m + ' [/INST]' }}"}});
  EXPECT_EQ(duo::detect_chat_family(dir, "llama"), ChatFamily::kMistral);
  write_config({{"chat_template", "[INST] <<SYS>>\n..."}});
  EXPECT_EQ(duo::detect_chat_family(dir, "llama"), ChatFamily::kLlama2);
  write_config(
      {{"chat_template", nlohmann::json::array({{{"name", "default"}, {"template", "[INST]"}}})}});
  auto tok = duo::Tokenizer::load(dir);
  EXPECT_TRUE(tok->has_chat_template());
  EXPECT_EQ(tok->chat_template_text(), "[INST]");
  fs::remove_all(dir);
}

}  // namespace
