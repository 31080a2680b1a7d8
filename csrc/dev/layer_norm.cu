/*
LayerNorm / RMSNorm with fused residual (csrc/cuda/layer_norm.cu), forward and backward: validate
against a CPU reference, then time.

Build and run (from the repository root):
  nvcc -O3 -std=c++17 -arch=sm_90 -Icsrc/cuda -Icsrc/dev csrc/dev/layer_norm.cu csrc/cuda/layer_norm.cu \
       -o /tmp/layer_norm && /tmp/layer_norm
or with CMake: cmake --build build/cuda -j && build/cuda/layer_norm
Options: --no-bench (validation only). Exit status 1 when any case fails (the timings still run).

Reference: double precision from the same rounded inputs; h = x + residual rounded to x's dtype (as
torch's add). Tolerance atol * max|ref| + rtol * |ref|: fp32 1e-5 / 1e-4, fp16 1e-3 / 2e-3,
bf16 8e-3 / 1.6e-2 (dweight/dbias: fp32 sums of M rows, checked with the same rule).
Timing: CUDA events, L2 flushed before every repeat; GB/s counts x, residual, dy, dh reads and y, h, dx
writes once (weights and row statistics are negligible).
*/
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "harness.h"
#include "kernels.h"

using namespace harness;

struct NormCase {
  int64_t M, N;
  DType dtype, wdtype;
  bool rms, residual, weight, bias, dh;
  int64_t row_pad;  // x/dy/h/residual/dh rows are N + row_pad apart (0: contiguous)
};

static void print_case(const NormCase& c) {
  std::printf("  M=%lld N=%lld %s w:%s %s%s%s%s%s row_stride=%lld\n", (long long)c.M, (long long)c.N, dtype_name(c.dtype),
              c.weight || c.bias ? dtype_name(c.wdtype) : "-", c.rms ? "rms" : "layernorm", c.residual ? " residual" : "",
              c.weight ? " weight" : "", c.bias ? " bias" : "", c.dh ? " dh" : "", (long long)(c.N + c.row_pad));
}

static double tol_a(DType t) { return t == DType::kFloat32 ? 1e-5 : t == DType::kFloat16 ? 1e-3 : 8e-3; }
static double tol_r(DType t) { return t == DType::kFloat32 ? 1e-4 : t == DType::kFloat16 ? 2e-3 : 1.6e-2; }

static double max_abs(const std::vector<double>& x) {
  double m = 0.0;
  for (double v : x) m = std::max(m, std::fabs(v));
  return m;
}

static bool check(const char* what, const std::vector<float>& got, const std::vector<double>& ref, DType t) {
  return check_close(what, got, ref, tol_a(t) * std::max(1.0, max_abs(ref)), tol_r(t));
}

static bool validate(const NormCase& c, std::mt19937& rng) {
  print_case(c);
  const int64_t M = c.M, N = c.N, ld = N + c.row_pad;
  HostTensor x(c.dtype, M * ld), r(c.dtype, M * ld), dy(c.dtype, M * ld), dh(c.dtype, M * ld);
  HostTensor w(c.wdtype, N), b(c.wdtype, N);
  x.randn(rng, 2.f);
  for (size_t i = 0; i < x.f.size(); ++i) x.set(i, x.f[i] + 0.5f);  // nonzero mean
  r.randn(rng);
  dy.randn(rng);
  dh.randn(rng);
  w.randn(rng);
  b.randn(rng);

  // Reference forward.
  HostTensor h(c.dtype, M * N);  // x + residual rounded to dtype (contiguous)
  std::vector<double> y_ref(M * N), h_ref(M * N), mean_ref(M), rstd_ref(M);
  std::vector<float> mean_f(M), rstd_f(M);
  for (int64_t i = 0; i < M; ++i) {
    for (int64_t j = 0; j < N; ++j) h.set(i * N + j, c.residual ? x.f[i * ld + j] + r.f[i * ld + j] : x.f[i * ld + j]);
    double mean = 0.0, var = 0.0;
    if (!c.rms) {
      for (int64_t j = 0; j < N; ++j) mean += h.f[i * N + j];
      mean /= double(N);
    }
    for (int64_t j = 0; j < N; ++j) var += (h.f[i * N + j] - mean) * (h.f[i * N + j] - mean);
    const double rstd = 1.0 / std::sqrt(var / double(N) + 1e-5);
    mean_ref[i] = mean, rstd_ref[i] = rstd, mean_f[i] = float(mean), rstd_f[i] = float(rstd);
    for (int64_t j = 0; j < N; ++j) {
      double t = (h.f[i * N + j] - mean) * rstd;
      if (c.weight) t *= w.f[j];
      if (c.bias && !c.rms) t += b.f[j];
      y_ref[i * N + j] = t;
      h_ref[i * N + j] = h.f[i * N + j];
    }
  }

  // Device forward.
  void *dx_ = upload(x), *dr = upload(r), *dw = upload(w), *db = upload(b);
  void *dyv, *dhv, *dmean, *drstd;
  const size_t es = dtype_size(c.dtype);
  CUDA_CHECK(cudaMalloc(&dyv, M * N * es + 16));
  CUDA_CHECK(cudaMalloc(&dhv, M * N * es + 16));
  CUDA_CHECK(cudaMalloc(&dmean, M * 4 + 16));
  CUDA_CHECK(cudaMalloc(&drstd, M * 4 + 16));
  pyllm::cuda::LayerNormFwdParams fp{};
  fp.x = dx_, fp.residual = c.residual ? dr : nullptr, fp.weight = c.weight ? dw : nullptr, fp.bias = c.bias ? db : nullptr;
  fp.y = dyv, fp.h = c.residual ? dhv : nullptr, fp.mean = c.rms ? nullptr : static_cast<float*>(dmean);
  fp.rstd = static_cast<float*>(drstd);
  fp.M = M, fp.N = N, fp.x_row_stride = ld, fp.residual_row_stride = ld, fp.eps = 1e-5f, fp.rms = c.rms;
  CUDA_CHECK(pyllm::cuda::layer_norm_fwd(fp, c.dtype, c.wdtype, 0));
  CUDA_CHECK(cudaDeviceSynchronize());
  bool ok = check("y", download(dyv, M * N, c.dtype), y_ref, c.dtype);
  if (c.residual) ok &= check("h", download(dhv, M * N, c.dtype), h_ref, c.dtype);
  if (!c.rms) ok &= check_close("mean", download(dmean, M, DType::kFloat32), mean_ref, 1e-5, 1e-5);
  ok &= check_close("rstd", download(drstd, M, DType::kFloat32), rstd_ref, 1e-6, 1e-4);

  // Reference backward, from the rounded h and the float statistics the kernel receives.
  std::vector<double> dx_ref(M * N), dw_ref(N, 0.0), db_ref(N, 0.0);
  for (int64_t i = 0; i < M; ++i) {
    const double mean = c.rms ? 0.0 : mean_f[i], rstd = rstd_f[i];
    double s1 = 0.0, s2 = 0.0;
    for (int64_t j = 0; j < N; ++j) {
      const double g = dy.f[i * ld + j], xhat = (h.f[i * N + j] - mean) * rstd, wg = c.weight ? w.f[j] * g : g;
      s1 += wg * xhat, s2 += wg;
      dw_ref[j] += g * xhat, db_ref[j] += g;
    }
    s1 /= double(N), s2 = c.rms ? 0.0 : s2 / double(N);
    for (int64_t j = 0; j < N; ++j) {
      const double g = dy.f[i * ld + j], xhat = (h.f[i * N + j] - mean) * rstd, wg = c.weight ? w.f[j] * g : g;
      dx_ref[i * N + j] = (wg - (xhat * s1 + s2)) * rstd + (c.dh ? dh.f[i * ld + j] : 0.0);
    }
  }

  // Device backward: h uploaded with the padded row stride to exercise strided rows.
  HostTensor h_pad(c.dtype, M * ld);
  for (int64_t i = 0; i < M; ++i)
    for (int64_t j = 0; j < N; ++j) h_pad.set(i * ld + j, h.f[i * N + j]);
  void *d_dy = upload(dy), *d_h = upload(h_pad), *d_dh = upload(dh), *d_dx, *d_dw, *d_db;
  float *d_mean = nullptr, *d_rstd = nullptr, *ws = nullptr;
  CUDA_CHECK(cudaMalloc(&d_dx, M * N * es + 16));
  CUDA_CHECK(cudaMalloc(&d_dw, N * 4 + 16));
  CUDA_CHECK(cudaMalloc(&d_db, N * 4 + 16));
  CUDA_CHECK(cudaMalloc(&d_mean, M * 4 + 16));
  CUDA_CHECK(cudaMalloc(&d_rstd, M * 4 + 16));
  CUDA_CHECK(cudaMemcpy(d_mean, mean_f.data(), M * 4, cudaMemcpyHostToDevice));
  CUDA_CHECK(cudaMemcpy(d_rstd, rstd_f.data(), M * 4, cudaMemcpyHostToDevice));
  const size_t wsn = pyllm::cuda::layer_norm_bwd_workspace_floats(M, N);
  CUDA_CHECK(cudaMalloc(&ws, wsn * 4 + 16));
  const bool want_db = c.bias && !c.rms;
  pyllm::cuda::LayerNormBwdParams bp{};
  bp.dy = d_dy, bp.h = d_h, bp.weight = c.weight ? dw : nullptr, bp.mean = c.rms ? nullptr : d_mean, bp.rstd = d_rstd;
  bp.dh = c.dh ? d_dh : nullptr, bp.dx = d_dx, bp.dweight = c.weight ? d_dw : nullptr, bp.dbias = want_db ? d_db : nullptr;
  bp.workspace = ws, bp.M = M, bp.N = N, bp.dy_row_stride = ld, bp.h_row_stride = ld, bp.dh_row_stride = ld, bp.rms = c.rms;
  const DType wt = c.weight ? c.wdtype : (want_db ? c.wdtype : c.dtype);
  CUDA_CHECK(pyllm::cuda::layer_norm_bwd(bp, c.dtype, wt, 0));
  CUDA_CHECK(cudaDeviceSynchronize());
  ok &= check("dx", download(d_dx, M * N, c.dtype), dx_ref, c.dtype);
  if (c.weight) ok &= check("dw", download(d_dw, N, c.wdtype), dw_ref, c.wdtype);
  if (want_db) ok &= check("db", download(d_db, N, c.wdtype), db_ref, c.wdtype);

  for (void* p : {dx_, dr, dw, db, dyv, dhv, dmean, drstd, d_dy, d_h, d_dh, d_dx, d_dw, d_db}) cudaFree(p);
  cudaFree(d_mean), cudaFree(d_rstd), cudaFree(ws);
  return ok;
}

static void bench(int64_t M, int64_t N, DType t, bool rms, std::mt19937& rng) {
  HostTensor x(t, M * N), r(t, M * N), w(t, N), b(t, N);
  x.fill_fast(rng(), 2.f), r.fill_fast(rng()), w.fill_fast(rng()), b.fill_fast(rng());
  void *dx_ = upload(x), *dr = upload(r), *dw = upload(w), *db = upload(b), *y, *h, *dx, *dwo, *dbo;
  float *mean, *rstd, *ws;
  const size_t es = dtype_size(t);
  CUDA_CHECK(cudaMalloc(&y, M * N * es));
  CUDA_CHECK(cudaMalloc(&h, M * N * es));
  CUDA_CHECK(cudaMalloc(&dx, M * N * es));
  CUDA_CHECK(cudaMalloc(&dwo, N * es));
  CUDA_CHECK(cudaMalloc(&dbo, N * es));
  CUDA_CHECK(cudaMalloc(&mean, M * 4));
  CUDA_CHECK(cudaMalloc(&rstd, M * 4));
  CUDA_CHECK(cudaMalloc(&ws, pyllm::cuda::layer_norm_bwd_workspace_floats(M, N) * 4));
  pyllm::cuda::LayerNormFwdParams fp{};
  fp.x = dx_, fp.residual = dr, fp.weight = dw, fp.bias = rms ? nullptr : db, fp.y = y, fp.h = h;
  fp.mean = rms ? nullptr : mean, fp.rstd = rstd, fp.M = M, fp.N = N, fp.x_row_stride = N, fp.residual_row_stride = N;
  fp.eps = 1e-5f, fp.rms = rms;
  const float fwd_ms = time_ms([&] { CUDA_CHECK(pyllm::cuda::layer_norm_fwd(fp, t, t, 0)); });
  pyllm::cuda::LayerNormBwdParams bp{};
  bp.dy = y, bp.h = h, bp.weight = dw, bp.mean = rms ? nullptr : mean, bp.rstd = rstd, bp.dh = dr, bp.dx = dx;
  bp.dweight = dwo, bp.dbias = rms ? nullptr : dbo, bp.workspace = ws, bp.M = M, bp.N = N;
  bp.dy_row_stride = N, bp.h_row_stride = N, bp.dh_row_stride = N, bp.rms = rms;
  const float bwd_ms = time_ms([&] { CUDA_CHECK(pyllm::cuda::layer_norm_bwd(bp, t, t, 0)); });
  const double row_bytes = double(M) * N * es;
  std::printf("  %s %-9s M=%lld N=%-6lld fwd %7.3f ms %6.0f GB/s   bwd %7.3f ms %6.0f GB/s\n", dtype_name(t),
              rms ? "rmsnorm" : "layernorm", (long long)M, (long long)N, fwd_ms, 4 * row_bytes / fwd_ms / 1e6, bwd_ms,
              4 * row_bytes / bwd_ms / 1e6);
  for (void* p : {dx_, dr, dw, db, y, h, dx, dwo, dbo}) cudaFree(p);
  cudaFree(mean), cudaFree(rstd), cudaFree(ws);
}

int main(int argc, char** argv) {
  bool do_bench = true;
  for (int i = 1; i < argc; ++i)
    if (!std::strcmp(argv[i], "--no-bench")) do_bench = false;
  print_device();
  std::mt19937 rng(7);
  const DType f32 = DType::kFloat32, f16 = DType::kFloat16, b16 = DType::kBFloat16;
  const std::vector<NormCase> cases = {
      // M, N, dtype, weight dtype, rms, residual, weight, bias, dh, row_pad
      {37, 768, f32, f32, false, false, true, true, false, 0},
      {37, 768, f16, f16, false, true, true, true, true, 0},
      {37, 768, b16, f32, false, true, true, true, false, 8},
      {64, 1000, b16, b16, true, true, true, false, true, 0},
      {5, 7, f16, f16, false, false, true, true, false, 3},      // tiny, unaligned rows: scalar path
      {3, 1, f32, f32, false, false, false, false, false, 0},    // N = 1: y = 0, rstd = 1/sqrt(eps)
      {300, 1536, f16, f32, true, false, true, false, false, 0},  // row per block
      {17, 4099, b16, f32, false, true, true, true, true, 5},
      {9, 8192, f16, f16, false, true, true, true, false, 0},
      {600, 320, f32, f32, false, false, false, true, true, 0},  // many rows, bias only
      {3, 40000, f16, f32, false, true, true, true, true, 0},    // column sums too big for shared memory
      {5, 12000, f32, f32, false, false, true, true, false, 0},  // 96 KB of opt-in shared memory
      {5000, 64, b16, f32, false, false, true, true, false, 0},  // 1250 partial rows (more than 256 blocks)
  };
  int failed = 0;
  std::printf("validation (layer_norm fwd/bwd vs CPU reference):\n");
  for (const NormCase& c : cases)
    if (!validate(c, rng)) ++failed;
  std::printf("%d/%zu cases passed\n", int(cases.size()) - failed, cases.size());
  std::fflush(stdout);
  if (do_bench) {
    std::printf("benchmark (L2 flushed between repeats)%s:\n", failed ? " -- VALIDATION FAILED, timed anyway" : "");
    for (DType t : {b16, f16})
      for (int64_t N : {768, 1024, 4096, 8192}) bench(16384, N, t, false, rng);
    bench(16384, 4096, b16, true, rng);
    bench(16384, 4096, f32, false, rng);
    bench(1024, 4096, b16, false, rng);  // few rows: the dweight/dbias reduction dominates
  }
  return failed ? 1 : 0;
}
