// Launchers of the CUDA kernels in csrc/cuda/*.cu. Plain C++ over the CUDA runtime (no torch), so the
// torch bindings (bindings.cpp) and the standalone harnesses (csrc/dev) share them.
//
// Conventions (the op contract of csrc/pyllm.cpp):
//   * pointers are device pointers; strides are in elements; every tensor's last dim is contiguous;
//   * each launcher checks what it can (sizes, head dim), enqueues on `stream`, and returns the first
//     cudaError_t it met (cudaSuccess otherwise); it never synchronizes.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime.h>

namespace pyllm {
namespace cuda {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// ---------------------------------------------------------------------------------------------------
// Attention (FlashAttention-2). fp16 and bf16 only: fp32 inputs are not served here (the Python
// dispatcher routes them to another backend); head_dim 1..256 (64, 96, 128 at full speed; others are
// padded to the next of 32/64/96/128/160/192/224/256 with masked loads). Needs sm_80+ (mma.sync bf16).
// ---------------------------------------------------------------------------------------------------

constexpr int kAttentionMaxHeadDim = 256;

// FlashAttention's score modifications and dropout (attention_ext_fwd/bwd in csrc/pyllm.cpp); all off by
// default. With any of them on, the kernels take their feature variant (head dims padded to 64, 128 or 256).
//   window: query i sees key j iff i' - left <= j <= i' + right with i' = i + Nk - Nq (bottom-right
//           aligned; -1 = unbounded; causal sets right = 0); key tiles outside every row's window are skipped
//   softcap: s = softcap * tanh(s / softcap) on the scaled score (gradient through 1 - tanh^2)
//   alibi: s -= slope * |i + Nk - Nq - j|, slope = alibi_slopes[b * alibi_stride_b + h]
//   dropout: element (b, h, i, j) is kept iff word 0 of Philox4x32-10 (key = seed, counter = offset +
//           ((b Hq + h) drop_lq + i) drop_lk + j) >= drop_threshold; kept probabilities are scaled by
//           drop_scale = 1 / (1 - p); lse is taken before dropout
struct AttentionFeatures {
  int window_left = -1, window_right = -1;
  float softcap = 0.f;                  // 0 = off
  const float* alibi_slopes = nullptr;  // (Hq,) or (B, Hq) float32 contiguous, or nullptr
  int64_t alibi_stride_b = 0;           // 0 for (Hq,), Hq for (B, Hq)
  uint32_t drop_threshold = 0;          // min(floor(p 2^32), 2^32 - 1); 0 = no dropout
  float drop_scale = 1.f;
  uint64_t seed = 0, offset = 0;
  int64_t drop_lq = 0, drop_lk = 0;     // the dropout index layout, at least (Nq, Nk)

  bool any() const {
    return window_left >= 0 || window_right >= 0 || softcap > 0.f || alibi_slopes != nullptr || drop_threshold != 0;
  }
};

struct AttentionFwdParams {
  const void* q;  // (B, Nq, Hq, D) with strides q_stride_{b,n,h}
  const void* k;  // (B, Nk, Hkv, D)
  const void* v;  // (B, Nk, Hkv, D)
  void* out;      // (B, Nq, Hq, D) with strides out_stride_{b,n,h} (the binding allocates it contiguous)
  float* lse;     // (B, Hq, Nq) contiguous; natural log; -inf for a row that sees no key
  const uint8_t* key_padding_mask;  // (B, Nk), 1 = real token, row stride mask_stride_b, or nullptr
  int64_t mask_stride_b;
  int batch, seqlen_q, seqlen_k, heads_q, heads_kv, head_dim;
  int64_t q_stride_b, q_stride_n, q_stride_h;
  int64_t k_stride_b, k_stride_n, k_stride_h;
  int64_t v_stride_b, v_stride_n, v_stride_h;
  int64_t out_stride_b, out_stride_n, out_stride_h;
  float softmax_scale;
  bool causal;  // bottom-right aligned: query i sees key j iff j <= i + Nk - Nq
  AttentionFeatures feat;
};

cudaError_t attention_fwd(const AttentionFwdParams& p, DType dtype, cudaStream_t stream);

struct AttentionBwdParams {
  const void* dout;  // (B, Nq, Hq, D), strides dout_stride_{b,n,h}
  const void* q;
  const void* k;
  const void* v;
  const void* out;   // forward output (B, Nq, Hq, D), strides out_stride_{b,n,h}
  const float* lse;  // (B, Hq, Nq) contiguous, from attention_fwd
  const uint8_t* key_padding_mask;  // (B, Nk) or nullptr
  int64_t mask_stride_b;
  void* dq;  // (B, Nq, Hq, D) contiguous, q's dtype
  void* dk;  // (B, Nk, Hkv, D) contiguous
  void* dv;  // (B, Nk, Hkv, D) contiguous
  // Workspace, fp32, both provided by the caller:
  float* delta;     // (B, Hq, Nq): rowsum(dout * out)
  float* dq_accum;  // (B, Nq, Hq, D): atomics target when !deterministic (zeroed here); may be
                    // nullptr when deterministic
  int batch, seqlen_q, seqlen_k, heads_q, heads_kv, head_dim;
  int64_t dout_stride_b, dout_stride_n, dout_stride_h;
  int64_t q_stride_b, q_stride_n, q_stride_h;
  int64_t k_stride_b, k_stride_n, k_stride_h;
  int64_t v_stride_b, v_stride_n, v_stride_h;
  int64_t out_stride_b, out_stride_n, out_stride_h;
  float softmax_scale;
  bool causal;
  // true: dq from a separate kernel that loops over key blocks (no atomics, bitwise reproducible);
  // false: dq accumulated with fp32 atomics into dq_accum by the dk/dv kernel, then converted.
  // The same choice for GQA's dk/dv partials (below): a fixed-order reduction, or fp32 atomics.
  bool deterministic;
  AttentionFeatures feat;
  // GQA (Hq > Hkv): the query heads of a group are split over group_split CTAs per (key block, kv head);
  // 0 = the launcher's choice (attention_bwd_group_split), otherwise a divisor of Hq / Hkv (the harness
  // forces each split). With a split > 1 the dk/dv partials go through dkv_accum
  // (attention_bwd_workspace_floats(p) fp32, provided by the caller; nullptr when that is 0) and a
  // reduction kernel casts their sum to the output dtype.
  int group_split = 0;
  float* dkv_accum = nullptr;
};

// The group split attention_bwd uses for p: 1 when Hq == Hkv (one pass, no workspace); otherwise the
// smallest divisor of the group that gives the dK/dV grid about 4 CTAs per SM of the current device
// (the whole group when none does). Depends on the shape and the device only, so deterministic runs
// reproduce bitwise on one device.
int attention_bwd_group_split(const AttentionBwdParams& p);

// fp32 elements of dkv_accum that attention_bwd needs for p: 0 for a split of 1; otherwise
// 2 * B * Nk * Hkv * D times the split (deterministic: one partial per split, summed in split order) or
// times 1 (atomics).
size_t attention_bwd_workspace_floats(const AttentionBwdParams& p);

// Runs delta = rowsum(dO * O), the dk/dv kernel (one CTA per key block, kv head and group split; each
// loops over its share of the group's query heads), the dk/dv reduction when the group is split, and dq
// (atomics + convert, or the deterministic dq kernel).
cudaError_t attention_bwd(const AttentionBwdParams& p, DType dtype, cudaStream_t stream);

// ---------------------------------------------------------------------------------------------------
// LayerNorm / RMSNorm with a fused residual add. x fp32/fp16/bf16; weight and bias in x's dtype or fp32.
// ---------------------------------------------------------------------------------------------------

struct LayerNormFwdParams {
  const void* x;         // (M, N), row stride x_row_stride
  const void* residual;  // (M, N), row stride residual_row_stride, or nullptr
  const void* weight;    // (N,) or nullptr
  const void* bias;      // (N,) or nullptr (ignored when rms)
  void* y;               // (M, N) contiguous, x's dtype
  void* h;               // (M, N) contiguous, x + residual; nullptr when residual is nullptr
  float* mean;           // (M,) or nullptr when rms
  float* rstd;           // (M,)
  int64_t M, N;
  int64_t x_row_stride, residual_row_stride;
  float eps;
  bool rms;
};

// weight_dtype describes weight and bias (x's dtype or kFloat32); ignored when both are nullptr.
cudaError_t layer_norm_fwd(const LayerNormFwdParams& p, DType dtype, DType weight_dtype,
                           cudaStream_t stream);

struct LayerNormBwdParams {
  const void* dy;      // (M, N), row stride dy_row_stride
  const void* h;       // (M, N), the tensor that was normalized, row stride h_row_stride
  const void* weight;  // (N,) or nullptr
  const float* mean;   // (M,) or nullptr when rms
  const float* rstd;   // (M,)
  const void* dh;      // (M, N) or nullptr, row stride dh_row_stride; added to dx
  void* dx;            // (M, N) contiguous, h's dtype
  void* dweight;       // (N,) in weight_dtype, or nullptr (no weight)
  void* dbias;         // (N,) in weight_dtype, or nullptr (!has_bias)
  float* workspace;    // layer_norm_bwd_workspace_floats(M, N) floats, or nullptr when neither
                       // dweight nor dbias is wanted
  int64_t M, N;
  int64_t dy_row_stride, h_row_stride, dh_row_stride;
  bool rms;
};

// fp32 elements of workspace layer_norm_bwd needs (per-block partial sums of dweight and dbias).
size_t layer_norm_bwd_workspace_floats(int64_t M, int64_t N);

cudaError_t layer_norm_bwd(const LayerNormBwdParams& p, DType dtype, DType weight_dtype,
                           cudaStream_t stream);

// ---------------------------------------------------------------------------------------------------
// Linear cross-entropy, the per-row step (the matmuls are cuBLAS calls in the binding): one block per row
// of a chunk's float32 logits computes the row's loss and, when compute_grad, overwrites the row with
// dloss/dlogits. Formulas in csrc/linear_cross_entropy.h and csrc/cuda/linear_cross_entropy.cu.
// ---------------------------------------------------------------------------------------------------

struct LinearCrossEntropyRowsParams {
  float* z;               // (rows, vocab) logits, row stride z_row_stride; overwritten with the gradient
  const int64_t* labels;  // (rows,)
  float* loss;            // (rows,) output, 0 for ignored rows
  int64_t rows, vocab, z_row_stride, ignore_index;
  float label_smoothing, softcap /* 0 = none */, z_loss, grad_scale;
  bool compute_grad;
};

cudaError_t linear_cross_entropy_rows(const LinearCrossEntropyRowsParams& p, cudaStream_t stream);

// ---------------------------------------------------------------------------------------------------
// Rotary position embeddings on q and k (op contract in csrc/pyllm.cpp). fp32 / fp16 / bf16.
// ---------------------------------------------------------------------------------------------------

struct RotaryParams {
  const void* q;  // (B, N, Hq, D), strides q_stride_{b,n,h}
  const void* k;  // (B, N, Hk, D), strides k_stride_{b,n,h}
  void* q_out;    // (B, N, Hq, D) contiguous
  void* k_out;    // (B, N, Hk, D) contiguous
  const float* cos;  // (cos_batch, N, half) contiguous, cos_batch = 1 (shared) or B
  const float* sin;
  int batch, seqlen, heads_q, heads_k, head_dim, half, cos_batch;
  int64_t q_stride_b, q_stride_n, q_stride_h;
  int64_t k_stride_b, k_stride_n, k_stride_h;
  bool interleaved;  // pairs (2i, 2i + 1) instead of (i, i + half)
  bool conjugate;    // rotate by -theta (the backward pass)
};

cudaError_t rotary(const RotaryParams& p, DType dtype, cudaStream_t stream);

// ---------------------------------------------------------------------------------------------------
// GELU's tanh approximation, forward (dy = nullptr) and backward (op contract in csrc/pyllm.cpp).
// ---------------------------------------------------------------------------------------------------

struct GeluTanhParams {
  const void* x;   // (n,) contiguous
  const void* dy;  // (n,) contiguous for the backward, nullptr for the forward
  void* out;       // (n,) contiguous: y, or dx
  int64_t n;
};

cudaError_t gelu_tanh(const GeluTanhParams& p, DType dtype, cudaStream_t stream);

}  // namespace cuda
}  // namespace pyllm
