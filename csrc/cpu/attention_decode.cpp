// Flash-decoding on the CPU (issue 15 item 1): attention forward for few queries and many keys.
//
// With Nq small (one generation step: Nq = 1) the query-block parallelism of attention.cpp has only
// B * Hq tasks, fewer than the cores at B = 1. Here the keys are split into chunks instead:
//
//   task (b, kv head g, chunk c): for the R = (Hq / Hkv) * Nq query rows that read kv head g, over the
//     keys of chunk c only: s = scale * q . k_j (visible keys), m_c = max s, l_c = sum exp(s - m_c),
//     acc_c = sum exp(s - m_c) v_j  (partials in fp32, fp64 for double inputs)
//   combine, per row: M = max_c m_c, L = sum_c l_c exp(m_c - M), out = sum_c acc_c exp(m_c - M) / L,
//     lse = M + log L  (one log-sum-exp over the chunks; a row with no visible key: out = 0, lse = -inf)
//
// K and V are read once per task (no fp32 copies of the whole K/V): bf16/fp16 rows are widened into
// small per-task buffers (one chunk of K, transposed; one row of V) and every product and sum is fp32.
// Conventions (layout (B, N, H, D), GQA by index, bottom-right causal, key padding mask) are those of
// csrc/pyllm.cpp.
//
// Exposed as the internal op pyllm::attention_decode_fwd (same schema as attention_fwd) for tests and
// benchmarks, and as pyllm::cpu::attention_decode_fwd for attention.cpp's forward to call when Nq is
// small (see attention_decode_wanted). Not wired there yet: see the issue-15 report.

#if !defined(CPU_CAPABILITY)
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512DQ__)
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#elif defined(__AVX2__) && defined(__FMA__)
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#endif
#endif

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace pyllm::cpu {

namespace {

using at::vec::Vectorized;

// Widen n elements of a row to the accumulation type (a copy into a small per-task buffer).
template <typename S, typename T>
inline void widen(const S* src, int64_t n, T* dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(src[i]);
}

template <typename T>
inline void axpy(T alpha, const T* x, T* y, int64_t n) {
  using V = Vectorized<T>;
  constexpr int64_t W = V::size();
  const V va(alpha);
  int64_t i = 0;
  for (; i + W <= n; i += W) at::vec::fmadd(va, V::loadu(x + i), V::loadu(y + i)).store(y + i);
  for (; i < n; ++i) y[i] += alpha * x[i];
}

// x[i] = exp(x[i] - mx) in place (exp(-inf) = 0); returns the sum.
template <typename T>
inline T exp_shifted(T* x, int64_t n, T mx) {
  using V = Vectorized<T>;
  constexpr int64_t W = V::size();
  const V vm(mx);
  V vs(T(0));
  int64_t i = 0;
  for (; i + W <= n; i += W) {
    const V e = (V::loadu(x + i) - vm).exp();
    e.store(x + i);
    vs = vs + e;
  }
  T sum = at::vec::vec_reduce_all<T>([](const V& a, const V& b) { return a + b; }, vs);
  for (; i < n; ++i) sum += (x[i] = std::exp(x[i] - mx));
  return sum;
}

struct Shape {
  int64_t B, Nq, Nk, Hq, Hkv, D;
  bool causal;
  double scale;
  const bool* mask;  // (B, Nk) contiguous or nullptr
};

template <typename S, typename T>
void decode_kernel(const Shape& p, const S* q, const int64_t* sq, const S* k, const int64_t* sk, const S* v,
                   const int64_t* sv, S* out, T* lse) {
  constexpr T ninf = -std::numeric_limits<T>::infinity();
  const int64_t G = p.Hq / p.Hkv, R = G * p.Nq, D = p.D;
  // Chunks: enough tasks for every thread (4 per thread), at least 32 keys each.
  const int64_t units = p.B * p.Hkv, threads = at::get_num_threads();
  int64_t nc = std::max<int64_t>(1, (4 * threads + units - 1) / units);
  nc = std::min<int64_t>(nc, std::max<int64_t>(1, p.Nk / 32));
  nc = std::max<int64_t>(nc, (p.Nk + 511) / 512);  // at most 512 keys per chunk: its tiles stay in L2
  const int64_t chunk = (p.Nk + nc - 1) / nc;
  nc = std::max<int64_t>(1, (p.Nk + chunk - 1) / chunk);
  const int64_t ldk = chunk + 16;  // kt's row stride: not a power of two, so its D rows do not alias in cache
  // Partials per (b, g, c, row r): m, l, acc[D].
  std::vector<T> pm(units * nc * R), pl(units * nc * R), pacc(units * nc * R * D);
  at::parallel_for(0, units * nc, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> qf(R * D), kt(D * ldk), vf(D), s(R * chunk);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / (p.Hkv * nc), g = (t / nc) % p.Hkv, c = t % nc;
      const int64_t j0 = c * chunk, j1 = std::min(p.Nk, j0 + chunk);
      // rows r = i * G + hh  (query i, head h = g * G + hh)
      for (int64_t i = 0; i < p.Nq; ++i)
        for (int64_t hh = 0; hh < G; ++hh) {
          const S* src = q + b * sq[0] + i * sq[1] + (g * G + hh) * sq[2];
          T* dst = qf.data() + (i * G + hh) * D;
          for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<T>(src[d]) * static_cast<T>(p.scale);
        }
      T* m = pm.data() + t * R;
      T* l = pl.data() + t * R;
      T* acc = pacc.data() + t * R * D;
      std::fill(m, m + R, ninf);
      std::fill(l, l + R, T(0));
      std::fill(acc, acc + R * D, T(0));
      // K of the chunk, widened and transposed (kt[d][jj]): the scores of a row are then D vector
      // updates over the keys, with no horizontal sum per (row, key).
      const int64_t n = j1 - j0;
      for (int64_t jj = 0; jj < n; ++jj) {
        const S* src = k + b * sk[0] + (j0 + jj) * sk[1] + g * sk[2];
        for (int64_t d = 0; d < D; ++d) kt[d * ldk + jj] = static_cast<T>(src[d]);
      }
      for (int64_t r = 0; r < R; ++r) {
        T* sr = s.data() + r * chunk;
        std::fill(sr, sr + n, T(0));
        const T* qr = qf.data() + r * D;
        for (int64_t d = 0; d < D; ++d) axpy(qr[d], kt.data() + d * ldk, sr, n);
        const int64_t last = p.causal ? r / G + p.Nk - p.Nq : p.Nk - 1;  // the last key row r sees
        T mr = ninf;
        for (int64_t jj = 0; jj < n; ++jj) {
          const int64_t j = j0 + jj;
          if (j > last || (p.mask != nullptr && !p.mask[b * p.Nk + j])) sr[jj] = ninf;
          mr = std::max(mr, sr[jj]);
        }
        m[r] = mr;
        if (mr == ninf)
          std::fill(sr, sr + n, T(0));
        else
          l[r] += exp_shifted(sr, n, mr);
      }
      for (int64_t j = j0; j < j1; ++j) {
        bool any = false;
        for (int64_t r = 0; r < R && !any; ++r) any = s[r * chunk + (j - j0)] != T(0);
        if (!any) continue;
        widen(v + b * sv[0] + j * sv[1] + g * sv[2], D, vf.data());
        for (int64_t r = 0; r < R; ++r) {
          const T e = s[r * chunk + (j - j0)];
          if (e != T(0)) axpy(e, vf.data(), acc + r * D, D);
        }
      }
    }
  });
  // Combine the chunks of each row by log-sum-exp.
  at::parallel_for(0, units * R, 16, [&](int64_t begin, int64_t end) {
    std::vector<T> o(D);
    for (int64_t u = begin; u < end; ++u) {
      const int64_t bg = u / R, r = u % R, b = bg / p.Hkv, g = bg % p.Hkv;
      const int64_t i = r / G, h = g * G + r % G;
      T M = ninf;
      for (int64_t c = 0; c < nc; ++c) M = std::max(M, pm[(bg * nc + c) * R + r]);
      std::fill(o.begin(), o.end(), T(0));
      T L = 0;
      if (M != ninf)
        for (int64_t c = 0; c < nc; ++c) {
          const int64_t idx = (bg * nc + c) * R + r;
          if (pl[idx] == T(0)) continue;
          const T w = std::exp(pm[idx] - M);
          L += pl[idx] * w;
          axpy(w, pacc.data() + idx * D, o.data(), D);
        }
      S* dst = out + ((b * p.Nq + i) * p.Hq + h) * D;
      const T inv = L > T(0) ? T(1) / L : T(0);
      for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<S>(o[d] * inv);
      lse[(b * p.Hq + h) * p.Nq + i] = L > T(0) ? M + std::log(L) : ninf;
    }
  });
}

}  // namespace

// Whether the forward should take the decode path: few query rows per kv head, enough keys to split.
bool attention_decode_wanted(int64_t Nq, int64_t Nk, int64_t Hq, int64_t Hkv) {
  return Nq <= 4 && (Hq / Hkv) * Nq <= 64 && Nk >= 64;
}

// q (B, Nq, Hq, D), k/v (B, Nk, Hkv, D), last dim contiguous, already validated by the caller (or below).
std::tuple<at::Tensor, at::Tensor> attention_decode_fwd(const at::Tensor& q, const at::Tensor& k,
                                                        const at::Tensor& v,
                                                        const std::optional<at::Tensor>& key_padding_mask,
                                                        bool causal, double softmax_scale) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "attention_decode: q, k, v must be 4-D, got ",
              q.sizes(), ", ", k.sizes(), ", ", v.sizes());
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(),
              "attention_decode: q, k, v must be CPU tensors");
  TORCH_CHECK(k.sizes() == v.sizes(), "attention_decode: k and v must have the same shape, got ", k.sizes(),
              " and ", v.sizes());
  TORCH_CHECK(k.size(0) == q.size(0), "attention_decode: k has batch ", k.size(0), " but q has ", q.size(0));
  TORCH_CHECK(k.size(3) == q.size(3), "attention_decode: k has head_dim ", k.size(3), " but q has ", q.size(3));
  TORCH_CHECK(k.size(2) >= 1 && q.size(2) % k.size(2) == 0, "attention_decode: q heads (", q.size(2),
              ") must be a multiple of k/v heads (", k.size(2), ")");
  const auto dt = q.scalar_type();
  TORCH_CHECK(k.scalar_type() == dt && v.scalar_type() == dt, "attention_decode: q, k, v must share a dtype");
  const at::Tensor qc = q.stride(3) == 1 ? q : q.contiguous();
  const at::Tensor kc = k.stride(3) == 1 ? k : k.contiguous();
  const at::Tensor vc = v.stride(3) == 1 ? v : v.contiguous();
  at::Tensor mask;
  if (key_padding_mask.has_value()) {
    mask = key_padding_mask->contiguous();
    TORCH_CHECK(mask.scalar_type() == at::kBool && mask.dim() == 2 && mask.size(0) == q.size(0) &&
                    mask.size(1) == k.size(1),
                "attention_decode: key_padding_mask must be bool (batch, seqlen_k), got ", mask.sizes());
  }
  Shape p{q.size(0), q.size(1), k.size(1), q.size(2), k.size(2), q.size(3), causal, softmax_scale,
          mask.defined() ? mask.data_ptr<bool>() : nullptr};
  const auto acc = dt == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor out = at::empty({p.B, p.Nq, p.Hq, p.D}, q.options());
  at::Tensor lse = at::empty({p.B, p.Hq, p.Nq}, q.options().dtype(acc));
  if (out.numel() == 0) {
    lse.fill_(-std::numeric_limits<double>::infinity());
    return {out, lse};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dt, "attention_decode_fwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t sq[3] = {qc.stride(0), qc.stride(1), qc.stride(2)};
    const int64_t sk[3] = {kc.stride(0), kc.stride(1), kc.stride(2)};
    const int64_t sv[3] = {vc.stride(0), vc.stride(1), vc.stride(2)};
    decode_kernel<scalar_t, acc_t>(p, qc.data_ptr<scalar_t>(), sq, kc.data_ptr<scalar_t>(), sk,
                                   vc.data_ptr<scalar_t>(), sv, out.data_ptr<scalar_t>(), lse.data_ptr<acc_t>());
  });
  return {out, lse};
}

}  // namespace pyllm::cpu

TORCH_LIBRARY_FRAGMENT(pyllm, m) {
  m.def("attention_decode_fwd(Tensor q, Tensor k, Tensor v, Tensor? key_padding_mask, bool causal,"
        " float softmax_scale) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(pyllm, CPU, m) { m.impl("attention_decode_fwd", &pyllm::cpu::attention_decode_fwd); }
