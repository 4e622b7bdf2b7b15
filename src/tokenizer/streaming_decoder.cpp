#include "tokenizer/streaming_decoder.h"

#include "tokenizer/utf8.h"

namespace duo {

StreamingDecoder::StreamingDecoder(const Tokenizer& tokenizer, bool skip_special_tokens)
    : tok_(tokenizer), skip_special_(skip_special_tokens), strip_(tokenizer.leading_strip()) {}

void StreamingDecoder::end_run() {
  if (run_.empty()) return;
  if (utf8::is_valid(run_)) {
    pending_ += run_;
  } else {
    for (size_t i = 0; i < run_.size(); ++i) pending_ += utf8::kReplacement;
  }
  run_.clear();
}

std::string StreamingDecoder::take(bool final) {
  // Strip (decoder Strip / Metaspace) acts on the start of the whole text.
  while (!started_ && strip_ > 0 && !pending_.empty() && pending_[0] == ' ') {
    pending_.erase(0, 1);
    --strip_;
  }
  if (!pending_.empty()) started_ = true;
  size_t hold = final ? 0 : utf8::incomplete_tail(pending_);
  std::string out = utf8::lossy(std::string_view(pending_).substr(0, pending_.size() - hold));
  pending_.erase(0, pending_.size() - hold);
  return out;
}

std::string StreamingDecoder::push(int32_t id) {
  std::string bytes = tok_.token_bytes(id, skip_special_);
  if (bytes.empty()) return {};  // skipped special token: HF drops it before decoding
  int b = tok_.fallback_byte(id);
  if (b >= 0) {
    run_ += static_cast<char>(b);
    return {};
  }
  end_run();
  pending_ += bytes;
  return take(false);
}

std::string StreamingDecoder::flush() {
  end_run();
  std::string out = take(true);
  pending_.clear();
  started_ = false;
  strip_ = tok_.leading_strip();
  return out;
}

}  // namespace duo
