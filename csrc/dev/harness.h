// Shared pieces of the csrc/dev harnesses (llm.c dev/cuda style): error checks, host-side dtype
// rounding, random inputs, tolerance checks, and kernel timing with the L2 cache flushed between repeats.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "kernels.h"

#define CUDA_CHECK(call)                                                                       \
  do {                                                                                         \
    cudaError_t err_ = (call);                                                                 \
    if (err_ != cudaSuccess) {                                                                 \
      std::fprintf(stderr, "CUDA error %s at %s:%d: %s\n", cudaGetErrorName(err_), __FILE__, \
                   __LINE__, cudaGetErrorString(err_));                                        \
      std::exit(2);                                                                            \
    }                                                                                          \
  } while (0)

namespace harness {

using pyllm::cuda::DType;

inline const char* dtype_name(DType t) {
  return t == DType::kFloat32 ? "fp32" : t == DType::kFloat16 ? "fp16" : "bf16";
}
inline size_t dtype_size(DType t) { return t == DType::kFloat32 ? 4 : 2; }

// Host buffer of `dtype` values plus their float image (what the CPU reference computes with).
struct HostTensor {
  DType dtype;
  std::vector<float> f;          // values exactly representable in dtype
  std::vector<uint16_t> bits16;  // the fp16/bf16 storage (empty for fp32)

  HostTensor(DType t, size_t n) : dtype(t), f(n, 0.f), bits16(t == DType::kFloat32 ? 0 : n, 0) {}
  size_t bytes() const { return f.size() * dtype_size(dtype); }
  const void* data() const { return dtype == DType::kFloat32 ? static_cast<const void*>(f.data()) : bits16.data(); }

  void set(size_t i, float x) {
    if (dtype == DType::kFloat16) {
      __half h = __float2half_rn(x);
      bits16[i] = *reinterpret_cast<uint16_t*>(&h);
      f[i] = __half2float(h);
    } else if (dtype == DType::kBFloat16) {
      __nv_bfloat16 h = __float2bfloat16_rn(x);
      bits16[i] = *reinterpret_cast<uint16_t*>(&h);
      f[i] = __bfloat162float(h);
    } else {
      f[i] = x;
    }
  }
  void randn(std::mt19937& rng, float scale = 1.f) {
    std::normal_distribution<float> d(0.f, scale);
    for (size_t i = 0; i < f.size(); ++i) set(i, d(rng));
  }
  // Uniform in [-scale, scale) from a xorshift generator: for benchmark-sized inputs, where
  // std::normal_distribution would take tens of seconds on the host.
  void fill_fast(uint32_t seed, float scale = 1.f) {
    uint32_t x = seed * 2654435761u + 1u;
    for (size_t i = 0; i < f.size(); ++i) {
      x ^= x << 13, x ^= x >> 17, x ^= x << 5;
      set(i, scale * (static_cast<float>(x >> 8) * (2.f / 16777216.f) - 1.f));
    }
  }
};

// Device bytes -> floats (for fp16/bf16/fp32 outputs).
inline std::vector<float> download(const void* dptr, size_t n, DType t) {
  std::vector<float> out(n);
  if (t == DType::kFloat32) {
    CUDA_CHECK(cudaMemcpy(out.data(), dptr, n * 4, cudaMemcpyDeviceToHost));
    return out;
  }
  std::vector<uint16_t> bits(n);
  CUDA_CHECK(cudaMemcpy(bits.data(), dptr, n * 2, cudaMemcpyDeviceToHost));
  for (size_t i = 0; i < n; ++i) {
    if (t == DType::kFloat16) {
      __half h;
      *reinterpret_cast<uint16_t*>(&h) = bits[i];
      out[i] = __half2float(h);
    } else {
      __nv_bfloat16 h;
      *reinterpret_cast<uint16_t*>(&h) = bits[i];
      out[i] = __bfloat162float(h);
    }
  }
  return out;
}

inline void* upload(const HostTensor& t) {
  void* d = nullptr;
  CUDA_CHECK(cudaMalloc(&d, t.bytes() > 0 ? t.bytes() : 16));
  if (t.bytes() > 0) CUDA_CHECK(cudaMemcpy(d, t.data(), t.bytes(), cudaMemcpyHostToDevice));
  return d;
}

// |got - ref| <= atol + rtol * |ref| everywhere (infinities must match exactly, NaN always fails).
// Prints the worst element; returns whether all passed.
inline bool check_close(const char* what, const std::vector<float>& got, const std::vector<double>& ref,
                        double atol, double rtol) {
  size_t bad = 0, worst = 0;
  double worst_excess = -1e300, max_err = 0.0;
  for (size_t i = 0; i < ref.size(); ++i) {
    const double g = got[i], r = ref[i];
    double err;
    bool ok;
    if (std::isinf(r) || std::isinf(g)) {
      ok = g == r;
      err = ok ? 0.0 : INFINITY;
    } else {
      err = std::fabs(g - r);
      ok = !std::isnan(g) && err <= atol + rtol * std::fabs(r);
    }
    if (std::isnan(g)) err = INFINITY;
    if (!ok) ++bad;
    const double excess = err - (atol + rtol * std::fabs(std::isinf(r) ? 0.0 : r));
    if (excess > worst_excess) worst_excess = excess, worst = i;
    if (!std::isinf(err)) max_err = std::fmax(max_err, err);
  }
  if (bad > 0)
    std::printf("    %-5s FAIL: %zu/%zu mismatches; worst at %zu: got %.6g ref %.6g (max finite err %.3g)\n", what,
                bad, ref.size(), worst, got.empty() ? 0.0 : got[worst], ref.empty() ? 0.0 : ref[worst], max_err);
  else
    std::printf("    %-5s ok   (max err %.3g)\n", what, max_err);
  return bad == 0;
}

// Mean time of fn() in milliseconds over `repeats`, each after writing a 256 MB buffer so that no
// input is served from L2 (H100/H200 L2 is 50-60 MB).
inline float time_ms(const std::function<void()>& fn, int repeats = 20) {
  static void* flush = nullptr;
  const size_t flush_bytes = 256u << 20;
  if (!flush) CUDA_CHECK(cudaMalloc(&flush, flush_bytes));
  cudaEvent_t start, stop;
  CUDA_CHECK(cudaEventCreate(&start));
  CUDA_CHECK(cudaEventCreate(&stop));
  fn();  // warm-up (also sets the shared-memory attributes)
  CUDA_CHECK(cudaDeviceSynchronize());
  float total = 0.f;
  for (int r = 0; r < repeats; ++r) {
    CUDA_CHECK(cudaMemsetAsync(flush, r & 0xff, flush_bytes));
    CUDA_CHECK(cudaEventRecord(start));
    fn();
    CUDA_CHECK(cudaEventRecord(stop));
    CUDA_CHECK(cudaEventSynchronize(stop));
    float ms = 0.f;
    CUDA_CHECK(cudaEventElapsedTime(&ms, start, stop));
    total += ms;
  }
  CUDA_CHECK(cudaEventDestroy(start));
  CUDA_CHECK(cudaEventDestroy(stop));
  return total / repeats;
}

inline void print_device() {
  int dev = 0;
  CUDA_CHECK(cudaGetDevice(&dev));
  cudaDeviceProp prop{};
  CUDA_CHECK(cudaGetDeviceProperties(&prop, dev));
  std::printf("device %d: %s, sm_%d%d, %d SMs, %.0f MB L2\n", dev, prop.name, prop.major, prop.minor,
              prop.multiProcessorCount, prop.l2CacheSize / 1048576.0);
}

}  // namespace harness
