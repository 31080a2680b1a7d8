"""torch.library glue shared by the ops: fake (meta) kernels and autograd for the fwd/bwd op pairs
(and for rotary, whose backward is the same op rotating by -theta).

The C++ ops ``pyllm::{layer_norm,attention}_{fwd,bwd}`` and ``pyllm::linear_cross_entropy_fwd`` (schemas in
csrc/pyllm.cpp, CPU and CUDA kernels) and their Triton twins ``pyllm::triton_*`` (custom ops around the launchers in ``pyllm.kernels``) share one
contract, so they share the fake kernels and the backward formulas registered here.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor


def _stat_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def call(op: Callable, *args):
    """``op(*args)``, past its registered autograd when nothing can need it (grad mode off, or no input requires
    grad): the same kernel and result without the Python wrapper of torch.library, which small calls pay for.
    torch.compile always sees the op as registered."""
    if torch.compiler.is_compiling() or (
            torch.is_grad_enabled() and any(isinstance(a, Tensor) and a.requires_grad for a in args)):
        return op(*args)
    with torch._C._AutoDispatchBelowAutograd():
        return op(*args)


# ---------------------------------------------------------------- layer norm
def layer_norm_fwd_fake(x, weight, bias, residual, eps, rms):
    M, N = x.shape
    y = x.new_empty((M, N))
    h = x.new_empty((M, N) if residual is not None else (0,))
    mean = x.new_empty((0,) if rms else (M,), dtype=_stat_dtype(x.dtype))
    rstd = x.new_empty((M,), dtype=_stat_dtype(x.dtype))
    return y, h, mean, rstd


def layer_norm_bwd_fake(dy, h, weight, mean, rstd, dh, rms, has_bias):
    N = h.shape[1]
    pdtype = weight.dtype if weight is not None else h.dtype
    dw = h.new_empty((N,) if weight is not None else (0,), dtype=pdtype)
    db = h.new_empty((N,) if has_bias else (0,), dtype=pdtype)
    return h.new_empty(h.shape), dw, db


def register_layer_norm(fwd_name: str, bwd: Callable, autograd: bool = True) -> None:
    """Fake kernels and autograd (unless ``autograd`` is False) for a layer_norm fwd op whose backward op is
    ``bwd``."""

    def setup_context(ctx, inputs, output):
        x, weight, bias, residual, eps, rms = inputs
        _, h, mean, rstd = output
        ctx.save_for_backward(h if residual is not None else x, weight, mean, rstd)
        ctx.rms, ctx.has_bias, ctx.has_residual = rms, bias is not None, residual is not None
        ctx.bias_dtype = None if bias is None else bias.dtype
        # an unused output's gradient stays None, not a tensor of zeros: post-norm blocks never read the sum
        # x + residual, and the kernel skips dh = None
        ctx.set_materialize_grads(False)

    def backward(ctx, dy, dh, _dmean, _drstd):
        hx, weight, mean, rstd = ctx.saved_tensors
        dy = torch.zeros_like(hx) if dy is None else dy.contiguous()
        dh = dh.contiguous() if (ctx.has_residual and dh is not None) else None
        # The bwd ops return dbias in the weight's dtype (x's without a weight). An fp32 bias beside a 16-bit
        # weight (or none) must get its gradient in fp32, not rounded to 16 bits: ask the kernel for fp32
        # dweight/dbias with an fp32 weight (ones when there is none), and round dweight once afterwards.
        w = weight
        pdtype = weight.dtype if weight is not None else hx.dtype
        if ctx.bias_dtype == torch.float32 and pdtype in (torch.float16, torch.bfloat16):
            w = weight.float() if weight is not None else hx.new_ones(hx.shape[1], dtype=torch.float32)
        dx, dw, db = bwd(dy, hx, w, mean, rstd, dh, ctx.rms, ctx.has_bias)
        return (dx, dw.to(weight.dtype) if weight is not None else None, db if ctx.has_bias else None,
                dx if ctx.has_residual else None, None, None)

    torch.library.register_fake(fwd_name)(layer_norm_fwd_fake)
    if autograd:
        torch.library.register_autograd(fwd_name, backward, setup_context=setup_context)


# ---------------------------------------------------------------- attention
def attention_fwd_fake(q, k, v, key_padding_mask, causal, softmax_scale):
    B, Nq, Hq, D = q.shape
    return q.new_empty((B, Nq, Hq, D)), q.new_empty((B, Hq, Nq), dtype=_stat_dtype(q.dtype))


def attention_bwd_fake(dout, q, k, v, out, lse, key_padding_mask, causal, softmax_scale, deterministic):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def register_attention(fwd_name: str, bwd: Callable, autograd: bool = True) -> None:
    """Fake kernels and autograd (unless ``autograd`` is False) for an attention fwd op whose backward op is ``bwd``.

    The log-sum-exp output carries no gradient (as in FlashAttention); the public op returns it detached.
    """

    def setup_context(ctx, inputs, output):
        q, k, v, key_padding_mask, causal, softmax_scale = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, out, lse, key_padding_mask)
        ctx.causal, ctx.scale = causal, softmax_scale

    def backward(ctx, dout, _dlse):
        q, k, v, out, lse, mask = ctx.saved_tensors
        dout = torch.zeros_like(out) if dout is None else dout.contiguous()
        deterministic = torch.are_deterministic_algorithms_enabled()
        dq, dk, dv = bwd(dout, q, k, v, out, lse, mask, ctx.causal, ctx.scale, deterministic)
        return dq, dk, dv, None, None, None

    torch.library.register_fake(fwd_name)(attention_fwd_fake)
    if autograd:
        torch.library.register_autograd(fwd_name, backward, setup_context=setup_context)


# ---------------------------------------------------------------- linear cross-entropy
def linear_cross_entropy_fwd_fake(hidden, weight, labels, bias, ignore_index, label_smoothing, softcap, z_loss,
                                  mean, chunk_size, compute_grad):
    N, H = hidden.shape
    V = weight.shape[0]
    loss = hidden.new_empty((), dtype=_stat_dtype(hidden.dtype))
    dbias = weight.new_empty((V,) if (compute_grad and bias is not None) else (0,))
    return (loss, hidden.new_empty((N, H) if compute_grad else (0,)),
            weight.new_empty((V, H) if compute_grad else (0,)), dbias)


# References to a saved gradient's storage while autograd alone holds it (3 with torch 2.13: the saved copy, the
# unpacked tensor and one internal reference); one more means the caller kept the op's output (a direct
# torch.ops call). tests/test_linear_cross_entropy.py checks that such an output is left unchanged.
_LCE_PRIVATE_REFS = 3


def _lce_scale(dloss):
    """How backward turns a saved (final) gradient t into the returned one, t * dloss, without a full pass
    over (V, H) and (N, H) where that is safe. Eager only (a traced backward stays functional), and only when
    the graph is not kept (no retain_graph/create_graph: autograd frees the saved gradients after this node)
    and nobody else holds them: then on the CPU, dloss == 1 (``loss.backward()``) returns t itself, and any
    other dloss scales t in place. Otherwise out of place, as before."""
    out_of_place = lambda t: t * dloss.to(t.dtype)  # noqa: E731
    if torch.compiler.is_compiling() or type(dloss) is not torch.Tensor or dloss.requires_grad:
        return out_of_place
    if getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", lambda: True)():
        return out_of_place
    one = dloss.device.type == "cpu" and dloss.item() == 1.0

    def scale(t):
        use_count = getattr(torch._C, "_storage_Use_Count", None)
        if use_count is None or use_count(t.untyped_storage()._cdata) > _LCE_PRIVATE_REFS:
            return out_of_place(t)
        return t if one else t.mul_(dloss.to(t.dtype))
    return scale


def register_linear_cross_entropy(fwd_name: str) -> None:
    """Fake kernel and autograd for a linear_cross_entropy fwd op. The forward already computed the
    gradients (chunk by chunk, while it had each chunk's logits); backward scales them by the incoming
    scalar gradient (see _lce_scale). Only the loss is differentiable."""

    def setup_context(ctx, inputs, output):
        bias, compute_grad = inputs[3], inputs[-1]
        _, dhidden, dweight, dbias = output
        ctx.save_for_backward(dhidden, dweight, dbias)
        ctx.has_bias, ctx.compute_grad = bias is not None, compute_grad
        # the gradients reaching the three gradient outputs are always None: leave them None instead of
        # zeros (a (vocab, hidden) float32 tensor of zeros in every backward pass otherwise)
        ctx.set_materialize_grads(False)

    def backward(ctx, dloss, _dh, _dw, _db):
        if dloss is None:  # only the gradient outputs were backpropagated through: they are not differentiable
            return (None,) * 11
        if not ctx.compute_grad:
            raise RuntimeError("linear_cross_entropy: backward through a call made with compute_grad=False "
                               "(its gradients were not computed)")
        dhidden, dweight, dbias = ctx.saved_tensors
        scale = _lce_scale(dloss)
        return (scale(dhidden), scale(dweight), None, scale(dbias) if ctx.has_bias else None,
                None, None, None, None, None, None, None)

    torch.library.register_fake(fwd_name)(linear_cross_entropy_fwd_fake)
    torch.library.register_autograd(fwd_name, backward, setup_context=setup_context)


# ---------------------------------------------------------------- rotary
def rotary_fake(q, k, cos, sin, interleaved, conjugate):
    return q.new_empty(q.shape), k.new_empty(k.shape)


def register_rotary(name: str, op: Callable, autograd: bool = True) -> None:
    """Fake kernel and autograd for a rotary op: the gradient of a rotation is the inverse rotation,
    the same op with ``conjugate`` flipped. cos/sin get no gradient (the op layer sends tables that
    require grad to the reference)."""

    def setup_context(ctx, inputs, output):
        _, _, cos, sin, interleaved, conjugate = inputs
        ctx.save_for_backward(cos, sin)
        ctx.interleaved, ctx.conjugate = interleaved, conjugate

    def backward(ctx, dq, dk):
        cos, sin = ctx.saved_tensors
        dq, dk = (g.contiguous() for g in (dq, dk))
        gq, gk = op(dq, dk, cos, sin, ctx.interleaved, not ctx.conjugate)
        return gq, gk, None, None, None, None

    torch.library.register_fake(name)(rotary_fake)
    if autograd:  # pyllm::rotary's is registered in C++ (csrc/autograd.cpp) by extensions that have it
        torch.library.register_autograd(name, backward, setup_context=setup_context)


# ---------------------------------------------------------------- gelu (tanh approximation)
def gelu_tanh_fake(x):
    return x.new_empty(x.shape)


def gelu_tanh_bwd_fake(dy, x):
    return x.new_empty(x.shape)


def register_gelu_tanh(fwd_name: str, bwd_name: str, bwd: Callable) -> None:
    """Fakes and autograd for a gelu_tanh fwd op whose backward op is ``bwd`` (it saves the input)."""

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        return bwd(dy.contiguous(), x)

    torch.library.register_fake(fwd_name)(gelu_tanh_fake)
    torch.library.register_fake(bwd_name)(gelu_tanh_bwd_fake)
    torch.library.register_autograd(fwd_name, backward, setup_context=setup_context)
# ---------------------------------------------------------------- attention with FlashAttention's features
# attention_ext_fwd(q, k, v, key_padding_mask, causal, softmax_scale, window_left, window_right, softcap,
#                   alibi_slopes, attn_bias, dropout_p, seed, offset, drop_lq, drop_lk) -> (out, lse)
# attention_ext_bwd(dout, q, k, v, out, lse, <the same from key_padding_mask on>, bias_grad, deterministic)
#   -> (dq, dk, dv, dbias)   (contract: csrc/pyllm.cpp)
def attention_ext_fwd_fake(q, k, v, key_padding_mask, causal, softmax_scale, *features):
    return attention_fwd_fake(q, k, v, key_padding_mask, causal, softmax_scale)


def attention_ext_bwd_fake(dout, q, k, v, out, lse, key_padding_mask, causal, softmax_scale, window_left, window_right,
                           softcap, alibi_slopes, attn_bias, dropout_p, seed, offset, drop_lq, drop_lk, bias_grad,
                           deterministic):
    dbias = attn_bias.new_empty(attn_bias.shape) if (bias_grad and attn_bias is not None) else q.new_empty((0,))
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dbias


def register_attention_ext(fwd_name: str, bwd: Callable) -> None:
    """Fake kernels and autograd for an attention_ext fwd op whose backward op is ``bwd``; attn_bias
    (input 10) gets its gradient when it requires one."""

    def setup_context(ctx, inputs, output):
        q, k, v, key_padding_mask = inputs[:4]
        alibi, bias = inputs[9], inputs[10]
        out, lse = output
        ctx.save_for_backward(q, k, v, out, lse, key_padding_mask, alibi, bias)
        ctx.args = inputs[4:9] + inputs[11:]  # causal, scale, window_left, window_right, softcap, p, seed, ...
        ctx.bias_grad = bias is not None and ctx.needs_input_grad[10]

    def backward(ctx, dout, _dlse):
        q, k, v, out, lse, mask, alibi, bias = ctx.saved_tensors
        dout = torch.zeros_like(out) if dout is None else dout.contiguous()
        causal, scale, wl, wr, cap = ctx.args[:5]
        rest = ctx.args[5:]
        dq, dk, dv, dbias = bwd(dout, q, k, v, out, lse, mask, causal, scale, wl, wr, cap, alibi, bias, *rest,
                                ctx.bias_grad, torch.are_deterministic_algorithms_enabled())
        return (dq, dk, dv) + (None,) * 7 + (dbias if ctx.bias_grad else None,) + (None,) * 5

    torch.library.register_fake(fwd_name)(attention_ext_fwd_fake)
    torch.library.register_autograd(fwd_name, backward, setup_context=setup_context)


# ---------------------------------------------------------------- packed sequences in one call
# attention_varlen_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, softmax_scale,
#                      window_left, window_right, softcap, alibi_slopes, dropout_p, seed, offset) -> (out, lse)
# attention_varlen_bwd(dout, q, k, v, out, lse, <the same from cu_seqlens_q on>, deterministic) -> (dq, dk, dv)
#   q (total_q, Hq, D), k, v (total_k, Hkv, D); out like q, lse (Hq, total_q)   (contract: csrc/pyllm.cpp)
def attention_varlen_fwd_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, *features):
    return q.new_empty(q.shape), q.new_empty((q.shape[1], q.shape[0]), dtype=_stat_dtype(q.dtype))


def attention_varlen_bwd_fake(dout, q, k, v, *rest):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def register_attention_varlen(fwd_name: str, bwd: Callable) -> None:
    """Fake kernels and autograd for an attention_varlen fwd op whose backward op is ``bwd``."""

    def setup_context(ctx, inputs, output):
        q, k, v, cu_q, cu_k = inputs[:5]
        out, lse = output
        ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k, inputs[12])
        ctx.args = inputs[5:12], inputs[13:]  # (max_q, max_k, causal, scale, window, softcap), (p, seed, offset)

    def backward(ctx, dout, _dlse):
        q, k, v, out, lse, cu_q, cu_k, alibi = ctx.saved_tensors
        dout = torch.zeros_like(out) if dout is None else dout.contiguous()
        dq, dk, dv = bwd(dout, q, k, v, out, lse, cu_q, cu_k, *ctx.args[0], alibi, *ctx.args[1],
                         torch.are_deterministic_algorithms_enabled())
        return (dq, dk, dv) + (None,) * 13

    torch.library.register_fake(fwd_name)(attention_varlen_fwd_fake)
    torch.library.register_autograd(fwd_name, backward, setup_context=setup_context)


# ---------------------------------------------------------------- dropout under torch.compile
# The kernel ops take the Philox seed and offset as ints (csrc/pyllm.cpp). Ints read from a tensor in Python
# would break a torch.compile(fullgraph=True) graph, so calls with dropout go through these two ops: they take
# the (2,) int64 [seed, offset] tensor that pyllm.reference.draw_dropout_rng draws with torch ops (traced, and
# reproduced by torch.manual_seed) and read it when they run. ``kernel``: "triton", or "native" for the C++ op
# of the tensors' device; cu_seqlens_q/k given: the packed (attention_varlen) ops, where drop_lq/lk are the
# max_seqlens, else the attention_ext ops.
def _dropout_ops(kernel: str, packed: bool):
    ops = torch.ops.pyllm
    if packed:
        return ((ops.triton_attention_varlen_fwd, ops.triton_attention_varlen_bwd) if kernel == "triton"
                else (ops.attention_varlen_fwd, ops.attention_varlen_bwd))
    return ((ops.triton_attention_ext_fwd, ops.triton_attention_ext_bwd) if kernel == "triton"
            else (ops.attention_ext_fwd, ops.attention_ext_bwd))


def _seed_offset(rng: Tensor) -> tuple[int, int]:
    seed, offset = rng.tolist()
    return seed, offset


@torch.library.custom_op("pyllm::attention_dropout_fwd", mutates_args=())
def attention_dropout_fwd(
    kernel: str, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor], cu_seqlens_q: Optional[Tensor],
    cu_seqlens_k: Optional[Tensor], causal: bool, softmax_scale: float, window_left: int, window_right: int,
    softcap: float, alibi_slopes: Optional[Tensor], attn_bias: Optional[Tensor], dropout_p: float, rng: Tensor,
    drop_lq: int, drop_lk: int,
) -> tuple[Tensor, Tensor]:
    seed, offset = _seed_offset(rng)
    fwd, _ = _dropout_ops(kernel, cu_seqlens_q is not None)
    if cu_seqlens_q is not None:
        return fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, drop_lq, drop_lk, causal, softmax_scale, window_left,
                   window_right, softcap, alibi_slopes, dropout_p, seed, offset)
    return fwd(q, k, v, key_padding_mask, causal, softmax_scale, window_left, window_right, softcap, alibi_slopes,
               attn_bias, dropout_p, seed, offset, drop_lq, drop_lk)


@torch.library.custom_op("pyllm::attention_dropout_bwd", mutates_args=())
def attention_dropout_bwd(
    kernel: str, dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
    key_padding_mask: Optional[Tensor], cu_seqlens_q: Optional[Tensor], cu_seqlens_k: Optional[Tensor], causal: bool,
    softmax_scale: float, window_left: int, window_right: int, softcap: float, alibi_slopes: Optional[Tensor],
    attn_bias: Optional[Tensor], dropout_p: float, rng: Tensor, drop_lq: int, drop_lk: int, bias_grad: bool,
    deterministic: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    seed, offset = _seed_offset(rng)
    _, bwd = _dropout_ops(kernel, cu_seqlens_q is not None)
    if cu_seqlens_q is not None:
        dq, dk, dv = bwd(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, drop_lq, drop_lk, causal, softmax_scale,
                         window_left, window_right, softcap, alibi_slopes, dropout_p, seed, offset, deterministic)
        return dq, dk, dv, q.new_empty((0,))
    return bwd(dout, q, k, v, out, lse, key_padding_mask, causal, softmax_scale, window_left, window_right, softcap,
               alibi_slopes, attn_bias, dropout_p, seed, offset, drop_lq, drop_lk, bias_grad, deterministic)


@torch.library.register_fake("pyllm::attention_dropout_fwd")
def _attention_dropout_fwd_fake(kernel, q, k, v, key_padding_mask, cu_seqlens_q, *rest):
    if cu_seqlens_q is not None:
        return attention_varlen_fwd_fake(q, k, v, cu_seqlens_q, None)
    return attention_fwd_fake(q, k, v, key_padding_mask, False, 1.0)


@torch.library.register_fake("pyllm::attention_dropout_bwd")
def _attention_dropout_bwd_fake(kernel, dout, q, k, v, out, lse, key_padding_mask, cu_seqlens_q, cu_seqlens_k,
                                causal, softmax_scale, window_left, window_right, softcap, alibi_slopes, attn_bias,
                                dropout_p, rng, drop_lq, drop_lk, bias_grad, deterministic):
    dbias = attn_bias.new_empty(attn_bias.shape) if (bias_grad and attn_bias is not None) else q.new_empty((0,))
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dbias


def _attention_dropout_setup(ctx, inputs, output):
    (kernel, q, k, v, kpm, cu_q, cu_k, causal, scale, wl, wr, cap, alibi, bias, p, rng, lq, lk) = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, kpm, cu_q, cu_k, alibi, bias, rng)
    ctx.args = (kernel, causal, scale, wl, wr, cap, p, lq, lk)
    ctx.bias_grad = bias is not None and ctx.needs_input_grad[13]


def _attention_dropout_backward(ctx, dout, _dlse):
    q, k, v, out, lse, kpm, cu_q, cu_k, alibi, bias, rng = ctx.saved_tensors
    kernel, causal, scale, wl, wr, cap, p, lq, lk = ctx.args
    dout = torch.zeros_like(out) if dout is None else dout.contiguous()
    dq, dk, dv, dbias = attention_dropout_bwd(kernel, dout, q, k, v, out, lse, kpm, cu_q, cu_k, causal, scale, wl, wr,
                                              cap, alibi, bias, p, rng, lq, lk, ctx.bias_grad,
                                              torch.are_deterministic_algorithms_enabled())
    return (None, dq, dk, dv) + (None,) * 9 + (dbias if ctx.bias_grad else None,) + (None,) * 4


torch.library.register_autograd("pyllm::attention_dropout_fwd", _attention_dropout_backward,
                                setup_context=_attention_dropout_setup)


# ---------------------------------------------------------------- Triton custom ops
# Custom ops (not triton_op): under TRITON_INTERPRET=1 a triton_op runs its kernel on fake tensors and
# fails opcheck and torch.compile; custom_op + register_fake passes both there and on a GPU.
@torch.library.custom_op("pyllm::triton_layer_norm_fwd", mutates_args=())
def triton_layer_norm_fwd(
    x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], residual: Optional[Tensor], eps: float, rms: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    from pyllm.kernels import layer_norm as K

    return K.layer_norm_fwd(x, weight, bias, residual, eps, rms)


@torch.library.custom_op("pyllm::triton_layer_norm_bwd", mutates_args=())
def triton_layer_norm_bwd(
    dy: Tensor, h: Tensor, weight: Optional[Tensor], mean: Tensor, rstd: Tensor, dh: Optional[Tensor],
    rms: bool, has_bias: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    from pyllm.kernels import layer_norm as K

    return K.layer_norm_bwd(dy, h, weight, mean, rstd, dh, rms, has_bias)


@torch.library.custom_op("pyllm::triton_attention_fwd", mutates_args=())
def triton_attention_fwd(
    q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor], causal: bool, softmax_scale: float
) -> tuple[Tensor, Tensor]:
    from pyllm.kernels import attention as K

    return K.attention_fwd(q, k, v, key_padding_mask, causal, softmax_scale)


@torch.library.custom_op("pyllm::triton_attention_bwd", mutates_args=())
def triton_attention_bwd(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, key_padding_mask: Optional[Tensor],
    causal: bool, softmax_scale: float, deterministic: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    from pyllm.kernels import attention as K

    return K.attention_bwd(dout, q, k, v, out, lse, key_padding_mask, causal, softmax_scale, deterministic)


@torch.library.custom_op("pyllm::triton_linear_cross_entropy_fwd", mutates_args=())
def triton_linear_cross_entropy_fwd(
    hidden: Tensor, weight: Tensor, labels: Tensor, bias: Optional[Tensor], ignore_index: int,
    label_smoothing: float, softcap: float, z_loss: float, mean: bool, chunk_size: int, compute_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    from pyllm.kernels import linear_cross_entropy as K

    return K.linear_cross_entropy_fwd(hidden, weight, labels, bias, ignore_index, label_smoothing, softcap,
                                      z_loss, mean, chunk_size, compute_grad)


@torch.library.custom_op("pyllm::triton_rotary", mutates_args=())
def triton_rotary(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, interleaved: bool,
                  conjugate: bool) -> tuple[Tensor, Tensor]:
    from pyllm.kernels import rotary as K

    return K.rotary(q, k, cos, sin, interleaved, conjugate)
@torch.library.custom_op("pyllm::triton_attention_ext_fwd", mutates_args=())
def triton_attention_ext_fwd(
    q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor], causal: bool, softmax_scale: float,
    window_left: int, window_right: int, softcap: float, alibi_slopes: Optional[Tensor], attn_bias: Optional[Tensor],
    dropout_p: float, seed: int, offset: int, drop_lq: int, drop_lk: int,
) -> tuple[Tensor, Tensor]:
    from pyllm.kernels import attention as K

    return K.attention_ext_fwd(q, k, v, key_padding_mask, causal, softmax_scale, window_left, window_right, softcap,
                               alibi_slopes, attn_bias, dropout_p, seed, offset, drop_lq, drop_lk)


@torch.library.custom_op("pyllm::triton_attention_ext_bwd", mutates_args=())
def triton_attention_ext_bwd(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, key_padding_mask: Optional[Tensor],
    causal: bool, softmax_scale: float, window_left: int, window_right: int, softcap: float,
    alibi_slopes: Optional[Tensor], attn_bias: Optional[Tensor], dropout_p: float, seed: int, offset: int,
    drop_lq: int, drop_lk: int, bias_grad: bool, deterministic: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    from pyllm.kernels import attention as K

    return K.attention_ext_bwd(dout, q, k, v, out, lse, key_padding_mask, causal, softmax_scale, window_left,
                               window_right, softcap, alibi_slopes, attn_bias, dropout_p, seed, offset, drop_lq,
                               drop_lk, bias_grad, deterministic)


torch.library.register_fake("pyllm::triton_layer_norm_bwd")(layer_norm_bwd_fake)
torch.library.register_fake("pyllm::triton_attention_bwd")(attention_bwd_fake)
register_layer_norm("pyllm::triton_layer_norm_fwd", triton_layer_norm_bwd)
register_attention("pyllm::triton_attention_fwd", triton_attention_bwd)
register_linear_cross_entropy("pyllm::triton_linear_cross_entropy_fwd")
register_rotary("pyllm::triton_rotary", triton_rotary)
torch.library.register_fake("pyllm::triton_attention_ext_bwd")(attention_ext_bwd_fake)
register_attention_ext("pyllm::triton_attention_ext_fwd", triton_attention_ext_bwd)


@torch.library.custom_op("pyllm::triton_attention_varlen_fwd", mutates_args=())
def triton_attention_varlen_fwd(
    q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, max_seqlen_q: int,
    max_seqlen_k: int, causal: bool, softmax_scale: float, window_left: int, window_right: int, softcap: float,
    alibi_slopes: Optional[Tensor], dropout_p: float, seed: int, offset: int,
) -> tuple[Tensor, Tensor]:
    from pyllm.kernels import attention as K

    return K.attention_varlen_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal,
                                  softmax_scale, window_left, window_right, softcap, alibi_slopes, dropout_p, seed,
                                  offset)


@torch.library.custom_op("pyllm::triton_attention_varlen_bwd", mutates_args=())
def triton_attention_varlen_bwd(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor, max_seqlen_q: int, max_seqlen_k: int, causal: bool, softmax_scale: float,
    window_left: int, window_right: int, softcap: float, alibi_slopes: Optional[Tensor], dropout_p: float,
    seed: int, offset: int, deterministic: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    from pyllm.kernels import attention as K

    return K.attention_varlen_bwd(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                  causal, softmax_scale, window_left, window_right, softcap, alibi_slopes, dropout_p,
                                  seed, offset, deterministic)


torch.library.register_fake("pyllm::triton_attention_varlen_bwd")(attention_varlen_bwd_fake)
register_attention_varlen("pyllm::triton_attention_varlen_fwd", triton_attention_varlen_bwd)


@torch.library.custom_op("pyllm::triton_gelu_tanh_fwd", mutates_args=())
def triton_gelu_tanh_fwd(x: Tensor) -> Tensor:
    from pyllm.kernels import activation as K

    return K.gelu_tanh_fwd(x)


@torch.library.custom_op("pyllm::triton_gelu_tanh_bwd", mutates_args=())
def triton_gelu_tanh_bwd(dy: Tensor, x: Tensor) -> Tensor:
    from pyllm.kernels import activation as K

    return K.gelu_tanh_bwd(dy, x)


register_gelu_tanh("pyllm::triton_gelu_tanh_fwd", "pyllm::triton_gelu_tanh_bwd", triton_gelu_tanh_bwd)


def _register_extension_ops() -> None:
    """Fakes and autograd for the C++ ops, once pyllm._C has registered their schemas."""
    from pyllm import _ext

    if _ext.load_error() is not None:
        return
    ops = torch.ops.pyllm
    torch.library.register_fake("pyllm::layer_norm_bwd")(layer_norm_bwd_fake)
    torch.library.register_fake("pyllm::attention_bwd")(attention_bwd_fake)
    # layer_norm_fwd and attention_fwd have their autograd in C++ (csrc/autograd.cpp; the Python wrapper cost small
    # calls ~20 us); these formulas serve them only in an extension built before that existed. Asked before any
    # Python registration for them, so a kernel at the Autograd key can only be the C++ one.
    cpp = [torch._C._dispatch_has_kernel_for_dispatch_key(f"pyllm::{op}", "Autograd")
           for op in ("layer_norm_fwd", "attention_fwd", "rotary") if hasattr(ops, op)]
    register_layer_norm("pyllm::layer_norm_fwd", ops.layer_norm_bwd, autograd=not cpp[0])
    register_attention("pyllm::attention_fwd", ops.attention_bwd, autograd=not cpp[1])
    if hasattr(ops, "linear_cross_entropy_fwd"):  # an extension built before the op existed lacks it
        register_linear_cross_entropy("pyllm::linear_cross_entropy_fwd")
    if hasattr(ops, "rotary"):  # absent from an extension built before the op existed (backends say so)
        register_rotary("pyllm::rotary", ops.rotary, autograd=not cpp[2])
    if hasattr(ops, "attention_ext_fwd"):
        torch.library.register_fake("pyllm::attention_ext_bwd")(attention_ext_bwd_fake)
        register_attention_ext("pyllm::attention_ext_fwd", ops.attention_ext_bwd)
    if hasattr(ops, "attention_varlen_fwd"):  # absent from an extension built before the op existed
        torch.library.register_fake("pyllm::attention_varlen_bwd")(attention_varlen_bwd_fake)
        register_attention_varlen("pyllm::attention_varlen_fwd", ops.attention_varlen_bwd)
    if hasattr(ops, "gelu_tanh_fwd"):  # absent from an extension built before the op existed
        register_gelu_tanh("pyllm::gelu_tanh_fwd", "pyllm::gelu_tanh_bwd", ops.gelu_tanh_bwd)


_register_extension_ops()
