#include "engine/sampler.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "core/error.h"

namespace duo {

void validate(const SamplingParams& p) {
  check(std::isfinite(p.temperature) && p.temperature >= 0, "--temp must be >= 0, got ",
        p.temperature);
  check(p.top_k >= 0, "--top-k must be >= 0, got ", p.top_k);
  check(std::isfinite(p.top_p) && p.top_p > 0 && p.top_p <= 1, "--top-p must be in (0, 1], got ",
        p.top_p);
}

Sampler::Sampler(const SamplingParams& p) : p_(p), rng_(p.seed) {
  validate(p);
}

int32_t Sampler::sample(std::span<const float> logits) {
  const int64_t n = static_cast<int64_t>(logits.size());
  check(n > 0, "sampler: empty logits");
  if (p_.temperature == 0.0f) {
    return static_cast<int32_t>(std::max_element(logits.begin(), logits.end()) - logits.begin());
  }
  // Candidates sorted by logit (descending; ties by id), cut by top-k then top-p.
  std::vector<int32_t> ids(static_cast<size_t>(n));
  std::iota(ids.begin(), ids.end(), 0);
  std::stable_sort(ids.begin(), ids.end(),
                   [&](int32_t a, int32_t b) { return logits[a] > logits[b]; });
  int64_t keep = n;
  if (p_.top_k > 0) keep = std::min(keep, p_.top_k);
  std::vector<double> prob(static_cast<size_t>(keep));
  const double mx = logits[ids[0]] / p_.temperature;
  double sum = 0;
  for (int64_t i = 0; i < keep; ++i) {
    prob[i] = std::exp(logits[ids[i]] / p_.temperature - mx);
    sum += prob[i];
  }
  for (double& x : prob) x /= sum;
  if (p_.top_p < 1.0f) {
    // Smallest prefix whose mass reaches top_p (at least one token).
    double cum = 0;
    int64_t cut = keep;
    for (int64_t i = 0; i < keep; ++i) {
      cum += prob[i];
      if (cum >= p_.top_p) {
        cut = i + 1;
        break;
      }
    }
    keep = cut;
    prob.resize(static_cast<size_t>(keep));
    const double s = std::accumulate(prob.begin(), prob.end(), 0.0);
    for (double& x : prob) x /= s;
  }
  std::uniform_real_distribution<double> u(0.0, 1.0);
  double r = u(rng_), cum = 0;
  for (int64_t i = 0; i < keep; ++i) {
    cum += prob[i];
    if (r < cum) return ids[i];
  }
  return ids[keep - 1];
}

}  // namespace duo
