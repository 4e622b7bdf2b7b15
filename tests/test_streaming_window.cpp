// Streaming-store and visibility maths against tables worked out by hand.
#include <gtest/gtest.h>

#include <cstdint>
#include <set>
#include <vector>

#include "duo/streaming_window.h"

using duo::chunk_mode_visible;
using duo::slot_position;
using duo::streaming_slot;
using duo::streaming_store_len;
using duo::streaming_visible;
using duo::streaming_visible_count;

namespace {

// Store contents (slot -> position, -1 empty) after n appends, via slot_position.
std::vector<int64_t> store(int64_t n, int64_t S, int64_t R) {
  std::vector<int64_t> out;
  for (int64_t s = 0; s < S + R; ++s) out.push_back(slot_position(s, n, S, R));
  return out;
}

std::set<int64_t> visible(int64_t t, int64_t S, int64_t R) {
  std::set<int64_t> out;
  for (int64_t j = -2; j <= t + 2; ++j) {
    if (streaming_visible(t, j, S, R)) out.insert(j);
  }
  return out;
}

std::set<int64_t> chunk_visible(int64_t t, int64_t chunk_start, int64_t S, int64_t R) {
  std::set<int64_t> out;
  for (int64_t j = -2; j <= t + 2; ++j) {
    if (chunk_mode_visible(t, j, chunk_start, S, R)) out.insert(j);
  }
  return out;
}

}  // namespace

// S = 2, R = 3: sinks in slots 0,1; ring slots 2,3,4.
TEST(StreamingWindow, SlotOfEachPositionS2R3) {
  //                             j: 0  1  2  3  4  5  6  7  8  9 10 11 12
  const int64_t expected[13] = {0, 1, 2, 3, 4, 2, 3, 4, 2, 3, 4, 2, 3};
  for (int64_t j = 0; j < 13; ++j) EXPECT_EQ(streaming_slot(j, 2, 3), expected[j]) << "j=" << j;
  EXPECT_EQ(streaming_slot(-1, 2, 3), -1);
}

TEST(StreamingWindow, StoreContentsAfterNTokensS2R3) {
  // Hand-worked: row n lists what slots 0..4 hold after positions 0..n-1 were appended.
  const std::vector<std::vector<int64_t>> expected = {
      /* n=0  */ {-1, -1, -1, -1, -1},
      /* n=1  */ {0, -1, -1, -1, -1},
      /* n=2  */ {0, 1, -1, -1, -1},
      /* n=3  */ {0, 1, 2, -1, -1},
      /* n=4  */ {0, 1, 2, 3, -1},  // N = S+R-1
      /* n=5  */ {0, 1, 2, 3, 4},   // N = S+R: full, no wrap yet
      /* n=6  */ {0, 1, 5, 3, 4},   // N = S+R+1: first overwrite
      /* n=7  */ {0, 1, 5, 6, 4},
      /* n=8  */ {0, 1, 5, 6, 7},
      /* n=9  */ {0, 1, 8, 6, 7},
      /* n=10 */ {0, 1, 8, 9, 7},
      /* n=11 */ {0, 1, 8, 9, 10},
      /* n=12 */ {0, 1, 11, 9, 10},
  };
  const int64_t len[13] = {0, 1, 2, 3, 4, 5, 5, 5, 5, 5, 5, 5, 5};
  for (int64_t n = 0; n <= 12; ++n) {
    EXPECT_EQ(store(n, 2, 3), expected[static_cast<size_t>(n)]) << "n=" << n;
    EXPECT_EQ(streaming_store_len(n, 2, 3), len[n]) << "n=" << n;
  }
  // Out-of-range slots.
  EXPECT_EQ(slot_position(5, 12, 2, 3), -1);
  EXPECT_EQ(slot_position(-1, 12, 2, 3), -1);
}

TEST(StreamingWindow, ManyWrapArounds) {
  // After 1000 tokens the ring holds 997, 998, 999: 998-2 = 996 = 3*332 -> slot 2,
  // 999-2 = 997 -> slot 3, 997-2 = 995 -> slot 4.
  EXPECT_EQ(store(1000, 2, 3), (std::vector<int64_t>{0, 1, 998, 999, 997}));
  EXPECT_EQ(streaming_slot(999, 2, 3), 3);
  EXPECT_EQ(streaming_slot(1000, 2, 3), 4);
  EXPECT_EQ(streaming_store_len(1000, 2, 3), 5);
  // S = 4, R = 8 after 100 tokens: ring holds 92..99; 92-4 = 88 = 8*11 -> slot 4.
  EXPECT_EQ(store(100, 4, 8), (std::vector<int64_t>{0, 1, 2, 3, 92, 93, 94, 95, 96, 97, 98, 99}));
}

TEST(StreamingWindow, FewerTokensThanSinks) {
  // S = 4, R = 2, only 2 tokens.
  EXPECT_EQ(store(2, 4, 2), (std::vector<int64_t>{0, 1, -1, -1, -1, -1}));
  EXPECT_EQ(streaming_store_len(2, 4, 2), 2);
  EXPECT_EQ(visible(1, 4, 2), (std::set<int64_t>{0, 1}));
}

TEST(StreamingWindow, RecentZero) {
  // S = 2, R = 0: only the sinks are ever stored.
  EXPECT_EQ(streaming_slot(0, 2, 0), 0);
  EXPECT_EQ(streaming_slot(1, 2, 0), 1);
  EXPECT_EQ(streaming_slot(2, 2, 0), -1);
  EXPECT_EQ(streaming_slot(5, 2, 0), -1);
  EXPECT_EQ(store(5, 2, 0), (std::vector<int64_t>{0, 1}));
  EXPECT_EQ(streaming_store_len(5, 2, 0), 2);
  EXPECT_EQ(visible(5, 2, 0), (std::set<int64_t>{0, 1}));
  EXPECT_EQ(visible(1, 2, 0), (std::set<int64_t>{0, 1}));
}

TEST(StreamingWindow, SinkZero) {
  // S = 0, R = 3: a pure ring, slot = j % 3.
  const int64_t expected[8] = {0, 1, 2, 0, 1, 2, 0, 1};
  for (int64_t j = 0; j < 8; ++j) EXPECT_EQ(streaming_slot(j, 0, 3), expected[j]);
  EXPECT_EQ(store(5, 0, 3), (std::vector<int64_t>{3, 4, 2}));
  EXPECT_EQ(store(2, 0, 3), (std::vector<int64_t>{0, 1, -1}));
  EXPECT_EQ(visible(5, 0, 3), (std::set<int64_t>{3, 4, 5}));
  EXPECT_EQ(visible(1, 0, 3), (std::set<int64_t>{0, 1}));
}

TEST(StreamingWindow, TokenExactVisibleSetsS2R3) {
  EXPECT_EQ(visible(0, 2, 3), (std::set<int64_t>{0}));
  EXPECT_EQ(visible(3, 2, 3), (std::set<int64_t>{0, 1, 2, 3}));
  EXPECT_EQ(visible(4, 2, 3), (std::set<int64_t>{0, 1, 2, 3, 4}));
  EXPECT_EQ(visible(5, 2, 3), (std::set<int64_t>{0, 1, 3, 4, 5}));
  EXPECT_EQ(visible(8, 2, 3), (std::set<int64_t>{0, 1, 6, 7, 8}));
  EXPECT_EQ(visible(12, 2, 3), (std::set<int64_t>{0, 1, 10, 11, 12}));
  EXPECT_FALSE(streaming_visible(5, 6, 2, 3));   // future
  EXPECT_FALSE(streaming_visible(5, -1, 2, 3));  // negative
  const int64_t counts[8] = {1, 2, 3, 4, 5, 5, 5, 5};
  for (int64_t t = 0; t < 8; ++t) EXPECT_EQ(streaming_visible_count(t, 2, 3), counts[t]);
}

// The keys visible at t are exactly what the store holds after t + 1 appends, checked against an
// explicit simulation of appending into an array (not the slot formula).
TEST(StreamingWindow, StoreMatchesVisibilitySimulation) {
  for (int64_t S : {0, 1, 2, 4}) {
    for (int64_t R : {0, 1, 3, 5}) {
      if (S + R == 0) continue;
      std::vector<int64_t> sim(static_cast<size_t>(S + R), -1);
      int64_t ring_next = 0;
      for (int64_t t = 0; t < 40; ++t) {
        if (t < S) {
          sim[static_cast<size_t>(t)] = t;
        } else if (R > 0) {
          sim[static_cast<size_t>(S + ring_next)] = t;
          ring_next = (ring_next + 1) % R;
        }
        EXPECT_EQ(store(t + 1, S, R), sim) << "S=" << S << " R=" << R << " t=" << t;
        std::set<int64_t> held;
        for (int64_t p : sim) {
          if (p >= 0) held.insert(p);
        }
        EXPECT_EQ(visible(t, S, R), held) << "S=" << S << " R=" << R << " t=" << t;
      }
    }
  }
}

TEST(StreamingWindow, ChunkModeS2R3) {
  // First chunk: dense causal.
  std::set<int64_t> dense;
  for (int64_t j = 0; j <= 10; ++j) dense.insert(j);
  EXPECT_EQ(chunk_visible(10, 0, 2, 3), dense);
  // Chunk [8, ...), query 10: sinks 0,1 + last 3 cached 5,6,7 + chunk 8,9,10.
  EXPECT_EQ(chunk_visible(10, 8, 2, 3), (std::set<int64_t>{0, 1, 5, 6, 7, 8, 9, 10}));
  // Query at the chunk start sees no other chunk token.
  EXPECT_EQ(chunk_visible(8, 8, 2, 3), (std::set<int64_t>{0, 1, 5, 6, 7, 8}));
  // Decode (one-token chunk at t = 10): sinks + 7,8,9 cached + itself, one more than token-exact.
  EXPECT_EQ(chunk_visible(10, 10, 2, 3), (std::set<int64_t>{0, 1, 7, 8, 9, 10}));
  EXPECT_EQ(visible(10, 2, 3), (std::set<int64_t>{0, 1, 8, 9, 10}));
  // Chunk start inside the sink+recent span: everything before is visible.
  EXPECT_EQ(chunk_visible(5, 3, 2, 3), (std::set<int64_t>{0, 1, 2, 3, 4, 5}));
  // R = 0: only sinks from earlier chunks.
  EXPECT_EQ(chunk_visible(9, 8, 2, 0), (std::set<int64_t>{0, 1, 8, 9}));
}

static_assert(duo::streaming_slot(7, 2, 3) == 4, "usable in constant expressions");
static_assert(duo::streaming_capacity(64, 256) == 320);
