// Op schemas of the pyllm namespace, defined once. Each device registers its kernels with
// TORCH_LIBRARY_IMPL(pyllm, CPU|CUDA, m) in csrc/cpu and csrc/cuda; the Python side (pyllm/ops)
// adds fake (meta) kernels and autograd with torch.library (layer_norm_fwd and attention_fwd: autograd in
// C++, csrc/autograd.cpp).
//
// Conventions shared by every backend (CPU C++, CUDA C++, and the Triton launchers in kernels/):
//
// layer_norm_fwd(x, weight, bias, residual, eps, rms) -> (y, h, mean, rstd)
//   x        (M, N), x.stride(1) == 1, any row stride; fp32 / fp16 / bf16 (fp64 on the CPU)
//   weight   (N,) or None, dtype == x.dtype or float32;  bias (N,) or None, same dtype rule
//   residual (M, N) or None, same dtype as x; when given the op normalizes h = x + residual
//   rms      true: RMSNorm (no mean subtraction, no bias); false: LayerNorm
//   y        (M, N) contiguous, x.dtype
//   h        (M, N) contiguous, x.dtype, the residual sum (x + residual); shape (0,) when residual is None
//   mean     (M,) float32 (float64 for fp64 x); shape (0,) when rms
//   rstd     (M,) float32 (float64 for fp64 x); 1 / sqrt(var + eps), var the biased variance
//            (for rms: 1 / sqrt(mean(h^2) + eps))
//
// layer_norm_bwd(dy, h, weight, mean, rstd, dh, rms, has_bias) -> (dx, dweight, dbias)
//   dy       (M, N), stride(1) == 1;  h: the tensor that was normalized (x, or x + residual), (M, N)
//   dh       (M, N) or None: gradient flowing into the returned h (pre-norm blocks); added to dx
//   dx       (M, N) contiguous, h.dtype (it is also the gradient of residual)
//   dweight  (N,) in weight's dtype, shape (0,) when weight is None
//   dbias    (N,) in weight's dtype (x.dtype if weight is None), shape (0,) when !has_bias
//
// attention_fwd(q, k, v, key_padding_mask, causal, softmax_scale) -> (out, lse)
//   q (B, Nq, Hq, D); k, v (B, Nk, Hkv, D); Hq % Hkv == 0 (query head h reads kv head h / (Hq / Hkv));
//   any strides with stride(-1) == 1; fp32 / fp16 / bf16 (fp64 on the CPU)
//   key_padding_mask (B, Nk) bool, True = real token, or None
//   causal: bottom-right aligned: query i sees key j iff j <= i + Nk - Nq
//   out (B, Nq, Hq, D) contiguous, q.dtype;  lse (B, Hq, Nq) float32 (float64 for fp64), natural log of
//   sum_j exp(scale * q.k_j) over visible keys; a row that sees no key has out = 0 and lse = -inf
//
// attention_bwd(dout, q, k, v, out, lse, key_padding_mask, causal, softmax_scale, deterministic)
//   -> (dq, dk, dv), each contiguous and shaped/typed like q, k, v; rows with lse = -inf contribute
//   nothing (no NaN). deterministic = true: bitwise-reproducible gradients (no atomics order dependence).
//
// linear_cross_entropy_fwd(hidden, weight, labels, bias, ignore_index, label_smoothing, softcap, z_loss, mean,
//                          chunk_size, compute_grad) -> (loss, dhidden, dweight, dbias)
//   hidden (N, H), weight (V, H), bias (V,) or None, all one dtype (fp32 / fp16 / bf16; fp64 on the CPU);
//   labels (N,) int64, each in [0, V) or == ignore_index.  logits = hidden @ weight^T + bias, computed in
//   chunks of chunk_size tokens (0 = automatic), never all N x V at once; softcap > 0 caps them:
//   z = softcap * tanh(logits / softcap).  loss: 0-d, float32 (float64 for fp64), the sum over non-ignored
//   rows of  lse - (1 - label_smoothing) z_y - label_smoothing mean_j z_j + z_loss lse^2,  divided by the
//   number of non-ignored rows (at least 1) when mean.  With compute_grad its gradients come from the same
//   pass: dhidden (N, H) hidden.dtype, dweight (V, H) weight.dtype, dbias (V,) (shape (0,) without bias);
//   without compute_grad all three have shape (0,).
// rotary(q, k, cos, sin, interleaved, conjugate) -> (q_out, k_out)
//   q (B, N, Hq, D), k (B, N, Hk, D), stride(-1) == 1, any other strides; fp32 / fp16 / bf16 (fp64 on the CPU)
//   cos, sin (Bc, N, R/2) contiguous, Bc = 1 or B, R <= D; float32 (float64 for fp64 q, k)
//   rotates the pairs (x[i], x[i + R/2]) (rotate-half, interleaved = false) or (x[2i], x[2i + 1])
//   (interleaved = true) of the first R dims by angle theta (cos, sin): (x1 c - x2 s, x2 c + x1 s);
//   conjugate = true rotates by -theta (the backward pass); dims R..D are copied.
//   q_out, k_out contiguous, q's shape and dtype / k's; math in fp32 (fp64 for fp64)
// linear_decode(x, weight, bias) -> y   (CPU only; inference, no autograd)
//   x (..., K) (M rows in all), weight (N, K), bias (N,) or None: y = x weight^T + bias, (..., N) contiguous,
//   x.dtype. For the few rows of a generation step (M <= 16): fp32 streams the weights once for all rows;
//   other dtypes run at::linear.
// attention_ext_fwd / attention_ext_bwd: the same plus FlashAttention's features (see pyllm.attention):
//   window_left/right (-1 = unbounded; causal makes right 0), softcap (0 = off; s = cap tanh(s / cap)),
//   alibi_slopes (Hq,) or (B, Hq) float32: - slope |i + Nk - Nq - j|;  attn_bias 4-D, broadcastable to
//   (B, Hq, Nq, Nk), added after softcap; dropout_p with Philox4x32-10 (key = seed, counter = offset +
//   ((b Hq + h) drop_lq + i) drop_lk + j, word 0; keep iff bits >= min(floor(p 2^32), 2^32 - 1); kept
//   probabilities scaled by 1 / (1 - p); lse is taken before dropout). The backward returns dbias summed to
//   attn_bias's shape when bias_grad (else shape (0,)).
// attention_varlen_fwd / attention_varlen_bwd: packed variable-length sequences in one call (FlashAttention's
//   varlen): q (total_q, Hq, D), k, v (total_k, Hkv, D), stride(-1) == 1; cu_seqlens_q/k (B + 1,) int32,
//   starting at 0, non-decreasing, ending at total; sequence b is rows cu_q[b]..cu_q[b+1] of q against rows
//   cu_k[b]..cu_k[b+1] of k and v, each at most max_seqlen_q/k long. Features as attention_ext (no key padding
//   mask, no attn_bias; alibi (Hq,) or (B, Hq)); causal and window align bottom-right per sequence; dropout's
//   element index is that of the padded batch (B, Hq, max_seqlen_q, max_seqlen_k) (drop_lq/lk = max_seqlen).
//   out (total_q, Hq, D) contiguous, lse (Hq, total_q) float32 (float64 for fp64); the backward returns dq, dk, dv.
// gelu_tanh_fwd(x) -> y;  gelu_tanh_bwd(dy, x) -> dx
//   x, dy contiguous, any shape, one dtype: fp32 / fp16 / bf16 (fp64 on the CPU); y, dx contiguous, x's shape and
//   dtype. y = 0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3))) (GELU's tanh approximation, GPT-2's gelu_new);
//   dx = dy dy/dx. Math in fp32 (fp64 for fp64).
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(pyllm, m) {
  m.def("layer_norm_fwd(Tensor x, Tensor? weight, Tensor? bias, Tensor? residual, float eps, bool rms)"
        " -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("layer_norm_bwd(Tensor dy, Tensor h, Tensor? weight, Tensor mean, Tensor rstd, Tensor? dh,"
        " bool rms, bool has_bias) -> (Tensor, Tensor, Tensor)");
  m.def("attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? key_padding_mask, bool causal,"
        " float softmax_scale) -> (Tensor, Tensor)");
  m.def("attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse,"
        " Tensor? key_padding_mask, bool causal, float softmax_scale, bool deterministic)"
        " -> (Tensor, Tensor, Tensor)");
  m.def("linear_cross_entropy_fwd(Tensor hidden, Tensor weight, Tensor labels, Tensor? bias, int ignore_index,"
        " float label_smoothing, float softcap, float z_loss, bool mean, int chunk_size, bool compute_grad)"
        " -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("rotary(Tensor q, Tensor k, Tensor cos, Tensor sin, bool interleaved, bool conjugate) -> (Tensor, Tensor)");
  m.def("linear_decode(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  m.def("attention_ext_fwd(Tensor q, Tensor k, Tensor v, Tensor? key_padding_mask, bool causal,"
        " float softmax_scale, int window_left, int window_right, float softcap, Tensor? alibi_slopes,"
        " Tensor? attn_bias, float dropout_p, int seed, int offset, int drop_lq, int drop_lk) -> (Tensor, Tensor)");
  m.def("attention_ext_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse,"
        " Tensor? key_padding_mask, bool causal, float softmax_scale, int window_left, int window_right,"
        " float softcap, Tensor? alibi_slopes, Tensor? attn_bias, float dropout_p, int seed, int offset,"
        " int drop_lq, int drop_lk, bool bias_grad, bool deterministic) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("attention_varlen_fwd(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k,"
        " int max_seqlen_q, int max_seqlen_k, bool causal, float softmax_scale, int window_left, int window_right,"
        " float softcap, Tensor? alibi_slopes, float dropout_p, int seed, int offset) -> (Tensor, Tensor)");
  m.def("attention_varlen_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse,"
        " Tensor cu_seqlens_q, Tensor cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, bool causal,"
        " float softmax_scale, int window_left, int window_right, float softcap, Tensor? alibi_slopes,"
        " float dropout_p, int seed, int offset, bool deterministic) -> (Tensor, Tensor, Tensor)");
  m.def("gelu_tanh_fwd(Tensor x) -> Tensor");
  m.def("gelu_tanh_bwd(Tensor dy, Tensor x) -> Tensor");
}

// `import pyllm._C` loads this library, which runs the registrations above; the module itself holds only the
// small-call fast paths of the op layer (csrc/small_calls.cpp; autograd of the C++ ops: csrc/autograd.cpp).
namespace pyllm {
extern PyMethodDef small_call_methods[];
}
static struct PyModuleDef pyllm_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, pyllm::small_call_methods};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&pyllm_module); }
