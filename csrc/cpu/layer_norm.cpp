// CPU kernels for pyllm::layer_norm_fwd / layer_norm_bwd (LayerNorm and RMSNorm, optional residual).
// The op conventions (shapes, dtypes, empty outputs) are in csrc/pyllm.cpp.
//
// Forward, per row (M rows of N):  h = x (+ residual)
//   LayerNorm: mean = sum(h) / N,  var = sum((h - mean)^2) / N,  rstd = 1 / sqrt(var + eps)
//              y = (h - mean) * rstd * w + b
//   RMSNorm:   rstd = 1 / sqrt(sum(h^2) / N + eps),  y = h * rstd * w
// Backward, per row, with xhat = (h - mean) * rstd (mean = 0 for RMSNorm) and g = w * dy:
//   dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) (+ dh)        (RMSNorm: no mean(g) term)
//   dweight = sum_rows dy * xhat,  dbias = sum_rows dy
//
// Memory traffic: each row is read from memory once and written once; the statistics passes re-read
// it from cache (a row of 65536 fp32 is 256 KiB, it stays in L2). Forward statistics take one pass
// (shifted sums, see row_mean_var). bf16 rows without residual are read and written as bf16 directly;
// other low-precision rows are converted to fp32 into a per-thread row buffer first. All statistics
// are fp32 (fp64 for fp64 input), summed in two levels (lanes within 1024-element chunks, then
// chunks) so long rows keep fp32 accuracy.
// Large outputs get transparent huge pages (their first-touch page faults cost more than the kernel),
// and outputs beyond the last-level cache are written with streaming stores.
//
// dweight/dbias are reduced in two stages: the rows are cut into a number of blocks that depends on
// (M, N) only, each block accumulates its own fp32 partial sums, then one pass adds the partials in
// block order. No atomics, and the result is bitwise the same whatever the thread count.
//
// SIMD: the loops are written for the compiler's vectorizer (fixed-width lane accumulators for the
// reductions, so no -ffast-math is needed); build with -O3 and, for speed, -march=native or -mavx2
// -mfma -mf16c. Threads: at::parallel_for, which is serial unless this file is built with -fopenmp.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__SSE2__)
#include <immintrin.h>
#endif
#if defined(__linux__)
#include <sys/mman.h>
#endif

#if !defined(_OPENMP)
#pragma message("csrc/cpu/layer_norm.cpp built without -fopenmp: at::parallel_for runs on one thread")
#endif

namespace pyllm {
namespace {

// Statistics type: fp64 for fp64 tensors, fp32 otherwise.
template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// Reductions keep kLanes independent partial sums, which the compiler turns into vector registers
// (adding in a fixed lane order needs no reassociation, hence no -ffast-math).
constexpr int64_t kLanes = 32;

template <typename A>
inline A sum_lanes(const A* acc) {
  A s[kLanes / 2];
  for (int64_t l = 0; l < kLanes / 2; ++l) s[l] = acc[l] + acc[l + kLanes / 2];
  for (int64_t w = kLanes / 4; w >= 1; w /= 2)
    for (int64_t l = 0; l < w; ++l) s[l] += s[l + w];
  return s[0];
}

// ---- row conversion between storage dtype and the fp32 row buffer --------------------------------

inline void load_row(const c10::BFloat16* src, float* dst, int64_t n) {
  const uint16_t* s = reinterpret_cast<const uint16_t*>(src);
  for (int64_t j = 0; j < n; ++j) {
    const uint32_t u = static_cast<uint32_t>(s[j]) << 16;  // bf16 is the top half of an fp32
    float f;
    std::memcpy(&f, &u, sizeof(f));
    dst[j] = f;
  }
}

inline void store_row(const float* src, c10::BFloat16* dst, int64_t n) {
  uint16_t* d = reinterpret_cast<uint16_t*>(dst);
  for (int64_t j = 0; j < n; ++j) {
    const float f = src[j];
    uint32_t u;
    std::memcpy(&u, &f, sizeof(u));
    // Round to nearest even, as c10::BFloat16 does; NaN stays a (quiet) NaN.
    const uint16_t rounded = static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
    d[j] = (f != f) ? static_cast<uint16_t>(0x7FC0) : rounded;
  }
}

inline void load_row(const c10::Half* src, float* dst, int64_t n) {
  int64_t j = 0;
#if defined(__AVX512F__)
  for (; j + 16 <= n; j += 16)
    _mm512_storeu_ps(dst + j, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + j))));
#endif
#if defined(__F16C__)
  for (; j + 8 <= n; j += 8)
    _mm256_storeu_ps(dst + j, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + j))));
#endif
  for (; j < n; ++j) dst[j] = static_cast<float>(src[j]);
}

inline void store_row(const float* src, c10::Half* dst, int64_t n) {
  int64_t j = 0;
#if defined(__AVX512F__)
  for (; j + 16 <= n; j += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + j),
                        _mm512_cvtps_ph(_mm512_loadu_ps(src + j), _MM_FROUND_TO_NEAREST_INT));
#endif
#if defined(__F16C__)
  for (; j + 8 <= n; j += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + j),
                     _mm256_cvtps_ph(_mm256_loadu_ps(src + j), _MM_FROUND_TO_NEAREST_INT));
#endif
  for (; j < n; ++j) dst[j] = static_cast<c10::Half>(src[j]);
}

// Adds step(k, lane, acc) over k in [0, n) into kNum sums. Two levels keep fp32 rounding error small
// for long rows: kLanes lane sums within a chunk of kChunk elements, then per-lane sums of the chunks
// (about kChunk / kLanes + n / kChunk additions per partial sum instead of n / kLanes).
constexpr int64_t kChunk = 1024;

template <typename A, int kNum, typename Step>
void cascade_sum(int64_t n, const Step& step, A* out) {
  A outer[kNum][kLanes] = {};
  for (int64_t c = 0; c < n; c += kChunk) {
    const int64_t e = std::min(n, c + kChunk);
    A acc[kNum][kLanes] = {};
    int64_t j = c;
    for (; j + kLanes <= e; j += kLanes)
      for (int64_t l = 0; l < kLanes; ++l) step(j + l, l, acc);
    for (int64_t l = 0; j + l < e; ++l) step(j + l, l, acc);
    for (int s = 0; s < kNum; ++s)
      for (int64_t l = 0; l < kLanes; ++l) outer[s][l] += acc[s][l];
  }
  for (int s = 0; s < kNum; ++s) out[s] = sum_lanes(outer[s]);
}

// ---- output rows ---------------------------------------------------------------------------------

// Outputs much larger than the caches are written with non-temporal (streaming) stores: a normal store
// first reads the line it writes (read-for-ownership), a third more memory traffic for a kernel that
// reads one row and writes one. The row is finished in an L1 buffer, then copied out.
inline void stream_bytes(const void* src, void* dst, size_t n) {
  const char* s = static_cast<const char*>(src);
  char* d = static_cast<char*>(dst);
#if defined(__AVX__)
  constexpr size_t kV = 32;
#elif defined(__SSE2__)
  constexpr size_t kV = 16;
#else
  constexpr size_t kV = 0;
#endif
  if constexpr (kV > 0) {
    size_t head = (kV - (reinterpret_cast<uintptr_t>(d) & (kV - 1))) & (kV - 1);
    head = std::min(head, n);
    std::memcpy(d, s, head);
    d += head, s += head, n -= head;
    for (; n >= kV; n -= kV, d += kV, s += kV) {
#if defined(__AVX__)
      _mm256_stream_si256(reinterpret_cast<__m256i*>(d), _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s)));
#elif defined(__SSE2__)
      _mm_stream_si128(reinterpret_cast<__m128i*>(d), _mm_loadu_si128(reinterpret_cast<const __m128i*>(s)));
#endif
    }
  }
  std::memcpy(d, s, n);
}

// Streaming stores are weakly ordered: fence before the thread's results are handed on.
inline void stream_fence() {
#if defined(__SSE2__)
  _mm_sfence();
#endif
}

template <typename T>
inline void store_row(const T* src, T* dst, int64_t n) { std::memcpy(dst, src, n * sizeof(T)); }

// Writes a finished row (in A) to dst (in T), streaming when asked; tmp: room for n values of T.
template <typename T, typename A>
void write_row(const A* src, T* dst, int64_t n, bool stream, void* tmp) {
  if (!stream) {
    store_row(src, dst, n);
  } else if constexpr (std::is_same_v<T, A>) {
    stream_bytes(src, dst, n * sizeof(T));
  } else {
    store_row(src, static_cast<T*>(tmp), n);
    stream_bytes(tmp, dst, n * sizeof(T));
  }
}

// Stream outputs at or above this size (bytes). Measured on the dev Xeon (480 MiB L3, 2 threads):
// streaming 64 MiB outputs was slower (fwd+bwd 1.3-1.5x vs torch instead of 1.35-2.0x), since there
// the outputs still fit in L3; so by default only outputs larger than such an L3 stream.
// (-DPYLLM_LN_STREAM_BYTES=0 forces the streaming path, for tests.)
#ifndef PYLLM_LN_STREAM_BYTES
#define PYLLM_LN_STREAM_BYTES (int64_t(512) << 20)
#endif
constexpr int64_t kStreamBytes = PYLLM_LN_STREAM_BYTES;

// ---- forward --------------------------------------------------------------------------------------

// sum((h - c)^2): the variance around the mean (c = mean) or the mean square (c = 0).
// Element k of a row in A: the row is in A already, or bfloat16 bits (uint16_t) widened on the fly.
template <typename A>
inline A elem(const A* h, int64_t k) { return h[k]; }
inline float elem(const uint16_t* h, int64_t k) {
  const uint32_t u = static_cast<uint32_t>(h[k]) << 16;  // bf16 is the top half of an fp32
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

template <typename A, typename E>
A row_sq_dev(const E* __restrict h, int64_t n, A c) {
  A s;
  cascade_sum<A, 1>(n, [&](int64_t k, int64_t l, A (*acc)[kLanes]) {
    const A d = elem(h, k) - c;
    acc[0][l] += d * d;
  }, &s);
  return s;
}

// LayerNorm statistics in one pass over the row: sums of d = h - c and d^2 around a shift c, the mean
// of the first 64 elements (a cheap estimate of the mean), then mean = c + sum(d) / N and
// var = sum(d^2) / N - (mean - c)^2. The subtraction loses little while (mean - c)^2 is a small part
// of sum(d^2) / N; where it is not (rows whose head is unlike the rest), the variance is recomputed
// around the mean in a second pass, as in the two-pass method. Returns {mean, var}.
template <typename A, typename E>
std::pair<A, A> row_mean_var(const E* __restrict h, int64_t n, A inv_n) {
  const int64_t n0 = std::min<int64_t>(n, 64);
  // The shift in 8 lanes: one serial chain of 64 adds took as long as the whole statistics pass of a 768-wide
  // row (an add's latency per element). Any c serves as the shift; its summation order does not matter.
  constexpr int64_t kShiftLanes = 8;
  A part[kShiftLanes] = {};
  int64_t k0 = 0;
  for (; k0 + kShiftLanes <= n0; k0 += kShiftLanes)
    for (int64_t l = 0; l < kShiftLanes; ++l) part[l] += elem(h, k0 + l);
  for (; k0 < n0; ++k0) part[0] += elem(h, k0);
  A c = 0;
  for (int64_t l = 0; l < kShiftLanes; ++l) c += part[l];
  c /= A(n0);
  A s[2];
  cascade_sum<A, 2>(n, [&](int64_t k, int64_t l, A (*acc)[kLanes]) {
    const A d = elem(h, k) - c;
    acc[0][l] += d;
    acc[1][l] += d * d;
  }, s);
  const A dm = s[0] * inv_n;  // mean - c
  const A msq = s[1] * inv_n;  // mean of d^2 = var + dm^2
  const A mean = c + dm;
  // dm^2 <= msq / 16: the variance keeps at least 15/16 of msq, so rounding errors grow by < 7%.
  if (dm * dm <= msq * A(0.0625)) return {mean, std::max(msq - dm * dm, A(0))};
  return {mean, row_sq_dev<A>(h, n, mean) * inv_n};
}

// y = (h - mean) * rstd [* w] [+ b]; y may be h itself (the low-precision path works in place).
template <typename A, bool kW, bool kB>
void normalize_row(const A* h, A* y, int64_t n, A mean, A rstd, const A* __restrict w,
                   const A* __restrict b) {
  for (int64_t j = 0; j < n; ++j) {
    A v = (h[j] - mean) * rstd;
    if constexpr (kW) v *= w[j];
    if constexpr (kB) v += b[j];
    y[j] = v;
  }
}

// The same for a bfloat16 row without residual: read and written as bf16, no fp32 row buffer.
template <bool kW, bool kB>
void normalize_row_bf16(const uint16_t* x, uint16_t* y, int64_t n, float mean, float rstd,
                        const float* __restrict w, const float* __restrict b) {
  for (int64_t j = 0; j < n; ++j) {
    float v = (elem(x, j) - mean) * rstd;
    if constexpr (kW) v *= w[j];
    if constexpr (kB) v += b[j];
    uint32_t u;
    std::memcpy(&u, &v, sizeof(u));
    // Round to nearest even, as c10::BFloat16 does; NaN stays a (quiet) NaN.
    const uint16_t rounded = static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
    y[j] = (v != v) ? static_cast<uint16_t>(0x7FC0) : rounded;
  }
}

using NormalizeBF16Fn = void (*)(const uint16_t*, uint16_t*, int64_t, float, float, const float*,
                                 const float*);

inline NormalizeBF16Fn pick_normalize_bf16(bool has_w, bool has_b) {
  if (has_w) return has_b ? normalize_row_bf16<true, true> : normalize_row_bf16<true, false>;
  return has_b ? normalize_row_bf16<false, true> : normalize_row_bf16<false, false>;
}

template <typename A>
using NormalizeFn = void (*)(const A*, A*, int64_t, A, A, const A*, const A*);

template <typename A>
NormalizeFn<A> pick_normalize(bool has_w, bool has_b) {
  if (has_w) return has_b ? normalize_row<A, true, true> : normalize_row<A, true, false>;
  return has_b ? normalize_row<A, false, true> : normalize_row<A, false, false>;
}

template <typename T>
struct FwdArgs {
  using A = acc_t<T>;
  const T* x;
  int64_t x_stride;  // row stride of x
  const T* res;      // residual or nullptr
  int64_t res_stride;
  T* y;     // (M, N) contiguous
  T* h;     // (M, N) contiguous, written only when res != nullptr
  A* mean;  // (M,) or nullptr (rms)
  A* rstd;  // (M,)
  const A* w;  // (N,) in A, or nullptr
  const A* b;  // (N,) in A, or nullptr
  int64_t N;
  A eps;
  bool rms;
  bool stream;  // write y (and h) with streaming stores
};

// Rows [r0, r1). scratch: 3 * N values of A.
template <typename T>
void layer_norm_fwd_rows(const FwdArgs<T>& a, int64_t r0, int64_t r1, acc_t<T>* scratch) {
  using A = acc_t<T>;
  constexpr bool kNative = std::is_same_v<T, A>;  // fp32 / fp64: no conversion buffer
  const int64_t N = a.N;
  const A inv_n = N > 0 ? A(1) / A(N) : A(0);
  const NormalizeFn<A> normalize = pick_normalize<A>(a.w != nullptr, a.b != nullptr);
  A* buf = scratch;
  A* buf2 = scratch + N;
  void* tmp = scratch + 2 * N;  // a row in T, for streaming
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    if (!a.res && !a.stream) {  // bf16 rows without residual: stats and output straight from x
      const NormalizeBF16Fn normalize_bf16 = pick_normalize_bf16(a.w != nullptr, a.b != nullptr);
      for (int64_t i = r0; i < r1; ++i) {
        const auto* xr = reinterpret_cast<const uint16_t*>(a.x + i * a.x_stride);
        A mean = 0, var;
        if (a.rms) {
          var = row_sq_dev<A>(xr, N, A(0)) * inv_n;
        } else {
          std::tie(mean, var) = row_mean_var<A>(xr, N, inv_n);
        }
        const A rstd = A(1) / std::sqrt(var + a.eps);
        if (a.mean) a.mean[i] = mean;
        a.rstd[i] = rstd;
        normalize_bf16(xr, reinterpret_cast<uint16_t*>(a.y + i * N), N, mean, rstd, a.w, a.b);
      }
      return;
    }
  }
  for (int64_t i = r0; i < r1; ++i) {
    const T* xr = a.x + i * a.x_stride;
    const A* hr;  // the row to normalize, in A
    A* yr;        // where y is computed, in A
    if constexpr (kNative) {
      if (a.res) {
        const T* rr = a.res + i * a.res_stride;
        for (int64_t j = 0; j < N; ++j) buf2[j] = xr[j] + rr[j];
        write_row(buf2, a.h + i * N, N, a.stream, tmp);
        hr = buf2;
      } else {
        hr = xr;
      }
      yr = a.stream ? buf : a.y + i * N;
    } else {
      load_row(xr, buf, N);
      if (a.res) {
        load_row(a.res + i * a.res_stride, buf2, N);
        for (int64_t j = 0; j < N; ++j) buf[j] += buf2[j];
        // Normalize h as stored (rounded to T), so that forward and backward see the same h.
        store_row(buf, static_cast<T*>(tmp), N);
        load_row(static_cast<const T*>(tmp), buf, N);
        write_row(static_cast<const T*>(tmp), a.h + i * N, N, a.stream, nullptr);
      }
      hr = buf;
      yr = buf;
    }
    A mean = 0, var;
    if (a.rms) {
      var = row_sq_dev<A>(hr, N, A(0)) * inv_n;
    } else {
      std::tie(mean, var) = row_mean_var<A>(hr, N, inv_n);
    }
    const A rstd = A(1) / std::sqrt(var + a.eps);
    if (a.mean) a.mean[i] = mean;
    a.rstd[i] = rstd;
    normalize(hr, yr, N, mean, rstd, a.w, a.b);
    if (!kNative || a.stream) write_row(yr, a.y + i * N, N, a.stream, tmp);
  }
  if (a.stream) stream_fence();
}

// ---- backward -------------------------------------------------------------------------------------

// Pass 1 over a row: s1 = sum(w*dy), s2 = sum(w*dy*xhat), and the dweight/dbias partials of this block.
// h and g are rows in A, or bfloat16 bits (E = uint16_t).
template <typename A, bool kW, bool kDW, bool kDB, typename E = A>
void bwd_row_sums(const E* __restrict h, const E* __restrict g, int64_t n, A mean, A rstd,
                  const A* __restrict w, A* __restrict dw_part, A* __restrict db_part, A* s1,
                  A* s2) {
  A sums[2];
  cascade_sum<A, 2>(n, [&](int64_t k, int64_t l, A (*acc)[kLanes]) {
    const A gk = elem(g, k);
    const A xhat = (elem(h, k) - mean) * rstd;
    const A gw = kW ? gk * w[k] : gk;
    acc[0][l] += gw;
    acc[1][l] += gw * xhat;
    if constexpr (kDW) dw_part[k] += gk * xhat;
    if constexpr (kDB) db_part[k] += gk;
  }, sums);
  *s1 = sums[0];
  *s2 = sums[1];
}

// Pass 2: dx = rstd * (w*dy - c1 - xhat * c2) [+ dh]; dx may be g itself (in place).
template <typename A, bool kW, bool kDH>
void bwd_row_dx(const A* h, const A* g, const A* dh, A* dx, int64_t n, A mean, A rstd,
                const A* __restrict w, A c1, A c2) {
  for (int64_t k = 0; k < n; ++k) {
    const A xhat = (h[k] - mean) * rstd;
    const A gw = kW ? g[k] * w[k] : g[k];
    A v = rstd * (gw - c1 - xhat * c2);
    if constexpr (kDH) v += dh[k];
    dx[k] = v;
  }
}

// Pass 2 for a bfloat16 row without dh, read and written as bf16 (no fp32 row buffers).
template <bool kW>
void bwd_row_dx_bf16(const uint16_t* h, const uint16_t* g, uint16_t* dx, int64_t n, float mean,
                     float rstd, const float* __restrict w, float c1, float c2) {
  for (int64_t k = 0; k < n; ++k) {
    const float xhat = (elem(h, k) - mean) * rstd;
    const float gw = kW ? elem(g, k) * w[k] : elem(g, k);
    const float v = rstd * (gw - c1 - xhat * c2);
    uint32_t u;
    std::memcpy(&u, &v, sizeof(u));
    // Round to nearest even, as c10::BFloat16 does; NaN stays a (quiet) NaN.
    const uint16_t rounded = static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
    dx[k] = (v != v) ? static_cast<uint16_t>(0x7FC0) : rounded;
  }
}

template <typename A, typename E = A>
using RowSumsFn = void (*)(const E*, const E*, int64_t, A, A, const A*, A*, A*, A*, A*);
template <typename A>
using RowDxFn = void (*)(const A*, const A*, const A*, A*, int64_t, A, A, const A*, A, A);

template <typename A, bool kW, typename E>
RowSumsFn<A, E> pick_row_sums_w(bool dw, bool db) {
  if (dw) return db ? bwd_row_sums<A, kW, true, true, E> : bwd_row_sums<A, kW, true, false, E>;
  return db ? bwd_row_sums<A, kW, false, true, E> : bwd_row_sums<A, kW, false, false, E>;
}

template <typename A, typename E = A>
RowSumsFn<A, E> pick_row_sums(bool w, bool dw, bool db) {
  return w ? pick_row_sums_w<A, true, E>(dw, db) : pick_row_sums_w<A, false, E>(dw, db);
}

template <typename A>
RowDxFn<A> pick_row_dx(bool w, bool dh) {
  if (w) return dh ? bwd_row_dx<A, true, true> : bwd_row_dx<A, true, false>;
  return dh ? bwd_row_dx<A, false, true> : bwd_row_dx<A, false, false>;
}

template <typename T>
struct BwdArgs {
  using A = acc_t<T>;
  const T* dy;
  int64_t dy_stride;
  const T* h;
  int64_t h_stride;
  const T* dh;  // or nullptr
  int64_t dh_stride;
  T* dx;            // (M, N) contiguous
  const A* mean;    // (M,) or nullptr (rms)
  const A* rstd;    // (M,)
  const A* w;       // (N,) in A, or nullptr
  int64_t N;
  bool stream;      // write dx with streaming stores
};

// Rows [r0, r1); dw_part / db_part: this block's (N,) partial sums (or nullptr), already zeroed.
// scratch: 4 * N values of A.
template <typename T>
void layer_norm_bwd_rows(const BwdArgs<T>& a, int64_t r0, int64_t r1, acc_t<T>* dw_part,
                         acc_t<T>* db_part, acc_t<T>* scratch) {
  using A = acc_t<T>;
  constexpr bool kNative = std::is_same_v<T, A>;
  const int64_t N = a.N;
  const A inv_n = N > 0 ? A(1) / A(N) : A(0);
  const RowSumsFn<A> row_sums = pick_row_sums<A>(a.w != nullptr, dw_part != nullptr, db_part != nullptr);
  const RowDxFn<A> row_dx = pick_row_dx<A>(a.w != nullptr, a.dh != nullptr);
  A* hb = scratch;
  A* gb = scratch + N;
  A* dhb = scratch + 2 * N;
  void* tmp = scratch + 3 * N;  // a row in T, for streaming
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    if (!a.dh && !a.stream) {  // bf16 rows without dh: both passes straight from h and dy
      const RowSumsFn<A, uint16_t> row_sums_bf16 =
          pick_row_sums<A, uint16_t>(a.w != nullptr, dw_part != nullptr, db_part != nullptr);
      const auto row_dx_bf16 = a.w ? bwd_row_dx_bf16<true> : bwd_row_dx_bf16<false>;
      for (int64_t i = r0; i < r1; ++i) {
        const auto* hr = reinterpret_cast<const uint16_t*>(a.h + i * a.h_stride);
        const auto* gr = reinterpret_cast<const uint16_t*>(a.dy + i * a.dy_stride);
        const A mean = a.mean ? a.mean[i] : A(0);
        const A rstd = a.rstd[i];
        A s1, s2;
        row_sums_bf16(hr, gr, N, mean, rstd, a.w, dw_part, db_part, &s1, &s2);
        const A c1 = a.mean ? s1 * inv_n : A(0);  // RMSNorm has no mean term
        const A c2 = s2 * inv_n;
        const A scale = (N == 1 && a.mean) ? A(0) : rstd;  // see below
        row_dx_bf16(hr, gr, reinterpret_cast<uint16_t*>(a.dx + i * N), N, mean, scale, a.w, c1, c2);
      }
      return;
    }
  }
  for (int64_t i = r0; i < r1; ++i) {
    const A *hr, *gr, *dhr = nullptr;
    A* dxr;
    if constexpr (kNative) {
      hr = a.h + i * a.h_stride;
      gr = a.dy + i * a.dy_stride;
      if (a.dh) dhr = a.dh + i * a.dh_stride;
      dxr = a.stream ? gb : a.dx + i * N;
    } else {
      load_row(a.h + i * a.h_stride, hb, N);
      load_row(a.dy + i * a.dy_stride, gb, N);
      if (a.dh) {
        load_row(a.dh + i * a.dh_stride, dhb, N);
        dhr = dhb;
      }
      hr = hb;
      gr = gb;
      dxr = gb;  // in place: element k of dy is read before dx[k] is written
    }
    const A mean = a.mean ? a.mean[i] : A(0);
    const A rstd = a.rstd[i];
    A s1, s2;
    row_sums(hr, gr, N, mean, rstd, a.w, dw_part, db_part, &s1, &s2);
    const A c1 = a.mean ? s1 * inv_n : A(0);  // RMSNorm has no mean term
    const A c2 = s2 * inv_n;
    // LayerNorm of one element has y = b: its dx is exactly 0 (dh only); scale 0 keeps it exact
    // where FMA contraction of w*dy - c1 would leave a rounding residue times a large rstd.
    const A scale = (N == 1 && a.mean) ? A(0) : rstd;
    row_dx(hr, gr, dhr, dxr, N, mean, scale, a.w, c1, c2);
    if (!kNative || a.stream) write_row(dxr, a.dx + i * N, N, a.stream, tmp);
  }
  if (a.stream) stream_fence();
}

// Number of row blocks for the dweight/dbias partials: a function of (M, N) only, so the reduction
// order (and the bits of the result) do not depend on the thread count. At least 8 rows per block,
// at most 64 blocks, and the partials capped near 2^21 values per output.
int64_t num_row_blocks(int64_t M, int64_t N) {
  int64_t nb = std::min<int64_t>(64, (M + 7) / 8);
  nb = std::min<int64_t>(nb, std::max<int64_t>(4, (int64_t(1) << 21) / std::max<int64_t>(N, 1)));
  return std::max<int64_t>(nb, 1);
}

// out[j] = sum over blocks, in block order, of parts[blk * N + j], summed in A and stored in out's dtype
// (P: fp32, fp64, fp16 or bf16; one rounding, the same as summing into an A tensor and then .to(P)).
template <typename A, typename P>
void reduce_partials_to(const A* parts, int64_t nblocks, int64_t N, P* out) {
  constexpr int64_t kCols = 2048;
  at::parallel_for(0, N, kCols, [&](int64_t j0, int64_t j1) {
    for (int64_t c0 = j0; c0 < j1; c0 += kCols) {
      const int64_t c1 = std::min(j1, c0 + kCols);
      A sum[kCols];
      std::copy(parts + c0, parts + c1, sum);
      for (int64_t blk = 1; blk < nblocks; ++blk) {
        const A* p = parts + blk * N + c0;
        for (int64_t j = 0; j < c1 - c0; ++j) sum[j] += p[j];
      }
      for (int64_t j = 0; j < c1 - c0; ++j) out[c0 + j] = static_cast<P>(sum[j]);
    }
  });
}

template <typename A>
void reduce_partials(const A* parts, int64_t nblocks, int64_t N, at::Tensor& out) {
  switch (out.scalar_type()) {
    case at::kFloat: return reduce_partials_to<A>(parts, nblocks, N, out.mutable_data_ptr<float>());
    case at::kDouble: return reduce_partials_to<A>(parts, nblocks, N, out.mutable_data_ptr<double>());
    case at::kHalf: return reduce_partials_to<A>(parts, nblocks, N, out.mutable_data_ptr<c10::Half>());
    case at::kBFloat16: return reduce_partials_to<A>(parts, nblocks, N, out.mutable_data_ptr<c10::BFloat16>());
    default: TORCH_CHECK(false, "layer_norm_bwd: weight dtype must be float32, float64, float16 or bfloat16, got ",
                         out.scalar_type());
  }
}

// ---- output allocation ----------------------------------------------------------------------------

// at::empty for a large output, with transparent huge pages requested before the first touch. A fresh
// 64 MiB output otherwise costs 16384 page faults on its first write, which took longer than the
// kernel itself (measured: 4 KiB pages ~55 ms, huge pages ~8 ms per 64 MiB on the dev machine, where
// THP is in "madvise" mode). Advice only: where it is refused or THP is off, nothing changes.
at::Tensor empty_large(c10::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor t = at::empty(sizes, options);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const auto begin = reinterpret_cast<uintptr_t>(t.data_ptr());
  // Only at 32 MiB and up: glibc serves smaller blocks again from its heap, whose pages are
  // already mapped after the first call; advising those measured slower (4096x768 fp32, 2 threads).
  if (t.nbytes() >= 16 * kHuge) {
    // only whole huge pages inside this buffer, so no neighbouring allocation is affected
    const uintptr_t a = (begin + kHuge - 1) & ~(kHuge - 1);
    const uintptr_t e = (begin + t.nbytes()) & ~(kHuge - 1);
    if (e > a) (void)madvise(reinterpret_cast<void*>(a), e - a, MADV_HUGEPAGE);
  }
#endif
  return t;
}

// ---- argument checks ------------------------------------------------------------------------------

bool is_supported_dtype(c10::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
}

void check_cpu(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got device ", t.device());
}

void check_rows(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.dim() == 2, op, ": ", name, " must be 2-D (M, N), got shape ", t.sizes());
  TORCH_CHECK(t.size(1) <= 1 || t.stride(1) == 1, op, ": ", name,
              " must have stride(1) == 1 (contiguous rows), got strides ", t.strides());
}

void check_like(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* name,
                const char* ref_name) {
  check_cpu(t, op, name);
  TORCH_CHECK(t.sizes() == ref.sizes(), op, ": ", name, " has shape ", t.sizes(), " but ", ref_name,
              " has shape ", ref.sizes());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(),
              " but ", ref_name, " has dtype ", ref.scalar_type());
}

// Weight/bias: (N,), dtype == x.dtype or float32.
void check_param(const at::Tensor& p, const at::Tensor& x, const char* op, const char* name) {
  check_cpu(p, op, name);
  TORCH_CHECK(p.dim() == 1 && p.size(0) == x.size(1), op, ": ", name, " must have shape (N,) = (",
              x.size(1), ",), got ", p.sizes());
  TORCH_CHECK(p.scalar_type() == x.scalar_type() || p.scalar_type() == at::kFloat, op, ": ", name,
              " must have x's dtype (", x.scalar_type(), ") or Float, got ", p.scalar_type());
}

// A checked weight/bias as a contiguous (N,) array in the accumulation type A: the tensor's own data when it
// already is one, else a widened copy in `store` (a plain loop: a tensor conversion through the dispatcher cost
// a few microseconds per parameter, a third of a 16-row bf16 call).
template <typename A>
const A* param_data(const std::optional<at::Tensor>& p, std::vector<A>& store) {
  if (!p) return nullptr;
  if (p->scalar_type() == c10::CppTypeToScalarType<A>::value && p->is_contiguous()) return p->const_data_ptr<A>();
  const int64_t n = p->size(0), st = p->stride(0);
  store.resize(n);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p->scalar_type(), "layer_norm_param", [&] {
    const scalar_t* src = p->const_data_ptr<scalar_t>();
    for (int64_t j = 0; j < n; ++j) store[j] = static_cast<A>(src[j * st]);
  });
  return store.data();
}

// Inputs read row by row: any row stride is fine; a strided last dim gets one contiguous copy.
at::Tensor rows_view(const at::Tensor& t) {
  return (t.size(1) <= 1 || t.stride(1) == 1) ? t : t.contiguous();
}

c10::ScalarType acc_dtype(c10::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// ---- ops ------------------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd_cpu(
    const at::Tensor& x, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& residual, double eps, bool rms) {
  constexpr const char* op = "layer_norm_fwd";
  check_cpu(x, op, "x");
  check_rows(x, op, "x");
  TORCH_CHECK(is_supported_dtype(x.scalar_type()), op,
              ": x must be float32, float16, bfloat16 or float64, got ", x.scalar_type());
  TORCH_CHECK(!(rms && bias.has_value()), op, ": bias must be None when rms=True (RMSNorm has no bias)");
  TORCH_CHECK(eps >= 0, op, ": eps must be >= 0, got ", eps);
  const int64_t M = x.size(0), N = x.size(1);
  const auto acc = acc_dtype(x.scalar_type());
  at::Tensor res;
  if (weight) check_param(*weight, x, op, "weight");
  if (bias) check_param(*bias, x, op, "bias");
  if (residual) {
    check_like(*residual, x, op, "residual", "x");
    res = rows_view(*residual);
  }

  at::Tensor y = empty_large({M, N}, x.options());                                   // (M, N)
  at::Tensor h = residual ? empty_large({M, N}, x.options()) : at::empty({0}, x.options());
  at::Tensor mean = at::empty({rms ? 0 : M}, x.options().dtype(acc));              // (M,) or (0,)
  at::Tensor rstd = at::empty({M}, x.options().dtype(acc));                        // (M,)
  if (M == 0) return {y, h, mean, rstd};

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "layer_norm_fwd_cpu", [&] {
    using A = acc_t<scalar_t>;
    FwdArgs<scalar_t> a;
    a.x = x.const_data_ptr<scalar_t>();
    a.x_stride = x.stride(0);
    a.res = res.defined() ? res.const_data_ptr<scalar_t>() : nullptr;
    a.res_stride = res.defined() ? res.stride(0) : 0;
    a.y = y.mutable_data_ptr<scalar_t>();
    a.h = residual ? h.mutable_data_ptr<scalar_t>() : nullptr;
    a.mean = rms ? nullptr : mean.mutable_data_ptr<A>();
    a.rstd = rstd.mutable_data_ptr<A>();
    std::vector<A> w_store, b_store;
    a.w = param_data<A>(weight, w_store);
    a.b = param_data<A>(bias, b_store);
    a.N = N;
    a.eps = static_cast<A>(eps);
    a.rms = rms;
    a.stream = y.nbytes() >= kStreamBytes;
    const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(N, 1));
    at::parallel_for(0, M, grain, [&](int64_t r0, int64_t r1) {
      std::vector<A> scratch(3 * N);
      layer_norm_fwd_rows<scalar_t>(a, r0, r1, scratch.data());
    });
  });
  return {y, h, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_bwd_cpu(
    const at::Tensor& dy_in, const at::Tensor& h, const std::optional<at::Tensor>& weight,
    const at::Tensor& mean_in, const at::Tensor& rstd_in, const std::optional<at::Tensor>& dh_in,
    bool rms, bool has_bias) {
  constexpr const char* op = "layer_norm_bwd";
  check_cpu(h, op, "h");
  check_rows(h, op, "h");
  TORCH_CHECK(is_supported_dtype(h.scalar_type()), op,
              ": h must be float32, float16, bfloat16 or float64, got ", h.scalar_type());
  check_like(dy_in, h, op, "dy", "h");
  const int64_t M = h.size(0), N = h.size(1);
  const auto acc = acc_dtype(h.scalar_type());
  at::Tensor dy = rows_view(dy_in);
  at::Tensor dh;
  if (dh_in) {
    check_like(*dh_in, h, op, "dh", "h");
    dh = rows_view(*dh_in);
  }
  if (weight) check_param(*weight, h, op, "weight");
  check_cpu(rstd_in, op, "rstd");
  TORCH_CHECK(rstd_in.dim() == 1 && rstd_in.size(0) == M, op, ": rstd must have shape (M,) = (", M,
              ",), got ", rstd_in.sizes());
  at::Tensor rstd = rstd_in.to(acc).contiguous();
  at::Tensor mean;
  if (!rms) {
    check_cpu(mean_in, op, "mean");
    TORCH_CHECK(mean_in.dim() == 1 && mean_in.size(0) == M, op, ": mean must have shape (M,) = (", M,
                ",) when rms=False, got ", mean_in.sizes());
    mean = mean_in.to(acc).contiguous();
  }

  const auto param_dtype = weight ? weight->scalar_type() : h.scalar_type();
  at::Tensor dx = empty_large({M, N}, h.options());  // (M, N)
  const bool need_dw = weight.has_value();
  at::Tensor dweight, dbias;  // (N,) in acc dtype while reducing
  at::Tensor partials;        // (2, nblocks, N): dweight then dbias partials per row block
  int64_t nblocks = 0;
  if (need_dw || has_bias) {
    nblocks = num_row_blocks(M, N);
    partials = empty_large({2, nblocks, N}, h.options().dtype(acc));
  }

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "layer_norm_bwd_cpu", [&] {
    using A = acc_t<scalar_t>;
    BwdArgs<scalar_t> a;
    a.dy = dy.const_data_ptr<scalar_t>();
    a.dy_stride = dy.stride(0);
    a.h = h.const_data_ptr<scalar_t>();
    a.h_stride = h.stride(0);
    a.dh = dh.defined() ? dh.const_data_ptr<scalar_t>() : nullptr;
    a.dh_stride = dh.defined() ? dh.stride(0) : 0;
    a.dx = dx.mutable_data_ptr<scalar_t>();
    a.mean = rms ? nullptr : mean.const_data_ptr<A>();
    a.rstd = rstd.const_data_ptr<A>();
    std::vector<A> w_store;
    a.w = param_data<A>(weight, w_store);
    a.N = N;
    a.stream = dx.nbytes() >= kStreamBytes;
    const int64_t scratch_n = 4 * N;

    if (nblocks == 0) {  // no parameter gradients: plain parallel over rows
      if (M == 0) return;
      const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(N, 1));
      at::parallel_for(0, M, grain, [&](int64_t r0, int64_t r1) {
        std::vector<A> scratch(scratch_n);
        layer_norm_bwd_rows<scalar_t>(a, r0, r1, nullptr, nullptr, scratch.data());
      });
      return;
    }

    // Stage 1: each row block accumulates its own partial sums (zeroed by the thread that uses them).
    A* dw_parts = partials.mutable_data_ptr<A>();  // (nblocks, N)
    A* db_parts = dw_parts + nblocks * N;          // (nblocks, N)
    // At least ~16K elements per task, as in the forward: a tiny call (16x768: two blocks of 8 rows) stays on
    // one thread instead of waking another for a few microseconds of work. The blocks, and so the bits of the
    // result, do not change.
    const int64_t block_elems = std::max<int64_t>(1, M / nblocks * N);
    const int64_t block_grain = std::max<int64_t>(1, (16384 + block_elems - 1) / block_elems);
    at::parallel_for(0, nblocks, block_grain, [&](int64_t b0, int64_t b1) {
      std::vector<A> scratch(scratch_n);
      for (int64_t blk = b0; blk < b1; ++blk) {
        A* dwp = need_dw ? dw_parts + blk * N : nullptr;
        A* dbp = has_bias ? db_parts + blk * N : nullptr;
        if (dwp) std::fill(dwp, dwp + N, A(0));
        if (dbp) std::fill(dbp, dbp + N, A(0));
        layer_norm_bwd_rows<scalar_t>(a, blk * M / nblocks, (blk + 1) * M / nblocks, dwp, dbp,
                                      scratch.data());
      }
    });

    // Stage 2: add the partials in block order, parallel over columns, and store in the parameters' dtype
    // (a bf16 weight's gradient rounded once from the fp32 sum, as .to() would, without a second tensor).
    if (need_dw) dweight = at::empty({N}, h.options().dtype(param_dtype));
    if (has_bias) dbias = at::empty({N}, h.options().dtype(param_dtype));
    if (need_dw) reduce_partials<A>(dw_parts, nblocks, N, dweight);
    if (has_bias) reduce_partials<A>(db_parts, nblocks, N, dbias);
  });

  if (!need_dw) dweight = at::empty({0}, h.options().dtype(param_dtype));
  if (!has_bias) dbias = at::empty({0}, h.options().dtype(param_dtype));
  return {dx, dweight, dbias};
}

}  // namespace

TORCH_LIBRARY_IMPL(pyllm, CPU, m) {
  m.impl("layer_norm_fwd", &layer_norm_fwd_cpu);
  m.impl("layer_norm_bwd", &layer_norm_bwd_cpu);
}

}  // namespace pyllm

