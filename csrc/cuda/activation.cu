// GELU's tanh approximation (pyllm::gelu_tanh_fwd / gelu_tanh_bwd) on the GPU, elementwise over contiguous
// tensors. The op contract is in csrc/pyllm.cpp; the math is the CPU kernel's (csrc/cpu/activation.cpp):
//   y = x s,  s = sigmoid(2u) = 1 / (1 + exp(-2u)),  2u = 2 sqrt(2 / pi) (x + 0.044715 x^3)
//   dx = dy (s + x s (1 - s) d(2u)/dx)
// Grid-stride loop, fp32 math, one read (two for the backward) and one write per element.
#include <cstdint>

#include "common.cuh"
#include "kernels.h"

namespace pyllm {
namespace cuda {
namespace {

using detail::from_float;
using detail::to_float;

constexpr float kK2 = 2.f * 0.7978845608028654f, kK2C = 2.f * 0.7978845608028654f * 0.044715f;

__device__ __forceinline__ float sigmoid_2u(float x, float x2) {
  return 1.f / (1.f + __expf(-(x * (kK2 + kK2C * x2))));
}

template <typename T>
__global__ void gelu_tanh_kernel(const GeluTanhParams p) {
  const T* x = static_cast<const T*>(p.x);
  const T* g = static_cast<const T*>(p.dy);
  T* y = static_cast<T*>(p.out);
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < p.n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float xi = to_float(x[i]), x2 = xi * xi, s = sigmoid_2u(xi, x2);
    float v;
    if (g != nullptr)
      v = to_float(g[i]) * (s + xi * s * (1.f - s) * (kK2 + 3.f * kK2C * x2));
    else
      v = xi * s;
    y[i] = from_float<T>(v);
  }
}

template <typename T>
cudaError_t launch(const GeluTanhParams& p, cudaStream_t stream) {
  if (p.n == 0) return cudaSuccess;
  constexpr int kThreads = 256;
  const int64_t blocks = (p.n + kThreads - 1) / kThreads;
  const unsigned grid = static_cast<unsigned>(blocks < 65535 * 8 ? blocks : 65535 * 8);  // grid-stride beyond
  gelu_tanh_kernel<T><<<grid, kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

cudaError_t gelu_tanh(const GeluTanhParams& p, DType dtype, cudaStream_t stream) {
  if (p.n < 0 || p.x == nullptr || p.out == nullptr) return cudaErrorInvalidValue;
  switch (dtype) {
    case DType::kFloat16: return launch<__half>(p, stream);
    case DType::kBFloat16: return launch<__nv_bfloat16>(p, stream);
    default: return launch<float>(p, stream);
  }
}

}  // namespace cuda
}  // namespace pyllm
