/*
FlashAttention-2 forward (csrc/cuda/attention.cu): validate against a CPU reference, then time it.

Build and run (from the repository root; sm_80 = A100, sm_90 = H100/H200):
  nvcc -O3 -std=c++17 -arch=sm_90 -Icsrc/cuda -Icsrc/dev csrc/dev/attention_fwd.cu csrc/cuda/attention.cu \
       -o /tmp/attention_fwd && /tmp/attention_fwd
or with CMake: cmake -S . -B build/cuda -G Ninja && cmake --build build/cuda -j && build/cuda/attention_fwd
Options: --no-bench (validation only); --profile (no validation, one launch of a D=128 case: for ncu).
Exit status 1 when any case fails validation (the timings still run and say so).

Validation: out within atol * max|ref| + rtol * |ref| of a double-precision reference computed from the
same rounded inputs (fp16: 2e-3 / 5e-3, bf16: 1.6e-2 / 2e-2); lse within 1e-3 + 1e-4 |ref|; rows with
no visible key must give out = 0 and lse = -inf exactly.
Timing: CUDA events, L2 flushed (256 MB write) before every repeat; TFLOP/s with FlashAttention's
count 4 * B * H * Nq * Nk * D (halved for causal).
*/
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "attention_ref.h"
#include "harness.h"
#include "kernels.h"

using namespace harness;
using pyllm::cuda::AttentionFwdParams;

struct DeviceFwd {
  void *q, *k, *v, *out;
  float* lse;
  uint8_t* mask;
  AttentionFwdParams p{};

  DeviceFwd(const AttnCase& c, const AttnInputs& in) {
    q = upload(in.q);
    k = upload(in.k);
    v = upload(in.v);
    CUDA_CHECK(cudaMalloc(&out, std::max<size_t>(16, size_t(c.B) * c.Nq * c.Hq * c.D * dtype_size(c.dtype))));
    CUDA_CHECK(cudaMalloc(&lse, std::max<size_t>(16, size_t(c.B) * c.Hq * c.Nq * 4)));
    mask = nullptr;
    if (!in.mask.empty()) {
      CUDA_CHECK(cudaMalloc(&mask, in.mask.size()));
      CUDA_CHECK(cudaMemcpy(mask, in.mask.data(), in.mask.size(), cudaMemcpyHostToDevice));
    }
    p.q = q, p.k = k, p.v = v, p.out = out, p.lse = lse;
    p.key_padding_mask = mask;
    p.mask_stride_b = c.Nk;
    p.batch = c.B, p.seqlen_q = c.Nq, p.seqlen_k = c.Nk, p.heads_q = c.Hq, p.heads_kv = c.Hkv, p.head_dim = c.D;
    p.q_stride_b = in.sq.b, p.q_stride_n = in.sq.n, p.q_stride_h = in.sq.h;
    p.k_stride_b = in.sk.b, p.k_stride_n = in.sk.n, p.k_stride_h = in.sk.h;
    p.v_stride_b = in.sk.b, p.v_stride_n = in.sk.n, p.v_stride_h = in.sk.h;
    p.out_stride_b = int64_t(c.Nq) * c.Hq * c.D, p.out_stride_n = int64_t(c.Hq) * c.D, p.out_stride_h = c.D;
    p.softmax_scale = in.scale;
    p.causal = c.causal;
  }
  ~DeviceFwd() {
    cudaFree(q), cudaFree(k), cudaFree(v), cudaFree(out), cudaFree(lse);
    if (mask) cudaFree(mask);
  }
};

static bool validate(const AttnCase& c, std::mt19937& rng) {
  print_case(c);
  AttnInputs in(c, rng);
  DeviceFwd dev(c, in);
  // NaN poison: every element of out and lse must be written
  CUDA_CHECK(cudaMemset(dev.out, 0xff, size_t(c.B) * c.Nq * c.Hq * c.D * dtype_size(c.dtype)));
  CUDA_CHECK(cudaMemset(dev.lse, 0xff, size_t(c.B) * c.Hq * c.Nq * 4));
  CUDA_CHECK(pyllm::cuda::attention_fwd(dev.p, c.dtype, 0));
  CUDA_CHECK(cudaDeviceSynchronize());
  std::vector<double> out_ref, lse_ref;
  attention_fwd_ref(c, in, out_ref, lse_ref);
  const auto out = download(dev.out, out_ref.size(), c.dtype);
  const auto lse = download(dev.lse, lse_ref.size(), DType::kFloat32);
  const bool bf = c.dtype == DType::kBFloat16;
  bool ok = check_close("out", out, out_ref, (bf ? 1.6e-2 : 2e-3) * std::max(1.0, max_abs(out_ref)), bf ? 2e-2 : 5e-3);
  ok &= check_close("lse", lse, lse_ref, 1e-3, 1e-4);
  return ok;
}

static void bench(int B, int H, int Hkv, int N, int D, bool causal, DType t, std::mt19937& rng, bool once = false) {
  const AttnCase c{B, N, N, H, Hkv, D, causal, false, false, t};
  AttnInputs in(c, rng, /*fast=*/true);
  DeviceFwd dev(c, in);
  if (once) {  // --profile: a single launch for ncu
    CUDA_CHECK(pyllm::cuda::attention_fwd(dev.p, t, 0));
    CUDA_CHECK(cudaDeviceSynchronize());
    return;
  }
  const float ms = time_ms([&] { CUDA_CHECK(pyllm::cuda::attention_fwd(dev.p, t, 0)); });
  const double flops = 4.0 * B * H * double(N) * N * D / (causal ? 2.0 : 1.0);
  std::printf("  %s B=%d H=%d Hkv=%d N=%d D=%d %-6s %8.3f ms  %7.1f TFLOP/s\n", dtype_name(t), B, H, Hkv, N, D,
              causal ? "causal" : "full", ms, flops / ms / 1e9);
  std::fflush(stdout);
}

int main(int argc, char** argv) {
  bool do_bench = true, profile = false;
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--no-bench")) do_bench = false;
    if (!std::strcmp(argv[i], "--profile")) profile = true;
  }
  print_device();
  std::mt19937 rng(1234);
  if (profile) {
    bench(4, 16, 16, 4096, 128, false, DType::kBFloat16, rng, /*once=*/true);
    return 0;
  }
  int failed = 0, total = 0;
  std::printf("validation (attention_fwd vs CPU reference):\n");
  for (const AttnCase& c : attention_cases()) {
    ++total;
    if (!validate(c, rng)) ++failed;
  }
  std::printf("%d/%d cases passed\n", total - failed, total);
  std::fflush(stdout);
  if (do_bench) {
    std::printf("benchmark (L2 flushed between repeats)%s:\n", failed ? " -- VALIDATION FAILED, timed anyway" : "");
    for (int D : {64, 128})
      for (bool causal : {false, true}) {
        bench(4, 16, 16, 2048, D, causal, DType::kBFloat16, rng);
        bench(1, 16, 16, 16384, D, causal, DType::kBFloat16, rng);
      }
    bench(4, 16, 16, 2048, 128, false, DType::kFloat16, rng);
    bench(1, 32, 4, 8192, 128, true, DType::kBFloat16, rng);  // GQA 8:1
  }
  return failed ? 1 : 0;
}
