// The gate optimisation of duoattention.md section 4 on one GPU: the same teacher / student /
// loss / gate-gradient semantics as the host GateModel<float> (identify/gate_model.h), behind the
// trainer's GateEngine interface. Plain C++ header (no CUDA includes).
//
// Precision (GatePrecision::kBf16, the default):
//   - the large matrices (embedding, q/k/v/o, gate/up/down) are bf16 on the device: Llama-3-8B
//     then needs 15 GB instead of 30 GB, and the GEMMs run on tensor cores;
//   - GEMMs take bf16 inputs (the fp32 activation rounded to bf16: by the kernel that makes it
//     when the GEMM is its only consumer, else by a conversion just before the product) and
//     accumulate and write fp32;
//   - the student's windowed attention (exact and block windows, head_dim 64 or 128) runs on
//     tensor cores: q/k/v in bf16 (RoPE and the v projection write them so), P and dS rounded to
//     bf16 as mma inputs, fp32 accumulation; its O, lse and gradients are fp32. Other head sizes
//     and windows (or tensor_core_attention = false) use the fp32 kernels;
//   - everything else is fp32 on fp32 activations: the residual stream and the layer inputs kept
//     for the backward, norms, RoPE, SwiGLU, the gate mix and all gradients; the loss and the
//     gate gradient are reduced in fp64 in a fixed order;
//   - the teacher's full causal attention runs on the bf16 tensor-core prefill kernel of
//     cuda/attention.h (all heads retrieval; O(n) memory), and its output O_full is stored per
//     layer in bf16 (it is also the o_proj GEMM's bf16 input, so at gates = 1 the student
//     reproduces the teacher exactly and the loss is 0).
// GatePrecision::kF32 keeps weights, GEMMs (no TF32) and the teacher's attention (the fp32
// window kernel with the full causal window) in fp32: the tests use it to check the algorithm
// tightly against the host model; it needs twice the memory and is much slower.
//
// Memory (n tokens, L layers, H hidden, I intermediate, qd = heads * head_dim, kd = KV heads *
// head_dim; bf16 mode): weights (no LM head; the loss is on hidden states) + layer inputs
// (L + 1) n H fp32 + teacher O_full L n qd bf16 + teacher final hidden n H fp32 + ONE layer's
// activations, recomputed per layer in the backward (n (7 H + 3 qd + 4 kd + 3 I) fp32 plus n
// (max(H, qd, I) + I) bf16 for the GEMM inputs). Llama-3-8B at 32K: 15 + 17.7 + 8.6 + 0.5 + about
// 12 GB. Buffers grow to the largest n seen and are reused. With KeepActivations::kAuto, a pool
// takes what else is free (less a margin) and the student forward keeps as many layers'
// activations there as fit (160 KB per token and layer for Llama-3-8B: all 31 recomputed layers
// up to about 5K tokens beside the 32K buffers on an 80 GB card); the backward does not
// recompute those.
#pragma once

#include <cstdint>
#include <filesystem>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "identify/gate_engine.h"
#include "model/config.h"

namespace duo::cuda {

enum class GatePrecision { kBf16, kF32 };

// Whether the backward reads layers' activations from the student forward instead of
// recomputing them layer by layer (the same numbers either way; it trades memory for time).
enum class KeepActivations {
  kAuto,  // as many layers as fit in free device memory (all of them for short contexts)
  kOff,   // always recompute
  kOn,    // keep every layer (fails when out of memory)
};

struct GateCudaOptions {
  GatePrecision precision = GatePrecision::kBf16;
  int device = 0;
  // In kBf16, the student's windowed attention on tensor cores (gate_kernels.h
  // window_attention_tc_*) for the exact and block windows at head_dim 64 or 128; false keeps
  // the fp32 kernels there too.
  bool tensor_core_attention = true;
  KeepActivations keep_activations = KeepActivations::kAuto;
  // An upper bound on the kept activations' pool in bytes (0: none): kOn with a bound keeps as
  // many layers as fit in it.
  int64_t keep_pool_limit = 0;

  // The defaults, overridden by DUO_GATE_TC=0|1 (tensor_core_attention) and DUO_GATE_KEEP=0|1|auto
  // (keep_activations): the command line's way to time the alternatives.
  static GateCudaOptions from_env();
};

class CudaGateModel final : public gate::GateEngine {
 public:
  // Weights from a Hugging Face checkpoint directory.
  explicit CudaGateModel(const std::filesystem::path& model_dir, GateCudaOptions o = {});
  // Random weights from a config alone (engine/random_fill.h, the engine's scheme: N(0, 0.02^2)
  // for matrices and biases, norms 1), for timing.
  CudaGateModel(const ModelConfig& config, uint64_t seed, GateCudaOptions o = {});
  ~CudaGateModel() override;

  const ModelConfig& config() const override;
  std::string device() const override;
  void teacher(std::span<const int32_t> ids) override;
  gate::StudentResult student(std::span<const int32_t> ids, const std::vector<double>& gates,
                              int64_t label_begin, const gate::AttnWindow& w,
                              bool backward) override;
  int64_t peak_device_bytes() const override;
  void reset_peak() override;

  // How the last student pass with a backward ran: whether the windowed attention ran on tensor
  // cores, and how many layers the backward read from the forward instead of recomputing them
  // (of L - 1: the last layer is never recomputed). The pool those layers are carved from.
  bool last_used_tensor_cores() const;
  int64_t last_kept_layers() const;
  int64_t kept_pool_bytes() const;

  // For tests: the teacher's final normed hidden states [n, H] and the student's.
  std::vector<float> teacher_hidden() const;
  std::vector<float> student_hidden(std::span<const int32_t> ids, const std::vector<double>& gates,
                                    const gate::AttnWindow& w);
  // Bytes the model holds now (weights + buffers).
  int64_t device_bytes_in_use() const;

  // Device time per op class and pass, for `duo identify --profile-contexts`: while on, a CUDA
  // event is recorded on the model's stream wherever the op class changes (none when off, the
  // default), and the time to the next event is added to that class. Seconds accumulate over
  // passes until reset_op_times().
  struct OpTime {
    std::string op;
    double seconds[4];  // teacher, student forward, backward recomputation, backward gradients
  };
  static constexpr const char* kPassNames[4] = {"teacher", "student_forward", "recompute",
                                                "backward"};
  void set_op_timing(bool on);
  std::vector<OpTime> op_times() const;
  void reset_op_times();

  struct Impl;

 private:
  std::unique_ptr<Impl> impl_;
};

// Windowed attention on the device for tests (gate_kernels.h): fp32 host arrays in and out.
void gate_window_attention_forward(const std::vector<float>& Q, const std::vector<float>& K,
                                   const std::vector<float>& V, int64_t n, int nq, int nkv, int d,
                                   const gate::AttnWindow& w, std::vector<float>& O,
                                   std::vector<float>& lse);
void gate_window_attention_backward(const std::vector<float>& Q, const std::vector<float>& K,
                                    const std::vector<float>& V, const std::vector<float>& O,
                                    const std::vector<float>& lse, const std::vector<float>& dO,
                                    int64_t n, int nq, int nkv, int d, const gate::AttnWindow& w,
                                    std::vector<float>& dQ, std::vector<float>& dK,
                                    std::vector<float>& dV);

// The tensor-core kernels (window_attention_tc_*) the same way: Q, K, V and dO are rounded to
// bf16 on the device (give bf16-representable values to compare with the fp32 kernels exactly).
void gate_window_attention_tc_forward(const std::vector<float>& Q, const std::vector<float>& K,
                                      const std::vector<float>& V, int64_t n, int nq, int nkv,
                                      int d, const gate::AttnWindow& w, std::vector<float>& O,
                                      std::vector<float>& lse);
void gate_window_attention_tc_backward(const std::vector<float>& Q, const std::vector<float>& K,
                                       const std::vector<float>& V, const std::vector<float>& O,
                                       const std::vector<float>& lse, const std::vector<float>& dO,
                                       int64_t n, int nq, int nkv, int d, const gate::AttnWindow& w,
                                       std::vector<float>& dQ, std::vector<float>& dK,
                                       std::vector<float>& dV);

}  // namespace duo::cuda
