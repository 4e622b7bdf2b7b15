#include "eval/perplexity.h"

#include <algorithm>
#include <cmath>
#include <span>

#include "core/error.h"
#include "eval/niah.h"  // token_nll

namespace duo {

PerplexityPlan plan_perplexity(int64_t text_tokens, int64_t prefix_tokens, int64_t ctx,
                               int64_t first_target, int64_t max_windows) {
  check(prefix_tokens >= 0, "perplexity: negative prefix");
  check(max_windows >= 0, "--windows must be >= 0 (0 = all), got ", max_windows);
  check(ctx >= prefix_tokens + 2, "--ctx must be at least ", prefix_tokens + 2, " tokens, got ",
        ctx);
  check(first_target >= 1 && first_target < ctx, "--score-from must be in [1, ", ctx - 1,
        "] for --ctx ", ctx, ", got ", first_target);
  PerplexityPlan p;
  p.ctx = ctx;
  p.prefix = prefix_tokens;
  p.body = ctx - prefix_tokens;
  p.first_target = first_target;
  p.windows = text_tokens / p.body;
  check(p.windows >= 1, "the text has ", text_tokens, " tokens; --ctx ", ctx, " needs at least ",
        p.body);
  if (max_windows > 0) p.windows = std::min(p.windows, max_windows);
  return p;
}

namespace {

// log-softmax of one row in double; returns the argmax (lowest id among equal logits).
int64_t log_softmax(const float* logits, int64_t vocab, std::vector<double>& out) {
  out.resize(static_cast<size_t>(vocab));
  int64_t arg = 0;
  for (int64_t i = 1; i < vocab; ++i)
    if (logits[i] > logits[arg]) arg = i;
  const double mx = logits[arg];
  double z = 0;
  for (int64_t i = 0; i < vocab; ++i) z += std::exp(static_cast<double>(logits[i]) - mx);
  const double lz = mx + std::log(z);
  for (int64_t i = 0; i < vocab; ++i) out[i] = static_cast<double>(logits[i]) - lz;
  return arg;
}

// Mean and standard error of the mean of a sample.
std::pair<double, double> mean_stderr(const std::vector<double>& v) {
  const double n = static_cast<double>(v.size());
  double s = 0;
  for (double x : v) s += x;
  const double mean = s / n;
  if (v.size() < 2) return {mean, 0.0};
  double ss = 0;
  for (double x : v) ss += (x - mean) * (x - mean);
  return {mean, std::sqrt(ss / (n - 1) / n)};
}

// Value at quantile q of a sample (nearest rank).
double quantile(std::vector<double> v, double q) {
  std::sort(v.begin(), v.end());
  const auto k = static_cast<size_t>(std::ceil(q * static_cast<double>(v.size())));
  return v[std::clamp<size_t>(k, 1, v.size()) - 1];
}

}  // namespace

TokenComparison compare_next_token(const float* base, const float* test, int64_t vocab,
                                   int32_t target) {
  check(target >= 0 && target < vocab, "compare_next_token: target ", target,
        " outside the vocabulary");
  thread_local std::vector<double> lb, lt;
  const int64_t ab = log_softmax(base, vocab, lb);
  const int64_t at = log_softmax(test, vocab, lt);
  TokenComparison c;
  c.nll_base = -lb[target];
  c.nll_test = -lt[target];
  for (int64_t i = 0; i < vocab; ++i) c.kl += std::exp(lb[i]) * (lb[i] - lt[i]);
  c.kl = std::max(c.kl, 0.0);  // rounding can leave -1e-17 where the rows are equal
  c.same_top = ab == at;
  return c;
}

double PerplexityResult::perplexity() const {
  return std::exp(nll);
}
double PerplexityResult::base_perplexity() const {
  return std::exp(base_nll);
}

PerplexityResult evaluate_perplexity(Model& test, Model* base, const std::vector<int32_t>& text,
                                     const std::vector<int32_t>& prefix, const PerplexityOptions& o,
                                     const std::function<void(int64_t, int64_t)>& progress) {
  check(o.chunk > 0, "--chunk must be positive, got ", o.chunk);
  const int64_t first = o.first_target < 0 ? o.ctx / 2 : o.first_target;
  PerplexityResult r;
  r.plan = plan_perplexity(static_cast<int64_t>(text.size()), static_cast<int64_t>(prefix.size()),
                           o.ctx, first, o.max_windows);
  r.compared = base != nullptr;
  const PerplexityPlan& p = r.plan;
  const int64_t vocab = test.config().vocab_size;
  check(base == nullptr || base->config().vocab_size == vocab,
        "perplexity: base and test models differ in vocabulary");
  // NaN / Inf logits (broken weights or rope settings) would make every mean NaN without a word.
  const auto finite = [](double v, const char* which, int64_t window, int64_t position) {
    check(std::isfinite(v), "perplexity: non-finite logits from the ", which, " model at window ",
          window, " position ", position, ": the weights or config.json produce NaN / Inf");
  };
  std::vector<double> nll, base_nll, kl, same;
  std::vector<int32_t> ids(static_cast<size_t>(p.ctx));
  for (int64_t w = 0; w < p.windows; ++w) {
    std::copy(prefix.begin(), prefix.end(), ids.begin());
    std::copy(text.begin() + p.text_index(w, p.prefix), text.begin() + p.text_index(w, p.ctx),
              ids.begin() + p.prefix);
    auto cache = test.make_cache(p.ctx, o.sink, o.recent, o.prefill);
    auto base_cache = base ? base->make_cache(p.ctx, 0, 0, StreamingPrefill::kExact) : nullptr;
    const size_t before = nll.size();
    // Positions 0 .. ctx-2 go through the model; position q's logits predict ids[q + 1]. The
    // scored positions first-1 .. ctx-2 are a suffix, so each chunk needs its last `rows` rows.
    for (int64_t b = 0; b < p.ctx - 1; b += o.chunk) {
      const int64_t e = std::min(p.ctx - 1, b + o.chunk);
      const int64_t rows = std::max<int64_t>(0, e - std::max(b, first - 1));
      const std::span<const int32_t> part(ids.data() + b, static_cast<size_t>(e - b));
      const std::vector<float> lt = test.forward(part, *cache, rows);
      std::vector<float> lb;
      if (base) lb = base->forward(part, *base_cache, rows);
      for (int64_t i = 0; i < rows; ++i) {
        const int32_t target = ids[static_cast<size_t>(e - rows + i + 1)];
        if (!base) {  // perplexity only
          nll.push_back(token_nll(&lt[i * vocab], vocab, target));
          finite(nll.back(), "tested", w, e - rows + i);
          continue;
        }
        const TokenComparison c = compare_next_token(&lb[i * vocab], &lt[i * vocab], vocab, target);
        finite(c.nll_test + c.kl, "tested", w, e - rows + i);
        finite(c.nll_base, "full-attention", w, e - rows + i);
        nll.push_back(c.nll_test);
        base_nll.push_back(c.nll_base);
        kl.push_back(c.kl);
        same.push_back(c.same_top ? 1.0 : 0.0);
      }
    }
    const auto window_mean = [&](const std::vector<double>& v) {
      if (v.size() <= before) return 0.0;  // not compared
      double s = 0;
      for (size_t i = before; i < v.size(); ++i) s += v[i];
      return s / static_cast<double>(v.size() - before);
    };
    r.windows.push_back(
        {w, window_mean(nll), window_mean(base_nll), window_mean(kl), window_mean(same)});
    if (progress) progress(w + 1, p.windows);
  }
  r.tokens = static_cast<int64_t>(nll.size());
  std::tie(r.nll, r.nll_stderr) = mean_stderr(nll);
  if (r.compared) {
    std::tie(r.base_nll, r.base_nll_stderr) = mean_stderr(base_nll);
    std::tie(r.kl, r.kl_stderr) = mean_stderr(kl);
    std::tie(r.same_top, r.same_top_stderr) = mean_stderr(same);
    r.kl_median = quantile(kl, 0.5);
    r.kl_p99 = quantile(kl, 0.99);
    r.kl_max = *std::max_element(kl.begin(), kl.end());
  }
  return r;
}

}  // namespace duo
