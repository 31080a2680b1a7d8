// CUDA implementations of the pyllm ops (schemas in csrc/pyllm.cpp): argument checks, output allocation
// and the current stream here; the kernels themselves are in attention.cu / layer_norm.cu behind the
// torch-free launchers of kernels.h. Built only when torch is a CUDA build.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include "attention_args.h"
#include "kernels.h"

namespace {

using pyllm::cuda::DType;

// Raises if a launcher reported an error (its own or one left by an earlier launch on the device).
void check_launch(cudaError_t err, const char* kernel) {
  TORCH_CHECK(err == cudaSuccess, "pyllm CUDA kernel ", kernel, " failed: ", cudaGetErrorName(err), " (",
              cudaGetErrorString(err), ")");
}

DType kernel_dtype(at::ScalarType t) {
  switch (t) {
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: return DType::kFloat32;
  }
}

void check_cuda_tensor(const at::Tensor& t, const char* op, const char* name, const at::Device& device) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got device ", t.device());
  TORCH_CHECK(t.device() == device, op, ": ", name, " is on ", t.device(), " but the first input is on ", device);
}

// Kernels take strides but need the last dim contiguous.
at::Tensor last_dim_contiguous(const at::Tensor& t) { return t.size(-1) > 1 && t.stride(-1) != 1 ? t.contiguous() : t; }

void check_int32(int64_t v, const char* op, const char* what) {
  TORCH_CHECK(v <= INT32_MAX, op, ": ", what, " = ", v, " exceeds the kernels' 32-bit limit");
}

// Tensor-core attention needs mma.sync bf16/fp16 (sm_80+).
void check_sm80(const char* op, const at::Device& device) {
  int major = 0;
  check_launch(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device.index()),
               "cudaDeviceGetAttribute");
  TORCH_CHECK(major >= 8, op, ": the CUDA attention kernels need compute capability 8.0 or newer, got ",
              major, ".x");
}

// ---- attention ------------------------------------------------------------------------------------

struct AttentionShape {
  int64_t B, Nq, Nk, Hq, Hkv, D;
};

AttentionShape check_attention_inputs(const char* op, const at::Tensor& q, const at::Tensor& k,
                                      const at::Tensor& v, const std::optional<at::Tensor>& mask) {
  const at::Device dev = q.device();
  check_cuda_tensor(q, op, "q", dev);
  check_cuda_tensor(k, op, "k", dev);
  check_cuda_tensor(v, op, "v", dev);
  TORCH_CHECK(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16, op,
              ": the CUDA attention kernel takes float16 or bfloat16, got ", q.scalar_type(),
              " (float32 attention is served by the other backends)");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), op,
              ": q, k, v must share a dtype, got ", q.scalar_type(), ", ", k.scalar_type(), ", ", v.scalar_type());
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, op,
              ": q, k, v must be (batch, seqlen, heads, head_dim), got ", q.dim(), ", ", k.dim(), ", ", v.dim(), " dims");
  const AttentionShape s{q.size(0), q.size(1), k.size(1), q.size(2), k.size(2), q.size(3)};
  TORCH_CHECK(k.size(0) == s.B && v.size(0) == s.B, op, ": k and v have batch ", k.size(0), ", ", v.size(0),
              " but q has ", s.B);
  TORCH_CHECK(k.sizes() == v.sizes(), op, ": k has shape ", k.sizes(), " but v has ", v.sizes());
  TORCH_CHECK(k.size(3) == s.D, op, ": k has head_dim ", k.size(3), " but q has ", s.D);
  TORCH_CHECK(s.D >= 1 && s.D <= pyllm::cuda::kAttentionMaxHeadDim, op, ": head_dim must be in [1, ",
              pyllm::cuda::kAttentionMaxHeadDim, "], got ", s.D);
  TORCH_CHECK(s.Hkv >= 1 && s.Hq % s.Hkv == 0, op, ": heads_q (", s.Hq, ") must be a multiple of heads_kv (", s.Hkv, ")");
  if (mask) {
    check_cuda_tensor(*mask, op, "key_padding_mask", dev);
    TORCH_CHECK(mask->scalar_type() == at::kBool, op, ": key_padding_mask must be bool, got ", mask->scalar_type());
    TORCH_CHECK(mask->dim() == 2 && mask->size(0) == s.B && mask->size(1) == s.Nk, op,
                ": key_padding_mask must be (batch, seqlen_k) = (", s.B, ", ", s.Nk, "), got ", mask->sizes());
  }
  check_int32(s.B * s.Hq, op, "batch * heads_q");
  check_int32(s.Nq, op, "seqlen_q");
  check_int32(s.Nk, op, "seqlen_k");
  check_sm80(op, dev);
  return s;
}

// The feature arguments of attention_ext_fwd/bwd (csrc/pyllm.cpp). The CUDA kernels implement the window,
// softcap, ALiBi and dropout; attn_bias is declined (pyllm/capabilities.py does not declare it, so auto
// takes another backend; asked for by name, this error says why).
using FeatureArgs = pyllm::AttentionFeatureArgs;  // csrc/attention_args.h

// A window at least as wide as both sequences is no window (and keeps the kernels' int arithmetic small).
int window_arg(int64_t w, const AttentionShape& s) { return w < 0 || w >= s.Nq + s.Nk ? -1 : static_cast<int>(w); }

// Fills p.feat; `alibi` receives the float32 contiguous slopes the kernel reads (kept alive by the caller).
pyllm::cuda::AttentionFeatures make_features(const char* op, const FeatureArgs& a, const AttentionShape& s,
                                             const at::Device& dev, at::Tensor& alibi) {
  pyllm::cuda::AttentionFeatures f;
  TORCH_CHECK(!a.bias.has_value(), op, ": attn_bias is not implemented in the CUDA kernels (use backend='triton' "
              "or 'cpu'; auto does)");
  TORCH_CHECK(a.window_left >= -1 && a.window_right >= -1, op, ": window sizes must be >= -1, got (",
              a.window_left, ", ", a.window_right, ")");
  f.window_left = window_arg(a.window_left, s);
  f.window_right = window_arg(a.window_right, s);
  TORCH_CHECK(std::isfinite(a.softcap) && a.softcap >= 0, op, ": softcap must be a finite float >= 0, got ", a.softcap);
  f.softcap = static_cast<float>(a.softcap);
  if (a.alibi.has_value()) {
    const at::Tensor& t = *a.alibi;
    check_cuda_tensor(t, op, "alibi_slopes", dev);
    TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, op,
                ": alibi_slopes must be float32, got ", t.scalar_type());
    TORCH_CHECK((t.dim() == 1 && t.size(0) == s.Hq) || (t.dim() == 2 && t.size(0) == s.B && t.size(1) == s.Hq), op,
                ": alibi_slopes must have shape (", s.Hq, ",) or (", s.B, ", ", s.Hq, "), got ", t.sizes());
    alibi = t.to(at::kFloat).contiguous();
    f.alibi_slopes = alibi.data_ptr<float>();
    f.alibi_stride_b = t.dim() == 2 ? s.Hq : 0;
  }
  if (a.dropout_p > 0) {
    TORCH_CHECK(a.dropout_p < 1 && a.drop_lq >= s.Nq && a.drop_lk >= s.Nk, op, ": dropout_p must be in [0, 1) and "
                "the dropout layout at least (seqlen_q, seqlen_k) = (", s.Nq, ", ", s.Nk, "), got ", a.dropout_p,
                " and (", a.drop_lq, ", ", a.drop_lk, ")");
    f.drop_threshold =
        static_cast<uint32_t>(std::min<double>(std::floor(a.dropout_p * 4294967296.0), 4294967295.0));
    f.drop_scale = static_cast<float>(1.0 / (1.0 - a.dropout_p));
    f.seed = static_cast<uint64_t>(a.seed);
    f.offset = static_cast<uint64_t>(a.offset);
    f.drop_lq = a.drop_lq;
    f.drop_lk = a.drop_lk;
  }
  return f;
}

std::tuple<at::Tensor, at::Tensor> attention_fwd_impl(const at::Tensor& q_in, const at::Tensor& k_in,
                                                      const at::Tensor& v_in,
                                                      const std::optional<at::Tensor>& key_padding_mask,
                                                      bool causal, double softmax_scale, const FeatureArgs& fa,
                                                      const char* op) {
  const AttentionShape s = check_attention_inputs(op, q_in, k_in, v_in, key_padding_mask);
  at::Tensor alibi;
  const pyllm::cuda::AttentionFeatures feat = make_features(op, fa, s, q_in.device(), alibi);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = last_dim_contiguous(q_in), k = last_dim_contiguous(k_in), v = last_dim_contiguous(v_in);
  at::Tensor mask;
  if (key_padding_mask) mask = key_padding_mask->contiguous();
  at::Tensor out = at::empty({s.B, s.Nq, s.Hq, s.D}, q.options());
  at::Tensor lse = at::empty({s.B, s.Hq, s.Nq}, q.options().dtype(at::kFloat));

  pyllm::cuda::AttentionFwdParams p{};
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.key_padding_mask = mask.defined() ? reinterpret_cast<const uint8_t*>(mask.data_ptr<bool>()) : nullptr;
  p.mask_stride_b = s.Nk;
  p.batch = static_cast<int>(s.B);
  p.seqlen_q = static_cast<int>(s.Nq);
  p.seqlen_k = static_cast<int>(s.Nk);
  p.heads_q = static_cast<int>(s.Hq);
  p.heads_kv = static_cast<int>(s.Hkv);
  p.head_dim = static_cast<int>(s.D);
  p.q_stride_b = q.stride(0), p.q_stride_n = q.stride(1), p.q_stride_h = q.stride(2);
  p.k_stride_b = k.stride(0), p.k_stride_n = k.stride(1), p.k_stride_h = k.stride(2);
  p.v_stride_b = v.stride(0), p.v_stride_n = v.stride(1), p.v_stride_h = v.stride(2);
  p.out_stride_b = out.stride(0), p.out_stride_n = out.stride(1), p.out_stride_h = out.stride(2);
  p.softmax_scale = static_cast<float>(softmax_scale);
  p.causal = causal;
  p.feat = feat;
  check_launch(pyllm::cuda::attention_fwd(p, kernel_dtype(q.scalar_type()), c10::cuda::getCurrentCUDAStream()), op);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor> attention_fwd_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                      const std::optional<at::Tensor>& key_padding_mask, bool causal,
                                                      double softmax_scale) {
  return attention_fwd_impl(q, k, v, key_padding_mask, causal, softmax_scale, FeatureArgs{}, "attention_fwd");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd_impl(
    const at::Tensor& dout_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& out_in, const at::Tensor& lse_in, const std::optional<at::Tensor>& key_padding_mask,
    bool causal, double softmax_scale, bool deterministic, const FeatureArgs& fa, const char* op) {
  const AttentionShape s = check_attention_inputs(op, q_in, k_in, v_in, key_padding_mask);
  at::Tensor alibi;
  const pyllm::cuda::AttentionFeatures feat = make_features(op, fa, s, q_in.device(), alibi);
  check_cuda_tensor(dout_in, op, "dout", q_in.device());
  check_cuda_tensor(out_in, op, "out", q_in.device());
  check_cuda_tensor(lse_in, op, "lse", q_in.device());
  TORCH_CHECK(dout_in.sizes() == q_in.sizes() && out_in.sizes() == q_in.sizes(), op,
              ": dout and out must have q's shape ", q_in.sizes(), ", got ", dout_in.sizes(), " and ", out_in.sizes());
  TORCH_CHECK(dout_in.scalar_type() == q_in.scalar_type() && out_in.scalar_type() == q_in.scalar_type(), op,
              ": dout and out must have q's dtype ", q_in.scalar_type(), ", got ", dout_in.scalar_type(), " and ",
              out_in.scalar_type());
  TORCH_CHECK(lse_in.scalar_type() == at::kFloat, op, ": lse must be float32, got ", lse_in.scalar_type());
  TORCH_CHECK(lse_in.dim() == 3 && lse_in.size(0) == s.B && lse_in.size(1) == s.Hq && lse_in.size(2) == s.Nq, op,
              ": lse must be (batch, heads_q, seqlen_q) = (", s.B, ", ", s.Hq, ", ", s.Nq, "), got ", lse_in.sizes());
  const c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = last_dim_contiguous(q_in), k = last_dim_contiguous(k_in), v = last_dim_contiguous(v_in);
  const at::Tensor dout = last_dim_contiguous(dout_in), out = last_dim_contiguous(out_in);
  const at::Tensor lse = lse_in.contiguous();
  at::Tensor mask;
  if (key_padding_mask) mask = key_padding_mask->contiguous();

  at::Tensor dq = at::empty({s.B, s.Nq, s.Hq, s.D}, q.options());
  at::Tensor dk = at::empty({s.B, s.Nk, s.Hkv, s.D}, k.options());
  at::Tensor dv = at::empty({s.B, s.Nk, s.Hkv, s.D}, v.options());
  const auto f32 = q.options().dtype(at::kFloat);
  at::Tensor delta = at::empty({s.B, s.Hq, s.Nq}, f32);
  at::Tensor dq_accum;
  if (!deterministic) dq_accum = at::empty({s.B, s.Nq, s.Hq, s.D}, f32);  // zeroed by the launcher

  pyllm::cuda::AttentionBwdParams p{};
  p.dout = dout.data_ptr();
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.key_padding_mask = mask.defined() ? reinterpret_cast<const uint8_t*>(mask.data_ptr<bool>()) : nullptr;
  p.mask_stride_b = s.Nk;
  p.dq = dq.data_ptr();
  p.dk = dk.data_ptr();
  p.dv = dv.data_ptr();
  p.delta = delta.data_ptr<float>();
  p.dq_accum = dq_accum.defined() ? dq_accum.data_ptr<float>() : nullptr;
  p.batch = static_cast<int>(s.B);
  p.seqlen_q = static_cast<int>(s.Nq);
  p.seqlen_k = static_cast<int>(s.Nk);
  p.heads_q = static_cast<int>(s.Hq);
  p.heads_kv = static_cast<int>(s.Hkv);
  p.head_dim = static_cast<int>(s.D);
  p.dout_stride_b = dout.stride(0), p.dout_stride_n = dout.stride(1), p.dout_stride_h = dout.stride(2);
  p.q_stride_b = q.stride(0), p.q_stride_n = q.stride(1), p.q_stride_h = q.stride(2);
  p.k_stride_b = k.stride(0), p.k_stride_n = k.stride(1), p.k_stride_h = k.stride(2);
  p.v_stride_b = v.stride(0), p.v_stride_n = v.stride(1), p.v_stride_h = v.stride(2);
  p.out_stride_b = out.stride(0), p.out_stride_n = out.stride(1), p.out_stride_h = out.stride(2);
  p.softmax_scale = static_cast<float>(softmax_scale);
  p.causal = causal;
  p.deterministic = deterministic;
  p.feat = feat;
  at::Tensor dkv_accum;  // GQA's dk/dv partials when the group is split (kernels.h)
  const size_t ws = pyllm::cuda::attention_bwd_workspace_floats(p);
  if (ws > 0) {
    dkv_accum = at::empty({static_cast<int64_t>(ws)}, f32);
    p.dkv_accum = dkv_accum.data_ptr<float>();
  }
  check_launch(pyllm::cuda::attention_bwd(p, kernel_dtype(q.scalar_type()), c10::cuda::getCurrentCUDAStream()), op);
  return {dq, dk, dv};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd_cuda(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const std::optional<at::Tensor>& key_padding_mask, bool causal, double softmax_scale,
    bool deterministic) {
  return attention_bwd_impl(dout, q, k, v, out, lse, key_padding_mask, causal, softmax_scale, deterministic,
                            FeatureArgs{}, "attention_bwd");
}

std::tuple<at::Tensor, at::Tensor> attention_ext_fwd_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& key_padding_mask,
    bool causal, double softmax_scale, int64_t window_left, int64_t window_right, double softcap,
    const std::optional<at::Tensor>& alibi_slopes, const std::optional<at::Tensor>& attn_bias, double dropout_p,
    int64_t seed, int64_t offset, int64_t drop_lq, int64_t drop_lk) {
  return attention_fwd_impl(q, k, v, key_padding_mask, causal, softmax_scale,
                            FeatureArgs{window_left, window_right, softcap, alibi_slopes, attn_bias, dropout_p, seed,
                                        offset, drop_lq, drop_lk},
                            "attention_ext_fwd");
}

// dbias is always shape (0,): attn_bias is refused (make_features).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_ext_bwd_cuda(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const std::optional<at::Tensor>& key_padding_mask, bool causal, double softmax_scale,
    int64_t window_left, int64_t window_right, double softcap, const std::optional<at::Tensor>& alibi_slopes,
    const std::optional<at::Tensor>& attn_bias, double dropout_p, int64_t seed, int64_t offset, int64_t drop_lq,
    int64_t drop_lk, bool /*bias_grad*/, bool deterministic) {
  auto [dq, dk, dv] = attention_bwd_impl(
      dout, q, k, v, out, lse, key_padding_mask, causal, softmax_scale, deterministic,
      FeatureArgs{window_left, window_right, softcap, alibi_slopes, attn_bias, dropout_p, seed, offset, drop_lq,
                  drop_lk},
      "attention_ext_bwd");
  return {dq, dk, dv, at::empty({0}, q.options())};
}

// ---- layer norm -----------------------------------------------------------------------------------

void check_norm_input(const char* op, const char* name, const at::Tensor& t, const at::Device& dev) {
  check_cuda_tensor(t, op, name, dev);
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16,
              op, ": ", name, " must be float32, float16 or bfloat16, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 2, op, ": ", name, " must be (M, N), got ", t.dim(), " dims");
}

// weight/bias: (N,), x's dtype or float32. When the two differ, both go to float32 (exact).
void check_affine(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x) {
  check_cuda_tensor(t, op, name, x.device());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == x.size(1), op, ": ", name, " must be (", x.size(1), ",), got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == x.scalar_type() || t.scalar_type() == at::kFloat, op, ": ", name,
              " must be ", x.scalar_type(), " or float32, got ", t.scalar_type());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd_cuda(
    const at::Tensor& x_in, const std::optional<at::Tensor>& weight_in, const std::optional<at::Tensor>& bias_in,
    const std::optional<at::Tensor>& residual_in, double eps, bool rms) {
  const char* op = "layer_norm_fwd";
  check_norm_input(op, "x", x_in, x_in.device());
  const int64_t M = x_in.size(0), N = x_in.size(1);
  at::Tensor weight, bias, residual;
  if (weight_in) {
    check_affine(op, "weight", *weight_in, x_in);
    weight = weight_in->contiguous();
  }
  if (bias_in && !rms) {
    check_affine(op, "bias", *bias_in, x_in);
    bias = bias_in->contiguous();
  }
  if (weight.defined() && bias.defined() && weight.scalar_type() != bias.scalar_type()) {
    weight = weight.to(at::kFloat);
    bias = bias.to(at::kFloat);
  }
  if (residual_in) {
    check_norm_input(op, "residual", *residual_in, x_in.device());
    TORCH_CHECK(residual_in->sizes() == x_in.sizes() && residual_in->scalar_type() == x_in.scalar_type(), op,
                ": residual must match x (", x_in.sizes(), ", ", x_in.scalar_type(), "), got ", residual_in->sizes(),
                ", ", residual_in->scalar_type());
    residual = last_dim_contiguous(*residual_in);
  }
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = last_dim_contiguous(x_in);
  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor y = at::empty({M, N}, x.options());
  at::Tensor h = residual.defined() ? at::empty({M, N}, x.options()) : at::empty({0}, x.options());
  at::Tensor mean = rms ? at::empty({0}, f32) : at::empty({M}, f32);
  at::Tensor rstd = at::empty({M}, f32);

  pyllm::cuda::LayerNormFwdParams p{};
  p.x = x.data_ptr();
  p.residual = residual.defined() ? residual.data_ptr() : nullptr;
  p.weight = weight.defined() ? weight.data_ptr() : nullptr;
  p.bias = bias.defined() ? bias.data_ptr() : nullptr;
  p.y = y.data_ptr();
  p.h = residual.defined() ? h.data_ptr() : nullptr;
  p.mean = rms ? nullptr : mean.data_ptr<float>();
  p.rstd = rstd.data_ptr<float>();
  p.M = M;
  p.N = N;
  p.x_row_stride = x.stride(0);
  p.residual_row_stride = residual.defined() ? residual.stride(0) : 0;
  p.eps = static_cast<float>(eps);
  p.rms = rms;
  const at::ScalarType wt = weight.defined() ? weight.scalar_type() : bias.defined() ? bias.scalar_type() : x.scalar_type();
  check_launch(pyllm::cuda::layer_norm_fwd(p, kernel_dtype(x.scalar_type()), kernel_dtype(wt),
                                           c10::cuda::getCurrentCUDAStream()),
               "layer_norm_fwd");
  return {y, h, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_bwd_cuda(
    const at::Tensor& dy_in, const at::Tensor& h_in, const std::optional<at::Tensor>& weight_in,
    const at::Tensor& mean_in, const at::Tensor& rstd_in, const std::optional<at::Tensor>& dh_in, bool rms,
    bool has_bias) {
  const char* op = "layer_norm_bwd";
  check_norm_input(op, "h", h_in, h_in.device());
  check_norm_input(op, "dy", dy_in, h_in.device());
  TORCH_CHECK(dy_in.sizes() == h_in.sizes() && dy_in.scalar_type() == h_in.scalar_type(), op,
              ": dy must match h (", h_in.sizes(), ", ", h_in.scalar_type(), "), got ", dy_in.sizes(), ", ",
              dy_in.scalar_type());
  const int64_t M = h_in.size(0), N = h_in.size(1);
  at::Tensor weight, dh;
  if (weight_in) {
    check_affine(op, "weight", *weight_in, h_in);
    weight = weight_in->contiguous();
  }
  if (dh_in) {
    check_norm_input(op, "dh", *dh_in, h_in.device());
    TORCH_CHECK(dh_in->sizes() == h_in.sizes() && dh_in->scalar_type() == h_in.scalar_type(), op,
                ": dh must match h (", h_in.sizes(), ", ", h_in.scalar_type(), "), got ", dh_in->sizes(), ", ",
                dh_in->scalar_type());
    dh = last_dim_contiguous(*dh_in);
  }
  check_cuda_tensor(rstd_in, op, "rstd", h_in.device());
  TORCH_CHECK(rstd_in.scalar_type() == at::kFloat && rstd_in.numel() == M, op, ": rstd must be (", M,
              ",) float32, got ", rstd_in.sizes(), " ", rstd_in.scalar_type());
  if (!rms) {
    check_cuda_tensor(mean_in, op, "mean", h_in.device());
    TORCH_CHECK(mean_in.scalar_type() == at::kFloat && mean_in.numel() == M, op, ": mean must be (", M,
                ",) float32, got ", mean_in.sizes(), " ", mean_in.scalar_type());
  }
  const c10::cuda::CUDAGuard guard(h_in.device());
  const at::Tensor dy = last_dim_contiguous(dy_in), h = last_dim_contiguous(h_in);
  const at::Tensor rstd = rstd_in.contiguous();
  const at::Tensor mean = rms ? at::Tensor() : mean_in.contiguous();
  const at::ScalarType wt = weight.defined() ? weight.scalar_type() : h.scalar_type();
  const auto wopt = h.options().dtype(wt);
  at::Tensor dx = at::empty({M, N}, h.options());
  at::Tensor dweight = weight.defined() ? at::empty({N}, wopt) : at::empty({0}, wopt);
  at::Tensor dbias = has_bias ? at::empty({N}, wopt) : at::empty({0}, wopt);
  at::Tensor workspace;
  if (weight.defined() || has_bias) {
    const size_t n = pyllm::cuda::layer_norm_bwd_workspace_floats(M, N);
    workspace = at::empty({static_cast<int64_t>(n)}, h.options().dtype(at::kFloat));
  }

  pyllm::cuda::LayerNormBwdParams p{};
  p.dy = dy.data_ptr();
  p.h = h.data_ptr();
  p.weight = weight.defined() ? weight.data_ptr() : nullptr;
  p.mean = rms ? nullptr : mean.data_ptr<float>();
  p.rstd = rstd.data_ptr<float>();
  p.dh = dh.defined() ? dh.data_ptr() : nullptr;
  p.dx = dx.data_ptr();
  p.dweight = weight.defined() ? dweight.data_ptr() : nullptr;
  p.dbias = has_bias ? dbias.data_ptr() : nullptr;
  p.workspace = workspace.defined() ? workspace.data_ptr<float>() : nullptr;
  p.M = M;
  p.N = N;
  p.dy_row_stride = dy.stride(0);
  p.h_row_stride = h.stride(0);
  p.dh_row_stride = dh.defined() ? dh.stride(0) : 0;
  p.rms = rms;
  check_launch(pyllm::cuda::layer_norm_bwd(p, kernel_dtype(h.scalar_type()), kernel_dtype(wt),
                                           c10::cuda::getCurrentCUDAStream()),
               "layer_norm_bwd");
  return {dx, dweight, dbias};
}

std::tuple<at::Tensor, at::Tensor> rotary_cuda(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& cos_in,
                                               const at::Tensor& sin_in, bool interleaved, bool conjugate) {
  const char* op = "rotary";
  const at::Device dev = q_in.device();
  check_cuda_tensor(q_in, op, "q", dev);
  check_cuda_tensor(k_in, op, "k", dev);
  check_cuda_tensor(cos_in, op, "cos", dev);
  check_cuda_tensor(sin_in, op, "sin", dev);
  TORCH_CHECK(q_in.dim() == 4 && k_in.dim() == 4, op, ": q and k must be (batch, seqlen, heads, head_dim)");
  TORCH_CHECK(k_in.scalar_type() == q_in.scalar_type(), op, ": k has dtype ", k_in.scalar_type(), " but q has ",
              q_in.scalar_type());
  TORCH_CHECK(q_in.scalar_type() == at::kFloat || q_in.scalar_type() == at::kHalf ||
              q_in.scalar_type() == at::kBFloat16,
              op, ": takes float32, float16 or bfloat16, got ", q_in.scalar_type());
  TORCH_CHECK(k_in.size(0) == q_in.size(0) && k_in.size(1) == q_in.size(1) && k_in.size(3) == q_in.size(3), op,
              ": k has shape ", k_in.sizes(), " but q has ", q_in.sizes());
  TORCH_CHECK(cos_in.scalar_type() == at::kFloat && sin_in.scalar_type() == at::kFloat && cos_in.dim() == 3 &&
              cos_in.sizes() == sin_in.sizes(), op, ": cos and sin must be float32 (1 or batch, seqlen, r), got ",
              cos_in.sizes(), " and ", sin_in.sizes());
  TORCH_CHECK((cos_in.size(0) == 1 || cos_in.size(0) == q_in.size(0)) && cos_in.size(1) == q_in.size(1) &&
              2 * cos_in.size(2) <= q_in.size(3) && cos_in.size(2) >= 1, op, ": cos has shape ", cos_in.sizes(),
              " for q of shape ", q_in.sizes());
  check_int32(q_in.size(0) * q_in.size(1), op, "batch * seqlen");
  const c10::cuda::CUDAGuard guard(dev);
  const at::Tensor q = last_dim_contiguous(q_in), k = last_dim_contiguous(k_in);
  const at::Tensor cos = cos_in.contiguous(), sin = sin_in.contiguous();
  at::Tensor q_out = at::empty(q.sizes(), q.options()), k_out = at::empty(k.sizes(), k.options());
  pyllm::cuda::RotaryParams p{};
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.q_out = q_out.data_ptr();
  p.k_out = k_out.data_ptr();
  p.cos = cos.data_ptr<float>();
  p.sin = sin.data_ptr<float>();
  p.batch = static_cast<int>(q.size(0));
  p.seqlen = static_cast<int>(q.size(1));
  p.heads_q = static_cast<int>(q.size(2));
  p.heads_k = static_cast<int>(k.size(2));
  p.head_dim = static_cast<int>(q.size(3));
  p.half = static_cast<int>(cos.size(2));
  p.cos_batch = static_cast<int>(cos.size(0));
  p.q_stride_b = q.stride(0), p.q_stride_n = q.stride(1), p.q_stride_h = q.stride(2);
  p.k_stride_b = k.stride(0), p.k_stride_n = k.stride(1), p.k_stride_h = k.stride(2);
  p.interleaved = interleaved;
  p.conjugate = conjugate;
  check_launch(pyllm::cuda::rotary(p, kernel_dtype(q.scalar_type()), c10::cuda::getCurrentCUDAStream()), op);
  return {q_out, k_out};
}

at::Tensor gelu_tanh_cuda(const at::Tensor& x, const at::Tensor* dy, const char* op) {
  const at::Device dev = x.device();
  check_cuda_tensor(x, op, "x", dev);
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16, op,
              ": takes float32, float16 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(x.is_contiguous(), op, ": x must be contiguous, got strides ", x.strides());
  if (dy != nullptr) {
    check_cuda_tensor(*dy, op, "dy", dev);
    TORCH_CHECK(dy->sizes() == x.sizes() && dy->scalar_type() == x.scalar_type() && dy->is_contiguous(), op,
                ": dy must be contiguous with x's shape ", x.sizes(), " and dtype ", x.scalar_type(), ", got ",
                dy->sizes(), " ", dy->scalar_type());
  }
  const c10::cuda::CUDAGuard guard(dev);
  at::Tensor out = at::empty(x.sizes(), x.options());
  pyllm::cuda::GeluTanhParams p{};
  p.x = x.data_ptr();
  p.dy = dy != nullptr ? dy->data_ptr() : nullptr;
  p.out = out.data_ptr();
  p.n = x.numel();
  check_launch(pyllm::cuda::gelu_tanh(p, kernel_dtype(x.scalar_type()), c10::cuda::getCurrentCUDAStream()), op);
  return out;
}

at::Tensor gelu_tanh_fwd_cuda(const at::Tensor& x) { return gelu_tanh_cuda(x, nullptr, "gelu_tanh_fwd"); }

at::Tensor gelu_tanh_bwd_cuda(const at::Tensor& dy, const at::Tensor& x) {
  return gelu_tanh_cuda(x, &dy, "gelu_tanh_bwd");
}

}  // namespace

TORCH_LIBRARY_IMPL(pyllm, CUDA, m) {
  m.impl("attention_fwd", &attention_fwd_cuda);
  m.impl("attention_bwd", &attention_bwd_cuda);
  m.impl("attention_ext_fwd", &attention_ext_fwd_cuda);
  m.impl("attention_ext_bwd", &attention_ext_bwd_cuda);
  m.impl("layer_norm_fwd", &layer_norm_fwd_cuda);
  m.impl("layer_norm_bwd", &layer_norm_bwd_cuda);
  m.impl("rotary", &rotary_cuda);
  m.impl("gelu_tanh_fwd", &gelu_tanh_fwd_cuda);
  m.impl("gelu_tanh_bwd", &gelu_tanh_bwd_cuda);
}
