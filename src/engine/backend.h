// The backend interface: every op the forward pass needs, on opaque device tensors. The model code
// (engine/model.cpp) only calls these, so the CUDA backend slots in beside the CPU one.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "engine/rope.h"

namespace duo {

// A 2-D row-major tensor owned by a backend. CPU: fp32 host memory; CUDA: device memory.
struct Tensor {
  void* data = nullptr;
  int64_t rows = 0;
  int64_t cols = 0;
  int64_t numel() const { return rows * cols; }
};

// How streaming heads behave during prefill (duoattention.md section 3).
enum class StreamingPrefill {
  kExact,  // token-exact sinks + window in prefill and decode: chunk-size invariant (default)
  kChunk,  // the authors' release: first chunk dense, later chunks in-chunk causal
};

// Shape of a DuoAttention KV cache. Per layer, KV heads [0, num_retrieval[l]) are retrieval
// heads (all tokens kept), the rest streaming heads (sink + ring of recent tokens).
struct CacheSpec {
  int64_t num_layers = 0;
  int64_t num_kv_heads = 0;
  int64_t head_dim = 0;
  int64_t capacity = 0;                // max tokens (the context length)
  std::vector<int64_t> num_retrieval;  // per layer
  int64_t sink = 0;
  int64_t recent = 0;
  StreamingPrefill prefill = StreamingPrefill::kExact;
};

// Throws Error unless the spec is usable: positive sizes, one retrieval count per layer within
// 0..kv_heads, S and R >= 0, and S + R >= 1 when any head is streaming. Every backend calls it.
void validate_cache_spec(const CacheSpec& spec);

// Bytes of K and V actually allocated (retrieval stores + streaming stores).
struct CacheBytes {
  int64_t retrieval = 0;
  int64_t streaming = 0;
  int64_t total() const { return retrieval + streaming; }
};

class KVCache {
 public:
  virtual ~KVCache() = default;
  virtual const CacheSpec& spec() const = 0;
  virtual int64_t length() const = 0;  // tokens appended so far
  virtual CacheBytes allocated_bytes() const = 0;
  virtual void clear() = 0;
};

// Attention statistics for heuristic head identification: while set, attention() adds, for every
// query at position >= query_begin, the probability mass each query head puts on keys outside a
// streaming window (sink <= j <= t - recent) and inside key_ranges (all keys when it is empty),
// and how far the head's output moves when it only sees the window (relative squared distance
// between full attention and attention renormalised over the window), per (layer, physical KV
// head).
struct LongRangeProbe {
  int64_t query_begin = 0;
  int64_t sink = 0;
  int64_t recent = 0;
  std::vector<std::pair<int64_t, int64_t>> key_ranges;  // [begin, end) position ranges
  std::vector<double> mass;       // [layers * kv_heads], sums of probabilities
  std::vector<double> deviation;  // [layers * kv_heads], sums of |o_full - o_window|^2 / |o_full|^2
  std::vector<double> weight;     // [layers * kv_heads], number of (query, query head) pairs summed
};

// A single-token decode step recorded once by Backend::capture_decode_step and replayed for
// every later token (CUDA graphs). It must not outlive its backend.
class DecodeGraph {
 public:
  virtual ~DecodeGraph() = default;
  // Whether replay() may run for `cache` with RoPE frequencies f: the very cache object it was
  // captured for, the same RoPE attention scaling and frequency count, and no backend buffer the
  // graph reads or writes reallocated since the capture. (Clearing the cache keeps it usable: the
  // position comes from replay().)
  virtual bool usable_for(const KVCache& cache, const RopeFrequencies& f) const = 0;
  // Queues the recorded step for `token` at position cache.length() with frequencies f
  // (asynchronous). The caller advances the cache (Backend::advance) afterwards.
  virtual void replay(int32_t token, const KVCache& cache, const RopeFrequencies& f) = 0;
};

class Backend {
 public:
  virtual ~Backend() = default;
  virtual std::string name() const = 0;
  // Bytes per element of the KV cache this backend allocates (CPU: fp32; CUDA: bf16).
  virtual int64_t kv_bytes_per_element() const = 0;

  // Weights: host fp32 data [rows x cols] copied (and converted) into backend memory.
  virtual Tensor upload(const float* host, int64_t rows, int64_t cols) = 0;
  // Weights drawn in backend memory (random-weight benchmarks, no host round trip): element i is
  // stddev * random_normal_at(seed, i) (engine/random_fill.h), identical on every backend before
  // conversion to the backend's storage type.
  virtual Tensor random_normal(int64_t rows, int64_t cols, float stddev, uint64_t seed) = 0;
  // A tensor with every element = value.
  virtual Tensor constant(int64_t rows, int64_t cols, float value) = 0;
  // Scratch activations; contents undefined. Freed with the backend.
  virtual Tensor alloc(int64_t rows, int64_t cols) = 0;
  // Rows [begin, end) of t, sharing its memory.
  virtual Tensor view_rows(const Tensor& t, int64_t begin, int64_t end) = 0;
  // Columns [begin, end) of a one-row tensor (contiguous), sharing its memory.
  virtual Tensor view_cols(const Tensor& t, int64_t begin, int64_t end) = 0;
  virtual std::vector<float> download(const Tensor& t, int64_t row_begin, int64_t row_end) = 0;
  virtual std::unique_ptr<KVCache> create_cache(const CacheSpec& spec) = 0;

  // out[i, :] = table[tokens[i], :]
  virtual void embed(const Tensor& table, std::span<const int32_t> tokens, Tensor& out) = 0;
  // out = x / sqrt(mean(x^2) + eps) * w, per row
  virtual void rmsnorm(const Tensor& x, const Tensor& w, float eps, Tensor& out) = 0;
  // out[n, m] = x[n, k] @ w[m, k]^T (+ bias[m]); rows of out = rows of x
  virtual void linear(const Tensor& x, const Tensor& w, const Tensor* bias, Tensor& out) = 0;
  // Rotates each head of x[n, heads * head_dim] at positions[n].
  virtual void rope(Tensor& x, int64_t heads, int64_t head_dim, std::span<const int64_t> positions,
                    const RopeFrequencies& f) = 0;
  // out = silu(gate) * up
  virtual void swiglu(const Tensor& gate, const Tensor& up, Tensor& out) = 0;
  // x += y
  virtual void add(Tensor& x, const Tensor& y) = 0;
  // add(x, y) then rmsnorm(x, w, eps, out), fused where the backend can (bitwise the same).
  virtual void add_rmsnorm(Tensor& x, const Tensor& y, const Tensor& w, float eps, Tensor& out) {
    add(x, y);
    rmsnorm(x, w, eps, out);
  }
  // Appends k, v (n new tokens at positions cache.length() ..) to `layer` of the cache and computes
  // out[n, heads * head_dim] = attention of q (heads query heads, GQA groups of heads / kv_heads)
  // over what each head may see. The cache length advances once per forward, via advance().
  virtual void attention(KVCache& cache, int64_t layer, const Tensor& q, const Tensor& k,
                         const Tensor& v, int64_t num_heads, Tensor& out) = 0;
  // One decode token: qkv [1, heads * head_dim + 2 * kv_dim] holds the query heads, then the KV
  // heads' keys, then their values. rope() on the query and key heads at positions[0], then
  // attention() on the three views; backends may fuse the two (bitwise the same result).
  virtual void rope_attention(KVCache& cache, int64_t layer, Tensor& qkv, int64_t num_heads,
                              std::span<const int64_t> positions, const RopeFrequencies& f,
                              Tensor& out);
  // Marks n tokens appended to every layer (called once after the last layer).
  virtual void advance(KVCache& cache, int64_t n) = 0;
  // Starts (probe != nullptr) or stops collecting LongRangeProbe statistics; the probe's vectors
  // must be sized layers * kv_heads. Backends without it throw Error.
  virtual void set_long_range_probe(LongRangeProbe* probe);

  // Index of the largest element of each row [row_begin, row_end) of x, the lowest index among
  // equal maxima (std::max_element's choice): greedy sampling where only the ids cross to the host.
  virtual std::vector<int32_t> argmax_rows(const Tensor& x, int64_t row_begin, int64_t row_end);

  // Optional (CUDA graphs): records the op calls that `step` makes — one decode token (n == 1) for
  // `cache`, without Backend::advance — into a graph, without running them. While recording,
  // embed() takes the token and rope() / attention() the position (and RoPE frequencies) from
  // device state that DecodeGraph::replay() sets, so the host values passed to them are ignored.
  // Every tensor the step touches must stay allocated and unmoved while the graph is used, and
  // the same step must have run once uncaptured on this backend first (so that no buffer grows
  // during the capture). nullptr where the backend has no graphs (the CPU backends).
  virtual std::unique_ptr<DecodeGraph> capture_decode_step(KVCache& cache,
                                                           const std::function<void()>& step);

  // Benchmarks only: makes the cache hold `length` tokens whose K/V are random normals (seeded) in
  // every store, in place of a prefill, so decode and the last prefill chunk at long contexts can
  // be timed without prefilling everything before them. Backends without it throw Error.
  virtual void fill_cache_random(KVCache& cache, int64_t length, uint64_t seed);

  // Waits for queued device work (no-op on the CPU). Timing code calls it before reading a clock.
  virtual void synchronize() {}
  // Peak device memory held by this backend (weights, scratch, caches, library workspaces) since
  // it was created or since reset_memory_peak(); 0 for backends without device memory.
  virtual int64_t device_memory_peak() const { return 0; }
  // Device memory held now; 0 for backends without device memory.
  virtual int64_t device_memory_in_use() const { return 0; }
  virtual void reset_memory_peak() {}
};

enum class CpuMode { kReference, kFast };

// The CPU backend: kReference is plain loops (the oracle for tests); kFast uses BLAS and threads.
std::unique_ptr<Backend> make_cpu_backend(CpuMode mode);

}  // namespace duo
