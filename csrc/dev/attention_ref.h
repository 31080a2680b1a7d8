// Test cases, inputs and the plain CPU reference (double precision) of the attention harnesses.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "common.cuh"
#include "harness.h"

namespace harness {

struct AttnCase {
  int B, Nq, Nk, Hq, Hkv, D;
  bool causal;
  bool mask;      // key padding: batch b keeps a random prefix; batch 1 keeps no key at all
  bool bhnd;      // q/k/v/dout stored (B, H, N, D) and passed as strided (B, N, H, D) views
  DType dtype;
  // FlashAttention's features (kernels.h AttentionFeatures): window (-1 = unbounded), softcap (0 = off),
  // ALiBi slopes (0 = none, 1 = (Hq,), 2 = (B, Hq)), dropout probability (0 = off)
  int window_left = -1, window_right = -1;
  float softcap = 0.f;
  int alibi = 0;
  float dropout = 0.f;
  bool features() const { return window_left >= 0 || window_right >= 0 || softcap > 0 || alibi || dropout > 0; }
};

// The attention harnesses' options: --no-bench, --profile, --quick (validation only, fp16 cases, no sweeps).
inline void parse_options(int argc, char** argv, bool& bench, bool& profile, bool& quick) {
  bench = true, profile = quick = false;
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--no-bench")) bench = false;
    if (!std::strcmp(argv[i], "--profile")) profile = true;
    if (!std::strcmp(argv[i], "--quick")) quick = true, bench = false;
  }
}

inline void print_case(const AttnCase& c) {
  std::printf("  B=%d Nq=%d Nk=%d Hq=%d Hkv=%d D=%d %s%s%s%s", c.B, c.Nq, c.Nk, c.Hq, c.Hkv, c.D,
              dtype_name(c.dtype), c.causal ? " causal" : "", c.mask ? " mask" : "", c.bhnd ? " bhnd-strides" : "");
  if (c.window_left >= 0 || c.window_right >= 0) std::printf(" window=(%d,%d)", c.window_left, c.window_right);
  if (c.softcap > 0) std::printf(" softcap=%g", c.softcap);
  if (c.alibi) std::printf(" alibi%s", c.alibi == 2 ? "(B,H)" : "(H)");
  if (c.dropout > 0) std::printf(" dropout=%g", c.dropout);
  std::printf("\n");
}

// ---- dropout: Philox4x32-10, written from pyllm/reference.py's definition ----------------------------
// Element (b, h, i, j) has counter offset + ((b H + h) Nq + i) Nk + j and key seed; its bits are word 0;
// it is kept iff bits >= min(floor(p 2^32), 2^32 - 1) and then scaled by 1 / (1 - p).
inline uint32_t philox_ref(uint64_t seed, uint64_t counter) {
  uint64_t c0 = counter & 0xFFFFFFFFu, c1 = counter >> 32, c2 = 0, c3 = 0;
  uint64_t k0 = seed & 0xFFFFFFFFu, k1 = seed >> 32;
  for (int r = 0; r < 10; ++r) {
    const uint64_t pb = c2 * 0xCD9E8D57ull, pa = c0 * 0xD2511F53ull;
    const uint64_t n0 = (pb >> 32) ^ c1 ^ k0, n2 = (pa >> 32) ^ c3 ^ k1;
    c1 = pb & 0xFFFFFFFFu;
    c3 = pa & 0xFFFFFFFFu;
    c0 = n0;
    c2 = n2;
    k0 = (k0 + 0x9E3779B9u) & 0xFFFFFFFFu;
    k1 = (k1 + 0xBB67AE85u) & 0xFFFFFFFFu;
  }
  return static_cast<uint32_t>(c0);
}
inline uint32_t dropout_threshold_ref(double p) {
  return static_cast<uint32_t>(std::min(std::floor(p * 4294967296.0), 4294967295.0));
}
// The seed and offset every harness case uses: both 32-bit halves of each in play.
constexpr uint64_t kDropSeed = 0x123456789ABCDEFull, kDropOffset = (1ull << 33) + 5;
// pyllm.reference.philox_bits(kDropSeed, torch.arange(4) + kDropOffset) and philox_bits(0, [0]) (Random123's
// known answer), computed in Python: the harness refuses to validate against a generator that differs.
constexpr uint32_t kPhiloxKnown[4] = {0xCC12E4D4u, 0x2CEC9B87u, 0xFB8ABD01u, 0x9F9C1D2Eu};
inline bool philox_ref_matches_python() {
  bool ok = philox_ref(0, 0) == 0x6627E8D5u;
  for (int i = 0; i < 4; ++i) ok &= philox_ref(kDropSeed, kDropOffset + i) == kPhiloxKnown[i];
  std::printf("philox reference generator vs pyllm.reference.philox_bits: %s\n", ok ? "identical" : "DIFFERS");
  // the kernels' generator (common.cuh), compiled for the host, against the reference
  bool same = true;
  for (uint64_t i = 0; i < 4096; ++i) {
    const uint64_t seed = kDropSeed * (i % 7), ctr = kDropOffset + i * 0x9E3779B97F4A7C15ull;
    same &= pyllm::cuda::detail::philox_word0(seed, ctr) == philox_ref(seed, ctr);
  }
  std::printf("kernel philox_word0 (host build) vs the reference generator: %s\n", same ? "identical" : "DIFFERS");
  return ok && same;
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
  std::vector<float> slopes;  // ALiBi: (Hq,) or (B, Hq), or empty
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
    if (c.alibi) {  // FlashAttention-style geometric slopes, perturbed per batch for (B, Hq)
      slopes.resize(size_t(c.alibi == 2 ? c.B : 1) * c.Hq);
      for (size_t i = 0; i < slopes.size(); ++i)
        slopes[i] = std::pow(2.f, -8.f * float(i % c.Hq + 1) / c.Hq) * (1.f + 0.25f * float(i / c.Hq));
    }
  }
  float slope(const AttnCase& c, int b, int h) const {
    return slopes.empty() ? 0.f : slopes[size_t(c.alibi == 2 ? b : 0) * c.Hq + h];
  }
};

inline bool visible(const AttnCase& c, const std::vector<uint8_t>& mask, int b, int i, int j) {
  const int right = c.causal ? 0 : c.window_right;
  const long d = long(j) - i - (c.Nk - c.Nq);
  if (right >= 0 && d > right) return false;
  if (c.window_left >= 0 && d < -c.window_left) return false;
  return mask.empty() || mask[size_t(b) * c.Nk + j];
}

// The scaled score after softcap and ALiBi; t = tanh(s / softcap) for the gradient.
inline double modified_score(const AttnCase& c, const AttnInputs& in, int b, int h, int i, int j, double dot,
                             double& t) {
  double s = dot * in.scale;
  t = 0.0;
  if (c.softcap > 0) {
    t = std::tanh(s / c.softcap);
    s = c.softcap * t;
  }
  if (c.alibi) s -= double(in.slope(c, b, h)) * std::fabs(double(i) + c.Nk - c.Nq - j);
  return s;
}

// Dropout factor of element (b, h, i, j): keep / (1 - p), or 1 without dropout.
inline double dropout_factor(const AttnCase& c, int b, int h, int i, int j) {
  if (c.dropout <= 0) return 1.0;
  const uint64_t idx = ((uint64_t(b) * c.Hq + h) * c.Nq + i) * c.Nk + j;
  return philox_ref(kDropSeed, kDropOffset + idx) >= dropout_threshold_ref(c.dropout) ? 1.0 / (1.0 - c.dropout)
                                                                                       : 0.0;
}

// The kernel parameters of a case's features (dropout layout (Nq, Nk), the harness's seed and offset).
inline pyllm::cuda::AttentionFeatures features_of(const AttnCase& c, const float* d_slopes) {
  pyllm::cuda::AttentionFeatures f;
  f.window_left = c.window_left, f.window_right = c.window_right, f.softcap = c.softcap;
  f.alibi_slopes = c.alibi ? d_slopes : nullptr;
  f.alibi_stride_b = c.alibi == 2 ? c.Hq : 0;
  if (c.dropout > 0) {
    f.drop_threshold = dropout_threshold_ref(c.dropout);
    f.drop_scale = float(1.0 / (1.0 - c.dropout));
    f.seed = kDropSeed, f.offset = kDropOffset, f.drop_lq = c.Nq, f.drop_lk = c.Nk;
  }
  return f;
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
          double dot = 0.0, t;
          for (int d = 0; d < c.D; ++d) dot += double(qi[d]) * kj[d];
          s[j] = modified_score(c, in, b, h, i, j, dot, t);
          m = std::max(m, s[j]);
        }
        if (m == -INFINITY) continue;  // no visible key: zeros, lse -inf
        double l = 0.0;
        double* o = &out[((size_t(b) * c.Nq + i) * c.Hq + h) * c.D];
        for (int j = 0; j < c.Nk; ++j) {
          if (s[j] == -INFINITY) continue;
          const double p = std::exp(s[j] - m);
          l += p;  // before dropout (lse too)
          const double pz = p * dropout_factor(c, b, h, i, j);
          const float* vj = &in.v.f[b * in.sk.b + j * in.sk.n + hk * in.sk.h];
          for (int d = 0; d < c.D; ++d) o[d] += pz * vj[d];
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
  std::vector<double> p(c.Nk), dp(c.Nk), z(c.Nk), tt(c.Nk);
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
          p[j] = dp[j] = z[j] = tt[j] = 0.0;
          if (!visible(c, in.mask, b, i, j)) continue;
          const float* kj = &in.k.f[b * in.sk.b + j * in.sk.n + hk * in.sk.h];
          const float* vj = &in.v.f[b * in.sk.b + j * in.sk.n + hk * in.sk.h];
          double dot = 0.0, dvdot = 0.0;
          for (int d = 0; d < c.D; ++d) dot += double(qi[d]) * kj[d], dvdot += double(gi[d]) * vj[d];
          p[j] = std::exp(modified_score(c, in, b, h, i, j, dot, tt[j]) - l);
          dp[j] = dvdot;
          z[j] = dropout_factor(c, b, h, i, j);
          delta += p[j] * z[j] * dp[j];  // rowsum(dO * O), O the dropped output
        }
        double* dqi = &dq[((size_t(b) * c.Nq + i) * c.Hq + h) * c.D];
        for (int j = 0; j < c.Nk; ++j) {
          if (p[j] == 0.0) continue;
          // dS = P (Z dP - delta), through softcap's 1 - tanh^2; dV += P Z dO
          const double ds = p[j] * (z[j] * dp[j] - delta) * (1.0 - tt[j] * tt[j]) * in.scale;
          const float* kj = &in.k.f[b * in.sk.b + j * in.sk.n + hk * in.sk.h];
          double* dkj = &dk[((size_t(b) * c.Nk + j) * c.Hkv + hk) * c.D];
          double* dvj = &dv[((size_t(b) * c.Nk + j) * c.Hkv + hk) * c.D];
          for (int d = 0; d < c.D; ++d) {
            dqi[d] += ds * kj[d];
            dkj[d] += ds * qi[d];
            dvj[d] += p[j] * z[j] * gi[d];
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
    // GQA groups 1, 2, 4, 8 (the dK/dV kernel splits a group over CTAs; attention_bwd runs each split)
    cases.push_back({2, 150, 150, 8, 8, 64, true, false, false, t});
    cases.push_back({1, 130, 190, 4, 2, 64, false, false, false, t});
    cases.push_back({2, 97, 131, 8, 2, 128, true, true, false, t});
    cases.push_back({1, 120, 200, 8, 1, 64, true, false, false, t});
    cases.push_back({1, 77, 150, 16, 2, 96, false, false, true, t});
    cases.push_back({1, 64, 300, 8, 1, 200, true, false, false, t});
  }
  return cases;
}

// FlashAttention's features (sliding window, softcap, ALiBi, dropout), alone and together, with GQA, masks,
// strides and head dims that pad to each of the feature kernels' 64 / 128 / 256.
inline std::vector<AttnCase> feature_cases() {
  std::vector<AttnCase> cases;
  for (DType t : {DType::kFloat16, DType::kBFloat16}) {
    AttnCase c{2, 150, 170, 4, 2, 64, false, true, false, t};
    c.window_left = 20, c.window_right = 7;
    cases.push_back(c);
    c = {1, 200, 180, 4, 4, 128, true, false, false, t};  // causal + left window; first rows see no key
    c.window_left = 33;
    cases.push_back(c);
    c = {1, 64, 400, 2, 1, 64, false, false, false, t};  // left window only: most key tiles skipped
    c.window_left = 50;
    cases.push_back(c);
    c = {1, 90, 90, 2, 2, 80, false, false, false, t};  // the diagonal only
    c.window_left = 0, c.window_right = 0;
    cases.push_back(c);
    c = {2, 97, 113, 4, 2, 64, true, false, false, t};
    c.softcap = 1.5f;
    cases.push_back(c);
    c = {1, 70, 90, 2, 1, 256, false, false, false, t};
    c.softcap = 2.f;
    cases.push_back(c);
    c = {2, 100, 130, 4, 2, 64, true, false, false, t};
    c.alibi = 1;
    cases.push_back(c);
    c = {2, 90, 90, 4, 4, 128, false, true, false, t};
    c.alibi = 2;
    cases.push_back(c);
    c = {2, 100, 120, 4, 2, 64, false, false, false, t};
    c.dropout = 0.17f;
    cases.push_back(c);
    c = {1, 130, 130, 8, 2, 128, true, false, false, t};
    c.dropout = 0.3f;
    cases.push_back(c);
    c = {2, 111, 150, 4, 1, 96, true, true, false, t};  // everything at once
    c.window_left = 40, c.softcap = 3.f, c.alibi = 2, c.dropout = 0.1f;
    cases.push_back(c);
    c = {1, 77, 99, 4, 2, 160, false, false, true, t};
    c.window_left = 10, c.window_right = 20, c.softcap = 2.f, c.alibi = 1, c.dropout = 0.2f;
    cases.push_back(c);
  }
  return cases;
}

// The generator check, then validate(case) over attention_cases() and feature_cases() (fp16 only when
// quick), counted into failed / total.
template <typename Validate>
void validate_all(bool quick, int& failed, int& total, Validate&& validate) {
  ++total;
  if (!philox_ref_matches_python()) ++failed;
  for (const auto& cases : {attention_cases(), feature_cases()})
    for (const AttnCase& c : cases) {
      if (quick && c.dtype != DType::kFloat16) continue;
      ++total;
      if (!validate(c)) ++failed;
    }
}

}  // namespace harness
