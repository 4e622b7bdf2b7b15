// DuoAttention on the CPU: mixed retrieval/streaming heads checked against an independently
// written naive transformer (double precision, explicit per-head masks), plus chunk-size
// invariance, head-order invariance, ring edge cases at the op level, and KV byte accounting.
#include <gtest/gtest.h>

#include <cmath>
#include <functional>
#include <random>

#include "core/error.h"
#include "duo/head_pattern.h"
#include "duo/streaming_window.h"
#include "engine/model.h"
#include "model/safetensors.h"
#include "test_util.h"
#include "tolerances.h"

namespace duo {
namespace {

using testing::fixture;

// mask(layer, original_kv_head, query_pos, key_pos) -> visible
using MaskFn = std::function<bool(int64_t, int64_t, int64_t, int64_t)>;

// A deliberately plain transformer: all positions at once, doubles, no cache, heads in the
// checkpoint's original order. Shares only the RoPE frequency table with the engine.
std::vector<double> naive_logits(const std::filesystem::path& dir,
                                 const std::vector<int32_t>& tokens, const MaskFn& mask) {
  const ModelConfig c = ModelConfig::load(dir);
  const WeightStore ws = WeightStore::open(dir);
  const int64_t n = static_cast<int64_t>(tokens.size()), H = c.hidden_size, d = c.head_dim;
  const int64_t nq = c.num_heads, nkv = c.num_kv_heads, G = c.group_size(), I = c.intermediate_size;
  auto W = [&](const std::string& name, std::vector<int64_t> shape) {
    auto f = ws.load_f32(name, shape);
    return std::vector<double>(f.begin(), f.end());
  };
  auto matvec = [](const std::vector<double>& w, const std::vector<double>& x, int64_t rows,
                   int64_t cols) {
    std::vector<double> y(static_cast<size_t>(rows), 0.0);
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t k = 0; k < cols; ++k) y[r] += w[r * cols + k] * x[k];
    return y;
  };
  auto rms = [&](const std::vector<double>& x, const std::vector<double>& w) {
    double ss = 0;
    for (double v : x) ss += v * v;
    const double inv = 1.0 / std::sqrt(ss / static_cast<double>(x.size()) + c.rms_norm_eps);
    std::vector<double> y(x.size());
    for (size_t i = 0; i < x.size(); ++i) y[i] = w[i] * x[i] * inv;
    return y;
  };
  const RopeFrequencies freqs = compute_rope_frequencies(c, n);
  auto rotate = [&](std::vector<double>& v, int64_t heads, int64_t pos) {
    std::vector<float> cs(static_cast<size_t>(d / 2)), sn(cs.size());
    rope_cos_sin(freqs, pos, cs.data(), sn.data());
    for (int64_t h = 0; h < heads; ++h)
      for (int64_t i = 0; i < d / 2; ++i) {
        double a = v[h * d + i], b = v[h * d + i + d / 2];
        v[h * d + i] = a * cs[i] - b * sn[i];
        v[h * d + i + d / 2] = b * cs[i] + a * sn[i];
      }
  };
  auto emb = W("model.embed_tokens.weight", {c.vocab_size, H});
  std::vector<std::vector<double>> x(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i)
    x[i].assign(emb.begin() + tokens[i] * H, emb.begin() + (tokens[i] + 1) * H);
  for (int64_t l = 0; l < c.num_layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    auto ln1 = W(p + "input_layernorm.weight", {H}),
         ln2 = W(p + "post_attention_layernorm.weight", {H});
    auto wq = W(p + "self_attn.q_proj.weight", {nq * d, H}),
         wk = W(p + "self_attn.k_proj.weight", {nkv * d, H});
    auto wv = W(p + "self_attn.v_proj.weight", {nkv * d, H}),
         wo = W(p + "self_attn.o_proj.weight", {H, nq * d});
    std::vector<double> bq(nq * d, 0.0), bk(nkv * d, 0.0), bv(nkv * d, 0.0);
    if (c.qkv_bias) {
      bq = W(p + "self_attn.q_proj.bias", {nq * d});
      bk = W(p + "self_attn.k_proj.bias", {nkv * d});
      bv = W(p + "self_attn.v_proj.bias", {nkv * d});
    }
    std::vector<std::vector<double>> q(n), k(n), v(n);
    for (int64_t i = 0; i < n; ++i) {
      auto xn = rms(x[i], ln1);
      q[i] = matvec(wq, xn, nq * d, H);
      k[i] = matvec(wk, xn, nkv * d, H);
      v[i] = matvec(wv, xn, nkv * d, H);
      for (int64_t j = 0; j < nq * d; ++j) q[i][j] += bq[j];
      for (int64_t j = 0; j < nkv * d; ++j) k[i][j] += bk[j], v[i][j] += bv[j];
      rotate(q[i], nq, i);
      rotate(k[i], nkv, i);
    }
    const std::vector<double> bo =
        c.o_bias ? W(p + "self_attn.o_proj.bias", {H}) : std::vector<double>();
    auto wg = W(p + "mlp.gate_proj.weight", {I, H}), wu = W(p + "mlp.up_proj.weight", {I, H});
    auto wd = W(p + "mlp.down_proj.weight", {H, I});
    for (int64_t t = 0; t < n; ++t) {
      std::vector<double> attn(static_cast<size_t>(nq * d), 0.0);
      for (int64_t h = 0; h < nq; ++h) {
        const int64_t g = h / G;
        std::vector<double> s;
        std::vector<int64_t> keys;
        double mx = -1e300;
        for (int64_t j = 0; j <= t; ++j) {
          if (!mask(l, g, t, j)) continue;
          double dot = 0;
          for (int64_t e = 0; e < d; ++e) dot += q[t][h * d + e] * k[j][g * d + e];
          s.push_back(dot / std::sqrt(static_cast<double>(d)));
          keys.push_back(j);
          mx = std::max(mx, s.back());
        }
        double sum = 0;
        for (double& e : s) sum += (e = std::exp(e - mx));
        for (size_t e = 0; e < keys.size(); ++e)
          for (int64_t f = 0; f < d; ++f) attn[h * d + f] += s[e] / sum * v[keys[e]][g * d + f];
      }
      auto o = matvec(wo, attn, H, nq * d);
      for (int64_t i = 0; i < H; ++i) x[t][i] += o[i] + (c.o_bias ? bo[i] : 0.0);
    }
    for (int64_t t = 0; t < n; ++t) {
      auto xn = rms(x[t], ln2);
      auto gt = matvec(wg, xn, I, H), up = matvec(wu, xn, I, H);
      for (int64_t i = 0; i < I; ++i) gt[i] = gt[i] / (1 + std::exp(-gt[i])) * up[i];
      auto o = matvec(wd, gt, H, I);
      for (int64_t i = 0; i < H; ++i) x[t][i] += o[i];
    }
  }
  auto norm = W("model.norm.weight", {H});
  auto head = c.tie_word_embeddings ? emb : W("lm_head.weight", {c.vocab_size, H});
  std::vector<double> out;
  for (int64_t t = 0; t < n; ++t) {
    auto l = matvec(head, rms(x[t], norm), c.vocab_size, H);
    out.insert(out.end(), l.begin(), l.end());
  }
  return out;
}

std::vector<int32_t> random_tokens(int64_t n, int64_t vocab, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<int32_t> t(static_cast<size_t>(n));
  for (auto& x : t) x = static_cast<int32_t>(rng() % static_cast<uint64_t>(vocab));
  return t;
}

// Runs the engine over tokens in prefill chunks of `chunk`; logits of every position.
std::vector<float> engine_logits(const std::filesystem::path& dir, Backend& be,
                                 const HeadLayout& layout, const std::vector<int32_t>& tokens,
                                 int64_t chunk, int64_t S, int64_t R, StreamingPrefill mode) {
  Model m(dir, be, layout);
  auto cache = m.make_cache(static_cast<int64_t>(tokens.size()), S, R, mode);
  std::vector<float> out;
  for (size_t p = 0; p < tokens.size(); p += static_cast<size_t>(chunk)) {
    const size_t len = std::min(static_cast<size_t>(chunk), tokens.size() - p);
    auto l = m.forward(std::span<const int32_t>(tokens.data() + p, len), *cache,
                       static_cast<int64_t>(len));
    out.insert(out.end(), l.begin(), l.end());
  }
  return out;
}

double max_diff(const std::vector<float>& a, const std::vector<double>& b) {
  EXPECT_EQ(a.size(), b.size());
  double w = 0;
  for (size_t i = 0; i < std::min(a.size(), b.size()); ++i) w = std::max(w, std::fabs(a[i] - b[i]));
  return w;
}

// A partition with layer 0 all streaming, layer 1 one retrieval head (the last), and so on.
HeadPartition mixed_partition(const ModelConfig& c) {
  HeadPartition p = all_retrieval(c.num_layers, c.num_kv_heads);
  for (int64_t l = 0; l < c.num_layers; ++l)
    for (int64_t h = 0; h < c.num_kv_heads; ++h) {
      bool r = l % 3 == 0 ? false : (l % 3 == 1 ? h == c.num_kv_heads - 1 : h % 2 == 1);
      p.retrieval[static_cast<size_t>(l * c.num_kv_heads + h)] = r ? 1 : 0;
    }
  return p;
}

MaskFn duo_mask(const HeadPartition& p, int64_t S, int64_t R) {
  return [=](int64_t l, int64_t g, int64_t t, int64_t j) {
    return p.is_retrieval(l, g) ? j <= t : (j <= t && (j < S || j > t - R));
  };
}

const char* kModels[] = {"llama_mha_linear", "llama3_gqa", "mistral_gqa", "qwen2_bias_tied",
                         "llama_attn_bias"};

TEST(DuoAttention, AllRetrievalPatternEqualsFullAttentionBitwise) {
  const auto dir = fixture("models/llama3_gqa");
  const ModelConfig c = ModelConfig::load(dir);
  auto be = make_cpu_backend(CpuMode::kReference);
  HeadPattern pat;
  pat.num_layers = c.num_layers;
  pat.num_kv_heads = c.num_kv_heads;
  pat.gates.assign(static_cast<size_t>(c.num_layers * c.num_kv_heads), 1.0);
  const auto tokens = random_tokens(50, c.vocab_size, 1);
  auto full = engine_logits(dir, *be, HeadLayout::all_retrieval(c), tokens, 50, 0, 0,
                            StreamingPrefill::kExact);
  auto duo = engine_logits(dir, *be, HeadLayout::from_partition(c, binarize_by_sparsity(pat, 0.0)),
                           tokens, 7, 4, 8, StreamingPrefill::kExact);
  EXPECT_EQ(full, duo);
  auto naive =
      naive_logits(dir, tokens, [](int64_t, int64_t, int64_t t, int64_t j) { return j <= t; });
  EXPECT_LE(max_diff(full, naive), tolerances::kLogitsVsTransformers);
}

TEST(DuoAttention, AllStreamingEqualsStreamingLlmReference) {
  for (const char* name : kModels) {
    const auto dir = fixture(std::string("models/") + name);
    const ModelConfig c = ModelConfig::load(dir);
    const int64_t S = 3, R = 7;
    const auto tokens = random_tokens(40, c.vocab_size, 2);
    auto naive = naive_logits(dir, tokens, [&](int64_t, int64_t, int64_t t, int64_t j) {
      return j <= t && (j < S || j > t - R);
    });
    for (CpuMode mode : {CpuMode::kReference, CpuMode::kFast}) {
      auto be = make_cpu_backend(mode);
      HeadLayout layout =
          HeadLayout::from_partition(c, all_streaming(c.num_layers, c.num_kv_heads));
      auto got = engine_logits(dir, *be, layout, tokens, 40, S, R, StreamingPrefill::kExact);
      EXPECT_LE(max_diff(got, naive), tolerances::kLogitsVsTransformers) << name;
    }
  }
}

TEST(DuoAttention, MixedPatternEqualsNaivePerHeadMasks) {
  for (const char* name : kModels) {
    const auto dir = fixture(std::string("models/") + name);
    const ModelConfig c = ModelConfig::load(dir);
    const HeadPartition p = mixed_partition(c);
    const int64_t S = 2, R = 5;
    const auto tokens = random_tokens(33, c.vocab_size, 3);
    auto naive = naive_logits(dir, tokens, duo_mask(p, S, R));
    for (CpuMode mode : {CpuMode::kReference, CpuMode::kFast}) {
      auto be = make_cpu_backend(mode);
      auto got = engine_logits(dir, *be, HeadLayout::from_partition(c, p), tokens, 33, S, R,
                               StreamingPrefill::kExact);
      EXPECT_LE(max_diff(got, naive), tolerances::kLogitsVsTransformers) << name;
    }
  }
}

TEST(DuoAttention, TokenExactIsChunkSizeInvariant) {
  const auto dir = fixture("models/mistral_gqa");
  const ModelConfig c = ModelConfig::load(dir);
  const HeadPartition p = mixed_partition(c);
  const auto tokens = random_tokens(150, c.vocab_size, 4);
  const HeadLayout layout = HeadLayout::from_partition(c, p);
  auto ref = make_cpu_backend(CpuMode::kReference);
  auto whole = engine_logits(dir, *ref, layout, tokens, 150, 4, 16, StreamingPrefill::kExact);
  for (int64_t chunk : {1, 7, 64}) {
    EXPECT_EQ(engine_logits(dir, *ref, layout, tokens, chunk, 4, 16, StreamingPrefill::kExact),
              whole)
        << "reference path, chunk " << chunk;
  }
  auto fast = make_cpu_backend(CpuMode::kFast);
  for (int64_t chunk : {1, 7, 64, 150}) {
    auto got = engine_logits(dir, *fast, layout, tokens, chunk, 4, 16, StreamingPrefill::kExact);
    std::vector<double> w(whole.begin(), whole.end());
    EXPECT_LE(max_diff(got, w), tolerances::kFastVsReference) << "fast path, chunk " << chunk;
  }
}

TEST(DuoAttention, ChunkModeMatchesReleaseSemantics) {
  const auto dir = fixture("models/llama_mha_linear");
  const ModelConfig c = ModelConfig::load(dir);
  const HeadPartition p = mixed_partition(c);
  const int64_t S = 2, R = 6, chunk = 16;
  const auto tokens = random_tokens(45, c.vocab_size, 5);
  auto naive = naive_logits(dir, tokens, [&](int64_t l, int64_t g, int64_t t, int64_t j) {
    if (p.is_retrieval(l, g)) return j <= t;
    return chunk_mode_visible(t, j, (t / chunk) * chunk, S, R);
  });
  for (CpuMode mode : {CpuMode::kReference, CpuMode::kFast}) {
    auto be = make_cpu_backend(mode);
    auto got = engine_logits(dir, *be, HeadLayout::from_partition(c, p), tokens, chunk, S, R,
                             StreamingPrefill::kChunk);
    EXPECT_LE(max_diff(got, naive), tolerances::kLogitsVsTransformers);
  }
  // Chunk mode depends on the chunk size (that is the release's flaw): 16 vs 45 differ.
  auto be = make_cpu_backend(CpuMode::kReference);
  EXPECT_NE(engine_logits(dir, *be, HeadLayout::from_partition(c, p), tokens, 45, S, R,
                          StreamingPrefill::kChunk),
            engine_logits(dir, *be, HeadLayout::from_partition(c, p), tokens, 16, S, R,
                          StreamingPrefill::kChunk));
}

TEST(DuoAttention, OutputsDoNotDependOnPhysicalHeadOrder) {
  for (const char* name : kModels) {
    const auto dir = fixture(std::string("models/") + name);
    const ModelConfig c = ModelConfig::load(dir);
    const HeadLayout a = HeadLayout::from_partition(c, mixed_partition(c));
    HeadLayout b = a;  // reverse each range (retrieval, streaming) and rebuild the query order
    for (auto& o : b.layers) {
      std::reverse(o.kv_order.begin(), o.kv_order.begin() + o.num_retrieval);
      std::reverse(o.kv_order.begin() + o.num_retrieval, o.kv_order.end());
      o.q_order.clear();
      for (int32_t g : o.kv_order)
        for (int64_t i = 0; i < c.group_size(); ++i)
          o.q_order.push_back(static_cast<int32_t>(g * c.group_size() + i));
    }
    auto be = make_cpu_backend(CpuMode::kReference);
    const auto tokens = random_tokens(30, c.vocab_size, 6);
    auto la = engine_logits(dir, *be, a, tokens, 30, 2, 4, StreamingPrefill::kExact);
    auto lb = engine_logits(dir, *be, b, tokens, 30, 2, 4, StreamingPrefill::kExact);
    std::vector<double> wb(lb.begin(), lb.end());
    EXPECT_LE(max_diff(la, wb), 1e-5) << name;
  }
}

// Op level: one layer, one KV head streaming, random q/k/v; every output row must equal a softmax
// over concat(K[:S], K[t-R+1..t]) written out directly. Mixed chunk sizes exercise the ring.
void check_streaming_op(int64_t N, int64_t S, int64_t R, std::vector<int64_t> chunks,
                        CpuMode mode) {
  SCOPED_TRACE("N=" + std::to_string(N) + " S=" + std::to_string(S) + " R=" + std::to_string(R));
  const int64_t d = 8, heads = 2;  // GQA 2:1 on one KV head
  auto be = make_cpu_backend(mode);
  CacheSpec spec{1, 1, d, N, {0}, S, R, StreamingPrefill::kExact};
  auto cache = be->create_cache(spec);
  std::mt19937_64 rng(static_cast<uint64_t>(N * 131 + S * 7 + R));
  std::normal_distribution<float> nd;
  std::vector<float> Q(N * heads * d), K(N * d), V(N * d);
  for (auto* v : {&Q, &K, &V})
    for (float& x : *v) x = nd(rng);
  std::vector<float> out(N * heads * d);
  int64_t p = 0, ci = 0;
  while (p < N) {
    const int64_t len = std::min(chunks[ci++ % chunks.size()], N - p);
    Tensor q = be->upload(Q.data() + p * heads * d, len, heads * d);
    Tensor k = be->upload(K.data() + p * d, len, d), v = be->upload(V.data() + p * d, len, d);
    Tensor o = be->alloc(len, heads * d);
    be->attention(*cache, 0, q, k, v, heads, o);
    be->advance(*cache, len);
    auto host = be->download(o, 0, len);
    std::copy(host.begin(), host.end(), out.begin() + p * heads * d);
    p += len;
  }
  for (int64_t t = 0; t < N; ++t) {
    std::vector<int64_t> keys;  // concat(K[:S], K[t-R+1..t]) without duplicates
    for (int64_t j = 0; j < std::min(S, t + 1); ++j) keys.push_back(j);
    for (int64_t j = std::max(S, t - R + 1); j <= t; ++j) keys.push_back(j);
    for (int64_t h = 0; h < heads; ++h) {
      std::vector<double> s;
      double mx = -1e300, sum = 0;
      for (int64_t j : keys) {
        double dot = 0;
        for (int64_t e = 0; e < d; ++e) dot += Q[(t * heads + h) * d + e] * K[j * d + e];
        s.push_back(dot / std::sqrt(static_cast<double>(d)));
        mx = std::max(mx, s.back());
      }
      for (double& e : s) sum += (e = std::exp(e - mx));
      for (int64_t e = 0; e < d; ++e) {
        double want = 0;
        for (size_t i = 0; i < keys.size(); ++i) want += s[i] / sum * V[keys[i] * d + e];
        ASSERT_NEAR(out[(t * heads + h) * d + e], want, 1e-5) << "t=" << t << " h=" << h;
      }
    }
  }
}

TEST(DuoAttention, StreamingHeadEqualsAttentionOverSinksAndWindow) {
  const int64_t S = 4, R = 8;
  for (CpuMode mode : {CpuMode::kReference, CpuMode::kFast}) {
    for (int64_t N : {int64_t{2}, S + R - 1, S + R, S + R + 1, int64_t{100}}) {
      check_streaming_op(N, S, R, {1}, mode);        // pure decode
      check_streaming_op(N, S, R, {N}, mode);        // one prefill
      check_streaming_op(N, S, R, {3, 1, 5}, mode);  // mixed chunks, wraps the ring many times
    }
    check_streaming_op(50, 4, 0, {1, 9}, mode);  // R = 0: sinks only
    check_streaming_op(50, 0, 6, {1, 9}, mode);  // S = 0: window only
    check_streaming_op(50, 0, 1, {7}, mode);     // window of one: each token sees itself
  }
}

TEST(DuoAttention, AllocatedBytesEqualFormula) {
  const auto dir = fixture("models/llama_mha_linear");
  const ModelConfig c = ModelConfig::load(dir);
  auto be = make_cpu_backend(CpuMode::kFast);
  for (const HeadPartition& p : {mixed_partition(c), all_retrieval(c.num_layers, c.num_kv_heads),
                                 all_streaming(c.num_layers, c.num_kv_heads)}) {
    Model m(dir, *be, HeadLayout::from_partition(c, p));
    for (int64_t ctx : {5, 12, 13, 200}) {
      auto cache = m.make_cache(ctx, 4, 8, StreamingPrefill::kExact);
      EXPECT_EQ(cache->allocated_bytes().total(), duo_kv_bytes(p, ctx, c.head_dim, 4, 4, 8)) << ctx;
    }
  }
}

TEST(DuoAttention, CacheRejectsBadShapes) {
  auto be = make_cpu_backend(CpuMode::kReference);
  EXPECT_THROW(be->create_cache(CacheSpec{1, 2, 8, 10, {1}, 0, 0, StreamingPrefill::kExact}),
               Error);
  EXPECT_THROW(be->create_cache(CacheSpec{1, 2, 8, 10, {3}, 1, 1, StreamingPrefill::kExact}),
               Error);
  EXPECT_THROW(be->create_cache(CacheSpec{1, 2, 8, 10, {1}, -1, 4, StreamingPrefill::kExact}),
               Error);
  EXPECT_THROW(be->create_cache(CacheSpec{2, 2, 8, 10, {1}, 1, 4, StreamingPrefill::kExact}),
               Error);
}

}  // namespace
}  // namespace duo
