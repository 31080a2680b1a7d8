// Rotary position embeddings (pyllm::rotary) on the GPU: q and k rotated in one launch.
// The op contract is in csrc/pyllm.cpp; the math (rotate-half or interleaved pairs, conjugate = the
// backward rotation by -theta, the copied tail of a partial rotary) is the CPU kernel's, csrc/cpu/rotary.cpp.
//
// One block per token (b, n) and one thread per (head, pair) of q then k: the token's cos/sin row is read
// from L1/L2 by every head. Memory-bound: one read and one write per element, fp32 math.
#include <cstdint>

#include "common.cuh"
#include "kernels.h"

namespace pyllm {
namespace cuda {
namespace {

using detail::from_float;
using detail::to_float;

template <typename T>
__device__ __forceinline__ void rotate_row(const T* __restrict__ x, T* __restrict__ o, const float* __restrict__ c,
                                           const float* __restrict__ s, int i, int half, bool interleaved,
                                           float sign) {
  const int i1 = interleaved ? 2 * i : i, i2 = interleaved ? 2 * i + 1 : i + half;
  const float x1 = to_float(x[i1]), x2 = to_float(x[i2]), si = sign * s[i];
  o[i1] = from_float<T>(x1 * c[i] - x2 * si);
  o[i2] = from_float<T>(x2 * c[i] + x1 * si);
}

template <typename T>
__global__ void rotary_kernel(const RotaryParams p) {
  const int64_t token = blockIdx.x;  // b * N + n
  const int64_t b = token / p.seqlen, n = token % p.seqlen;
  const float* c = p.cos + (p.cos_batch == 1 ? 0 : b) * p.seqlen * p.half + n * p.half;
  const float* s = p.sin + (p.cos_batch == 1 ? 0 : b) * p.seqlen * p.half + n * p.half;
  const float sign = p.conjugate ? -1.f : 1.f;
  const int rest = p.head_dim - 2 * p.half;
  const int per_head = p.half + rest;  // work items per head: the pairs, then the copied tail
  const int total = (p.heads_q + p.heads_k) * per_head;
  for (int t = threadIdx.x; t < total; t += blockDim.x) {
    int h = t / per_head;
    const int i = t % per_head;
    const bool is_q = h < p.heads_q;
    if (!is_q) h -= p.heads_q;
    const T* x = static_cast<const T*>(is_q ? p.q : p.k) +
                 (is_q ? b * p.q_stride_b + n * p.q_stride_n + h * p.q_stride_h
                       : b * p.k_stride_b + n * p.k_stride_n + h * p.k_stride_h);
    T* o = static_cast<T*>(is_q ? p.q_out : p.k_out) + (token * (is_q ? p.heads_q : p.heads_k) + h) * p.head_dim;
    if (i < p.half) {
      rotate_row(x, o, c, s, i, p.half, p.interleaved, sign);
    } else {
      const int j = 2 * p.half + (i - p.half);
      o[j] = x[j];
    }
  }
}

template <typename T>
cudaError_t launch(const RotaryParams& p, cudaStream_t stream) {
  const int64_t tokens = static_cast<int64_t>(p.batch) * p.seqlen;
  if (tokens == 0) return cudaSuccess;
  if (tokens > INT32_MAX) return cudaErrorInvalidValue;
  const int work = (p.heads_q + p.heads_k) * (p.head_dim - p.half);
  const int threads = work >= 256 ? 256 : (work >= 128 ? 128 : 64);
  rotary_kernel<T><<<static_cast<unsigned>(tokens), threads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

cudaError_t rotary(const RotaryParams& p, DType dtype, cudaStream_t stream) {
  if (2 * p.half > p.head_dim || p.half < 1 || (p.cos_batch != 1 && p.cos_batch != p.batch))
    return cudaErrorInvalidValue;
  switch (dtype) {
    case DType::kFloat16: return launch<__half>(p, stream);
    case DType::kBFloat16: return launch<__nv_bfloat16>(p, stream);
    default: return launch<float>(p, stream);
  }
}

}  // namespace cuda
}  // namespace pyllm
