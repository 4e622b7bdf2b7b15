// Unicode NFC normalization (canonical decomposition, canonical ordering, canonical composition),
// used by the tokenizer.json "NFC" normalizer (Qwen2). Tables: unicode_nfc_data.cpp.
#pragma once

#include <string>
#include <string_view>

namespace duo::utf8 {

// NFC of valid UTF-8 text (invalid bytes are passed through unchanged). ASCII-only input is
// returned as is without table lookups.
std::string nfc(std::string_view text);

}  // namespace duo::utf8
