// Forward and backward pieces of a frozen Llama-family decoder for the gate optimisation of
// duoattention.md section 4. Everything is row-major over n token rows and templated on the scalar
// (float for training, double for finite-difference tests). Backward functions compute INPUT
// gradients only: the model's weights are frozen; the only trainable parameters are the gates.
//
// Shapes: x [n, H]; linear weights W [M, K] as in the checkpoint (y = x W^T + b); attention
// Q [n, nq*d], K and V [n, nkv*d], O [n, nq*d]; query head h uses KV head h / (nq / nkv).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace duo::gate {

// ---- matrix products (OpenBLAS for float and double) ----

// y[n, M] = x[n, K] W[M, K]^T (+ b[M] when b != nullptr).
void linear_forward(const float* x, const float* W, const float* b, int64_t n, int64_t K, int64_t M,
                    float* y);
void linear_forward(const double* x, const double* W, const double* b, int64_t n, int64_t K,
                    int64_t M, double* y);
// dx[n, K] (+)= dy[n, M] W[M, K]; accumulates into dx when `accumulate`.
void linear_backward_input(const float* dy, const float* W, int64_t n, int64_t K, int64_t M,
                           float* dx, bool accumulate);
void linear_backward_input(const double* dy, const double* W, int64_t n, int64_t K, int64_t M,
                           double* dx, bool accumulate);

// ---- RMSNorm: y = w * x / sqrt(mean(x^2) + eps), per row ----

// inv[n] receives 1 / sqrt(mean(x^2) + eps) for the backward.
template <class T>
void rmsnorm_forward(const T* x, const T* w, double eps, int64_t n, int64_t H, T* y, T* inv) {
  for (int64_t t = 0; t < n; ++t) {
    const T* xr = x + t * H;
    T ss = 0;
    for (int64_t i = 0; i < H; ++i) ss += xr[i] * xr[i];
    const T r = T(1) / std::sqrt(ss / static_cast<T>(H) + static_cast<T>(eps));
    inv[t] = r;
    for (int64_t i = 0; i < H; ++i) y[t * H + i] = w[i] * (xr[i] * r);
  }
}

// dx = r w dy - x r^3 / H * sum_k(w_k dy_k x_k); accumulates into dx when `accumulate`.
template <class T>
void rmsnorm_backward(const T* x, const T* w, const T* inv, const T* dy, int64_t n, int64_t H,
                      T* dx, bool accumulate) {
  for (int64_t t = 0; t < n; ++t) {
    const T* xr = x + t * H;
    const T* dyr = dy + t * H;
    const T r = inv[t];
    T dot = 0;
    for (int64_t i = 0; i < H; ++i) dot += w[i] * dyr[i] * xr[i];
    const T c = dot * r * r * r / static_cast<T>(H);
    for (int64_t i = 0; i < H; ++i) {
      const T g = r * w[i] * dyr[i] - xr[i] * c;
      dx[t * H + i] = accumulate ? dx[t * H + i] + g : g;
    }
  }
}

// ---- SwiGLU: a = silu(g) * u ----

template <class T>
void swiglu_forward(const T* g, const T* u, int64_t count, T* a) {
  for (int64_t i = 0; i < count; ++i) a[i] = g[i] / (T(1) + std::exp(-g[i])) * u[i];
}

template <class T>
void swiglu_backward(const T* g, const T* u, const T* da, int64_t count, T* dg, T* du) {
  for (int64_t i = 0; i < count; ++i) {
    const T s = T(1) / (T(1) + std::exp(-g[i]));
    du[i] = da[i] * g[i] * s;
    dg[i] = da[i] * u[i] * s * (T(1) + g[i] * (T(1) - s));
  }
}

// ---- RoPE (rotate-half): per row t and head, pairs (i, i + d/2) rotate by the angle of row t ----
// cos/sin are tables [n, d/2] (row t = position t).

// Rotation by +angle (forward) or -angle (backward: the transpose, applied to the gradient).
template <class T>
void rope_rotate_rows(T* x, const T* cos, const T* sin, int64_t n, int64_t heads, int64_t d,
                      T sign) {
  const int64_t half = d / 2;
  for (int64_t t = 0; t < n; ++t)
    for (int64_t h = 0; h < heads; ++h) {
      T* v = x + (t * heads + h) * d;
      const T* c = cos + t * half;
      const T* s = sin + t * half;
      for (int64_t i = 0; i < half; ++i) {
        const T a = v[i], b = v[i + half];
        v[i] = a * c[i] - sign * b * s[i];
        v[i + half] = b * c[i] + sign * a * s[i];
      }
    }
}

template <class T>
void rope_forward(T* x, const T* cos, const T* sin, int64_t n, int64_t heads, int64_t d) {
  rope_rotate_rows(x, cos, sin, n, heads, d, T(1));
}

// The transpose of the rotation (in place on the gradient).
template <class T>
void rope_backward(T* dx, const T* cos, const T* sin, int64_t n, int64_t heads, int64_t d) {
  rope_rotate_rows(dx, cos, sin, n, heads, d, T(-1));
}

// ---- attention windows ----

// Keys visible to the query at t: [a0, a1) then [b0, b1) (disjoint, ascending).
struct KeyRanges {
  int64_t a0 = 0, a1 = 0, b0 = 0, b1 = 0;
  int64_t count() const { return (a1 - a0) + (b1 - b0); }
};

enum class WindowKind {
  kFull,   // causal: 0..t
  kExact,  // token-exact streaming (duo/streaming_window.h): j < S or t - R < j <= t
  kBlock,  // the release's training mask: blocks of `block` tokens; the query in block qb sees
           // key blocks [0, S/block) and [qb - R/block + 1, qb], causally
};

struct AttnWindow {
  WindowKind kind = WindowKind::kFull;
  int64_t sink = 0;
  int64_t recent = 0;
  int64_t block = 128;

  KeyRanges keys(int64_t t) const {
    KeyRanges k;
    if (kind == WindowKind::kFull) {
      k.a1 = t + 1;
      return k;
    }
    int64_t sink_end = sink, recent_begin = t - recent + 1;
    if (kind == WindowKind::kBlock) {
      sink_end = sink;  // sink is a whole number of blocks (validated by the caller)
      recent_begin = (t / block - recent / block + 1) * block;
    }
    k.a1 = std::min(sink_end, t + 1);
    k.b0 = std::max(k.a1, recent_begin);
    k.b1 = t + 1;
    if (k.b0 > k.b1) k.b0 = k.b1;
    return k;
  }
};

// O = softmax(Q K^T / sqrt(d)) V over the window's keys. lse[n, nq] receives the log-sum-exp of
// the scaled scores for the backward. Work per head: O(n * visible keys * d). Plain loops: the
// reference for the blocked versions below.
template <class T>
void attention_forward_reference(const T* Q, const T* K, const T* V, int64_t n, int64_t nq,
                                 int64_t nkv, int64_t d, const AttnWindow& w, T* O, T* lse) {
  const int64_t G = nq / nkv;
  const T scale = T(1) / std::sqrt(static_cast<T>(d));
  std::vector<T> s;
  for (int64_t t = 0; t < n; ++t) {
    const KeyRanges kr = w.keys(t);
    s.resize(static_cast<size_t>(kr.count()));
    for (int64_t h = 0; h < nq; ++h) {
      const int64_t g = h / G;
      const T* q = Q + (t * nq + h) * d;
      T mx = -INFINITY;
      int64_t e = 0;
      for (int pass = 0; pass < 2; ++pass) {
        const int64_t j0 = pass == 0 ? kr.a0 : kr.b0, j1 = pass == 0 ? kr.a1 : kr.b1;
        for (int64_t j = j0; j < j1; ++j, ++e) {
          const T* k = K + (j * nkv + g) * d;
          T dot = 0;
          for (int64_t i = 0; i < d; ++i) dot += q[i] * k[i];
          s[e] = dot * scale;
          mx = std::max(mx, s[e]);
        }
      }
      T sum = 0;
      for (T& x : s) sum += (x = std::exp(x - mx));
      T* o = O + (t * nq + h) * d;
      std::fill(o, o + d, T(0));
      e = 0;
      for (int pass = 0; pass < 2; ++pass) {
        const int64_t j0 = pass == 0 ? kr.a0 : kr.b0, j1 = pass == 0 ? kr.a1 : kr.b1;
        for (int64_t j = j0; j < j1; ++j, ++e) {
          const T p = s[e] / sum;
          const T* v = V + (j * nkv + g) * d;
          for (int64_t i = 0; i < d; ++i) o[i] += p * v[i];
        }
      }
      lse[t * nq + h] = mx + std::log(sum);
    }
  }
}

// Gradients of Q, K, V (overwritten) from dO, with the probabilities recomputed from lse:
// dS_j = P_j (dO . V_j - dO . O), dQ = scale sum_j dS_j K_j, dK_j += scale dS_j Q, dV_j += P_j dO.
template <class T>
void attention_backward_reference(const T* Q, const T* K, const T* V, const T* O, const T* lse,
                                  const T* dO, int64_t n, int64_t nq, int64_t nkv, int64_t d,
                                  const AttnWindow& w, T* dQ, T* dK, T* dV) {
  const int64_t G = nq / nkv;
  const T scale = T(1) / std::sqrt(static_cast<T>(d));
  std::fill(dQ, dQ + n * nq * d, T(0));
  std::fill(dK, dK + n * nkv * d, T(0));
  std::fill(dV, dV + n * nkv * d, T(0));
  for (int64_t t = 0; t < n; ++t) {
    const KeyRanges kr = w.keys(t);
    for (int64_t h = 0; h < nq; ++h) {
      const int64_t g = h / G;
      const T* q = Q + (t * nq + h) * d;
      const T* o = O + (t * nq + h) * d;
      const T* dO_ = dO + (t * nq + h) * d;
      T* dq = dQ + (t * nq + h) * d;
      const T L = lse[t * nq + h];
      T D = 0;
      for (int64_t i = 0; i < d; ++i) D += dO_[i] * o[i];
      for (int pass = 0; pass < 2; ++pass) {
        const int64_t j0 = pass == 0 ? kr.a0 : kr.b0, j1 = pass == 0 ? kr.a1 : kr.b1;
        for (int64_t j = j0; j < j1; ++j) {
          const T* k = K + (j * nkv + g) * d;
          const T* v = V + (j * nkv + g) * d;
          T dot = 0, dp = 0;
          for (int64_t i = 0; i < d; ++i) {
            dot += q[i] * k[i];
            dp += dO_[i] * v[i];
          }
          const T p = std::exp(dot * scale - L);
          const T ds = p * (dp - D) * scale;
          T* dk = dK + (j * nkv + g) * d;
          T* dv = dV + (j * nkv + g) * d;
          for (int64_t i = 0; i < d; ++i) {
            dq[i] += ds * k[i];
            dk[i] += ds * q[i];
            dv[i] += p * dO_[i];
          }
        }
      }
    }
  }
}

// C[M, N] = alpha op(A) op(B) + beta C, row-major (cblas_sgemm / cblas_dgemm).
void gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha, const float* A,
          int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t ldc);
void gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, double alpha,
          const double* A, int64_t lda, const double* B, int64_t ldb, double beta, double* C,
          int64_t ldc);

// The keys any query of rows [t0, t1) may see: [0, a1) and [b0, t1) with a1 <= b0 (windows are
// monotone: a1 and b0 never decrease with t).
inline KeyRanges block_key_union(const AttnWindow& w, int64_t t0, int64_t t1) {
  const KeyRanges first = w.keys(t0), last = w.keys(t1 - 1);
  KeyRanges u;
  u.a1 = last.a1;
  if (w.kind == WindowKind::kFull) {
    u.b0 = u.b1 = u.a1;
    return u;
  }
  u.b1 = t1;
  u.b0 = std::min(std::max(first.b0, u.a1), u.b1);
  return u;
}

// Blocked attention (BLAS): rows in blocks of `block_rows`; per block and KV head the union of the
// visible keys is gathered, scores come from one GEMM per query head, invisible keys are masked
// per row. Same results as the reference up to rounding; extra work (R + block) / R at most.
// The keys any query in rows [t0, t1) may see, as one ascending list.
inline void block_keys(const AttnWindow& w, int64_t t0, int64_t t1, std::vector<int64_t>& js) {
  const KeyRanges u = block_key_union(w, t0, t1);
  js.clear();
  for (int64_t j = 0; j < u.a1; ++j) js.push_back(j);
  for (int64_t j = u.b0; j < u.b1; ++j) js.push_back(j);
}

// K/V rows js of KV head g ([n, nkv, d] layout) gathered into contiguous [js.size(), d] buffers.
template <class T>
void gather_group_keys(const T* K, const T* V, const std::vector<int64_t>& js, int64_t nkv,
                       int64_t g, int64_t d, T* Kg, T* Vg) {
  for (size_t e = 0; e < js.size(); ++e) {
    std::copy(K + (js[e] * nkv + g) * d, K + (js[e] * nkv + g + 1) * d, Kg + e * d);
    std::copy(V + (js[e] * nkv + g) * d, V + (js[e] * nkv + g + 1) * d, Vg + e * d);
  }
}

template <class T>
void attention_forward(const T* Q, const T* K, const T* V, int64_t n, int64_t nq, int64_t nkv,
                       int64_t d, const AttnWindow& w, T* O, T* lse, int64_t block_rows = 64) {
  const int64_t G = nq / nkv;
  const T scale = T(1) / std::sqrt(static_cast<T>(d));
  std::vector<int64_t> js;
  std::vector<T> Kg, Vg, S;
  for (int64_t t0 = 0; t0 < n; t0 += block_rows) {
    const int64_t t1 = std::min(n, t0 + block_rows), B = t1 - t0;
    block_keys(w, t0, t1, js);
    const int64_t m = static_cast<int64_t>(js.size());
    Kg.resize(static_cast<size_t>(m * d));
    Vg.resize(Kg.size());
    S.resize(static_cast<size_t>(B * m));
    for (int64_t g = 0; g < nkv; ++g) {
      gather_group_keys(K, V, js, nkv, g, d, Kg.data(), Vg.data());
      for (int64_t h = g * G; h < (g + 1) * G; ++h) {
        gemm(false, true, B, m, d, scale, Q + (t0 * nq + h) * d, nq * d, Kg.data(), d, T(0),
             S.data(), m);
        for (int64_t r = 0; r < B; ++r) {
          const KeyRanges kr = w.keys(t0 + r);
          T* row = S.data() + r * m;
          T mx = -INFINITY;
          for (int64_t e = 0; e < m; ++e) {
            const int64_t j = js[e];
            const bool vis = (j >= kr.a0 && j < kr.a1) || (j >= kr.b0 && j < kr.b1);
            if (!vis) row[e] = -INFINITY;
            mx = std::max(mx, row[e]);
          }
          T sum = 0;
          for (int64_t e = 0; e < m; ++e) sum += (row[e] = std::exp(row[e] - mx));
          const T invs = T(1) / sum;
          for (int64_t e = 0; e < m; ++e) row[e] *= invs;
          lse[(t0 + r) * nq + h] = mx + std::log(sum);
        }
        gemm(false, false, B, d, m, T(1), S.data(), m, Vg.data(), d, T(0), O + (t0 * nq + h) * d,
             nq * d);
      }
    }
  }
}

// Blocked backward: overwrites dQ, dK, dV.
template <class T>
void attention_backward(const T* Q, const T* K, const T* V, const T* O, const T* lse, const T* dO,
                        int64_t n, int64_t nq, int64_t nkv, int64_t d, const AttnWindow& w, T* dQ,
                        T* dK, T* dV, int64_t block_rows = 64) {
  const int64_t G = nq / nkv;
  const T scale = T(1) / std::sqrt(static_cast<T>(d));
  std::fill(dK, dK + n * nkv * d, T(0));
  std::fill(dV, dV + n * nkv * d, T(0));
  std::vector<int64_t> js;
  std::vector<T> Kg, Vg, dKg, dVg, P, dP, D;
  for (int64_t t0 = 0; t0 < n; t0 += block_rows) {
    const int64_t t1 = std::min(n, t0 + block_rows), B = t1 - t0;
    block_keys(w, t0, t1, js);
    const int64_t m = static_cast<int64_t>(js.size());
    Kg.resize(static_cast<size_t>(m * d));
    Vg.resize(Kg.size());
    dKg.resize(Kg.size());
    dVg.resize(Kg.size());
    P.resize(static_cast<size_t>(B * m));
    dP.resize(P.size());
    D.resize(static_cast<size_t>(B));
    for (int64_t g = 0; g < nkv; ++g) {
      gather_group_keys(K, V, js, nkv, g, d, Kg.data(), Vg.data());
      std::fill(dKg.begin(), dKg.end(), T(0));
      std::fill(dVg.begin(), dVg.end(), T(0));
      for (int64_t h = g * G; h < (g + 1) * G; ++h) {
        const T* Qh = Q + (t0 * nq + h) * d;
        const T* dOh = dO + (t0 * nq + h) * d;
        gemm(false, true, B, m, d, scale, Qh, nq * d, Kg.data(), d, T(0), P.data(), m);
        gemm(false, true, B, m, d, T(1), dOh, nq * d, Vg.data(), d, T(0), dP.data(), m);
        for (int64_t r = 0; r < B; ++r) {
          const KeyRanges kr = w.keys(t0 + r);
          const T L = lse[(t0 + r) * nq + h];
          const T* o = O + ((t0 + r) * nq + h) * d;
          const T* dor = dOh + r * nq * d;
          T Dr = 0;
          for (int64_t i = 0; i < d; ++i) Dr += dor[i] * o[i];
          T* prow = P.data() + r * m;
          T* dprow = dP.data() + r * m;
          for (int64_t e = 0; e < m; ++e) {
            const int64_t j = js[e];
            const bool vis = (j >= kr.a0 && j < kr.a1) || (j >= kr.b0 && j < kr.b1);
            const T p = vis ? std::exp(prow[e] - L) : T(0);
            prow[e] = p;
            dprow[e] = p * (dprow[e] - Dr) * scale;  // dS, scaled
          }
        }
        gemm(false, false, B, d, m, T(1), dP.data(), m, Kg.data(), d, T(0), dQ + (t0 * nq + h) * d,
             nq * d);
        gemm(true, false, m, d, B, T(1), dP.data(), m, Qh, nq * d, T(1), dKg.data(), d);
        gemm(true, false, m, d, B, T(1), P.data(), m, dOh, nq * d, T(1), dVg.data(), d);
      }
      for (int64_t e = 0; e < m; ++e) {
        T* dk = dK + (js[e] * nkv + g) * d;
        T* dv = dV + (js[e] * nkv + g) * d;
        for (int64_t i = 0; i < d; ++i) {
          dk[i] += dKg[e * d + i];
          dv[i] += dVg[e * d + i];
        }
      }
    }
  }
}

// ---- the gate mix (before o_proj) ----
// M[t, h*d + i] = a[h / G] * F[t, h*d + i] + (1 - a[h / G]) * S[t, h*d + i]; F (the teacher's full
// attention output) is a constant.

template <class T>
void gate_mix_forward(const T* F, const T* S, const double* a, int64_t n, int64_t nq, int64_t nkv,
                      int64_t d, T* M) {
  const int64_t G = nq / nkv;
  for (int64_t t = 0; t < n; ++t)
    for (int64_t h = 0; h < nq; ++h) {
      const T al = static_cast<T>(a[h / G]);
      const int64_t o = (t * nq + h) * d;
      for (int64_t i = 0; i < d; ++i) M[o + i] = al * F[o + i] + (T(1) - al) * S[o + i];
    }
}

// da[g] += sum dM (F - S) over rows, the group's query heads and dims; dS = (1 - a) dM.
template <class T>
void gate_mix_backward(const T* F, const T* S, const double* a, const T* dM, int64_t n, int64_t nq,
                       int64_t nkv, int64_t d, double* da, T* dS) {
  const int64_t G = nq / nkv;
  for (int64_t h = 0; h < nq; ++h) {
    const T al = static_cast<T>(a[h / G]);
    double acc = 0;
    for (int64_t t = 0; t < n; ++t) {
      const int64_t o = (t * nq + h) * d;
      T part = 0;
      for (int64_t i = 0; i < d; ++i) {
        part += dM[o + i] * (F[o + i] - S[o + i]);
        dS[o + i] = (T(1) - al) * dM[o + i];
      }
      acc += static_cast<double>(part);
    }
    da[h / G] += acc;
  }
}

}  // namespace duo::gate
