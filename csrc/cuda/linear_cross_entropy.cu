// Linear cross-entropy, the per-row step on the GPU (linear_cross_entropy_rows of kernels.h). CUDA headers
// only; the chunk loop and its cuBLAS matmuls are in linear_cross_entropy_host.cpp / csrc/linear_cross_entropy.h.
//
// One block of 256 threads per row of V float32 logits z (softcapped first: z = cap * tanh(z / cap)):
//   pass 1: each thread keeps an online (max, sum of exp) and the sum of z over its strided columns;
//           the block merges them (warp shuffles, then one value per warp through shared memory):
//           lse = max + log(sum);  loss = lse - (1 - e) z_y - e mean(z) + z_loss lse^2
//   pass 2: z_j <- s (exp(z_j - lse) (1 + 2 z_loss lse) - e / V - (1 - e)[j == y]) (1 - tanh_j^2)
// The row is re-read from L2 in pass 2 (a 128k-vocab row is 512 KB). Ignored rows: loss 0, gradient 0.
#include <cmath>
#include <cstdint>

#include "common.cuh"
#include "kernels.h"

namespace pyllm {
namespace cuda {
namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ float capped(float x, float cap) { return cap > 0.f ? cap * tanhf(x / cap) : x; }

// Merge two (max, sum of exp relative to that max) pairs.
__device__ __forceinline__ void merge(float& m, float& s, float m2, float s2) {
  float mn = fmaxf(m, m2);
  if (mn == -INFINITY) return;
  s = s * expf(m - mn) + s2 * expf(m2 - mn);
  m = mn;
}

__global__ void __launch_bounds__(kThreads) lce_rows_kernel(LinearCrossEntropyRowsParams p) {
  __shared__ float red_m[kThreads / 32], red_s[kThreads / 32], red_z[kThreads / 32];
  __shared__ float row_lse, row_sum_z;
  float* z = p.z + static_cast<int64_t>(blockIdx.x) * p.z_row_stride;
  const int64_t y = p.labels[blockIdx.x];
  const bool valid = y != p.ignore_index;
  const float cap = p.softcap, eps = p.label_smoothing;
  float m = -INFINITY, s = 0.f, sz = 0.f;
  for (int64_t j = threadIdx.x; j < p.vocab; j += kThreads) {
    float v = capped(z[j], cap);
    merge(m, s, v, 1.f);
    sz += v;
  }
  for (int o = 16; o > 0; o >>= 1) {
    float m2 = __shfl_xor_sync(0xffffffffu, m, o), s2 = __shfl_xor_sync(0xffffffffu, s, o);
    merge(m, s, m2, s2);
  }
  sz = detail::warp_sum(sz);
  if (threadIdx.x % 32 == 0) {
    red_m[threadIdx.x / 32] = m;
    red_s[threadIdx.x / 32] = s;
    red_z[threadIdx.x / 32] = sz;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    float bm = red_m[0], bs = red_s[0], bz = red_z[0];
    for (int w = 1; w < kThreads / 32; ++w) {
      merge(bm, bs, red_m[w], red_s[w]);
      bz += red_z[w];
    }
    row_lse = bm + logf(bs);
    row_sum_z = bz;
  }
  __syncthreads();
  const float lse = row_lse;
  if (threadIdx.x == 0) {
    float loss = 0.f;
    if (valid && y >= 0 && y < p.vocab) {
      loss = lse - (1.f - eps) * capped(z[y], cap) - eps * row_sum_z / static_cast<float>(p.vocab) +
             p.z_loss * lse * lse;
    } else if (valid) {
      loss = NAN;  // out-of-range label (the op layer refuses these before launching)
    }
    p.loss[blockIdx.x] = loss;
  }
  if (!p.compute_grad) return;
  __syncthreads();  // thread 0 has read z[y] before anyone overwrites it
  const float pmul = p.grad_scale * (1.f + 2.f * p.z_loss * lse);
  const float shift = p.grad_scale * eps / static_cast<float>(p.vocab);
  for (int64_t j = threadIdx.x; j < p.vocab; j += kThreads) {
    float g = 0.f;
    if (valid) {
      float v = capped(z[j], cap);
      g = expf(v - lse) * pmul - shift - (j == y ? p.grad_scale * (1.f - eps) : 0.f);
      if (cap > 0.f) {
        float t = v / cap;
        g *= 1.f - t * t;
      }
    }
    z[j] = g;
  }
}

}  // namespace

cudaError_t linear_cross_entropy_rows(const LinearCrossEntropyRowsParams& p, cudaStream_t stream) {
  if (p.rows <= 0) return cudaSuccess;
  if (p.rows > 2147483647LL || p.vocab <= 0) return cudaErrorInvalidValue;
  lce_rows_kernel<<<static_cast<unsigned>(p.rows), kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace pyllm
