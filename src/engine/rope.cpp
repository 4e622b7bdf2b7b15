#include "engine/rope.h"

#include <algorithm>
#include <cmath>
#include <numbers>

#include "core/error.h"

namespace duo {

namespace {

// transformers: 1.0 / (base ** (arange(0, dim, 2).float() / dim)), all in fp32.
std::vector<float> default_inv_freq(double base, int64_t dim) {
  std::vector<float> f(static_cast<size_t>(dim / 2));
  const float b = static_cast<float>(base);
  for (int64_t i = 0; i < dim / 2; ++i) {
    float e = static_cast<float>(2 * i) / static_cast<float>(dim);
    f[i] = 1.0f / std::pow(b, e);
  }
  return f;
}

double yarn_mscale(double scale, double mscale) {
  if (scale <= 1) return 1.0;
  return 0.1 * mscale * std::log(scale) + 1.0;
}

}  // namespace

RopeFrequencies compute_rope_frequencies(const ModelConfig& c, int64_t seq_len) {
  const int64_t dim = c.head_dim;
  const RopeScaling& r = c.rope;
  RopeFrequencies out;
  switch (r.type) {
    case RopeType::kDefault:
      out.inv_freq = default_inv_freq(c.rope_theta, dim);
      break;
    case RopeType::kLinear:
      out.inv_freq = default_inv_freq(c.rope_theta, dim);
      for (float& f : out.inv_freq) f /= static_cast<float>(r.factor);
      break;
    case RopeType::kDynamic: {
      const double max_pos = static_cast<double>(c.max_position_embeddings);
      const double len = std::max<double>(static_cast<double>(seq_len), max_pos);
      const double d = static_cast<double>(dim);
      double base = c.rope_theta * std::pow(r.factor * len / max_pos - (r.factor - 1), d / (d - 2));
      out.inv_freq = default_inv_freq(base, dim);
      break;
    }
    case RopeType::kLlama3: {
      std::vector<float> inv = default_inv_freq(c.rope_theta, dim);
      const float factor = static_cast<float>(r.factor);
      const float low = static_cast<float>(r.low_freq_factor);
      const float high = static_cast<float>(r.high_freq_factor);
      const float old_len = static_cast<float>(r.original_max_position_embeddings);
      const float low_freq_wavelen = old_len / low;
      const float high_freq_wavelen = old_len / high;
      out.inv_freq.resize(inv.size());
      for (size_t i = 0; i < inv.size(); ++i) {
        const float wavelen = static_cast<float>(2 * std::numbers::pi) / inv[i];
        float v = wavelen > low_freq_wavelen ? inv[i] / factor : inv[i];
        const bool medium = !(wavelen < high_freq_wavelen) && !(wavelen > low_freq_wavelen);
        if (medium) {
          const float smooth = (old_len / wavelen - low) / (high - low);
          v = (1 - smooth) * v / factor + smooth * v;
        }
        out.inv_freq[i] = v;
      }
      break;
    }
    case RopeType::kYarn: {
      const double factor = r.factor;
      double attention_factor;
      if (r.attention_factor) {
        attention_factor = *r.attention_factor;
      } else if (r.mscale && r.mscale_all_dim && *r.mscale != 0 && *r.mscale_all_dim != 0) {
        attention_factor = yarn_mscale(factor, *r.mscale) / yarn_mscale(factor, *r.mscale_all_dim);
      } else {
        attention_factor = yarn_mscale(factor, 1.0);
      }
      const double base = c.rope_theta;
      const double orig = static_cast<double>(r.original_max_position_embeddings);
      auto correction_dim = [&](double rotations) {
        return (static_cast<double>(dim) * std::log(orig / (rotations * 2 * std::numbers::pi))) /
               (2 * std::log(base));
      };
      double lo = correction_dim(r.beta_fast);
      double hi = correction_dim(r.beta_slow);
      if (r.truncate) {
        lo = std::floor(lo);
        hi = std::ceil(hi);
      }
      lo = std::max(lo, 0.0);
      hi = std::min(hi, static_cast<double>(dim - 1));
      if (lo == hi) hi += 0.001;
      const float b = static_cast<float>(base);
      out.inv_freq.resize(static_cast<size_t>(dim / 2));
      for (int64_t i = 0; i < dim / 2; ++i) {
        const float pos_freq = std::pow(b, static_cast<float>(2 * i) / static_cast<float>(dim));
        const float extrapolation = 1.0f / pos_freq;
        const float interpolation = 1.0f / (static_cast<float>(factor) * pos_freq);
        float ramp = (static_cast<float>(i) - static_cast<float>(lo)) / static_cast<float>(hi - lo);
        ramp = std::clamp(ramp, 0.0f, 1.0f);
        const float extrapolation_factor = 1.0f - ramp;
        out.inv_freq[i] =
            interpolation * (1 - extrapolation_factor) + extrapolation * extrapolation_factor;
      }
      out.attention_scaling = static_cast<float>(attention_factor);
      break;
    }
  }
  // Scaling parameters that pass the config checks one by one can still combine into NaN, zero
  // or infinite frequencies (yarn beta_fast 0, a huge dynamic factor): every later number would
  // be wrong, so refuse them here, the one place the frequencies are made.
  for (const float f : out.inv_freq)
    check(std::isfinite(f) && f >= 0, "rope: the config's rope parameters give a frequency of ", f,
          " (rope_theta ", c.rope_theta, "): check rope_scaling / rope_parameters");
  check(std::isfinite(out.attention_scaling) && out.attention_scaling > 0,
        "rope: the config's rope parameters give an attention scaling of ", out.attention_scaling,
        ": check rope_scaling / rope_parameters");
  return out;
}

RopeState::RopeState(const ModelConfig& c)
    : config_(&c),
      original_(compute_rope_frequencies(c, c.max_position_embeddings)),
      current_(original_),
      max_seq_len_cached_(c.max_position_embeddings) {}

const RopeFrequencies& RopeState::for_call(int64_t max_position) {
  if (config_->rope.type != RopeType::kDynamic) return current_;
  const int64_t seq_len = max_position + 1;
  const int64_t original = config_->max_position_embeddings;
  const int64_t cached_before = max_seq_len_cached_;
  if (seq_len > max_seq_len_cached_) {
    current_ = compute_rope_frequencies(*config_, seq_len);
    max_seq_len_cached_ = seq_len;
  }
  if (seq_len < original && cached_before > original) {
    current_ = original_;
    max_seq_len_cached_ = original;
  }
  return current_;
}

void rope_cos_sin(const RopeFrequencies& f, int64_t position, float* cos_out, float* sin_out) {
  const float p = static_cast<float>(position);
  for (size_t i = 0; i < f.inv_freq.size(); ++i) {
    const float angle = p * f.inv_freq[i];  // fp32 product, as transformers does
    cos_out[i] = static_cast<float>(std::cos(static_cast<double>(angle))) * f.attention_scaling;
    sin_out[i] = static_cast<float>(std::sin(static_cast<double>(angle))) * f.attention_scaling;
  }
}

void rope_rotate(float* x, int64_t head_dim, const float* cos, const float* sin) {
  const int64_t half = head_dim / 2;
  for (int64_t i = 0; i < half; ++i) {
    const float a = x[i], b = x[i + half];
    x[i] = a * cos[i] - b * sin[i];
    x[i + half] = b * cos[i] + a * sin[i];
  }
}

}  // namespace duo
