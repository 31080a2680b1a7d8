/*
FlashAttention-2 backward (csrc/cuda/attention.cu): validate dq, dk, dv against a CPU reference, in both
the atomic (default) and the deterministic mode, check that deterministic mode is bitwise reproducible,
then time both modes. GQA cases (groups 2, 4, 8) run with the launcher's group split and with forced
splits 1, 2 and the whole group (the dK/dV partials' reduction, deterministic and atomic); the feature
cases (window, softcap, ALiBi, dropout) check the gradients through each feature.

Build and run (from the repository root):
  nvcc -O3 -std=c++17 -arch=sm_90 -Icsrc/cuda -Icsrc/dev csrc/dev/attention_bwd.cu csrc/cuda/attention.cu \
       -o /tmp/attention_bwd && /tmp/attention_bwd
or with CMake: cmake --build build/cuda -j && build/cuda/attention_bwd
Options: --no-bench (validation only); --profile (no validation, one backward of a D=128 case: for ncu);
--quick (validation of the fp16 cases with the launcher's group split only, no rerun: for compute-sanitizer).
Exit status 1 when any case fails (the timings still run).

The forward pass that produces out and lse is the CUDA kernel itself (validated by attention_fwd).
Tolerance: atol * max|ref| + rtol * |ref| with fp16 2e-3 / 1e-2, bf16 1.6e-2 / 5e-2 (P and dS are
rounded to the input dtype before their tensor-core products).
Timing: TFLOP/s with FlashAttention's backward count 2.5 x the forward's (10 * B * H * Nq * Nk * D,
halved for causal).
*/
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "attention_ref.h"
#include "harness.h"
#include "kernels.h"

using namespace harness;

struct DeviceBwd {
  void *q, *k, *v, *out, *dout, *dq, *dk, *dv;
  float *lse, *delta, *dq_accum, *dkv_accum;
  uint8_t* mask = nullptr;
  float* slopes = nullptr;
  pyllm::cuda::AttentionFwdParams fp{};
  pyllm::cuda::AttentionBwdParams bp{};

  DeviceBwd(const AttnCase& c, const AttnInputs& in, const HostTensor& g) {
    const size_t es = dtype_size(c.dtype);
    const size_t nq = size_t(c.B) * c.Nq * c.Hq * c.D, nk = size_t(c.B) * c.Nk * c.Hkv * c.D;
    const size_t nl = size_t(c.B) * c.Hq * c.Nq;
    q = upload(in.q), k = upload(in.k), v = upload(in.v), dout = upload(g);
    CUDA_CHECK(cudaMalloc(&out, std::max<size_t>(16, nq * es)));
    CUDA_CHECK(cudaMalloc(&dq, std::max<size_t>(16, nq * es)));
    CUDA_CHECK(cudaMalloc(&dk, std::max<size_t>(16, nk * es)));
    CUDA_CHECK(cudaMalloc(&dv, std::max<size_t>(16, nk * es)));
    CUDA_CHECK(cudaMalloc(&lse, std::max<size_t>(16, nl * 4)));
    CUDA_CHECK(cudaMalloc(&delta, std::max<size_t>(16, nl * 4)));
    CUDA_CHECK(cudaMalloc(&dq_accum, std::max<size_t>(16, nq * 4)));
    // the largest GQA workspace: one fp32 dk and dv partial per query head of a group
    CUDA_CHECK(cudaMalloc(&dkv_accum, std::max<size_t>(16, 2 * nk * (c.Hq / c.Hkv) * 4)));
    if (!in.mask.empty()) {
      CUDA_CHECK(cudaMalloc(&mask, in.mask.size()));
      CUDA_CHECK(cudaMemcpy(mask, in.mask.data(), in.mask.size(), cudaMemcpyHostToDevice));
    }
    const int64_t ob = int64_t(c.Nq) * c.Hq * c.D, on = int64_t(c.Hq) * c.D, oh = c.D;
    fp.q = q, fp.k = k, fp.v = v, fp.out = out, fp.lse = lse, fp.key_padding_mask = mask, fp.mask_stride_b = c.Nk;
    fp.batch = c.B, fp.seqlen_q = c.Nq, fp.seqlen_k = c.Nk, fp.heads_q = c.Hq, fp.heads_kv = c.Hkv, fp.head_dim = c.D;
    fp.q_stride_b = in.sq.b, fp.q_stride_n = in.sq.n, fp.q_stride_h = in.sq.h;
    fp.k_stride_b = in.sk.b, fp.k_stride_n = in.sk.n, fp.k_stride_h = in.sk.h;
    fp.v_stride_b = in.sk.b, fp.v_stride_n = in.sk.n, fp.v_stride_h = in.sk.h;
    fp.out_stride_b = ob, fp.out_stride_n = on, fp.out_stride_h = oh;
    fp.softmax_scale = in.scale, fp.causal = c.causal;

    bp.dout = dout, bp.q = q, bp.k = k, bp.v = v, bp.out = out, bp.lse = lse;
    bp.key_padding_mask = mask, bp.mask_stride_b = c.Nk;
    bp.dq = dq, bp.dk = dk, bp.dv = dv, bp.delta = delta, bp.dq_accum = dq_accum;
    bp.batch = c.B, bp.seqlen_q = c.Nq, bp.seqlen_k = c.Nk, bp.heads_q = c.Hq, bp.heads_kv = c.Hkv, bp.head_dim = c.D;
    bp.dout_stride_b = in.sq.b, bp.dout_stride_n = in.sq.n, bp.dout_stride_h = in.sq.h;
    bp.q_stride_b = in.sq.b, bp.q_stride_n = in.sq.n, bp.q_stride_h = in.sq.h;
    bp.k_stride_b = in.sk.b, bp.k_stride_n = in.sk.n, bp.k_stride_h = in.sk.h;
    bp.v_stride_b = in.sk.b, bp.v_stride_n = in.sk.n, bp.v_stride_h = in.sk.h;
    bp.out_stride_b = ob, bp.out_stride_n = on, bp.out_stride_h = oh;
    bp.softmax_scale = in.scale, bp.causal = c.causal;
    bp.dkv_accum = dkv_accum;
    if (!in.slopes.empty()) {
      CUDA_CHECK(cudaMalloc(&slopes, in.slopes.size() * 4));
      CUDA_CHECK(cudaMemcpy(slopes, in.slopes.data(), in.slopes.size() * 4, cudaMemcpyHostToDevice));
    }
    fp.feat = bp.feat = features_of(c, slopes);
  }
  ~DeviceBwd() {
    for (void* ptr : {q, k, v, out, dout, dq, dk, dv}) cudaFree(ptr);
    cudaFree(lse), cudaFree(delta), cudaFree(dq_accum), cudaFree(dkv_accum);
    if (mask) cudaFree(mask);
    if (slopes) cudaFree(slopes);
  }
};

static bool validate(const AttnCase& c, std::mt19937& rng, bool quick) {
  print_case(c);
  AttnInputs in(c, rng);
  HostTensor g(c.dtype, in.q.f.size());  // dout, stored with q's layout
  g.randn(rng);
  DeviceBwd dev(c, in, g);
  CUDA_CHECK(pyllm::cuda::attention_fwd(dev.fp, c.dtype, 0));
  std::vector<double> out_ref, lse_ref, dq_ref, dk_ref, dv_ref;
  attention_fwd_ref(c, in, out_ref, lse_ref);
  attention_bwd_ref(c, in, g, lse_ref, dq_ref, dk_ref, dv_ref);
  const bool bf = c.dtype == DType::kBFloat16;
  const double a = bf ? 1.6e-2 : 2e-3, r = bf ? 5e-2 : 1e-2;
  bool ok = true;
  // GQA: the launcher's group split (0), then forced splits 1, 2 and the whole group
  const int group = c.Hq / c.Hkv;
  std::vector<int> splits = {0};
  if (group > 1 && !quick) {
    splits.push_back(1);
    if (group > 2 && group % 2 == 0) splits.push_back(2);
    splits.push_back(group);
  }
  for (int split : splits) {
    dev.bp.group_split = split;
    if (group > 1)
      std::printf("   group split %d%s:\n", pyllm::cuda::attention_bwd_group_split(dev.bp), split ? " (forced)" : "");
    std::vector<float> first_dq, first_dk, first_dv;
    for (int mode = 0; mode < (quick ? 2 : 3); ++mode) {  // atomic, deterministic, deterministic again
      dev.bp.deterministic = mode > 0;
      // NaN poison: every element of dq, dk, dv must be written
      CUDA_CHECK(cudaMemset(dev.dq, 0xff, std::max<size_t>(16, dq_ref.size() * dtype_size(c.dtype))));
      CUDA_CHECK(cudaMemset(dev.dk, 0xff, std::max<size_t>(16, dk_ref.size() * dtype_size(c.dtype))));
      CUDA_CHECK(cudaMemset(dev.dv, 0xff, std::max<size_t>(16, dv_ref.size() * dtype_size(c.dtype))));
      CUDA_CHECK(pyllm::cuda::attention_bwd(dev.bp, c.dtype, 0));
      CUDA_CHECK(cudaDeviceSynchronize());
      const auto dq = download(dev.dq, dq_ref.size(), c.dtype);
      const auto dk = download(dev.dk, dk_ref.size(), c.dtype);
      const auto dv = download(dev.dv, dv_ref.size(), c.dtype);
      if (mode < 2) {
        std::printf("   %s:\n", mode == 0 ? "atomic dq" : "deterministic");
        ok &= check_close("dq", dq, dq_ref, a * std::max(1.0, max_abs(dq_ref)), r);
        ok &= check_close("dk", dk, dk_ref, a * std::max(1.0, max_abs(dk_ref)), r);
        ok &= check_close("dv", dv, dv_ref, a * std::max(1.0, max_abs(dv_ref)), r);
      }
      if (mode == 1) first_dq = dq, first_dk = dk, first_dv = dv;
      if (mode == 2) {
        const bool same = std::memcmp(first_dq.data(), dq.data(), dq.size() * 4) == 0 &&
                          std::memcmp(first_dk.data(), dk.data(), dk.size() * 4) == 0 &&
                          std::memcmp(first_dv.data(), dv.data(), dv.size() * 4) == 0;
        std::printf("    deterministic rerun %s\n", same ? "bitwise identical" : "DIFFERS");
        ok &= same;
      }
    }
  }
  return ok;
}

static void bench(int B, int H, int Hkv, int N, int D, bool causal, bool deterministic, DType t, std::mt19937& rng,
                  bool once = false) {
  const AttnCase c{B, N, N, H, Hkv, D, causal, false, false, t};
  AttnInputs in(c, rng, /*fast=*/true);
  HostTensor g(t, in.q.f.size());
  g.fill_fast(rng());
  DeviceBwd dev(c, in, g);
  CUDA_CHECK(pyllm::cuda::attention_fwd(dev.fp, t, 0));
  dev.bp.deterministic = deterministic;
  if (once) {  // --profile: a single backward for ncu
    CUDA_CHECK(pyllm::cuda::attention_bwd(dev.bp, t, 0));
    CUDA_CHECK(cudaDeviceSynchronize());
    return;
  }
  const float ms = time_ms([&] { CUDA_CHECK(pyllm::cuda::attention_bwd(dev.bp, t, 0)); }, 10);
  const double flops = 10.0 * B * H * double(N) * N * D / (causal ? 2.0 : 1.0);
  std::printf("  %s B=%d H=%d Hkv=%d N=%d D=%d %-6s %-13s %8.3f ms  %7.1f TFLOP/s\n", dtype_name(t), B, H, Hkv, N,
              D, causal ? "causal" : "full", deterministic ? "deterministic" : "atomic", ms, flops / ms / 1e9);
  std::fflush(stdout);
}

int main(int argc, char** argv) {
  bool do_bench, profile, quick;
  parse_options(argc, argv, do_bench, profile, quick);
  print_device();
  std::mt19937 rng(4321);
  if (profile) {
    bench(4, 16, 16, 4096, 128, false, false, DType::kBFloat16, rng, /*once=*/true);
    return 0;
  }
  int failed = 0, total = 0;
  std::printf("validation (attention_bwd vs CPU reference):\n");
  validate_all(quick, failed, total, [&](const AttnCase& c) { return validate(c, rng, quick); });
  std::printf("%d/%d cases passed\n", total - failed, total);
  std::fflush(stdout);
  if (do_bench) {
    std::printf("benchmark (L2 flushed between repeats)%s:\n", failed ? " -- VALIDATION FAILED, timed anyway" : "");
    for (int D : {64, 128})
      for (bool causal : {false, true})
        for (bool det : {false, true}) bench(4, 16, 16, 2048, D, causal, det, DType::kBFloat16, rng);
    bench(1, 16, 16, 16384, 128, true, false, DType::kBFloat16, rng);
    bench(1, 32, 4, 8192, 128, true, false, DType::kBFloat16, rng);  // GQA 8:1
    bench(1, 32, 4, 8192, 128, true, true, DType::kBFloat16, rng);
  }
  return failed ? 1 : 0;
}
