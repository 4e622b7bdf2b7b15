// CUDA backend (see cuda_backend.h): the Backend class, host side (C++20). Kernels live in
// backend_kernels.cu (plain: one block per row for row-wise ops, grid-stride loops for element-wise
// ops, fp32 arithmetic on bf16 storage); linear layers go through cuBLASLt.
#include "cuda/cuda_backend.h"

#include <cublasLt.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstddef>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <string>
#include <string_view>
#include <tuple>
#include <vector>

#include "core/error.h"
#include "cuda/attention.h"
#include "cuda/attention_naive.h"
#include "cuda/backend_kernels.h"
#include "cuda/cuda_check.h"
#include "cuda/device_memory.h"
#include "engine/random_fill.h"

namespace duo {

namespace {

using bf16 = __nv_bfloat16;
using cuda::DeviceMemory;

bf16* bp(const Tensor& t) {
  return static_cast<bf16*>(t.data);
}

// ---------------------------------------------------------------------------------------------
// KV cache

struct CudaLayerCache {
  int64_t num_retrieval = 0;
  int64_t num_streaming = 0;
  bf16 *rk = nullptr, *rv = nullptr, *sk = nullptr, *sv = nullptr;
};

class CudaKVCache final : public KVCache {
 public:
  CudaKVCache(const CacheSpec& spec, DeviceMemory& mem)
      : spec_(spec), mem_(&mem), serial_(next_serial()) {
    validate_cache_spec(spec);
    layers_.resize(static_cast<size_t>(spec.num_layers));
    try {
      for (int64_t l = 0; l < spec.num_layers; ++l) {
        CudaLayerCache& c = layers_[l];
        c.num_retrieval = spec.num_retrieval[l];
        c.num_streaming = spec.num_kv_heads - c.num_retrieval;
        const int64_t rn = c.num_retrieval * spec.capacity * spec.head_dim * 2;  // bytes
        const int64_t sn = c.num_streaming * slots() * spec.head_dim * 2;
        if (rn > 0) {
          c.rk = static_cast<bf16*>(mem.alloc(rn, "KV cache retrieval K"));
          c.rv = static_cast<bf16*>(mem.alloc(rn, "KV cache retrieval V"));
          bytes_.retrieval += 2 * rn;
        }
        if (sn > 0) {
          c.sk = static_cast<bf16*>(mem.alloc(sn, "KV cache streaming K"));
          c.sv = static_cast<bf16*>(mem.alloc(sn, "KV cache streaming V"));
          bytes_.streaming += 2 * sn;
        }
      }
    } catch (...) {
      release();
      throw;
    }
  }
  ~CudaKVCache() override { release(); }
  const CacheSpec& spec() const override { return spec_; }
  int64_t length() const override { return length_; }
  CacheBytes allocated_bytes() const override { return bytes_; }
  void clear() override { length_ = 0; }

  CudaLayerCache& layer(int64_t l) { return layers_[l]; }
  // Distinct for every cache ever created by any backend (a decode graph is bound to one cache;
  // a new cache at a recycled address must not match).
  uint64_t serial() const { return serial_; }
  void set_length(int64_t n) {
    check(n >= 0 && n <= spec_.capacity, "kv cache: length ", n, " outside 0..", spec_.capacity);
    length_ = n;
  }
  int64_t slots() const { return std::min(spec_.capacity, spec_.sink + spec_.recent); }
  void advance(int64_t n) {
    check(length_ + n <= spec_.capacity, "kv cache: ", length_ + n,
          " tokens exceed the context length ", spec_.capacity);
    length_ += n;
  }

 private:
  void release() {
    for (auto& c : layers_) {
      mem_->free(c.rk);
      mem_->free(c.rv);
      mem_->free(c.sk);
      mem_->free(c.sv);
      c.rk = c.rv = c.sk = c.sv = nullptr;
    }
  }
  static uint64_t next_serial() {
    static std::atomic<uint64_t> counter{0};
    return ++counter;
  }
  CacheSpec spec_;
  DeviceMemory* mem_;
  uint64_t serial_;
  std::vector<CudaLayerCache> layers_;
  int64_t length_ = 0;
  CacheBytes bytes_;
};

// ---------------------------------------------------------------------------------------------
// cuBLASLt plans

int pointer_alignment(const void* p) {
  const auto a = reinterpret_cast<uintptr_t>(p);
  int align = 256;
  while (align > 1 && (a % static_cast<uintptr_t>(align)) != 0) align /= 2;
  return align;
}

struct GemmPlan {
  cublasLtMatmulDesc_t desc = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr;
  cublasLtMatmulAlgo_t algo{};
  bool have_algo = false;
};

// ---------------------------------------------------------------------------------------------
// Pinned host staging

// A growable pinned host buffer for asynchronous copies. acquire() first waits for the copy that
// last used it (an event), so the host never rewrites bytes that a queued copy still reads.
class PinnedBuffer {
 public:
  PinnedBuffer() = default;
  PinnedBuffer(const PinnedBuffer&) = delete;
  PinnedBuffer& operator=(const PinnedBuffer&) = delete;
  ~PinnedBuffer() {
    if (ptr_ != nullptr) (void)cudaFreeHost(ptr_);
    if (event_ != nullptr) (void)cudaEventDestroy(event_);
  }
  void* acquire(int64_t bytes) {
    if (event_ == nullptr)
      DUO_CUDA_CHECK(cudaEventCreateWithFlags(&event_, cudaEventDisableTiming));
    DUO_CUDA_CHECK(cudaEventSynchronize(event_));  // returns at once if never recorded
    if (bytes > bytes_) {
      if (ptr_ != nullptr) DUO_CUDA_CHECK(cudaFreeHost(ptr_));
      ptr_ = nullptr;
      bytes_ = 0;
      DUO_CUDA_CHECK(cudaMallocHost(&ptr_, static_cast<size_t>(std::max<int64_t>(bytes, 64))));
      bytes_ = std::max<int64_t>(bytes, 64);
    }
    return ptr_;
  }
  // Marks the buffer as read/written by the work queued so far on `stream`.
  void used_by(cudaStream_t stream) { DUO_CUDA_CHECK(cudaEventRecord(event_, stream)); }

 private:
  void* ptr_ = nullptr;
  int64_t bytes_ = 0;
  cudaEvent_t event_ = nullptr;
};

// What a replayed decode step reads from device memory (uploaded by DecodeGraph::replay from a
// pinned mirror in one copy): the token, its position (RoPE, cache appends, attention p0) and the
// RoPE inverse frequencies (dynamic NTK may change them between steps).
constexpr int kMaxRopeFreqs = 256;  // head_dim <= 512
struct DecodeInputs {
  int64_t position;
  int32_t token;
  int32_t pad;
  float inv_freq[kMaxRopeFreqs];
};

// Set while a decode step is recorded: what the step's ops read and what they assumed.
struct DecodeCapture {
  const KVCache* cache = nullptr;
  DecodeInputs* device = nullptr;
  int64_t vocab = -1;       // rows of the embedding table (token range check at replay)
  int64_t rope_freqs = -1;  // frequency count of the rope() calls (-1: none)
  float attention_scaling = 1.0f;
};

class CudaDecodeGraph;

// Debug (DUO_GRAPH_NODES=1): a captured decode step's nodes, and its kernels by name with their
// counts (library kernels the runtime cannot name are counted together), printed to stderr.
void print_graph_nodes(cudaGraph_t graph) {
  size_t count = 0;
  DUO_CUDA_CHECK(cudaGraphGetNodes(graph, nullptr, &count));
  std::vector<cudaGraphNode_t> nodes(count);
  DUO_CUDA_CHECK(cudaGraphGetNodes(graph, nodes.data(), &count));
  std::map<std::string, int> kernels;
  int num_kernels = 0;
  for (cudaGraphNode_t node : nodes) {
    cudaGraphNodeType type{};
    DUO_CUDA_CHECK(cudaGraphNodeGetType(node, &type));
    if (type != cudaGraphNodeTypeKernel) continue;
    ++num_kernels;
    cudaKernelNodeParams kp{};
    const char* name = nullptr;
    if (cudaGraphKernelNodeGetParams(node, &kp) != cudaSuccess ||
        cudaFuncGetName(&name, kp.func) != cudaSuccess || name == nullptr) {
      (void)cudaGetLastError();
      name = "(library kernel, unnamed)";
    }
    ++kernels[std::string(name).substr(0, 100)];
  }
  std::fprintf(stderr, "decode graph: %zu nodes, %d kernels\n", count, num_kernels);
  for (const auto& [name, n] : kernels) std::fprintf(stderr, "  %5d  %s\n", n, name.c_str());
}

// ---------------------------------------------------------------------------------------------

class CudaBackend final : public Backend {
 public:
  explicit CudaBackend(int device)
      : device_(device), mem_("CUDA device " + std::to_string(device)) {
    int count = 0;
    const cudaError_t e = cudaGetDeviceCount(&count);
    if (e != cudaSuccess || count == 0) {
      (void)cudaGetLastError();
      fail("no CUDA device available (", e != cudaSuccess ? cudaGetErrorString(e) : "0 devices",
           ")");
    }
    check(device >= 0 && device < count, "CUDA device ", device, " does not exist (", count,
          " present)");
    DUO_CUDA_CHECK(cudaSetDevice(device));
    cudaDeviceProp prop{};
    DUO_CUDA_CHECK(cudaGetDeviceProperties(&prop, device));
    name_ = std::string("cuda:") + std::to_string(device) + " (" + prop.name + ")";
    num_sms_ = prop.multiProcessorCount;
    DUO_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
    DUO_CUBLAS_CHECK(cublasLtCreate(&lt_));
    workspace_bytes_ = 32 << 20;
    workspace_ = mem_.alloc(workspace_bytes_, "cuBLASLt workspace");
    const char* env = std::getenv("DUO_ATTENTION");
    naive_attention_ = env != nullptr && std::string_view(env) == "naive";
  }
  ~CudaBackend() override {
    (void)cudaStreamSynchronize(stream_);
    for (auto& [key, plan] : plans_) destroy_plan(plan);
    if (lt_ != nullptr) (void)cublasLtDestroy(lt_);
    if (stream_ != nullptr) (void)cudaStreamDestroy(stream_);
  }

  int64_t kv_bytes_per_element() const override { return 2; }  // bf16 stores
  std::string name() const override { return name_; }

  Tensor upload(const float* host, int64_t rows, int64_t cols) override {
    Tensor t = alloc(rows, cols);
    const int64_t n = rows * cols;
    constexpr int64_t kStage = int64_t{1} << 22;  // floats per staging round (16 MiB)
    if (n == 0) return t;
    float* stage = static_cast<float*>(staging(std::min(n, kStage) * 4));
    for (int64_t off = 0; off < n; off += kStage) {
      const int64_t len = std::min(kStage, n - off);
      DUO_CUDA_CHECK(cudaMemcpyAsync(stage, host + off, static_cast<size_t>(len) * 4,
                                     cudaMemcpyHostToDevice, stream_));
      cuda::kernels::f32_to_bf16(stage, bp(t) + off, len, stream_);
    }
    DUO_CUDA_CHECK(cudaStreamSynchronize(stream_));
    return t;
  }
  Tensor random_normal(int64_t rows, int64_t cols, float stddev, uint64_t seed) override {
    Tensor t = alloc(rows, cols);
    const int64_t n = rows * cols;
    cuda::kernels::fill_normal(bp(t), n, stddev, seed, stream_);
    return t;
  }
  Tensor constant(int64_t rows, int64_t cols, float value) override {
    Tensor t = alloc(rows, cols);
    const int64_t n = rows * cols;
    cuda::kernels::fill_constant(bp(t), n, value, stream_);
    return t;
  }
  Tensor alloc(int64_t rows, int64_t cols) override {
    check(rows >= 0 && cols >= 0, "cuda backend: negative tensor shape");
    void* p = mem_.alloc(rows * cols * 2, "tensor");
    owned_.push_back(p);
    return Tensor{p, rows, cols};
  }
  Tensor view_rows(const Tensor& t, int64_t begin, int64_t end) override {
    check(begin >= 0 && begin <= end && end <= t.rows, "view_rows: rows [", begin, ", ", end,
          ") outside 0..", t.rows);
    return Tensor{bp(t) + begin * t.cols, end - begin, t.cols};
  }
  Tensor view_cols(const Tensor& t, int64_t begin, int64_t end) override {
    check(t.rows == 1 && begin >= 0 && begin <= end && end <= t.cols, "view_cols: columns [", begin,
          ", ", end, ") of a ", t.rows, " x ", t.cols, " tensor (one row only)");
    return Tensor{bp(t) + begin, 1, end - begin};
  }
  std::vector<float> download(const Tensor& t, int64_t row_begin, int64_t row_end) override {
    check(row_begin >= 0 && row_begin <= row_end && row_end <= t.rows, "download: rows [",
          row_begin, ", ", row_end, ") outside 0..", t.rows);
    const int64_t n = (row_end - row_begin) * t.cols;
    auto* tmp = static_cast<uint16_t*>(download_pinned_.acquire(n * 2));
    if (n > 0)
      DUO_CUDA_CHECK(cudaMemcpyAsync(tmp, bp(t) + row_begin * t.cols, static_cast<size_t>(n) * 2,
                                     cudaMemcpyDeviceToHost, stream_));
    DUO_CUDA_CHECK(cudaStreamSynchronize(stream_));
    std::vector<float> out(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) {
      const uint32_t bits = static_cast<uint32_t>(tmp[i]) << 16;  // bf16 -> fp32 is exact
      std::memcpy(&out[i], &bits, 4);
    }
    return out;
  }
  std::vector<int32_t> argmax_rows(const Tensor& x, int64_t row_begin, int64_t row_end) override {
    check(row_begin >= 0 && row_begin <= row_end && row_end <= x.rows && x.cols > 0,
          "argmax_rows: rows [", row_begin, ", ", row_end, ") outside 0..", x.rows,
          " or no columns");
    const int64_t n = row_end - row_begin;
    if (n == 0) return {};
    auto* d = static_cast<int32_t*>(scratch(argmax_buf_, n * 4, "argmax ids"));
    cuda::kernels::argmax_rows(bp(x) + row_begin * x.cols, n, x.cols, d, stream_);
    auto* h = static_cast<int32_t*>(argmax_pinned_.acquire(n * 4));
    DUO_CUDA_CHECK(
        cudaMemcpyAsync(h, d, static_cast<size_t>(n) * 4, cudaMemcpyDeviceToHost, stream_));
    DUO_CUDA_CHECK(cudaStreamSynchronize(stream_));
    return std::vector<int32_t>(h, h + n);
  }
  std::unique_ptr<KVCache> create_cache(const CacheSpec& spec) override {
    return std::make_unique<CudaKVCache>(spec, mem_);
  }

  void embed(const Tensor& table, std::span<const int32_t> tokens, Tensor& out) override {
    const int64_t n = static_cast<int64_t>(tokens.size());
    check(out.rows >= n && out.cols == table.cols, "embed: output is ", out.rows, " x ", out.cols,
          ", expected ", n, " x ", table.cols);
    for (size_t i = 0; i < tokens.size(); ++i)
      check(tokens[i] >= 0 && tokens[i] < table.rows, "token id ", tokens[i],
            " is outside the vocabulary of ", table.rows);
    if (n == 0) return;
    if (capture_ != nullptr) {  // the token comes from DecodeInputs at replay
      check(n == 1, "decode graph capture: embed of ", n, " tokens (one per step)");
      capture_->vocab = table.rows;
      cuda::kernels::embed(bp(table), table.cols, &capture_->device->token, 1, bp(out), stream_);
      return;
    }
    int32_t* d_tokens = static_cast<int32_t*>(scratch(tokens_buf_, n * 4, "token ids"));
    auto* h = static_cast<int32_t*>(tokens_pinned_.acquire(n * 4));
    std::memcpy(h, tokens.data(), static_cast<size_t>(n) * 4);
    DUO_CUDA_CHECK(
        cudaMemcpyAsync(d_tokens, h, static_cast<size_t>(n) * 4, cudaMemcpyHostToDevice, stream_));
    tokens_pinned_.used_by(stream_);
    cuda::kernels::embed(bp(table), table.cols, d_tokens, n, bp(out), stream_);
  }

  void rmsnorm(const Tensor& x, const Tensor& w, float eps, Tensor& out) override {
    check(w.numel() == x.cols && out.rows == x.rows && out.cols == x.cols,
          "rmsnorm: shapes do not match");
    cuda::kernels::rmsnorm(bp(x), bp(w), eps, x.rows, x.cols, bp(out), stream_);
  }

  void linear(const Tensor& x, const Tensor& w, const Tensor* bias, Tensor& out) override {
    const int64_t n = x.rows, k = x.cols, m = w.rows;
    check(w.cols == k && out.rows == n && out.cols == m, "linear: x ", x.rows, "x", x.cols, ", w ",
          w.rows, "x", w.cols, ", out ", out.rows, "x", out.cols, " do not match");
    check(bias == nullptr || bias->numel() == m, "linear: bias has ", bias ? bias->numel() : 0,
          " elements, expected ", m);
    if (n == 0 || m == 0) return;
    const bf16* bptr = bias != nullptr ? bp(*bias) : nullptr;
    GemmPlan& plan = gemm_plan(n, m, k, bp(x), bp(w), bp(out), bptr);
    if (!plan.have_algo) {
      cuda::kernels::linear_fallback(bp(x), bp(w), bptr, bp(out), n, m, k, stream_);
      return;
    }
    if (bptr != nullptr)
      DUO_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(plan.desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER,
                                                      &bptr, sizeof(bptr)));
    const float alpha = 1.0f, beta = 0.0f;
    DUO_CUBLAS_CHECK(cublasLtMatmul(lt_, plan.desc, &alpha, bp(w), plan.a, bp(x), plan.b, &beta,
                                    bp(out), plan.c, bp(out), plan.c, &plan.algo, workspace_,
                                    static_cast<size_t>(workspace_bytes_), stream_));
  }

  void rope(Tensor& x, int64_t heads, int64_t head_dim, std::span<const int64_t> positions,
            const RopeFrequencies& f) override {
    check(head_dim % 2 == 0 && heads * head_dim <= x.cols, "rope: ", heads, " heads of ", head_dim,
          " do not fit ", x.cols, " columns");
    if (x.rows == 0) return;
    const RopeInputs in = rope_inputs(x.rows, head_dim, positions, f);
    cuda::kernels::rope(bp(x), x.rows, x.cols, static_cast<int>(heads), static_cast<int>(head_dim),
                        in.positions, in.inv_freq, f.attention_scaling, stream_);
  }

  void rope_attention(KVCache& cache_base, int64_t layer, Tensor& qkv, int64_t num_heads,
                      std::span<const int64_t> positions, const RopeFrequencies& f,
                      Tensor& out) override {
    auto& cache = static_cast<CudaKVCache&>(cache_base);
    const CacheSpec& s = cache.spec();
    const int64_t d = s.head_dim, hkv = s.num_kv_heads;
    if (!fast_attention(d) || qkv.rows != 1) {  // naive kernels: rope() then attention()
      Backend::rope_attention(cache_base, layer, qkv, num_heads, positions, f, out);
      return;
    }
    const int64_t qd = num_heads * d, kvd = hkv * d;
    check(layer >= 0 && layer < s.num_layers, "rope_attention: layer ", layer, " outside 0..",
          s.num_layers - 1);
    check(qkv.cols == qd + 2 * kvd, "rope_attention: qkv has ", qkv.cols, " columns, expected ",
          qd + 2 * kvd);
    check(capture_ != nullptr || cache.length() + 1 <= s.capacity,
          "context length exceeded: ", cache.length() + 1, " tokens, but the cache holds ",
          s.capacity, " (raise -c)");
    check(capture_ != nullptr || (!positions.empty() && positions[0] == cache.length()),
          "rope_attention: the position is not the cache length");
    // RoPE of the query and key heads fused with the retrieval-store append of the rotated keys
    // and the values (bitwise rope() then append_retrieval()); attention() skips that append.
    const RopeInputs in = rope_inputs(1, d, positions, f);
    CudaLayerCache& lc = cache.layer(layer);
    cuda::kernels::rope_append_retrieval(
        bp(qkv), static_cast<int>(num_heads), static_cast<int>(hkv), static_cast<int>(d),
        in.positions, in.inv_freq, f.attention_scaling, static_cast<int>(lc.num_retrieval),
        s.capacity, lc.rk, lc.rv, stream_);
    attention_impl(cache, layer, view_cols(qkv, 0, qd), view_cols(qkv, qd, qd + kvd),
                   view_cols(qkv, qd + kvd, qd + 2 * kvd), num_heads, out,
                   /*retrieval_appended=*/true);
  }

  void swiglu(const Tensor& gate, const Tensor& up, Tensor& out) override {
    check(gate.numel() == up.numel() && out.numel() == gate.numel(), "swiglu: shapes do not match");
    const int64_t n = gate.numel();
    cuda::kernels::swiglu(bp(gate), bp(up), bp(out), n, stream_);
  }

  void add_rmsnorm(Tensor& x, const Tensor& y, const Tensor& w, float eps, Tensor& out) override {
    check(x.numel() == y.numel() && w.numel() == x.cols && out.rows == x.rows && out.cols == x.cols,
          "add_rmsnorm: shapes do not match");
    cuda::kernels::add_rmsnorm(bp(x), bp(y), bp(w), eps, x.rows, x.cols, bp(out), stream_);
  }

  void add(Tensor& x, const Tensor& y) override {
    check(x.numel() == y.numel(), "add: shapes do not match");
    const int64_t n = x.numel();
    cuda::kernels::add(bp(x), bp(y), n, stream_);
  }

  void attention(KVCache& cache, int64_t layer, const Tensor& q, const Tensor& k, const Tensor& v,
                 int64_t num_heads, Tensor& out) override {
    attention_impl(static_cast<CudaKVCache&>(cache), layer, q, k, v, num_heads, out, false);
  }

  void advance(KVCache& cache, int64_t n) override {
    check(capture_ == nullptr, "decode graph capture: advance() is the caller's, after replay");
    static_cast<CudaKVCache&>(cache).advance(n);
  }

  std::unique_ptr<DecodeGraph> capture_decode_step(KVCache& cache,
                                                   const std::function<void()>& step) override;

  void fill_cache_random(KVCache& cache_base, int64_t length, uint64_t seed) override {
    auto& cache = static_cast<CudaKVCache&>(cache_base);
    const CacheSpec& s = cache.spec();
    check(length >= 0 && length <= s.capacity, "fill_cache_random: length ", length, " outside 0..",
          s.capacity);
    uint64_t k = 0;
    for (int64_t l = 0; l < s.num_layers; ++l) {
      CudaLayerCache& c = cache.layer(l);
      const int64_t rn = c.num_retrieval * s.capacity * s.head_dim;
      const int64_t sn = c.num_streaming * cache.slots() * s.head_dim;
      for (bf16* p : {c.rk, c.rv})
        if (rn > 0) cuda::kernels::fill_normal(p, rn, 1.0f, tensor_seed(seed, k++), stream_);
      for (bf16* p : {c.sk, c.sv})
        if (sn > 0) cuda::kernels::fill_normal(p, sn, 1.0f, tensor_seed(seed, k++), stream_);
    }
    DUO_CUDA_CHECK(cudaStreamSynchronize(stream_));
    cache.set_length(length);
  }

  void synchronize() override { DUO_CUDA_CHECK(cudaStreamSynchronize(stream_)); }
  int64_t device_memory_peak() const override { return mem_.peak(); }
  int64_t device_memory_in_use() const override { return mem_.in_use(); }
  void reset_memory_peak() override { mem_.reset_peak(); }

 private:
  friend class CudaDecodeGraph;
  struct Scratch {
    void* ptr = nullptr;
    int64_t bytes = 0;
  };
  // A growable device buffer (contents not preserved when it grows).
  void* scratch(Scratch& s, int64_t bytes, const char* what) {
    if (bytes > s.bytes) {
      check(capture_ == nullptr, "decode graph capture: buffer '", what,
            "' would grow during the capture (run the step once uncaptured first)");
      ++buffer_epoch_;  // a captured graph may hold the old address
      if (s.ptr != nullptr) {
        DUO_CUDA_CHECK(cudaStreamSynchronize(stream_));  // the old buffer may still be in use
        mem_.free(s.ptr);
        s.ptr = nullptr;
        s.bytes = 0;
      }
      s.ptr = mem_.alloc(bytes, what);
      s.bytes = bytes;
    }
    return s.ptr;
  }
  void* staging(int64_t bytes) { return scratch(staging_, bytes, "upload staging"); }

  // The fast kernels take head_dim 64 or 128 (cuda/attention.h); other sizes (the tiny test
  // fixtures use 16) and DUO_ATTENTION=naive run on the naive kernels.
  bool fast_attention(int64_t head_dim) const {
    return !naive_attention_ && (head_dim == 64 || head_dim == 128);
  }

  // Device addresses of the RoPE position(s) and frequencies for a rope kernel over `rows` rows:
  // while capturing a decode step the DecodeInputs that replay() fills; otherwise uploaded (each
  // only when it differs from the last call's: q and k share them).
  struct RopeInputs {
    const int64_t* positions;
    const float* inv_freq;
  };
  RopeInputs rope_inputs(int64_t rows, int64_t head_dim, std::span<const int64_t> positions,
                         const RopeFrequencies& f) {
    check(static_cast<int64_t>(positions.size()) >= rows, "rope: ", positions.size(),
          " positions for ", rows, " rows");
    check(static_cast<int64_t>(f.inv_freq.size()) == head_dim / 2, "rope: ", f.inv_freq.size(),
          " frequencies for head_dim ", head_dim);
    if (capture_ != nullptr) {
      check(rows == 1, "decode graph capture: rope of ", rows, " rows (one per step)");
      check(static_cast<int64_t>(f.inv_freq.size()) <= kMaxRopeFreqs,
            "decode graph capture: ", f.inv_freq.size(), " RoPE frequencies, at most ",
            kMaxRopeFreqs);
      check(capture_->rope_freqs < 0 ||
                (capture_->rope_freqs == static_cast<int64_t>(f.inv_freq.size()) &&
                 capture_->attention_scaling == f.attention_scaling),
            "decode graph capture: rope() calls of one step disagree on the frequencies");
      capture_->rope_freqs = static_cast<int64_t>(f.inv_freq.size());
      capture_->attention_scaling = f.attention_scaling;
      return {&capture_->device->position, capture_->device->inv_freq};
    }
    if (f.inv_freq != inv_freq_host_) {
      const int64_t bytes = static_cast<int64_t>(f.inv_freq.size()) * 4;
      float* d = static_cast<float*>(scratch(inv_freq_buf_, bytes, "rope frequencies"));
      void* h = inv_freq_pinned_.acquire(bytes);
      std::memcpy(h, f.inv_freq.data(), static_cast<size_t>(bytes));
      DUO_CUDA_CHECK(
          cudaMemcpyAsync(d, h, static_cast<size_t>(bytes), cudaMemcpyHostToDevice, stream_));
      inv_freq_pinned_.used_by(stream_);
      inv_freq_host_ = f.inv_freq;
    }
    if (positions_host_.size() != static_cast<size_t>(rows) ||
        !std::equal(positions_host_.begin(), positions_host_.end(), positions.begin())) {
      int64_t* d = static_cast<int64_t*>(scratch(positions_buf_, rows * 8, "rope positions"));
      positions_host_.assign(positions.begin(), positions.begin() + rows);
      void* h = positions_pinned_.acquire(rows * 8);
      std::memcpy(h, positions_host_.data(), static_cast<size_t>(rows) * 8);
      DUO_CUDA_CHECK(
          cudaMemcpyAsync(d, h, static_cast<size_t>(rows) * 8, cudaMemcpyHostToDevice, stream_));
      positions_pinned_.used_by(stream_);
    }
    return {static_cast<const int64_t*>(positions_buf_.ptr),
            static_cast<const float*>(inv_freq_buf_.ptr)};
  }

  // attention(); retrieval_appended: the new token's K/V are already in the retrieval store
  // (rope_attention's fused kernel).
  void attention_impl(CudaKVCache& cache, int64_t layer, const Tensor& q, const Tensor& k,
                      const Tensor& v, int64_t num_heads, Tensor& out, bool retrieval_appended) {
    const CacheSpec& s = cache.spec();
    check(layer >= 0 && layer < s.num_layers, "attention: layer ", layer, " outside 0..",
          s.num_layers - 1);
    CudaLayerCache& lc = cache.layer(layer);
    const int64_t n = q.rows, d = s.head_dim, hkv = s.num_kv_heads;
    check(capture_ == nullptr || capture_->cache == static_cast<const KVCache*>(&cache),
          "decode graph capture: attention on a cache other than the one being captured for");
    // While capturing a decode step, p0 is read from DecodeInputs::position at replay (which checks
    // the capacity), so the host value is a placeholder.
    const int64_t p0 = capture_ != nullptr ? 0 : cache.length();
    check(capture_ != nullptr || p0 + n <= s.capacity, "context length exceeded: ", p0 + n,
          " tokens, but the cache holds ", s.capacity, " (raise -c)");
    check(capture_ == nullptr || n == 1, "decode graph capture: attention over ", n,
          " tokens (one per step)");
    check(num_heads % hkv == 0, "attention: ", num_heads, " query heads are not a multiple of ",
          hkv, " KV heads");
    check(q.cols == num_heads * d && k.cols == hkv * d && v.cols == hkv * d && k.rows == n &&
              v.rows == n && out.rows == n && out.cols == num_heads * d,
          "attention: q/k/v/out shapes do not match the cache");
    if (n == 0) return;
    cuda::AttentionParams p{};
    p.q = bp(q);
    p.k_new = bp(k);
    p.v_new = bp(v);
    p.out = bp(out);
    p.n = n;
    p.p0 = p0;
    p.num_heads = static_cast<int>(num_heads);
    p.num_kv_heads = static_cast<int>(hkv);
    p.num_retrieval = static_cast<int>(lc.num_retrieval);
    p.head_dim = static_cast<int>(d);
    p.scale = 1.0f / std::sqrt(static_cast<float>(d));
    p.retrieval_k = lc.rk;
    p.retrieval_v = lc.rv;
    p.capacity = s.capacity;
    p.streaming_k = lc.sk;
    p.streaming_v = lc.sv;
    p.slots = cache.slots();
    p.sink = s.sink;
    p.recent = s.recent;
    p.mode = s.prefill == StreamingPrefill::kExact ? cuda::StreamingMode::kExact
                                                   : cuda::StreamingMode::kChunk;
    p.p0_device = capture_ != nullptr ? &capture_->device->position : nullptr;
    if (!fast_attention(d)) {
      p.workspace = nullptr;
      p.workspace_bytes = 0;
      if (lc.num_retrieval > 0) cuda::append_retrieval_naive(p, lc.rk, lc.rv, stream_);
      cuda::attention_naive(p, stream_);
      if (lc.num_streaming > 0) cuda::append_streaming_naive(p, lc.sk, lc.sv, stream_);
      return;
    }
    const int64_t ws =
        cuda::attention_workspace_bytes(n, p.num_heads, p.head_dim, s.capacity, num_sms_);
    p.workspace =
        ws > 0 ? static_cast<float*>(scratch(attn_workspace_, ws, "attention workspace")) : nullptr;
    p.workspace_bytes = ws;
    if (lc.num_retrieval > 0 && !retrieval_appended)
      cuda::append_retrieval(p, lc.rk, lc.rv, stream_);
    if (lc.num_streaming > 0) {
      cuda::attention_append_streaming(p, lc.sk, lc.sv, stream_);  // append after reading
    } else {
      cuda::attention(p, stream_);
    }
  }

  GemmPlan& gemm_plan(int64_t n, int64_t m, int64_t k, const void* x, const void* w,
                      const void* out, const void* bias) {
    const int ax = pointer_alignment(x), aw = pointer_alignment(w), ao = pointer_alignment(out);
    const auto key = std::make_tuple(n, m, k, ax, aw, ao, bias != nullptr);
    auto it = plans_.find(key);
    if (it != plans_.end()) return it->second;
    GemmPlan plan;
    // Column-major view: out^T [m x n] = w [k x m]^T * x^T [k x n].
    DUO_CUBLAS_CHECK(cublasLtMatmulDescCreate(&plan.desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
    const cublasOperation_t ta = CUBLAS_OP_T, tb = CUBLAS_OP_N;
    DUO_CUBLAS_CHECK(
        cublasLtMatmulDescSetAttribute(plan.desc, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof(ta)));
    DUO_CUBLAS_CHECK(
        cublasLtMatmulDescSetAttribute(plan.desc, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof(tb)));
    if (bias != nullptr) {
      const cublasLtEpilogue_t epi = CUBLASLT_EPILOGUE_BIAS;
      DUO_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(plan.desc, CUBLASLT_MATMUL_DESC_EPILOGUE,
                                                      &epi, sizeof(epi)));
      const cudaDataType_t bt = CUDA_R_16BF;
      DUO_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(
          plan.desc, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &bt, sizeof(bt)));
      DUO_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(plan.desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER,
                                                      &bias, sizeof(bias)));
    }
    DUO_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&plan.a, CUDA_R_16BF, static_cast<uint64_t>(k),
                                                static_cast<uint64_t>(m), k));
    DUO_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&plan.b, CUDA_R_16BF, static_cast<uint64_t>(k),
                                                static_cast<uint64_t>(n), k));
    DUO_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&plan.c, CUDA_R_16BF, static_cast<uint64_t>(m),
                                                static_cast<uint64_t>(n), m));
    cublasLtMatmulPreference_t pref = nullptr;
    DUO_CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&pref));
    const uint64_t wsb = static_cast<uint64_t>(workspace_bytes_);
    DUO_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(
        pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &wsb, sizeof(wsb)));
    const uint32_t al_a = static_cast<uint32_t>(aw), al_b = static_cast<uint32_t>(ax),
                   al_c = static_cast<uint32_t>(ao);
    DUO_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(
        pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &al_a, sizeof(al_a)));
    DUO_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(
        pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &al_b, sizeof(al_b)));
    DUO_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(
        pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &al_c, sizeof(al_c)));
    DUO_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(
        pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &al_c, sizeof(al_c)));
    // DUO_GEMM_REDUCTION=MASK (cublasLtReductionScheme_t bits; 0 = no split-K): a tuning knob.
    if (const char* e = std::getenv("DUO_GEMM_REDUCTION"); e != nullptr) {
      const uint32_t mask = static_cast<uint32_t>(std::atoi(e));
      DUO_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(
          pref, CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK, &mask, sizeof(mask)));
    }
    cublasLtMatmulHeuristicResult_t result{};
    int found = 0;
    const cublasStatus_t st = cublasLtMatmulAlgoGetHeuristic(lt_, plan.desc, plan.a, plan.b, plan.c,
                                                             plan.c, pref, 1, &result, &found);
    (void)cublasLtMatmulPreferenceDestroy(pref);
    if (st == CUBLAS_STATUS_SUCCESS && found > 0 && result.state == CUBLAS_STATUS_SUCCESS) {
      plan.algo = result.algo;
      plan.have_algo = true;
      if (const char* e = std::getenv("DUO_GEMM_INFO"); e != nullptr && e[0] == '1')
        print_algo(n, m, k, plan.algo);
    }
    return plans_.emplace(key, plan).first->second;
  }
  // One line per new GEMM plan (DUO_GEMM_INFO=1): which cuBLASLt configuration runs it.
  static void print_algo(int64_t n, int64_t m, int64_t k, const cublasLtMatmulAlgo_t& algo) {
    auto get = [&](cublasLtMatmulAlgoConfigAttributes_t attr) {
      uint32_t v = 0;
      size_t written = 0;
      (void)cublasLtMatmulAlgoConfigGetAttribute(&algo, attr, &v, sizeof(v), &written);
      return v;
    };
    std::fprintf(stderr,
                 "gemm %lld x %lld x %lld: algo %u tile %u stages %u split-k %u reduction %u "
                 "swizzle %u cluster %u\n",
                 static_cast<long long>(n), static_cast<long long>(m), static_cast<long long>(k),
                 get(CUBLASLT_ALGO_CONFIG_ID), get(CUBLASLT_ALGO_CONFIG_TILE_ID),
                 get(CUBLASLT_ALGO_CONFIG_STAGES_ID), get(CUBLASLT_ALGO_CONFIG_SPLITK_NUM),
                 get(CUBLASLT_ALGO_CONFIG_REDUCTION_SCHEME),
                 get(CUBLASLT_ALGO_CONFIG_CTA_SWIZZLING),
                 get(CUBLASLT_ALGO_CONFIG_CLUSTER_SHAPE_ID));
  }
  static void destroy_plan(GemmPlan& p) {
    if (p.a) (void)cublasLtMatrixLayoutDestroy(p.a);
    if (p.b) (void)cublasLtMatrixLayoutDestroy(p.b);
    if (p.c) (void)cublasLtMatrixLayoutDestroy(p.c);
    if (p.desc) (void)cublasLtMatmulDescDestroy(p.desc);
  }

  int device_;
  DeviceMemory mem_;  // declared before everything that allocates from it
  std::string name_;
  int num_sms_ = 0;
  cudaStream_t stream_ = nullptr;
  cublasLtHandle_t lt_ = nullptr;
  void* workspace_ = nullptr;
  int64_t workspace_bytes_ = 0;
  bool naive_attention_ = false;
  std::vector<void*> owned_;
  Scratch staging_, tokens_buf_, positions_buf_, inv_freq_buf_, attn_workspace_, argmax_buf_;
  PinnedBuffer tokens_pinned_, positions_pinned_, inv_freq_pinned_, download_pinned_,
      argmax_pinned_;
  DecodeCapture* capture_ = nullptr;  // set while a decode step is recorded
  int64_t buffer_epoch_ = 0;          // bumped whenever a scratch buffer moves
  std::vector<float> inv_freq_host_;
  std::vector<int64_t> positions_host_;
  std::map<std::tuple<int64_t, int64_t, int64_t, int, int, int, bool>, GemmPlan> plans_;
};

// A captured decode step: the instantiated graph plus its DecodeInputs (device) and their pinned
// host mirror. Replay = one small host-to-device copy + one graph launch.
class CudaDecodeGraph final : public DecodeGraph {
 public:
  CudaDecodeGraph(CudaBackend& b, const CudaKVCache& cache)
      : b_(&b), cache_serial_(cache.serial()) {
    device_ = static_cast<DecodeInputs*>(b.mem_.alloc(sizeof(DecodeInputs), "decode graph inputs"));
  }
  ~CudaDecodeGraph() override {
    (void)cudaStreamSynchronize(b_->stream_);  // a replay may still read the inputs
    if (exec_ != nullptr) (void)cudaGraphExecDestroy(exec_);
    b_->mem_.free(device_);
  }

  bool usable_for(const KVCache& cache, const RopeFrequencies& f) const override {
    const auto* c = dynamic_cast<const CudaKVCache*>(&cache);
    return c != nullptr && c->serial() == cache_serial_ && b_->buffer_epoch_ == epoch_ &&
           (info_.rope_freqs < 0 || (static_cast<int64_t>(f.inv_freq.size()) == info_.rope_freqs &&
                                     f.attention_scaling == info_.attention_scaling));
  }

  void replay(int32_t token, const KVCache& cache, const RopeFrequencies& f) override {
    check(usable_for(cache, f),
          "decode graph: replayed for a cache or RoPE setting it was not "
          "captured for");
    check(token >= 0 && token < info_.vocab, "token id ", token, " is outside the vocabulary of ",
          info_.vocab);
    const int64_t pos = cache.length();
    check(pos + 1 <= cache.spec().capacity, "context length exceeded: ", pos + 1,
          " tokens, but the cache holds ", cache.spec().capacity, " (raise -c)");
    auto* h = static_cast<DecodeInputs*>(inputs_pinned_.acquire(sizeof(DecodeInputs)));
    h->position = pos;
    h->token = token;
    h->pad = 0;
    const int64_t nf = std::max<int64_t>(info_.rope_freqs, 0);
    std::copy(f.inv_freq.begin(), f.inv_freq.begin() + nf, h->inv_freq);
    const size_t bytes = offsetof(DecodeInputs, inv_freq) + static_cast<size_t>(nf) * sizeof(float);
    DUO_CUDA_CHECK(cudaMemcpyAsync(device_, h, bytes, cudaMemcpyHostToDevice, b_->stream_));
    inputs_pinned_.used_by(b_->stream_);
    DUO_CUDA_CHECK(cudaGraphLaunch(exec_, b_->stream_));
  }

  // Records `step` on the backend's stream (relaxed capture mode: nothing else runs there).
  void capture(const KVCache& cache, const std::function<void()>& step) {
    info_.cache = &cache;
    info_.device = device_;
    b_->capture_ = &info_;
    DUO_CUDA_CHECK(cudaStreamBeginCapture(b_->stream_, cudaStreamCaptureModeRelaxed));
    cudaGraph_t graph = nullptr;
    try {
      step();
    } catch (...) {
      b_->capture_ = nullptr;
      if (cudaStreamEndCapture(b_->stream_, &graph) == cudaSuccess && graph != nullptr)
        (void)cudaGraphDestroy(graph);
      (void)cudaGetLastError();
      throw;
    }
    b_->capture_ = nullptr;
    DUO_CUDA_CHECK(cudaStreamEndCapture(b_->stream_, &graph));
    if (const char* env = std::getenv("DUO_GRAPH_NODES"); env != nullptr && env[0] == '1') {
      try {
        print_graph_nodes(graph);
      } catch (...) {
        (void)cudaGraphDestroy(graph);
        throw;
      }
    }
    const cudaError_t e = cudaGraphInstantiate(&exec_, graph, 0);
    (void)cudaGraphDestroy(graph);
    DUO_CUDA_CHECK(e);
    check(info_.vocab > 0, "decode graph capture: the step did not embed its token");
    epoch_ = b_->buffer_epoch_;
  }

 private:
  CudaBackend* b_;
  uint64_t cache_serial_;
  DecodeInputs* device_ = nullptr;
  PinnedBuffer inputs_pinned_;
  DecodeCapture info_;
  cudaGraphExec_t exec_ = nullptr;
  int64_t epoch_ = -1;
};

std::unique_ptr<DecodeGraph> CudaBackend::capture_decode_step(KVCache& cache,
                                                              const std::function<void()>& step) {
  check(capture_ == nullptr, "decode graph capture: already capturing");
  auto g = std::make_unique<CudaDecodeGraph>(*this, static_cast<CudaKVCache&>(cache));
  g->capture(cache, step);
  return g;
}

}  // namespace

std::unique_ptr<Backend> make_cuda_backend(int device) {
  return std::make_unique<CudaBackend>(device);
}

namespace cuda {

int device_count() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  return count;
}

std::string device_name(int device) {
  cudaDeviceProp prop{};
  DUO_CUDA_CHECK(cudaGetDeviceProperties(&prop, device));
  return prop.name;
}

int64_t device_memory_used(int device) {
  int prev = 0;
  if (cudaGetDevice(&prev) != cudaSuccess) return -1;
  if (cudaSetDevice(device) != cudaSuccess) return -1;
  size_t free_b = 0, total_b = 0;
  const cudaError_t e = cudaMemGetInfo(&free_b, &total_b);
  (void)cudaSetDevice(prev);
  if (e != cudaSuccess) return -1;
  return static_cast<int64_t>(total_b - free_b);
}

}  // namespace cuda
}  // namespace duo
