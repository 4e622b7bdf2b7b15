// Incremental detokenization for generation: feed ids one at a time, get the newly printable text.
//
// The concatenation of everything push() and flush() return equals
// Tokenizer::decode(all ids, skip_special_tokens), invalid bytes included. To get there:
//  - bytes of an incomplete UTF-8 character (byte-level tokens mid-character) are held until the
//    character completes; bytes that can never complete become U+FFFD as decode() does;
//  - byte-fallback tokens (<0xAB>) are held until the run of them ends (next non-byte token or
//    flush()), because HF turns a run that is not valid UTF-8 as a whole into one U+FFFD per byte;
//    a character spelled in byte tokens therefore appears with the token after it;
//  - the leading space that SentencePiece-style decoders strip is stripped from the start of the
//    text only.
#pragma once

#include <cstdint>
#include <string>

#include "tokenizer/tokenizer.h"

namespace duo {

class StreamingDecoder {
 public:
  // `tokenizer` must outlive the decoder.
  explicit StreamingDecoder(const Tokenizer& tokenizer, bool skip_special_tokens = true);

  // Returns the text that became printable with this token (possibly empty). Throws duo::Error
  // for ids outside the vocabulary.
  std::string push(int32_t id);
  // Returns whatever is still held (incomplete trailing bytes become U+FFFD) and resets the
  // decoder for a new sequence.
  std::string flush();

 private:
  std::string take(bool final);
  void end_run();

  const Tokenizer& tok_;
  bool skip_special_;
  int strip_;             // leading spaces still to strip
  bool started_ = false;  // some text has been produced (strip no longer applies)
  std::string run_;       // pending byte-fallback run
  std::string pending_;   // decoded bytes not yet returned (an incomplete UTF-8 tail)
};

}  // namespace duo
