#include "identify/gate_model.h"

#include <cblas.h>

#include <cmath>
#include <string>

#include "core/error.h"
#include "engine/rope.h"
#include "model/safetensors.h"

namespace duo::gate {

void linear_forward(const float* x, const float* W, const float* b, int64_t n, int64_t K, int64_t M,
                    float* y) {
  if (b)
    for (int64_t t = 0; t < n; ++t) std::copy(b, b + M, y + t * M);
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<int>(n), static_cast<int>(M),
              static_cast<int>(K), 1.0f, x, static_cast<int>(K), W, static_cast<int>(K),
              b ? 1.0f : 0.0f, y, static_cast<int>(M));
}
void linear_forward(const double* x, const double* W, const double* b, int64_t n, int64_t K,
                    int64_t M, double* y) {
  if (b)
    for (int64_t t = 0; t < n; ++t) std::copy(b, b + M, y + t * M);
  cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<int>(n), static_cast<int>(M),
              static_cast<int>(K), 1.0, x, static_cast<int>(K), W, static_cast<int>(K),
              b ? 1.0 : 0.0, y, static_cast<int>(M));
}
void linear_backward_input(const float* dy, const float* W, int64_t n, int64_t K, int64_t M,
                           float* dx, bool accumulate) {
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, static_cast<int>(n), static_cast<int>(K),
              static_cast<int>(M), 1.0f, dy, static_cast<int>(M), W, static_cast<int>(K),
              accumulate ? 1.0f : 0.0f, dx, static_cast<int>(K));
}
void linear_backward_input(const double* dy, const double* W, int64_t n, int64_t K, int64_t M,
                           double* dx, bool accumulate) {
  cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, static_cast<int>(n), static_cast<int>(K),
              static_cast<int>(M), 1.0, dy, static_cast<int>(M), W, static_cast<int>(K),
              accumulate ? 1.0 : 0.0, dx, static_cast<int>(K));
}

void gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha, const float* A,
          int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  if (M == 0 || N == 0) return;
  cblas_sgemm(CblasRowMajor, trans_a ? CblasTrans : CblasNoTrans,
              trans_b ? CblasTrans : CblasNoTrans, static_cast<int>(M), static_cast<int>(N),
              static_cast<int>(K), alpha, A, static_cast<int>(lda), B, static_cast<int>(ldb), beta,
              C, static_cast<int>(ldc));
}
void gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, double alpha,
          const double* A, int64_t lda, const double* B, int64_t ldb, double beta, double* C,
          int64_t ldc) {
  if (M == 0 || N == 0) return;
  cblas_dgemm(CblasRowMajor, trans_a ? CblasTrans : CblasNoTrans,
              trans_b ? CblasTrans : CblasNoTrans, static_cast<int>(M), static_cast<int>(N),
              static_cast<int>(K), alpha, A, static_cast<int>(lda), B, static_cast<int>(ldb), beta,
              C, static_cast<int>(ldc));
}

namespace {

template <class T>
std::vector<T> load(const WeightStore& ws, const std::string& name,
                    const std::vector<int64_t>& shape) {
  const std::vector<float> f = ws.load_f32(name, shape);
  return std::vector<T>(f.begin(), f.end());
}

}  // namespace

template <class T>
struct GateModel<T>::Acts {
  std::vector<T> xn1, inv1, q, k, v, attn, lse, mix, x1, xn2, inv2, g, u, act;
};

template <class T>
GateModel<T>::GateModel(const std::filesystem::path& model_dir)
    : config_(ModelConfig::load(model_dir)) {
  const ModelConfig& c = config_;
  check(!c.mlp_bias, model_dir.string(), ": mlp_bias is not supported by the gate trainer");
  check(!c.sliding_window.has_value(), model_dir.string(),
        ": sliding-window models are not supported by the gate trainer");
  const WeightStore ws = WeightStore::open(model_dir);
  const int64_t H = c.hidden_size, I = c.intermediate_size, qd = c.q_dim(), kd = c.kv_dim();
  embed_ = load<T>(ws, "model.embed_tokens.weight", {c.vocab_size, H});
  final_norm_ = load<T>(ws, "model.norm.weight", {H});
  if (!c.tie_word_embeddings) lm_head_ = load<T>(ws, "lm_head.weight", {c.vocab_size, H});
  layers_.resize(static_cast<size_t>(c.num_layers));
  for (int64_t l = 0; l < c.num_layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    GateLayerWeights<T>& w = layers_[static_cast<size_t>(l)];
    w.ln1 = load<T>(ws, p + "input_layernorm.weight", {H});
    w.ln2 = load<T>(ws, p + "post_attention_layernorm.weight", {H});
    w.wq = load<T>(ws, p + "self_attn.q_proj.weight", {qd, H});
    w.wk = load<T>(ws, p + "self_attn.k_proj.weight", {kd, H});
    w.wv = load<T>(ws, p + "self_attn.v_proj.weight", {kd, H});
    w.wo = load<T>(ws, p + "self_attn.o_proj.weight", {H, qd});
    if (c.qkv_bias) {
      w.bq = load<T>(ws, p + "self_attn.q_proj.bias", {qd});
      w.bk = load<T>(ws, p + "self_attn.k_proj.bias", {kd});
      w.bv = load<T>(ws, p + "self_attn.v_proj.bias", {kd});
    }
    if (c.o_bias) w.bo = load<T>(ws, p + "self_attn.o_proj.bias", {H});
    w.w_gate = load<T>(ws, p + "mlp.gate_proj.weight", {I, H});
    w.w_up = load<T>(ws, p + "mlp.up_proj.weight", {I, H});
    w.w_down = load<T>(ws, p + "mlp.down_proj.weight", {H, I});
  }
}

template <class T>
void GateModel<T>::rope_tables(int64_t n, std::vector<T>& cos, std::vector<T>& sin) const {
  const int64_t half = config_.head_dim / 2;
  const RopeFrequencies f = compute_rope_frequencies(config_, n);
  std::vector<float> c(static_cast<size_t>(half)), s(c.size());
  cos.resize(static_cast<size_t>(n * half));
  sin.resize(cos.size());
  for (int64_t t = 0; t < n; ++t) {
    rope_cos_sin(f, t, c.data(), s.data());
    std::copy(c.begin(), c.end(), cos.begin() + t * half);
    std::copy(s.begin(), s.end(), sin.begin() + t * half);
  }
}

template <class T>
std::vector<T> GateModel<T>::embed(std::span<const int32_t> ids) const {
  const int64_t H = config_.hidden_size, n = static_cast<int64_t>(ids.size());
  std::vector<T> x(static_cast<size_t>(n * H));
  for (int64_t t = 0; t < n; ++t) {
    const int32_t id = ids[static_cast<size_t>(t)];
    check(id >= 0 && id < config_.vocab_size, "token id ", id, " outside the vocabulary (",
          config_.vocab_size, ")");
    std::copy(embed_.begin() + id * H, embed_.begin() + (id + 1) * H, x.begin() + t * H);
  }
  return x;
}

template <class T>
void GateModel<T>::layer_forward(int64_t l, const T* x_in, int64_t n, const std::vector<T>& cos,
                                 const std::vector<T>& sin, const AttnWindow& w, const T* o_full_in,
                                 const double* a, Acts& s, T* x_out) const {
  const ModelConfig& c = config_;
  const GateLayerWeights<T>& W = layers_[static_cast<size_t>(l)];
  const int64_t H = c.hidden_size, I = c.intermediate_size, qd = c.q_dim(), kd = c.kv_dim();
  const int64_t nq = c.num_heads, nkv = c.num_kv_heads, d = c.head_dim;
  auto sz = [](int64_t v) { return static_cast<size_t>(v); };
  s.xn1.resize(sz(n * H));
  s.inv1.resize(sz(n));
  s.q.resize(sz(n * qd));
  s.k.resize(sz(n * kd));
  s.v.resize(sz(n * kd));
  s.attn.resize(sz(n * qd));
  s.lse.resize(sz(n * nq));
  s.x1.resize(sz(n * H));
  s.xn2.resize(sz(n * H));
  s.inv2.resize(sz(n));
  s.g.resize(sz(n * I));
  s.u.resize(sz(n * I));
  s.act.resize(sz(n * I));
  rmsnorm_forward(x_in, W.ln1.data(), c.rms_norm_eps, n, H, s.xn1.data(), s.inv1.data());
  linear_forward(s.xn1.data(), W.wq.data(), W.bq.empty() ? nullptr : W.bq.data(), n, H, qd,
                 s.q.data());
  linear_forward(s.xn1.data(), W.wk.data(), W.bk.empty() ? nullptr : W.bk.data(), n, H, kd,
                 s.k.data());
  linear_forward(s.xn1.data(), W.wv.data(), W.bv.empty() ? nullptr : W.bv.data(), n, H, kd,
                 s.v.data());
  rope_forward(s.q.data(), cos.data(), sin.data(), n, nq, d);
  rope_forward(s.k.data(), cos.data(), sin.data(), n, nkv, d);
  const T* mixed = s.attn.data();
  if (o_full_in == nullptr) {
    attention_forward(s.q.data(), s.k.data(), s.v.data(), n, nq, nkv, d, AttnWindow{},
                      s.attn.data(), s.lse.data());
  } else {
    attention_forward(s.q.data(), s.k.data(), s.v.data(), n, nq, nkv, d, w, s.attn.data(),
                      s.lse.data());
    s.mix.resize(sz(n * qd));
    gate_mix_forward(o_full_in, s.attn.data(), a, n, nq, nkv, d, s.mix.data());
    mixed = s.mix.data();
  }
  linear_forward(mixed, W.wo.data(), W.bo.empty() ? nullptr : W.bo.data(), n, qd, H, s.x1.data());
  for (int64_t i = 0; i < n * H; ++i) s.x1[i] += x_in[i];
  rmsnorm_forward(s.x1.data(), W.ln2.data(), c.rms_norm_eps, n, H, s.xn2.data(), s.inv2.data());
  linear_forward(s.xn2.data(), W.w_gate.data(), static_cast<const T*>(nullptr), n, H, I,
                 s.g.data());
  linear_forward(s.xn2.data(), W.w_up.data(), static_cast<const T*>(nullptr), n, H, I, s.u.data());
  swiglu_forward(s.g.data(), s.u.data(), n * I, s.act.data());
  linear_forward(s.act.data(), W.w_down.data(), static_cast<const T*>(nullptr), n, I, H, x_out);
  for (int64_t i = 0; i < n * H; ++i) x_out[i] += s.x1[i];
}

template <class T>
TeacherPass<T> GateModel<T>::teacher(std::span<const int32_t> ids) const {
  const ModelConfig& c = config_;
  const int64_t n = static_cast<int64_t>(ids.size()), H = c.hidden_size;
  check(n > 0, "teacher pass: empty sequence");
  std::vector<T> cos, sin;
  rope_tables(n, cos, sin);
  TeacherPass<T> tp;
  tp.n = n;
  tp.o_full.resize(static_cast<size_t>(c.num_layers));
  std::vector<T> x = embed(ids), y(x.size());
  Acts s;
  for (int64_t l = 0; l < c.num_layers; ++l) {
    layer_forward(l, x.data(), n, cos, sin, AttnWindow{}, nullptr, nullptr, s, y.data());
    tp.o_full[static_cast<size_t>(l)] = s.attn;
    std::swap(x, y);
  }
  tp.final_hidden.resize(x.size());
  std::vector<T> inv(static_cast<size_t>(n));
  rmsnorm_forward(x.data(), final_norm_.data(), c.rms_norm_eps, n, H, tp.final_hidden.data(),
                  inv.data());
  return tp;
}

template <class T>
std::vector<T> GateModel<T>::student_hidden(std::span<const int32_t> ids,
                                            const TeacherPass<T>& teacher,
                                            const std::vector<double>& gates,
                                            const AttnWindow& w) const {
  const ModelConfig& c = config_;
  const int64_t n = static_cast<int64_t>(ids.size()), H = c.hidden_size;
  std::vector<T> cos, sin;
  rope_tables(n, cos, sin);
  std::vector<T> x = embed(ids), y(x.size());
  Acts s;
  for (int64_t l = 0; l < c.num_layers; ++l) {
    layer_forward(l, x.data(), n, cos, sin, w, teacher.o_full[static_cast<size_t>(l)].data(),
                  gates.data() + l * c.num_kv_heads, s, y.data());
    std::swap(x, y);
  }
  std::vector<T> out(x.size()), inv(static_cast<size_t>(n));
  rmsnorm_forward(x.data(), final_norm_.data(), c.rms_norm_eps, n, H, out.data(), inv.data());
  return out;
}

template <class T>
StudentResult GateModel<T>::student(std::span<const int32_t> ids, const TeacherPass<T>& teacher,
                                    const std::vector<double>& gates, int64_t label_begin,
                                    const AttnWindow& w, bool backward) const {
  const ModelConfig& c = config_;
  const int64_t n = static_cast<int64_t>(ids.size()), H = c.hidden_size, L = c.num_layers;
  const int64_t I = c.intermediate_size, qd = c.q_dim(), kd = c.kv_dim();
  const int64_t nq = c.num_heads, nkv = c.num_kv_heads, d = c.head_dim;
  check(teacher.n == n, "student pass: the teacher ran over ", teacher.n, " tokens, not ", n);
  check(static_cast<int64_t>(gates.size()) == L * nkv, "student pass: ", gates.size(),
        " gates for ", L, " x ", nkv, " KV heads");
  check(label_begin >= 0 && label_begin < n, "student pass: label_begin ", label_begin,
        " outside [0, ", n, ")");
  std::vector<T> cos, sin;
  rope_tables(n, cos, sin);
  // Forward, keeping each layer's input.
  std::vector<std::vector<T>> xs(static_cast<size_t>(L + 1));
  xs[0] = embed(ids);
  Acts s;
  for (int64_t l = 0; l < L; ++l) {
    xs[static_cast<size_t>(l + 1)].resize(static_cast<size_t>(n * H));
    layer_forward(l, xs[static_cast<size_t>(l)].data(), n, cos, sin, w,
                  teacher.o_full[static_cast<size_t>(l)].data(), gates.data() + l * nkv, s,
                  xs[static_cast<size_t>(l + 1)].data());
  }
  const std::vector<T>& xL = xs[static_cast<size_t>(L)];
  std::vector<T> y(xL.size()), inv(static_cast<size_t>(n));
  rmsnorm_forward(xL.data(), final_norm_.data(), c.rms_norm_eps, n, H, y.data(), inv.data());
  const int64_t m = n - label_begin;
  const double denom = static_cast<double>(m) * static_cast<double>(H);
  double loss = 0;
  std::vector<T> dy(y.size(), T(0));
  for (int64_t t = label_begin; t < n; ++t)
    for (int64_t i = 0; i < H; ++i) {
      const double diff =
          static_cast<double>(y[t * H + i]) - static_cast<double>(teacher.final_hidden[t * H + i]);
      loss += diff * diff;
      dy[t * H + i] = static_cast<T>(2.0 * diff / denom);
    }
  StudentResult r;
  r.distill = loss / denom;
  if (!backward) return r;
  r.d_gate.assign(static_cast<size_t>(L * nkv), 0.0);
  std::vector<T> dx(xL.size());
  rmsnorm_backward(xL.data(), final_norm_.data(), inv.data(), dy.data(), n, H, dx.data(), false);
  // Backward through the layers with recomputation; dx holds dL/d(layer output).
  std::vector<T> tmp(static_cast<size_t>(n * H)), dact(static_cast<size_t>(n * I)), dg(dact.size()),
      du(dact.size()), dxn(static_cast<size_t>(n * H)), dmix(static_cast<size_t>(n * qd)),
      dattn(dmix.size()), dq(dmix.size()), dk(static_cast<size_t>(n * kd)), dv(dk.size());
  for (int64_t l = L - 1; l >= 0; --l) {
    const GateLayerWeights<T>& W = layers_[static_cast<size_t>(l)];
    const std::vector<T>& x_in = xs[static_cast<size_t>(l)];
    const T* o_full = teacher.o_full[static_cast<size_t>(l)].data();
    const double* a = gates.data() + l * nkv;
    layer_forward(l, x_in.data(), n, cos, sin, w, o_full, a, s, tmp.data());
    // MLP: x_out = x1 + down(swiglu(gate(xn2), up(xn2))).
    linear_backward_input(dx.data(), W.w_down.data(), n, I, H, dact.data(), false);
    swiglu_backward(s.g.data(), s.u.data(), dact.data(), n * I, dg.data(), du.data());
    linear_backward_input(dg.data(), W.w_gate.data(), n, H, I, dxn.data(), false);
    linear_backward_input(du.data(), W.w_up.data(), n, H, I, dxn.data(), true);
    rmsnorm_backward(s.x1.data(), W.ln2.data(), s.inv2.data(), dxn.data(), n, H, dx.data(), true);
    // Attention: x1 = x_in + o_proj(mix).
    linear_backward_input(dx.data(), W.wo.data(), n, qd, H, dmix.data(), false);
    gate_mix_backward(o_full, s.attn.data(), a, dmix.data(), n, nq, nkv, d,
                      r.d_gate.data() + l * nkv, dattn.data());
    if (l == 0) break;  // nothing upstream of layer 0 is trainable
    attention_backward(s.q.data(), s.k.data(), s.v.data(), s.attn.data(), s.lse.data(),
                       dattn.data(), n, nq, nkv, d, w, dq.data(), dk.data(), dv.data());
    rope_backward(dq.data(), cos.data(), sin.data(), n, nq, d);
    rope_backward(dk.data(), cos.data(), sin.data(), n, nkv, d);
    linear_backward_input(dq.data(), W.wq.data(), n, H, qd, dxn.data(), false);
    linear_backward_input(dk.data(), W.wk.data(), n, H, kd, dxn.data(), true);
    linear_backward_input(dv.data(), W.wv.data(), n, H, kd, dxn.data(), true);
    rmsnorm_backward(x_in.data(), W.ln1.data(), s.inv1.data(), dxn.data(), n, H, dx.data(), true);
  }
  return r;
}

template <class T>
std::vector<T> GateModel<T>::logits(const std::vector<T>& final_hidden) const {
  const int64_t H = config_.hidden_size, V = config_.vocab_size;
  const int64_t n = static_cast<int64_t>(final_hidden.size()) / H;
  std::vector<T> out(static_cast<size_t>(n * V));
  const std::vector<T>& head = lm_head_.empty() ? embed_ : lm_head_;
  linear_forward(final_hidden.data(), head.data(), static_cast<const T*>(nullptr), n, H, V,
                 out.data());
  return out;
}

double gate_objective(const StudentResult& r, const std::vector<double>& gates, double reg,
                      std::vector<double>* grad) {
  const double num = static_cast<double>(gates.size());
  double abs_sum = 0;
  for (double g : gates) abs_sum += std::fabs(g);
  if (grad) {
    grad->assign(gates.size(), 0.0);
    for (size_t i = 0; i < gates.size(); ++i) {
      const double sgn = gates[i] > 0 ? 1.0 : (gates[i] < 0 ? -1.0 : 0.0);
      (*grad)[i] = (r.d_gate.empty() ? 0.0 : r.d_gate[i]) + reg * sgn / num;
    }
  }
  return r.distill + reg * abs_sum / num;
}

template class GateModel<float>;
template class GateModel<double>;

}  // namespace duo::gate
