// Autograd for the C++ ops layer_norm_fwd, attention_fwd and rotary, registered in C++ under the Autograd key
// (issue 15, small calls). torch.library's Python autograd wrapper cost about 20 us per call on the CPU
// (a Python kernel at the Autograd key that every call passed through, no_grad included); this one costs
// nothing when grad mode is off or no input requires grad (it redispatches straight to the device kernel),
// and under autograd it saves what the backward op needs and calls it from C++.
//
// The formulas are those the Python registrations in pyllm/ops/_autograd.py use for the other ops (and for
// these, with an extension built before this file existed): gradients of the fwd outputs y (and h) flow into
// the bwd op; mean, rstd and lse carry no gradient. Device-agnostic: the CPU and CUDA kernels share it.
// torch.compile traces through it (AOTAutograd runs this Function with fake tensors; the bwd ops have fake
// kernels in pyllm/ops/_autograd.py).
#include <ATen/Context.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include "op_handles.h"

namespace pyllm {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = std::optional<Tensor>;

bool needs_grad(std::initializer_list<const Tensor*> ts) {
  if (!at::GradMode::is_enabled()) return false;
  for (const Tensor* t : ts)
    if (t && t->defined() && t->requires_grad()) return true;
  return false;
}

const Tensor* ptr(const OptTensor& t) { return t ? &*t : nullptr; }

// ---- layer_norm_fwd ---------------------------------------------------------------------------------

struct LayerNormFunction : public torch::autograd::Function<LayerNormFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const OptTensor& weight,
                               const OptTensor& bias, const OptTensor& residual, double eps, bool rms) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [y, h, mean, rstd] = ops::layer_norm_fwd().call(x, weight, bias, residual, eps, rms);
    ctx->save_for_backward({residual ? h : x, weight ? *weight : Tensor(), mean, rstd});
    // one saved_data entry (each costs a hash-map insertion on every call)
    ctx->saved_data["flags"] = int64_t(rms) | int64_t(bias.has_value()) << 1 | int64_t(residual.has_value()) << 2 |
                               int64_t(bias.has_value() && bias->scalar_type() == at::kFloat) << 3;
    ctx->mark_non_differentiable({mean, rstd});
    ctx->set_materialize_grads(false);  // an unused y or h arrives undefined: no zero tensor made for it
    return {y, h, mean, rstd};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const Tensor &hx = saved[0], &weight = saved[1], &mean = saved[2], &rstd = saved[3];
    const int64_t flags = ctx->saved_data["flags"].toInt();
    const bool rms = flags & 1, has_bias = flags & 2, has_residual = flags & 4, fp32_bias = flags & 8;
    const Tensor dy = grads[0].defined() ? grads[0].contiguous() : at::zeros_like(hx);
    OptTensor dh;
    if (has_residual && grads[1].defined()) dh = grads[1].contiguous();
    // The bwd op returns dbias in the weight's dtype (x's without a weight). An fp32 bias beside a 16-bit
    // weight (or none) gets its gradient in fp32, not rounded to 16 bits: ask for fp32 dweight/dbias with an
    // fp32 weight (ones when there is none) and round dweight once afterwards.
    OptTensor w;
    if (weight.defined()) w = weight;
    const auto pdtype = weight.defined() ? weight.scalar_type() : hx.scalar_type();
    if (fp32_bias && (pdtype == at::kHalf || pdtype == at::kBFloat16))
      w = weight.defined() ? weight.to(at::kFloat) : at::ones({hx.size(1)}, hx.options().dtype(at::kFloat));
    auto [dx, dw, db] = ops::layer_norm_bwd().call(dy, hx, w, mean, rstd, dh, rms, has_bias);
    return {dx, weight.defined() ? dw.to(weight.scalar_type()) : Tensor(), has_bias ? db : Tensor(),
            has_residual ? dx : Tensor(), Tensor(), Tensor()};
  }
};

std::tuple<Tensor, Tensor, Tensor, Tensor> layer_norm_fwd_autograd(const Tensor& x, const OptTensor& weight,
                                                                   const OptTensor& bias, const OptTensor& residual,
                                                                   double eps, bool rms) {
  if (!needs_grad({&x, ptr(weight), ptr(bias), ptr(residual)})) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return ops::layer_norm_fwd().call(x, weight, bias, residual, eps, rms);
  }
  auto out = LayerNormFunction::apply(x, weight, bias, residual, eps, rms);
  return {out[0], out[1], out[2], out[3]};
}

// ---- attention_fwd ----------------------------------------------------------------------------------

struct AttentionFunction : public torch::autograd::Function<AttentionFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& q, const Tensor& k, const Tensor& v,
                               const OptTensor& key_padding_mask, bool causal, double softmax_scale) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, lse] = ops::attention_fwd().call(q, k, v, key_padding_mask, causal, softmax_scale);
    ctx->save_for_backward({q, k, v, out, lse, key_padding_mask ? *key_padding_mask : Tensor()});
    ctx->saved_data["causal"] = causal;
    ctx->saved_data["scale"] = softmax_scale;
    ctx->mark_non_differentiable({lse});  // the log-sum-exp carries no gradient (as in FlashAttention)
    ctx->set_materialize_grads(false);
    return {out, lse};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const Tensor &q = saved[0], &k = saved[1], &v = saved[2], &out = saved[3], &lse = saved[4];
    OptTensor mask;
    if (saved[5].defined()) mask = saved[5];
    const Tensor dout = grads[0].defined() ? grads[0].contiguous() : at::zeros_like(out);
    const bool deterministic = at::globalContext().deterministicAlgorithms();
    auto [dq, dk, dv] = ops::attention_bwd().call(dout, q, k, v, out, lse, mask, ctx->saved_data["causal"].toBool(),
                                                ctx->saved_data["scale"].toDouble(), deterministic);
    return {dq, dk, dv, Tensor(), Tensor(), Tensor()};
  }
};

std::tuple<Tensor, Tensor> attention_fwd_autograd(const Tensor& q, const Tensor& k, const Tensor& v,
                                                  const OptTensor& key_padding_mask, bool causal,
                                                  double softmax_scale) {
  if (!needs_grad({&q, &k, &v})) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return ops::attention_fwd().call(q, k, v, key_padding_mask, causal, softmax_scale);
  }
  auto out = AttentionFunction::apply(q, k, v, key_padding_mask, causal, softmax_scale);
  return {out[0], out[1]};
}

// ---- rotary -----------------------------------------------------------------------------------------
// The gradient of a rotation is the inverse rotation: the same op with `conjugate` flipped. cos/sin get no
// gradient (the op layer sends tables that require grad to the reference).

struct RotaryFunction : public torch::autograd::Function<RotaryFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& q, const Tensor& k, const Tensor& cos,
                               const Tensor& sin, bool interleaved, bool conjugate) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [qo, ko] = ops::rotary().call(q, k, cos, sin, interleaved, conjugate);
    ctx->save_for_backward({cos, sin});
    ctx->saved_data["flags"] = int64_t(interleaved) | int64_t(conjugate) << 1;
    ctx->set_materialize_grads(false);
    return {qo, ko};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const int64_t flags = ctx->saved_data["flags"].toInt();
    const bool interleaved = flags & 1, conjugate = flags & 2;
    const bool has_q = grads[0].defined(), has_k = grads[1].defined();
    if (!has_q && !has_k) return {Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
    // One undefined output gradient (that output unused): rotate the other one in both slots (k may have any
    // number of heads), rather than a zero tensor.
    const Tensor dq = (has_q ? grads[0] : grads[1]).contiguous(), dk = (has_k ? grads[1] : grads[0]).contiguous();
    auto [gq, gk] = ops::rotary().call(dq, dk, saved[0], saved[1], interleaved, !conjugate);
    return {has_q ? gq : Tensor(), has_k ? gk : Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

std::tuple<Tensor, Tensor> rotary_autograd(const Tensor& q, const Tensor& k, const Tensor& cos, const Tensor& sin,
                                           bool interleaved, bool conjugate) {
  if (!needs_grad({&q, &k})) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return ops::rotary().call(q, k, cos, sin, interleaved, conjugate);
  }
  auto out = RotaryFunction::apply(q, k, cos, sin, interleaved, conjugate);
  return {out[0], out[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(pyllm, Autograd, m) {
  m.impl("layer_norm_fwd", &layer_norm_fwd_autograd);
  m.impl("attention_fwd", &attention_fwd_autograd);
  m.impl("rotary", &rotary_autograd);
}

}  // namespace pyllm
