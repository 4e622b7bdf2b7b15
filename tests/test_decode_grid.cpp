// Worked examples for the split-KV decode grid (src/duo/decode_grid.h).
#include "duo/decode_grid.h"

#include <gtest/gtest.h>

#include <set>
#include <utility>

namespace {

using duo::DecodeGrid;

// 4 KV heads, 1 retrieval, 2 tiles per head, 5 splits for retrieval rows, 2 for streaming rows:
// 3 streaming heads x 2 tiles x 2 = 12 streaming blocks first, then 1 x 2 x 5 = 10 retrieval ones.
TEST(DecodeGrid, WorkedExample) {
  const DecodeGrid d{4, 1, 2, 5, 2};
  EXPECT_EQ(duo::decode_grid_blocks(d), 22);
  // Block 0: first streaming row (KV head 1, tile 0 -> row 2), split 0 of 2.
  auto b = duo::decode_block(d, 0);
  EXPECT_EQ(b.row, 2);
  EXPECT_EQ(b.split, 0);
  EXPECT_EQ(b.splits, 2);
  b = duo::decode_block(d, 3);  // row 3 (KV head 1, tile 1), split 1
  EXPECT_EQ(b.row, 3);
  EXPECT_EQ(b.split, 1);
  b = duo::decode_block(d, 11);  // last streaming block: row 7 (KV head 3, tile 1), split 1
  EXPECT_EQ(b.row, 7);
  EXPECT_EQ(b.split, 1);
  b = duo::decode_block(d, 12);  // first retrieval block: row 0, split 0 of 5
  EXPECT_EQ(b.row, 0);
  EXPECT_EQ(b.split, 0);
  EXPECT_EQ(b.splits, 5);
  b = duo::decode_block(d, 21);  // row 1 (KV head 0, tile 1), split 4
  EXPECT_EQ(b.row, 1);
  EXPECT_EQ(b.split, 4);
  EXPECT_EQ(duo::decode_head_splits(d, 0), 5);
  EXPECT_EQ(duo::decode_head_splits(d, 1), 2);
}

// Every (row, split) pair appears exactly once, for all-retrieval, all-streaming and mixed grids.
TEST(DecodeGrid, CoversEveryRowAndSplitOnce) {
  for (const DecodeGrid d : {DecodeGrid{8, 8, 1, 16, 3}, DecodeGrid{8, 0, 1, 16, 3},
                             DecodeGrid{32, 7, 1, 132, 7}, DecodeGrid{2, 1, 3, 4, 4}}) {
    std::set<std::pair<int, int>> seen;
    for (int64_t b = 0; b < duo::decode_grid_blocks(d); ++b) {
      const auto x = duo::decode_block(d, b);
      const int g = x.row / d.head_tiles;
      ASSERT_EQ(x.splits, duo::decode_head_splits(d, g));
      ASSERT_GE(x.split, 0);
      ASSERT_LT(x.split, x.splits);
      ASSERT_TRUE(seen.insert({x.row, x.split}).second) << "row " << x.row << " split " << x.split;
    }
    int64_t want = 0;
    for (int g = 0; g < d.num_kv_heads; ++g) want += d.head_tiles * duo::decode_head_splits(d, g);
    EXPECT_EQ(static_cast<int64_t>(seen.size()), want);
  }
}

TEST(DecodeGrid, StreamSplits) {
  // S=128, R=256: at most 385 keys; 64 keys per split -> 7 splits.
  EXPECT_EQ(duo::decode_stream_splits(128, 256, 132, 64), 7);
  EXPECT_EQ(duo::decode_stream_splits(128, 256, 4, 64), 4);  // capped by splits
  EXPECT_EQ(duo::decode_stream_splits(0, 0, 132, 64), 1);    // one key (the new token)
  EXPECT_EQ(duo::decode_stream_splits(64, 0, 132, 64), 2);   // 65 keys
}

}  // namespace
