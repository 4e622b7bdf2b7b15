// The gate optimisation of duoattention.md section 4 (src/identify): every backward op against
// central finite differences in double precision, the end-to-end gate gradient of the student
// against central differences of the whole loss on fixture models, and the teacher / student
// forwards against the engine's logits (full attention; all streaming).
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <functional>
#include <random>

#include "duo/head_pattern.h"
#include "engine/model.h"
#include "identify/gate_model.h"
#include "identify/gate_ops.h"
#include "identify/gate_trainer.h"
#include "test_util.h"

namespace duo {
namespace {

using gate::AttnWindow;
using gate::WindowKind;
using testing::fixture;

std::vector<double> randn(size_t count, std::mt19937_64& rng, double sd = 1.0) {
  std::normal_distribution<double> nd(0.0, sd);
  std::vector<double> v(count);
  for (double& x : v) x = nd(rng);
  return v;
}

// max |analytic - numeric| / max |numeric| where numeric[i] = d f / d x[i] by central differences.
double fd_rel_error(std::vector<double>& x, const std::function<double()>& f,
                    const std::vector<double>& analytic, double h = 1e-5) {
  EXPECT_EQ(x.size(), analytic.size());
  double err = 0, scale = 0;
  for (size_t i = 0; i < x.size(); ++i) {
    const double keep = x[i];
    x[i] = keep + h;
    const double fp = f();
    x[i] = keep - h;
    const double fm = f();
    x[i] = keep;
    const double num = (fp - fm) / (2 * h);
    err = std::max(err, std::fabs(num - analytic[i]));
    scale = std::max(scale, std::fabs(num));
  }
  EXPECT_GT(scale, 1e-6) << "the gradient is (numerically) zero: the test means nothing";
  return err / scale;
}

double dot(const std::vector<double>& a, const std::vector<double>& b) {
  double s = 0;
  for (size_t i = 0; i < a.size(); ++i) s += a[i] * b[i];
  return s;
}

void report(const char* what, double rel) {
  std::printf("[ FD ] %-44s rel err %.3e\n", what, rel);
  EXPECT_LE(rel, 1e-6) << what;
}

TEST(GateOps, RmsNormBackward) {
  std::mt19937_64 rng(1);
  const int64_t n = 3, H = 7;
  auto x = randn(n * H, rng), w = randn(H, rng), r = randn(n * H, rng);
  std::vector<double> y(x.size()), inv(n), dx(x.size());
  auto f = [&] {
    gate::rmsnorm_forward(x.data(), w.data(), 1e-5, n, H, y.data(), inv.data());
    return dot(y, r);
  };
  f();
  gate::rmsnorm_backward(x.data(), w.data(), inv.data(), r.data(), n, H, dx.data(), false);
  report("rmsnorm dx", fd_rel_error(x, f, dx));
}

TEST(GateOps, LinearBackward) {
  std::mt19937_64 rng(2);
  const int64_t n = 3, K = 5, M = 4;
  auto x = randn(n * K, rng), W = randn(M * K, rng), b = randn(M, rng), r = randn(n * M, rng);
  std::vector<double> y(n * M), dx(x.size(), 7.0);
  auto f = [&] {
    gate::linear_forward(x.data(), W.data(), b.data(), n, K, M, y.data());
    return dot(y, r);
  };
  gate::linear_backward_input(r.data(), W.data(), n, K, M, dx.data(), false);
  report("linear (x W^T + b) dx", fd_rel_error(x, f, dx));
  // accumulate adds
  std::vector<double> acc(x.size(), 1.0);
  gate::linear_backward_input(r.data(), W.data(), n, K, M, acc.data(), true);
  for (size_t i = 0; i < x.size(); ++i) EXPECT_NEAR(acc[i], dx[i] + 1.0, 1e-12);
}

TEST(GateOps, SwiGluBackward) {
  std::mt19937_64 rng(3);
  const int64_t cnt = 12;
  auto g = randn(cnt, rng, 2.0), u = randn(cnt, rng), r = randn(cnt, rng);
  std::vector<double> a(cnt), dg(cnt), du(cnt);
  auto f = [&] {
    gate::swiglu_forward(g.data(), u.data(), cnt, a.data());
    return dot(a, r);
  };
  gate::swiglu_backward(g.data(), u.data(), r.data(), cnt, dg.data(), du.data());
  report("swiglu dg", fd_rel_error(g, f, dg));
  report("swiglu du", fd_rel_error(u, f, du));
}

TEST(GateOps, RopeBackward) {
  std::mt19937_64 rng(4);
  const int64_t n = 4, heads = 2, d = 6;
  auto x = randn(n * heads * d, rng), r = randn(x.size(), rng);
  std::vector<double> cs(n * d / 2), sn(cs.size());
  std::uniform_real_distribution<double> ang(-3, 3);
  for (size_t i = 0; i < cs.size(); ++i) {
    const double t = ang(rng);
    cs[i] = 1.1 * std::cos(t);  // a yarn-like attention scaling != 1
    sn[i] = 1.1 * std::sin(t);
  }
  auto f = [&] {
    std::vector<double> y = x;
    gate::rope_forward(y.data(), cs.data(), sn.data(), n, heads, d);
    return dot(y, r);
  };
  std::vector<double> dx = r;
  gate::rope_backward(dx.data(), cs.data(), sn.data(), n, heads, d);
  report("rope dx", fd_rel_error(x, f, dx));
}

TEST(GateOps, WindowKeysMatchStreamingVisible) {
  for (int64_t S : {0, 1, 3})
    for (int64_t R : {0, 1, 4})
      for (int64_t t = 0; t < 12; ++t) {
        AttnWindow w{WindowKind::kExact, S, R, 128};
        const gate::KeyRanges k = w.keys(t);
        for (int64_t j = 0; j <= t + 1; ++j) {
          const bool in = (j >= k.a0 && j < k.a1) || (j >= k.b0 && j < k.b1);
          const bool want = j <= t && (j < S || j > t - R);
          EXPECT_EQ(in, want) << "S=" << S << " R=" << R << " t=" << t << " j=" << j;
        }
      }
  // Block mask, block 4, 1 sink block, 2 local blocks: query 13 (block 3) sees 0..3 and 8..13.
  AttnWindow b{WindowKind::kBlock, 4, 8, 4};
  const gate::KeyRanges k = b.keys(13);
  EXPECT_EQ(k.a1, 4);
  EXPECT_EQ(k.b0, 8);
  EXPECT_EQ(k.b1, 14);
  EXPECT_EQ(b.keys(5).count(), 6);  // blocks 0 and 1 overlap: 0..5
}

TEST(GateOps, AttentionBackwardAllWindows) {
  const int64_t n = 9, d = 4;
  const int64_t kBlockRows = 4;  // blocks of 4 query rows: 3 blocks, the last one partial
  struct Case {
    const char* name;
    int64_t nq, nkv;
    AttnWindow w;
    bool qk_grad_zero = false;  // one visible key per query: softmax == 1, no gradient to Q, K
  };
  const Case cases[] = {
      {"attention full MHA", 2, 2, {WindowKind::kFull, 0, 0, 128}},
      {"attention full GQA 4/2", 4, 2, {WindowKind::kFull, 0, 0, 128}},
      {"attention exact S=2 R=3 GQA", 4, 2, {WindowKind::kExact, 2, 3, 128}},
      {"attention exact S=0 R=1 (self only)", 2, 1, {WindowKind::kExact, 0, 1, 128}, true},
      {"attention exact S=3 R=0 (sinks only)", 2, 2, {WindowKind::kExact, 3, 0, 128}},
      {"attention exact S=1 R=20 (R > n)", 3, 1, {WindowKind::kExact, 1, 20, 128}},
      {"attention block 2, S=2 R=4", 4, 2, {WindowKind::kBlock, 2, 4, 2}},
  };
  for (const Case& c : cases) {
    std::mt19937_64 rng(5);
    auto Q = randn(n * c.nq * d, rng), K = randn(n * c.nkv * d, rng), V = randn(n * c.nkv * d, rng);
    auto r = randn(n * c.nq * d, rng);
    std::vector<double> O(Q.size()), lse(n * c.nq), dQ(Q.size()), dK(K.size()), dV(V.size());
    auto f = [&] {
      gate::attention_forward(Q.data(), K.data(), V.data(), n, c.nq, c.nkv, d, c.w, O.data(),
                              lse.data(), kBlockRows);
      return dot(O, r);
    };
    f();
    gate::attention_backward(Q.data(), K.data(), V.data(), O.data(), lse.data(), r.data(), n, c.nq,
                             c.nkv, d, c.w, dQ.data(), dK.data(), dV.data(), kBlockRows);
    // The blocked versions agree with the plain-loop reference.
    std::vector<double> O2(O.size()), lse2(lse.size()), dQ2(dQ.size()), dK2(dK.size()),
        dV2(dV.size());
    gate::attention_forward_reference(Q.data(), K.data(), V.data(), n, c.nq, c.nkv, d, c.w,
                                      O2.data(), lse2.data());
    gate::attention_backward_reference(Q.data(), K.data(), V.data(), O2.data(), lse2.data(),
                                       r.data(), n, c.nq, c.nkv, d, c.w, dQ2.data(), dK2.data(),
                                       dV2.data());
    for (size_t i = 0; i < O.size(); ++i) EXPECT_NEAR(O[i], O2[i], 1e-12) << c.name;
    for (size_t i = 0; i < lse.size(); ++i) EXPECT_NEAR(lse[i], lse2[i], 1e-12) << c.name;
    for (size_t i = 0; i < dQ.size(); ++i) EXPECT_NEAR(dQ[i], dQ2[i], 1e-12) << c.name;
    for (size_t i = 0; i < dK.size(); ++i) EXPECT_NEAR(dK[i], dK2[i], 1e-12) << c.name;
    for (size_t i = 0; i < dV.size(); ++i) EXPECT_NEAR(dV[i], dV2[i], 1e-12) << c.name;
    if (c.qk_grad_zero) {
      for (double g : dQ) EXPECT_NEAR(g, 0.0, 1e-14);
      for (double g : dK) EXPECT_NEAR(g, 0.0, 1e-14);
    } else {
      report((std::string(c.name) + " dQ").c_str(), fd_rel_error(Q, f, dQ));
      report((std::string(c.name) + " dK").c_str(), fd_rel_error(K, f, dK));
    }
    report((std::string(c.name) + " dV").c_str(), fd_rel_error(V, f, dV));
  }
}

TEST(GateOps, GateMixBackward) {
  std::mt19937_64 rng(6);
  const int64_t n = 5, nq = 4, nkv = 2, d = 3;
  auto F = randn(n * nq * d, rng), S = randn(F.size(), rng), r = randn(F.size(), rng);
  std::vector<double> a = {0.3, 0.8}, M(F.size()), dS(F.size()), da(2, 0.0);
  auto f = [&] {
    gate::gate_mix_forward(F.data(), S.data(), a.data(), n, nq, nkv, d, M.data());
    return dot(M, r);
  };
  gate::gate_mix_backward(F.data(), S.data(), a.data(), r.data(), n, nq, nkv, d, da.data(),
                          dS.data());
  report("gate mix da", fd_rel_error(a, f, da));
  report("gate mix dS", fd_rel_error(S, f, dS));
}

std::vector<int32_t> random_ids(int64_t n, int64_t vocab, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<int32_t> t(static_cast<size_t>(n));
  for (auto& x : t) x = static_cast<int32_t>(rng() % static_cast<uint64_t>(vocab));
  return t;
}

// d distill / d gates of the student vs central differences of the whole loss.
TEST(GateModel, GateGradientMatchesFiniteDifferences) {
  for (const char* name : {"llama3_gqa", "llama_attn_bias", "qwen2_bias_tied"}) {
    const gate::GateModel<double> m(fixture(std::string("models/") + name));
    const auto ids = random_ids(24, m.config().vocab_size, 3);
    const auto teacher = m.teacher(ids);
    std::mt19937_64 rng(7);
    std::uniform_real_distribution<double> u(0.1, 0.9);
    std::vector<double> gates(static_cast<size_t>(m.num_gates()));
    for (double& g : gates) g = u(rng);
    const AttnWindow w{WindowKind::kExact, 2, 4, 128};
    const double reg = 0.05;
    auto loss = [&] {
      return gate::gate_objective(m.student(ids, teacher, gates, 12, w, false), gates, reg,
                                  nullptr);
    };
    std::vector<double> grad;
    gate::gate_objective(m.student(ids, teacher, gates, 12, w, true), gates, reg, &grad);
    report((std::string("end to end dLoss/da ") + name).c_str(),
           fd_rel_error(gates, loss, grad, 1e-5));
  }
}

TEST(GateModel, GatesOfOneGiveTheTeacherExactly) {
  const gate::GateModel<double> m(fixture("models/llama3_gqa"));
  const auto ids = random_ids(30, m.config().vocab_size, 4);
  const auto teacher = m.teacher(ids);
  std::vector<double> ones(static_cast<size_t>(m.num_gates()), 1.0);
  const auto r = m.student(ids, teacher, ones, 10, AttnWindow{WindowKind::kExact, 2, 4, 128});
  EXPECT_EQ(r.distill, 0.0);
  for (double g : r.d_gate) EXPECT_EQ(g, 0.0);
}

double max_abs_diff(const std::vector<float>& a, const std::vector<float>& b) {
  EXPECT_EQ(a.size(), b.size());
  double w = 0;
  for (size_t i = 0; i < std::min(a.size(), b.size()); ++i)
    w = std::max(w, static_cast<double>(std::fabs(a[i] - b[i])));
  return w;
}

std::vector<float> engine_logits(const std::filesystem::path& dir, const HeadLayout& layout,
                                 const std::vector<int32_t>& ids, int64_t S, int64_t R) {
  auto be = make_cpu_backend(CpuMode::kReference);
  Model model(dir, *be, layout);
  auto cache = model.make_cache(static_cast<int64_t>(ids.size()), S, R, StreamingPrefill::kExact);
  return model.forward(ids, *cache, static_cast<int64_t>(ids.size()));
}

// The trainer's forward is the real model: the teacher reproduces the engine's full-attention
// logits and the student at gates 0 its all-streaming logits.
TEST(GateModel, ForwardMatchesTheEngine) {
  for (const char* name :
       {"llama3_gqa", "qwen2_bias_tied", "llama_attn_bias", "llama_mha_linear"}) {
    const auto dir = fixture(std::string("models/") + name);
    const gate::GateModel<float> m(dir);
    const ModelConfig& c = m.config();
    const auto ids = random_ids(40, c.vocab_size, 5);
    const auto teacher = m.teacher(ids);
    const auto full = engine_logits(dir, HeadLayout::all_retrieval(c), ids, 0, 0);
    EXPECT_LE(max_abs_diff(m.logits(teacher.final_hidden), full), 1e-4) << name;
    std::vector<double> zeros(static_cast<size_t>(m.num_gates()), 0.0);
    const auto hs =
        m.student_hidden(ids, teacher, zeros, AttnWindow{WindowKind::kExact, 3, 5, 128});
    const auto stream = engine_logits(
        dir, HeadLayout::from_partition(c, all_streaming(c.num_layers, c.num_kv_heads)), ids, 3, 5);
    EXPECT_LE(max_abs_diff(m.logits(hs), stream), 1e-4) << name;
    EXPECT_GT(max_abs_diff(full, stream), 1e-3) << name << ": the window changes nothing";
  }
}

TEST(GateTrainer, ScheduleAndAdamW) {
  EXPECT_DOUBLE_EQ(gate::lr_factor(0, 2000), 0.1);
  EXPECT_DOUBLE_EQ(gate::lr_factor(199, 2000), 0.5);
  EXPECT_DOUBLE_EQ(gate::lr_factor(399, 2000), 1.0);
  EXPECT_DOUBLE_EQ(gate::lr_factor(1000, 2000), 1.0);
  EXPECT_DOUBLE_EQ(gate::lr_factor(1700, 2000), 0.75);
  EXPECT_DOUBLE_EQ(gate::lr_factor(1999, 2000), 0.1);
  gate::GateOptimizer opt(3, 0.02, 5);  // N/5 = 1: factor 1 at every step
  EXPECT_EQ(opt.gates, std::vector<double>(3, 1.0));
  opt.update({2.0, -0.5, 0.0});
  // First AdamW step: m_hat / sqrt(v_hat) = sign(g) (eps aside).
  EXPECT_NEAR(opt.gates[0], 1.0 - 0.02, 1e-9);
  EXPECT_NEAR(opt.gates[1], 1.0 + 0.02, 1e-9);
  EXPECT_EQ(opt.gates[2], 1.0);
  opt.clamp();
  EXPECT_EQ(opt.gates[1], 1.0);
  // Second step by hand.
  const double m = 0.9 * 0.1 * 2.0 + 0.1 * 1.0, v = 0.999 * 0.001 * 4.0 + 0.001 * 1.0;
  const double want =
      opt.gates[0] - 0.02 * (m / (1 - 0.81)) / (std::sqrt(v / (1 - 0.999 * 0.999)) + 1e-8);
  opt.update({1.0, 0.0, 0.0});
  EXPECT_NEAR(opt.gates[0], want, 1e-12);
}

// Gradient descent on the distillation loss alone, from gates below 1 on a fixed sample: the
// loss must fall and the gates must rise towards the teacher (a wrong sign or a wrong gradient
// fails this).
TEST(GateTrainer, DescentLowersTheDistillLoss) {
  const gate::GateModel<float> m(fixture("models/llama3_gqa"));
  const auto ids = random_ids(64, m.config().vocab_size, 8);
  const auto teacher = m.teacher(ids);
  const AttnWindow w{WindowKind::kExact, 2, 4, 128};
  gate::GateOptimizer opt(m.num_gates(), 0.05, 5);
  for (double& g : opt.gates) g = 0.3;
  std::vector<double> losses;
  for (int s = 0; s < 5; ++s) {
    opt.clamp();
    std::vector<double> grad;
    losses.push_back(
        gate::gate_objective(m.student(ids, teacher, opt.gates, 32, w), opt.gates, 0.0, &grad));
    opt.update(grad);
  }
  opt.clamp();
  losses.push_back(gate::gate_objective(m.student(ids, teacher, opt.gates, 32, w, false), opt.gates,
                                        0.0, nullptr));
  EXPECT_GT(losses[0], 0.0);
  for (size_t i = 1; i < losses.size(); ++i) EXPECT_LT(losses[i], losses[i - 1]) << i;
  for (double g : opt.gates) EXPECT_GT(g, 0.3);
}

}  // namespace
}  // namespace duo
