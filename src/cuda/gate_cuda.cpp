// CudaGateModel (see gate_cuda.h): host side. The layer maths mirrors identify/gate_model.cpp
// line by line (same order of operations, same recomputation in the backward); kernels are in
// gate_kernels.cu, GEMMs go through cublasGemmEx (bf16 or fp32 inputs, fp32 output and
// accumulation), the teacher's attention through cuda/attention.h.
#include "cuda/gate_cuda.h"

#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <map>
#include <string>
#include <type_traits>

#include "core/error.h"
#include "cuda/attention.h"
#include "cuda/attention_naive.h"
#include "cuda/cuda_check.h"
#include "cuda/device_memory.h"
#include "cuda/gate_kernels.h"
#include "engine/random_fill.h"
#include "engine/rope.h"
#include "model/safetensors.h"

#define GATE_CUBLAS_CHECK(call)                                                                  \
  do {                                                                                           \
    cublasStatus_t st_ = (call);                                                                 \
    if (st_ != CUBLAS_STATUS_SUCCESS)                                                            \
      ::duo::fail(#call, " failed: ", cublasGetStatusString(st_), " (", __FILE__, ":", __LINE__, \
                  ")");                                                                          \
  } while (0)

namespace duo::cuda {

namespace gk = gate_kernels;
using bf16 = __nv_bfloat16;

namespace {

// Op classes of the per-op timing (CudaGateModel::set_op_timing).
enum Op : int {
  kGemm,
  kConvert,
  kNorm,
  kRope,
  kSwiglu,
  kResidual,
  kWindowFwd,
  kWindowBwd,
  kTeacherAttn,
  kMix,
  kLoss,
  kOpCount
};
constexpr const char* kOpNames[kOpCount] = {"gemm (cuBLAS, bf16 in, fp32 out)",
                                            "f32->bf16 conversions",
                                            "rmsnorm fwd/bwd",
                                            "rope fwd/bwd",
                                            "swiglu fwd/bwd",
                                            "embed, residual add, bias",
                                            "window attention fwd",
                                            "window attention bwd",
                                            "teacher attention",
                                            "gate mix fwd/bwd",
                                            "loss and copies"};
enum Pass : int { kTeacher, kStudent, kRecompute, kBackward, kPassCount };

// Events on the stream at every change of op class; elapsed times are summed per (pass, op) at
// the next synchronisation point (collect). Events are pooled and reused.
class OpTimer {
 public:
  ~OpTimer() {
    for (cudaEvent_t e : pool_) (void)cudaEventDestroy(e);
  }
  bool on = false;
  // From here until the next mark, the stream runs op `op` of pass `pass` (op < 0: not counted).
  void mark(int pass, int op, cudaStream_t st) {
    if (!on) return;
    const int tag = op < 0 ? -1 : pass * kOpCount + op;
    if (!tags_.empty() && tags_.back() == tag) return;
    if (tags_.size() == pool_.size()) {
      cudaEvent_t e = nullptr;
      DUO_CUDA_CHECK(cudaEventCreate(&e));
      pool_.push_back(e);
    }
    DUO_CUDA_CHECK(cudaEventRecord(pool_[tags_.size()], st));
    tags_.push_back(tag);
  }
  // After the stream is synchronised (the last mark should be op -1).
  void collect() {
    for (size_t i = 0; i + 1 < tags_.size(); ++i) {
      if (tags_[i] < 0) continue;
      float ms = 0;
      DUO_CUDA_CHECK(cudaEventElapsedTime(&ms, pool_[i], pool_[i + 1]));
      seconds[tags_[i]] += ms * 1e-3;
    }
    tags_.clear();
  }
  double seconds[static_cast<int>(kPassCount) * static_cast<int>(kOpCount)] = {};

 private:
  std::vector<cudaEvent_t> pool_;
  std::vector<int> tags_;
};

gk::Window to_device_window(const gate::AttnWindow& w) {
  gk::Window d;
  d.kind = w.kind == gate::WindowKind::kFull ? 0 : (w.kind == gate::WindowKind::kExact ? 1 : 2);
  d.sink = w.sink;
  d.recent = w.recent;
  d.block = w.block;
  return d;
}

}  // namespace

struct CudaGateModel::Impl {
  ModelConfig c;
  GateCudaOptions opt;
  bool wb = true;  // weights (and O_full, GEMM inputs) in bf16
  std::string name;
  cudaStream_t st = nullptr;
  cublasHandle_t blas = nullptr;
  DeviceMemory mem{"gate model"};

  struct Layer {
    float *ln1 = nullptr, *ln2 = nullptr, *bq = nullptr, *bk = nullptr, *bv = nullptr,
          *bo = nullptr;
    void *wq = nullptr, *wk = nullptr, *wv = nullptr, *wo = nullptr, *wg = nullptr, *wu = nullptr,
         *wd = nullptr;
  };
  void* embed = nullptr;
  float* final_norm = nullptr;
  std::vector<Layer> layers;

  // Buffers sized for `cap` tokens.
  int64_t cap = 0;
  float* xs = nullptr;       // [(L + 1)][cap H] layer inputs
  void* ofull = nullptr;     // [L][cap qd] teacher attention output (weight type)
  float* t_final = nullptr;  // [cap H]
  // One layer's activations that the backward reads (the other buffers are temporaries). q/k/v
  // are fp32 for the fp32 attention kernels; the teacher in bf16 mode and the tensor-core student
  // use qb/kb/vb, and q/k are then only the projections before RoPE.
  struct Acts {
    float *inv1 = nullptr, *q = nullptr, *k = nullptr, *v = nullptr, *attn = nullptr,
          *lse = nullptr, *x1 = nullptr, *inv2 = nullptr, *g = nullptr, *u = nullptr;
    bf16 *qb = nullptr, *kb = nullptr, *vb = nullptr;
  };
  Acts cur;  // in the per-n buffers: the teacher, the last layer and every recomputed layer
  // The first kept.size() layers of the student forward when the backward keeps them instead of
  // recomputing: carved per pass from one pool (keep_for).
  std::vector<Acts> kept;
  void* pool = nullptr;
  int64_t pool_bytes = 0;
  float *xn1 = nullptr, *mix = nullptr, *xn2 = nullptr, *act = nullptr, *y = nullptr,
        *invf = nullptr, *dx = nullptr, *dxn = nullptr, *dq = nullptr, *dk = nullptr, *dv = nullptr,
        *dt = nullptr, *cosb = nullptr, *sinb = nullptr;
  // GEMM input in bf16 [cap max(H, qd, I)]; also the tensor-core attention backward's dO.
  bf16* conv = nullptr;
  bf16* conv2 = nullptr;  // a second one [cap I]: the SwiGLU backward writes d gate and d up
  bf16 *store_k = nullptr, *store_v = nullptr;
  void* tc_ws = nullptr;  // the tensor-core attention backward's workspace
  int64_t tc_ws_bytes = 0;
  bool last_tc = false;
  int64_t last_kept = 0;
  int32_t* ids = nullptr;
  double *row_loss = nullptr, *total = nullptr, *partial = nullptr, *dgate = nullptr;
  float* gates = nullptr;
  std::vector<void*> per_n;
  int64_t rope_n = -1;  // the n the rope tables hold
  int64_t teacher_n = 0;
  OpTimer timer;
  int pass = kTeacher;
  void op(int o) { timer.mark(pass, o, st); }

  ~Impl() {
    if (st != nullptr) (void)cudaStreamSynchronize(st);
    if (blas != nullptr) (void)cublasDestroy(blas);
    if (st != nullptr) (void)cudaStreamDestroy(st);
  }

  void init(GateCudaOptions o) {
    opt = o;
    wb = o.precision == GatePrecision::kBf16;
    int count = 0;
    const cudaError_t e = cudaGetDeviceCount(&count);
    if (e != cudaSuccess || count == 0) {
      (void)cudaGetLastError();
      fail("--backend cuda: no CUDA device available");
    }
    check(o.device >= 0 && o.device < count, "CUDA device ", o.device, " does not exist");
    DUO_CUDA_CHECK(cudaSetDevice(o.device));
    cudaDeviceProp prop{};
    DUO_CUDA_CHECK(cudaGetDeviceProperties(&prop, o.device));
    name = prop.name;
    DUO_CUDA_CHECK(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
    GATE_CUBLAS_CHECK(cublasCreate(&blas));
    GATE_CUBLAS_CHECK(cublasSetStream(blas, st));
    // Plain fp32 GEMMs stay fp32 (no TF32): kF32 is the exact mode.
    GATE_CUBLAS_CHECK(cublasSetMathMode(blas, CUBLAS_DEFAULT_MATH));
    const ModelConfig& m = c;
    check(!m.mlp_bias, "mlp_bias is not supported by the gate trainer");
    check(!m.sliding_window.has_value(),
          "sliding-window models are not supported by the gate trainer");
    check(m.head_dim % 4 == 0 && m.num_heads % m.num_kv_heads == 0,
          "gate model: unsupported head layout");
  }

  int64_t wbytes() const { return wb ? 2 : 4; }
  cudaDataType_t wtype() const { return wb ? CUDA_R_16BF : CUDA_R_32F; }

  float* falloc(int64_t count, const char* what) {
    return static_cast<float*>(mem.alloc(count * 4, what));
  }
  // A matrix in the weight type from host fp32 (converted on the device).
  void* upload_matrix(const std::vector<float>& h, const char* what) {
    const int64_t n = static_cast<int64_t>(h.size());
    void* dst = mem.alloc(n * wbytes(), what);
    if (!wb) {
      DUO_CUDA_CHECK(
          cudaMemcpyAsync(dst, h.data(), static_cast<size_t>(n) * 4, cudaMemcpyHostToDevice, st));
      DUO_CUDA_CHECK(cudaStreamSynchronize(st));
      return dst;
    }
    float* tmp = falloc(n, "weight staging");
    DUO_CUDA_CHECK(
        cudaMemcpyAsync(tmp, h.data(), static_cast<size_t>(n) * 4, cudaMemcpyHostToDevice, st));
    gk::f32_to_bf16(tmp, static_cast<bf16*>(dst), n, st);
    DUO_CUDA_CHECK(cudaStreamSynchronize(st));
    mem.free(tmp);
    return dst;
  }
  float* upload_vector(const std::vector<float>& h, const char* what) {
    float* dst = falloc(static_cast<int64_t>(h.size()), what);
    DUO_CUDA_CHECK(cudaMemcpyAsync(dst, h.data(), h.size() * 4, cudaMemcpyHostToDevice, st));
    DUO_CUDA_CHECK(cudaStreamSynchronize(st));
    return dst;
  }

  void load_checkpoint(const std::filesystem::path& dir) {
    const WeightStore ws = WeightStore::open(dir);
    const int64_t H = c.hidden_size, I = c.intermediate_size, qd = c.q_dim(), kd = c.kv_dim();
    embed = upload_matrix(ws.load_f32("model.embed_tokens.weight", {c.vocab_size, H}), "embed");
    final_norm = upload_vector(ws.load_f32("model.norm.weight", {H}), "final norm");
    layers.resize(static_cast<size_t>(c.num_layers));
    for (int64_t l = 0; l < c.num_layers; ++l) {
      const std::string p = "model.layers." + std::to_string(l) + ".";
      Layer& w = layers[static_cast<size_t>(l)];
      w.ln1 = upload_vector(ws.load_f32(p + "input_layernorm.weight", {H}), "ln1");
      w.ln2 = upload_vector(ws.load_f32(p + "post_attention_layernorm.weight", {H}), "ln2");
      w.wq = upload_matrix(ws.load_f32(p + "self_attn.q_proj.weight", {qd, H}), "wq");
      w.wk = upload_matrix(ws.load_f32(p + "self_attn.k_proj.weight", {kd, H}), "wk");
      w.wv = upload_matrix(ws.load_f32(p + "self_attn.v_proj.weight", {kd, H}), "wv");
      w.wo = upload_matrix(ws.load_f32(p + "self_attn.o_proj.weight", {H, qd}), "wo");
      if (c.qkv_bias) {
        w.bq = upload_vector(ws.load_f32(p + "self_attn.q_proj.bias", {qd}), "bq");
        w.bk = upload_vector(ws.load_f32(p + "self_attn.k_proj.bias", {kd}), "bk");
        w.bv = upload_vector(ws.load_f32(p + "self_attn.v_proj.bias", {kd}), "bv");
      }
      if (c.o_bias) w.bo = upload_vector(ws.load_f32(p + "self_attn.o_proj.bias", {H}), "bo");
      w.wg = upload_matrix(ws.load_f32(p + "mlp.gate_proj.weight", {I, H}), "w_gate");
      w.wu = upload_matrix(ws.load_f32(p + "mlp.up_proj.weight", {I, H}), "w_up");
      w.wd = upload_matrix(ws.load_f32(p + "mlp.down_proj.weight", {H, I}), "w_down");
    }
  }

  // The engine's random weights (engine/model.cpp load_random): the same tensor order and seeds.
  void load_random(uint64_t seed) {
    uint64_t index = 0;
    auto rand_matrix = [&](int64_t rows, int64_t cols, const char* what) {
      const int64_t n = rows * cols;
      void* p = mem.alloc(n * wbytes(), what);
      const uint64_t s = tensor_seed(seed, index++);
      if (wb)
        gk::fill_normal_bf16(static_cast<bf16*>(p), n, 0.02f, s, st);
      else
        gk::fill_normal_f32(static_cast<float*>(p), n, 0.02f, s, st);
      return p;
    };
    auto rand_vector = [&](int64_t n, const char* what) {
      float* p = falloc(n, what);
      gk::fill_normal_f32(p, n, 0.02f, tensor_seed(seed, index++), st);
      return p;
    };
    auto ones = [&](int64_t n, const char* what) {
      float* p = falloc(n, what);
      gk::fill_f32(p, n, 1.0f, st);
      return p;
    };
    const int64_t H = c.hidden_size, I = c.intermediate_size;
    embed = rand_matrix(c.vocab_size, H, "embed");
    final_norm = ones(H, "final norm");
    if (!c.tie_word_embeddings) ++index;  // the LM head's stream (not needed: loss on hidden)
    layers.resize(static_cast<size_t>(c.num_layers));
    for (auto& w : layers) {
      w.ln1 = ones(H, "ln1");
      w.ln2 = ones(H, "ln2");
      w.wq = rand_matrix(c.q_dim(), H, "wq");
      w.wk = rand_matrix(c.kv_dim(), H, "wk");
      w.wv = rand_matrix(c.kv_dim(), H, "wv");
      w.wo = rand_matrix(H, c.q_dim(), "wo");
      if (c.qkv_bias) {
        w.bq = rand_vector(c.q_dim(), "bq");
        w.bk = rand_vector(c.kv_dim(), "bk");
        w.bv = rand_vector(c.kv_dim(), "bv");
      }
      if (c.o_bias) w.bo = rand_vector(H, "bo");
      w.wg = rand_matrix(I, H, "w_gate");
      w.wu = rand_matrix(I, H, "w_up");
      w.wd = rand_matrix(H, I, "w_down");
    }
    DUO_CUDA_CHECK(cudaStreamSynchronize(st));
  }

  // ---- buffers ----

  template <class P>
  void take(P*& p, int64_t bytes, const char* what) {
    p = static_cast<P*>(mem.alloc(bytes, what));
    per_n.push_back(p);
  }

  void ensure(int64_t n) {
    if (n <= cap) return;
    DUO_CUDA_CHECK(cudaStreamSynchronize(st));
    for (void* p : per_n) mem.free(p);
    per_n.clear();
    drop_pool();  // the per-n buffers first; keep_for() sizes the pool with what is left
    mem.free(tc_ws);
    tc_ws = nullptr;
    tc_ws_bytes = 0;
    teacher_n = 0;
    rope_n = -1;
    const int64_t nc = (n + 511) / 512 * 512;
    const int64_t L = c.num_layers, H = c.hidden_size, I = c.intermediate_size;
    const int64_t qd = c.q_dim(), kd = c.kv_dim(), nq = c.num_heads, half = c.head_dim / 2;
    auto f = [&](float*& p, int64_t count, const char* what) { take(p, count * 4, what); };
    f(xs, (L + 1) * nc * H, "layer inputs");
    take(ofull, L * nc * qd * wbytes(), "teacher attention outputs");
    f(t_final, nc * H, "teacher final hidden");
    if (!wb) f(xn1, nc * H, "xn1");  // bf16 mode: the norm writes the bf16 GEMM input directly
    f(cur.inv1, nc, "inv1");
    f(cur.q, nc * qd, "q");
    f(cur.k, nc * kd, "k");
    f(cur.v, nc * kd, "v");
    f(cur.attn, nc * qd, "attn");
    f(cur.lse, nc * nq, "lse");
    f(mix, nc * qd, "mix");
    f(cur.x1, nc * H, "x1");
    if (!wb) f(xn2, nc * H, "xn2");
    f(cur.inv2, nc, "inv2");
    f(cur.g, nc * I, "gate");
    f(cur.u, nc * I, "up");
    f(act, nc * I, "act");
    f(y, nc * H, "y");
    f(invf, nc, "final inv");
    f(dx, nc * H, "dx");
    f(dxn, nc * H, "dxn");
    f(dq, nc * qd, "dq");
    f(dk, nc * kd, "dk");
    f(dv, nc * kd, "dv");
    f(dt, nc * nq, "attention D");
    f(cosb, nc * half, "rope cos");
    f(sinb, nc * half, "rope sin");
    if (wb) {
      take(conv, nc * std::max({H, qd, I}) * 2, "bf16 GEMM input");
      take(conv2, nc * I * 2, "second bf16 GEMM input");
      take(cur.qb, nc * qd * 2, "q bf16");
      take(cur.kb, nc * kd * 2, "k bf16");
      take(cur.vb, nc * kd * 2, "v bf16");
      take(store_k, nc * kd * 2, "teacher K store");
      take(store_v, nc * kd * 2, "teacher V store");
    }
    take(ids, nc * 4, "token ids");
    take(row_loss, nc * 8, "row loss");
    take(total, 8, "loss");
    take(partial, gk::gate_mix_partial_rows(nc) * nq * 8, "gate partials");
    take(dgate, L * c.num_kv_heads * 8, "d gate");
    take(gates, L * c.num_kv_heads * 4, "gates");
    cap = nc;
  }

  // ---- kept activations (the backward without recomputation) ----

  // Bytes of one kept layer per token: what Acts holds for the backward.
  int64_t kept_bytes_per_token(bool tc) const {
    const int64_t H = c.hidden_size, I = c.intermediate_size, qd = c.q_dim(), kd = c.kv_dim();
    return 4 * (2 + qd + c.num_heads + H + 2 * I) + (tc ? 2 : 4) * (qd + 2 * kd);
  }
  void drop_pool() {
    mem.free(pool);
    pool = nullptr;
    pool_bytes = 0;
    kept.clear();
  }
  // How many of layers 0..L-2 the student pass over n tokens keeps for its backward (the others
  // are recomputed there), and their activation sets carved from the pool. The pool grows to what
  // all L - 1 layers need at n, or with kAuto to what is free less a margin for what a step
  // allocates besides (cuBLAS, the attention workspace, the driver): max(1 GiB, 3% of the card).
  // It only grows (ensure() drops it before the per-n buffers grow), so after the longest
  // sequence it stays the size that fits beside them and shorter sequences keep more layers.
  int64_t keep_for(int64_t n, bool tc) {
    const int64_t L = c.num_layers;
    kept.clear();
    if (opt.keep_activations == KeepActivations::kOff || L < 2) return 0;
    const int64_t nc = (n + 511) / 512 * 512;
    const int64_t layer_bytes = nc * kept_bytes_per_token(tc);
    int64_t target = (L - 1) * layer_bytes;
    if (target > pool_bytes) {
      if (opt.keep_activations == KeepActivations::kAuto) {
        size_t free_b = 0, total_b = 0;
        DUO_CUDA_CHECK(cudaMemGetInfo(&free_b, &total_b));
        const int64_t margin =
            std::max<int64_t>(int64_t{1} << 30, static_cast<int64_t>(total_b) / 33);
        // Freeing the pool first gives its bytes back; whole 2 MiB pages.
        target = std::min(target, (static_cast<int64_t>(free_b) + pool_bytes - margin) >> 21 << 21);
      }
      if (opt.keep_pool_limit > 0) target = std::min(target, opt.keep_pool_limit);
      if (target > pool_bytes && target >= layer_bytes) {
        DUO_CUDA_CHECK(cudaStreamSynchronize(st));
        drop_pool();
        pool = mem.alloc(target, "kept layer activations");
        pool_bytes = target;
      }
    }
    const int64_t layers = std::min(L - 1, pool_bytes / layer_bytes);
    const int64_t H = c.hidden_size, I = c.intermediate_size, qd = c.q_dim(), kd = c.kv_dim();
    char* p = static_cast<char*>(pool);
    // Every piece is a multiple of 512 tokens x 2 bytes: the carve keeps 16-byte alignment.
    auto carve = [&](auto*& dst, int64_t count, int64_t elem) {
      dst = reinterpret_cast<std::remove_reference_t<decltype(dst)>>(p);
      p += count * elem;
    };
    kept.assign(static_cast<size_t>(layers), Acts{});
    for (Acts& a : kept) {
      a = cur;  // q/k/v (tensor cores) or qb/kb/vb (fp32 attention) stay the shared temporaries
      carve(a.inv1, nc, 4);
      carve(a.attn, nc * qd, 4);
      carve(a.lse, nc * c.num_heads, 4);
      carve(a.x1, nc * H, 4);
      carve(a.inv2, nc, 4);
      carve(a.g, nc * I, 4);
      carve(a.u, nc * I, 4);
      if (tc) {
        carve(a.qb, nc * qd, 2);
        carve(a.kb, nc * kd, 2);
        carve(a.vb, nc * kd, 2);
      } else {
        carve(a.q, nc * qd, 4);
        carve(a.k, nc * kd, 4);
        carve(a.v, nc * kd, 4);
      }
    }
    return layers;
  }
  // Where layer l of the student pass keeps its activations: its kept set, or the per-n buffers
  // (the last layer, and the layers the backward recomputes).
  Acts& acts(int64_t l) {
    return l < static_cast<int64_t>(kept.size()) ? kept[static_cast<size_t>(l)] : cur;
  }
  // Whether the student's window attention runs on tensor cores.
  bool use_tc(const gk::Window& w) const {
    return wb && opt.tensor_core_attention &&
           gk::window_attention_tc_supported(static_cast<int>(c.head_dim), w);
  }

  void set_ids(std::span<const int32_t> tokens) {
    const int64_t n = static_cast<int64_t>(tokens.size());
    for (int32_t id : tokens)
      check(id >= 0 && id < c.vocab_size, "token id ", id, " outside the vocabulary (",
            c.vocab_size, ")");
    DUO_CUDA_CHECK(cudaMemcpyAsync(ids, tokens.data(), static_cast<size_t>(n) * 4,
                                   cudaMemcpyHostToDevice, st));
    if (rope_n != n) {
      const int64_t half = c.head_dim / 2;
      const RopeFrequencies fr = compute_rope_frequencies(c, n);
      std::vector<float> cs(static_cast<size_t>(n * half)), sn(cs.size());
      for (int64_t t = 0; t < n; ++t)
        rope_cos_sin(fr, t, cs.data() + t * half, sn.data() + t * half);
      DUO_CUDA_CHECK(cudaMemcpyAsync(cosb, cs.data(), cs.size() * 4, cudaMemcpyHostToDevice, st));
      DUO_CUDA_CHECK(cudaMemcpyAsync(sinb, sn.data(), sn.size() * 4, cudaMemcpyHostToDevice, st));
      DUO_CUDA_CHECK(cudaStreamSynchronize(st));  // the host vectors die here
      rope_n = n;
    }
  }

  // ---- GEMMs ----

  // The activation x [count] as a GEMM input: rounded to bf16 in bf16 mode.
  const void* gemm_input(const float* x, int64_t count) {
    if (!wb) return x;
    op(kConvert);
    gk::f32_to_bf16(x, conv, count, st);
    return conv;
  }
  // Where a kernel writes a GEMM input itself: conv in bf16 mode, else the fp32 buffer.
  void* gemm_input_dst(float* f32_buffer) { return wb ? static_cast<void*>(conv) : f32_buffer; }
  // y[n, M] = xin[n, K] W[M, K]^T (+ b); xin in the weight type.
  void gemm_fwd(const void* xin, const void* W, const float* b, int64_t n, int64_t K, int64_t M,
                float* yo) {
    if (n == 0) return;
    gemm_fwd_raw(xin, W, n, K, M, yo, CUDA_R_32F);
    if (b == nullptr) return;
    op(kResidual);
    gk::add_bias(yo, b, n, M, st);
  }
  // The same rounded to bf16 (bf16 mode), for a projection only bf16 consumers read: cuBLAS
  // writes bf16 itself, or with a bias the fp32 product goes to f32_tmp and the bias add rounds.
  void gemm_fwd_bf16(const void* xin, const void* W, const float* b, int64_t n, int64_t K,
                     int64_t M, bf16* yo, float* f32_tmp) {
    if (n == 0) return;
    if (b == nullptr) return gemm_fwd_raw(xin, W, n, K, M, yo, CUDA_R_16BF);
    gemm_fwd_raw(xin, W, n, K, M, f32_tmp, CUDA_R_32F);
    op(kResidual);
    gk::add_bias_bf16(f32_tmp, b, n, M, yo, st);
  }
  void gemm_fwd_raw(const void* xin, const void* W, int64_t n, int64_t K, int64_t M, void* yo,
                    cudaDataType_t ytype) {
    op(kGemm);
    const float one = 1.0f, zero = 0.0f;
    GATE_CUBLAS_CHECK(cublasGemmEx(blas, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(M),
                                   static_cast<int>(n), static_cast<int>(K), &one, W, wtype(),
                                   static_cast<int>(K), xin, wtype(), static_cast<int>(K), &zero,
                                   yo, ytype, static_cast<int>(M), CUBLAS_COMPUTE_32F,
                                   CUBLAS_GEMM_DEFAULT));
  }
  // dx[n, K] (+)= dyin[n, M] W[M, K]; dyin in the weight type.
  void gemm_bwd(const void* dyin, const void* W, int64_t n, int64_t K, int64_t M, float* dxo,
                bool accumulate) {
    if (n == 0) return;
    op(kGemm);
    const float one = 1.0f, beta = accumulate ? 1.0f : 0.0f;
    GATE_CUBLAS_CHECK(cublasGemmEx(blas, CUBLAS_OP_N, CUBLAS_OP_N, static_cast<int>(K),
                                   static_cast<int>(n), static_cast<int>(M), &one, W, wtype(),
                                   static_cast<int>(K), dyin, wtype(), static_cast<int>(M), &beta,
                                   dxo, CUDA_R_32F, static_cast<int>(K), CUBLAS_COMPUTE_32F,
                                   CUBLAS_GEMM_DEFAULT));
  }

  float* x_at(int64_t l) { return xs + l * cap * c.hidden_size; }
  void* ofull_at(int64_t l) { return static_cast<char*>(ofull) + l * cap * c.q_dim() * wbytes(); }

  // Teacher's full causal attention of layer l from the roped q, k and v (cur) into O_full[l].
  void teacher_attention(int64_t l, int64_t n) {
    const int64_t d = c.head_dim;
    op(kTeacherAttn);
    if (!wb) {
      gk::window_attention_forward(cur.q, cur.k, cur.v, n, static_cast<int>(c.num_heads),
                                   static_cast<int>(c.num_kv_heads), static_cast<int>(d),
                                   gk::Window{}, static_cast<float*>(ofull_at(l)), cur.lse, st);
      return;
    }
    // q and k were roped straight into qb and kb, v projected into vb (layer_forward).
    AttentionParams p{};
    p.q = cur.qb;
    p.k_new = cur.kb;
    p.v_new = cur.vb;
    p.out = static_cast<bf16*>(ofull_at(l));
    p.n = n;
    p.p0 = 0;
    p.num_heads = static_cast<int>(c.num_heads);
    p.num_kv_heads = static_cast<int>(c.num_kv_heads);
    p.num_retrieval = static_cast<int>(c.num_kv_heads);  // every head full: the teacher
    p.head_dim = static_cast<int>(d);
    p.scale = 1.0f / std::sqrt(static_cast<float>(d));
    p.retrieval_k = store_k;
    p.retrieval_v = store_v;
    p.capacity = n;
    p.slots = 0;
    p.mode = StreamingMode::kExact;
    p.workspace = nullptr;
    p.workspace_bytes = 0;
    if (d == 64 || d == 128) {
      append_retrieval(p, store_k, store_v, st);
      attention(p, st);
    } else {  // the tensor-core kernel takes 64 or 128; the tiny fixtures use 16
      append_retrieval_naive(p, store_k, store_v, st);
      attention_naive(p, st);
    }
  }

  // One decoder layer (identify/gate_model.cpp layer_forward): teacher when `is_teacher` (full
  // attention into O_full[l]), else the gate mix with the device gates of layer l. The layer's
  // activations go to A. x_out is skipped when null (the backward's recomputation needs
  // everything but the down projection).
  void layer_forward(int64_t l, const float* x_in, int64_t n, bool is_teacher, const gk::Window& w,
                     float* x_out, const Acts& A) {
    const Layer& W = layers[static_cast<size_t>(l)];
    const int64_t H = c.hidden_size, I = c.intermediate_size, qd = c.q_dim(), kd = c.kv_dim();
    const int64_t nq = c.num_heads, nkv = c.num_kv_heads, d = c.head_dim;
    const float eps = static_cast<float>(c.rms_norm_eps);
    // The tensor-core attention (the teacher's in bf16 mode, the student's when use_tc) reads
    // bf16 q/k/v only: RoPE writes q and k in bf16, the v projection writes bf16.
    const bool tc = is_teacher ? wb : use_tc(w);
    // The normed input, the gate mix and the SwiGLU output only feed GEMMs: in bf16 mode their
    // kernels write the bf16 GEMM input (conv) directly.
    op(kNorm);
    gk::rmsnorm_forward(x_in, W.ln1, eps, n, H, gemm_input_dst(xn1), wb, A.inv1, st);
    const void* xin = gemm_input_dst(xn1);
    gemm_fwd(xin, W.wq, W.bq, n, H, qd, A.q);
    gemm_fwd(xin, W.wk, W.bk, n, H, kd, A.k);
    if (tc)
      gemm_fwd_bf16(xin, W.wv, W.bv, n, H, kd, A.vb, A.v);
    else
      gemm_fwd(xin, W.wv, W.bv, n, H, kd, A.v);
    op(kRope);
    if (tc) {
      gk::rope(A.q, cosb, sinb, n, nq, d, 1.0f, A.qb, true, st);
      gk::rope(A.k, cosb, sinb, n, nkv, d, 1.0f, A.kb, true, st);
    } else {
      gk::rope(A.q, cosb, sinb, n, nq, d, 1.0f, A.q, false, st);
      gk::rope(A.k, cosb, sinb, n, nkv, d, 1.0f, A.k, false, st);
    }
    if (is_teacher) {
      teacher_attention(l, n);
      gemm_fwd(ofull_at(l), W.wo, W.bo, n, qd, H, A.x1);  // O_full is the GEMM's input type
    } else {
      op(kWindowFwd);
      if (tc)
        gk::window_attention_tc_forward(A.qb, A.kb, A.vb, n, static_cast<int>(nq),
                                        static_cast<int>(nkv), static_cast<int>(d), w, A.attn,
                                        A.lse, st);
      else
        gk::window_attention_forward(A.q, A.k, A.v, n, static_cast<int>(nq), static_cast<int>(nkv),
                                     static_cast<int>(d), w, A.attn, A.lse, st);
      op(kMix);
      gk::gate_mix_forward(ofull_at(l), wb, A.attn, gates + l * nkv, n, nq, nkv, d,
                           gemm_input_dst(mix), wb, st);
      gemm_fwd(gemm_input_dst(mix), W.wo, W.bo, n, qd, H, A.x1);
    }
    op(kResidual);
    gk::add(A.x1, x_in, n * H, st);
    op(kNorm);
    gk::rmsnorm_forward(A.x1, W.ln2, eps, n, H, gemm_input_dst(xn2), wb, A.inv2, st);
    const void* x2in = gemm_input_dst(xn2);
    gemm_fwd(x2in, W.wg, nullptr, n, H, I, A.g);
    gemm_fwd(x2in, W.wu, nullptr, n, H, I, A.u);
    // The backward's recomputation stops here: its SwiGLU backward works from g and u.
    if (x_out == nullptr) return;
    op(kSwiglu);
    gk::swiglu_forward(A.g, A.u, gemm_input_dst(act), wb, n * I, st);
    gemm_fwd(gemm_input_dst(act), W.wd, nullptr, n, I, H, x_out);
    op(kResidual);
    gk::add(x_out, A.x1, n * H, st);
  }

  void upload_gates(const std::vector<double>& gv) {
    std::vector<float> f(gv.begin(), gv.end());
    DUO_CUDA_CHECK(cudaMemcpyAsync(gates, f.data(), f.size() * 4, cudaMemcpyHostToDevice, st));
    DUO_CUDA_CHECK(cudaStreamSynchronize(st));
  }

  void run_teacher(std::span<const int32_t> tokens) {
    const int64_t n = static_cast<int64_t>(tokens.size());
    check(n > 0, "teacher pass: empty sequence");
    ensure(n);
    set_ids(tokens);
    pass = kTeacher;
    op(kResidual);
    gk::embed(embed, wb, ids, n, c.hidden_size, x_at(0), st);
    for (int64_t l = 0; l < c.num_layers; ++l)
      layer_forward(l, x_at(l), n, true, gk::Window{}, x_at(l + 1), cur);
    op(kNorm);
    gk::rmsnorm_forward(x_at(c.num_layers), final_norm, static_cast<float>(c.rms_norm_eps), n,
                        c.hidden_size, t_final, false, invf, st);
    op(-1);
    DUO_CUDA_CHECK(cudaStreamSynchronize(st));
    timer.collect();
    teacher_n = n;
  }

  // Student forward over all layers; the final normed hidden states land in y. The first
  // kept.size() layers write their activations to their kept sets (keep_for).
  void student_forward(std::span<const int32_t> tokens, const std::vector<double>& gv,
                       const gk::Window& w) {
    const int64_t n = static_cast<int64_t>(tokens.size());
    check(teacher_n == n, "student pass: the teacher ran over ", teacher_n, " tokens, not ", n);
    check(static_cast<int64_t>(gv.size()) == c.num_layers * c.num_kv_heads,
          "student pass: ", gv.size(), " gates for ", c.num_layers, " x ", c.num_kv_heads,
          " KV heads");
    set_ids(tokens);
    upload_gates(gv);
    pass = kStudent;
    op(kResidual);
    gk::embed(embed, wb, ids, n, c.hidden_size, x_at(0), st);
    for (int64_t l = 0; l < c.num_layers; ++l)
      layer_forward(l, x_at(l), n, false, w, x_at(l + 1), acts(l));
    op(kNorm);
    gk::rmsnorm_forward(x_at(c.num_layers), final_norm, static_cast<float>(c.rms_norm_eps), n,
                        c.hidden_size, y, false, invf, st);
  }

  gate::StudentResult run_student(std::span<const int32_t> tokens, const std::vector<double>& gv,
                                  int64_t label_begin, const gate::AttnWindow& aw, bool backward) {
    const int64_t n = static_cast<int64_t>(tokens.size()), H = c.hidden_size, L = c.num_layers;
    const int64_t I = c.intermediate_size, qd = c.q_dim(), kd = c.kv_dim();
    const int64_t nq = c.num_heads, nkv = c.num_kv_heads, d = c.head_dim;
    check(label_begin >= 0 && label_begin < n, "student pass: label_begin ", label_begin,
          " outside [0, ", n, ")");
    const gk::Window w = to_device_window(aw);
    const bool tc = use_tc(w);
    if (backward && tc) {  // before keep_for: it counts what is left
      const int64_t need =
          gk::window_attention_tc_workspace(n, static_cast<int>(nkv), static_cast<int>(d), w);
      if (need > tc_ws_bytes) {
        DUO_CUDA_CHECK(cudaStreamSynchronize(st));
        mem.free(tc_ws);
        tc_ws = mem.alloc(need, "window attention workspace");
        tc_ws_bytes = need;
      }
    }
    // ensure() has run (teacher pass): the per-n buffers are in place before the pool.
    kept.clear();
    const int64_t keep = backward ? keep_for(n, tc) : 0;
    student_forward(tokens, gv, w);
    // Loss and dL/dy (into dxn).
    op(kLoss);
    gk::distill_loss(y, t_final, n, H, label_begin, row_loss, total, dxn, st);
    double loss_sum = 0;
    DUO_CUDA_CHECK(cudaMemcpyAsync(&loss_sum, total, 8, cudaMemcpyDeviceToHost, st));
    op(-1);
    DUO_CUDA_CHECK(cudaStreamSynchronize(st));
    timer.collect();
    gate::StudentResult r;
    r.distill = loss_sum / (static_cast<double>(n - label_begin) * static_cast<double>(H));
    if (!backward) return r;
    last_tc = tc;
    last_kept = keep;
    // dx, the gradient of the residual stream, stays fp32; in bf16 mode the norm backwards that
    // make it also write its bf16 copy for the next GEMM into conv2, which nothing else uses
    // until the SwiGLU backward (the recomputation writes conv).
    const auto dx_gemm_input = [&]() -> const void* { return wb ? static_cast<void*>(conv2) : dx; };
    bf16* const dx_bf16 = wb ? conv2 : nullptr;
    pass = kBackward;
    op(kNorm);
    gk::rmsnorm_backward(x_at(L), final_norm, invf, dxn, n, H, dx, false, dx_bf16, st);
    for (int64_t l = L - 1; l >= 0; --l) {
      const Layer& W = layers[static_cast<size_t>(l)];
      const float* x_in = x_at(l);
      // The last layer's activations are still in the buffers from student_forward (the final
      // norm and the loss write elsewhere), the first `keep` layers' in their kept sets; the
      // others are recomputed into the buffers.
      const Acts& A = acts(l);
      pass = kRecompute;
      if (l != L - 1 && l >= keep) layer_forward(l, x_in, n, false, w, nullptr, A);
      pass = kBackward;
      // MLP: x_out = x1 + down(swiglu(gate(xn2), up(xn2))); dact into act, then dg/du: in place
      // into g/u (fp32 mode) or as the bf16 GEMM inputs conv/conv2 (their only consumers).
      gemm_bwd(dx_gemm_input(), W.wd, n, I, H, act, false);
      void* dg = wb ? static_cast<void*>(conv) : A.g;
      void* du = wb ? static_cast<void*>(conv2) : A.u;
      op(kSwiglu);
      gk::swiglu_backward(A.g, A.u, act, dg, du, wb, n * I, st);
      gemm_bwd(dg, W.wg, n, H, I, dxn, false);
      gemm_bwd(du, W.wu, n, H, I, dxn, true);
      op(kNorm);
      gk::rmsnorm_backward(A.x1, W.ln2, A.inv2, dxn, n, H, dx, true, dx_bf16, st);
      // Attention: x1 = x_in + o_proj(mix); dmix into mix, then d(student attention): in place
      // (fp32 kernels) or rounded to bf16 into conv (tensor cores; free until the rope of dq).
      gemm_bwd(dx_gemm_input(), W.wo, n, qd, H, mix, false);
      op(kMix);
      void* ds = tc ? static_cast<void*>(conv) : mix;
      const int64_t blocks = gk::gate_mix_backward(ofull_at(l), wb, A.attn, gates + l * nkv, mix, n,
                                                   nq, nkv, d, partial, ds, tc, st);
      gk::gate_mix_reduce(partial, blocks, nq, nkv, dgate + l * nkv, st);
      if (l == 0) break;  // nothing upstream of layer 0 is trainable
      op(kWindowBwd);
      if (tc)
        gk::window_attention_tc_backward(A.qb, A.kb, A.vb, A.attn, A.lse, conv, n,
                                         static_cast<int>(nq), static_cast<int>(nkv),
                                         static_cast<int>(d), w, dq, dk, dv, dt, tc_ws, st);
      else
        gk::window_attention_backward(A.q, A.k, A.v, A.attn, A.lse, mix, n, static_cast<int>(nq),
                                      static_cast<int>(nkv), static_cast<int>(d), w, dq, dk, dv, dt,
                                      st);
      // The rotated dq and dk only feed GEMMs: in bf16 mode rope writes the bf16 input (conv).
      // The stream runs in order, so conv is free again once each GEMM has read it.
      op(kRope);
      gk::rope(dq, cosb, sinb, n, nq, d, -1.0f, gemm_input_dst(dq), wb, st);
      gemm_bwd(gemm_input_dst(dq), W.wq, n, H, qd, dxn, false);
      op(kRope);
      gk::rope(dk, cosb, sinb, n, nkv, d, -1.0f, gemm_input_dst(dk), wb, st);
      gemm_bwd(gemm_input_dst(dk), W.wk, n, H, kd, dxn, true);
      gemm_bwd(gemm_input(dv, n * kd), W.wv, n, H, kd, dxn, true);
      op(kNorm);
      gk::rmsnorm_backward(x_in, W.ln1, A.inv1, dxn, n, H, dx, true, dx_bf16, st);
    }
    r.d_gate.resize(static_cast<size_t>(L * nkv));
    op(kLoss);
    DUO_CUDA_CHECK(
        cudaMemcpyAsync(r.d_gate.data(), dgate, r.d_gate.size() * 8, cudaMemcpyDeviceToHost, st));
    op(-1);
    DUO_CUDA_CHECK(cudaStreamSynchronize(st));
    timer.collect();
    return r;
  }

  std::vector<float> download(const float* p, int64_t count) {
    std::vector<float> h(static_cast<size_t>(count));
    DUO_CUDA_CHECK(cudaMemcpyAsync(h.data(), p, h.size() * 4, cudaMemcpyDeviceToHost, st));
    DUO_CUDA_CHECK(cudaStreamSynchronize(st));
    return h;
  }
};

CudaGateModel::CudaGateModel(const std::filesystem::path& model_dir, GateCudaOptions o)
    : impl_(std::make_unique<Impl>()) {
  impl_->c = ModelConfig::load(model_dir);
  impl_->init(o);
  impl_->load_checkpoint(model_dir);
}

CudaGateModel::CudaGateModel(const ModelConfig& config, uint64_t seed, GateCudaOptions o)
    : impl_(std::make_unique<Impl>()) {
  impl_->c = config;
  impl_->init(o);
  impl_->load_random(seed);
}

CudaGateModel::~CudaGateModel() = default;

const ModelConfig& CudaGateModel::config() const {
  return impl_->c;
}
std::string CudaGateModel::device() const {
  return impl_->name;
}
void CudaGateModel::teacher(std::span<const int32_t> ids) {
  impl_->run_teacher(ids);
}
gate::StudentResult CudaGateModel::student(std::span<const int32_t> ids,
                                           const std::vector<double>& gates, int64_t label_begin,
                                           const gate::AttnWindow& w, bool backward) {
  return impl_->run_student(ids, gates, label_begin, w, backward);
}
bool CudaGateModel::last_used_tensor_cores() const {
  return impl_->last_tc;
}
int64_t CudaGateModel::last_kept_layers() const {
  return impl_->last_kept;
}
int64_t CudaGateModel::kept_pool_bytes() const {
  return impl_->pool_bytes;
}
GateCudaOptions GateCudaOptions::from_env() {
  GateCudaOptions o;
  if (const char* e = std::getenv("DUO_GATE_TC")) {
    const std::string v = e;
    check(v == "0" || v == "1", "DUO_GATE_TC: expected 0 or 1, got '", v, "'");
    o.tensor_core_attention = v == "1";
  }
  if (const char* e = std::getenv("DUO_GATE_KEEP")) {
    const std::string v = e;
    check(v == "0" || v == "1" || v == "auto", "DUO_GATE_KEEP: expected 0, 1 or auto, got '", v,
          "'");
    o.keep_activations = v == "0"   ? KeepActivations::kOff
                         : v == "1" ? KeepActivations::kOn
                                    : KeepActivations::kAuto;
  }
  return o;
}
int64_t CudaGateModel::peak_device_bytes() const {
  return impl_->mem.peak();
}
void CudaGateModel::reset_peak() {
  impl_->mem.reset_peak();
}
int64_t CudaGateModel::device_bytes_in_use() const {
  return impl_->mem.in_use();
}
void CudaGateModel::set_op_timing(bool on) {
  impl_->timer.on = on;
}
std::vector<CudaGateModel::OpTime> CudaGateModel::op_times() const {
  std::vector<OpTime> out;
  for (int o = 0; o < kOpCount; ++o) {
    OpTime t{kOpNames[o], {}};
    for (int p = 0; p < kPassCount; ++p) t.seconds[p] = impl_->timer.seconds[p * kOpCount + o];
    out.push_back(t);
  }
  return out;
}
void CudaGateModel::reset_op_times() {
  for (double& x : impl_->timer.seconds) x = 0;
}
std::vector<float> CudaGateModel::teacher_hidden() const {
  check(impl_->teacher_n > 0, "teacher_hidden: no teacher pass yet");
  return impl_->download(impl_->t_final, impl_->teacher_n * impl_->c.hidden_size);
}
std::vector<float> CudaGateModel::student_hidden(std::span<const int32_t> ids,
                                                 const std::vector<double>& gates,
                                                 const gate::AttnWindow& w) {
  impl_->kept.clear();
  impl_->student_forward(ids, gates, to_device_window(w));
  impl_->op(-1);
  std::vector<float> h =
      impl_->download(impl_->y, static_cast<int64_t>(ids.size()) * impl_->c.hidden_size);
  impl_->timer.collect();
  return h;
}

// ---- test entry points for the attention kernels ----

namespace {

struct DevBuf {
  float* p = nullptr;
  explicit DevBuf(size_t count) { DUO_CUDA_CHECK(cudaMalloc(&p, std::max<size_t>(count, 1) * 4)); }
  DevBuf(const std::vector<float>& h) : DevBuf(h.size()) {
    DUO_CUDA_CHECK(cudaMemcpy(p, h.data(), h.size() * 4, cudaMemcpyHostToDevice));
  }
  ~DevBuf() { (void)cudaFree(p); }
  std::vector<float> get(size_t count) const {
    std::vector<float> h(count);
    DUO_CUDA_CHECK(cudaMemcpy(h.data(), p, count * 4, cudaMemcpyDeviceToHost));
    return h;
  }
};

// A host fp32 array on the device in bf16 (rounded to nearest even there).
struct DevBf16 {
  bf16* p = nullptr;
  explicit DevBf16(const std::vector<float>& h) {
    DUO_CUDA_CHECK(cudaMalloc(&p, std::max<size_t>(h.size(), 8) * 2));
    const DevBuf f(h);
    gk::f32_to_bf16(f.p, p, static_cast<int64_t>(h.size()), 0);
    DUO_CUDA_CHECK(cudaDeviceSynchronize());
  }
  ~DevBf16() { (void)cudaFree(p); }
};

}  // namespace

void gate_window_attention_forward(const std::vector<float>& Q, const std::vector<float>& K,
                                   const std::vector<float>& V, int64_t n, int nq, int nkv, int d,
                                   const gate::AttnWindow& w, std::vector<float>& O,
                                   std::vector<float>& lse) {
  DevBuf q(Q), k(K), v(V), o(Q.size()), l(static_cast<size_t>(n * nq));
  gk::window_attention_forward(q.p, k.p, v.p, n, nq, nkv, d, to_device_window(w), o.p, l.p, 0);
  DUO_CUDA_CHECK(cudaDeviceSynchronize());
  O = o.get(Q.size());
  lse = l.get(static_cast<size_t>(n * nq));
}

void gate_window_attention_backward(const std::vector<float>& Q, const std::vector<float>& K,
                                    const std::vector<float>& V, const std::vector<float>& O,
                                    const std::vector<float>& lse, const std::vector<float>& dO,
                                    int64_t n, int nq, int nkv, int d, const gate::AttnWindow& w,
                                    std::vector<float>& dQ, std::vector<float>& dK,
                                    std::vector<float>& dV) {
  DevBuf q(Q), k(K), v(V), o(O), l(lse), g(dO), dq(Q.size()), dk(K.size()), dv(V.size()),
      scratch(static_cast<size_t>(n * nq));
  gk::window_attention_backward(q.p, k.p, v.p, o.p, l.p, g.p, n, nq, nkv, d, to_device_window(w),
                                dq.p, dk.p, dv.p, scratch.p, 0);
  DUO_CUDA_CHECK(cudaDeviceSynchronize());
  dQ = dq.get(Q.size());
  dK = dk.get(K.size());
  dV = dv.get(V.size());
}

void gate_window_attention_tc_forward(const std::vector<float>& Q, const std::vector<float>& K,
                                      const std::vector<float>& V, int64_t n, int nq, int nkv,
                                      int d, const gate::AttnWindow& w, std::vector<float>& O,
                                      std::vector<float>& lse) {
  DevBf16 q(Q), k(K), v(V);
  DevBuf o(Q.size()), l(static_cast<size_t>(n * nq));
  DUO_CUDA_CHECK(cudaMemset(o.p, 0xff, Q.size() * 4));  // NaN: every element must be written
  DUO_CUDA_CHECK(cudaMemset(l.p, 0xff, static_cast<size_t>(n * nq) * 4));
  gk::window_attention_tc_forward(q.p, k.p, v.p, n, nq, nkv, d, to_device_window(w), o.p, l.p, 0);
  DUO_CUDA_CHECK(cudaDeviceSynchronize());
  O = o.get(Q.size());
  lse = l.get(static_cast<size_t>(n * nq));
}

void gate_window_attention_tc_backward(const std::vector<float>& Q, const std::vector<float>& K,
                                       const std::vector<float>& V, const std::vector<float>& O,
                                       const std::vector<float>& lse, const std::vector<float>& dO,
                                       int64_t n, int nq, int nkv, int d, const gate::AttnWindow& w,
                                       std::vector<float>& dQ, std::vector<float>& dK,
                                       std::vector<float>& dV) {
  const gk::Window dw = to_device_window(w);
  DevBf16 q(Q), k(K), v(V), g(dO);
  DevBuf o(O), l(lse), dq(Q.size()), dk(K.size()), dv(V.size()),
      scratch(static_cast<size_t>(n * nq)),
      ws(static_cast<size_t>(gk::window_attention_tc_workspace(n, nkv, d, dw) / 4));
  // NaN-filled outputs: every element must be written.
  DUO_CUDA_CHECK(cudaMemset(dq.p, 0xff, Q.size() * 4));
  DUO_CUDA_CHECK(cudaMemset(dk.p, 0xff, K.size() * 4));
  DUO_CUDA_CHECK(cudaMemset(dv.p, 0xff, V.size() * 4));
  gk::window_attention_tc_backward(q.p, k.p, v.p, o.p, l.p, g.p, n, nq, nkv, d, dw, dq.p, dk.p,
                                   dv.p, scratch.p, ws.p, 0);
  DUO_CUDA_CHECK(cudaDeviceSynchronize());
  dQ = dq.get(Q.size());
  dK = dk.get(K.size());
  dV = dv.get(V.size());
}

}  // namespace duo::cuda
