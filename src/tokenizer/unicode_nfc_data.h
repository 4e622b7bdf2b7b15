// Unicode tables for NFC (generated into unicode_nfc_data.cpp by
// tools/fixtures/gen_unicode_nfc.py).
#pragma once

#include <cstddef>
#include <cstdint>

namespace duo::nfc_data {

struct CccEntry {
  uint32_t cp;
  uint8_t ccc;
};
struct DecompEntry {
  uint32_t cp;
  uint32_t offset;  // into kDecompData
  uint32_t length;
};
struct ComposeEntry {
  uint32_t first;
  uint32_t second;
  uint32_t composite;
};

// All sorted by code point (kCompose by (first, second)).
extern const CccEntry kCcc[];
extern const size_t kCccSize;
extern const uint32_t kDecompData[];
extern const DecompEntry kDecomp[];
extern const size_t kDecompSize;
extern const ComposeEntry kCompose[];
extern const size_t kComposeSize;

}  // namespace duo::nfc_data
