#include "tokenizer/streaming_decoder.h"

#include "tokenizer/utf8.h"

namespace duo {

StreamingDecoder::StreamingDecoder(const Tokenizer& tokenizer, bool skip_special_tokens)
    : tok_(tokenizer), skip_special_(skip_special_tokens), strip_(tokenizer.leading_strip()) {}

std::string StreamingDecoder::push(int32_t id) {
  std::string bytes = tok_.token_bytes(id, skip_special_);
  if (bytes.empty()) return {};
  if (first_) {
    first_ = false;
    size_t n = 0;
    while (static_cast<int>(n) < strip_ && n < bytes.size() && bytes[n] == ' ') ++n;
    bytes.erase(0, n);
  }
  pending_ += bytes;
  size_t hold = utf8::incomplete_tail(pending_);
  std::string out = utf8::lossy(std::string_view(pending_).substr(0, pending_.size() - hold));
  pending_.erase(0, pending_.size() - hold);
  return out;
}

std::string StreamingDecoder::flush() {
  std::string out = utf8::lossy(pending_);
  pending_.clear();
  first_ = true;
  return out;
}

}  // namespace duo
