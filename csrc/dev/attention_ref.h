// Test cases, inputs and the plain CPU reference (double precision) of the attention harnesses.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <random>
#include <vector>

#include "harness.h"

namespace harness {

struct AttnCase {
  int B, Nq, Nk, Hq, Hkv, D;
  bool causal;
  bool mask;      // key padding: batch b keeps a random prefix; batch 1 keeps no key at all
  bool bhnd;      // q/k/v/dout stored (B, H, N, D) and passed as strided (B, N, H, D) views
  DType dtype;
};

inline void print_case(const AttnCase& c) {
  std::printf("  B=%d Nq=%d Nk=%d Hq=%d Hkv=%d D=%d %s%s%s%s\n", c.B, c.Nq, c.Nk, c.Hq, c.Hkv, c.D,
              dtype_name(c.dtype), c.causal ? " causal" : "", c.mask ? " mask" : "", c.bhnd ? " bhnd-strides" : "");
}

// Element strides (batch, seq, head) of a (B, N, H, D) tensor stored as BNHD or BHND.
struct Strides {
  int64_t b, n, h;
};
inline Strides strides_of(int N, int H, int D, bool bhnd) {
  return bhnd ? Strides{int64_t(H) * N * D, D, int64_t(N) * D} : Strides{int64_t(N) * H * D, int64_t(H) * D, D};
}

struct AttnInputs {
  HostTensor q, k, v;
  Strides sq, sk;      // v has k's strides; dout has q's
  std::vector<uint8_t> mask;  // (B, Nk) or empty
  float scale;

  // fast: uniform inputs from a cheap generator (benchmarks); otherwise normal (validation).
  AttnInputs(const AttnCase& c, std::mt19937& rng, bool fast = false)
      : q(c.dtype, size_t(c.B) * c.Nq * c.Hq * c.D),
        k(c.dtype, size_t(c.B) * c.Nk * c.Hkv * c.D),
        v(c.dtype, size_t(c.B) * c.Nk * c.Hkv * c.D),
        sq(strides_of(c.Nq, c.Hq, c.D, c.bhnd)),
        sk(strides_of(c.Nk, c.Hkv, c.D, c.bhnd)),
        scale(1.f / std::sqrt(float(c.D))) {
    if (fast) {
      q.fill_fast(rng(), 2.f), k.fill_fast(rng(), 2.f), v.fill_fast(rng(), 2.f);
    } else {
      q.randn(rng), k.randn(rng), v.randn(rng);
    }
    if (c.mask) {
      mask.assign(size_t(c.B) * c.Nk, 0);
      std::uniform_int_distribution<int> len(1, std::max(1, c.Nk));
      for (int b = 0; b < c.B; ++b) {
        const int keep = b == 1 ? 0 : len(rng);
        for (int j = 0; j < keep && j < c.Nk; ++j) mask[size_t(b) * c.Nk + j] = 1;
      }
    }
  }
};

inline bool visible(const AttnCase& c, const std::vector<uint8_t>& mask, int b, int i, int j) {
  if (c.causal && j > i + c.Nk - c.Nq) return false;
  return mask.empty() || mask[size_t(b) * c.Nk + j];
}

// out (B, Nq, Hq, D) contiguous and lse (B, Hq, Nq), in double.
inline void attention_fwd_ref(const AttnCase& c, const AttnInputs& in, std::vector<double>& out,
                              std::vector<double>& lse) {
  out.assign(size_t(c.B) * c.Nq * c.Hq * c.D, 0.0);
  lse.assign(size_t(c.B) * c.Hq * c.Nq, -INFINITY);
  std::vector<double> s(c.Nk);
  for (int b = 0; b < c.B; ++b)
    for (int h = 0; h < c.Hq; ++h) {
      const int hk = h / (c.Hq / c.Hkv);
      for (int i = 0; i < c.Nq; ++i) {
        const float* qi = &in.q.f[b * in.sq.b + i * in.sq.n + h * in.sq.h];
        double m = -INFINITY;
        for (int j = 0; j < c.Nk; ++j) {
          if (!visible(c, in.mask, b, i, j)) {
            s[j] = -INFINITY;
            continue;
          }
          const float* kj = &in.k.f[b * in.sk.b + j * in.sk.n + hk * in.sk.h];
          double dot = 0.0;
          for (int d = 0; d < c.D; ++d) dot += double(qi[d]) * kj[d];
          s[j] = dot * in.scale;
          m = std::max(m, s[j]);
        }
        if (m == -INFINITY) continue;  // no visible key: zeros, lse -inf
        double l = 0.0;
        double* o = &out[((size_t(b) * c.Nq + i) * c.Hq + h) * c.D];
        for (int j = 0; j < c.Nk; ++j) {
          if (s[j] == -INFINITY) continue;
          const double p = std::exp(s[j] - m);
          l += p;
          const float* vj = &in.v.f[b * in.sk.b + j * in.sk.n + hk * in.sk.h];
          for (int d = 0; d < c.D; ++d) o[d] += p * vj[d];
        }
        for (int d = 0; d < c.D; ++d) o[d] /= l;
        lse[(size_t(b) * c.Hq + h) * c.Nq + i] = m + std::log(l);
      }
    }
}

// dq (B, Nq, Hq, D), dk and dv (B, Nk, Hkv, D), all contiguous, in double; dout read with q's strides.
inline void attention_bwd_ref(const AttnCase& c, const AttnInputs& in, const HostTensor& dout,
                              const std::vector<double>& lse, std::vector<double>& dq, std::vector<double>& dk,
                              std::vector<double>& dv) {
  dq.assign(size_t(c.B) * c.Nq * c.Hq * c.D, 0.0);
  dk.assign(size_t(c.B) * c.Nk * c.Hkv * c.D, 0.0);
  dv.assign(size_t(c.B) * c.Nk * c.Hkv * c.D, 0.0);
  std::vector<double> p(c.Nk), dp(c.Nk);
  for (int b = 0; b < c.B; ++b)
    for (int h = 0; h < c.Hq; ++h) {
      const int hk = h / (c.Hq / c.Hkv);
      for (int i = 0; i < c.Nq; ++i) {
        const double l = lse[(size_t(b) * c.Hq + h) * c.Nq + i];
        if (l == -INFINITY) continue;
        const float* qi = &in.q.f[b * in.sq.b + i * in.sq.n + h * in.sq.h];
        const float* gi = &dout.f[b * in.sq.b + i * in.sq.n + h * in.sq.h];
        double delta = 0.0;
        for (int j = 0; j < c.Nk; ++j) {
          p[j] = dp[j] = 0.0;
          if (!visible(c, in.mask, b, i, j)) continue;
          const float* kj = &in.k.f[b * in.sk.b + j * in.sk.n + hk * in.sk.h];
          const float* vj = &in.v.f[b * in.sk.b + j * in.sk.n + hk * in.sk.h];
          double dot = 0.0, dvdot = 0.0;
          for (int d = 0; d < c.D; ++d) dot += double(qi[d]) * kj[d], dvdot += double(gi[d]) * vj[d];
          p[j] = std::exp(dot * in.scale - l);
          dp[j] = dvdot;
          delta += p[j] * dp[j];
        }
        double* dqi = &dq[((size_t(b) * c.Nq + i) * c.Hq + h) * c.D];
        for (int j = 0; j < c.Nk; ++j) {
          if (p[j] == 0.0) continue;
          const double ds = p[j] * (dp[j] - delta) * in.scale;
          const float* kj = &in.k.f[b * in.sk.b + j * in.sk.n + hk * in.sk.h];
          double* dkj = &dk[((size_t(b) * c.Nk + j) * c.Hkv + hk) * c.D];
          double* dvj = &dv[((size_t(b) * c.Nk + j) * c.Hkv + hk) * c.D];
          for (int d = 0; d < c.D; ++d) {
            dqi[d] += ds * kj[d];
            dkj[d] += ds * qi[d];
            dvj[d] += p[j] * gi[d];
          }
        }
      }
    }
}

// Tolerance: atol scaled by the largest reference value (so the check is insensitive to the output's
// scale), plus a relative term. fp16/bf16 inputs, fp32 accumulation; P and dS are rounded to the
// input dtype before their products, as in FlashAttention.
inline double max_abs(const std::vector<double>& x) {
  double m = 0.0;
  for (double v : x)
    if (!std::isinf(v)) m = std::max(m, std::fabs(v));
  return m;
}

// A varied grid: odd sizes, head dims on and off the fast path, GQA/MQA, decoding, Nq > Nk causal
// (rows with no key), padding masks with a fully masked batch, strided (BHND) inputs.
inline std::vector<AttnCase> attention_cases() {
  std::vector<AttnCase> cases;
  for (DType t : {DType::kFloat16, DType::kBFloat16}) {
    cases.push_back({2, 128, 128, 4, 4, 64, false, false, false, t});
    cases.push_back({2, 97, 97, 4, 2, 64, true, false, false, t});
    cases.push_back({2, 113, 257, 4, 1, 128, false, true, false, t});
    cases.push_back({2, 257, 130, 6, 2, 128, true, false, true, t});
    cases.push_back({2, 1, 300, 4, 2, 128, true, true, false, t});  // decoding with a KV cache
    cases.push_back({1, 200, 64, 2, 2, 96, true, false, false, t});  // first 136 rows see no key
    cases.push_back({2, 65, 190, 2, 1, 59, false, true, false, t});  // D % 8 != 0: scalar loads
    cases.push_back({1, 77, 77, 3, 3, 111, true, false, true, t});
    cases.push_back({1, 70, 90, 2, 2, 32, true, true, false, t});
    cases.push_back({1, 100, 100, 2, 1, 160, false, false, false, t});
    cases.push_back({1, 90, 140, 2, 2, 200, true, true, false, t});
    cases.push_back({1, 66, 130, 2, 2, 256, false, false, true, t});
    cases.push_back({1, 1, 1, 1, 1, 64, true, false, false, t});
  }
  return cases;
}

}  // namespace harness
