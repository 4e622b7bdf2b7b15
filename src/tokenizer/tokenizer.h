// Text <-> token ids for Hugging Face checkpoints.
//
// Tokenizer::load(model_dir) reads, in order of preference:
//   tokenizer.json   (Hugging Face `tokenizers` format; model type BPE: byte-level family such as
//                     GPT-2 / Llama-3 / Qwen2, and SentencePiece-converted family such as Llama-2 /
//                     Mistral with byte_fallback),
//   tokenizer.model  (SentencePiece, through libsentencepiece),
// plus tokenizer_config.json (add_bos_token / add_eos_token, bos / eos strings, chat_template) and
// special_tokens_map.json when present. encode()/decode() reproduce HF `tokenizer(text).input_ids`
// and `tokenizer.decode(ids, skip_special_tokens=...)`.
//
// BOS/EOS: the tokenizer.json post-processor decides, except that explicit add_bos_token /
// add_eos_token in tokenizer_config.json replace it by "[bos] $A [eos]" (transformers 5 behaviour).
// For tokenizer.model, add_bos_token defaults to true and add_eos_token to false (LlamaTokenizer).
//
// Added tokens (special or not) written literally in the text are matched first, leftmost-longest,
// on the raw text (normalized: false) or on the normalized text (normalized: true), honouring
// lstrip / rstrip. Known limit: `single_word` is ignored.
//
// tokenizer.json components implemented (anything else is rejected with a duo::Error naming the
// file, the field and the type): model BPE (merges as "a b" or ["a", "b"], byte_fallback, unk /
// fuse_unk, ignore_merges; dropout ignored); normalizers Sequence, Prepend, Replace (string), NFC;
// pre-tokenizers Sequence, Split (PCRE2 regex or string; all split behaviours, invert), ByteLevel,
// Metaspace (prepend_scheme always / first / never, split), Digits; decoders Sequence, ByteLevel,
// Replace, ByteFallback, Fuse, Strip, Metaspace; post-processors Sequence, ByteLevel,
// TemplateProcessing (single), BertProcessing, RobertaProcessing.
#pragma once

#include <cstdint>
#include <filesystem>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace duo {

struct TokenizerImpl;

class Tokenizer {
 public:
  ~Tokenizer();
  Tokenizer(const Tokenizer&) = delete;
  Tokenizer& operator=(const Tokenizer&) = delete;

  // Throws duo::Error naming the directory or file on any problem.
  static std::unique_ptr<Tokenizer> load(const std::filesystem::path& model_dir);

  // HF `tokenizer.encode(text, add_special_tokens=...)`: added/special tokens written literally in
  // the text map to their ids; add_special_tokens adds what the post-processor (or add_bos_token /
  // add_eos_token for tokenizer.model) adds, e.g. BOS. Text that is not valid UTF-8 is encoded as
  // its lossy conversion (utf8::lossy: U+FFFD per invalid maximal subpart).
  std::vector<int32_t> encode(std::string_view text, bool add_special_tokens = true) const;

  // HF `tokenizer.decode(ids, skip_special_tokens=...)`. Throws duo::Error for ids outside
  // [0, vocab_size()).
  std::string decode(std::span<const int32_t> ids, bool skip_special_tokens = false) const;

  // Number of ids (model vocab plus added tokens), i.e. HF len(tokenizer).
  int32_t vocab_size() const;
  std::optional<int32_t> bos_id() const;
  // eos token of tokenizer_config.json plus end-of-turn tokens present in the vocab
  // (<|eot_id|>, <|im_end|>, <|end_of_text|>, <|endoftext|>, </s>), deduplicated, config eos first.
  std::vector<int32_t> eos_ids() const;
  std::optional<int32_t> token_to_id(std::string_view token) const;
  // Raw vocabulary string of the id (e.g. "Ġthe", "▁the", "<0x0A>"); throws for bad ids.
  std::string id_to_token(int32_t id) const;
  // True for added tokens flagged special (and SentencePiece control / unknown pieces).
  bool is_special(int32_t id) const;
  // Whether tokenizer_config.json carries a chat_template.
  bool has_chat_template() const;
  // The Jinja chat_template text of tokenizer_config.json (the "default" one when it is a list of
  // named templates); empty when absent. duo does not run Jinja; see chat_template.h.
  const std::string& chat_template_text() const;
  // "tokenizer.json" or "tokenizer.model": which file was used.
  const std::string& source_file() const;

  // --- used by StreamingDecoder ---
  // Bytes one token contributes to decoded text before UTF-8 validation and before the decoder's
  // leading-space strip (empty for skipped special tokens).
  std::string token_bytes(int32_t id, bool skip_special_tokens) const;
  // How many leading spaces decode() strips from the start of the text (SentencePiece family: 1).
  int leading_strip() const;
  // For a byte-fallback token (<0xAB> with a ByteFallback decoder) its byte, else -1.
  int fallback_byte(int32_t id) const;

 private:
  explicit Tokenizer(std::unique_ptr<TokenizerImpl> impl);
  std::unique_ptr<TokenizerImpl> impl_;
};

}  // namespace duo
