// CPU backend. kReference: plain loops, one query and one key at a time — the oracle every other
// path is tested against. kFast: the same semantics with BLAS matmuls and blocked attention.
#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "core/error.h"
#include "duo/streaming_window.h"
#include "engine/backend.h"
#include "engine/random_fill.h"

namespace duo {

namespace {

float* fp(const Tensor& t) {
  return static_cast<float*>(t.data);
}

// Per-layer K/V stores in host memory.
//   retrieval K/V: [num_retrieval][capacity][head_dim]   (position j at row j)
//   streaming K/V: [num_streaming][sink + recent][head_dim] (position j at streaming_slot(j))
struct CpuLayerCache {
  int64_t num_retrieval = 0;
  int64_t num_streaming = 0;
  std::vector<float> rk, rv, sk, sv;
};

class CpuKVCache final : public KVCache {
 public:
  explicit CpuKVCache(const CacheSpec& spec) : spec_(spec) {
    validate_cache_spec(spec);
    layers_.resize(static_cast<size_t>(spec.num_layers));
    for (int64_t l = 0; l < spec.num_layers; ++l) {
      CpuLayerCache& c = layers_[l];
      c.num_retrieval = spec.num_retrieval[l];
      c.num_streaming = spec.num_kv_heads - c.num_retrieval;
      const size_t rn = static_cast<size_t>(c.num_retrieval * spec.capacity * spec.head_dim);
      const int64_t slots = std::min(spec.capacity, spec.sink + spec.recent);
      const size_t sn = static_cast<size_t>(c.num_streaming * slots * spec.head_dim);
      c.rk.assign(rn, 0.0f);
      c.rv.assign(rn, 0.0f);
      c.sk.assign(sn, 0.0f);
      c.sv.assign(sn, 0.0f);
      bytes_.retrieval += static_cast<int64_t>(2 * rn * sizeof(float));
      bytes_.streaming += static_cast<int64_t>(2 * sn * sizeof(float));
    }
  }
  const CacheSpec& spec() const override { return spec_; }
  int64_t length() const override { return length_; }
  CacheBytes allocated_bytes() const override { return bytes_; }
  void clear() override { length_ = 0; }

  CpuLayerCache& layer(int64_t l) { return layers_[l]; }
  void advance(int64_t n) {
    check(length_ + n <= spec_.capacity, "kv cache: ", length_ + n,
          " tokens exceed the context length ", spec_.capacity);
    length_ += n;
  }
  // Slot count of the streaming store (the ring may be shorter than S + R for small contexts, in
  // which case positions never wrap: capacity <= S + R).
  int64_t streaming_slots() const { return std::min(spec_.capacity, spec_.sink + spec_.recent); }

 private:
  CacheSpec spec_;
  std::vector<CpuLayerCache> layers_;
  int64_t length_ = 0;
  CacheBytes bytes_;
};

// Where key/value j of a head lives during one attention call.
struct KeySource {
  const float* chunk_k;  // new keys [n, kv_stride], head column offset applied
  const float* chunk_v;
  int64_t kv_stride;
  const float* store_k;  // this head's store
  const float* store_v;
  int64_t p0;  // first position of the chunk
  bool retrieval;
  int64_t S, R;
  int64_t d;
  const float* k(int64_t j) const {
    if (j >= p0) return chunk_k + (j - p0) * kv_stride;
    return store_k + row(j) * d;
  }
  const float* v(int64_t j) const {
    if (j >= p0) return chunk_v + (j - p0) * kv_stride;
    return store_v + row(j) * d;
  }
  int64_t row(int64_t j) const { return retrieval ? j : streaming_slot(j, S, R); }
};

bool visible(const CacheSpec& s, bool retrieval, int64_t t, int64_t j, int64_t p0) {
  if (retrieval) return j <= t;
  if (s.prefill == StreamingPrefill::kExact) return streaming_visible(t, j, s.sink, s.recent);
  return chunk_mode_visible(t, j, p0, s.sink, s.recent);
}

// Candidate key positions (a superset of what any query in [t0, t1] may see), as ascending ranges.
void candidate_ranges(const CacheSpec& s, bool retrieval, int64_t t0, int64_t t1, int64_t p0,
                      std::vector<std::pair<int64_t, int64_t>>& out) {
  out.clear();
  if (retrieval || (s.prefill == StreamingPrefill::kChunk && p0 == 0)) {
    out.emplace_back(0, t1 + 1);
    return;
  }
  const int64_t sink_end = std::min(s.sink, t1 + 1);
  int64_t win_begin = s.prefill == StreamingPrefill::kExact ? t0 - s.recent + 1 : p0 - s.recent;
  win_begin = std::max(win_begin, sink_end);
  if (sink_end > 0) out.emplace_back(0, sink_end);
  if (win_begin <= t1) out.emplace_back(win_begin, t1 + 1);
}

class CpuBackend final : public Backend {
 public:
  explicit CpuBackend(CpuMode mode) : mode_(mode) {}
  std::string name() const override {
    return mode_ == CpuMode::kReference ? "cpu-reference" : "cpu";
  }

  int64_t kv_bytes_per_element() const override { return sizeof(float); }

  Tensor upload(const float* host, int64_t rows, int64_t cols) override {
    Tensor t = alloc(rows, cols);
    std::memcpy(t.data, host, static_cast<size_t>(rows * cols) * sizeof(float));
    return t;
  }
  Tensor random_normal(int64_t rows, int64_t cols, float stddev, uint64_t seed) override {
    Tensor t = alloc(rows, cols);
    float* p = fp(t);
    for (int64_t i = 0; i < rows * cols; ++i)
      p[i] = stddev * random_normal_at(seed, static_cast<uint64_t>(i));
    return t;
  }
  Tensor constant(int64_t rows, int64_t cols, float value) override {
    Tensor t = alloc(rows, cols);
    std::fill(fp(t), fp(t) + rows * cols, value);
    return t;
  }
  Tensor alloc(int64_t rows, int64_t cols) override {
    check(rows >= 0 && cols >= 0, "cpu backend: negative tensor shape");
    buffers_.emplace_back(static_cast<size_t>(std::max<int64_t>(rows * cols, 1)));
    return Tensor{buffers_.back().data(), rows, cols};
  }
  Tensor view_rows(const Tensor& t, int64_t begin, int64_t end) override {
    return Tensor{fp(t) + begin * t.cols, end - begin, t.cols};
  }
  Tensor view_cols(const Tensor& t, int64_t begin, int64_t end) override {
    check(t.rows == 1 && begin >= 0 && begin <= end && end <= t.cols, "view_cols: columns [", begin,
          ", ", end, ") of a ", t.rows, " x ", t.cols, " tensor (one row only)");
    return Tensor{fp(t) + begin, 1, end - begin};
  }

  std::vector<float> download(const Tensor& t, int64_t row_begin, int64_t row_end) override {
    return std::vector<float>(fp(t) + row_begin * t.cols, fp(t) + row_end * t.cols);
  }
  std::unique_ptr<KVCache> create_cache(const CacheSpec& spec) override {
    return std::make_unique<CpuKVCache>(spec);
  }

  void embed(const Tensor& table, std::span<const int32_t> tokens, Tensor& out) override {
    for (size_t i = 0; i < tokens.size(); ++i) {
      check(tokens[i] >= 0 && tokens[i] < table.rows, "token id ", tokens[i],
            " is outside the vocabulary of ", table.rows);
      std::memcpy(fp(out) + i * out.cols, fp(table) + tokens[i] * table.cols,
                  static_cast<size_t>(table.cols) * sizeof(float));
    }
  }

  void rmsnorm(const Tensor& x, const Tensor& w, float eps, Tensor& out) override {
    const int64_t n = x.cols;
    for (int64_t r = 0; r < x.rows; ++r) {
      const float* xr = fp(x) + r * n;
      float* o = fp(out) + r * n;
      double ss = 0;
      for (int64_t i = 0; i < n; ++i) ss += static_cast<double>(xr[i]) * xr[i];
      const float inv = 1.0f / std::sqrt(static_cast<float>(ss / static_cast<double>(n)) + eps);
      for (int64_t i = 0; i < n; ++i) o[i] = fp(w)[i] * (xr[i] * inv);
    }
  }

  void linear(const Tensor& x, const Tensor& w, const Tensor* bias, Tensor& out) override {
    const int64_t n = x.rows, k = x.cols, m = w.rows;
    if (mode_ == CpuMode::kFast) {
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<int>(n), static_cast<int>(m),
                  static_cast<int>(k), 1.0f, fp(x), static_cast<int>(k), fp(w), static_cast<int>(k),
                  0.0f, fp(out), static_cast<int>(m));
    } else {
      for (int64_t r = 0; r < n; ++r) {
        const float* xr = fp(x) + r * k;
        for (int64_t c = 0; c < m; ++c) {
          const float* wr = fp(w) + c * k;
          float acc = 0;
          for (int64_t i = 0; i < k; ++i) acc += xr[i] * wr[i];
          fp(out)[r * m + c] = acc;
        }
      }
    }
    if (bias != nullptr) {
      for (int64_t r = 0; r < n; ++r)
        for (int64_t c = 0; c < m; ++c) fp(out)[r * m + c] += fp(*bias)[c];
    }
  }

  void rope(Tensor& x, int64_t heads, int64_t head_dim, std::span<const int64_t> positions,
            const RopeFrequencies& f) override {
    std::vector<float> cs(static_cast<size_t>(head_dim / 2)), sn(cs.size());
    for (int64_t r = 0; r < x.rows; ++r) {
      rope_cos_sin(f, positions[r], cs.data(), sn.data());
      for (int64_t h = 0; h < heads; ++h)
        rope_rotate(fp(x) + r * x.cols + h * head_dim, head_dim, cs.data(), sn.data());
    }
  }

  void swiglu(const Tensor& gate, const Tensor& up, Tensor& out) override {
    const int64_t n = gate.numel();
    for (int64_t i = 0; i < n; ++i) {
      const float g = fp(gate)[i];
      fp(out)[i] = g / (1.0f + std::exp(-g)) * fp(up)[i];
    }
  }

  void add(Tensor& x, const Tensor& y) override {
    const int64_t n = x.numel();
    for (int64_t i = 0; i < n; ++i) fp(x)[i] += fp(y)[i];
  }

  void attention(KVCache& cache_base, int64_t layer, const Tensor& q, const Tensor& k,
                 const Tensor& v, int64_t num_heads, Tensor& out) override {
    auto& cache = static_cast<CpuKVCache&>(cache_base);
    const CacheSpec& s = cache.spec();
    CpuLayerCache& lc = cache.layer(layer);
    const int64_t n = q.rows, d = s.head_dim, hkv = s.num_kv_heads;
    const int64_t group = num_heads / hkv;
    const int64_t p0 = cache.length();
    check(p0 + n <= s.capacity, "context length exceeded: ", p0 + n,
          " tokens, but the cache holds ", s.capacity, " (raise -c)");
    const float scale = 1.0f / std::sqrt(static_cast<float>(d));
    probe_slot_ = layer * hkv;
    for (int64_t g = 0; g < hkv; ++g) {
      const bool retrieval = g < lc.num_retrieval;
      KeySource src{fp(k) + g * d, fp(v) + g * d, k.cols,   nullptr, nullptr, p0,
                    retrieval,     s.sink,        s.recent, d};
      if (retrieval) {
        src.store_k = lc.rk.data() + g * s.capacity * d;
        src.store_v = lc.rv.data() + g * s.capacity * d;
      } else {
        const int64_t sg = g - lc.num_retrieval;
        src.store_k = lc.sk.data() + sg * cache.streaming_slots() * d;
        src.store_v = lc.sv.data() + sg * cache.streaming_slots() * d;
      }
      probe_slot_ = layer * hkv + g;
      for (int64_t h = g * group; h < (g + 1) * group; ++h) {
        if (mode_ == CpuMode::kReference) {
          attend_reference(s, src, q, h, p0, n, scale, out);
        } else {
          attend_fast(s, src, q, h, p0, n, scale, out);
        }
      }
      store_chunk(s, cache, src, p0, n);
    }
  }

  void advance(KVCache& cache, int64_t n) override { static_cast<CpuKVCache&>(cache).advance(n); }
  void set_long_range_probe(LongRangeProbe* probe) override { probe_ = probe; }

 private:
  // One query, one key at a time: scores over exactly the visible keys, then softmax and sum.
  void attend_reference(const CacheSpec& s, const KeySource& src, const Tensor& q, int64_t h,
                        int64_t p0, int64_t n, float scale, Tensor& out) {
    const int64_t d = s.head_dim;
    std::vector<float> scores;
    std::vector<int64_t> keys;
    for (int64_t i = 0; i < n; ++i) {
      const int64_t t = p0 + i;
      const float* qi = fp(q) + i * q.cols + h * d;
      keys.clear();
      scores.clear();
      for (int64_t j = 0; j <= t; ++j) {
        if (!visible(s, src.retrieval, t, j, p0)) continue;
        const float* kj = src.k(j);
        float dot = 0;
        for (int64_t c = 0; c < d; ++c) dot += qi[c] * kj[c];
        keys.push_back(j);
        scores.push_back(dot * scale);
      }
      float mx = -std::numeric_limits<float>::infinity();
      for (float x : scores) mx = std::max(mx, x);
      float sum = 0;
      for (float& x : scores) {
        x = std::exp(x - mx);
        sum += x;
      }
      if (probe_ != nullptr && t >= probe_->query_begin) {
        probe_row(
            t, static_cast<int64_t>(keys.size()), d, [&](int64_t e) { return keys[e]; },
            [&](int64_t e) { return scores[e] / sum; }, [&](int64_t e) { return src.v(keys[e]); });
      }
      float* o = fp(out) + i * out.cols + h * d;
      std::fill(o, o + d, 0.0f);
      for (size_t e = 0; e < keys.size(); ++e) {
        const float* vj = src.v(keys[e]);
        const float p = scores[e] / sum;
        for (int64_t c = 0; c < d; ++c) o[c] += p * vj[c];
      }
    }
  }

  // Blocks of queries; gathers each block's candidate keys, one GEMM for scores, masks by the
  // same visibility rule, softmax, one GEMM for the output.
  void attend_fast(const CacheSpec& s, const KeySource& src, const Tensor& q, int64_t h, int64_t p0,
                   int64_t n, float scale, Tensor& out) {
    constexpr int64_t kBlock = 64;
    const int64_t d = s.head_dim;
    for (int64_t b0 = 0; b0 < n; b0 += kBlock) {
      const int64_t nb = std::min(kBlock, n - b0);
      const int64_t t0 = p0 + b0, t1 = p0 + b0 + nb - 1;
      candidate_ranges(s, src.retrieval, t0, t1, p0, ranges_);
      positions_.clear();
      for (auto [a, b] : ranges_)
        for (int64_t j = a; j < b; ++j) positions_.push_back(j);
      const int64_t nk = static_cast<int64_t>(positions_.size());
      kbuf_.resize(static_cast<size_t>(nk * d));
      vbuf_.resize(static_cast<size_t>(nk * d));
      for (int64_t e = 0; e < nk; ++e) {
        std::memcpy(kbuf_.data() + e * d, src.k(positions_[e]),
                    static_cast<size_t>(d) * sizeof(float));
        std::memcpy(vbuf_.data() + e * d, src.v(positions_[e]),
                    static_cast<size_t>(d) * sizeof(float));
      }
      sbuf_.resize(static_cast<size_t>(nb * nk));
      const float* qb = fp(q) + b0 * q.cols + h * d;
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<int>(nb),
                  static_cast<int>(nk), static_cast<int>(d), scale, qb, static_cast<int>(q.cols),
                  kbuf_.data(), static_cast<int>(d), 0.0f, sbuf_.data(), static_cast<int>(nk));
      for (int64_t i = 0; i < nb; ++i) {
        float* row = sbuf_.data() + i * nk;
        const int64_t t = t0 + i;
        float mx = -std::numeric_limits<float>::infinity();
        for (int64_t e = 0; e < nk; ++e) {
          if (!visible(s, src.retrieval, t, positions_[e], p0)) {
            row[e] = -std::numeric_limits<float>::infinity();
          } else {
            mx = std::max(mx, row[e]);
          }
        }
        float sum = 0;
        for (int64_t e = 0; e < nk; ++e) {
          row[e] = std::isinf(row[e]) ? 0.0f : std::exp(row[e] - mx);
          sum += row[e];
        }
        for (int64_t e = 0; e < nk; ++e) row[e] /= sum;
        if (probe_ != nullptr && t >= probe_->query_begin) {
          probe_row(
              t, nk, d, [&](int64_t e) { return positions_[e]; }, [&](int64_t e) { return row[e]; },
              [&](int64_t e) { return vbuf_.data() + e * d; });
        }
      }
      float* ob = fp(out) + b0 * out.cols + h * d;
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, static_cast<int>(nb),
                  static_cast<int>(d), static_cast<int>(nk), 1.0f, sbuf_.data(),
                  static_cast<int>(nk), vbuf_.data(), static_cast<int>(d), 0.0f, ob,
                  static_cast<int>(out.cols));
    }
  }

  // After attention: copy the chunk's keys/values into the head's store (all of them for a
  // retrieval head; only those that stay held — sinks and the last R — for a streaming head).
  static void store_chunk(const CacheSpec& s, CpuKVCache& cache, const KeySource& src, int64_t p0,
                          int64_t n) {
    const int64_t d = s.head_dim;
    float* sk = const_cast<float*>(src.store_k);
    float* sv = const_cast<float*>(src.store_v);
    for (int64_t i = 0; i < n; ++i) {
      const int64_t j = p0 + i;
      int64_t row;
      if (src.retrieval) {
        row = j;
      } else {
        if (j >= s.sink && j < p0 + n - s.recent) continue;  // overwritten within this chunk anyway
        row = streaming_slot(j, s.sink, s.recent);
        if (row < 0 || row >= cache.streaming_slots()) continue;
      }
      std::memcpy(sk + row * d, src.chunk_k + i * src.kv_stride,
                  static_cast<size_t>(d) * sizeof(float));
      std::memcpy(sv + row * d, src.chunk_v + i * src.kv_stride,
                  static_cast<size_t>(d) * sizeof(float));
    }
  }

  // One query row of probabilities over keys pos(e) with values val(e): adds the mass outside the
  // streaming window (within key_ranges) and the relative squared distance between the full output
  // and the output renormalised over the window (what a streaming head would return).
  template <class Pos, class Prob, class Val>
  void probe_row(int64_t t, int64_t n, int64_t d, Pos pos, Prob prob, Val val) {
    std::vector<double> full(static_cast<size_t>(d), 0.0), win(static_cast<size_t>(d), 0.0);
    double win_mass = 0;
    for (int64_t e = 0; e < n; ++e) {
      const int64_t j = pos(e);
      const double p = prob(e);
      const float* v = val(e);
      for (int64_t c = 0; c < d; ++c) full[c] += p * v[c];
      if (j < probe_->sink || j > t - probe_->recent) {
        win_mass += p;
        for (int64_t c = 0; c < d; ++c) win[c] += p * v[c];
        continue;
      }
      bool in = probe_->key_ranges.empty();
      for (auto [b, end] : probe_->key_ranges) in = in || (j >= b && j < end);
      if (in) probe_->mass[probe_slot_] += p;
    }
    double diff = 0, norm = 0;
    for (int64_t c = 0; c < d; ++c) {
      const double w = win_mass > 0 ? win[c] / win_mass : 0.0;
      diff += (full[c] - w) * (full[c] - w);
      norm += full[c] * full[c];
    }
    probe_->deviation[probe_slot_] += diff / std::max(norm, 1e-30);
    probe_->weight[probe_slot_] += 1;
  }

  CpuMode mode_;
  LongRangeProbe* probe_ = nullptr;
  int64_t probe_slot_ = 0;
  std::vector<std::vector<float>> buffers_;
  std::vector<std::pair<int64_t, int64_t>> ranges_;
  std::vector<int64_t> positions_;
  std::vector<float> kbuf_, vbuf_, sbuf_;
};

}  // namespace

void Backend::set_long_range_probe(LongRangeProbe*) {
  fail("backend ", name(), " does not collect attention statistics (use --backend cpu)");
}

std::vector<int32_t> Backend::argmax_rows(const Tensor& x, int64_t row_begin, int64_t row_end) {
  const std::vector<float> v = download(x, row_begin, row_end);
  std::vector<int32_t> ids;
  for (int64_t r = 0; r < row_end - row_begin; ++r) {
    const auto row = v.begin() + r * x.cols;
    ids.push_back(static_cast<int32_t>(std::max_element(row, row + x.cols) - row));
  }
  return ids;
}

void Backend::rope_attention(KVCache& cache, int64_t layer, Tensor& qkv, int64_t num_heads,
                             std::span<const int64_t> positions, const RopeFrequencies& f,
                             Tensor& out) {
  const CacheSpec& s = cache.spec();
  const int64_t qd = num_heads * s.head_dim, kvd = s.num_kv_heads * s.head_dim;
  check(qkv.rows == 1 && qkv.cols == qd + 2 * kvd, "rope_attention: qkv is ", qkv.rows, " x ",
        qkv.cols, ", expected 1 x ", qd + 2 * kvd);
  Tensor qk = view_cols(qkv, 0, qd + kvd);  // the query and key heads are adjacent
  rope(qk, num_heads + s.num_kv_heads, s.head_dim, positions, f);
  attention(cache, layer, view_cols(qkv, 0, qd), view_cols(qkv, qd, qd + kvd),
            view_cols(qkv, qd + kvd, qd + 2 * kvd), num_heads, out);
}

std::unique_ptr<DecodeGraph> Backend::capture_decode_step(KVCache&, const std::function<void()>&) {
  return nullptr;
}

void Backend::fill_cache_random(KVCache&, int64_t, uint64_t) {
  fail("backend ", name(),
       " cannot fill a cache with random K/V (benchmark option; use --backend cuda)");
}

std::unique_ptr<Backend> make_cpu_backend(CpuMode mode) {
  return std::make_unique<CpuBackend>(mode);
}

}  // namespace duo
