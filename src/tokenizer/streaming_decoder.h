// Incremental detokenization for generation: feed ids one at a time, get the newly printable text.
// Never emits half a UTF-8 character: bytes of an incomplete character (byte-fallback tokens of an
// emoji split across tokens, byte-level tokens mid-character) are held until completed. The leading
// space that SentencePiece-style decoders strip is stripped from the first emitted token only, so
// the concatenation of everything returned (including flush()) equals
// Tokenizer::decode(all ids, skip_special_tokens) for valid UTF-8 output.
// Invalid bytes become U+FFFD (one per maximal invalid subsequence; decode() of an invalid
// byte-fallback run gives one U+FFFD per byte, so the two can differ on invalid output only).
#pragma once

#include <cstdint>
#include <string>

#include "tokenizer/tokenizer.h"

namespace duo {

class StreamingDecoder {
 public:
  // `tokenizer` must outlive the decoder.
  explicit StreamingDecoder(const Tokenizer& tokenizer, bool skip_special_tokens = true);

  // Returns the text that became printable with this token (possibly empty).
  std::string push(int32_t id);
  // Returns whatever is still held (incomplete trailing bytes become U+FFFD) and resets the
  // decoder for a new sequence.
  std::string flush();

 private:
  const Tokenizer& tok_;
  bool skip_special_;
  int strip_;
  bool first_ = true;
  std::string pending_;  // bytes not yet emitted (an incomplete UTF-8 tail)
};

}  // namespace duo
