// The one place for the split-KV decode grid's index maths: which (KV-head row, split) a block of
// the decode split kernels takes. Header-only, usable from host code (tests) and CUDA kernels.
//
// A "row" is one KV head's tile of query heads: row = g * head_tiles + tile, g the KV head (the
// first num_retrieval KV heads are retrieval heads). Retrieval rows read up to the whole context
// and get `splits` blocks each; streaming rows read at most S + R + 1 keys and get
// `stream_splits` (<= splits) blocks each, so a streaming head costs a handful of blocks, not
// `splits` mostly idle ones. Blocks are numbered streaming rows first (short; they finish while
// the long retrieval blocks stream the cache), then retrieval rows, split fastest:
//   block b < Ns = (num_kv_heads - num_retrieval) * head_tiles * stream_splits:
//     row = num_retrieval * head_tiles + b / stream_splits, split = b % stream_splits
//   else, c = b - Ns:  row = c / splits, split = c % splits
// The decode merge kernel recomputes each head's split count the same way (decode_head_splits).
#pragma once

#include <cstdint>

#include "duo/streaming_window.h"  // DUO_HOST_DEVICE

namespace duo {

struct DecodeBlock {
  int row;     // g * head_tiles + tile
  int split;   // 0 .. splits - 1
  int splits;  // the row's split count (splits or stream_splits)
};

struct DecodeGrid {
  int num_kv_heads, num_retrieval, head_tiles, splits, stream_splits;
};

// Blocks in the grid.
DUO_HOST_DEVICE constexpr int64_t decode_grid_blocks(const DecodeGrid& d) {
  return static_cast<int64_t>(d.num_kv_heads - d.num_retrieval) * d.head_tiles * d.stream_splits +
         static_cast<int64_t>(d.num_retrieval) * d.head_tiles * d.splits;
}

// The (row, split) of block b, 0 <= b < decode_grid_blocks(d).
DUO_HOST_DEVICE constexpr DecodeBlock decode_block(const DecodeGrid& d, int64_t b) {
  const int64_t ns =
      static_cast<int64_t>(d.num_kv_heads - d.num_retrieval) * d.head_tiles * d.stream_splits;
  if (b < ns)
    return {d.num_retrieval * d.head_tiles + static_cast<int>(b / d.stream_splits),
            static_cast<int>(b % d.stream_splits), d.stream_splits};
  const int64_t c = b - ns;
  return {static_cast<int>(c / d.splits), static_cast<int>(c % d.splits), d.splits};
}

// Split count of KV head g's rows.
DUO_HOST_DEVICE constexpr int decode_head_splits(const DecodeGrid& d, int g) {
  return g < d.num_retrieval ? d.splits : d.stream_splits;
}

// Splits for the streaming rows: about `keys_per_split` keys each over the at most S + R + 1 keys
// a streaming head sees in decode (chunk mode: sinks + R + 1 recent), at least 1, at most splits.
DUO_HOST_DEVICE constexpr int decode_stream_splits(int64_t S, int64_t R, int splits,
                                                   int keys_per_split) {
  const int64_t want = (S + R + 1 + keys_per_split - 1) / keys_per_split;
  return want < 1 ? 1 : (want > splits ? splits : static_cast<int>(want));
}

}  // namespace duo
