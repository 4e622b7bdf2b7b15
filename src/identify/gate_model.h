// A frozen Llama-family decoder (llama, mistral, qwen2) on the host for the gate optimisation of
// duoattention.md section 4: weights in the checkpoint's ORIGINAL head order (q/k/v biases and the
// o_proj bias when configured, tied embeddings), a teacher pass with full attention and a student
// pass whose attention output per query head (before o_proj) is
//   a[l, g] * O_full_teacher + (1 - a[l, g]) * O_stream_student,
// with the backward of the distillation loss to the gates.
//
// Loss (section 4): mean over labelled rows t >= label_begin of the mean over hidden channels of
// (h_student - h_teacher)^2 on the FINAL normed hidden states (no LM head, labels not shifted).
// The regulariser (reg * mean|a|) is added by gate_objective.
//
// Memory: the teacher keeps O_full for every layer, n * L * nq * d scalars (demo MHA model: 8
// layers x 256 = 2048 floats = 8 KiB per token, 16 MiB at 2K tokens, 256 MiB at 32K), plus the
// final hidden states (n * H). The student stores only each layer's input (n * L * H) and
// recomputes a layer's activations from it in the backward (one layer's activations live at a time:
// about n * (5 H + 4 nq d + 3 I) scalars).
#pragma once

#include <cstdint>
#include <filesystem>
#include <span>
#include <vector>

#include "identify/gate_ops.h"
#include "model/config.h"

namespace duo::gate {

template <class T>
struct GateLayerWeights {
  std::vector<T> ln1, wq, wk, wv, wo, bq, bk, bv, bo;  // biases empty when absent
  std::vector<T> ln2, w_gate, w_up, w_down;
};

template <class T>
struct TeacherPass {
  int64_t n = 0;
  std::vector<std::vector<T>> o_full;  // per layer [n, nq * d], before o_proj
  std::vector<T> final_hidden;         // [n, H], after the final RMSNorm
};

struct StudentResult {
  double distill = 0;          // the distillation loss
  std::vector<double> d_gate;  // d distill / d a, [L * nkv] (empty without backward)
};

template <class T>
class GateModel {
 public:
  explicit GateModel(const std::filesystem::path& model_dir);

  const ModelConfig& config() const { return config_; }
  int64_t num_gates() const { return config_.num_layers * config_.num_kv_heads; }

  // Full attention everywhere; keeps O_full per layer and the final normed hidden states.
  TeacherPass<T> teacher(std::span<const int32_t> ids) const;

  // The student with gates a [L * nkv] (row-major layer, KV head) and streaming window `w`;
  // returns the distillation loss against the teacher and, when `backward`, its gradient.
  StudentResult student(std::span<const int32_t> ids, const TeacherPass<T>& teacher,
                        const std::vector<double>& gates, int64_t label_begin, const AttnWindow& w,
                        bool backward = true) const;

  // Final normed hidden states of the student (for tests).
  std::vector<T> student_hidden(std::span<const int32_t> ids, const TeacherPass<T>& teacher,
                                const std::vector<double>& gates, const AttnWindow& w) const;

  // LM-head logits [n, vocab] of final hidden states (for parity tests).
  std::vector<T> logits(const std::vector<T>& final_hidden) const;

 private:
  struct Acts;
  void rope_tables(int64_t n, std::vector<T>& cos, std::vector<T>& sin) const;
  // One decoder layer from x_in [n, H] to x_out; teacher mode when o_full_in is null (full
  // attention; output copied to o_full_out when given), else the gate mix with layer gates `a`.
  void layer_forward(int64_t l, const T* x_in, int64_t n, const std::vector<T>& cos,
                     const std::vector<T>& sin, const AttnWindow& w, const T* o_full_in,
                     const double* a, Acts& acts, T* x_out) const;
  std::vector<T> embed(std::span<const int32_t> ids) const;

  ModelConfig config_;
  std::vector<T> embed_, final_norm_, lm_head_;  // lm_head_ empty when tied
  std::vector<GateLayerWeights<T>> layers_;
};

// distill + reg * mean(|a|) and its gradient (d|a|/da = sign(a), 0 at 0, as torch).
double gate_objective(const StudentResult& r, const std::vector<double>& gates, double reg,
                      std::vector<double>* grad);

extern template class GateModel<float>;
extern template class GateModel<double>;

}  // namespace duo::gate
