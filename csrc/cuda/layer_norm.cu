// LayerNorm / RMSNorm forward and backward with the fused residual add (the layer_norm_fwd/bwd contract
// of csrc/pyllm.cpp). CUDA headers only.
//
// Work split: a row belongs to one warp when N <= 1024 (4 rows per block, reductions are warp shuffles)
// and to a whole block otherwise (warp shuffles, then one value per warp through shared memory).
// Loads and stores of x, residual, y, h, dy, dx move 16 bytes at a time when every row is 16-byte
// aligned and N is a multiple of the vector width; otherwise one element at a time. Statistics are fp32.
//
// Forward: pass 1 forms h = x + residual (rounded to x's dtype, as torch's add is) and its sum; pass 2
// the centered sum of squares (two-pass variance, no cancellation); pass 3 writes y. Passes 2 and 3
// re-read a row the same thread just touched, so they hit L1/L2: DRAM sees one read and one write.
//
// Backward: dx per row in the same split; dweight/dbias in two stages without atomics: each block sums
// its rows' dy * xhat and dy per column (a thread always owns the same columns, so no two threads touch
// one sum), writes one partial row to the workspace, and a second kernel adds the partial rows in a
// fixed order. Bitwise reproducible. The per-column sums in shared memory are stored element-major
// (element j of every thread's vector side by side), so a warp's updates hit 32 distinct banks instead of
// VEC-way conflicts. Small rows get more blocks (up to kMaxPartialFloats / N, at most 2048): enough
// CTAs to fill the GPU; the reduction kernel splits the partial rows over 8 warps per column slice.
#include <algorithm>
#include <cmath>
#include <cstdint>

#include "common.cuh"
#include "kernels.h"

namespace pyllm {
namespace cuda {
namespace {

using namespace detail;

// Blocks of the backward pass = partial rows of dweight/dbias: at least 256, more for small N (up to 2048)
// while the partial rows stay within kMaxPartialFloats.
constexpr int kMinPartials = 256, kMaxPartials = 2048;
constexpr int64_t kMaxPartialFloats = int64_t(1) << 20;
constexpr int64_t kWarpRowMaxN = 1024;
constexpr int kWarpRowsPerBlock = 4;

// Sum over the threads of one row (blockDim.x of them). All threads of the block must call it.
__device__ __forceinline__ float row_sum(float v, float* red) {
  v = warp_sum(v);
  if (blockDim.x == 32) return v;
  __syncthreads();  // red may still be read by the previous call
  if (threadIdx.x % 32 == 0) red[threadIdx.x / 32] = v;
  __syncthreads();
  float t = 0.f;
  for (int i = 0; i < static_cast<int>(blockDim.x / 32); ++i) t += red[i];
  return t;
}

template <typename T, int VEC>
__device__ __forceinline__ Vec<T, VEC> load_vec(const T* p) {
  return *reinterpret_cast<const Vec<T, VEC>*>(p);
}
template <typename T, int VEC>
__device__ __forceinline__ void store_vec(T* p, const Vec<T, VEC>& v) {
  *reinterpret_cast<Vec<T, VEC>*>(p) = v;
}

// blockDim (threads per row, rows per block); rows per block > 1 only with 32 threads per row.
template <typename T, typename W, int VEC>
__global__ void __launch_bounds__(1024) ln_fwd_kernel(const LayerNormFwdParams p) {
  __shared__ float red[32];
  const int tpr = blockDim.x, tid = threadIdx.x;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  if (row >= p.M) return;  // uniform over the block when a row spans it
  const int64_t N = p.N;
  const T* x = static_cast<const T*>(p.x) + row * p.x_row_stride;
  const T* res = p.residual ? static_cast<const T*>(p.residual) + row * p.residual_row_stride : nullptr;
  T* h = res ? static_cast<T*>(p.h) + row * N : nullptr;
  T* y = static_cast<T*>(p.y) + row * N;
  const W* w = static_cast<const W*>(p.weight);
  const W* bias = p.rms ? nullptr : static_cast<const W*>(p.bias);
  const T* src = res ? h : x;  // what passes 2 and 3 read

  float sum = 0.f;
  if (!p.rms || res) {
    for (int64_t c = static_cast<int64_t>(tid) * VEC; c < N; c += static_cast<int64_t>(tpr) * VEC) {
      Vec<T, VEC> xv = load_vec<T, VEC>(x + c);
      if (res) {
        const Vec<T, VEC> rv = load_vec<T, VEC>(res + c);
#pragma unroll
        for (int j = 0; j < VEC; ++j) xv.v[j] = from_float<T>(to_float(xv.v[j]) + to_float(rv.v[j]));
        store_vec<T, VEC>(h + c, xv);
      }
#pragma unroll
      for (int j = 0; j < VEC; ++j) sum += to_float(xv.v[j]);
    }
  }
  const float mean = p.rms ? 0.f : row_sum(sum, red) / static_cast<float>(N);

  float sq = 0.f;
  for (int64_t c = static_cast<int64_t>(tid) * VEC; c < N; c += static_cast<int64_t>(tpr) * VEC) {
    const Vec<T, VEC> v = load_vec<T, VEC>(src + c);
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const float d = to_float(v.v[j]) - mean;
      sq += d * d;
    }
  }
  const float rstd = 1.f / sqrtf(row_sum(sq, red) / static_cast<float>(N) + p.eps);

  for (int64_t c = static_cast<int64_t>(tid) * VEC; c < N; c += static_cast<int64_t>(tpr) * VEC) {
    const Vec<T, VEC> v = load_vec<T, VEC>(src + c);
    Vec<T, VEC> out;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      float t = (to_float(v.v[j]) - mean) * rstd;
      if (w) t *= to_float(w[c + j]);
      if (bias) t += to_float(bias[c + j]);
      out.v[j] = from_float<T>(t);
    }
    store_vec<T, VEC>(y + c, out);
  }
  if (tid == 0) {
    if (p.mean) p.mean[row] = mean;
    p.rstd[row] = rstd;
  }
}

// dx = rstd * (w*dy - xhat * mean(w*dy*xhat) - mean(w*dy)) + dh   (RMSNorm: no mean(w*dy) term)
// Per-column sums of dy*xhat and dy go to shared memory (one region per row slot y) when smem_acc,
// else straight to this block's workspace row (then blockDim.y == 1).
template <typename T, typename W, int VEC>
__global__ void __launch_bounds__(1024) ln_bwd_kernel(const LayerNormBwdParams p, bool smem_acc) {
  extern __shared__ float acc_smem[];
  __shared__ float red[32];
  const int tpr = blockDim.x, tid = threadIdx.x, rpb = blockDim.y;
  const int64_t N = p.N;
  const int nacc = (p.dweight ? 1 : 0) + (p.dbias ? 1 : 0);
  float* accw = nullptr;
  float* accb = nullptr;
  // Element j of the vector at column c lives at acc[j * jstride + c / VEC * cstride]: element-major in
  // shared memory (jstride = N / VEC, cstride = 1: a warp's 32 threads hit 32 banks), plain in the
  // workspace (jstride = 1, cstride = VEC).
  const int64_t jstride = smem_acc ? N / VEC : 1, cstride = smem_acc ? 1 : VEC;
  if (nacc > 0) {
    float* base = smem_acc ? acc_smem + static_cast<int64_t>(threadIdx.y) * nacc * N
                           : p.workspace + static_cast<int64_t>(blockIdx.x) * nacc * N;
    accw = p.dweight ? base : nullptr;
    accb = p.dbias ? base + (p.dweight ? N : 0) : nullptr;
    for (int64_t c = static_cast<int64_t>(tid) * VEC; c < N; c += static_cast<int64_t>(tpr) * VEC) {
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const int64_t a = j * jstride + c / VEC * cstride;
        if (accw) accw[a] = 0.f;
        if (accb) accb[a] = 0.f;
      }
    }
  }
  const W* w = static_cast<const W*>(p.weight);
  const float inv_n = 1.f / static_cast<float>(N);

  for (int64_t row = static_cast<int64_t>(blockIdx.x) * rpb + threadIdx.y; row < p.M;
       row += static_cast<int64_t>(gridDim.x) * rpb) {
    const T* dy = static_cast<const T*>(p.dy) + row * p.dy_row_stride;
    const T* h = static_cast<const T*>(p.h) + row * p.h_row_stride;
    const T* dh = p.dh ? static_cast<const T*>(p.dh) + row * p.dh_row_stride : nullptr;
    T* dx = static_cast<T*>(p.dx) + row * N;
    const float mean = p.rms ? 0.f : p.mean[row];
    const float rstd = p.rstd[row];

    float s1 = 0.f, s2 = 0.f;  // sum(w*dy*xhat), sum(w*dy)
    for (int64_t c = static_cast<int64_t>(tid) * VEC; c < N; c += static_cast<int64_t>(tpr) * VEC) {
      const Vec<T, VEC> gv = load_vec<T, VEC>(dy + c), hv = load_vec<T, VEC>(h + c);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const float g = to_float(gv.v[j]), xhat = (to_float(hv.v[j]) - mean) * rstd;
        const float wg = w ? to_float(w[c + j]) * g : g;
        s1 += wg * xhat;
        s2 += wg;
        const int64_t a = j * jstride + c / VEC * cstride;
        if (accw) accw[a] += g * xhat;
        if (accb) accb[a] += g;
      }
    }
    const float c1 = row_sum(s1, red) * inv_n;
    const float c2 = p.rms ? 0.f : row_sum(s2, red) * inv_n;

    for (int64_t c = static_cast<int64_t>(tid) * VEC; c < N; c += static_cast<int64_t>(tpr) * VEC) {
      const Vec<T, VEC> gv = load_vec<T, VEC>(dy + c), hv = load_vec<T, VEC>(h + c);
      Vec<T, VEC> dhv;
      if (dh) dhv = load_vec<T, VEC>(dh + c);
      Vec<T, VEC> out;
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const float g = to_float(gv.v[j]), xhat = (to_float(hv.v[j]) - mean) * rstd;
        const float wg = w ? to_float(w[c + j]) * g : g;
        float d = (wg - (xhat * c1 + c2)) * rstd;
        if (dh) d += to_float(dhv.v[j]);
        out.v[j] = from_float<T>(d);
      }
      store_vec<T, VEC>(dx + c, out);
    }
  }

  if (nacc > 0 && smem_acc) {  // add the row slots in a fixed order: one partial row per block
    __syncthreads();
    const int64_t len = nacc * N;
    float* part = p.workspace + static_cast<int64_t>(blockIdx.x) * len;
    for (int64_t c = static_cast<int64_t>(threadIdx.y) * tpr + tid; c < len; c += static_cast<int64_t>(tpr) * rpb) {
      const int64_t region = c / N, col = c % N;  // dweight, then dbias
      const int64_t a = region * N + (col % VEC) * jstride + col / VEC;
      float t = 0.f;
      for (int s = 0; s < rpb; ++s) t += acc_smem[s * len + a];
      part[c] = t;
    }
  }
}

// dweight[c] (and dbias[c]) = sum over the G partial rows in a fixed order: block (32, 8) takes 32 columns;
// warp y sums the partial rows y, y + 8, ..., then thread y = 0 adds the 8 warp sums in order.
template <typename W>
__global__ void __launch_bounds__(256) ln_bwd_reduce_kernel(const float* __restrict__ ws, int G, int64_t N,
                                                            int nacc, W* dw, W* db) {
  __shared__ float part[2][8][33];
  const int64_t c = static_cast<int64_t>(blockIdx.x) * 32 + threadIdx.x;
  const int64_t len = nacc * N;
  float t[2] = {0.f, 0.f};
  if (c < N) {
    for (int g = threadIdx.y; g < G; g += 8) {
      const float* row = ws + g * len;
      if (dw) t[0] += row[c];
      if (db) t[1] += row[(dw ? N : 0) + c];
    }
  }
  part[0][threadIdx.y][threadIdx.x] = t[0];
  part[1][threadIdx.y][threadIdx.x] = t[1];
  __syncthreads();
  if (threadIdx.y == 0 && c < N) {
    float sw = 0.f, sb = 0.f;
#pragma unroll
    for (int y = 0; y < 8; ++y) {
      sw += part[0][y][threadIdx.x];
      sb += part[1][y][threadIdx.x];
    }
    if (dw) dw[c] = from_float<W>(sw);
    if (db) db[c] = from_float<W>(sb);
  }
}

// ---- launch configuration --------------------------------------------------------------------------

struct RowSplit {
  int tpr, rpb;  // threads per row, rows per block
};

RowSplit row_split(int64_t N, int vec) {
  if (N <= kWarpRowMaxN) return {32, kWarpRowsPerBlock};
  const int64_t chunks = (N + vec - 1) / vec;
  if (chunks <= 512) return {128, 1};
  if (chunks <= 2048) return {256, 1};
  if (chunks <= 8192) return {512, 1};
  return {1024, 1};
}

int bwd_blocks(int64_t M, int64_t N, int rpb) {
  const int64_t cap = std::min<int64_t>(kMaxPartials, std::max<int64_t>(kMinPartials, kMaxPartialFloats / std::max<int64_t>(N, 1)));
  return static_cast<int>(std::min<int64_t>((M + rpb - 1) / rpb, cap));
}

bool aligned16(const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15) == 0; }

// Rows of ptr (row stride ld) can be moved in 16-byte vectors of vec elements.
bool vec_ok(const void* ptr, int64_t ld, int64_t N, int vec) {
  return ptr == nullptr || (aligned16(ptr) && ld % vec == 0 && N % vec == 0);
}

template <typename T, typename W>
cudaError_t fwd_typed(const LayerNormFwdParams& p, cudaStream_t stream) {
  constexpr int V = 16 / sizeof(T);
  const bool vec = vec_ok(p.x, p.x_row_stride, p.N, V) && vec_ok(p.residual, p.residual_row_stride, p.N, V) &&
                   vec_ok(p.y, p.N, p.N, V) && vec_ok(p.h, p.N, p.N, V);
  const RowSplit s = row_split(p.N, vec ? V : 1);
  const int64_t blocks = (p.M + s.rpb - 1) / s.rpb;
  if (blocks > INT32_MAX) return cudaErrorInvalidValue;
  const dim3 block(s.tpr, s.rpb);
  if (vec)
    ln_fwd_kernel<T, W, V><<<static_cast<unsigned>(blocks), block, 0, stream>>>(p);
  else
    ln_fwd_kernel<T, W, 1><<<static_cast<unsigned>(blocks), block, 0, stream>>>(p);
  return cudaGetLastError();
}

template <typename T, typename W>
cudaError_t bwd_typed(const LayerNormBwdParams& p, cudaStream_t stream) {
  constexpr int V = 16 / sizeof(T);
  const bool vec = vec_ok(p.dy, p.dy_row_stride, p.N, V) && vec_ok(p.h, p.h_row_stride, p.N, V) &&
                   vec_ok(p.dh, p.dh_row_stride, p.N, V) && vec_ok(p.dx, p.N, p.N, V);
  RowSplit s = row_split(p.N, vec ? V : 1);
  const int nacc = (p.dweight ? 1 : 0) + (p.dbias ? 1 : 0);
  if (nacc > 0 && p.workspace == nullptr) return cudaErrorInvalidValue;

  // Per-column sums in shared memory when they fit (opt-in limit of the device), else in global memory.
  bool smem_acc = true;
  size_t smem = static_cast<size_t>(s.rpb) * nacc * p.N * sizeof(float);
  int dev = 0, optin = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  if (err != cudaSuccess) return err;
  if (smem + 32 * sizeof(float) > static_cast<size_t>(optin)) {
    smem_acc = false;
    smem = 0;
    if (s.rpb > 1) s = {s.tpr, 1};  // global accumulation needs one row slot per block
  }
  const int G = p.M > 0 ? bwd_blocks(p.M, p.N, s.rpb) : 0;
  if (G > 0) {
    const dim3 block(s.tpr, s.rpb);
    if (vec) {
      auto k = ln_bwd_kernel<T, W, V>;
      if ((err = cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem))) != cudaSuccess) return err;
      k<<<G, block, smem, stream>>>(p, smem_acc);
    } else {
      auto k = ln_bwd_kernel<T, W, 1>;
      if ((err = cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem))) != cudaSuccess) return err;
      k<<<G, block, smem, stream>>>(p, smem_acc);
    }
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
  }
  if (nacc > 0) {
    const int64_t blocks = (p.N + 31) / 32;
    if (blocks > INT32_MAX) return cudaErrorInvalidValue;
    ln_bwd_reduce_kernel<W><<<static_cast<unsigned>(blocks), dim3(32, 8), 0, stream>>>(
        p.workspace, G, p.N, nacc, static_cast<W*>(p.dweight), static_cast<W*>(p.dbias));
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
  }
  return cudaSuccess;
}

// Calls F<T, W>(args...) for the (x dtype, weight dtype) pair; weight is x's dtype or fp32.
#define PYLLM_NORM_DISPATCH(FN, dtype, wdtype, ...)                                              \
  [&]() -> cudaError_t {                                                                          \
    switch (dtype) {                                                                              \
      case DType::kFloat32: return FN<float, float>(__VA_ARGS__);                                 \
      case DType::kFloat16:                                                                       \
        return wdtype == DType::kFloat32 ? FN<__half, float>(__VA_ARGS__) : FN<__half, __half>(__VA_ARGS__); \
      case DType::kBFloat16:                                                                      \
        return wdtype == DType::kFloat32 ? FN<__nv_bfloat16, float>(__VA_ARGS__)                  \
                                         : FN<__nv_bfloat16, __nv_bfloat16>(__VA_ARGS__);         \
    }                                                                                             \
    return cudaErrorInvalidValue;                                                                 \
  }()

bool weight_dtype_ok(DType dtype, DType wdtype) { return wdtype == dtype || wdtype == DType::kFloat32; }

}  // namespace

size_t layer_norm_bwd_workspace_floats(int64_t M, int64_t N) {
  if (M <= 0 || N <= 0) return 0;
  // Upper bound over the splits bwd_typed may pick (rows per block only shrinks the partial count).
  return static_cast<size_t>(bwd_blocks(M, N, 1)) * 2 * N;
}

cudaError_t layer_norm_fwd(const LayerNormFwdParams& p, DType dtype, DType weight_dtype, cudaStream_t stream) {
  if (p.M < 0 || p.N < 0 || (p.residual != nullptr && p.h == nullptr) || p.rstd == nullptr ||
      (!p.rms && p.mean == nullptr))
    return cudaErrorInvalidValue;
  if ((p.weight || p.bias) && !weight_dtype_ok(dtype, weight_dtype)) return cudaErrorInvalidValue;
  if (p.M == 0 || p.N == 0) return cudaSuccess;
  return PYLLM_NORM_DISPATCH(fwd_typed, dtype, weight_dtype, p, stream);
}

cudaError_t layer_norm_bwd(const LayerNormBwdParams& p, DType dtype, DType weight_dtype, cudaStream_t stream) {
  if (p.M < 0 || p.N < 0 || p.rstd == nullptr || (!p.rms && p.mean == nullptr)) return cudaErrorInvalidValue;
  if ((p.dweight || p.dbias) && !weight_dtype_ok(dtype, weight_dtype)) return cudaErrorInvalidValue;
  if (p.N == 0) return cudaSuccess;
  return PYLLM_NORM_DISPATCH(bwd_typed, dtype, weight_dtype, p, stream);
}

}  // namespace cuda
}  // namespace pyllm
