/*
FlashAttention-2 forward (csrc/cuda/attention.cu): validate against a CPU reference, then time it.

Build and run (from the repository root; sm_80 = A100, sm_90 = H100/H200):
  nvcc -O3 -std=c++17 -arch=sm_90 -Icsrc/cuda -Icsrc/dev csrc/dev/attention_fwd.cu csrc/cuda/attention.cu \
       -o /tmp/attention_fwd && /tmp/attention_fwd
or with CMake: cmake -S . -B build/cuda -G Ninja && cmake --build build/cuda -j && build/cuda/attention_fwd
Options: --no-bench (validation only); --profile (no validation, one launch of a D=128 case: for ncu);
--quick (validation of the fp16 cases only: for compute-sanitizer).
Exit status 1 when any case fails validation (the timings still run and say so).

Validation: out within atol * max|ref| + rtol * |ref| of a double-precision reference computed from the
same rounded inputs (fp16: 2e-3 / 5e-3, bf16: 1.6e-2 / 2e-2); lse within 1e-3 + 1e-4 |ref|; rows with
no visible key must give out = 0 and lse = -inf exactly. The cases include GQA groups 1-8 and the
features (window, softcap, ALiBi, dropout: attention_ref.h feature_cases). Dropout is also checked for
the exact mask: with q = 0 and v = one-hot over keys, out[b, i, h, j] != 0 iff the reference's Philox
keeps (b, h, i, j) (the reference generator itself is first checked against pyllm.reference's values).
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
  float* slopes = nullptr;
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
    if (!in.slopes.empty()) {
      CUDA_CHECK(cudaMalloc(&slopes, in.slopes.size() * 4));
      CUDA_CHECK(cudaMemcpy(slopes, in.slopes.data(), in.slopes.size() * 4, cudaMemcpyHostToDevice));
    }
    p.feat = features_of(c, slopes);
  }
  ~DeviceFwd() {
    cudaFree(q), cudaFree(k), cudaFree(v), cudaFree(out), cudaFree(lse);
    if (mask) cudaFree(mask);
    if (slopes) cudaFree(slopes);
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

// q = 0 (uniform probabilities), v[b, j, h, :] = e_j: out[b, i, h, j] = keep_bhij / (Nk (1 - p)), so the
// kept set is read off exactly and compared with the reference generator's.
static bool dropout_mask_exact(DType t, std::mt19937& rng) {
  AttnCase c{2, 37, 53, 3, 3, 64, false, false, false, t};
  c.dropout = 0.3f;
  std::printf("  dropout mask: B=%d Nq=%d Nk=%d H=%d p=%g %s, exact match with the reference Philox mask\n", c.B,
              c.Nq, c.Nk, c.Hq, c.dropout, dtype_name(t));
  AttnInputs in(c, rng);
  for (size_t i = 0; i < in.q.f.size(); ++i) in.q.set(i, 0.f);
  for (int b = 0; b < c.B; ++b)
    for (int j = 0; j < c.Nk; ++j)
      for (int h = 0; h < c.Hkv; ++h)
        for (int d = 0; d < c.D; ++d) in.v.set(b * in.sk.b + j * in.sk.n + h * in.sk.h + d, d == j ? 1.f : 0.f);
  DeviceFwd dev(c, in);
  CUDA_CHECK(pyllm::cuda::attention_fwd(dev.p, c.dtype, 0));
  CUDA_CHECK(cudaDeviceSynchronize());
  const auto out = download(dev.out, size_t(c.B) * c.Nq * c.Hq * c.D, c.dtype);
  size_t wrong = 0, dropped = 0, n = 0;
  for (int b = 0; b < c.B; ++b)
    for (int i = 0; i < c.Nq; ++i)
      for (int h = 0; h < c.Hq; ++h)
        for (int j = 0; j < c.Nk; ++j, ++n) {
          const bool kept = dropout_factor(c, b, h, i, j) != 0.0;
          dropped += !kept;
          wrong += kept != (out[((size_t(b) * c.Nq + i) * c.Hq + h) * c.D + j] != 0.f);
        }
  std::printf("    mask  %s (%zu/%zu differ; %.3f dropped)\n", wrong ? "FAIL" : "ok  ", wrong, n, double(dropped) / n);
  return wrong == 0;
}

static void bench(int B, int H, int Hkv, int N, int D, bool causal, DType t, std::mt19937& rng, bool once = false,
                  const char* feature = nullptr, int window_left = -1, float dropout = 0.f) {
  AttnCase c{B, N, N, H, Hkv, D, causal, false, false, t};
  c.window_left = window_left, c.dropout = dropout;
  AttnInputs in(c, rng, /*fast=*/true);
  DeviceFwd dev(c, in);
  if (once) {  // --profile: a single launch for ncu
    CUDA_CHECK(pyllm::cuda::attention_fwd(dev.p, t, 0));
    CUDA_CHECK(cudaDeviceSynchronize());
    return;
  }
  const float ms = time_ms([&] { CUDA_CHECK(pyllm::cuda::attention_fwd(dev.p, t, 0)); });
  const double flops = 4.0 * B * H * double(N) * N * D / (causal ? 2.0 : 1.0);
  if (feature) {  // the work depends on the feature: time only
    std::printf("  %s B=%d H=%d Hkv=%d N=%d D=%d %-6s %s %8.3f ms\n", dtype_name(t), B, H, Hkv, N, D,
                causal ? "causal" : "full", feature, ms);
  } else {
    std::printf("  %s B=%d H=%d Hkv=%d N=%d D=%d %-6s %8.3f ms  %7.1f TFLOP/s\n", dtype_name(t), B, H, Hkv, N, D,
                causal ? "causal" : "full", ms, flops / ms / 1e9);
  }
  std::fflush(stdout);
}

int main(int argc, char** argv) {
  bool do_bench, profile, quick;
  parse_options(argc, argv, do_bench, profile, quick);
  print_device();
  std::mt19937 rng(1234);
  if (profile) {
    bench(4, 16, 16, 4096, 128, false, DType::kBFloat16, rng, /*once=*/true);
    return 0;
  }
  int failed = 0, total = 0;
  std::printf("validation (attention_fwd vs CPU reference):\n");
  validate_all(quick, failed, total, [&](const AttnCase& c) { return validate(c, rng); });
  for (DType t : {DType::kFloat16, DType::kBFloat16}) {
    if (quick && t != DType::kFloat16) continue;
    ++total;
    if (!dropout_mask_exact(t, rng)) ++failed;
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
    // features: a window of 256 costs O(N w) (compare N = 512 full causal per query); dropout's Philox
    bench(1, 16, 16, 8192, 128, true, DType::kBFloat16, rng, false, "window=(256,0)", 256);
    bench(1, 16, 16, 512, 128, true, DType::kBFloat16, rng, false, "(N=512 reference for the window)");
    bench(4, 16, 16, 2048, 128, false, DType::kBFloat16, rng, false, "dropout=0.1", -1, 0.1f);
  }
  return failed ? 1 : 0;
}
