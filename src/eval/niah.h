// Needle-in-a-haystack: prompt construction at token depths and answer scoring. The prompt format
// is the one the demo models were trained on (docs/demo_models.md):
//   [BOS] haystack[:d] "\n" needle "\n" haystack[d:] "\n\nQuestion: " question "\nAnswer:"
// where d is a token index and each piece is tokenized on its own.
#pragma once

#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

#include "engine/model.h"
#include "tokenizer/tokenizer.h"

namespace duo {

struct Needle {
  std::string needle;
  std::string question;
  std::string answer;
  // Further needles inserted into the same haystack but not asked about (key-value task): they
  // make the model retrieve the asked one rather than any one.
  std::vector<std::string> distractors;
};

// The classic sentence needle of the DuoAttention / LongBench NIAH evaluation.
Needle classic_sentence_needle();
// A numeric passkey needle; the number is drawn from `seed`.
Needle passkey_needle(uint64_t seed);
// Key-value retrieval with distractors: `pairs` needles "The special magic number for {key} is:
// {value}." with distinct adjective-noun keys and 6-digit values (the demo models' training
// wording, tools/make_needle_data.py KV_WORDINGS[0]); the first is asked, the others distract.
Needle kv_needle(uint64_t seed, int64_t pairs);

// Haystack token ids: the .txt files under `dir` (recursively, sorted by path) concatenated, or,
// when dir is empty, the classic repeated filler ("The grass is green. ..."). Repeated until
// `min_tokens`.
std::vector<int32_t> haystack_tokens(const Tokenizer& tok, const std::filesystem::path& dir,
                                     int64_t min_tokens);

struct NiahPrompt {
  std::vector<int32_t> ids;
  int64_t needle_position = 0;  // token index where the needle starts
};

// A prompt of exactly `length` tokens with the needle at `depth_percent` (0..100) of the haystack
// and distractor i (of k) at depth_percent + (i + 1) * 100 / (k + 1), wrapped into [0, 100): spread
// evenly around the asked needle. Throws Error when length is too short to hold BOS, needles and
// question.
NiahPrompt build_niah_prompt(const Tokenizer& tok, const std::vector<int32_t>& haystack,
                             const Needle& n, int64_t length, double depth_percent);

struct NiahScore {
  bool exact = false;  // first generated line == answer (trimmed)
  double words = 0;    // share of the answer's words found in the first generated line
};

NiahScore score_answer(const std::string& generated, const std::string& answer);

// -log softmax(logits)[target] in double, over `vocab` logits.
double token_nll(const float* logits, int64_t vocab, int32_t target);

// Teacher-forced negative log-likelihood of `continuation` after `prompt`, in nats per token (mean
// over the continuation): the prompt is prefilled into `cache` (empty, capacity >= both) in chunks
// of `chunk` tokens, then the continuation but its last token, reading the logits that predict each
// continuation token. A continuous needle measure: it still separates head patterns when every one
// of them answers right (exact match ties). Throws Error on an empty prompt or continuation.
double continuation_nll(Model& model, KVCache& cache, const std::vector<int32_t>& prompt,
                        const std::vector<int32_t>& continuation, int64_t chunk);

}  // namespace duo
