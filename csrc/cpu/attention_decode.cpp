// Flash-decoding on the CPU (issue 15): attention forward for few query rows and many keys.
//
// With Nq small (a generation step: Nq = 1) the blocked kernel of attention.cpp does one query block per
// (batch, head) and packs K/V into fp32 tiles on every call. Here, per task (batch b, group of kv heads,
// key split s), sub-chunk by sub-chunk of the split's keys and, inside, kv head by kv head (the heads are the
// inner loop, so a thread reads one key range of all its heads as one sweep, which the hardware prefetchers
// follow: a decode step is bound by reading K and V, see benchmarks/bench_decode_roofline.py):
//
//   the R = (Hq / Hkv) Nq query rows that read kv head g share each K/V read (GQA); per row, 16 scores at
//   a time (16 dot products, one transpose-add tree, no horizontal sum per key), an online softmax (running
//   max m, sum l, unnormalized acc), and acc += p_j v_j with V widened to fp32 in registers.
//   Threads divide the tasks by batch first; when those do not divide evenly, by smaller head groups (fewer
//   than 512 keys: no combine) or key splits (flash-decoding), combined by one log-sum-exp:
//   M = max m_s, L = sum l_s e^(m_s - M), out = sum acc_s e^(m_s - M) / L, lse = M + log L.
//
// Precision: fp32 products and sums for fp32; fp16 and bf16 are widened in registers (never copied to fp32
// buffers), and on a CPU with AVX512-BF16 the bf16 q.k products run as vdpbf16ps (bf16 x bf16 is exact in
// fp32, accumulated in fp32). The kernel is compiled for AVX-512 by #pragma GCC target whatever -march the
// build uses, and runs only when the CPU reports the instructions (runtime dispatch below); everywhere else,
// and for fp64, attention.cpp's blocked kernel serves the call.

#include "attention_decode.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define PYLLM_DECODE_X86 1
#else
#define PYLLM_DECODE_X86 0
#endif

namespace pyllm::cpu {

struct DecodeProblem {
  int64_t B, Nq, Nk, Hq, Hkv, D;
  bool causal;
  float scale;
  const bool* mask;             // (B, Nk) contiguous, or nullptr
  int64_t sq[3], sk[3], sv[3];  // strides of dims 0..2 in elements (dim 3 is contiguous)
  int64_t nsplit;               // key ranges per (batch, head group), combined by log-sum-exp when > 1
  int64_t hg;                   // kv heads per task (a group): their running softmax state stays in L1
  int64_t kc;                   // keys per sub-chunk (a multiple of 16): one head's K, V rows stay in L1
  bool parallel;                // at::parallel_for over the tasks, or the calling thread alone
};

#if PYLLM_DECODE_X86
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c")
namespace decode_avx512 {
#define PYLLM_DECODE_BF16_DOT 0
#include "attention_decode_kernel.inc"
#undef PYLLM_DECODE_BF16_DOT
}  // namespace decode_avx512
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c,avx512bf16")
namespace decode_avx512_bf16 {
#define PYLLM_DECODE_BF16_DOT 1
#include "attention_decode_kernel.inc"
#undef PYLLM_DECODE_BF16_DOT
}  // namespace decode_avx512_bf16
#pragma GCC pop_options
#endif

namespace {

struct Cpu {
  bool avx512 = false, bf16 = false;
};

const Cpu& cpu() {
  static const Cpu c = [] {
    Cpu x;
#if PYLLM_DECODE_X86
    __builtin_cpu_init();
    x.avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
               __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
               __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    x.bf16 = x.avx512 && __builtin_cpu_supports("avx512bf16");
#endif
    return x;
  }();
  return c;
}

}  // namespace

bool attention_decode_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                          const std::optional<at::Tensor>& key_padding_mask, bool causal, double softmax_scale,
                          std::tuple<at::Tensor, at::Tensor>& result) {
#if !PYLLM_DECODE_X86
  return false;
#else
  const auto dt = q.scalar_type();
  const int64_t B = q.size(0), Nq = q.size(1), Hq = q.size(2), D = q.size(3), Nk = k.size(1), Hkv = k.size(2);
  // Few query rows per kv head (the blocked kernel's matrix products win beyond), head_dim <= 256.
  // PYLLM_CPU_DECODE=0 leaves every call to the blocked kernel (A/B timing, tests); read per call, it is cheap.
  const char* env = std::getenv("PYLLM_CPU_DECODE");
  if (env != nullptr && env[0] == '0') return false;
  if (!cpu().avx512 || !(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16) || Nq > 16 ||
      (Hq / Hkv) * Nq > 32 || D > 256 || B == 0 || Nq == 0 || Hq == 0 || Nk == 0)
    return false;
  if ((q.stride(3) != 1 && D > 1) || (k.stride(3) != 1 && D > 1) || (v.stride(3) != 1 && D > 1)) return false;
  // fp16/bf16: the per-row cost grows with Nq (no K reuse across query rows; the dot products are compute-bound),
  // while the blocked kernel's matrix products share each K/V tile. Measured (B1 H12 D64, 2 threads, 2026-11-30):
  // decode wins to Nq 4 at Nk 16 (29 vs 37 us), to Nq 8 from Nk 128 (85 vs 88 us); at Nq 16 the blocked kernel
  // does (43 vs 86 us at Nk 16, 97 vs 178 at Nk 128, even at Nk 1024).
  if (dt != at::kFloat && (Nq > 8 || (Nq > 4 && Nk < 128))) return false;
  // fp32 likewise beyond 8 rows (B1 H12 D64, 2 threads, Emerald Rapids, 2026-11-30): at Nq 12 and 16 the blocked
  // kernel took 26-29 vs 29-37 us at Nk 16, 78-88 vs 165-180 us at Nk 128, 0.65-0.77 vs 1.3-1.4 ms at Nk 1024;
  // at Nq 8 the two are within noise up to Nk 128 and decode wins at Nk 1024 (0.63 vs 0.69-0.79 ms).
  if (dt == at::kFloat && Nq > 8) return false;
  at::Tensor mask;
  if (key_padding_mask.has_value()) mask = key_padding_mask->contiguous();
  DecodeProblem p{B, Nq, Nk, Hq, Hkv, D, causal, static_cast<float>(softmax_scale),
                  mask.defined() ? mask.data_ptr<bool>() : nullptr,
                  {q.stride(0), q.stride(1), q.stride(2)},
                  {k.stride(0), k.stride(1), k.stride(2)},
                  {v.stride(0), v.stride(1), v.stride(2)}, 1, 1, 16, false};
  const int64_t elem = dt == at::kFloat ? 4 : 2, R = (Hq / Hkv) * Nq, W = (D + 15) / 16 * 16;
  // Sub-chunks of up to 256 keys (one head's K and V rows of a sub-chunk within 128 KB, in L2 while the R
  // rows of that head use them).
  p.kc = std::clamp<int64_t>(65536 / (D * elem) / 16 * 16, 32, 256);
  // A task is (batch, group of kv heads, key split): a group's running state (R rows of W floats per head)
  // stays within 32 KB.
  p.hg = std::clamp<int64_t>(8192 / (R * W), 1, Hkv);
  // Threads when K and V are more than a few L1s (waking a thread costs about what reading 64 KB does).
  const int64_t threads = at::get_num_threads();
  p.parallel = threads > 1 && 2 * B * Nk * Hkv * D * elem >= (int64_t{64} << 10);
  auto even = [&](int64_t units) { return units % threads == 0 || units >= 4 * threads; };
  int64_t groups = (Hkv + p.hg - 1) / p.hg;
  if (p.parallel && !even(B * groups)) {
    // The tasks do not divide among the threads. With many keys, split them (flash-decoding: each thread
    // sweeps one contiguous range, the splits are combined by log-sum-exp); with few, use smaller head
    // groups first (no combine), then key splits of at least 32 keys.
    for (int64_t n = groups + 1; Nk < 512 && n <= Hkv && !even(B * groups); ++n) {
      p.hg = (Hkv + n - 1) / n;
      groups = (Hkv + p.hg - 1) / p.hg;
    }
    const int64_t most = std::max<int64_t>(1, Nk / 32);
    while (p.nsplit < most && !even(B * groups * p.nsplit)) ++p.nsplit;
  }
  at::Tensor out = at::empty({B, Nq, Hq, D}, q.options());
  at::Tensor lse = at::empty({B, Hq, Nq}, q.options().dtype(at::kFloat));
  const void *qp = q.data_ptr(), *kp = k.data_ptr(), *vp = v.data_ptr();
  void* op = out.data_ptr();
  float* lp = lse.data_ptr<float>();
  if (dt == at::kFloat) {
    decode_avx512::decode_any<decode_avx512::F32>(p, qp, kp, vp, op, lp);
  } else if (dt == at::kHalf) {
    decode_avx512::decode_any<decode_avx512::Widened<at::Half, false>>(p, qp, kp, vp, op, lp);
  } else if (cpu().bf16) {
    decode_avx512_bf16::decode_any<decode_avx512_bf16::BF16Dot>(p, qp, kp, vp, op, lp);
  } else {
    decode_avx512::decode_any<decode_avx512::Widened<at::BFloat16, true>>(p, qp, kp, vp, op, lp);
  }
  result = {out, lse};
  return true;
#endif
}

}  // namespace pyllm::cpu
