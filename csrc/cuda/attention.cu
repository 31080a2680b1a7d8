// FlashAttention-2 forward and backward on tensor cores (mma.sync m16n8k16, fp16/bf16 in, fp32
// accumulate; sm_80+). CUDA headers only: the torch glue lives in bindings.cpp.
//
// Layout (B, N, H, D) with strides in elements; GQA/MQA by index (query head h reads kv head
// h / (Hq / Hkv)); bottom-right causal (query i sees key j iff j <= i + Nk - Nq); optional key padding
// mask (B, Nk) of bytes, 1 = real token. A row that sees no key gets out = 0 and lse = -inf, and
// contributes nothing to the gradients.
//
// Work split. Forward: every warp owns 16 * MT query rows (MT = 2 up to D = 128, FlashAttention-2's 32 rows
// per warp), so each K/V fragment read from shared memory feeds MT tensor-core products, and the softmax
// statistics of a row live in the 4 lanes of one quad and never cross warps. K and V stream through shared
// memory with cp.async in separate groups, double-buffered: S = Q K^T waits only for K, and the copies of
// K_{j+1} and V_{j+1} are in flight while tile j is multiplied. Causal grids start with the query blocks
// that see the most keys (the last ones), so the long blocks do not trail at the end of the launch.
// Backward dK/dV: a CTA owns BN keys; P and dS of each (query head, query block) go through shared memory,
// so dK and dV are split over the warps by key rows *and* head-dim columns and never spill (64 fp32
// accumulators per thread at D = 128, 128 at D = 256).
//
// GQA backward: the query heads of a group are split over `splits` CTAs per (key block, kv head)
// (attention_bwd_group_split: 1 when the grid already fills the device, so MHA and large grids keep the
// single pass and no workspace). With a split, each CTA writes its fp32 dK/dV partial to the workspace
// (deterministic: one slot per split, summed in split order by attn_bwd_dkv_reduce_kernel) or adds it
// with fp32 atomics (torch.are_deterministic_algorithms_enabled() false, as for dQ); the reduction then
// casts to the output dtype.
//
// FlashAttention's features (sliding window, softcap, ALiBi, dropout; kernels.h AttentionFeatures) run in
// the EXT = true instances of the same kernels: the plain instances are unchanged. Key tiles (forward,
// dQ) and query blocks (dK/dV) outside every row's window are never visited, so a window of w costs
// O(N w). Dropout draws the Philox4x32-10 bits of pyllm.reference.philox_bits per element from its
// (b, h, i, j) counter, so the forward and both backward kernels regenerate the identical mask.
//
// Every kernel states __launch_bounds__(threads, 1): without the minimum, ptxas trades registers for
// occupancy on its own (capping at 168 or 128) and spills; with it, the tile sizes below decide (ptxas
// table of the CMake build: no attention kernel spills at D <= 128).
//
// Head dims are padded to DP in {32, 64, 96, 128, 160, 192, 224, 256}; loads past D write zeros, so any
// D <= 256 is exact. Shared-memory rows carry 8 elements of padding (kPad): rows stay 16-byte aligned
// for cp.async/ldmatrix, and the 8 rows that one ldmatrix phase reads land in distinct banks.
#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>

#include "common.cuh"
#include "kernels.h"

namespace pyllm {
namespace cuda {
namespace {

using namespace detail;

constexpr int kPad = 8;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// Copies a (ROWS x DP) tile from global memory (rows_valid x D valid, row stride ld_g) into shared
// memory (row stride DP + kPad), writing zeros outside the valid region. vec: 16-byte cp.async
// (needs 16-byte aligned rows and D % 8 == 0); otherwise plain element loads.
template <typename T, int ROWS, int DP, int NT>
__device__ __forceinline__ void load_tile(T* s, const T* g, int64_t ld_g, int rows_valid, int D,
                                          bool vec) {
  constexpr int LD = DP + kPad;
  if (vec) {
    constexpr int CPR = DP / 8;  // 16-byte chunks per row
    for (int c = threadIdx.x; c < ROWS * CPR; c += NT) {
      const int r = c / CPR, col = (c % CPR) * 8;
      const bool ok = r < rows_valid && col < D;
      cp_async16(s + r * LD + col, ok ? g + r * ld_g + col : g, ok);
    }
  } else {
    for (int i = threadIdx.x; i < ROWS * DP; i += NT) {
      const int r = i / DP, col = i % DP;
      s[r * LD + col] = (r < rows_valid && col < D) ? g[r * ld_g + col] : from_float<T>(0.f);
    }
  }
}

__device__ __forceinline__ bool key_visible(int q_row, int key, int Nq, int Nk, bool causal,
                                            const uint8_t* mask_row) {
  return key < Nk && (!causal || key <= q_row + Nk - Nq) && (mask_row == nullptr || mask_row[key]);
}

// The features of one call seen from one (batch, query head): visibility (window, causal, padding),
// the score modification (softcap, ALiBi) and the dropout mask. Rows and keys are sequence positions.
struct Ext {
  int left, right, shift, Nq, Nk;  // window (-1 = unbounded; causal folded into right), shift = Nk - Nq
  const uint8_t* mask;             // key padding row of this batch, or nullptr
  float cap, inv_cap, slope;       // cap = 0: no softcap; slope = 0: no ALiBi
  bool alibi, dropping;
  uint32_t threshold;
  uint64_t seed, base;             // dropout counter of (row i, key j): base + i * lk + j
  int64_t lk;

  __device__ void init(const AttentionFeatures& f, bool causal, int nq, int nk, const uint8_t* mask_row) {
    left = f.window_left;
    right = causal ? 0 : f.window_right;
    Nq = nq, Nk = nk, shift = nk - nq, mask = mask_row;
    cap = f.softcap, inv_cap = f.softcap > 0.f ? 1.f / f.softcap : 0.f;
    alibi = f.alibi_slopes != nullptr;
    dropping = f.drop_threshold != 0u;
    threshold = f.drop_threshold, seed = f.seed, lk = f.drop_lk;
    slope = 0.f, base = 0;
  }
  // Per query head (the dK/dV kernel visits several).
  __device__ void set_head(const AttentionFeatures& f, int b, int h, int heads_q) {
    slope = alibi ? f.alibi_slopes[b * f.alibi_stride_b + h] : 0.f;
    base = f.offset + static_cast<uint64_t>((static_cast<int64_t>(b) * heads_q + h) * f.drop_lq * f.drop_lk);
  }
  __device__ bool visible(int i, int j) const {
    const int64_t d = static_cast<int64_t>(j) - i - shift;
    return j < Nk && (right < 0 || d <= right) && (left < 0 || d >= -left) && (mask == nullptr || mask[j]);
  }
  // s: the scaled score q.k * softmax_scale; returns the modified score, and t = tanh(s / cap) for the
  // softcap gradient (1 - t^2).
  __device__ float modify(float s, int i, int j, float& t) const {
    t = 0.f;
    if (cap > 0.f) {
      t = tanhf(s * inv_cap);
      s = cap * t;
    }
    if (alibi) s -= slope * fabsf(static_cast<float>(static_cast<int64_t>(i) + shift - j));
    return s;
  }
  __device__ bool keep(int i, int j) const {
    return philox_word0(seed, base + static_cast<uint64_t>(static_cast<int64_t>(i) * lk + j)) >= threshold;
  }
  // Keys [key_start(r0), key_end(r1)) cover what rows r0..r1 see; rows [row_first(k0), row_last(k1)]
  // what keys k0..k1 are seen by (empty when last < first).
  // (int64: a window wider than the sequences must not overflow)
  __device__ int key_start(int r0) const { return left < 0 ? 0 : clamp64(int64_t(r0) + shift - left, 0, Nk); }
  __device__ int key_end(int r1) const { return right < 0 ? Nk : clamp64(int64_t(r1) + shift + right + 1, 0, Nk); }
  __device__ int row_first(int k0) const { return right < 0 ? 0 : clamp64(int64_t(k0) - shift - right, 0, Nq); }
  __device__ int row_last(int k1) const { return left < 0 ? Nq - 1 : clamp64(int64_t(k1) - shift + left, -1, Nq - 1); }
  static __device__ int clamp64(int64_t x, int lo, int hi) { return static_cast<int>(x < lo ? lo : x > hi ? hi : x); }
};

// acc[mt] (16 x BN, C fragments of one warp) += A (16 x DP, rows row0 + 16 mt.. of sA) * B^T, B the
// (BN x DP) rows of sB: S = Q K^T (also dP = dO V^T, S^T = K Q^T, dP^T = V dO^T). Each B fragment loaded
// from shared memory feeds MT products.
template <typename T, int DP, int BN, int MT = 1>
__device__ __forceinline__ void mma_abt(float (&acc)[MT][BN / 8][4], const T* sA, int row0, const T* sB,
                                        int lane) {
  constexpr int LD = DP + kPad;
#pragma unroll
  for (int kk = 0; kk < DP / 16; ++kk) {
    uint32_t a[MT][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)  // matrices: (rows 0-7, k 0-7), (rows 8-15, k 0-7), (rows 0-7, k 8-15), (rows 8-15, k 8-15)
      ldmatrix_x4(a[mt], sA + (row0 + mt * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * LD + kk * 16 + (lane >> 4) * 8);
#pragma unroll
    for (int nn = 0; nn < BN / 16; ++nn) {
      uint32_t b[4];
      // matrices: (n 0-7, k 0-7), (n 0-7, k 8-15), (n 8-15, k 0-7), (n 8-15, k 8-15)
      ldmatrix_x4(b, sB + (nn * 16 + (lane & 7) + (lane >> 4) * 8) * LD + kk * 16 + ((lane >> 3) & 1) * 8);
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        mma16816<T>(acc[mt][2 * nn], a[mt], b[0], b[1]);
        mma16816<T>(acc[mt][2 * nn + 1], a[mt], b[2], b[3]);
      }
    }
  }
}

// acc[mt] (16 x DP) += P[mt] (16 x KN, C fragments of one warp, rounded to T) * B (KN x DP rows of sB): the
// O += P V product (also dQ += dS K). The C fragments of two adjacent n-tiles are exactly the A fragment
// of one k-chunk, so P never leaves registers; each B fragment feeds MT products.
template <typename T, int DP, int KN, int MT = 1>
__device__ __forceinline__ void mma_pb(float (&acc)[MT][DP / 8][4], const float (&p)[MT][KN / 8][4],
                                       const T* sB, int lane) {
  constexpr int LD = DP + kPad;
#pragma unroll
  for (int kk = 0; kk < KN / 16; ++kk) {
    uint32_t a[MT][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      a[mt][0] = pack2<T>(p[mt][2 * kk][0], p[mt][2 * kk][1]);
      a[mt][1] = pack2<T>(p[mt][2 * kk][2], p[mt][2 * kk][3]);
      a[mt][2] = pack2<T>(p[mt][2 * kk + 1][0], p[mt][2 * kk + 1][1]);
      a[mt][3] = pack2<T>(p[mt][2 * kk + 1][2], p[mt][2 * kk + 1][3]);
    }
#pragma unroll
    for (int dd = 0; dd < DP / 16; ++dd) {
      uint32_t b[4];
      // transposed matrices: (k 0-7, n 0-7), (k 8-15, n 0-7), (k 0-7, n 8-15), (k 8-15, n 8-15)
      ldmatrix_x4_trans(b, sB + (kk * 16 + (lane & 15)) * LD + dd * 16 + (lane >> 4) * 8);
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        mma16816<T>(acc[mt][2 * dd], a[mt], b[0], b[1]);
        mma16816<T>(acc[mt][2 * dd + 1], a[mt], b[2], b[3]);
      }
    }
  }
}

// acc (16 x NC) += A^T B for the dK/dV products: A^T is (16 keys x KM queries) read from sAt, which holds
// A query-major (KM rows of LDA, key columns key0..key0+15): dV += P^T dO, dK += dS^T Q. B is (KM x NC),
// columns col0.. of sB (row stride DP + kPad). ldmatrix .trans of the query-major tile yields exactly the
// row-major A fragment of the transposed product.
template <typename T, int DP, int KM, int NC, int LDA>
__device__ __forceinline__ void mma_atb(float (&acc)[NC / 8][4], const T* sAt, int key0, const T* sB, int col0,
                                        int lane) {
  constexpr int LD = DP + kPad;
#pragma unroll
  for (int kk = 0; kk < KM / 16; ++kk) {
    uint32_t a[4];
    // stored matrix i = lane / 8 holds (k 8(i/2).., m 8(i%2)..) of A^T: a0 (m 0-7, k 0-7), a1 (m 8-15, k 0-7),
    // a2 (m 0-7, k 8-15), a3 (m 8-15, k 8-15)
    ldmatrix_x4_trans(a, sAt + (kk * 16 + ((lane >> 4) & 1) * 8 + (lane & 7)) * LDA + key0 + ((lane >> 3) & 1) * 8);
#pragma unroll
    for (int dd = 0; dd < NC / 16; ++dd) {
      uint32_t b[4];
      ldmatrix_x4_trans(b, sB + (kk * 16 + (lane & 15)) * LD + col0 + dd * 16 + (lane >> 4) * 8);
      mma16816<T>(acc[2 * dd], a, b[0], b[1]);
      mma16816<T>(acc[2 * dd + 1], a, b[2], b[3]);
    }
  }
}

template <int N>
__device__ __forceinline__ void zero(float (&acc)[N][4]) {
#pragma unroll
  for (int i = 0; i < N; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;
}

// Stores a warp's 16 x NC fp32 C fragments times `scale` into rows row0.. and columns col0.. of a
// (rows_valid x D) output; ATOMIC (T = float): adds them with atomicAdd instead.
template <typename T, int NC, bool ATOMIC = false>
__device__ __forceinline__ void store_rows(T* g, int64_t ld_g, int row0, int rows_valid, int col0, int D,
                                           const float (&acc)[NC / 8][4], float scale0, float scale1,
                                           int lane) {
  const int gq = lane >> 2, tq = lane & 3;
#pragma unroll
  for (int dt = 0; dt < NC / 8; ++dt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int r = row0 + gq + (e >> 1) * 8, c = col0 + dt * 8 + 2 * tq + (e & 1);
      const float x = acc[dt][e] * (e < 2 ? scale0 : scale1);
      if (r < rows_valid && c < D) {
        if constexpr (ATOMIC) atomicAdd(g + r * ld_g + c, x);
        else g[r * ld_g + c] = from_float<T>(x);
      }
    }
  }
}

// Query block of this CTA: causal grids run from the last block (the most keys) down to the first.
__device__ __forceinline__ int query_block(bool causal) {
  return causal ? static_cast<int>(gridDim.y - 1 - blockIdx.y) : static_cast<int>(blockIdx.y);
}

// ---- forward --------------------------------------------------------------------------------------

// grid (B * Hq, ceil(Nq / BM)), NW warps; warp w owns query rows m0 + 16 MT w .. m0 + 16 MT (w + 1) - 1.
// EXT: the features of p.feat (window, softcap, ALiBi, dropout).
template <typename T, int DP, int BN, int NW, int MT, bool EXT>
__global__ void __launch_bounds__(NW * 32, 1) attn_fwd_kernel(const AttentionFwdParams p, bool vec) {
  constexpr int BM = 16 * MT * NW, NT = NW * 32, LD = DP + kPad;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);  // BM x LD
  T* sK = sQ + BM * LD;                     // 2 buffers of BN x LD
  T* sV = sK + 2 * BN * LD;                 // 2 buffers of BN x LD

  const int bh = blockIdx.x, b = bh / p.heads_q, h = bh % p.heads_q;
  const int hk = h / (p.heads_q / p.heads_kv);
  const int m0 = query_block(p.causal) * BM;
  const int Nq = p.seqlen_q, Nk = p.seqlen_k, D = p.head_dim;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, gq = lane >> 2, tq = lane & 3;
  const int wrow = warp * 16 * MT;  // the warp's first row in the block

  const T* q = static_cast<const T*>(p.q) + b * p.q_stride_b + m0 * p.q_stride_n + h * p.q_stride_h;
  const T* k = static_cast<const T*>(p.k) + b * p.k_stride_b + hk * p.k_stride_h;
  const T* v = static_cast<const T*>(p.v) + b * p.v_stride_b + hk * p.v_stride_h;
  const uint8_t* mask = p.key_padding_mask ? p.key_padding_mask + b * p.mask_stride_b : nullptr;

  // Keys past the last one that the block's last row can see are skipped entirely (and, with a window,
  // the tiles before the first key its first row sees): tiles t_first .. n_tiles - 1.
  int t_first = 0, n_end = p.causal ? min(Nk, m0 + BM + Nk - Nq) : Nk;
  Ext ex{};
  if constexpr (EXT) {
    ex.init(p.feat, p.causal, Nq, Nk, mask);
    ex.set_head(p.feat, b, h, p.heads_q);
    const int ks = ex.key_start(m0), ke = ex.key_end(min(Nq, m0 + BM) - 1);
    t_first = ks / BN;
    n_end = ke > ks ? ke : 0;
  }
  const int n_tiles = n_end > 0 ? (n_end + BN - 1) / BN : 0;
  const float sl2 = p.softmax_scale * kLog2e;  // softmax in base 2: exp(x) = exp2(x * log2 e)

  float o[MT][DP / 8][4];
  float m_run[MT][2], l_run[MT][2];  // running max (scaled, base 2) of rows gq, gq + 8; this lane's share of the sum
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    zero(o[mt]);
    m_run[mt][0] = m_run[mt][1] = -INFINITY;
    l_run[mt][0] = l_run[mt][1] = 0.f;
  }

  // cp.async groups, in commit order: [Q, K_0], [V_0], then per tile j: [K_{j+1}], [V_{j+1}] (empty past the
  // end). wait<1> before S waits for K_j only; wait<1> before P V waits for V_j only.
  if (n_tiles > t_first) {
    const int n0 = t_first * BN;
    load_tile<T, BM, DP, NT>(sQ, q, p.q_stride_n, Nq - m0, D, vec);
    load_tile<T, BN, DP, NT>(sK, k + n0 * p.k_stride_n, p.k_stride_n, Nk - n0, D, vec);
    cp_async_commit();
    load_tile<T, BN, DP, NT>(sV, v + n0 * p.v_stride_n, p.v_stride_n, Nk - n0, D, vec);
    cp_async_commit();
  }
  for (int j = t_first; j < n_tiles; ++j) {
    const int buf = (j - t_first) & 1, n0 = j * BN, n1 = n0 + BN;
    cp_async_wait<1>();  // Q and K_j have landed (V_j may still be in flight)
    __syncthreads();     // ... for every thread; and every warp is done with tile j - 1
    if (j + 1 < n_tiles)  // K buffer buf ^ 1 was last read by tile j - 1's S
      load_tile<T, BN, DP, NT>(sK + (buf ^ 1) * BN * LD, k + n1 * p.k_stride_n, p.k_stride_n, Nk - n1, D, vec);
    cp_async_commit();

    float s[MT][BN / 8][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) zero(s[mt]);
    mma_abt<T, DP, BN, MT>(s, sQ, wrow, sK + buf * BN * LD, lane);

#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      const int row_lo = m0 + wrow + mt * 16;
      const bool need_mask = n1 > Nk || mask != nullptr || (p.causal && n1 - 1 > row_lo + Nk - Nq);
#pragma unroll
      for (int nt = 0; nt < BN / 8; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int row = row_lo + gq + (e >> 1) * 8, key = n0 + nt * 8 + 2 * tq + (e & 1);
          if constexpr (EXT) {
            float t;
            const float x = ex.modify(s[mt][nt][e] * p.softmax_scale, row, key, t);
            s[mt][nt][e] = ex.visible(row, key) ? x * kLog2e : -INFINITY;
          } else {
            float x = s[mt][nt][e] * sl2;
            if (need_mask && !key_visible(row, key, Nq, Nk, p.causal, mask)) x = -INFINITY;
            s[mt][nt][e] = x;
          }
        }
      }
      // Online softmax: new max per row over the quad, rescale what was accumulated.
      float mx[2] = {m_run[mt][0], m_run[mt][1]};
#pragma unroll
      for (int nt = 0; nt < BN / 8; ++nt) {
        mx[0] = fmaxf(mx[0], fmaxf(s[mt][nt][0], s[mt][nt][1]));
        mx[1] = fmaxf(mx[1], fmaxf(s[mt][nt][2], s[mt][nt][3]));
      }
      float msub[2];
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
        mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
        msub[r] = mx[r] == -INFINITY ? 0.f : mx[r];  // a row with nothing visible yet: exp2(-inf) = 0
        const float alpha = exp2f(m_run[mt][r] - msub[r]);
        m_run[mt][r] = mx[r];
        l_run[mt][r] *= alpha;
#pragma unroll
        for (int dt = 0; dt < DP / 8; ++dt) {
          o[mt][dt][2 * r] *= alpha;
          o[mt][dt][2 * r + 1] *= alpha;
        }
      }
#pragma unroll
      for (int nt = 0; nt < BN / 8; ++nt) {
        s[mt][nt][0] = exp2f(s[mt][nt][0] - msub[0]);
        s[mt][nt][1] = exp2f(s[mt][nt][1] - msub[0]);
        s[mt][nt][2] = exp2f(s[mt][nt][2] - msub[1]);
        s[mt][nt][3] = exp2f(s[mt][nt][3] - msub[1]);
        l_run[mt][0] += s[mt][nt][0] + s[mt][nt][1];
        l_run[mt][1] += s[mt][nt][2] + s[mt][nt][3];
        if constexpr (EXT) {
          if (ex.dropping) {  // after the row sum (lse is taken before dropout); 1 / (1 - p) at the end
#pragma unroll
            for (int e = 0; e < 4; ++e)
              if (!ex.keep(row_lo + gq + (e >> 1) * 8, n0 + nt * 8 + 2 * tq + (e & 1))) s[mt][nt][e] = 0.f;
          }
        }
      }
    }

    cp_async_wait<1>();  // V_j has landed (K_{j+1} may still be in flight)
    __syncthreads();
    mma_pb<T, DP, BN, MT>(o, s, sV + buf * BN * LD, lane);
    if (j + 1 < n_tiles)  // V buffer buf ^ 1 was last read by tile j - 1's P V, before the barrier above
      load_tile<T, BN, DP, NT>(sV + (buf ^ 1) * BN * LD, v + n1 * p.v_stride_n, p.v_stride_n, Nk - n1, D, vec);
    cp_async_commit();
  }
  cp_async_wait<0>();  // nothing may be in flight when the CTA exits

  T* out = static_cast<T*>(p.out) + b * p.out_stride_b + m0 * p.out_stride_n + h * p.out_stride_h;
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    float inv[2], lse[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float l = l_run[mt][r];
      l += __shfl_xor_sync(0xffffffffu, l, 1);
      l += __shfl_xor_sync(0xffffffffu, l, 2);
      inv[r] = l > 0.f ? 1.f / l : 0.f;
      if constexpr (EXT) inv[r] *= p.feat.drop_scale;
      lse[r] = l > 0.f ? (m_run[mt][r] + log2f(l)) * kLn2 : -INFINITY;
    }
    store_rows<T, DP>(out, p.out_stride_n, wrow + mt * 16, Nq - m0, 0, D, o[mt], inv[0], inv[1], lane);
    if (tq == 0) {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int row = m0 + wrow + mt * 16 + gq + r * 8;
        if (row < Nq) p.lse[(static_cast<int64_t>(b) * p.heads_q + h) * Nq + row] = lse[r];
      }
    }
  }
}

// ---- backward helpers ------------------------------------------------------------------------------

// One score element of the backward with features: s the scaled score q.k * scale, dp = dO . v of the
// element, lse2 the row's lse in base 2 (+inf for a row without keys), delta = rowsum(dO * O).
//   pz = P Z (the probability that multiplied V: dV += pz dO), ds = dS w.r.t. the scaled score:
//   P (Z dP - delta), times 1 - tanh^2 under softcap. Z = keep / (1 - p) under dropout, else 1.
__device__ __forceinline__ void ext_grad(const Ext& ex, const AttentionFeatures& f, float s, float dp, int row,
                                         int key, float lse2, float delta, float& pz, float& ds) {
  float t;
  const float x = ex.modify(s, row, key, t);
  const bool ok = row < ex.Nq && ex.visible(row, key);
  const float pr = ok ? exp2f(x * kLog2e - lse2) : 0.f;
  pz = pr;
  if (ex.dropping) {
    const float z = ok && ex.keep(row, key) ? f.drop_scale : 0.f;
    pz *= z;
    dp *= z;
  }
  ds = pr * (dp - delta);
  if (ex.cap > 0.f) ds *= 1.f - t * t;
}

// ---- backward: delta = rowsum(dO * O) --------------------------------------------------------------

// One warp per (b, row, head); delta laid out (B, Hq, Nq) like lse.
template <typename T>
__global__ void attn_bwd_delta_kernel(const AttentionBwdParams p) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int64_t total = static_cast<int64_t>(p.batch) * p.seqlen_q * p.heads_q;
  if (idx >= total) return;
  const int h = static_cast<int>(idx % p.heads_q);
  const int row = static_cast<int>((idx / p.heads_q) % p.seqlen_q);
  const int b = static_cast<int>(idx / (static_cast<int64_t>(p.heads_q) * p.seqlen_q));
  const T* dout = static_cast<const T*>(p.dout) + b * p.dout_stride_b + row * p.dout_stride_n + h * p.dout_stride_h;
  const T* out = static_cast<const T*>(p.out) + b * p.out_stride_b + row * p.out_stride_n + h * p.out_stride_h;
  float acc = 0.f;
  for (int d = lane; d < p.head_dim; d += 32) acc += to_float(dout[d]) * to_float(out[d]);
  acc = warp_sum(acc);
  if (lane == 0) p.delta[(static_cast<int64_t>(b) * p.heads_q + h) * p.seqlen_q + row] = acc;
}

// Loads lse (as base-2, scaled; -inf -> +inf so that exp2(s - lse) = 0) and delta of BM rows.
template <int BM, int NT>
__device__ __forceinline__ void load_row_stats(float* s_lse, float* s_delta, const float* lse,
                                               const float* delta, int rows_valid) {
  for (int r = threadIdx.x; r < BM; r += NT) {
    const bool ok = r < rows_valid;
    const float l = ok ? lse[r] : -INFINITY;
    s_lse[r] = l == -INFINITY ? INFINITY : l * kLog2e;
    s_delta[r] = ok ? delta[r] : 0.f;
  }
}

// ---- backward: dK, dV (and dQ through atomics) ----------------------------------------------------

// grid (B * Hkv * splits, ceil(Nk / BN)), NW warps; the CTA keeps dK and dV of its BN keys in registers while
// it loops over every (query head of its share of the group, query block of BM rows). splits = 1: dK, dV
// stored in the output dtype; > 1: the CTA's fp32 partial goes to p.dkv_accum (slot of its split when
// deterministic, else fp32 atomics) for attn_bwd_dkv_reduce_kernel. STAGES = 2: the next query block's
// Q, dO, lse and delta are prefetched (cp.async) while this one is multiplied; 1: loaded in turn (for
// devices with less shared memory). KG = BN / 16 key-row groups; warp w belongs to group w % KG.
//   Phase 1: warp w computes S^T = K Q^T and dP^T = V dO^T for its 16 keys and the queries
//            (w / KG) * QW .. + QW - 1 of the block, forms P and dS = P * (dP - delta), and stores both
//            query-major in shared memory (sP, sdS).
//   Phase 2: warp w adds P^T dO and dS^T Q into dV and dK for its 16 keys and the head-dim columns
//            (w / KG) * DW .. + DW - 1, reading P^T and dS^T from shared memory (mma_atb).
//   dQ (non-deterministic mode): dQ += dS K from sdS, atomically added to dq_accum.
// Causal: the first key blocks see the most query blocks, and the grid already starts with them.
template <typename T, int DP, int BM, int BN, int NW, int STAGES, bool EXT>
__global__ void __launch_bounds__(NW * 32, 1) attn_bwd_dkdv_kernel(const AttentionBwdParams p, bool vec, int splits) {
  constexpr int NT = NW * 32, LD = DP + kPad, LDS = BN + kPad;
  constexpr int KG = BN / 16, WQ = NW / KG, QW = BM / WQ, DW = DP / WQ;
  static_assert(NW % KG == 0 && BM % WQ == 0 && QW % 16 == 0 && DP % WQ == 0 && DW % 16 == 0,
                "attn_bwd_dkdv_kernel: tile split");
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sK = reinterpret_cast<T*>(smem_raw);  // BN x LD
  T* sV = sK + BN * LD;                     // BN x LD
  T* sQ = sV + BN * LD;                     // STAGES buffers of BM x LD
  T* sdO = sQ + STAGES * BM * LD;           // STAGES buffers of BM x LD
  T* sP = sdO + STAGES * BM * LD;           // BM x LDS: P, query-major
  T* sdS = sP + BM * LDS;                   // BM x LDS: dS, query-major
  float* sLse = reinterpret_cast<float*>(sdS + BM * LDS);  // STAGES x BM
  float* sDelta = sLse + STAGES * BM;                      // STAGES x BM

  const int split = blockIdx.x % splits, bh = blockIdx.x / splits, b = bh / p.heads_kv, hk = bh % p.heads_kv;
  const int group = p.heads_q / p.heads_kv, heads = group / splits;  // query heads h_first .. + heads - 1
  const int h_first = hk * group + split * heads;
  const int n0 = blockIdx.y * BN;
  const int Nq = p.seqlen_q, Nk = p.seqlen_k, D = p.head_dim;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, gq = lane >> 2, tq = lane & 3;
  const int kw = (warp % KG) * 16;  // the warp's first key (CTA-local)
  const int qw = (warp / KG) * QW;  // phase 1: its first query (block-local)
  const int cw = (warp / KG) * DW;  // phase 2: its first head-dim column
  const float sl2 = p.softmax_scale * kLog2e;
  const uint8_t* mask = p.key_padding_mask ? p.key_padding_mask + b * p.mask_stride_b : nullptr;

  // Causal: query i sees key n0 only if i >= n0 - (Nk - Nq); earlier query blocks are skipped. A window
  // also skips the query blocks after the last row that sees the block's last key.
  const int m_first = p.causal ? max(0, n0 - (Nk - Nq)) : 0;
  int mb_first = m_first / BM, mb_count = m_first < Nq ? (Nq + BM - 1) / BM - mb_first : 0;
  Ext ex{};
  if constexpr (EXT) {
    ex.init(p.feat, p.causal, Nq, Nk, mask);
    const int first = ex.row_first(n0), last = ex.row_last(min(Nk, n0 + BN) - 1);
    mb_first = first / BM;
    mb_count = last >= first ? last / BM - mb_first + 1 : 0;
  }
  const int iters = heads * mb_count;

  const T* k = static_cast<const T*>(p.k) + b * p.k_stride_b + n0 * p.k_stride_n + hk * p.k_stride_h;
  const T* v = static_cast<const T*>(p.v) + b * p.v_stride_b + n0 * p.v_stride_n + hk * p.v_stride_h;

  auto load_q_block = [&](int it, int buf) {
    const int hq = h_first + it / mb_count, m0 = (mb_first + it % mb_count) * BM;
    const T* q = static_cast<const T*>(p.q) + b * p.q_stride_b + m0 * p.q_stride_n + hq * p.q_stride_h;
    const T* dout = static_cast<const T*>(p.dout) + b * p.dout_stride_b + m0 * p.dout_stride_n +
                    hq * p.dout_stride_h;
    load_tile<T, BM, DP, NT>(sQ + buf * BM * LD, q, p.q_stride_n, Nq - m0, D, vec);
    load_tile<T, BM, DP, NT>(sdO + buf * BM * LD, dout, p.dout_stride_n, Nq - m0, D, vec);
    const int64_t stat = (static_cast<int64_t>(b) * p.heads_q + hq) * Nq + m0;
    load_row_stats<BM, NT>(sLse + buf * BM, sDelta + buf * BM, p.lse + stat, p.delta + stat, Nq - m0);
  };

  float dk[DW / 8][4], dv[DW / 8][4];
  zero(dk);
  zero(dv);
  if (iters > 0) {
    load_tile<T, BN, DP, NT>(sK, k, p.k_stride_n, Nk - n0, D, vec);
    load_tile<T, BN, DP, NT>(sV, v, p.v_stride_n, Nk - n0, D, vec);
    load_q_block(0, 0);
    cp_async_commit();
  }
  for (int it = 0; it < iters; ++it) {
    const int buf = STAGES == 2 ? (it & 1) : 0;
    const int hq = h_first + it / mb_count, m0 = (mb_first + it % mb_count) * BM;
    if constexpr (EXT) ex.set_head(p.feat, b, hq, p.heads_q);
    if constexpr (STAGES == 2) {
      if (it + 1 < iters) load_q_block(it + 1, buf ^ 1);  // its buffers were released by the last barrier
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      if (it > 0) {
        load_q_block(it, 0);
        cp_async_commit();
      }
      cp_async_wait<0>();
    }
    __syncthreads();
    const T* sQb = sQ + buf * BM * LD;
    const T* sdOb = sdO + buf * BM * LD;
    const float* lse = sLse + buf * BM;
    const float* delta = sDelta + buf * BM;

    // Phase 1. P^T (16 keys x QW queries) = exp2(S^T * scale * log2e - lse * log2e), masked entries 0;
    // dS^T = P^T * (dP^T - delta).
    float st[1][QW / 8][4], dpt[1][QW / 8][4];
    zero(st[0]);
    zero(dpt[0]);
    mma_abt<T, DP, QW>(st, sK, kw, sQb + qw * LD, lane);
    mma_abt<T, DP, QW>(dpt, sV, kw, sdOb + qw * LD, lane);
#pragma unroll
    for (int nt = 0; nt < QW / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int kl = kw + gq + (e >> 1) * 8, ql = qw + nt * 8 + 2 * tq + (e & 1);
        if constexpr (EXT) {
          float pz, ds;
          ext_grad(ex, p.feat, st[0][nt][e] * p.softmax_scale, dpt[0][nt][e], m0 + ql, n0 + kl, lse[ql], delta[ql],
                   pz, ds);
          sP[ql * LDS + kl] = from_float<T>(pz);
          sdS[ql * LDS + kl] = from_float<T>(ds);
        } else {
          const bool ok = m0 + ql < Nq && key_visible(m0 + ql, n0 + kl, Nq, Nk, p.causal, mask);
          const float pr = ok ? exp2f(st[0][nt][e] * sl2 - lse[ql]) : 0.f;
          sP[ql * LDS + kl] = from_float<T>(pr);
          sdS[ql * LDS + kl] = from_float<T>(pr * (dpt[0][nt][e] - delta[ql]));
        }
      }
    }
    __syncthreads();

    // Phase 2. dV += P^T dO, dK += dS^T Q (scaled at the end), for the warp's keys and columns.
    mma_atb<T, DP, BM, DW, LDS>(dv, sP, kw, sdOb, cw, lane);
    mma_atb<T, DP, BM, DW, LDS>(dk, sdS, kw, sQb, cw, lane);

    if (!p.deterministic) {
      // dQ (BM x DP) += dS K. Items: (16-row group, 16-column slice) of the product, spread over the warps.
      float* dq = p.dq_accum + ((static_cast<int64_t>(b) * Nq + m0) * p.heads_q + hq) * D;
      const int64_t dq_ld = static_cast<int64_t>(p.heads_q) * D;
      for (int item = warp; item < (BM / 16) * (DP / 16); item += NW) {
        const int rg = item / (DP / 16), dd = item % (DP / 16);
        float acc[2][4];
        zero(acc);
#pragma unroll
        for (int kk = 0; kk < BN / 16; ++kk) {
          uint32_t a[4], bb[4];
          ldmatrix_x4(a, sdS + (rg * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * LDS + kk * 16 + (lane >> 4) * 8);
          ldmatrix_x4_trans(bb, sK + (kk * 16 + (lane & 15)) * LD + dd * 16 + (lane >> 4) * 8);
          mma16816<T>(acc[0], a, bb[0], bb[1]);
          mma16816<T>(acc[1], a, bb[2], bb[3]);
        }
#pragma unroll
        for (int half = 0; half < 2; ++half) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int r = rg * 16 + gq + (e >> 1) * 8, c = dd * 16 + half * 8 + 2 * tq + (e & 1);
            if (m0 + r < Nq && c < D) atomicAdd(dq + r * dq_ld + c, acc[half][e]);
          }
        }
      }
    }
    __syncthreads();  // sP, sdS and this iteration's Q/dO buffers are rewritten next
  }

  const int64_t row0 = ((static_cast<int64_t>(b) * Nk + n0) * p.heads_kv + hk) * D;
  const int64_t ld = static_cast<int64_t>(p.heads_kv) * D;
  if (splits == 1) {
    store_rows<T, DW>(static_cast<T*>(p.dk) + row0, ld, kw, Nk - n0, cw, D, dk, p.softmax_scale, p.softmax_scale,
                      lane);
    store_rows<T, DW>(static_cast<T*>(p.dv) + row0, ld, kw, Nk - n0, cw, D, dv, 1.f, 1.f, lane);
  } else if (p.deterministic) {  // every element of this split's slot written once, zeros included
    const int64_t n = static_cast<int64_t>(p.batch) * Nk * p.heads_kv * D;
    store_rows<float, DW>(p.dkv_accum + split * n + row0, ld, kw, Nk - n0, cw, D, dk, p.softmax_scale,
                          p.softmax_scale, lane);
    store_rows<float, DW>(p.dkv_accum + (splits + split) * n + row0, ld, kw, Nk - n0, cw, D, dv, 1.f, 1.f, lane);
  } else if (iters > 0) {  // into the zeroed (dk, dv) sums
    const int64_t n = static_cast<int64_t>(p.batch) * Nk * p.heads_kv * D;
    store_rows<float, DW, true>(p.dkv_accum + row0, ld, kw, Nk - n0, cw, D, dk, p.softmax_scale, p.softmax_scale,
                                lane);
    store_rows<float, DW, true>(p.dkv_accum + n + row0, ld, kw, Nk - n0, cw, D, dv, 1.f, 1.f, lane);
  }
}

// dk, dv = the sum over `parts` fp32 partials (in order), cast to T. ws: [dk part 0 .. parts - 1][dv part
// 0 .. parts - 1], each n = B * Nk * Hkv * D elements laid out like dk.
template <typename T>
__global__ void attn_bwd_dkv_reduce_kernel(const float* __restrict__ ws, T* __restrict__ dk, T* __restrict__ dv,
                                           int64_t n, int parts) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float a = 0.f, c = 0.f;
    for (int s = 0; s < parts; ++s) {
      a += ws[s * n + i];
      c += ws[(parts + s) * n + i];
    }
    dk[i] = from_float<T>(a);
    dv[i] = from_float<T>(c);
  }
}

// dq = dq_accum * scale, cast to T; both (B, Nq, Hq, D) contiguous.
template <typename T>
__global__ void attn_bwd_dq_convert_kernel(const float* __restrict__ acc, T* __restrict__ dq, int64_t n,
                                           float scale) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    dq[i] = from_float<T>(acc[i] * scale);
}

// ---- backward: deterministic dQ --------------------------------------------------------------------

// grid (B * Hq, ceil(Nq / BM)), NW warps, like the forward kernel: recompute P, dP = dO V^T,
// dS = P * (dP - delta), dQ += dS K over the visible key tiles, no atomics. Causal grids start with the
// last query blocks (the most key tiles).
template <typename T, int DP, int BN, int NW, bool EXT>
__global__ void __launch_bounds__(NW * 32, 1) attn_bwd_dq_kernel(const AttentionBwdParams p, bool vec) {
  constexpr int BM = 16 * NW, NT = NW * 32, LD = DP + kPad;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);  // BM x LD
  T* sdO = sQ + BM * LD;                    // BM x LD
  T* sK = sdO + BM * LD;                    // 2 buffers of BN x LD
  T* sV = sK + 2 * BN * LD;                 // 2 buffers of BN x LD
  float* sLse = reinterpret_cast<float*>(sV + 2 * BN * LD);  // BM
  float* sDelta = sLse + BM;                                 // BM

  const int bh = blockIdx.x, b = bh / p.heads_q, h = bh % p.heads_q;
  const int hk = h / (p.heads_q / p.heads_kv);
  const int m0 = query_block(p.causal) * BM;
  const int Nq = p.seqlen_q, Nk = p.seqlen_k, D = p.head_dim;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, gq = lane >> 2, tq = lane & 3;
  const float sl2 = p.softmax_scale * kLog2e;
  const uint8_t* mask = p.key_padding_mask ? p.key_padding_mask + b * p.mask_stride_b : nullptr;

  const T* q = static_cast<const T*>(p.q) + b * p.q_stride_b + m0 * p.q_stride_n + h * p.q_stride_h;
  const T* dout = static_cast<const T*>(p.dout) + b * p.dout_stride_b + m0 * p.dout_stride_n + h * p.dout_stride_h;
  const T* k = static_cast<const T*>(p.k) + b * p.k_stride_b + hk * p.k_stride_h;
  const T* v = static_cast<const T*>(p.v) + b * p.v_stride_b + hk * p.v_stride_h;

  int t_first = 0, n_end = p.causal ? min(Nk, m0 + BM + Nk - Nq) : Nk;
  Ext ex{};
  if constexpr (EXT) {  // the key tiles of the forward kernel
    ex.init(p.feat, p.causal, Nq, Nk, mask);
    ex.set_head(p.feat, b, h, p.heads_q);
    const int ks = ex.key_start(m0), ke = ex.key_end(min(Nq, m0 + BM) - 1);
    t_first = ks / BN;
    n_end = ke > ks ? ke : 0;
  }
  const int n_tiles = n_end > 0 ? (n_end + BN - 1) / BN : 0;

  float dq[1][DP / 8][4];
  zero(dq[0]);
  if (n_tiles > t_first) {
    const int n0 = t_first * BN;
    load_tile<T, BM, DP, NT>(sQ, q, p.q_stride_n, Nq - m0, D, vec);
    load_tile<T, BM, DP, NT>(sdO, dout, p.dout_stride_n, Nq - m0, D, vec);
    const int64_t stat = (static_cast<int64_t>(b) * p.heads_q + h) * Nq + m0;
    load_row_stats<BM, NT>(sLse, sDelta, p.lse + stat, p.delta + stat, Nq - m0);
    load_tile<T, BN, DP, NT>(sK, k + n0 * p.k_stride_n, p.k_stride_n, Nk - n0, D, vec);
    load_tile<T, BN, DP, NT>(sV, v + n0 * p.v_stride_n, p.v_stride_n, Nk - n0, D, vec);
    cp_async_commit();
  }
  for (int j = t_first; j < n_tiles; ++j) {
    const int buf = (j - t_first) & 1, n0 = j * BN;
    if (j + 1 < n_tiles) {
      const int n1 = n0 + BN;
      load_tile<T, BN, DP, NT>(sK + (buf ^ 1) * BN * LD, k + n1 * p.k_stride_n, p.k_stride_n, Nk - n1, D, vec);
      load_tile<T, BN, DP, NT>(sV + (buf ^ 1) * BN * LD, v + n1 * p.v_stride_n, p.v_stride_n, Nk - n1, D, vec);
    }
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    const T* sKb = sK + buf * BN * LD;
    const T* sVb = sV + buf * BN * LD;

    float s[1][BN / 8][4], dp[1][BN / 8][4];
    zero(s[0]);
    zero(dp[0]);
    mma_abt<T, DP, BN>(s, sQ, warp * 16, sKb, lane);
    mma_abt<T, DP, BN>(dp, sdO, warp * 16, sVb, lane);
#pragma unroll
    for (int nt = 0; nt < BN / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int rl = warp * 16 + gq + (e >> 1) * 8, key = n0 + nt * 8 + 2 * tq + (e & 1);
        if constexpr (EXT) {
          float pz, ds;
          ext_grad(ex, p.feat, s[0][nt][e] * p.softmax_scale, dp[0][nt][e], m0 + rl, key, sLse[rl], sDelta[rl], pz,
                   ds);
          s[0][nt][e] = ds;
        } else {
          const bool ok = m0 + rl < Nq && key_visible(m0 + rl, key, Nq, Nk, p.causal, mask);
          const float pr = ok ? exp2f(s[0][nt][e] * sl2 - sLse[rl]) : 0.f;
          s[0][nt][e] = pr * (dp[0][nt][e] - sDelta[rl]);  // dS
        }
      }
    }
    mma_pb<T, DP, BN>(dq, s, sKb, lane);  // dQ += dS K
    __syncthreads();
  }
  T* dqp = static_cast<T*>(p.dq) + ((static_cast<int64_t>(b) * Nq + m0) * p.heads_q + h) * D;
  store_rows<T, DP>(dqp, static_cast<int64_t>(p.heads_q) * D, warp * 16, Nq - m0, 0, D, dq[0],
                    p.softmax_scale, p.softmax_scale, lane);
}

// ---- launchers ------------------------------------------------------------------------------------

bool aligned16(const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15) == 0; }

// cp.async moves 16-byte chunks: every row start must be 16-byte aligned and D a multiple of 8.
bool rows_vectorizable(const void* ptr, int64_t sb, int64_t sn, int64_t sh, int D) {
  return aligned16(ptr) && sb % 8 == 0 && sn % 8 == 0 && sh % 8 == 0 && D % 8 == 0;
}

template <typename Kernel>
cudaError_t set_smem(Kernel kernel, size_t bytes) {
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
}

template <typename T, int DP, int BN, int NW, int MT, bool EXT>
cudaError_t launch_fwd(const AttentionFwdParams& p, bool vec, cudaStream_t stream) {
  constexpr int BM = 16 * MT * NW;
  const size_t smem = static_cast<size_t>(BM + 4 * BN) * (DP + kPad) * sizeof(T);
  auto kernel = attn_fwd_kernel<T, DP, BN, NW, MT, EXT>;
  cudaError_t err = set_smem(kernel, smem);
  if (err != cudaSuccess) return err;
  const dim3 grid(p.batch * p.heads_q, (p.seqlen_q + BM - 1) / BM);
  if (grid.y > 65535) return cudaErrorInvalidConfiguration;  // seqlen_q beyond 65535 blocks
  kernel<<<grid, NW * 32, smem, stream>>>(p, vec);
  return cudaGetLastError();
}

template <typename T, int DP, int BM, int BN, int NW, int STAGES>
constexpr size_t dkdv_smem() {
  return static_cast<size_t>(2 * BN + 2 * STAGES * BM) * (DP + kPad) * sizeof(T) +
         static_cast<size_t>(2 * BM) * (BN + kPad) * sizeof(T) + 2 * STAGES * BM * sizeof(float);
}

template <typename T, int DP, int BM, int BN, int NW, int STAGES, bool EXT>
cudaError_t launch_bwd_dkdv(const AttentionBwdParams& p, bool vec, int splits, cudaStream_t stream) {
  constexpr size_t smem = dkdv_smem<T, DP, BM, BN, NW, STAGES>();
  auto kernel = attn_bwd_dkdv_kernel<T, DP, BM, BN, NW, STAGES, EXT>;
  cudaError_t err = set_smem(kernel, smem);
  if (err != cudaSuccess) return err;
  const int64_t ctas = static_cast<int64_t>(p.batch) * p.heads_kv * splits;
  if (ctas > INT32_MAX) return cudaErrorInvalidConfiguration;
  const dim3 grid(static_cast<unsigned>(ctas), (p.seqlen_k + BN - 1) / BN);
  if (grid.y > 65535) return cudaErrorInvalidConfiguration;  // seqlen_k beyond 65535 blocks
  kernel<<<grid, NW * 32, smem, stream>>>(p, vec, splits);
  return cudaGetLastError();
}

template <typename T, int DP, int BN, int NW, bool EXT>
cudaError_t launch_bwd_dq(const AttentionBwdParams& p, bool vec, cudaStream_t stream) {
  constexpr int BM = 16 * NW;
  const size_t smem = static_cast<size_t>(2 * BM + 4 * BN) * (DP + kPad) * sizeof(T) + 2 * BM * sizeof(float);
  auto kernel = attn_bwd_dq_kernel<T, DP, BN, NW, EXT>;
  cudaError_t err = set_smem(kernel, smem);
  if (err != cudaSuccess) return err;
  const dim3 grid(p.batch * p.heads_q, (p.seqlen_q + BM - 1) / BM);
  if (grid.y > 65535) return cudaErrorInvalidConfiguration;  // seqlen_q beyond 65535 blocks
  kernel<<<grid, NW * 32, smem, stream>>>(p, vec);
  return cudaGetLastError();
}

// Opt-in shared memory per block of the current device (A100 163 KB, H100 227 KB, sm_86/89 99 KB).
int smem_optin() {
  int dev = 0, bytes = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) != cudaSuccess)
    return 0;
  return bytes;
}

// Tile configurations, each within 99 KB of shared memory (the sm_86/89 opt-in limit) unless a
// smaller variant is chosen by smem_optin(). Forward (BN, warps, m16 tiles per warp): 32 query rows per
// warp up to D = 128 (4 warps, 2 CTAs per SM by registers), 16 above, where the fp32 output
// accumulators alone take DP / 2 registers.
template <typename T, int DP, bool EXT>
cudaError_t fwd_for(const AttentionFwdParams& p, bool vec, cudaStream_t s) {
  // BN shrinks with D so that the 2 x DP / 2 output and 2 x BN / 2 score registers fit 255 without spills
  // (ptxas: D = 128 with BN = 32 spills 16 bytes on sm_80; with BN = 16 it takes 230 registers).
  // The feature kernels need registers of their own (ptxas: with the plain tiles they spill 88-252 bytes at
  // D = 64 and 4 at D = 128; 32 rows per warp with BN = 32 still spills 4-24 at D = 64; BN = 64 with 16 rows
  // takes 254): 16 query rows per warp and BN = 32 up to D = 128.
  if constexpr (EXT && DP <= 128) return launch_fwd<T, DP, 32, 4, 1, EXT>(p, vec, s);
  else if constexpr (DP <= 64) return launch_fwd<T, DP, 64, 4, 2, EXT>(p, vec, s);
  else if constexpr (DP <= 96) return launch_fwd<T, DP, 32, 4, 2, EXT>(p, vec, s);
  else if constexpr (DP <= 128) return launch_fwd<T, DP, 16, 4, 2, EXT>(p, vec, s);
  else if constexpr (DP <= 224) return launch_fwd<T, DP, 32, 4, 1, EXT>(p, vec, s);
  else return launch_fwd<T, DP, 16, 4, 1, EXT>(p, vec, s);
}

// dK/dV (BM, BN, warps, stages): the per-thread accumulators are 2 * DW / 2 = DP / WQ floats (WQ = warps per
// key-row group), so D = 256 keeps 128 and nothing spills. Double-buffered Q/dO where the device has the
// shared memory for it.
template <typename T, int DP, bool EXT>
cudaError_t dkdv_for(const AttentionBwdParams& p, bool vec, int splits, cudaStream_t s) {
  if constexpr (DP <= 64) {
    return launch_bwd_dkdv<T, DP, 64, 64, 8, 2, EXT>(p, vec, splits, s);
  } else if constexpr (DP <= 128) {
    if (static_cast<size_t>(smem_optin()) >= dkdv_smem<T, DP, 64, 64, 8, 2>())
      return launch_bwd_dkdv<T, DP, 64, 64, 8, 2, EXT>(p, vec, splits, s);
    return launch_bwd_dkdv<T, DP, 32, 64, 8, 2, EXT>(p, vec, splits, s);
  } else {
    // the feature kernel single-buffers at D > 128 (double-buffered it spills 12 bytes on sm_90)
    if constexpr (!EXT) {
      if (static_cast<size_t>(smem_optin()) >= dkdv_smem<T, DP, 32, 32, 4, 2>())
        return launch_bwd_dkdv<T, DP, 32, 32, 4, 2, EXT>(p, vec, splits, s);
    }
    return launch_bwd_dkdv<T, DP, 32, 32, 4, 1, EXT>(p, vec, splits, s);
  }
}

// Keys per dK/dV CTA for head dim D (dkdv_for's BN), for the group split's grid size.
int dkdv_block_n(int D) { return D <= 128 ? 64 : 32; }

// Grid-stride launch size of the elementwise kernels.
int elementwise_blocks(int64_t n) { return static_cast<int>(std::min<int64_t>((n + 255) / 256, 65535)); }

template <typename T, int DP, bool EXT>
cudaError_t bwd_for(const AttentionBwdParams& p, bool vec, int splits, cudaStream_t s) {
  if (p.seqlen_k > 0) {
    cudaError_t err = dkdv_for<T, DP, EXT>(p, vec, splits, s);
    if (err != cudaSuccess) return err;
    if (splits > 1) {  // dk, dv = the partials' sum (split order), or the atomics' sum, cast to T
      const int64_t n = static_cast<int64_t>(p.batch) * p.seqlen_k * p.heads_kv * p.head_dim;
      attn_bwd_dkv_reduce_kernel<T><<<elementwise_blocks(n), 256, 0, s>>>(
          p.dkv_accum, static_cast<T*>(p.dk), static_cast<T*>(p.dv), n, p.deterministic ? splits : 1);
      if ((err = cudaGetLastError()) != cudaSuccess) return err;
    }
  }
  if (!p.deterministic) {
    const int64_t n = static_cast<int64_t>(p.batch) * p.seqlen_q * p.heads_q * p.head_dim;
    attn_bwd_dq_convert_kernel<T><<<elementwise_blocks(n), 256, 0, s>>>(p.dq_accum, static_cast<T*>(p.dq), n,
                                                                        p.softmax_scale);
    return cudaGetLastError();
  }
  if constexpr (DP <= 64) return launch_bwd_dq<T, DP, 64, 4, EXT>(p, vec, s);
  else if constexpr (DP <= 128) return launch_bwd_dq<T, DP, 32, 4, EXT>(p, vec, s);
  else return launch_bwd_dq<T, DP, 16, 2, EXT>(p, vec, s);
}

// Runs BODY with the compile-time constant DP, the padded head dim of D (C++17: no template lambdas).
#define PYLLM_HEAD_DIM_SWITCH(D, ...)              \
  [&]() -> cudaError_t {                           \
    if ((D) <= 32) { constexpr int DP = 32; return __VA_ARGS__(); }   \
    if ((D) <= 64) { constexpr int DP = 64; return __VA_ARGS__(); }   \
    if ((D) <= 96) { constexpr int DP = 96; return __VA_ARGS__(); }   \
    if ((D) <= 128) { constexpr int DP = 128; return __VA_ARGS__(); } \
    if ((D) <= 160) { constexpr int DP = 160; return __VA_ARGS__(); } \
    if ((D) <= 192) { constexpr int DP = 192; return __VA_ARGS__(); } \
    if ((D) <= 224) { constexpr int DP = 224; return __VA_ARGS__(); } \
    { constexpr int DP = 256; return __VA_ARGS__(); }                 \
  }()

// The feature kernels (EXT) exist for DP = 64, 128, 256 only (a third of the instances to compile); other
// head dims are padded to the next of those, which is exact (loads past D write zeros).
#define PYLLM_EXT_HEAD_DIM_SWITCH(D, ...)                             \
  [&]() -> cudaError_t {                                              \
    if ((D) <= 64) { constexpr int DP = 64; return __VA_ARGS__(); }   \
    if ((D) <= 128) { constexpr int DP = 128; return __VA_ARGS__(); } \
    { constexpr int DP = 256; return __VA_ARGS__(); }                 \
  }()

cudaError_t check_shapes(int B, int Nq, int Nk, int Hq, int Hkv, int D) {
  if (B < 0 || Nq < 0 || Nk < 0 || Hq <= 0 || Hkv <= 0 || Hq % Hkv != 0) return cudaErrorInvalidValue;
  if (D <= 0 || D > kAttentionMaxHeadDim) return cudaErrorInvalidValue;
  return cudaSuccess;
}

// Memory-safety guards on the features (the op layer has validated the values).
cudaError_t check_features(const AttentionFeatures& f, int B, int Nq, int Nk, int Hq) {
  if (f.window_left < -1 || f.window_right < -1 || !(f.softcap >= 0.f) || !(f.drop_scale >= 1.f))
    return cudaErrorInvalidValue;
  if (f.drop_threshold != 0 && (f.drop_lq < Nq || f.drop_lk < Nk)) return cudaErrorInvalidValue;
  if (f.alibi_slopes != nullptr && f.alibi_stride_b != 0 && f.alibi_stride_b != Hq) return cudaErrorInvalidValue;
  (void)B;
  return cudaSuccess;
}

}  // namespace

int attention_bwd_group_split(const AttentionBwdParams& p) {
  if (p.heads_kv <= 0 || p.heads_q % p.heads_kv != 0) return 1;
  const int group = p.heads_q / p.heads_kv;
  if (group <= 1) return 1;
  if (p.group_split > 0) return p.group_split;
  int dev = 0, sms = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess || sms <= 0)
    sms = 132;
  const int bn = dkdv_block_n(p.head_dim);
  const int64_t base = static_cast<int64_t>(p.batch) * p.heads_kv * ((p.seqlen_k + bn - 1) / bn);
  for (int s = 1; s < group; ++s)
    if (group % s == 0 && base * s >= 4 * static_cast<int64_t>(sms)) return s;
  return group;
}

size_t attention_bwd_workspace_floats(const AttentionBwdParams& p) {
  const int splits = attention_bwd_group_split(p);
  if (splits <= 1) return 0;
  const size_t n = static_cast<size_t>(p.batch) * p.seqlen_k * p.heads_kv * p.head_dim;
  return 2 * n * static_cast<size_t>(p.deterministic ? splits : 1);
}

cudaError_t attention_fwd(const AttentionFwdParams& p, DType dtype, cudaStream_t stream) {
  cudaError_t err = check_shapes(p.batch, p.seqlen_q, p.seqlen_k, p.heads_q, p.heads_kv, p.head_dim);
  if (err != cudaSuccess) return err;
  if ((err = check_features(p.feat, p.batch, p.seqlen_q, p.seqlen_k, p.heads_q)) != cudaSuccess) return err;
  if (dtype == DType::kFloat32) return cudaErrorInvalidValue;  // fp32 is served by other backends
  if (p.batch == 0 || p.seqlen_q == 0) return cudaSuccess;
  const bool vec = rows_vectorizable(p.q, p.q_stride_b, p.q_stride_n, p.q_stride_h, p.head_dim) &&
                   rows_vectorizable(p.k, p.k_stride_b, p.k_stride_n, p.k_stride_h, p.head_dim) &&
                   rows_vectorizable(p.v, p.v_stride_b, p.v_stride_n, p.v_stride_h, p.head_dim);
  const bool half = dtype == DType::kFloat16;
  if (p.feat.any())
    return PYLLM_EXT_HEAD_DIM_SWITCH(p.head_dim, [&] {
      return half ? fwd_for<__half, DP, true>(p, vec, stream) : fwd_for<__nv_bfloat16, DP, true>(p, vec, stream);
    });
  return PYLLM_HEAD_DIM_SWITCH(p.head_dim, [&] {
    return half ? fwd_for<__half, DP, false>(p, vec, stream) : fwd_for<__nv_bfloat16, DP, false>(p, vec, stream);
  });
}

cudaError_t attention_bwd(const AttentionBwdParams& p, DType dtype, cudaStream_t stream) {
  cudaError_t err = check_shapes(p.batch, p.seqlen_q, p.seqlen_k, p.heads_q, p.heads_kv, p.head_dim);
  if (err != cudaSuccess) return err;
  if ((err = check_features(p.feat, p.batch, p.seqlen_q, p.seqlen_k, p.heads_q)) != cudaSuccess) return err;
  if (dtype == DType::kFloat32) return cudaErrorInvalidValue;
  if (!p.deterministic && p.dq_accum == nullptr) return cudaErrorInvalidValue;
  const int group = p.heads_q / p.heads_kv;
  if (p.group_split < 0 || (p.group_split > 0 && group % p.group_split != 0)) return cudaErrorInvalidValue;
  const int splits = attention_bwd_group_split(p);
  const size_t ws_floats = attention_bwd_workspace_floats(p);
  if (ws_floats > 0 && p.dkv_accum == nullptr) return cudaErrorInvalidValue;
  if (p.batch == 0) return cudaSuccess;
  if (p.seqlen_q == 0) {  // no query: dk = dv = 0
    const size_t bytes = static_cast<size_t>(p.batch) * p.seqlen_k * p.heads_kv * p.head_dim * 2;
    err = cudaMemsetAsync(p.dk, 0, bytes, stream);
    return err != cudaSuccess ? err : cudaMemsetAsync(p.dv, 0, bytes, stream);
  }
  const int64_t rows = static_cast<int64_t>(p.batch) * p.seqlen_q * p.heads_q;
  const int64_t delta_blocks = (rows + 7) / 8;  // 8 warps per block, one warp per row
  if (delta_blocks > INT32_MAX) return cudaErrorInvalidValue;
  if (dtype == DType::kFloat16)
    attn_bwd_delta_kernel<__half><<<static_cast<unsigned>(delta_blocks), 256, 0, stream>>>(p);
  else
    attn_bwd_delta_kernel<__nv_bfloat16><<<static_cast<unsigned>(delta_blocks), 256, 0, stream>>>(p);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;
  if (!p.deterministic) {
    err = cudaMemsetAsync(p.dq_accum, 0, static_cast<size_t>(rows) * p.head_dim * sizeof(float), stream);
    if (err != cudaSuccess) return err;
    if (ws_floats > 0 && (err = cudaMemsetAsync(p.dkv_accum, 0, ws_floats * sizeof(float), stream)) != cudaSuccess)
      return err;  // the atomics' target
  }
  const bool vec = rows_vectorizable(p.q, p.q_stride_b, p.q_stride_n, p.q_stride_h, p.head_dim) &&
                   rows_vectorizable(p.k, p.k_stride_b, p.k_stride_n, p.k_stride_h, p.head_dim) &&
                   rows_vectorizable(p.v, p.v_stride_b, p.v_stride_n, p.v_stride_h, p.head_dim) &&
                   rows_vectorizable(p.dout, p.dout_stride_b, p.dout_stride_n, p.dout_stride_h, p.head_dim);
  const bool half = dtype == DType::kFloat16;
  if (p.feat.any())
    return PYLLM_EXT_HEAD_DIM_SWITCH(p.head_dim, [&] {
      return half ? bwd_for<__half, DP, true>(p, vec, splits, stream)
                  : bwd_for<__nv_bfloat16, DP, true>(p, vec, splits, stream);
    });
  return PYLLM_HEAD_DIM_SWITCH(p.head_dim, [&] {
    return half ? bwd_for<__half, DP, false>(p, vec, splits, stream)
                : bwd_for<__nv_bfloat16, DP, false>(p, vec, splits, stream);
  });
}

}  // namespace cuda
}  // namespace pyllm
