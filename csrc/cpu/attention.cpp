// FlashAttention-2 on the CPU: attention_fwd / attention_bwd for TORCH_LIBRARY_IMPL(pyllm, CPU).
//
// Conventions (layouts, GQA by index, bottom-right causal alignment, padding mask, empty rows) are
// those of the header comment in csrc/pyllm.cpp. In short, per batch b and query head h
// (kv head g = h / (Hq / Hkv)):
//
//   S = scale * Q_h K_g^T          (Nq, Nk), never formed whole: tiles of (BQ, BK)
//   P = softmax(S) over visible keys;  out = P V_g;  lse = log sum_j exp(S_ij)
//
//   causal, Nq = 3, Nk = 5: query i sees key j iff j <= i + Nk - Nq
//        k0 k1 k2 k3 k4
//   q0    x  x  x  .  .
//   q1    x  x  x  x  .
//   q2    x  x  x  x  x
//
// Forward: parallel over (batch, head, query block); each task streams key blocks with an online
// softmax (running row max m and sum l in fp32, fp64 for double) and rescales its accumulator once
// at the end. Key blocks that causality hides entirely (or padding hides entirely) are skipped.
// Memory is linear in sequence length: no (Nq, Nk) tensor exists, only (BK, BQ) tiles per thread.
// Backward: delta = rowsum(dO * O) per query block, P recomputed from lse, then
//   dV += P^T dO,  dP = dO V^T,  dS = P * (dP - delta),  dQ += scale dS K,  dK += scale dS^T Q.
// Backward tasks are (batch, kv head, query-block split); each owns its dQ rows and accumulates dK/dV
// for its kv head privately (summed afterwards in a fixed order when a head is split). No atomics, no
// order dependence: gradients are bitwise reproducible run to run. The split count normally follows
// the thread count; `deterministic` makes it depend on the shape only, so results are also identical
// across thread counts.
//
// FlashAttention's features (attention_ext_fwd / attention_ext_bwd; the plain ops take the same path with
// them off): a sliding window (key blocks outside [key_start, key_end) of a query block are never visited,
// so a window of w costs O(N w)), softcap (s = cap * tanh(s / cap), gradient through 1 - tanh^2), ALiBi
// (-slope * |i + Nk - Nq - j|), an additive bias (read through broadcast strides; its gradient is dS,
// accumulated into a (B, Hq, Nq, Nk) buffer, or (1, Hq, Nq, Nk) for a bias shared by the batch, then summed to
// the bias's shape), and dropout with the Philox4x32-10
// mask every backend draws (csrc/pyllm.cpp): the forward scales P by keep / (1 - p) after the row sums,
// the backward regenerates the mask and uses dV += (P Z)^T dO, dS = P * (Z dP - delta).
//
// Packed variable-length sequences (attention_varlen_fwd / attention_varlen_bwd) run the same kernels in one
// call: Problem::seq(b) gives sequence b's lengths and first rows (read in place from cu_seqlens), the tasks are
// (sequence, head, query block) forward and (sequence, kv head, split) backward, handed to the threads longest
// first from a shared counter; no padding is computed or stored.
//
// Tile products run in a register-blocked at::vec micro-kernel (6 x 64 fp32 outputs per step, FMA);
// fp16/bf16 tiles are converted to fp32 once, when packed, and all math runs in fp32 (fp64 for
// double inputs, which gradcheck uses). Except bf16 on a CPU with AMX (Sapphire Rapids on): the forward's two
// products and the backward's five run on the tile unit in bf16 with fp32 accumulation, the softmax and dS in
// fp32 (see "bf16 on AMX tiles" below; PYLLM_CPU_AMX=0 turns it off).

// Use the widest at::vec implementation this compilation targets (before any ATen include).
#include "vec_capability.h"

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include "attention_args.h"
#include "attention_decode.h"

// The bf16 kernels on AMX tiles ("bf16 on AMX tiles" below): GCC 11 on (its AMX intrinsics and
// __builtin_cpu_supports("amx-tile")), x86-64 Linux (arch_prctl); other compilers keep the fp32 path.
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11 && defined(__x86_64__) && defined(__linux__)
#define PYLLM_ATTENTION_AMX 1
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#else
#define PYLLM_ATTENTION_AMX 0
#endif

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <optional>
#include <type_traits>
#include <vector>

namespace {

using at::vec::Vectorized;

constexpr int64_t kMaxHeadDim = 256;
// Tile sizes: queries per task (a multiple of the vector width) and keys per step. A (64 keys, 64 queries)
// fp32 score tile is 16 KiB; with Q^T and the output rows (16 KiB each at head_dim 64) a task's working set
// stays near L1 between a tile's product, softmax and use, and 64 keys per step keep the causal diagonal's
// wasted work small. (64 x 64 against 128 x 64, after the softmax passes were vectorized, 2 threads, Emerald
// Rapids 2026-11-30: forward 1.5 -> 1.7-2.0x SDPA and fwd+bwd 1.45 -> 1.7x at B8 H4 N128-256 D64 causal;
// equal within this VM's noise at B2 H8 N1024 and B4 H12 N512.)
constexpr int64_t kFwdBlockQ = 64;
constexpr int64_t kFwdBlockK = 64;
constexpr int64_t kBwdBlockQ = 64;
constexpr int64_t kBwdBlockK = 64;

// ---------------------------------------------------------------------------------------------
// Tile products. Every operand that is read by vector (B, C) has rows of a multiple of the vector
// width W (packed tiles are zero-padded; K/V rows are read in place only when head_dim % W == 0), so
// the micro-kernel needs no column tail:
//
//   C (M, N) = alpha * sum_p a(i, p) * B[p][:]  (+ C if accumulate),   N % W == 0
//   a(i, p) = A[i * ai + p * ap]   (ai = lda, ap = 1: A;  ai = 1, ap = lda: A transposed)
//
// A register tile of MR rows x NV vectors of C stays in registers over the whole p loop
// (6 x 4 zmm accumulators + 4 B vectors + 1 broadcast = 29 of the 32 AVX-512 registers).

constexpr int kMR = 6;
constexpr int kNV = 4;

template <typename T, int MR, int NV>
void tile_kernel(int64_t K, const T* A, int64_t ai, int64_t ap, const T* B, int64_t ldb, T* C,
                 int64_t ldc, T alpha, bool accumulate) {
  using V = Vectorized<T>;
  constexpr int W = V::size();
  V c[MR][NV];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 8
    for (int j = 0; j < NV; ++j) c[r][j] = V(T(0));
  for (int64_t p = 0; p < K; ++p) {
    V b[NV];
#pragma GCC unroll 8
    for (int j = 0; j < NV; ++j) b[j] = V::loadu(B + p * ldb + j * W);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const V a(A[r * ai + p * ap]);
#pragma GCC unroll 8
      for (int j = 0; j < NV; ++j) c[r][j] = at::vec::fmadd(a, b[j], c[r][j]);
    }
  }
  const V va(alpha);
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 8
    for (int j = 0; j < NV; ++j) {
      V res = c[r][j] * va;
      if (accumulate) res = res + V::loadu(C + r * ldc + j * W);
      res.store(C + r * ldc + j * W);
    }
}

template <typename T, int MR>
void tile_nv(int nv, int64_t K, const T* A, int64_t ai, int64_t ap, const T* B, int64_t ldb, T* C,
             int64_t ldc, T alpha, bool acc) {
  switch (nv) {
    case 1: return tile_kernel<T, MR, 1>(K, A, ai, ap, B, ldb, C, ldc, alpha, acc);
    case 2: return tile_kernel<T, MR, 2>(K, A, ai, ap, B, ldb, C, ldc, alpha, acc);
    case 3: return tile_kernel<T, MR, 3>(K, A, ai, ap, B, ldb, C, ldc, alpha, acc);
    default: return tile_kernel<T, MR, 4>(K, A, ai, ap, B, ldb, C, ldc, alpha, acc);
  }
}

// C (M, N) = alpha * op(A) B (+ C). N must be a multiple of the vector width; B and C rows padded.
template <typename T>
void matmul(int64_t M, int64_t N, int64_t K, const T* A, int64_t ai, int64_t ap, const T* B,
            int64_t ldb, T* C, int64_t ldc, T alpha, bool accumulate) {
  constexpr int64_t W = Vectorized<T>::size();
  static_assert(kMR == 6 && kNV == 4, "tile_nv/matmul dispatch below is written for 6 x 4");
  for (int64_t j = 0; j < N; j += kNV * W) {
    const int nv = static_cast<int>(std::min<int64_t>(kNV, (N - j) / W));
    const T* Bj = B + j;
    for (int64_t i = 0; i < M; i += kMR) {
      const T* Ai = A + i * ai;
      T* Cij = C + i * ldc + j;
      switch (std::min<int64_t>(kMR, M - i)) {
        case 1: tile_nv<T, 1>(nv, K, Ai, ai, ap, Bj, ldb, Cij, ldc, alpha, accumulate); break;
        case 2: tile_nv<T, 2>(nv, K, Ai, ai, ap, Bj, ldb, Cij, ldc, alpha, accumulate); break;
        case 3: tile_nv<T, 3>(nv, K, Ai, ai, ap, Bj, ldb, Cij, ldc, alpha, accumulate); break;
        case 4: tile_nv<T, 4>(nv, K, Ai, ai, ap, Bj, ldb, Cij, ldc, alpha, accumulate); break;
        case 5: tile_nv<T, 5>(nv, K, Ai, ai, ap, Bj, ldb, Cij, ldc, alpha, accumulate); break;
        default: tile_nv<T, 6>(nv, K, Ai, ai, ap, Bj, ldb, Cij, ldc, alpha, accumulate); break;
      }
    }
  }
}

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// Packing (with dtype conversion: fp16/bf16 become fp32 here, once per tile).

// d[0, n) = s[0, n) converted (bf16/fp16 to fp32 by vector; the same type copied).
template <typename S, typename T>
inline void convert_row(const S* s, T* d, int64_t n) {
  if constexpr (std::is_same_v<S, T>) {
    std::memcpy(d, s, n * sizeof(T));
    return;
  }
  int64_t c = 0;
  if constexpr (std::is_same_v<T, float> && at::vec::is_reduced_floating_point_v<S>) {
    constexpr int64_t W = Vectorized<float>::size();
    for (; c + W <= n; c += W) {
      Vectorized<float> x;
      at::vec::load_to_float(s + c, x);
      x.store(d + c);
    }
  }
  for (; c < n; ++c) d[c] = static_cast<T>(s[c]);
}

// dst (rows_pad, Dp) = src (rows, D) with row stride ld; zeros elsewhere.
template <typename S, typename T>
void pack_rows(const S* src, int64_t ld, int64_t rows, int64_t D, T* dst, int64_t Dp, int64_t rows_pad) {
  for (int64_t r = 0; r < rows; ++r) {
    T* d = dst + r * Dp;
    convert_row(src + r * ld, d, D);
    for (int64_t c = D; c < Dp; ++c) d[c] = T(0);
  }
  std::fill(dst + rows * Dp, dst + rows_pad * Dp, T(0));
}

// dst (D, BK) = src (rows, D)^T, columns >= rows zeroed.
// fp32 results go through at::vec::transpose_mxn (16 x 16 register transposes; element by element, the strided
// stores of this copy cost a third of a 128-query block's softmax time); fp16 / bf16 are widened 16 rows at a time.
template <typename S, typename T>
void pack_transposed(const S* src, int64_t ld, int64_t rows, int64_t D, T* dst, int64_t BK) {
  for (int64_t d = 0; d < D; ++d) std::fill(dst + d * BK + rows, dst + (d + 1) * BK, T(0));
  if constexpr (std::is_same_v<T, float> && std::is_same_v<S, float>) {
    at::vec::transpose_mxn<float>(src, ld, dst, BK, static_cast<int>(rows), static_cast<int>(D));
  } else if constexpr (std::is_same_v<T, float>) {
    float tmp[16 * kMaxHeadDim];
    for (int64_t r0 = 0; r0 < rows; r0 += 16) {
      const int64_t m = std::min<int64_t>(16, rows - r0);
      for (int64_t r = 0; r < m; ++r) convert_row(src + (r0 + r) * ld, tmp + r * D, D);
      at::vec::transpose_mxn<float>(tmp, D, dst + r0, BK, static_cast<int>(m), static_cast<int>(D));
    }
  } else {
    for (int64_t r = 0; r < rows; ++r) {
      const S* s = src + r * ld;
      for (int64_t d = 0; d < D; ++d) dst[d * BK + r] = static_cast<T>(s[d]);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Column helpers of the forward's online softmax over S^T (nk rows of keys, query columns [0, mqp), row stride
// ld). Four vector columns at a time: one column's chain of max or add is bound by the instruction's latency.

// out[i] = max(m[i], max_j ST[j][i])  (no NaN logic)
template <typename T>
void column_max(const T* ST, int64_t ld, int64_t nk, int64_t mqp, const T* m, T* out) {
  using V = Vectorized<T>;
  constexpr int64_t W = V::size();
  int64_t i = 0;
  for (; i + 4 * W <= mqp; i += 4 * W) {
    V a0 = V::loadu(m + i), a1 = V::loadu(m + i + W), a2 = V::loadu(m + i + 2 * W), a3 = V::loadu(m + i + 3 * W);
    for (int64_t j = 0; j < nk; ++j) {
      const T* r = ST + j * ld + i;
      a0 = at::vec::clamp_min(V::loadu(r), a0);
      a1 = at::vec::clamp_min(V::loadu(r + W), a1);
      a2 = at::vec::clamp_min(V::loadu(r + 2 * W), a2);
      a3 = at::vec::clamp_min(V::loadu(r + 3 * W), a3);
    }
    a0.store(out + i), a1.store(out + i + W), a2.store(out + i + 2 * W), a3.store(out + i + 3 * W);
  }
  for (; i < mqp; i += W) {
    V a = V::loadu(m + i);
    for (int64_t j = 0; j < nk; ++j) a = at::vec::clamp_min(V::loadu(ST + j * ld + i), a);
    a.store(out + i);
  }
}

inline Vectorized<float> vexp(const Vectorized<float>& x);
inline Vectorized<double> vexp(const Vectorized<double>& x);

// ST[j][i] = exp(ST[j][i] - mu[i]);  l[i] = l[i] alpha[i] + sum_j ST[j][i]
template <typename T>
void column_exp_sum(T* ST, int64_t ld, int64_t nk, int64_t mqp, const T* mu, const T* alpha, T* l) {
  using V = Vectorized<T>;
  constexpr int64_t W = V::size();
  int64_t i = 0;
  for (; i + 4 * W <= mqp; i += 4 * W) {
    const V m0 = V::loadu(mu + i), m1 = V::loadu(mu + i + W), m2 = V::loadu(mu + i + 2 * W),
            m3 = V::loadu(mu + i + 3 * W);
    V s0(T(0)), s1(T(0)), s2(T(0)), s3(T(0));
    for (int64_t j = 0; j < nk; ++j) {
      T* r = ST + j * ld + i;
      const V e0 = vexp(V::loadu(r) - m0), e1 = vexp(V::loadu(r + W) - m1), e2 = vexp(V::loadu(r + 2 * W) - m2),
              e3 = vexp(V::loadu(r + 3 * W) - m3);
      e0.store(r), e1.store(r + W), e2.store(r + 2 * W), e3.store(r + 3 * W);
      s0 = s0 + e0, s1 = s1 + e1, s2 = s2 + e2, s3 = s3 + e3;
    }
    (V::loadu(l + i) * V::loadu(alpha + i) + s0).store(l + i);
    (V::loadu(l + i + W) * V::loadu(alpha + i + W) + s1).store(l + i + W);
    (V::loadu(l + i + 2 * W) * V::loadu(alpha + i + 2 * W) + s2).store(l + i + 2 * W);
    (V::loadu(l + i + 3 * W) * V::loadu(alpha + i + 3 * W) + s3).store(l + i + 3 * W);
  }
  for (; i < mqp; i += W) {
    const V vm = V::loadu(mu + i);
    V sum(T(0));
    for (int64_t j = 0; j < nk; ++j) {
      const V e = vexp(V::loadu(ST + j * ld + i) - vm);
      e.store(ST + j * ld + i);
      sum = sum + e;
    }
    (V::loadu(l + i) * V::loadu(alpha + i) + sum).store(l + i);
  }
}

// ---------------------------------------------------------------------------------------------
// Row helpers (at::vec).

#if defined(CPU_CAPABILITY_AVX512) || PYLLM_ATTENTION_AMX
// 2^t, 16 lanes: 2^(t - floor t) by a degree-5 polynomial fitted for relative error on [0, 1) (7.5e-8 before fp32
// rounding; at::vec's exp_u20 promises 20 ulp, 2.4e-6), times 2^floor(t) by vscalefps, which takes the floor
// itself. t <= -126 gives 0 exactly through the write mask (exp(-inf) = 0 for a masked key, and no denormals,
// which cost a microcode assist each: a causal call had taken as long as a full one); NaN stays NaN; above 128,
// inf. 10 instructions against exp_u20's ~20. Compiled for AVX-512 whatever the build's -march (the AMX kernels
// call it too); callers fold log2(e) into their own multiply or FMA.
__attribute__((target("avx512f,avx512dq"))) inline __m512 exp2_fast(__m512 t) {
  const __mmask16 normal = _mm512_cmp_ps_mask(t, _mm512_set1_ps(-126.0f), _CMP_NLE_UQ);  // t > -126 or NaN
  const __m512 f = _mm512_reduce_ps(t, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);      // t - floor(t)
  __m512 y = _mm512_set1_ps(1.8775744416717742e-3f);
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(8.9893454979146010e-3f));
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(5.5826313513322500e-2f));
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(2.4015361857902087e-1f));
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(6.9315307302243600e-1f));
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(9.9999992506670590e-1f));
  return _mm512_maskz_scalef_ps(normal, y, t);
}
#endif

#if defined(CPU_CAPABILITY_AVX512)
inline Vectorized<float> vexp(const Vectorized<float>& x) {
  return exp2_fast(_mm512_mul_ps(x, _mm512_set1_ps(1.4426950408889634f)));
}
#else
inline Vectorized<float> vexp(const Vectorized<float>& x) { return x.exp_u20(); }
#endif
inline Vectorized<double> vexp(const Vectorized<double>& x) { return x.exp(); }

template <typename T>
void scale_row(T* row, int64_t n, T a) {
  using V = Vectorized<T>;
  at::vec::map([a](V x) { return x * V(a); }, row, row, n);
}

template <typename T>
void fill_row(T* row, int64_t n, T value) {
  std::fill(row, row + n, value);
}

// Per-thread scratch tiles, 64-byte (cache-line) aligned.
template <typename T>
struct Scratch {
  explicit Scratch(int64_t n)
      : ptr(static_cast<T*>(std::aligned_alloc(64, ((n * sizeof(T) + 63) / 64) * 64))) {
    TORCH_CHECK(ptr != nullptr, "attention: out of memory for a ", n, "-element scratch buffer");
  }
  ~Scratch() { std::free(ptr); }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  T* ptr;
};

// Shapes and element strides of (B, N, H, D) tensors; the last dim is contiguous.
struct Strides {
  int64_t b, n, h;
};
inline Strides strides_of(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2)}; }

// Score modifications and dropout of one call (all off by default).
struct Features {
  int64_t window_left = -1, window_right = -1;  // -1 = unbounded
  double softcap = 0;
  const float* alibi = nullptr;  // (Hq,) or (B, Hq) float32 contiguous
  int64_t alibi_sb = 0;          // batch stride of alibi (0 for (Hq,))
  const void* bias = nullptr;    // compute-dtype bias read as bias[b*sb + h*sh + i*si + j*sj] (broadcast = 0)
  int64_t bias_sb = 0, bias_sh = 0, bias_si = 0, bias_sj = 0;
  // The bias gradient dS, accumulated (+=) into a zero-filled compute-dtype buffer (Bd, Hq, Nq, Nk), or nullptr.
  // Bd = B (dbias_sb = Hq * Nq * Nk), or 1 (dbias_sb = 0) for a bias broadcast over the batch: the backward's
  // tasks then own a kv head for every sequence, so the accumulation over the batch is race-free and the
  // buffer has the bias's own size instead of B times it.
  void* dbias = nullptr;
  int64_t dbias_sb = 0;
  uint32_t drop_threshold = 0;   // dropout: keep iff philox bits >= threshold; 0 = no dropout
  double drop_scale = 1;         // 1 / (1 - p)
  uint64_t seed = 0, offset = 0;
  int64_t drop_lq = 0, drop_lk = 0;  // the (Nq, Nk) of the dropout index layout (max_seqlen for packed)
  bool modifies_scores() const { return softcap > 0 || alibi != nullptr || bias != nullptr; }
};

struct Problem {
  int64_t B, Nq, Nk, Hq, Hkv, D;
  bool causal;
  double scale;
  const bool* mask;  // (B, Nk) contiguous, or nullptr
  Features f = {};
  // lse (B, Hq, Nq): element (b, h, i) at b * lse_sb + h * lse_sh + qr0 + i (packed: (Hq, total_q)).
  int64_t lse_sb = 0, lse_sh = 0;
  // Packed sequences (attention_varlen_*; nullptr otherwise): B sequences, sequence b is rows
  // cu_q[b]..cu_q[b+1] of q, out and lse against rows cu_k[b]..cu_k[b+1] of k and v; Nq and Nk are then the
  // longest lengths, and seq(b) gives the problem of one sequence. Nothing is padded: inputs are read in place.
  const int64_t* cu_q = nullptr;
  const int64_t* cu_k = nullptr;
  // Set by seq(b): the sequence's first row in the inputs (qr0, kr0; 0 for a padded batch, whose rows are
  // reached through the batch stride) and in the contiguous outputs (qg0, kg0 = b * Nq, b * Nk when padded).
  int64_t qr0 = 0, kr0 = 0, qg0 = 0, kg0 = 0;
  Problem seq(int64_t b) const {
    Problem s = *this;
    if (cu_q != nullptr) {
      s.qr0 = s.qg0 = cu_q[b];
      s.kr0 = s.kg0 = cu_k[b];
      s.Nq = cu_q[b + 1] - cu_q[b];
      s.Nk = cu_k[b + 1] - cu_k[b];
    } else {
      s.qg0 = b * Nq;
      s.kg0 = b * Nk;
    }
    return s;
  }
  int64_t group() const { return Hq / Hkv; }
  int64_t right() const { return causal ? 0 : f.window_right; }  // causal is a window with right = 0
  bool windowed() const { return right() >= 0 || f.window_left >= 0; }
  // Number of keys query row i may see from the start of the key axis (causal), clamped to [0, Nk].
  int64_t key_end(int64_t i) const {
    if (right() < 0) return Nk;
    return std::clamp<int64_t>(i + 1 + Nk - Nq + right(), 0, Nk);
  }
  // First key query row i may see (sliding window), clamped to [0, Nk].
  int64_t key_start(int64_t i) const {
    if (f.window_left < 0) return 0;
    return std::clamp<int64_t>(i + Nk - Nq - f.window_left, 0, Nk);
  }
};

// Philox4x32-10, word 0, for key (lo, hi of seed) and counters (lo, hi of base + i * stride, 0, 0), i < n:
// the generator of Triton's tl.randint and pyllm.reference.philox_bits. Rounds outside, lanes inside, so
// the compiler vectorizes the lanes (32 x 32 -> 64-bit products).
constexpr int64_t kPhiloxLanes = 256;
inline void philox_word0(uint64_t seed, uint64_t base, uint64_t stride, int64_t n, uint32_t* out) {
  uint32_t c1[kPhiloxLanes], c2[kPhiloxLanes], c3[kPhiloxLanes];
  for (int64_t i = 0; i < n; ++i) {
    const uint64_t ctr = base + static_cast<uint64_t>(i) * stride;
    out[i] = static_cast<uint32_t>(ctr);
    c1[i] = static_cast<uint32_t>(ctr >> 32);
    c2[i] = 0;
    c3[i] = 0;
  }
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int r = 0; r < 10; ++r) {
    for (int64_t i = 0; i < n; ++i) {
      const uint64_t pb = uint64_t(0xCD9E8D57u) * c2[i], pa = uint64_t(0xD2511F53u) * out[i];
      const uint32_t n0 = static_cast<uint32_t>(pb >> 32) ^ c1[i] ^ k0;
      const uint32_t n2 = static_cast<uint32_t>(pa >> 32) ^ c3[i] ^ k1;
      c1[i] = static_cast<uint32_t>(pb);
      c3[i] = static_cast<uint32_t>(pa);
      out[i] = n0;
      c2[i] = n2;
    }
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
}

// Dropout on a transposed tile (nk keys x mq queries, row stride ld): ST *= keep / (1 - p); with Z also
// Z = keep / (1 - p) (zeros in the padding columns).
template <typename T>
void dropout_tile(const Problem& p, T* ST, T* Z, int64_t ld, int64_t b, int64_t h, int64_t q0, int64_t mq,
                  int64_t k0, int64_t nk) {
  const Features& f = p.f;
  const T r = static_cast<T>(f.drop_scale);
  uint32_t bits[kPhiloxLanes];
  for (int64_t j = 0; j < nk; ++j) {
    const uint64_t base = f.offset + static_cast<uint64_t>(((b * p.Hq + h) * f.drop_lq + q0) * f.drop_lk + k0 + j);
    const uint64_t stride = static_cast<uint64_t>(f.drop_lk);
    for (int64_t i0 = 0; i0 < mq; i0 += kPhiloxLanes) {
      const int64_t n = std::min<int64_t>(kPhiloxLanes, mq - i0);
      philox_word0(f.seed, base + static_cast<uint64_t>(i0) * stride, stride, n, bits);
      T* row = ST + j * ld + i0;
      T* zrow = Z ? Z + j * ld + i0 : nullptr;
      for (int64_t i = 0; i < n; ++i) {
        const T z = bits[i] >= f.drop_threshold ? r : T(0);
        row[i] *= z;
        if (zrow) zrow[i] = z;
      }
    }
    if (Z) std::fill(Z + j * ld + mq, Z + j * ld + ld, T(0));
  }
}

// softcap, ALiBi and bias on a transposed score tile; with TT, also TT = tanh(s / cap) (for the gradient).
template <typename T>
void modify_scores(const Problem& p, T* ST, T* TT, int64_t ld, int64_t b, int64_t h, int64_t q0, int64_t mq,
                   int64_t k0, int64_t nk) {
  using V = Vectorized<T>;
  const Features& f = p.f;
  const T cap = static_cast<T>(f.softcap), inv = f.softcap > 0 ? T(1) / cap : T(0);
  const T slope = f.alibi ? static_cast<T>(f.alibi[b * f.alibi_sb + h]) : T(0);
  const T* bias = static_cast<const T*>(f.bias);
  for (int64_t j = 0; j < nk; ++j) {
    T* row = ST + j * ld;
    if (f.softcap > 0) {
      if (TT) {
        at::vec::map([inv](V x) { return (x * V(inv)).tanh(); }, TT + j * ld, row, mq);
        at::vec::map([cap](V t) { return t * V(cap); }, row, TT + j * ld, mq);
      } else {
        at::vec::map([inv, cap](V x) { return (x * V(inv)).tanh() * V(cap); }, row, row, mq);
      }
    }
    const int64_t key = k0 + j;
    if (f.alibi)
      for (int64_t i = 0; i < mq; ++i) row[i] -= slope * static_cast<T>(std::abs(q0 + i + p.Nk - p.Nq - key));
  }
  if (bias)  // by bias rows (contiguous in the key), into the tile's columns: strided reads of the bias thrash
    for (int64_t i = 0; i < mq; ++i) {
      const T* bb = bias + b * f.bias_sb + h * f.bias_sh + (q0 + i) * f.bias_si + k0 * f.bias_sj;
      for (int64_t j = 0; j < nk; ++j) ST[j * ld + i] += bb[j * f.bias_sj];
    }
}

// The backward's score gradient on a transposed tile (nk keys x mq queries, padded to mqp; row stride ld), in
// place of dP^T:
//   dS^T = P^T * (Z dP^T - delta)   (Z: the dropout scales, or nullptr)
// then the bias gradient (dS: the bias enters the score unscaled; accumulated row by row of its buffer) and, with
// softcap (TT = tanh(s / cap), or nullptr), ds0 = ds * (1 - tanh^2).
template <typename T>
void score_gradient(const Problem& p, T* dPT, const T* PT, const T* Z, const T* TT, const T* delta, T* dbias,
                    int64_t ld, int64_t b, int64_t h, int64_t q0, int64_t mq, int64_t mqp, int64_t k0, int64_t nk) {
  using V = Vectorized<T>;
  if (Z)
    for (int64_t j = 0; j < nk; ++j)  // dP of the undropped P = Z dP
      at::vec::map2([](V a, V z) { return a * z; }, dPT + j * ld, dPT + j * ld, Z + j * ld, mqp);
  for (int64_t j = 0; j < nk; ++j)
    at::vec::map3([](V pp, V dpp, V dl) { return pp * (dpp - dl); }, dPT + j * ld, PT + j * ld, dPT + j * ld, delta,
                  mqp);
  if (dbias)
    for (int64_t i = 0; i < mq; ++i) {
      T* db = dbias + b * p.f.dbias_sb + ((h * p.Nq) + q0 + i) * p.Nk + k0;
      for (int64_t j = 0; j < nk; ++j) db[j] += dPT[j * ld + i];
    }
  if (TT)  // through s = cap * tanh(s0 / cap)
    for (int64_t j = 0; j < nk; ++j)
      at::vec::map2([](V d, V t) { return d * (V(T(1)) - t * t); }, dPT + j * ld, dPT + j * ld, TT + j * ld, mq);
}

// Key-block status under the padding mask: 0 = all padding (skip), 1 = all real, 2 = mixed.
inline int mask_status(const bool* m, int64_t n) {
  if (m == nullptr) return 1;
  int64_t real = 0;
  for (int64_t j = 0; j < n; ++j) real += m[j];
  return real == 0 ? 0 : (real == n ? 1 : 2);
}

// Order query blocks so that each contiguous range of tasks (which is what at::parallel_for hands
// a thread) mixes cheap early causal blocks with expensive late ones: 0, n-1, 1, n-2, ...
inline int64_t zigzag(int64_t i, int64_t n) { return (i % 2 == 0) ? i / 2 : n - 1 - i / 2; }

// Packed sequences: tasks of unequal cost, so threads take them one at a time from a shared counter, most
// expensive first (f(take): take() returns the next task index, or -1 when none is left). Each task writes
// its own outputs, so which thread runs it changes nothing in the result.
template <typename F>
void run_dynamic(int64_t n, const F& f) {
  std::atomic<int64_t> next{0};
  auto take = [&]() -> int64_t {
    const int64_t t = next.fetch_add(1);
    return t < n ? t : -1;
  };
  at::parallel_for(0, std::min<int64_t>(n, at::get_num_threads()), 1, [&](int64_t, int64_t) { f(take); });
}

// The (sequence, head, query block) forward tasks of a packed batch, by decreasing cost (keys visited).
inline std::vector<std::array<int64_t, 3>> varlen_tasks(const Problem& p, int64_t BQ) {
  std::vector<std::array<int64_t, 4>> t;
  for (int64_t b = 0; b < p.B; ++b) {
    const Problem ps = p.seq(b);
    for (int64_t q0 = 0; q0 < ps.Nq; q0 += BQ) {
      const int64_t cost = ps.key_end(std::min(q0 + BQ, ps.Nq) - 1) - ps.key_start(q0);
      if (cost <= 0) continue;  // sees no key: out stays 0, lse -inf (preset by the caller)
      for (int64_t h = 0; h < p.Hq; ++h) t.push_back({cost, b, h, q0 / BQ});
    }
  }
  std::stable_sort(t.begin(), t.end(), [](const auto& x, const auto& y) { return x[0] > y[0]; });
  std::vector<std::array<int64_t, 3>> out(t.size());
  for (size_t i = 0; i < t.size(); ++i) out[i] = {t[i][1], t[i][2], t[i][3]};
  return out;
}

// ---------------------------------------------------------------------------------------------
// Tiles are kept transposed: S^T = K Q^T, (keys, queries). Then K and V rows are the operands that
// stream (read in place from the inputs when they are fp32/fp64 with head_dim a multiple of the
// vector width, else packed once), Q^T and dO^T are packed once per query block, and the softmax
// runs down the columns, vectorized over queries with no horizontal reductions.

struct Blocks {
  int64_t BQ, BK, Dp, nqb, nkb;
};

// The tiles of a call: at most BQmax queries x BKmax keys, and no larger than the problem rounded up to the
// vector width. (A 16-token call in 128 x 64 tiles would zero-fill and convert 4-8x the data it holds: the
// packed K/V rows, Q^T and its padding columns.) BQ stays a multiple of W: it is the row stride of the
// vector-read tiles.
inline Blocks make_blocks(const Problem& p, int64_t BQmax, int64_t BKmax, int64_t W) {
  const int64_t BQ = std::min(BQmax, std::max(W, round_up(p.Nq, W)));
  const int64_t BK = std::min(BKmax, std::max(W, round_up(p.Nk, W)));
  return {BQ, BK, round_up(p.D, W), (p.Nq + BQ - 1) / BQ, (p.Nk + BK - 1) / BK};
}

// Hides in S^T (nk keys, mq queries; row stride ld) what query q0 + i may not see of key k0 + j.
template <typename T>
void mask_block(const Problem& p, T* ST, int64_t ld, int64_t q0, int64_t mq, int64_t k0, int64_t nk,
                const bool* mk, int mstat) {
  constexpr T ninf = -std::numeric_limits<T>::infinity();
  for (int64_t j = 0; j < nk; ++j) {
    T* row = ST + j * ld;
    if (mstat == 2 && !mk[k0 + j]) {
      fill_row(row, mq, ninf);
    } else if (p.windowed()) {  // key k0 + j is visible to query q0 + i iff
      // k0 + j - (Nk - Nq) - right <= q0 + i <= k0 + j - (Nk - Nq) + left  (right: 0 when causal)
      const int64_t diag = k0 + j - q0 - (p.Nk - p.Nq);
      if (p.right() >= 0) fill_row(row, std::clamp<int64_t>(diag - p.right(), 0, mq), ninf);
      if (p.f.window_left >= 0) {
        const int64_t last = std::clamp<int64_t>(diag + p.f.window_left + 1, 0, mq);
        fill_row(row + last, mq - last, ninf);
      }
    }
  }
}

// Key/value rows as tile operands: either the input itself (row stride of the tensor) or a packed,
// converted, zero-padded copy (B * Hkv, Nkp, Dp) made once per call.
// Packed sequences: row0[b] is sequence b's first row (cu_seqlens_k in place; in a packed copy the sum of the
// earlier sequences' lengths rounded up to BK, see padded_starts).
template <typename T>
struct Rows {
  const T* base;
  int64_t sb, sh, ld;  // element offsets of (batch, head, row)
  const int64_t* row0 = nullptr;
  const T* at(int64_t b, int64_t g, int64_t row) const {
    return base + b * sb + g * sh + ((row0 ? row0[b] : 0) + row) * ld;
  }
};

// Packed sequences: start of each sequence's key rows when every sequence is rounded up to BK rows (B + 1).
inline std::vector<int64_t> padded_starts(const Problem& p, int64_t BK) {
  std::vector<int64_t> s(p.B + 1, 0);
  for (int64_t b = 0; b < p.B; ++b) s[b + 1] = s[b] + round_up(p.cu_k[b + 1] - p.cu_k[b], BK);
  return s;
}

// The packed K/V copies of one call, from buffers each calling thread keeps for its next call (slot 0: K,
// 1: V, 2: the bf16 backward's K^T). A fresh multi-megabyte allocation comes back from the OS as new pages, each a page fault and a zeroed
// page: perf put 2.8 of the 3.5 ms of a bf16 call (B1 H12 Nq16 Nk1024 D64) there, 2026-11-30. Buffers up to
// kKeptPackBytes are kept (at most three per dtype per thread that runs attention); larger ones are allocated per call,
// where the work dwarfs the faults. `storage` holds a buffer that is not kept.
constexpr int64_t kKeptPackBytes = int64_t(16) << 20;

template <typename T>
T* pack_buffer(int slot, int64_t n, at::Tensor& storage) {
  static thread_local at::Tensor kept[3];
  const auto dtype = c10::CppTypeToScalarType<T>::value;
  at::Tensor& buf = kept[slot];
  if (buf.defined() && buf.scalar_type() == dtype && buf.numel() >= n) return buf.data_ptr<T>();
  storage = at::empty({n}, at::TensorOptions().dtype(dtype));
  if (n * int64_t(sizeof(T)) <= kKeptPackBytes) buf = storage;
  return storage.data_ptr<T>();
}

template <typename S, typename T>
Rows<T> kv_rows(const Problem& p, const Blocks& bl, const S* x, Strides sx, at::Tensor& storage,
                const std::vector<int64_t>& kp0, int slot) {
  constexpr int64_t W = Vectorized<T>::size();
  if constexpr (std::is_same_v<S, T>) {
    if (p.D % W == 0) return {x, sx.b, sx.h, sx.n, p.cu_k};
  }
  if (p.cu_k != nullptr) {  // packed sequences: (Hkv, kp0[B], Dp), sequence b from row kp0[b]
    const int64_t tkp = kp0[p.B], Dp = bl.Dp;
    T* dst = pack_buffer<T>(slot, p.Hkv * tkp * Dp, storage);
    at::parallel_for(0, p.B * p.Hkv, 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const int64_t g = t % p.Hkv, b = t / p.Hkv, nk = p.cu_k[b + 1] - p.cu_k[b];
        pack_rows(x + g * sx.h + p.cu_k[b] * sx.n, sx.n, nk, p.D, dst + (g * tkp + kp0[b]) * Dp, Dp,
                  kp0[b + 1] - kp0[b]);
      }
    });
    return {dst, 0, tkp * Dp, Dp, kp0.data()};
  }
  const int64_t Nkp = bl.nkb * bl.BK, Dp = bl.Dp;
  T* dst = pack_buffer<T>(slot, p.B * p.Hkv * Nkp * Dp, storage);
  // Under ~64 KiB of packed rows the copy is not worth waking the other threads for.
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / (bl.BK * Dp * int64_t(sizeof(T))));
  at::parallel_for(0, p.B * p.Hkv * bl.nkb, grain, [&](int64_t begin, int64_t end) {
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t kb = blk % bl.nkb, g = (blk / bl.nkb) % p.Hkv, b = blk / (bl.nkb * p.Hkv);
      const int64_t k0 = kb * bl.BK, nk = std::max<int64_t>(0, std::min(bl.BK, p.Nk - k0));
      pack_rows(x + b * sx.b + g * sx.h + k0 * sx.n, sx.n, nk, p.D, dst + ((b * p.Hkv + g) * Nkp + k0) * Dp, Dp,
                bl.BK);
    }
  });
  return {dst, p.Hkv * Nkp * Dp, Nkp * Dp, Dp};
}

// The forward's tasks (b, h, qb) over the threads: work(next) runs on each thread and takes tasks from
// next(b, h, qb) until it returns false.
template <typename Work>
void run_fwd_tasks(const Problem& p, int64_t BQ, int64_t nqb, const Work& work) {
  if (p.cu_q == nullptr) {  // padded: contiguous ranges of (b, h, zigzagged query block)
    at::parallel_for(0, p.B * p.Hq * nqb, 1, [&](int64_t begin, int64_t end) {
      int64_t task = begin;
      work([&](int64_t& b, int64_t& h, int64_t& qb) {
        if (task >= end) return false;
        qb = zigzag(task % nqb, nqb), h = (task / nqb) % p.Hq, b = task / (nqb * p.Hq);
        ++task;
        return true;
      });
    });
    return;
  }
  // Packed: the (sequence, head, query block) tasks that exist, longest first, handed out one at a time.
  const auto tasks = varlen_tasks(p, BQ);
  run_dynamic(static_cast<int64_t>(tasks.size()), [&](auto&& take) {
    work([&](int64_t& b, int64_t& h, int64_t& qb) {
      const int64_t t = take();
      if (t < 0) return false;
      b = tasks[t][0], h = tasks[t][1], qb = tasks[t][2];
      return true;
    });
  });
}

// ---------------------------------------------------------------------------------------------
// Forward. S: input dtype, T: compute dtype (float, or double).

template <typename S, typename T>
void fwd_kernel(const Problem& p, const S* q, Strides sq, const S* k, Strides sk, const S* v,
                Strides sv, S* out, T* lse) {
  constexpr T ninf = -std::numeric_limits<T>::infinity();
  constexpr int64_t W = Vectorized<T>::size();
  using V = Vectorized<T>;
  const int64_t D = p.D;
  const Blocks bl = make_blocks(p, kFwdBlockQ, kFwdBlockK, W);
  const int64_t BQ = bl.BQ, BK = bl.BK, Dp = bl.Dp, nqb = bl.nqb;
  const std::vector<int64_t> kp0 = p.cu_k ? padded_starts(p, BK) : std::vector<int64_t>();
  at::Tensor k_store, v_store;
  const Rows<T> Kr = kv_rows<S, T>(p, bl, k, sk, k_store, kp0, 0), Vr = kv_rows<S, T>(p, bl, v, sv, v_store, kp0, 1);
  const T scale = static_cast<T>(p.scale);
  // A thread's work: tasks (b, h, qb) from next(b, h, qb) until it returns false.
  auto work = [&](auto&& next) {
    // QT (D, BQ); ST (BK, BQ) scores then probabilities; O (BQ, Dp); per-query m, l, alpha, m_use
    Scratch<T> qt_buf(D * BQ), st_buf(BK * BQ), o_buf(BQ * Dp), m_buf(BQ), l_buf(BQ), a_buf(BQ), mu_buf(BQ);
    T *QT = qt_buf.ptr, *ST = st_buf.ptr, *O = o_buf.ptr, *m = m_buf.ptr, *l = l_buf.ptr, *alpha = a_buf.ptr,
      *mu = mu_buf.ptr;
    int64_t b, h, qb;
    while (next(b, h, qb)) {
      const Problem ps = p.seq(b);  // the sequence's lengths and rows (packed); p itself when padded
      const int64_t g = h / p.group();
      const int64_t q0 = qb * BQ, mq = std::min(BQ, ps.Nq - q0), mqp = round_up(mq, W);
      const bool* mk = p.mask ? p.mask + b * p.Nk : nullptr;
      const int64_t kend = ps.key_end(q0 + mq - 1), kstart = ps.key_start(q0);  // keys any row of the block sees
      pack_transposed(q + b * sq.b + h * sq.h + (ps.qr0 + q0) * sq.n, sq.n, mq, D, QT, BQ);
      std::fill(m, m + BQ, ninf);
      std::fill(l, l + BQ, T(0));
      std::fill(O, O + mq * Dp, T(0));
      for (int64_t k0 = kstart; k0 < kend; k0 += BK) {
        const int64_t nk = std::min(BK, kend - k0);
        const int mstat = mask_status(mk ? mk + k0 : nullptr, nk);
        if (mstat == 0) continue;
        matmul<T>(nk, mqp, D, Kr.at(b, g, k0), Kr.ld, 1, QT, BQ, ST, BQ, scale, false);  // S^T (nk, mqp)
        if (p.f.modifies_scores()) modify_scores<T>(ps, ST, nullptr, BQ, b, h, q0, mq, k0, nk);
        mask_block(ps, ST, BQ, q0, mq, k0, nk, mk, mstat);
        // Online softmax down the columns: new max, rescale factor, P = exp(S - max), row sums.
        column_max(ST, BQ, nk, mqp, m, mu);
        for (int64_t i = 0; i < mqp; i += W) {  // a column that has seen nothing keeps m = -inf, P = 0
          const V m_new = V::loadu(mu + i), m_use = V::blendv(m_new, V(T(0)), m_new == V(ninf));
          m_use.store(mu + i);
          (V::loadu(m + i) - m_use).exp().store(alpha + i);  // exp(-inf) = 0 exactly
          m_new.store(m + i);
        }
        column_exp_sum(ST, BQ, nk, mqp, mu, alpha, l);
        for (int64_t i = 0; i < mq; ++i)
          if (alpha[i] != T(1)) scale_row(O + i * Dp, Dp, alpha[i]);
        if (p.f.drop_threshold) dropout_tile<T>(ps, ST, nullptr, BQ, b, h, q0, mq, k0, nk);  // after the sums
        // O += P V: P = (S^T)^T, read transposed
        matmul<T>(mq, Dp, nk, ST, 1, BQ, Vr.at(b, g, k0), Vr.ld, O, Dp, T(1), true);
      }
      // out (B, Nq, Hq, D) contiguous (packed: (total_q, Hq, D)); lse (B, Hq, Nq) (packed: (Hq, total_q))
      for (int64_t i = 0; i < mq; ++i) {
        S* o = out + ((ps.qg0 + q0 + i) * p.Hq + h) * D;
        const T inv = l[i] > T(0) ? T(1) / l[i] : T(0);
        if constexpr (std::is_same_v<S, T>) {
          for (int64_t d = 0; d < D; ++d) o[d] = O[i * Dp + d] * inv;
        } else {  // scale in place, then convert by vector
          scale_row(O + i * Dp, Dp, inv);
          at::vec::convert(O + i * Dp, o, D);
        }
        lse[b * p.lse_sb + h * p.lse_sh + ps.qr0 + q0 + i] = l[i] > T(0) ? m[i] + std::log(l[i]) : ninf;
      }
    }
  };
  run_fwd_tasks(p, BQ, nqb, work);
}

// ---------------------------------------------------------------------------------------------
// bf16 on AMX tiles (Intel Sapphire Rapids and later). The fp32 path above widens bf16 K/V to fp32 and
// multiplies with FMA; here the products run on the tile unit, bf16 x bf16 products accumulated in fp32
// (TDPBF16PS), which is what torch's own bf16 SDPA does on these CPUs. The backward: bwd_block below. The
// forward, per task (b, h, query block):
//
//   S^T (keys, queries) = K Q^T     A: K rows (bf16, packed once per call), B: Q^T as bf16 pairs (VNNI)
//   online softmax down the columns of S^T in fp32 (the same helpers, masks, score modifications and dropout)
//   O^T (d, queries) += V^T P^T      A: V^T rows (bf16, packed once per call), B: P^T as bf16 pairs
//
// P is rounded to bf16 for its product with V (so does SDPA's bf16 kernel); the row sums l and lse come from
// the fp32 probabilities. Keeping the output transposed, O^T, makes the online-softmax rescale a vector
// product over queries. Tiles are 16 rows x 64 bytes (16 fp32, 32 bf16 or 16 bf16 pairs); a step does 2 x 2
// output tiles (tmm0-3) from two A tiles (tmm4-5) and two B tiles (tmm6-7).
//
// It runs when the CPU has AMX-BF16 and AVX512-BF16 and the OS grants the tile state (arch_prctl), unless
// PYLLM_CPU_AMX=0 (read per call: A/B timing and the tests of the fp32 path use it).


#if PYLLM_ATTENTION_AMX
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,amx-tile,amx-bf16")
namespace amx {

using at::BFloat16;

// Keys per step: 128 (a 32 KiB score tile) against 64, side by side with SDPA, 2 threads, Emerald Rapids,
// 2026-11-30: B1 H12 N1024 D64 1.15x / 1.03x SDPA, causal 1.50x / 1.50x, B2 H12 N256 1.15x / 1.02x, B1 H16 N2048
// D128 causal 1.44x / 1.10x. (Fewer online-softmax rescales of O^T, and four tile steps per O^T load and store.)
constexpr int64_t kAmxBlockK = 128;

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Every tile 16 rows x 64 bytes. The configuration is per thread: each worker loads it before its tasks. It lives
// in static memory: GCC 12's _tile_loadconfig tells the compiler it reads 8 bytes, so the stores that fill a local
// configuration could be dropped as dead (an x86-64-v3 build did: the next tile instruction faulted, #UD).
inline void configure() {
  static const TileConfig config = [] {
    TileConfig c;
    for (int i = 0; i < 8; ++i) c.colsb[i] = 64, c.rows[i] = 16;
    return c;
  }();
  asm volatile("" : : "r"(&config) : "memory");
  _tile_loadconfig(&config);
}

// Back to the initial tile state, after a thread's tasks: torch's own AMX kernels (oneDNN's brgemm) configure
// the tiles again when they find them released.
inline void release() { _tile_release(); }

// NA x NB output tiles C(i, j) = C + (16 i) ldc + 16 j (fp32, row stride ldc bytes), loaded (or zeroed), then
// C(i, j) += sum over `steps` of A_i B_j, A_i = 16 rows from A + 16 i lda (the step's 64 bytes at s * 64),
// B_j = 16 rows from B + s 16 ldb, 64 bytes at j * 64 (bf16 pairs); stored back.
template <int NA, int NB>
void tile_block(int64_t steps, const char* A, int64_t lda, const char* B, int64_t ldb, char* C, int64_t ldc,
                bool load) {
  if (load) {
    _tile_loadd(0, C, ldc);
    if constexpr (NB == 2) _tile_loadd(1, C + 64, ldc);
    if constexpr (NA == 2) _tile_loadd(2, C + 16 * ldc, ldc);
    if constexpr (NA == 2 && NB == 2) _tile_loadd(3, C + 16 * ldc + 64, ldc);
  } else {
    _tile_zero(0);
    if constexpr (NB == 2) _tile_zero(1);
    if constexpr (NA == 2) _tile_zero(2);
    if constexpr (NA == 2 && NB == 2) _tile_zero(3);
  }
  for (int64_t s = 0; s < steps; ++s) {
    const char* a = A + s * 64;
    const char* b = B + s * 16 * ldb;
    _tile_loadd(4, a, lda);
    if constexpr (NA == 2) _tile_loadd(5, a + 16 * lda, lda);
    _tile_loadd(6, b, ldb);
    if constexpr (NB == 2) _tile_loadd(7, b + 64, ldb);
    _tile_dpbf16ps(0, 4, 6);
    if constexpr (NB == 2) _tile_dpbf16ps(1, 4, 7);
    if constexpr (NA == 2) _tile_dpbf16ps(2, 5, 6);
    if constexpr (NA == 2 && NB == 2) _tile_dpbf16ps(3, 5, 7);
  }
  _tile_stored(0, C, ldc);
  if constexpr (NB == 2) _tile_stored(1, C + 64, ldc);
  if constexpr (NA == 2) _tile_stored(2, C + 16 * ldc, ldc);
  if constexpr (NA == 2 && NB == 2) _tile_stored(3, C + 16 * ldc + 64, ldc);
}

// C (16 ma, 16 nb) fp32 (+)= A (16 ma rows) B: ma, nb tiles, in 2 x 2 steps.
void tile_product(int64_t ma, int64_t nb, int64_t steps, const char* A, int64_t lda, const char* B, int64_t ldb,
                  char* C, int64_t ldc, bool load) {
  for (int64_t i = 0; i < ma; i += 2) {
    const char* Ai = A + i * 16 * lda;
    for (int64_t j = 0; j < nb; j += 2) {
      const char* Bj = B + j * 64;
      char* Cij = C + i * 16 * ldc + j * 64;
      const bool a2 = i + 1 < ma, b2 = j + 1 < nb;
      if (a2 && b2) tile_block<2, 2>(steps, Ai, lda, Bj, ldb, Cij, ldc, load);
      else if (a2) tile_block<2, 1>(steps, Ai, lda, Bj, ldb, Cij, ldc, load);
      else if (b2) tile_block<1, 2>(steps, Ai, lda, Bj, ldb, Cij, ldc, load);
      else tile_block<1, 1>(steps, Ai, lda, Bj, ldb, Cij, ldc, load);
    }
  }
}

// Rows r0, r1 of an fp32 tile (16 columns from c) as 16 bf16 pairs (r0 low, r1 high), rounded to nearest even.
inline __m512i pair_rows(__m512 r0, __m512 r1) {
  alignas(64) static const uint16_t order[32] = {0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23,
                                                 8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  return _mm512_permutexvar_epi16(_mm512_load_si512(order), (__m512i)_mm512_cvtne2ps_pbh(r1, r0));
}

// The softmax's exponentials for rows [0, nk) of S^T (columns [0, mqp), row stride ld), written straight to P^T
// as bf16 pairs (rows nk to nk32 zero; PT row stride ldp words): e = exp(scale s - mu), l = l alpha + column sums.
// Two rows and one vector of columns at a time: the pair is one store, and the fp32 probabilities never go back
// to memory.
void exp_sum_pairs(const float* ST, int64_t ld, int64_t nk, int64_t nk32, int64_t mqp, float scale, const float* mu,
                   const float* alpha, float* l, uint32_t* PT, int64_t ldp) {
  constexpr float kLog2e = 1.4426950408889634f;
  const __m512 vs = _mm512_set1_ps(scale * kLog2e);
  for (int64_t i = 0; i < mqp; i += 16) {
    const __m512 m = _mm512_mul_ps(_mm512_loadu_ps(mu + i), _mm512_set1_ps(kLog2e));
    auto e = [&](int64_t j) { return exp2_fast(_mm512_fmsub_ps(_mm512_loadu_ps(ST + j * ld + i), vs, m)); };
    __m512 sum0 = _mm512_setzero_ps(), sum1 = _mm512_setzero_ps();
    int64_t j = 0;
    for (; j + 1 < nk; j += 2) {
      const __m512 e0 = e(j), e1 = e(j + 1);
      sum0 = _mm512_add_ps(sum0, e0), sum1 = _mm512_add_ps(sum1, e1);
      _mm512_storeu_si512(PT + (j / 2) * ldp + i, pair_rows(e0, e1));
    }
    if (j < nk) {  // an odd last row, paired with zeros
      const __m512 e0 = e(j);
      sum0 = _mm512_add_ps(sum0, e0);
      _mm512_storeu_si512(PT + (j / 2) * ldp + i, pair_rows(e0, _mm512_setzero_ps()));
      j += 2;
    }
    for (; j < nk32; j += 2) _mm512_storeu_si512(PT + (j / 2) * ldp + i, _mm512_setzero_si512());
    _mm512_storeu_ps(l + i, _mm512_fmadd_ps(_mm512_loadu_ps(l + i), _mm512_loadu_ps(alpha + i),
                                            _mm512_add_ps(sum0, sum1)));
  }
}

// Key rows per call, in bf16, zero-padded, for every (batch or sequence, kv head): rows (Hkv, rows, Dp) or
// columns (Hkv, Dp, rows), batch / sequence b from row (column) start[b]. A sequence's block is its length rounded
// up to 32, plus 32 rows of zeros: a tile read that starts at any key of the sequence and spans a rounded-up block
// stays inside (zeros past the end). The forward uses K rows and V columns; the backward K and V rows, K columns.
struct KeyLayout {
  int64_t Dp = 0, rows = 0;    // head_dim rounded up to 32; key rows per kv head (all sequences)
  std::vector<int64_t> start;  // (B + 1)
  explicit KeyLayout(const Problem& p) : Dp(round_up(p.D, 32)), start(p.B + 1, 0) {
    for (int64_t b = 0; b < p.B; ++b) start[b + 1] = start[b] + round_up(len(p, b), 32) + 32;
    rows = start[p.B];
  }
  static int64_t len(const Problem& p, int64_t b) { return p.cu_k ? p.cu_k[b + 1] - p.cu_k[b] : p.Nk; }
  const BFloat16* row(const BFloat16* base, int64_t b, int64_t g) const { return base + (g * rows + start[b]) * Dp; }
  const BFloat16* col(const BFloat16* base, int64_t b, int64_t g) const { return base + g * Dp * rows + start[b]; }
};

// x (B, Nk, Hkv, D) or packed (total_k, Hkv, D) into the layout, as rows (transposed = false) or columns.
BFloat16* pack_keys(const Problem& p, const KeyLayout& L, const BFloat16* x, Strides sx, bool transposed, int slot,
                    at::Tensor& storage) {
  const int64_t Dp = L.Dp, rows = L.rows;
  BFloat16* dst = pack_buffer<BFloat16>(slot, p.Hkv * rows * Dp, storage);
  at::parallel_for(0, p.B * p.Hkv, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t g = t % p.Hkv, b = t / p.Hkv;
      const int64_t span = L.start[b + 1] - L.start[b], len = KeyLayout::len(p, b);
      const BFloat16* src = p.cu_k ? x + g * sx.h + p.cu_k[b] * sx.n : x + b * sx.b + g * sx.h;
      if (!transposed) {
        pack_rows(src, sx.n, len, p.D, dst + (g * rows + L.start[b]) * Dp, Dp, span);
      } else {
        BFloat16* d = dst + g * Dp * rows + L.start[b];
        for (int64_t r0 = 0; r0 < len; r0 += 32)
          for (int64_t d0 = 0; d0 < p.D; d0 += 32)
            at::vec::transpose_mxn<BFloat16>(src + r0 * sx.n + d0, sx.n, d + d0 * rows + r0, rows,
                                              static_cast<int>(std::min<int64_t>(32, len - r0)),
                                              static_cast<int>(std::min<int64_t>(32, p.D - d0)));
        for (int64_t c = 0; c < Dp; ++c)
          std::fill(d + c * rows + (c < p.D ? len : 0), d + c * rows + span, BFloat16(0.0f));
      }
    }
  });
  return dst;
}

// Xr (rows, Dp) bf16 -> XT (Dp / 2, ldt) pairs along d (the B operand of a product over d): a 32-bit transpose.
inline void pairs_over_d(const BFloat16* Xr, int64_t rows, int64_t Dp, uint32_t* XT, int64_t ldt) {
  at::vec::transpose_mxn<float>(reinterpret_cast<const float*>(Xr), Dp / 2, reinterpret_cast<float*>(XT), ldt,
                                static_cast<int>(rows), static_cast<int>(Dp / 2));
}

// Xr (rows, Dp) bf16, rows even -> Xv (rows / 2, Dp) pairs of rows (the B operand of a product over rows):
// Xv[r][d] = (Xr[2r][d], Xr[2r + 1][d]).
inline void pairs_over_rows(const BFloat16* Xr, int64_t rows, int64_t Dp, uint32_t* Xv) {
  alignas(64) static const uint16_t lo[32] = {0,  32, 1,  33, 2,  34, 3,  35, 4,  36, 5,  37, 6,  38, 7,  39,
                                              8,  40, 9,  41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
  alignas(64) static const uint16_t hi[32] = {16, 48, 17, 49, 18, 50, 19, 51, 20, 52, 21, 53, 22, 54, 23, 55,
                                              24, 56, 25, 57, 26, 58, 27, 59, 28, 60, 29, 61, 30, 62, 31, 63};
  const __m512i ilo = _mm512_load_si512(lo), ihi = _mm512_load_si512(hi);
  for (int64_t r = 0; r + 1 < rows; r += 2)
    for (int64_t d = 0; d < Dp; d += 32) {
      const __m512i a = _mm512_loadu_si512(Xr + r * Dp + d), b = _mm512_loadu_si512(Xr + (r + 1) * Dp + d);
      _mm512_storeu_si512(Xv + (r / 2) * Dp + d, _mm512_permutex2var_epi16(a, ilo, b));
      _mm512_storeu_si512(Xv + (r / 2) * Dp + d + 16, _mm512_permutex2var_epi16(a, ihi, b));
    }
}

void fwd_bf16(const Problem& p, const BFloat16* q, Strides sq, const BFloat16* k, Strides sk, const BFloat16* v,
              Strides sv, BFloat16* out, float* lse) {
  constexpr float ninf = -std::numeric_limits<float>::infinity();
  using V = Vectorized<float>;
  constexpr int64_t W = V::size();
  const int64_t D = p.D;
  const int64_t BQ = std::min<int64_t>(kFwdBlockQ, std::max<int64_t>(16, round_up(p.Nq, 16)));
  const int64_t BK = std::min<int64_t>(kAmxBlockK, std::max<int64_t>(32, round_up(p.Nk, 32)));
  const int64_t nqb = (p.Nq + BQ - 1) / BQ;
  at::Tensor ks, vs;
  const KeyLayout L(p);
  const BFloat16* Kp = pack_keys(p, L, k, sk, false, 0, ks);
  const BFloat16* VTp = pack_keys(p, L, v, sv, true, 1, vs);
  const int64_t Dp = L.Dp, rows = L.rows;
  const float scale = static_cast<float>(p.scale);
  // Without score modifications and with a positive scale, max(scale s) = scale max(s): the scale is folded into
  // the exponent (exp(scale s - m), one FMA) instead of a pass over the tile. s_exp: the exponent's factor.
  const bool fold_scale = !p.f.modifies_scores() && scale > 0.0f && !p.f.drop_threshold;
  const float s_exp = fold_scale ? scale : 1.0f;
  auto work = [&](auto&& next) {
    configure();
    // Qr (BQ, Dp) bf16 rows; QT (Dp / 2, BQ) and PT (BK / 2, BQ) bf16 pairs; ST (BK, BQ); OT (Dp, BQ); O (BQ, Dp)
    Scratch<BFloat16> qr_buf(BQ * Dp);
    Scratch<uint32_t> qt_buf(Dp / 2 * BQ), pt_buf(BK / 2 * BQ);
    Scratch<float> st_buf(BK * BQ), ot_buf(Dp * BQ), o_buf(BQ * Dp), m_buf(BQ), l_buf(BQ), a_buf(BQ), mu_buf(BQ),
        none_buf(BQ);
    BFloat16* Qr = qr_buf.ptr;
    uint32_t *QT = qt_buf.ptr, *PT = pt_buf.ptr;
    float *ST = st_buf.ptr, *OT = ot_buf.ptr, *O = o_buf.ptr, *m = m_buf.ptr, *l = l_buf.ptr, *alpha = a_buf.ptr,
          *mu = mu_buf.ptr, *none = none_buf.ptr;
    std::fill(none, none + BQ, ninf);
    int64_t b, h, qb;
    while (next(b, h, qb)) {
      const Problem ps = p.seq(b);
      const int64_t g = h / p.group();
      const int64_t q0 = qb * BQ, mq = std::min(BQ, ps.Nq - q0), mqp = round_up(mq, 16);
      const bool* mk = p.mask ? p.mask + b * p.Nk : nullptr;
      const int64_t kend = ps.key_end(q0 + mq - 1), kstart = ps.key_start(q0);
      // Q^T as pairs: the query rows, zero-padded to (mqp, Dp), transposed as 32-bit words.
      pack_rows(q + b * sq.b + h * sq.h + (ps.qr0 + q0) * sq.n, sq.n, mq, D, Qr, Dp, mqp);
      pairs_over_d(Qr, mqp, Dp, QT, BQ);
      std::fill(m, m + BQ, ninf);
      std::fill(l, l + BQ, 0.0f);
      std::fill(OT, OT + Dp * BQ, 0.0f);
      const BFloat16* Kg = L.row(Kp, b, g);
      const BFloat16* VTg = L.col(VTp, b, g);
      for (int64_t k0 = kstart; k0 < kend; k0 += BK) {
        const int64_t nk = std::min(BK, kend - k0);
        const int mstat = mask_status(mk ? mk + k0 : nullptr, nk);
        if (mstat == 0) continue;
        // S^T (nk rounded up to 16, mqp) = K Q^T, unscaled: the scale goes into the exponent (or, for the score
        // modifications, which take scaled scores, into a pass of its own)
        tile_product((nk + 15) / 16, mqp / 16, Dp / 32, reinterpret_cast<const char*>(Kg + k0 * Dp), Dp * 2,
                     reinterpret_cast<const char*>(QT), BQ * 4, reinterpret_cast<char*>(ST), BQ * 4, false);
        if (!fold_scale) {
          for (int64_t j = 0; j < nk; ++j) scale_row(ST + j * BQ, mqp, scale);
          if (p.f.modifies_scores()) modify_scores<float>(ps, ST, nullptr, BQ, b, h, q0, mq, k0, nk);
        }
        if (mstat == 2 || p.windowed()) mask_block(ps, ST, BQ, q0, mq, k0, nk, mk, mstat);
        column_max(ST, BQ, nk, mqp, none, mu);  // this block's column max, in the units of ST
        const V vscale(s_exp);
        for (int64_t i = 0; i < mqp; i += W) {
          const V m_new = at::vec::maximum(V::loadu(m + i), V::loadu(mu + i) * vscale);
          const V m_use = V::blendv(m_new, V(0.0f), m_new == V(ninf));
          m_use.store(mu + i);
          (V::loadu(m + i) - m_use).exp().store(alpha + i);
          m_new.store(m + i);
        }
        const bool rescale = std::any_of(alpha, alpha + mq, [](float a) { return a != 1.0f; });
        if (rescale)  // O^T columns times alpha
          for (int64_t d = 0; d < D; ++d)
            at::vec::map2([](V o, V a) { return o * a; }, OT + d * BQ, OT + d * BQ, alpha, mqp);
        // P^T as bf16 pairs of key rows (rows from nk on are zero), then O^T += V^T P^T
        const int64_t nk32 = round_up(nk, 32);
        if (!p.f.drop_threshold) {
          exp_sum_pairs(ST, BQ, nk, nk32, mqp, s_exp, mu, alpha, l, PT, BQ);
        } else {  // dropout scales the probabilities after the sums: in fp32, then paired
          column_exp_sum(ST, BQ, nk, mqp, mu, alpha, l);
          dropout_tile<float>(ps, ST, nullptr, BQ, b, h, q0, mq, k0, nk);
          for (int64_t j = 0; j < nk32; j += 2) {
            uint32_t* dst = PT + (j / 2) * BQ;
            const float* r0 = ST + j * BQ;
            const float* r1 = r0 + BQ;
            for (int64_t i = 0; i < mqp; i += 16) {
              const __m512 a = j < nk ? _mm512_loadu_ps(r0 + i) : _mm512_setzero_ps();
              const __m512 c = j + 1 < nk ? _mm512_loadu_ps(r1 + i) : _mm512_setzero_ps();
              _mm512_storeu_si512(dst + i, pair_rows(a, c));
            }
          }
        }
        tile_product(Dp / 16, mqp / 16, nk32 / 32, reinterpret_cast<const char*>(VTg + k0), rows * 2,
                     reinterpret_cast<const char*>(PT), BQ * 4, reinterpret_cast<char*>(OT), BQ * 4, true);
      }
      // O^T columns / l, transposed to rows, converted. lse as in the fp32 path.
      for (int64_t i = 0; i < mqp; i += W) {
        const V vl = V::loadu(l + i);
        V::blendv(V(1.0f) / vl, V(0.0f), vl == V(0.0f)).store(alpha + i);
      }
      for (int64_t d = 0; d < D; ++d)
        at::vec::map2([](V o, V a) { return o * a; }, OT + d * BQ, OT + d * BQ, alpha, mqp);
      at::vec::transpose_mxn<float>(OT, BQ, O, Dp, static_cast<int>(D), static_cast<int>(mq));
      for (int64_t i = 0; i < mq; ++i) {
        at::vec::convert(O + i * Dp, out + ((ps.qg0 + q0 + i) * p.Hq + h) * D, D);
        lse[b * p.lse_sb + h * p.lse_sh + ps.qr0 + q0 + i] = l[i] > 0.0f ? m[i] + std::log(l[i]) : ninf;
      }
    }
    release();
  };
  run_fwd_tasks(p, BQ, nqb, work);
}

// The bf16 backward of one query block (rows q0 .. q0 + mq of head h) on AMX tiles; bwd_kernel runs the tasks,
// owns the dK/dV accumulators and sums them. Its math in five products:
//   S^T = K Q^T, P^T = exp(scale S^T - lse)   (fp32; A: K rows, B: Q^T as pairs along d)
//   dV += P^T dO                              (A: P^T rows in bf16, B: dO as pairs of query rows)
//   dP^T = V dO^T                             (A: V rows, B: dO^T as pairs along d)
//   dS^T = P^T (dP^T - delta)                 (fp32), then scale dS^T rounded to bf16, as rows and as key pairs
//   dK += scale dS^T Q                        (A: dS^T rows, B: Q as pairs of query rows)
//   dQ^T += scale K^T dS^T                    (A: K^T rows, B: dS^T as pairs of key rows; kept transposed)
// P and dS are rounded to bf16 for their products (SDPA's bf16 backward does the same); softmax, delta, dS and the
// accumulators stay fp32. A key block's dK and dV are formed in scratch and added to the accumulators' nk rows: a
// tile writes 16 rows, and the rows after this block's may belong to another task.
struct BwdKeys {
  const BFloat16 *k = nullptr, *v = nullptr, *kt = nullptr;  // K rows, V rows, K columns (KeyLayout)
  const KeyLayout* L = nullptr;
};

struct BwdScratch {
  BwdScratch(int64_t BQ, int64_t BK, int64_t Dp)
      : BQ32(round_up(BQ, 32)), qr(BQ32 * Dp), dor(BQ32 * Dp), qt(Dp / 2 * BQ), dot(Dp / 2 * BQ), qv(BQ32 / 2 * Dp),
        dov(BQ32 / 2 * Dp), pt(BK * BQ), dpt(BK * BQ), tt(BK * BQ), z(BK * BQ), pz(BK * BQ), pb(BK * BQ32),
        sb(BK * BQ32), sp(BK / 2 * BQ), dkl(BK * Dp), dvl(BK * Dp), dqt(Dp * BQ), dqr(BQ * Dp), delta(BQ), L(BQ),
        w1(Dp), w2(Dp) {}
  int64_t BQ32;
  Scratch<BFloat16> qr, dor;
  Scratch<uint32_t> qt, dot, qv, dov;
  Scratch<float> pt, dpt, tt, z, pz;
  Scratch<BFloat16> pb, sb;
  Scratch<uint32_t> sp;
  Scratch<float> dkl, dvl, dqt, dqr, delta, L, w1, w2;
};

// dst[j][i] (row stride ldd) = bf16(src[j][i]) for j < nk, i < mqp; zeros for i in [mqp, mq32).
inline void rows_to_bf16(const float* src, int64_t lds, int64_t nk, int64_t mqp, int64_t mq32, BFloat16* dst,
                         int64_t ldd) {
  for (int64_t j = 0; j < nk; ++j) {
    for (int64_t i = 0; i < mqp; i += 16)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + j * ldd + i),
                          (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(src + j * lds + i)));
    std::fill(dst + j * ldd + mqp, dst + j * ldd + mq32, BFloat16(0.0f));
  }
}

// P^T[j][i] = exp(s S^T[j][i] - L[i]) in place for j < nk, i < mqp (exp2_fast: P goes to bf16 for its products,
// and into dS = P (dP - delta) in fp32, whose result goes to bf16 too).
inline void exp_rows(float* PT, int64_t ld, int64_t nk, int64_t mqp, float s, const float* L) {
  constexpr float kLog2e = 1.4426950408889634f;
  const __m512 vs = _mm512_set1_ps(s * kLog2e);
  for (int64_t i = 0; i < mqp; i += 16) {
    const __m512 l = _mm512_mul_ps(_mm512_loadu_ps(L + i), _mm512_set1_ps(kLog2e));
    for (int64_t j = 0; j < nk; ++j)
      _mm512_storeu_ps(PT + j * ld + i, exp2_fast(_mm512_fmsub_ps(_mm512_loadu_ps(PT + j * ld + i), vs, l)));
  }
}

// acc[j][0, D) += part[j][0, D) for j < nk (part rows Dp apart, acc rows ldacc apart; acc rows may be narrower
// than Dp, so nothing past column D is touched).
inline void add_rows(const float* part, int64_t nk, int64_t D, int64_t Dp, float* acc, int64_t ldacc) {
  for (int64_t j = 0; j < nk; ++j)
    for (int64_t d = 0; d < D; d += 16) {
      const __mmask16 m = D - d >= 16 ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << (D - d)) - 1);
      float* a = acc + j * ldacc + d;
      _mm512_mask_storeu_ps(a, m, _mm512_add_ps(_mm512_maskz_loadu_ps(m, a), _mm512_maskz_loadu_ps(m, part + j * Dp + d)));
    }
}

void bwd_block(const Problem& p, const Problem& ps, int64_t b, int64_t h, int64_t g, int64_t q0, int64_t mq,
               int64_t BQ, int64_t BK, const BFloat16* Qs, int64_t ldq, const BFloat16* dOs, int64_t lddo,
               const BFloat16* Os, int64_t ldo, const float* lse_rows, const BwdKeys& keys, float* dK, float* dV,
               int64_t ldkv, BFloat16* dq_rows, int64_t ld_dq, BwdScratch& s) {
  constexpr float ninf = -std::numeric_limits<float>::infinity(), pinf = std::numeric_limits<float>::infinity();
  using V = Vectorized<float>;
  const int64_t D = p.D, Dp = keys.L->Dp, rows = keys.L->rows, BQ32 = s.BQ32;
  const int64_t mqp = round_up(mq, 16), mq32 = round_up(mq, 32);
  const int64_t kend = ps.key_end(q0 + mq - 1), kstart = ps.key_start(q0);
  const bool* mk = p.mask ? p.mask + b * p.Nk : nullptr;
  const float scale = static_cast<float>(p.scale);
  const bool capped = p.f.softcap > 0, dropping = p.f.drop_threshold != 0;
  float* dbias = static_cast<float*>(p.f.dbias);
  float *PT = s.pt.ptr, *dPT = s.dpt.ptr, *TT = s.tt.ptr, *Z = s.z.ptr, *PZ = s.pz.ptr, *dQT = s.dqt.ptr;
  float *delta = s.delta.ptr, *L = s.L.ptr;
  pack_rows(Qs, ldq, mq, D, s.qr.ptr, Dp, mq32);
  pack_rows(dOs, lddo, mq, D, s.dor.ptr, Dp, mq32);
  pairs_over_d(s.qr.ptr, mqp, Dp, s.qt.ptr, BQ);
  pairs_over_d(s.dor.ptr, mqp, Dp, s.dot.ptr, BQ);
  pairs_over_rows(s.qr.ptr, mq32, Dp, s.qv.ptr);
  pairs_over_rows(s.dor.ptr, mq32, Dp, s.dov.ptr);
  std::fill(s.w1.ptr, s.w1.ptr + Dp, 0.0f);
  std::fill(s.w2.ptr, s.w2.ptr + Dp, 0.0f);
  for (int64_t i = 0; i < BQ; ++i) {  // delta = rowsum(dO * O); L = +inf makes P = 0
    float sum = 0.0f;
    if (i < mq) {
      at::vec::convert(s.dor.ptr + i * Dp, s.w1.ptr, D);
      at::vec::convert(Os + i * ldo, s.w2.ptr, D);
      V acc(0.0f);
      for (int64_t d = 0; d < Dp; d += V::size()) acc = at::vec::fmadd(V::loadu(s.w1.ptr + d), V::loadu(s.w2.ptr + d), acc);
      sum = at::vec::vec_reduce_all<float>([](V& x, V& y) { return x + y; }, acc);
    }
    delta[i] = sum;
    const float li = i < mq ? lse_rows[i] : ninf;
    L[i] = li == ninf ? pinf : li;
  }
  std::fill(dQT, dQT + Dp * BQ, 0.0f);
  const BFloat16 *Kg = keys.L->row(keys.k, b, g), *Vg = keys.L->row(keys.v, b, g), *KTg = keys.L->col(keys.kt, b, g);
  auto cp = [](const void* x) { return reinterpret_cast<const char*>(x); };
  auto mp = [](void* x) { return reinterpret_cast<char*>(x); };
  for (int64_t k0 = kstart; k0 < kend; k0 += BK) {
    const int64_t nk = std::min(BK, kend - k0), nk16 = round_up(nk, 16), nk32 = round_up(nk, 32);
    const int mstat = mask_status(mk ? mk + k0 : nullptr, nk);
    if (mstat == 0) continue;
    tile_product(nk16 / 16, mqp / 16, Dp / 32, cp(Kg + k0 * Dp), Dp * 2, cp(s.qt.ptr), BQ * 4, mp(PT), BQ * 4, false);
    if (p.f.modifies_scores()) {  // they take scaled scores
      for (int64_t j = 0; j < nk; ++j) scale_row(PT + j * BQ, mqp, scale);
      modify_scores<float>(ps, PT, capped ? TT : nullptr, BQ, b, h, q0, mq, k0, nk);
    }
    if (mstat == 2 || p.windowed()) mask_block(ps, PT, BQ, q0, mq, k0, nk, mk, mstat);
    exp_rows(PT, BQ, nk, mqp, p.f.modifies_scores() ? 1.0f : scale, L);  // P^T = exp(S^T - lse)
    const float* PV = PT;  // the probabilities that multiplied V: P, or P Z under dropout
    if (dropping) {
      std::copy(PT, PT + nk * BQ, PZ);
      dropout_tile<float>(ps, PZ, Z, BQ, b, h, q0, mq, k0, nk);
      PV = PZ;
    }
    // dV += P^T dO
    rows_to_bf16(PV, BQ, nk, mqp, mq32, s.pb.ptr, BQ32);
    tile_product(nk16 / 16, Dp / 16, mq32 / 32, cp(s.pb.ptr), BQ32 * 2, cp(s.dov.ptr), Dp * 4, mp(s.dvl.ptr), Dp * 4,
                 false);
    add_rows(s.dvl.ptr, nk, D, Dp, dV + k0 * ldkv, ldkv);
    // dP^T = V dO^T; dS^T = P^T (dP^T - delta)
    tile_product(nk16 / 16, mqp / 16, Dp / 32, cp(Vg + k0 * Dp), Dp * 2, cp(s.dot.ptr), BQ * 4, mp(dPT), BQ * 4,
                 false);
    score_gradient<float>(p, dPT, PT, dropping ? Z : nullptr, capped ? TT : nullptr, delta, dbias, BQ, b, h, q0, mq,
                          mqp, k0, nk);
    // scale dS^T in bf16: rows (for dK) and pairs of key rows (for dQ^T); rows from nk on are zero
    const __m512 vs = _mm512_set1_ps(scale);
    for (int64_t j = 0; j < nk32; j += 2)
      for (int64_t i = 0; i < mqp; i += 16) {
        const __m512 a = j < nk ? _mm512_mul_ps(_mm512_loadu_ps(dPT + j * BQ + i), vs) : _mm512_setzero_ps();
        const __m512 c = j + 1 < nk ? _mm512_mul_ps(_mm512_loadu_ps(dPT + (j + 1) * BQ + i), vs) : _mm512_setzero_ps();
        _mm512_storeu_si512(s.sp.ptr + (j / 2) * BQ + i, pair_rows(a, c));
        if (j < nk16) {
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(s.sb.ptr + j * BQ32 + i), (__m256i)_mm512_cvtneps_pbh(a));
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(s.sb.ptr + (j + 1) * BQ32 + i),
                              (__m256i)_mm512_cvtneps_pbh(c));
        }
      }
    if (mqp < mq32)
      for (int64_t j = 0; j < nk16; ++j) std::fill(s.sb.ptr + j * BQ32 + mqp, s.sb.ptr + j * BQ32 + mq32, BFloat16(0.0f));
    // dK += scale dS^T Q;  dQ^T += scale K^T dS^T
    tile_product(nk16 / 16, Dp / 16, mq32 / 32, cp(s.sb.ptr), BQ32 * 2, cp(s.qv.ptr), Dp * 4, mp(s.dkl.ptr), Dp * 4,
                 false);
    add_rows(s.dkl.ptr, nk, D, Dp, dK + k0 * ldkv, ldkv);
    tile_product(Dp / 16, mqp / 16, nk32 / 32, cp(KTg + k0), rows * 2, cp(s.sp.ptr), BQ * 4, mp(dQT), BQ * 4, true);
  }
  // dq rows: dQ^T transposed, converted
  at::vec::transpose_mxn<float>(dQT, BQ, s.dqr.ptr, Dp, static_cast<int>(D), static_cast<int>(mq));
  for (int64_t i = 0; i < mq; ++i) at::vec::convert(s.dqr.ptr + i * Dp, dq_rows + i * ld_dq, D);
}

}  // namespace amx
#pragma GCC pop_options
#endif

// Whether bf16 attention (forward and backward) runs on AMX: the CPU has the instructions, Linux grants this process the tile state
// (once), and PYLLM_CPU_AMX is not 0. fp16 and fp32 always take the fp32 path (AMX-FP16 is a later generation).
bool use_amx(const Problem& p) {
#if PYLLM_ATTENTION_AMX
  static const bool usable = [] {
    __builtin_cpu_init();
    if (!__builtin_cpu_supports("amx-tile") || !__builtin_cpu_supports("amx-bf16") ||
        !__builtin_cpu_supports("avx512bf16") || !__builtin_cpu_supports("avx512bw"))
      return false;
    constexpr long kReqXcompPerm = 0x1023, kXfeatureTileData = 18;  // ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureTileData) == 0;
  }();
  const char* env = std::getenv("PYLLM_CPU_AMX");
  return usable && p.D <= kMaxHeadDim && !(env != nullptr && env[0] == '0');
#else
  (void)p;
  return false;
#endif
}

// ---------------------------------------------------------------------------------------------
// Backward.

struct BwdStrides {
  Strides sdo, sq, sk, sv, so;
};

template <typename S, typename T>
void bwd_kernel(const Problem& p, const BwdStrides& st, const S* dout, const S* q, const S* k,
                const S* v, const S* out, const T* lse, S* dq, S* dk, S* dv, int64_t nsplit) {
  constexpr T ninf = -std::numeric_limits<T>::infinity();
  constexpr T pinf = std::numeric_limits<T>::infinity();
  constexpr int64_t W = Vectorized<T>::size();
  using V = Vectorized<T>;
  const int64_t D = p.D;
  // bf16 on a CPU with AMX: each query block goes to amx::bwd_block, with bf16 K, V and K^T packed once here
  // (the fp32 copies are not made). Its query blocks are a multiple of the 16-column tiles whatever W is.
  const bool tiles = std::is_same_v<S, at::BFloat16> && use_amx(p);
  const Blocks bl = make_blocks(p, kBwdBlockQ, kBwdBlockK, tiles ? std::max<int64_t>(W, 16) : W);
  const int64_t BQ = bl.BQ, BK = bl.BK, Dp = bl.Dp, Nkp = bl.nkb * BK;
  const std::vector<int64_t> kp0 = p.cu_k ? padded_starts(p, BK) : std::vector<int64_t>();
  at::Tensor k_store, v_store;
  const Rows<T> Kr = tiles ? Rows<T>{} : kv_rows<S, T>(p, bl, k, st.sk, k_store, kp0, 0),
                Vr = tiles ? Rows<T>{} : kv_rows<S, T>(p, bl, v, st.sv, v_store, kp0, 1);
#if PYLLM_ATTENTION_AMX
  std::optional<amx::KeyLayout> layout;
  at::Tensor kt_store;
  amx::BwdKeys keys;
  const int64_t BKa = std::min<int64_t>(kBwdBlockK, std::max<int64_t>(32, round_up(p.Nk, 32)));
  if constexpr (std::is_same_v<S, at::BFloat16>) {
    if (tiles) {
      layout.emplace(p);
      keys = {amx::pack_keys(p, *layout, k, st.sk, false, 0, k_store), amx::pack_keys(p, *layout, v, st.sv, false, 1, v_store),
              amx::pack_keys(p, *layout, k, st.sk, true, 2, kt_store), &*layout};
    }
  }
#endif
  // dK, dV accumulators: the outputs themselves when they can be (fp32/fp64, aligned head_dim, one
  // task per kv head), else (B * Hkv * nsplit, 2, Nkp, Dp), summed over splits in order at the end
  // (packed sequences: (Hkv, nsplit, 2, kp0[B], Dp), sequence b from row kp0[b]).
  const bool direct = std::is_same_v<S, T> && D % W == 0 && nsplit == 1;
  // A bias gradient summed over the batch (dbias_sb == 0): a task is (kv head, split) over every sequence.
  const bool batch_inner = p.f.dbias != nullptr && p.f.dbias_sb == 0 && p.cu_q == nullptr;
  const int64_t ntask = (batch_inner ? 1 : p.B) * p.Hkv * nsplit, tkp = p.cu_k ? kp0[p.B] : 0;
  const int64_t acc_rows = p.cu_k ? tkp : Nkp;  // rows between a task's dK and dV accumulators
  auto acc_at = [&](T* acc, int64_t b, int64_t g, int64_t c) {  // task (b, g, c)'s dK accumulator
    return p.cu_k ? acc + ((g * nsplit + c) * 2 * tkp + kp0[b]) * Dp : acc + ((b * p.Hkv + g) * nsplit + c) * 2 * Nkp * Dp;
  };
  at::Tensor acc_t;
  if (!direct)
    acc_t = at::zeros({(p.cu_k ? p.Hkv * nsplit * 2 * tkp : p.B * p.Hkv * nsplit * 2 * Nkp) * Dp},
                      at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
  T* acc = direct ? nullptr : acc_t.data_ptr<T>();
  const T scale = static_cast<T>(p.scale);
  auto work = [&](auto&& next) {
    // Qp, dOp (BQ, Dp) rows; QT, dOT (D, BQ); PT, dPT (BK, BQ); dQ (BQ, Dp); delta, L per query
    Scratch<T> q_buf(BQ * Dp), do_buf(BQ * Dp), qt_buf(D * BQ), dot_buf(D * BQ), p_buf(BK * BQ),
        dp_buf(BK * BQ), dq_buf(BQ * Dp), delta_buf(BQ), lse_buf(BQ), t_buf(BK * BQ), z_buf(BK * BQ),
        pz_buf(BK * BQ);
    T *Qp = q_buf.ptr, *dOp = do_buf.ptr, *QT = qt_buf.ptr, *dOT = dot_buf.ptr, *PT = p_buf.ptr,
      *dPT = dp_buf.ptr, *dQ = dq_buf.ptr, *delta = delta_buf.ptr, *L = lse_buf.ptr, *TT = t_buf.ptr,
      *Z = z_buf.ptr, *PZ = pz_buf.ptr;
    Scratch<T> or_buf(Dp);  // one row of O, widened
    T* Or = or_buf.ptr;
    std::fill(Or, Or + Dp, T(0));
    const bool capped = p.f.softcap > 0, dropping = p.f.drop_threshold != 0;
    T* dbias = static_cast<T*>(p.f.dbias);
#if PYLLM_ATTENTION_AMX
    std::optional<amx::BwdScratch> tile_scratch;
    if (tiles) {
      tile_scratch.emplace(BQ, BKa, layout->Dp);
      amx::configure();
    }
#endif
    for (int64_t task; (task = next()) >= 0;)
      for (int64_t bi = 0; bi < (batch_inner ? p.B : 1); ++bi) {
      const int64_t c = task % nsplit, g = (task / nsplit) % p.Hkv, b = batch_inner ? bi : task / (nsplit * p.Hkv);
      const Problem ps = p.seq(b);  // the sequence's lengths and rows (packed); p itself when padded
      const int64_t nqb = (ps.Nq + BQ - 1) / BQ;
      T *dK, *dV;
      int64_t ldkv;
      if (direct) {  // rows of (B, Nk, Hkv, D) for head g, zeroed here by the task that owns and accumulates them
        dK = reinterpret_cast<T*>(dk) + ps.kg0 * p.Hkv * D + g * D;
        dV = reinterpret_cast<T*>(dv) + ps.kg0 * p.Hkv * D + g * D;
        ldkv = p.Hkv * D;
        for (int64_t n = 0; n < ps.Nk; ++n) {
          std::fill(dK + n * ldkv, dK + n * ldkv + D, T(0));
          std::fill(dV + n * ldkv, dV + n * ldkv + D, T(0));
        }
      } else {
        dK = acc_at(acc, b, g, c);
        dV = dK + acc_rows * Dp;
        ldkv = Dp;
      }
      const bool* mk = p.mask ? p.mask + b * p.Nk : nullptr;
      for (int64_t h = g * p.group(); h < (g + 1) * p.group(); ++h) {
        for (int64_t qb = c; qb < nqb; qb += nsplit) {
          const int64_t q0 = qb * BQ, mq = std::min(BQ, ps.Nq - q0), mqp = round_up(mq, W);
          const int64_t kend = ps.key_end(q0 + mq - 1), kstart = ps.key_start(q0);
          if (kend <= kstart) {  // the block sees no key: its dq rows are zero (each block's rows are one task's)
            for (int64_t i = 0; i < mq; ++i) {
              S* o = dq + ((ps.qg0 + q0 + i) * p.Hq + h) * D;
              std::fill(o, o + D, S(0));
            }
            continue;
          }
          const int64_t r0 = ps.qr0 + q0;
          const S* Qs = q + b * st.sq.b + h * st.sq.h + r0 * st.sq.n;
          const S* dOs = dout + b * st.sdo.b + h * st.sdo.h + r0 * st.sdo.n;
          const S* Os = out + b * st.so.b + h * st.so.h + r0 * st.so.n;
#if PYLLM_ATTENTION_AMX
          if constexpr (std::is_same_v<S, at::BFloat16>) {
            if (tiles) {
              amx::bwd_block(p, ps, b, h, g, q0, mq, BQ, BKa, Qs, st.sq.n, dOs, st.sdo.n, Os, st.so.n,
                             lse + b * p.lse_sb + h * p.lse_sh + r0, keys, dK, dV, ldkv,
                             dq + ((ps.qg0 + q0) * p.Hq + h) * D, p.Hq * D, *tile_scratch);
              continue;
            }
          }
#endif
          pack_rows(Qs, st.sq.n, mq, D, Qp, Dp, mq);
          pack_rows(dOs, st.sdo.n, mq, D, dOp, Dp, mq);
          pack_transposed(Qs, st.sq.n, mq, D, QT, BQ);
          pack_transposed(dOs, st.sdo.n, mq, D, dOT, BQ);
          for (int64_t i = 0; i < BQ; ++i) {  // delta = rowsum(dO * O); L = +inf makes P = 0
            T sum = 0;
            if (i < mq) {  // by vector: O's row widened into Or (zeros past D, as dOp's)
              convert_row(Os + i * st.so.n, Or, D);
              V acc(T(0));
              for (int64_t d = 0; d < Dp; d += W) acc = at::vec::fmadd(V::loadu(dOp + i * Dp + d), V::loadu(Or + d), acc);
              sum = at::vec::vec_reduce_all<T>([](V& a, V& b) { return a + b; }, acc);
            }
            delta[i] = sum;
            const T li = i < mq ? lse[b * p.lse_sb + h * p.lse_sh + r0 + i] : ninf;
            L[i] = li == ninf ? pinf : li;
          }
          std::fill(dQ, dQ + mq * Dp, T(0));
          for (int64_t k0 = kstart; k0 < kend; k0 += BK) {
            const int64_t nk = std::min(BK, kend - k0);
            const int mstat = mask_status(mk ? mk + k0 : nullptr, nk);
            if (mstat == 0) continue;
            const T* Kb = Kr.at(b, g, k0);
            matmul<T>(nk, mqp, D, Kb, Kr.ld, 1, QT, BQ, PT, BQ, scale, false);  // S^T (nk, mqp)
            if (p.f.modifies_scores()) modify_scores<T>(ps, PT, capped ? TT : nullptr, BQ, b, h, q0, mq, k0, nk);
            mask_block(ps, PT, BQ, q0, mq, k0, nk, mk, mstat);
            for (int64_t j = 0; j < nk; ++j)  // P^T = exp(S^T - lse)
              at::vec::map2([](V s, V lv) { return vexp(s - lv); }, PT + j * BQ, PT + j * BQ, L, mqp);
            const T* PV = PT;  // the probabilities that multiplied V: P, or P Z under dropout
            if (dropping) {
              std::copy(PT, PT + nk * BQ, PZ);
              dropout_tile<T>(ps, PZ, Z, BQ, b, h, q0, mq, k0, nk);
              PV = PZ;
            }
            // dV += P^T dO (nk, Dp);  dP^T = V dO^T (nk, mqp)
            matmul<T>(nk, Dp, mq, PV, BQ, 1, dOp, Dp, dV + k0 * ldkv, ldkv, T(1), true);
            matmul<T>(nk, mqp, D, Vr.at(b, g, k0), Vr.ld, 1, dOT, BQ, dPT, BQ, T(1), false);
            score_gradient<T>(p, dPT, PT, dropping ? Z : nullptr, capped ? TT : nullptr, delta, dbias, BQ, b, h, q0,
                              mq, mqp, k0, nk);
            // dQ += scale dS K (mq, Dp), dS read transposed;  dK += scale dS^T Q (nk, Dp)
            matmul<T>(mq, Dp, nk, dPT, 1, BQ, Kb, Kr.ld, dQ, Dp, scale, true);
            matmul<T>(nk, Dp, mq, dPT, BQ, 1, Qp, Dp, dK + k0 * ldkv, ldkv, scale, true);
          }
          for (int64_t i = 0; i < mq; ++i) {  // dq (B, Nq, Hq, D): this task owns these rows
            S* o = dq + ((ps.qg0 + q0 + i) * p.Hq + h) * D;
            if constexpr (std::is_same_v<S, T>) {
              std::copy(dQ + i * Dp, dQ + i * Dp + D, o);
            } else {
              at::vec::convert(dQ + i * Dp, o, D);
            }
          }
        }
      }
    }
#if PYLLM_ATTENTION_AMX
    if (tiles) amx::release();
#endif
  };
  if (p.cu_q == nullptr) {  // padded: contiguous ranges of tasks
    at::parallel_for(0, ntask, 1, [&](int64_t begin, int64_t end) {
      int64_t task = begin;
      work([&]() -> int64_t { return task < end ? task++ : -1; });
    });
  } else {  // packed: the longest sequences' tasks first, handed out one at a time
    // Sequences without queries or keys are tasks too (last): they write their rows' zeros.
    std::vector<std::pair<int64_t, int64_t>> order;  // (cost, task)
    for (int64_t t = 0; t < ntask; ++t) {
      const Problem ps = p.seq(t / (nsplit * p.Hkv));
      order.push_back({ps.Nq * ps.Nk, t});
    }
    std::stable_sort(order.begin(), order.end(), [](const auto& x, const auto& y) { return x.first > y.first; });
    run_dynamic(static_cast<int64_t>(order.size()), [&](auto&& take) {
      work([&]() -> int64_t {
        const int64_t i = take();
        return i < 0 ? -1 : order[i].second;
      });
    });
  }
  if (direct) return;
  // dk[b, n, g, :] = sum over splits c, in order, of the task accumulators; same for dv.
  const int64_t nrows = p.cu_k ? p.cu_k[p.B] : p.B * p.Nk;  // key rows (b, n), packed or not
  at::parallel_for(0, nrows * p.Hkv, 64, [&](int64_t begin, int64_t end) {
    Scratch<T> sum_row(2 * Dp);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t g = i % p.Hkv, r = i / p.Hkv;
      const int64_t b = p.cu_k ? std::upper_bound(p.cu_k, p.cu_k + p.B + 1, r) - p.cu_k - 1 : r / p.Nk;
      const int64_t n = p.cu_k ? r - p.cu_k[b] : r % p.Nk;
      S* dk_row = dk + (r * p.Hkv + g) * D;
      S* dv_row = dv + (r * p.Hkv + g) * D;
      const T* a0 = acc_at(acc, b, g, 0) + n * Dp;
      if constexpr (std::is_same_v<T, float>) {  // by vector: the splits' rows summed in order into sk, sv
        T* sk = sum_row.ptr;
        T* sv = sum_row.ptr + Dp;
        std::copy(a0, a0 + Dp, sk);
        std::copy(a0 + acc_rows * Dp, a0 + acc_rows * Dp + Dp, sv);
        for (int64_t c = 1; c < nsplit; ++c) {
          const T* ac = a0 + c * 2 * acc_rows * Dp;
          at::vec::map2([](V x, V y) { return x + y; }, sk, sk, ac, Dp);
          at::vec::map2([](V x, V y) { return x + y; }, sv, sv, ac + acc_rows * Dp, Dp);
        }
        at::vec::convert(sk, dk_row, D);
        at::vec::convert(sv, dv_row, D);
      } else {
        for (int64_t d = 0; d < D; ++d) {
          T sk = 0, sv = 0;
          for (int64_t c = 0; c < nsplit; ++c) {
            sk += a0[c * 2 * acc_rows * Dp + d];
            sv += a0[c * 2 * acc_rows * Dp + acc_rows * Dp + d];
          }
          dk_row[d] = static_cast<S>(sk);
          dv_row[d] = static_cast<S>(sv);
        }
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Argument checks and entry points.

at::ScalarType acc_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

void check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  for (auto [t, name] : {std::pair{&q, "q"}, std::pair{&k, "k"}, std::pair{&v, "v"}}) {
    TORCH_CHECK(t->dim() == 4, "attention: ", name, " must be 4-D (batch, seqlen, heads, head_dim), got ",
                t->dim(), "-D shape ", t->sizes());
    TORCH_CHECK(t->device().is_cpu(), "attention: ", name, " must be a CPU tensor, got ", t->device());
    TORCH_CHECK(t->stride(3) == 1 || t->size(3) <= 1, "attention: ", name,
                " must be contiguous in its last dim (stride(-1) == 1), got strides ", t->strides());
  }
  const auto dt = q.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16 || dt == at::kDouble,
              "attention: q dtype must be float32, float16, bfloat16 or float64, got ", dt);
  TORCH_CHECK(k.scalar_type() == dt && v.scalar_type() == dt, "attention: q, k, v must share a dtype, got ",
              dt, ", ", k.scalar_type(), ", ", v.scalar_type());
  TORCH_CHECK(k.sizes() == v.sizes(), "attention: k and v must have the same shape, got ", k.sizes(),
              " and ", v.sizes());
  TORCH_CHECK(k.size(0) == q.size(0), "attention: k has batch ", k.size(0), " but q has ", q.size(0));
  TORCH_CHECK(k.size(3) == q.size(3), "attention: k has head_dim ", k.size(3), " but q has ", q.size(3));
  const int64_t D = q.size(3);
  TORCH_CHECK(D >= 1 && D <= kMaxHeadDim, "attention: head_dim must be in [1, ", kMaxHeadDim, "], got ", D);
  TORCH_CHECK(k.size(2) >= 1 && q.size(2) % k.size(2) == 0, "attention: q heads (", q.size(2),
              ") must be a multiple of k/v heads (", k.size(2), ")");
}

void check_mask(const std::optional<at::Tensor>& mask, const at::Tensor& q, const at::Tensor& k) {
  if (!mask.has_value()) return;
  const at::Tensor& m = *mask;
  TORCH_CHECK(m.scalar_type() == at::kBool, "attention: key_padding_mask must be bool, got ", m.scalar_type());
  TORCH_CHECK(m.device().is_cpu(), "attention: key_padding_mask must be a CPU tensor, got ", m.device());
  TORCH_CHECK(m.dim() == 2 && m.size(0) == q.size(0) && m.size(1) == k.size(1),
              "attention: key_padding_mask must have shape (batch, seqlen_k) = (", q.size(0), ", ",
              k.size(1), "), got ", m.sizes());
}

// The feature arguments of attention_ext_{fwd,bwd} as a Features struct; `keep` holds the converted
// tensors it points into. Memory-safety guards only: the op layer has validated the values.
using FeatureArgs = pyllm::AttentionFeatureArgs;  // csrc/attention_args.h

// B, Nq, Hq, Nk: the batch (number of sequences when packed) and the (longest) lengths.
Features make_features(const FeatureArgs& a, const at::Tensor& q, int64_t B, int64_t Nq, int64_t Hq, int64_t Nk,
                       std::vector<at::Tensor>& keep) {
  Features f;
  f.window_left = a.window_left;
  f.window_right = a.window_right;
  f.softcap = a.softcap;
  if (a.alibi.has_value()) {
    const at::Tensor& s = *a.alibi;
    TORCH_CHECK(s.device().is_cpu() && ((s.dim() == 1 && s.size(0) == Hq) ||
                                        (s.dim() == 2 && s.size(0) == B && s.size(1) == Hq)),
                "attention: alibi_slopes must be a CPU tensor of shape (", Hq, ") or (", B, ", ", Hq, "), got ",
                s.sizes());
    keep.push_back(s.to(at::kFloat).contiguous());
    f.alibi = keep.back().data_ptr<float>();
    f.alibi_sb = s.dim() == 2 ? Hq : 0;
  }
  if (a.bias.has_value()) {
    const at::Tensor& t = *a.bias;
    TORCH_CHECK(t.device().is_cpu() && t.dim() == 4, "attention: attn_bias must be a 4-D CPU tensor, got ", t.sizes());
    keep.push_back(t.to(acc_type(q.scalar_type())).expand({B, Hq, Nq, Nk}));  // throws if it does not broadcast
    const at::Tensor& e = keep.back();
    f.bias = e.data_ptr();
    f.bias_sb = e.stride(0), f.bias_sh = e.stride(1), f.bias_si = e.stride(2), f.bias_sj = e.stride(3);
  }
  if (a.dropout_p > 0) {
    TORCH_CHECK(a.dropout_p < 1 && a.drop_lq >= Nq && a.drop_lk >= Nk, "attention: dropout_p must be in [0, 1) "
                "and the dropout layout at least (Nq, Nk), got ", a.dropout_p, ", (", a.drop_lq, ", ", a.drop_lk, ")");
    f.drop_threshold = static_cast<uint32_t>(std::min<double>(std::floor(a.dropout_p * 4294967296.0), 4294967295.0));
    f.drop_scale = 1.0 / (1.0 - a.dropout_p);
    f.seed = static_cast<uint64_t>(a.seed);
    f.offset = static_cast<uint64_t>(a.offset);
    f.drop_lq = a.drop_lq;
    f.drop_lk = a.drop_lk;
  }
  return f;
}

std::tuple<at::Tensor, at::Tensor> attention_fwd_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                      const std::optional<at::Tensor>& key_padding_mask,
                                                      bool causal, double softmax_scale, const FeatureArgs& fa) {
  check_qkv(q, k, v);
  check_mask(key_padding_mask, q, k);
  at::Tensor mask;
  if (key_padding_mask.has_value()) mask = key_padding_mask->contiguous();
  std::vector<at::Tensor> keep;
  Problem p{q.size(0), q.size(1), k.size(1), q.size(2), k.size(2), q.size(3), causal, softmax_scale,
            mask.defined() ? mask.data_ptr<bool>() : nullptr,
            make_features(fa, q, q.size(0), q.size(1), q.size(2), k.size(1), keep), q.size(2) * q.size(1), q.size(1)};
  at::Tensor out = at::empty({p.B, p.Nq, p.Hq, p.D}, q.options());                      // (B, Nq, Hq, D)
  at::Tensor lse = at::empty({p.B, p.Hq, p.Nq}, q.options().dtype(acc_type(q.scalar_type())));  // (B, Hq, Nq)
  if (q.scalar_type() == at::kBFloat16 && use_amx(p)) {
#if PYLLM_ATTENTION_AMX
    amx::fwd_bf16(p, q.data_ptr<at::BFloat16>(), strides_of(q), k.data_ptr<at::BFloat16>(), strides_of(k),
                  v.data_ptr<at::BFloat16>(), strides_of(v), out.data_ptr<at::BFloat16>(), lse.data_ptr<float>());
#endif
    return {out, lse};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "attention_fwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    fwd_kernel<scalar_t, acc_t>(p, q.data_ptr<scalar_t>(), strides_of(q), k.data_ptr<scalar_t>(), strides_of(k),
                                v.data_ptr<scalar_t>(), strides_of(v), out.data_ptr<scalar_t>(),
                                lse.data_ptr<acc_t>());
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor> attention_fwd_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                     const std::optional<at::Tensor>& key_padding_mask,
                                                     bool causal, double softmax_scale) {
  check_qkv(q, k, v);
  check_mask(key_padding_mask, q, k);
  std::tuple<at::Tensor, at::Tensor> decoded;  // few query rows: flash-decoding (attention_decode.cpp)
  if (pyllm::cpu::attention_decode_fwd(q, k, v, key_padding_mask, causal, softmax_scale, decoded)) return decoded;
  return attention_fwd_impl(q, k, v, key_padding_mask, causal, softmax_scale, FeatureArgs{});
}

// Split each (batch, kv head) over query blocks only when there are too few of them to keep every thread busy.
// A bias gradient summed over the batch makes the batch part of each task (see bwd_kernel).
int64_t bwd_splits(const Problem& p, bool deterministic) {
  const bool batch_inner = p.f.dbias != nullptr && p.f.dbias_sb == 0 && p.cu_q == nullptr;
  const int64_t threads = deterministic ? 4 : at::get_num_threads(), units = (batch_inner ? 1 : p.B) * p.Hkv;
  const int64_t nqb = (p.Nq + kBwdBlockQ - 1) / kBwdBlockQ;
  int64_t nsplit = 1;
  if (units > 0 && !(units % threads == 0 || units >= 4 * threads))
    nsplit = std::clamp<int64_t>((4 * threads + units - 1) / units, 1, std::max<int64_t>(nqb, 1));
  return nsplit;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_bwd_impl(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse_in, const std::optional<at::Tensor>& key_padding_mask, bool causal, double softmax_scale,
    bool deterministic, const FeatureArgs& fa, bool bias_grad) {
  check_qkv(q, k, v);
  check_mask(key_padding_mask, q, k);
  const auto dt = q.scalar_type(), acc = acc_type(dt);
  for (auto [t, name] : {std::pair{&dout, "dout"}, std::pair{&out, "out"}}) {
    TORCH_CHECK(t->sizes() == q.sizes(), "attention_bwd: ", name, " must have q's shape ", q.sizes(), ", got ",
                t->sizes());
    TORCH_CHECK(t->scalar_type() == dt, "attention_bwd: ", name, " must have q's dtype ", dt, ", got ",
                t->scalar_type());
    TORCH_CHECK(t->device().is_cpu(), "attention_bwd: ", name, " must be a CPU tensor, got ", t->device());
    TORCH_CHECK(t->stride(3) == 1 || t->size(3) <= 1, "attention_bwd: ", name,
                " must be contiguous in its last dim, got strides ", t->strides());
  }
  const int64_t B = q.size(0), Nq = q.size(1), Hq = q.size(2);
  TORCH_CHECK(lse_in.dim() == 3 && lse_in.size(0) == B && lse_in.size(1) == Hq && lse_in.size(2) == Nq,
              "attention_bwd: lse must have shape (batch, heads_q, seqlen_q) = (", B, ", ", Hq, ", ", Nq, "), got ",
              lse_in.sizes());
  TORCH_CHECK(lse_in.scalar_type() == acc, "attention_bwd: lse must be ", acc, ", got ", lse_in.scalar_type());
  TORCH_CHECK(lse_in.device().is_cpu(), "attention_bwd: lse must be a CPU tensor, got ", lse_in.device());
  const at::Tensor lse = lse_in.contiguous();
  at::Tensor mask;
  if (key_padding_mask.has_value()) mask = key_padding_mask->contiguous();
  std::vector<at::Tensor> keep;
  Problem p{B, Nq, k.size(1), Hq, k.size(2), q.size(3), causal, softmax_scale,
            mask.defined() ? mask.data_ptr<bool>() : nullptr, make_features(fa, q, B, Nq, Hq, k.size(1), keep),
            Hq * Nq, Nq};
  at::Tensor dbias_full;  // (B or 1, Hq, Nq, Nk), accumulated by the kernel, then summed to the bias's shape
  if (bias_grad && fa.bias.has_value()) {
    const bool per_batch = fa.bias->size(0) != 1 || p.B == 1;
    dbias_full = at::zeros({per_batch ? p.B : 1, p.Hq, p.Nq, p.Nk}, q.options().dtype(acc));
    p.f.dbias = dbias_full.data_ptr();
    p.f.dbias_sb = per_batch ? p.Hq * p.Nq * p.Nk : 0;
  }
  // Every row is written by bwd_kernel (query blocks that see no key get zeros there; dk, dv rows accumulated
  // in place are zeroed there by the task that owns them): no zero fill of the whole outputs first.
  at::Tensor dq = at::empty({p.B, p.Nq, p.Hq, p.D}, q.options());
  at::Tensor dk = at::empty({p.B, p.Nk, p.Hkv, p.D}, q.options());
  at::Tensor dv = at::empty({p.B, p.Nk, p.Hkv, p.D}, q.options());

  // Split each (batch, kv head) over query blocks only when there are too few of them to keep
  // every thread busy; each split then keeps its own dK/dV accumulator (memory linear in Nk).
  // With `deterministic` the split depends on the shape only, so results do not change with the
  // thread count either.
  const int64_t nsplit = bwd_splits(p, deterministic);
  const BwdStrides st{strides_of(dout), strides_of(q), strides_of(k), strides_of(v), strides_of(out)};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dt, "attention_bwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    bwd_kernel<scalar_t, acc_t>(p, st, dout.data_ptr<scalar_t>(), q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(),
                                v.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), lse.data_ptr<acc_t>(),
                                dq.data_ptr<scalar_t>(), dk.data_ptr<scalar_t>(), dv.data_ptr<scalar_t>(), nsplit);
  });
  at::Tensor dbias = dbias_full.defined() ? dbias_full.sum_to_size(fa.bias->sizes()).to(fa.bias->scalar_type())
                                          : at::empty({0}, q.options());
  return {dq, dk, dv, dbias};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd_cpu(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const std::optional<at::Tensor>& key_padding_mask, bool causal, double softmax_scale,
    bool deterministic) {
  auto [dq, dk, dv, unused] = attention_bwd_impl(dout, q, k, v, out, lse, key_padding_mask, causal, softmax_scale,
                                                 deterministic, FeatureArgs{}, false);
  return {dq, dk, dv};
}

FeatureArgs feature_args(int64_t window_left, int64_t window_right, double softcap,
                         const std::optional<at::Tensor>& alibi_slopes, const std::optional<at::Tensor>& attn_bias,
                         double dropout_p, int64_t seed, int64_t offset, int64_t drop_lq, int64_t drop_lk) {
  return FeatureArgs{window_left, window_right, softcap, alibi_slopes, attn_bias, dropout_p, seed, offset,
                     drop_lq, drop_lk};
}

std::tuple<at::Tensor, at::Tensor> attention_ext_fwd_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& key_padding_mask,
    bool causal, double softmax_scale, int64_t window_left, int64_t window_right, double softcap,
    const std::optional<at::Tensor>& alibi_slopes, const std::optional<at::Tensor>& attn_bias, double dropout_p,
    int64_t seed, int64_t offset, int64_t drop_lq, int64_t drop_lk) {
  return attention_fwd_impl(q, k, v, key_padding_mask, causal, softmax_scale,
                            feature_args(window_left, window_right, softcap, alibi_slopes, attn_bias, dropout_p, seed,
                                         offset, drop_lq, drop_lk));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_ext_bwd_cpu(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const std::optional<at::Tensor>& key_padding_mask, bool causal, double softmax_scale,
    int64_t window_left, int64_t window_right, double softcap, const std::optional<at::Tensor>& alibi_slopes,
    const std::optional<at::Tensor>& attn_bias, double dropout_p, int64_t seed, int64_t offset, int64_t drop_lq,
    int64_t drop_lk, bool bias_grad, bool deterministic) {
  return attention_bwd_impl(dout, q, k, v, out, lse, key_padding_mask, causal, softmax_scale, deterministic,
                            feature_args(window_left, window_right, softcap, alibi_slopes, attn_bias, dropout_p, seed,
                                         offset, drop_lq, drop_lk),
                            bias_grad);
}

// ---------------------------------------------------------------------------------------------
// Packed variable-length sequences (attention_varlen_fwd / attention_varlen_bwd): q (total_q, Hq, D), k, v
// (total_k, Hkv, D), cu_seqlens (B + 1,) int32. One call for the whole batch: the kernels above run with
// Problem::cu_q / cu_k set, tasks (sequence, head, query block) over the threads; nothing is padded.

// The offsets as int64, checked (memory safety: every row the kernels touch exists).
std::vector<int64_t> read_cu(const at::Tensor& cu, const char* name, int64_t total, int64_t max_len) {
  TORCH_CHECK(cu.scalar_type() == at::kInt && cu.dim() == 1 && cu.numel() >= 1 && cu.device().is_cpu(),
              "attention_varlen: ", name, " must be a 1-D int32 CPU tensor (batch + 1,), got ", cu.scalar_type(),
              " of shape ", cu.sizes(), " on ", cu.device());
  const at::Tensor c = cu.contiguous();
  const int32_t* d = c.data_ptr<int32_t>();
  std::vector<int64_t> out(d, d + c.numel());
  TORCH_CHECK(out[0] == 0, "attention_varlen: ", name, " must start at 0, got ", out[0]);
  for (size_t i = 1; i < out.size(); ++i)
    TORCH_CHECK(out[i] >= out[i - 1] && out[i] - out[i - 1] <= max_len, "attention_varlen: ", name,
                " must be non-decreasing with lengths <= max_seqlen (", max_len, "), got ", out[i - 1], ", ", out[i]);
  TORCH_CHECK(out.back() == total, "attention_varlen: ", name, " ends at ", out.back(), " but the tensor has ",
              total, " rows");
  return out;
}

struct Varlen {
  at::Tensor q, k, v;  // (1, total, H, D) views
  std::vector<int64_t> cu_q, cu_k;
  Problem p;
};

Varlen varlen_problem(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_seqlens_q,
                      const at::Tensor& cu_seqlens_k, int64_t max_q, int64_t max_k, bool causal, double scale,
                      const FeatureArgs& fa, std::vector<at::Tensor>& keep) {
  for (auto [t, name] : {std::pair{&q, "q"}, std::pair{&k, "k"}, std::pair{&v, "v"}})
    TORCH_CHECK(t->dim() == 3, "attention_varlen: ", name, " must be 3-D (total, heads, head_dim), got ", t->sizes());
  Varlen r{q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0)};
  check_qkv(r.q, r.k, r.v);
  r.cu_q = read_cu(cu_seqlens_q, "cu_seqlens_q", q.size(0), max_q);
  r.cu_k = read_cu(cu_seqlens_k, "cu_seqlens_k", k.size(0), max_k);
  TORCH_CHECK(r.cu_q.size() == r.cu_k.size(), "attention_varlen: cu_seqlens_k has ", r.cu_k.size(),
              " entries but cu_seqlens_q has ", r.cu_q.size());
  const int64_t B = static_cast<int64_t>(r.cu_q.size()) - 1, Hq = q.size(1);
  r.p = Problem{B, max_q, max_k, Hq, k.size(1), q.size(2), causal, scale, nullptr,
                make_features(fa, q, B, max_q, Hq, max_k, keep), 0, q.size(0)};
  r.p.cu_q = r.cu_q.data();
  r.p.cu_k = r.cu_k.data();
  return r;
}

Strides packed_strides(const at::Tensor& t) { return {0, t.stride(0), t.stride(1)}; }  // t: (total, H, D)

std::tuple<at::Tensor, at::Tensor> attention_varlen_fwd_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k, bool causal, double softmax_scale,
    int64_t window_left, int64_t window_right, double softcap, const std::optional<at::Tensor>& alibi_slopes,
    double dropout_p, int64_t seed, int64_t offset) {
  std::vector<at::Tensor> keep;
  const Varlen r = varlen_problem(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal,
                                  softmax_scale, FeatureArgs{window_left, window_right, softcap, alibi_slopes,
                                  std::nullopt, dropout_p, seed, offset, max_seqlen_q, max_seqlen_k}, keep);
  at::Tensor out = at::zeros(q.sizes(), q.options());  // (total_q, Hq, D); rows that see no key stay 0
  at::Tensor lse = at::full({q.size(1), q.size(0)}, -std::numeric_limits<double>::infinity(),
                            q.options().dtype(acc_type(q.scalar_type())));  // (Hq, total_q)
  if (q.scalar_type() == at::kBFloat16 && use_amx(r.p)) {
#if PYLLM_ATTENTION_AMX
    amx::fwd_bf16(r.p, q.data_ptr<at::BFloat16>(), packed_strides(q), k.data_ptr<at::BFloat16>(), packed_strides(k),
                  v.data_ptr<at::BFloat16>(), packed_strides(v), out.data_ptr<at::BFloat16>(), lse.data_ptr<float>());
#endif
    return {out, lse};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "attention_varlen_fwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    fwd_kernel<scalar_t, acc_t>(r.p, q.data_ptr<scalar_t>(), packed_strides(q), k.data_ptr<scalar_t>(),
                                packed_strides(k), v.data_ptr<scalar_t>(), packed_strides(v),
                                out.data_ptr<scalar_t>(), lse.data_ptr<acc_t>());
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_varlen_bwd_cpu(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse_in, const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
    int64_t max_seqlen_k, bool causal, double softmax_scale, int64_t window_left, int64_t window_right,
    double softcap, const std::optional<at::Tensor>& alibi_slopes, double dropout_p, int64_t seed, int64_t offset,
    bool deterministic) {
  std::vector<at::Tensor> keep;
  const Varlen r = varlen_problem(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal,
                                  softmax_scale, FeatureArgs{window_left, window_right, softcap, alibi_slopes,
                                  std::nullopt, dropout_p, seed, offset, max_seqlen_q, max_seqlen_k}, keep);
  const auto dt = q.scalar_type(), acc = acc_type(dt);
  for (auto [t, name] : {std::pair{&dout, "dout"}, std::pair{&out, "out"}}) {
    TORCH_CHECK(t->sizes() == q.sizes() && t->scalar_type() == dt && t->device().is_cpu() &&
                (t->stride(2) == 1 || t->size(2) <= 1), "attention_varlen_bwd: ", name,
                " must be a CPU tensor of q's shape and dtype, contiguous in its last dim, got ", t->sizes(), " ",
                t->scalar_type());
  }
  TORCH_CHECK(lse_in.dim() == 2 && lse_in.size(0) == q.size(1) && lse_in.size(1) == q.size(0) &&
              lse_in.scalar_type() == acc && lse_in.device().is_cpu(),
              "attention_varlen_bwd: lse must be a CPU ", acc, " tensor of shape (heads_q, total_q) = (", q.size(1),
              ", ", q.size(0), "), got ", lse_in.sizes(), " ", lse_in.scalar_type());
  const at::Tensor lse = lse_in.contiguous();
  // Every row is written by bwd_kernel (the sequences cover every row, read_cu checks): no zero fill first.
  at::Tensor dq = at::empty(q.sizes(), q.options()), dk = at::empty(k.sizes(), k.options()),
             dv = at::empty(v.sizes(), v.options());
  const int64_t nsplit = bwd_splits(r.p, deterministic);
  const BwdStrides st{packed_strides(dout), packed_strides(q), packed_strides(k), packed_strides(v),
                      packed_strides(out)};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dt, "attention_varlen_bwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    bwd_kernel<scalar_t, acc_t>(r.p, st, dout.data_ptr<scalar_t>(), q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(),
                                v.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), lse.data_ptr<acc_t>(),
                                dq.data_ptr<scalar_t>(), dk.data_ptr<scalar_t>(), dv.data_ptr<scalar_t>(), nsplit);
  });
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(pyllm, CPU, m) {
  m.impl("attention_varlen_fwd", &attention_varlen_fwd_cpu);
  m.impl("attention_varlen_bwd", &attention_varlen_bwd_cpu);
  m.impl("attention_fwd", &attention_fwd_cpu);
  m.impl("attention_bwd", &attention_bwd_cpu);
  m.impl("attention_ext_fwd", &attention_ext_fwd_cpu);
  m.impl("attention_ext_bwd", &attention_ext_bwd_cpu);
}
