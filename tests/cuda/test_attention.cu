// GPU attention kernels (src/cuda/attention.h) against a double-precision CPU reference computed
// from the same bf16 inputs: for each query, softmax over exactly the keys that streaming_visible /
// chunk_mode_visible / causality allow. Outputs are poisoned (NaN) inside and guarded by canary
// bytes outside; stores are NaN everywhere no valid position lives, so a read of a wrong row shows.
// Without a CUDA device every test skips ("no CUDA device").
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "cuda/attention.h"
#include "duo/streaming_window.h"

namespace {

// ---- Error bounds (bf16 inputs and outputs, fp32 accumulation)
// ----------------------------------- Output rounding to bf16 alone gives NMSE ~1e-6 and |err| up
// to half an ulp (0.016 for |x| in [4, 8)); P is rounded to bf16 before P*V in the prefill kernel
// (another ~2^-9 relative per term).
constexpr double kMaxNmse = 2e-5;
constexpr double kMaxAbs = 3e-2;
constexpr size_t kGuardBytes = 4096;
constexpr unsigned char kCanary = 0xA5;

bool have_gpu() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  return count > 0;
}
#define REQUIRE_GPU() \
  if (!have_gpu()) GTEST_SKIP() << "no CUDA device"

#define CK(call)                                                           \
  do {                                                                     \
    cudaError_t e_ = (call);                                               \
    ASSERT_EQ(e_, cudaSuccess) << #call << ": " << cudaGetErrorString(e_); \
  } while (0)

uint16_t f2bf(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if (std::isnan(f)) return 0x7fc0;
  u += 0x7fff + ((u >> 16) & 1);
  return static_cast<uint16_t>(u >> 16);
}
float bf2f(uint16_t b) {
  uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
constexpr uint16_t kNaNbf = 0x7fc0;

// Device buffer with canary guards on both sides.
struct Guarded {
  unsigned char* base = nullptr;
  size_t bytes = 0;
  void alloc(size_t b, uint16_t fill) {
    bytes = b;
    if (cudaMalloc(&base, b + 2 * kGuardBytes) != cudaSuccess)
      throw std::runtime_error("cudaMalloc");
    std::vector<unsigned char> h(b + 2 * kGuardBytes, kCanary);
    for (size_t i = 0; i + 1 < b; i += 2) std::memcpy(&h[kGuardBytes + i], &fill, 2);
    cudaMemcpy(base, h.data(), h.size(), cudaMemcpyHostToDevice);
  }
  void* ptr() const { return base + kGuardBytes; }
  bool guards_ok() const {
    std::vector<unsigned char> h(kGuardBytes);
    for (int side = 0; side < 2; ++side) {
      cudaMemcpy(h.data(), side == 0 ? base : base + kGuardBytes + bytes, kGuardBytes,
                 cudaMemcpyDeviceToHost);
      for (unsigned char c : h)
        if (c != kCanary) return false;
    }
    return true;
  }
  std::vector<uint16_t> download() const {
    std::vector<uint16_t> h(bytes / 2);
    cudaMemcpy(h.data(), ptr(), bytes, cudaMemcpyDeviceToHost);
    return h;
  }
  void upload(const std::vector<uint16_t>& h) {
    cudaMemcpy(ptr(), h.data(), std::min(bytes, h.size() * 2), cudaMemcpyHostToDevice);
  }
  ~Guarded() {
    if (base) cudaFree(base);
  }
};

struct Shape {
  int d = 128, heads = 8, kv_heads = 2, retrieval = 1;
  int64_t S = 4, R = 8;
  duo::cuda::StreamingMode mode = duo::cuda::StreamingMode::kExact;
  int64_t capacity = 0;
};

// Full history of K/V per KV head (positions 0 .. total-1), bf16 bits.
struct History {
  std::vector<uint16_t> k, v;  // [kv_heads][total][d]
  int64_t total = 0;
  int d = 0;
  uint16_t kb(int g, int64_t j, int c) const { return k[(g * total + j) * d + c]; }
  uint16_t vb(int g, int64_t j, int c) const { return v[(g * total + j) * d + c]; }
};

History make_history(const Shape& s, int64_t total, std::mt19937& rng) {
  History h;
  h.total = total;
  h.d = s.d;
  std::normal_distribution<float> nd(0.f, 1.f);
  h.k.resize(static_cast<size_t>(s.kv_heads * total * s.d));
  h.v.resize(h.k.size());
  for (auto& x : h.k) x = f2bf(nd(rng));
  for (auto& x : h.v) x = f2bf(nd(rng));
  return h;
}

bool ref_visible(const Shape& s, bool retrieval, int64_t t, int64_t j, int64_t p0) {
  if (retrieval) return j >= 0 && j <= t;
  if (s.mode == duo::cuda::StreamingMode::kChunk)
    return duo::chunk_mode_visible(t, j, p0, s.S, s.R);
  return duo::streaming_visible(t, j, s.S, s.R);
}

// out[i][h][c] in double.
std::vector<double> reference(const Shape& s, const History& hist, const std::vector<uint16_t>& q,
                              int64_t p0, int64_t n) {
  const int d = s.d, H = s.heads, group = s.heads / s.kv_heads;
  const double scale = 1.0 / std::sqrt(static_cast<double>(d));
  std::vector<double> out(static_cast<size_t>(n * H * d), 0.0);
  std::vector<double> sc;
  std::vector<int64_t> keys;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t t = p0 + i;
    for (int h = 0; h < H; ++h) {
      const int g = h / group;
      const bool retrieval = g < s.retrieval;
      keys.clear();
      sc.clear();
      for (int64_t j = 0; j <= t; ++j) {
        if (!ref_visible(s, retrieval, t, j, p0)) continue;
        double dot = 0;
        for (int c = 0; c < d; ++c)
          dot += static_cast<double>(bf2f(q[(i * H + h) * d + c])) * bf2f(hist.kb(g, j, c));
        keys.push_back(j);
        sc.push_back(dot * scale);
      }
      double mx = -INFINITY;
      for (double x : sc) mx = std::max(mx, x);
      double sum = 0;
      for (double& x : sc) {
        x = std::exp(x - mx);
        sum += x;
      }
      double* o = &out[(i * H + h) * d];
      for (size_t e = 0; e < keys.size(); ++e)
        for (int c = 0; c < d; ++c) o[c] += sc[e] / sum * bf2f(hist.vb(g, keys[e], c));
    }
  }
  return out;
}

struct ErrStats {
  double nmse = 0, max_abs = 0;
  bool finite = true;
};
ErrStats compare(const std::vector<uint16_t>& got, const std::vector<double>& ref) {
  ErrStats e;
  double num = 0, den = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    const double g = bf2f(got[i]);
    if (!std::isfinite(g)) e.finite = false;
    num += (g - ref[i]) * (g - ref[i]);
    den += ref[i] * ref[i];
    e.max_abs = std::max(e.max_abs, std::fabs(g - ref[i]));
  }
  e.nmse = den > 0 ? num / den : num;
  return e;
}

// Device stores for one layer, NaN where no valid position lives.
struct Stores {
  Guarded rk, rv, sk, sv;
  int64_t slots = 0;
};

void init_stores(const Shape& s, Stores& st) {
  const int nr = s.retrieval, ns = s.kv_heads - s.retrieval;
  st.slots = std::min(s.capacity, s.S + s.R);
  st.rk.alloc(std::max<size_t>(2, static_cast<size_t>(nr) * s.capacity * s.d * 2), kNaNbf);
  st.rv.alloc(std::max<size_t>(2, static_cast<size_t>(nr) * s.capacity * s.d * 2), kNaNbf);
  st.sk.alloc(std::max<size_t>(2, static_cast<size_t>(ns) * st.slots * s.d * 2), kNaNbf);
  st.sv.alloc(std::max<size_t>(2, static_cast<size_t>(ns) * st.slots * s.d * 2), kNaNbf);
}

// Fills the stores as the backend would hold them for a call at p0 with n new tokens: retrieval
// rows 0..p0+n-1, streaming slots with positions < p0.
void fill_stores(const Shape& s, const History& hist, int64_t p0, int64_t n, Stores& st) {
  const int nr = s.retrieval, ns = s.kv_heads - s.retrieval, d = s.d;
  std::vector<uint16_t> rk(static_cast<size_t>(nr) * s.capacity * d, kNaNbf), rv(rk.size(), kNaNbf);
  for (int g = 0; g < nr; ++g)
    for (int64_t j = 0; j < p0 + n; ++j)
      for (int c = 0; c < d; ++c) {
        rk[(g * s.capacity + j) * d + c] = hist.kb(g, j, c);
        rv[(g * s.capacity + j) * d + c] = hist.vb(g, j, c);
      }
  std::vector<uint16_t> sk(static_cast<size_t>(ns) * st.slots * d, kNaNbf), sv(sk.size(), kNaNbf);
  for (int sg = 0; sg < ns; ++sg)
    for (int64_t slot = 0; slot < st.slots; ++slot) {
      const int64_t pos = duo::slot_position(slot, p0, s.S, s.R);
      if (pos < 0) continue;
      for (int c = 0; c < d; ++c) {
        sk[(sg * st.slots + slot) * d + c] = hist.kb(nr + sg, pos, c);
        sv[(sg * st.slots + slot) * d + c] = hist.vb(nr + sg, pos, c);
      }
    }
  if (!rk.empty()) st.rk.upload(rk), st.rv.upload(rv);
  if (!sk.empty()) st.sk.upload(sk), st.sv.upload(sv);
}

std::vector<uint16_t> new_rows(const Shape& s, const History& hist, int64_t p0, int64_t n, bool v) {
  std::vector<uint16_t> out(static_cast<size_t>(n * s.kv_heads * s.d));
  for (int64_t i = 0; i < n; ++i)
    for (int g = 0; g < s.kv_heads; ++g)
      for (int c = 0; c < s.d; ++c)
        out[(i * s.kv_heads + g) * s.d + c] = v ? hist.vb(g, p0 + i, c) : hist.kb(g, p0 + i, c);
  return out;
}

std::vector<uint16_t> random_q(const Shape& s, int64_t n, std::mt19937& rng) {
  std::normal_distribution<float> nd(0.f, 1.f);
  std::vector<uint16_t> q(static_cast<size_t>(n * s.heads * s.d));
  for (auto& x : q) x = f2bf(nd(rng));
  return q;
}

duo::cuda::AttentionParams make_params(const Shape& s, const Stores& st, int64_t p0, int64_t n) {
  duo::cuda::AttentionParams p{};
  p.n = n;
  p.p0 = p0;
  p.num_heads = s.heads;
  p.num_kv_heads = s.kv_heads;
  p.num_retrieval = s.retrieval;
  p.head_dim = s.d;
  p.scale = 1.0f / std::sqrt(static_cast<float>(s.d));
  p.retrieval_k = static_cast<const __nv_bfloat16*>(st.rk.ptr());
  p.retrieval_v = static_cast<const __nv_bfloat16*>(st.rv.ptr());
  p.capacity = s.capacity;
  p.streaming_k = static_cast<const __nv_bfloat16*>(st.sk.ptr());
  p.streaming_v = static_cast<const __nv_bfloat16*>(st.sv.ptr());
  p.slots = st.slots;
  p.sink = s.S;
  p.recent = s.R;
  p.mode = s.mode;
  return p;
}

int num_sms() {
  int dev = 0, sms = 0;
  cudaGetDevice(&dev);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  return sms;
}

struct Case {
  std::string name;
  Shape s;
  int64_t p0, n;
  int ws_mode;  // 0: no workspace (prefill kernel), 1: full workspace, 2: one split only
};

std::string describe(const Case& c) {
  char buf[256];
  std::snprintf(buf, sizeof buf,
                "d=%d H=%d Hkv=%d nr=%d S=%lld R=%lld mode=%s p0=%lld n=%lld ws=%d", c.s.d,
                c.s.heads, c.s.kv_heads, c.s.retrieval, static_cast<long long>(c.s.S),
                static_cast<long long>(c.s.R),
                c.s.mode == duo::cuda::StreamingMode::kChunk ? "chunk" : "exact",
                static_cast<long long>(c.p0), static_cast<long long>(c.n), c.ws_mode);
  return buf;
}

Case mk(std::string name, int d, int H, int Hkv, int nr, int64_t S, int64_t R, int64_t p0,
        int64_t n, int ws = 0, bool chunk = false, int64_t capacity = -1) {
  Case c;
  c.name = std::move(name);
  c.s.d = d;
  c.s.heads = H;
  c.s.kv_heads = Hkv;
  c.s.retrieval = nr;
  c.s.S = S;
  c.s.R = R;
  c.s.mode = chunk ? duo::cuda::StreamingMode::kChunk : duo::cuda::StreamingMode::kExact;
  c.s.capacity = capacity < 0 ? p0 + n + 5 : capacity;
  c.p0 = p0;
  c.n = n;
  c.ws_mode = ws;
  return c;
}

std::vector<Case> single_call_cases() {
  std::vector<Case> v;
  // n = 1: decode kernel (workspace), one-split decode, prefill kernel (no workspace).
  for (int ws : {1, 2, 0}) {
    v.push_back(mk("n1_ws" + std::to_string(ws), 128, 8, 2, 1, 4, 8, 50, 1, ws));
    v.push_back(mk("n1_d64_ws" + std::to_string(ws), 64, 8, 2, 1, 4, 8, 50, 1, ws));
  }
  v.push_back(mk("n1_p0_0_decode", 128, 8, 2, 1, 4, 8, 0, 1, 1));
  v.push_back(mk("n1_p0_0_prefill", 128, 8, 2, 1, 4, 8, 0, 1, 0));
  // Awkward n and p0.
  for (int64_t n : {3, 19, 199})
    for (int64_t p0 : {0, 13, 77}) {
      v.push_back(
          mk("n" + std::to_string(n) + "_p" + std::to_string(p0), 128, 8, 2, 1, 4, 8, p0, n));
      v.push_back(
          mk("d64_n" + std::to_string(n) + "_p" + std::to_string(p0), 64, 8, 2, 1, 4, 8, p0, n));
    }
  // Around S + R (S=16, R=32: t = 47, 48, 49).
  for (int64_t p0 : {46, 47, 48, 49}) {
    v.push_back(mk("edge_decode_p" + std::to_string(p0), 128, 8, 4, 2, 16, 32, p0, 1, 1));
    v.push_back(mk("edge_prefill_p" + std::to_string(p0), 128, 8, 4, 2, 16, 32, p0, 3));
  }
  v.push_back(mk("edge_prefill_span", 128, 8, 4, 2, 16, 32, 40, 70));
  // GQA group 1, 2, 4, 8 (and groups of 6 and 20 for the decode head-tiling: the tensor-core
  // split kernel takes up to 16 query heads per block, so 20 needs two tiles, the second partial).
  for (int grp : {1, 2, 4, 6, 8, 20}) {
    v.push_back(mk("gqa" + std::to_string(grp) + "_prefill", 128, 2 * grp, 2, 1, 4, 8, 30, 45));
    v.push_back(mk("gqa" + std::to_string(grp) + "_decode", 128, 2 * grp, 2, 1, 4, 8, 75, 1, 1));
    v.push_back(mk("gqa" + std::to_string(grp) + "_d64_decode", 64, 2 * grp, 2, 1, 4, 8, 75, 1, 1));
  }
  // 0, 1, all retrieval heads.
  for (int nr : {0, 1, 4}) {
    v.push_back(mk("nr" + std::to_string(nr) + "_prefill", 128, 8, 4, nr, 4, 8, 21, 33));
    v.push_back(mk("nr" + std::to_string(nr) + "_decode", 128, 8, 4, nr, 4, 8, 54, 1, 1));
  }
  // S = 0; R = 0 with S > 0; S = R = 0 (streaming queries past the sinks see nothing: output 0).
  v.push_back(mk("S0_prefill", 128, 8, 2, 1, 0, 8, 10, 40));
  v.push_back(mk("S0_decode", 128, 8, 2, 1, 0, 8, 30, 1, 1));
  v.push_back(mk("R0_prefill", 128, 8, 2, 1, 4, 0, 2, 40));
  v.push_back(mk("R0_decode", 128, 8, 2, 1, 4, 0, 30, 1, 1));
  v.push_back(mk("S0R0_prefill", 128, 8, 2, 1, 0, 0, 5, 20));
  v.push_back(mk("S0R0_decode", 128, 8, 2, 1, 0, 0, 5, 1, 1));
  // Chunk (release-compat) mode.
  v.push_back(mk("chunk_first", 128, 8, 2, 1, 4, 8, 0, 70, 0, true));
  v.push_back(mk("chunk_later", 128, 8, 2, 1, 4, 8, 100, 33, 0, true));
  v.push_back(mk("chunk_decode", 128, 8, 2, 1, 4, 8, 100, 1, 1, true));
  v.push_back(mk("chunk_decode_p0_0", 128, 8, 2, 0, 4, 8, 0, 1, 1, true));
  v.push_back(mk("chunk_d64_later", 64, 8, 4, 2, 16, 32, 300, 150, 0, true));
  // Capacity below S + R (slots = capacity).
  v.push_back(mk("small_capacity", 128, 8, 2, 1, 16, 32, 20, 10, 0, false, 40));
  v.push_back(mk("small_capacity_decode", 128, 8, 2, 1, 16, 32, 38, 1, 1, false, 40));
  // Realistic window, many key tiles skipped; all-streaming long prefill.
  v.push_back(mk("S128_R256_prefill", 128, 16, 4, 2, 128, 256, 700, 150));
  v.push_back(mk("S128_R256_decode", 128, 16, 4, 2, 128, 256, 1500, 1, 1));
  v.push_back(mk("all_streaming_long", 64, 4, 2, 0, 4, 8, 0, 300));
  // Long decode contexts: many splits.
  v.push_back(mk("decode_ctx5000", 128, 8, 2, 1, 16, 64, 5000, 1, 1));
  v.push_back(mk("decode_ctx20000_d64", 64, 4, 1, 1, 16, 64, 20000, 1, 1));
  v.push_back(mk("prefill_ctx2000", 128, 8, 2, 1, 16, 64, 2000, 64));
  // Long chunks (n >= 1024: the sm_90a wgmma kernel on Hopper by default; the whole suite also
  // runs with DUO_ATTN_SM90=1 to force it for every n): n not a multiple of the 128-row tile,
  // cached keys (p0 > 0), GQA groups 4 and 8, mixed head types, chunk mode.
  v.push_back(mk("long_n1500_gqa4", 128, 8, 2, 1, 16, 64, 0, 1500));
  v.push_back(mk("long_n2100_p333_gqa8", 128, 16, 2, 1, 4, 200, 333, 2100));
  v.push_back(mk("long_n1025_p7_mixed", 128, 8, 4, 2, 128, 256, 7, 1025));
  v.push_back(mk("long_n1031_p1900_all_streaming", 128, 8, 2, 0, 64, 300, 1900, 1031));
  v.push_back(mk("long_chunk_n1200_p500", 128, 8, 2, 1, 16, 64, 500, 1200, 0, true));
  v.push_back(mk("long_chunk_n1100_p0", 128, 8, 4, 2, 16, 64, 0, 1100, 0, true));
  v.push_back(mk("long_n5000_mha_nr1", 128, 8, 8, 1, 32, 96, 0, 5000));
  return v;
}

class SingleCall : public ::testing::TestWithParam<Case> {};

TEST_P(SingleCall, MatchesReference) {
  REQUIRE_GPU();
  const Case& c = GetParam();
  const Shape& s = c.s;
  std::mt19937 rng(1234 + static_cast<unsigned>(c.p0 * 7 + c.n));
  const History hist = make_history(s, c.p0 + c.n, rng);
  const auto q = random_q(s, c.n, rng);
  Stores st;
  init_stores(s, st);
  fill_stores(s, hist, c.p0, c.n, st);
  Guarded dq, dk, dv, dout, ws;
  dq.alloc(q.size() * 2, 0);
  dq.upload(q);
  const auto kn = new_rows(s, hist, c.p0, c.n, false), vn = new_rows(s, hist, c.p0, c.n, true);
  dk.alloc(kn.size() * 2, 0);
  dk.upload(kn);
  dv.alloc(vn.size() * 2, 0);
  dv.upload(vn);
  dout.alloc(static_cast<size_t>(c.n * s.heads * s.d * 2), kNaNbf);
  auto p = make_params(s, st, c.p0, c.n);
  p.q = static_cast<const __nv_bfloat16*>(dq.ptr());
  p.k_new = static_cast<const __nv_bfloat16*>(dk.ptr());
  p.v_new = static_cast<const __nv_bfloat16*>(dv.ptr());
  p.out = static_cast<__nv_bfloat16*>(dout.ptr());
  if (c.ws_mode != 0) {
    int64_t b = duo::cuda::attention_workspace_bytes(c.n, s.heads, s.d, s.capacity, num_sms());
    if (c.ws_mode == 2) b = static_cast<int64_t>(s.heads) * (s.d + 2) * 4;
    ws.alloc(static_cast<size_t>(b), 0);
    p.workspace = static_cast<float*>(ws.ptr());
    p.workspace_bytes = b;
  }
  duo::cuda::attention(p, nullptr);
  CK(cudaGetLastError());
  CK(cudaDeviceSynchronize());
  const auto got = dout.download();
  const auto ref = reference(s, hist, q, c.p0, c.n);
  const ErrStats e = compare(got, ref);
  std::printf("[attn] %-28s %-80s nmse=%.3e max_abs=%.3e\n", c.name.c_str(), describe(c).c_str(),
              e.nmse, e.max_abs);
  std::fflush(stdout);
  EXPECT_TRUE(e.finite) << "non-finite output (unwritten or NaN)";
  EXPECT_LE(e.nmse, kMaxNmse);
  EXPECT_LE(e.max_abs, kMaxAbs);
  EXPECT_TRUE(dout.guards_ok()) << "output guard bytes overwritten";
  EXPECT_TRUE(ws.base == nullptr || ws.guards_ok()) << "workspace guard bytes overwritten";
  EXPECT_TRUE(st.rk.guards_ok() && st.rv.guards_ok() && st.sk.guards_ok() && st.sv.guards_ok());
}

INSTANTIATE_TEST_SUITE_P(Attention, SingleCall, ::testing::ValuesIn(single_call_cases()),
                         [](const ::testing::TestParamInfo<Case>& i) { return i.param.name; });

// Multi-call sequences through the append functions, as the backend drives them: append_retrieval
// before attention, append_streaming after. Stores start as NaN. Checks every call's output and, at
// the end, the streaming store's contents slot by slot. Optionally the decode step is captured in a
// CUDA graph once and replayed with p0 read from device memory.
struct SeqCase {
  std::string name;
  Shape s;
  std::vector<int64_t> chunks;  // chunk sizes in order
  bool graph;
  bool fused = false;  // attention_append_streaming() in place of attention() + append_streaming()
};

void run_sequence(const SeqCase& c) {
  const Shape& s = c.s;
  int64_t total = 0;
  for (int64_t x : c.chunks) total += x;
  Shape sh = s;
  sh.capacity = total + 3;
  std::mt19937 rng(99);
  const History hist = make_history(sh, total, rng);
  Stores st;
  init_stores(sh, st);
  int64_t max_n = 1;
  for (int64_t x : c.chunks) max_n = std::max(max_n, x);
  Guarded dq, dk, dv, dout, ws, dp0;
  dq.alloc(static_cast<size_t>(max_n * sh.heads * sh.d * 2), 0);
  dk.alloc(static_cast<size_t>(max_n * sh.kv_heads * sh.d * 2), 0);
  dv.alloc(static_cast<size_t>(max_n * sh.kv_heads * sh.d * 2), 0);
  dout.alloc(static_cast<size_t>(max_n * sh.heads * sh.d * 2), kNaNbf);
  const int64_t wsb =
      duo::cuda::attention_workspace_bytes(1, sh.heads, sh.d, sh.capacity, num_sms());
  ws.alloc(static_cast<size_t>(wsb), 0);
  dp0.alloc(8, 0);
  cudaStream_t stream;
  ASSERT_EQ(cudaStreamCreate(&stream), cudaSuccess);
  cudaGraphExec_t exec = nullptr;
  int64_t p0 = 0;
  double worst_nmse = 0, worst_abs = 0;
  for (size_t call = 0; call < c.chunks.size(); ++call) {
    const int64_t n = c.chunks[call];
    const auto q = random_q(sh, n, rng);
    dq.upload(q);
    dk.upload(new_rows(sh, hist, p0, n, false));
    dv.upload(new_rows(sh, hist, p0, n, true));
    std::vector<uint16_t> poison(static_cast<size_t>(max_n * sh.heads * sh.d), kNaNbf);
    dout.upload(poison);
    auto p = make_params(sh, st, p0, n);
    p.q = static_cast<const __nv_bfloat16*>(dq.ptr());
    p.k_new = static_cast<const __nv_bfloat16*>(dk.ptr());
    p.v_new = static_cast<const __nv_bfloat16*>(dv.ptr());
    p.out = static_cast<__nv_bfloat16*>(dout.ptr());
    p.workspace = static_cast<float*>(ws.ptr());
    p.workspace_bytes = wsb;
    auto* rk = static_cast<__nv_bfloat16*>(st.rk.ptr());
    auto* rv = static_cast<__nv_bfloat16*>(st.rv.ptr());
    auto* sk = static_cast<__nv_bfloat16*>(st.sk.ptr());
    auto* sv = static_cast<__nv_bfloat16*>(st.sv.ptr());
    auto attend = [&](const duo::cuda::AttentionParams& pp, cudaStream_t str) {
      duo::cuda::append_retrieval(pp, rk, rv, str);
      if (c.fused) {
        duo::cuda::attention_append_streaming(pp, sk, sv, str);
      } else {
        duo::cuda::attention(pp, str);
        duo::cuda::append_streaming(pp, sk, sv, str);
      }
    };
    if (c.graph && n == 1 && call > 0) {
      CK(cudaMemcpy(dp0.ptr(), &p0, 8, cudaMemcpyHostToDevice));
      if (exec == nullptr) {
        p.p0_device = static_cast<const int64_t*>(dp0.ptr());
        p.p0 = 0;  // must be ignored
        CK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal));
        attend(p, stream);
        cudaGraph_t graph;
        CK(cudaStreamEndCapture(stream, &graph));
        CK(cudaGraphInstantiate(&exec, graph, 0));
        CK(cudaGraphDestroy(graph));
      }
      CK(cudaGraphLaunch(exec, stream));
    } else {
      attend(p, stream);
    }
    CK(cudaStreamSynchronize(stream));
    CK(cudaGetLastError());
    const auto got = dout.download();
    const auto ref = reference(sh, hist, q, p0, n);
    const ErrStats e = compare(std::vector<uint16_t>(got.begin(), got.begin() + ref.size()), ref);
    worst_nmse = std::max(worst_nmse, e.nmse);
    worst_abs = std::max(worst_abs, e.max_abs);
    EXPECT_TRUE(e.finite) << c.name << " call " << call << " p0=" << p0 << " n=" << n;
    EXPECT_LE(e.nmse, kMaxNmse) << c.name << " call " << call << " p0=" << p0 << " n=" << n;
    EXPECT_LE(e.max_abs, kMaxAbs) << c.name << " call " << call << " p0=" << p0 << " n=" << n;
    p0 += n;
  }
  // Streaming store contents after all appends.
  const int nr = sh.retrieval, ns = sh.kv_heads - sh.retrieval;
  if (ns > 0 && st.slots > 0) {
    const auto hk = st.sk.download();
    int64_t bad = 0;
    for (int sg = 0; sg < ns; ++sg)
      for (int64_t slot = 0; slot < st.slots; ++slot) {
        const int64_t pos = duo::slot_position(slot, p0, sh.S, sh.R);
        if (pos < 0) continue;
        for (int cc = 0; cc < sh.d; ++cc)
          if (hk[(sg * st.slots + slot) * sh.d + cc] != hist.kb(nr + sg, pos, cc)) ++bad;
      }
    EXPECT_EQ(bad, 0) << "streaming store holds wrong positions";
  }
  std::printf("[attn-seq] %-24s calls=%zu tokens=%lld worst nmse=%.3e max_abs=%.3e\n",
              c.name.c_str(), c.chunks.size(), static_cast<long long>(p0), worst_nmse, worst_abs);
  std::fflush(stdout);
  EXPECT_TRUE(dout.guards_ok() && ws.guards_ok() && st.rk.guards_ok() && st.rv.guards_ok() &&
              st.sk.guards_ok() && st.sv.guards_ok());
  if (exec) cudaGraphExecDestroy(exec);
  cudaStreamDestroy(stream);
}

SeqCase seq(std::string name, int d, int H, int Hkv, int nr, int64_t S, int64_t R,
            std::vector<int64_t> chunks, bool graph, bool chunk_mode = false, bool fused = false) {
  SeqCase c;
  c.name = std::move(name);
  c.s.d = d;
  c.s.heads = H;
  c.s.kv_heads = Hkv;
  c.s.retrieval = nr;
  c.s.S = S;
  c.s.R = R;
  c.s.mode = chunk_mode ? duo::cuda::StreamingMode::kChunk : duo::cuda::StreamingMode::kExact;
  c.chunks = std::move(chunks);
  c.graph = graph;
  c.fused = fused;
  return c;
}

std::vector<int64_t> pattern(std::initializer_list<int64_t> head, int decode_steps,
                             std::initializer_list<int64_t> tail = {}) {
  std::vector<int64_t> v(head);
  for (int i = 0; i < decode_steps; ++i) v.push_back(1);
  v.insert(v.end(), tail);
  for (int i = 0; i < decode_steps / 2; ++i) v.push_back(1);
  return v;
}

TEST(AttentionSequence, RingWrapsOverManyCalls) {
  REQUIRE_GPU();
  run_sequence(seq("mixed_S4_R8", 128, 8, 2, 1, 4, 8, pattern({5}, 30, {19, 3}), false));
  run_sequence(seq("stream_S0_R5", 64, 4, 2, 0, 0, 5, pattern({2}, 20, {11}), false));
  run_sequence(seq("R0_S3", 128, 4, 2, 1, 3, 0, pattern({7}, 10, {4}), false));
  run_sequence(seq("S16_R32_gqa8", 128, 16, 2, 1, 16, 32, pattern({40}, 40, {77}), false));
  run_sequence(seq("chunk_mode", 128, 8, 4, 2, 4, 8, pattern({20}, 15, {30}), false, true));
}

TEST(AttentionSequence, GraphCapturedDecodeWithDeviceP0) {
  REQUIRE_GPU();
  run_sequence(seq("graph_mixed", 128, 8, 2, 1, 4, 8, pattern({9}, 40), true));
  run_sequence(seq("graph_d64_gqa4", 64, 16, 4, 2, 8, 16, pattern({30}, 50), true));
}

// attention_append_streaming (the decode merge kernel appends the new token to the streaming
// store): same reference bounds, and the streaming store holds exactly the right positions.
TEST(AttentionSequence, StreamingAppendFusedIntoDecode) {
  REQUIRE_GPU();
  run_sequence(
      seq("fused_mixed_S4_R8", 128, 8, 2, 1, 4, 8, pattern({5}, 30, {19, 3}), false, false, true));
  run_sequence(
      seq("fused_stream_S0_R5", 64, 4, 2, 0, 0, 5, pattern({2}, 20, {11}), false, false, true));
  run_sequence(seq("fused_R0_S3", 128, 4, 2, 1, 3, 0, pattern({7}, 10, {4}), false, false, true));
  run_sequence(
      seq("fused_chunk_mode", 128, 8, 4, 2, 4, 8, pattern({20}, 15, {30}), false, true, true));
  run_sequence(
      seq("fused_graph_d64_gqa4", 64, 16, 4, 2, 8, 16, pattern({30}, 50), true, false, true));
}

TEST(AttentionErrors, RejectsBadShapes) {
  REQUIRE_GPU();  // (validation itself throws before any CUDA call)
  duo::cuda::AttentionParams p{};
  p.head_dim = 96;
  p.num_heads = 8;
  p.num_kv_heads = 2;
  p.n = 1;
  p.capacity = 10;
  EXPECT_ANY_THROW(duo::cuda::attention(p, nullptr));
  p.head_dim = 128;
  p.num_heads = 7;
  EXPECT_ANY_THROW(duo::cuda::attention(p, nullptr));
  p.num_heads = 8;
  p.p0 = 10;  // p0 + n > capacity
  EXPECT_ANY_THROW(duo::cuda::attention(p, nullptr));
}

}  // namespace
