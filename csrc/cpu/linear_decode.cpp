// linear_decode (issue 14): y = x W^T + b for the few rows of a generation step, fp32 on the CPU.
//
// A decode step multiplies M = batch rows by every weight matrix of the model, so its time is the time to stream
// the weights from memory. MKL's sgemm is built for large M: at M = 8 it reaches ~13 GFLOPS per core from DRAM
// (3.3 GB/s of weights, a quarter of the copy bandwidth). Here each 64-byte slice of 4 weight rows is loaded once
// and multiplied into every row of x (x stays in L1): per 16 k, 4 weight loads + MB x loads feed 4 MB fused
// multiply-adds. Measured on one core from DRAM (under load): M = 8 2.4x MKL (7.6-8.1 GB/s), M = 16 on par
// (compute-bound there), M = 1 2-5% behind MKL's gemv on an Intel Xeon, which already streams at the copy
// bandwidth there; on an AMD EPYC (Zen 4, 2 threads) MKL's gemv read 10-18 GB/s and this kernel 19-34 GB/s (MKL
// picks its code path by CPU vendor). So pyllm.nn.Linear calls this for 2..16 rows, and for one row too except
// where torch's gemv is MKL's on an Intel CPU (pyllm/nn/linear.py). Threads split the output features.
//
// Precision: fp32 products and sums (16 partial sums per output, one per lane, added at the end), like any
// blocked sgemm; the result differs from MKL's only in summation order. Other dtypes, and CPUs without AVX-512,
// are served by at::linear.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#if defined(__GNUC__) && defined(__x86_64__)
#define PYLLM_LINEAR_X86 1
#include <immintrin.h>
#else
#define PYLLM_LINEAR_X86 0
#endif

namespace pyllm::cpu {
namespace {

#if PYLLM_LINEAR_X86
#pragma GCC push_options
#pragma GCC target("avx512f,fma")

// With several rows of x the loop is slow enough that the hardware prefetcher alone leaves the memory idle:
// those tiles prefetch each weight row this many floats (2 KB) ahead. One row streams fine without.
constexpr int64_t kPrefetch = 512;

// y[m, n + j] = x[m, :] . w[n + j, :] (+ bias) for m < MB, j < NB; x rows ldx apart, y rows ldy apart.
template <int MB, int NB>
inline void tile(const float* x, int64_t ldx, const float* w, int64_t K, const float* bias, float* y, int64_t ldy) {
  __m512 acc[MB][NB];
  for (int m = 0; m < MB; ++m)
    for (int j = 0; j < NB; ++j) acc[m][j] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    __m512 wv[NB];
    for (int j = 0; j < NB; ++j) {
      if constexpr (MB > 1) _mm_prefetch(reinterpret_cast<const char*>(w + j * K + k + kPrefetch), _MM_HINT_T0);
      wv[j] = _mm512_loadu_ps(w + j * K + k);
    }
    for (int m = 0; m < MB; ++m) {
      const __m512 xv = _mm512_loadu_ps(x + m * ldx + k);
      for (int j = 0; j < NB; ++j) acc[m][j] = _mm512_fmadd_ps(wv[j], xv, acc[m][j]);
    }
  }
  if (k < K) {
    const __mmask16 tail = static_cast<__mmask16>((1u << (K - k)) - 1);
    __m512 wv[NB];
    for (int j = 0; j < NB; ++j) wv[j] = _mm512_maskz_loadu_ps(tail, w + j * K + k);
    for (int m = 0; m < MB; ++m) {
      const __m512 xv = _mm512_maskz_loadu_ps(tail, x + m * ldx + k);
      for (int j = 0; j < NB; ++j) acc[m][j] = _mm512_fmadd_ps(wv[j], xv, acc[m][j]);
    }
  }
  for (int m = 0; m < MB; ++m)
    for (int j = 0; j < NB; ++j) y[m * ldy + j] = _mm512_reduce_add_ps(acc[m][j]) + (bias ? bias[j] : 0.0f);
}

// Weight rows [n0, n1) against all M rows of x: 4 rows at a time (their 12 KB at K = 768 stay in L1 while
// the row groups of x pass over them), then the leftover rows one by one.
template <int NB>
inline void rows_group(const float* x, int64_t M, int64_t K, const float* w, const float* bias, float* y, int64_t N,
                       int64_t n) {
  const float* b = bias ? bias + n : nullptr;
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) tile<4, NB>(x + m * K, K, w + n * K, K, b, y + m * N + n, N);
  switch (M - m) {
    case 3: tile<3, NB>(x + m * K, K, w + n * K, K, b, y + m * N + n, N); break;
    case 2: tile<2, NB>(x + m * K, K, w + n * K, K, b, y + m * N + n, N); break;
    case 1: tile<1, NB>(x + m * K, K, w + n * K, K, b, y + m * N + n, N); break;
    default: break;
  }
}

void linear_rows_avx512(const float* x, int64_t M, int64_t K, const float* w, const float* bias, float* y,
                        int64_t N, int64_t n0, int64_t n1) {
  int64_t n = n0;
  for (; n + 4 <= n1; n += 4) rows_group<4>(x, M, K, w, bias, y, N, n);
  for (; n < n1; ++n) rows_group<1>(x, M, K, w, bias, y, N, n);
}
#pragma GCC pop_options

bool has_avx512() {
  static const bool ok = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma");
  }();
  return ok;
}
#endif

at::Tensor linear_decode_cpu(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(input.dim() >= 1 && weight.dim() == 2 && input.size(-1) == weight.size(1),
              "linear_decode: x must be (..., K) and weight (N, K), got x ", input.sizes(), " and weight ",
              weight.sizes());
  TORCH_CHECK(!bias.has_value() || (bias->dim() == 1 && bias->size(0) == weight.size(0)),
              "linear_decode: bias must be (N,) = (", weight.size(0), ",), got ", bias->sizes());
  const int64_t K = weight.size(1), N = weight.size(0), M = K ? input.numel() / K : 0;
  const bool f32 = input.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat &&
                   (!bias.has_value() || bias->scalar_type() == at::kFloat);
#if PYLLM_LINEAR_X86
  if (f32 && has_avx512() && M > 0 && N > 0 && K > 0) {
    const at::Tensor xc = input.reshape({M, K}).contiguous(), wc = weight.contiguous();
    const at::Tensor bc = bias.has_value() ? bias->contiguous() : at::Tensor();
    std::vector<int64_t> out_shape = input.sizes().vec();
    out_shape.back() = N;
    at::Tensor y = at::empty(out_shape, input.options());
    const float *xp = xc.data_ptr<float>(), *wp = wc.data_ptr<float>();
    const float* bp = bc.defined() ? bc.data_ptr<float>() : nullptr;
    float* yp = y.data_ptr<float>();
    // groups of 4 weight rows; a thread takes >= 32 groups (~400 KB of weights at K = 768) or runs alone
    const int64_t groups = (N + 3) / 4;
    at::parallel_for(0, groups, 32, [&](int64_t g0, int64_t g1) {
      linear_rows_avx512(xp, M, K, wp, bp, yp, N, g0 * 4, std::min(N, g1 * 4));
    });
    return y;
  }
#endif
  return at::linear(input, weight, bias.has_value() ? *bias : at::Tensor());
}

}  // namespace

TORCH_LIBRARY_IMPL(pyllm, CPU, m) { m.impl("linear_decode", &linear_decode_cpu); }

}  // namespace pyllm::cpu
