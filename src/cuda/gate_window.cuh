// Device side of the gate trainer's attention windows (gate_kernels.h Window; the host rule is
// identify/gate_ops.h AttnWindow::keys), shared by the fp32 kernels (gate_kernels.cu) and the
// tensor-core ones (gate_attention_tc.cu).
#pragma once

#include <cstdint>

#include "cuda/gate_kernels.h"

namespace duo::cuda::gate_kernels {

// Keys of query t: [0, a1) then [b0, b1).
struct KR {
  int64_t a1, b0, b1;
};

// Where the recent part of query t's window begins (before it is clipped to the sinks).
__device__ __forceinline__ int64_t recent_begin(const Window& w, int64_t t) {
  if (w.kind == 2) return (t / w.block - w.recent / w.block + 1) * w.block;
  return t - w.recent + 1;
}

__device__ __forceinline__ KR window_keys(const Window& w, int64_t t) {
  KR k;
  if (w.kind == 0) {
    k.a1 = t + 1;
    k.b0 = k.b1 = t + 1;
    return k;
  }
  k.a1 = min(w.sink, t + 1);
  k.b0 = max(k.a1, recent_begin(w, t));
  k.b1 = t + 1;
  if (k.b0 > k.b1) k.b0 = k.b1;
  return k;
}
__device__ __forceinline__ bool visible(const KR& k, int64_t j) {
  return j < k.a1 || (j >= k.b0 && j < k.b1);
}
// The same test without the ranges, for kinds 1 and 2 (rb = recent_begin(w, t)): a sink is seen
// by every later query, any other key from rb on.
__device__ __forceinline__ bool sees(const Window& w, int64_t t, int64_t rb, int64_t j) {
  return j <= t && (j < w.sink || j >= rb);
}
// The last query that sees key j (n - 1 for sinks and full attention).
__device__ __forceinline__ int64_t last_query(const Window& w, int64_t j, int64_t n) {
  if (w.kind == 0 || j < w.sink) return n - 1;
  if (w.kind == 1) return min(n - 1, j + w.recent - 1);
  return min(n - 1, (j / w.block + w.recent / w.block) * w.block - 1);
}

// Union of the keys of rows [t0, t1): [0, a1) and [b0, b1) (block_key_union in gate_ops.h).
__device__ __forceinline__ KR key_union(const Window& w, int64_t t0, int64_t t1) {
  const KR first = window_keys(w, t0), last = window_keys(w, t1 - 1);
  KR u;
  u.a1 = last.a1;
  if (w.kind == 0) {
    u.b0 = u.b1 = u.a1;
    return u;
  }
  u.b1 = t1;
  u.b0 = min(max(first.b0, u.a1), u.b1);
  return u;
}

}  // namespace duo::cuda::gate_kernels
