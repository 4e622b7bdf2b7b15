// Counter-based random numbers for random-weight models: element i of a tensor drawn with `seed`
// is a pure function of (seed, i), so the CPU (host loop) and the CUDA backend (one thread per
// element) produce bit-identical fp32 values before any conversion to bf16. Header-only; usable
// from host code and CUDA kernels.
//
//   u1, u2 = two 24-bit uniforms in (0, 1] from splitmix64(seed ^ mix(i))
//   z      = sqrt(-2 ln u1) * cos(2 pi u2)          (Box-Muller, one normal per element)
//
// logf/cosf/sqrtf are evaluated in double on both sides and rounded once, so the host and device
// results agree exactly (CUDA's double-precision log/cos/sqrt are correctly rounded to within
// 1 ulp of double, which disappears in the final rounding to float except in rare ties; the tests
// compare with a tolerance of 1e-6 relative anyway).
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define DUO_RF_HD __host__ __device__
#else
#define DUO_RF_HD
#endif

namespace duo {

DUO_RF_HD inline uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

// A standard normal for element `index` of the stream `seed`.
DUO_RF_HD inline float random_normal_at(uint64_t seed, uint64_t index) {
  const uint64_t h = splitmix64(seed ^ splitmix64(index));
  const double u1 = (static_cast<double>(h >> 40) + 1.0) * (1.0 / 16777216.0);       // (0, 1]
  const double u2 = static_cast<double>((h >> 16) & 0xFFFFFF) * (1.0 / 16777216.0);  // [0, 1)
  const double r = sqrt(-2.0 * log(u1));
  return static_cast<float>(r * cos(6.283185307179586 * u2));
}

// Seed of the k-th tensor drawn from a model seed (so tensors get independent streams).
DUO_RF_HD inline uint64_t tensor_seed(uint64_t model_seed, uint64_t k) {
  return splitmix64(model_seed * 0x100000001B3ull + k);
}

}  // namespace duo
