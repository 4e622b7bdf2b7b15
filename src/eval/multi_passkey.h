// The synthetic "multi_passkey10" data of duoattention.md section 4, from any directory of text:
// a haystack with k passkeys (32 NATO words each) at sorted depths in [5%, 95%], then a question
// and answer block for every passkey. The QA block is what head identification supervises.
#pragma once

#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "tokenizer/tokenizer.h"

namespace duo {

struct PasskeySample {
  std::vector<int32_t> ids;
  int64_t label_begin = 0;  // the question-and-answer block is ids[label_begin:]
  std::vector<std::string> passkeys;
  std::vector<int64_t> needle_positions;  // token index of each needle
  std::vector<int64_t> needle_lengths;    // its length in tokens
};

enum class PasskeyStyle {
  kDuo,  // section 4: NATO-word passkeys, "Remember this sequence of words..." (the default)
  kQa,   // numeric passkeys in the demo models' "Question: ...\nAnswer: ..." format
         // (docs/demo_models.md)
};

struct PasskeyOptions {
  PasskeyStyle style = PasskeyStyle::kDuo;
  int64_t haystack_tokens = 4000;  // tokens of haystack (the sample is longer by needles + QA)
  int64_t num_passkeys = 10;
  int64_t words_per_passkey = 32;
  double min_depth = 0.05;
  double max_depth = 0.95;
};

// `haystack` is a long token stream (e.g. haystack_tokens() of eval/niah.h); a random window of it
// is used. Deterministic for a given rng state.
PasskeySample make_multi_passkey_sample(const Tokenizer& tok, const std::vector<int32_t>& haystack,
                                        const PasskeyOptions& opt, std::mt19937_64& rng);

}  // namespace duo
