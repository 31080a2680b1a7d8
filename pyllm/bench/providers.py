"""Who is measured: pyllm's backends, PyTorch's own implementations, and optional peer libraries.

Each :class:`Provider` says whether it can run on this machine at all (:meth:`status`), whether it can
serve one case (:meth:`unsupported`), and builds a zero-argument callable for a case from prepared
inputs (:meth:`attention_fn`, :meth:`norm_fn`). Inputs come in the provider's own layout (``bnhd`` is
pyllm's and FlashAttention's (B, N, H, D); ``bhnd`` is SDPA's (B, H, N, D)) so no timed call pays for a
transpose copy. Peers (flash_attn, xformers, liger_kernel, apex) are never dependencies: missing ones
report "not installed".
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util

import torch
import torch.nn.functional as F

from .spec import BenchError

BASELINES = {"attention": "sdpa", "layer_norm": "torch", "rms_norm": "torch", "rotary": "rotate-half",
             "train_step": "pyllm-reference", "linear_cross_entropy": "torch-linear-ce", "gelu": "torch-gelu"}
NORM_EPS = {"layer_norm": 1e-5, "rms_norm": 1e-6}


class Provider:
    name = ""
    kind = "torch"  # pyllm | torch | peer
    ops: tuple[str, ...] = ()
    layout = "bnhd"
    quadratic = False  # memory grows with Nq * Nk (forms the score matrix)
    devices: tuple[str, ...] = ("cpu", "cuda")
    describe = ""

    def status(self, device: str) -> tuple[str, str]:
        """("ok", "") or (state, why) with state one of "not installed", "unavailable", "excluded"."""
        if device not in self.devices:
            return "unavailable", f"runs on {', '.join(self.devices)} only"
        return "ok", ""

    def unsupported(self, case, inputs: dict) -> str | None:
        """Why this provider cannot serve ``case`` (None = it can)."""
        return None

    def refuses(self, err: Exception) -> bool:
        """Whether ``err`` (raised by a call) means "this case is not supported" rather than a failure."""
        return False

    def attention_fn(self, case, q, k, v, mask, scale):
        raise NotImplementedError

    def norm_fn(self, case, x, w, b, r, eps):
        raise NotImplementedError

    def rotary_fn(self, case, q, k, cos, sin):
        raise NotImplementedError

    def lce_fn(self, case, hidden, weight, labels):
        raise NotImplementedError

    def gelu_fn(self, case, x):
        raise NotImplementedError


# ------------------------------------------------------------------------------------------- pyllm

def _pyllm_state() -> tuple[object | None, str]:
    try:
        import pyllm
        import pyllm.backends
        if not hasattr(pyllm, "attention"):
            return None, "pyllm.attention is missing (the op layer did not import)"
        return pyllm, ""
    except Exception as e:  # noqa: BLE001 (report, never crash the run)
        return None, f"import pyllm failed: {type(e).__name__}: {e}"


class PyllmProvider(Provider):
    kind = "pyllm"
    ops = ("attention", "layer_norm", "rms_norm", "rotary", "train_step", "linear_cross_entropy", "gelu")

    def __init__(self, backend: str):
        self.backend = backend
        self.name = f"pyllm-{backend}"
        self.quadratic = backend == "reference"
        self.describe = f"pyllm.<op>(..., backend={backend!r})"

    def status(self, device):
        pyllm, why = _pyllm_state()
        if pyllm is None:
            return "unavailable", why
        if self.backend not in pyllm.backends.available():
            return "unavailable", pyllm.backends.unavailable().get(self.backend, "not available")
        if self.backend == "triton" and device == "cpu":
            return "excluded", ("on CPU tensors Triton runs only in the interpreter (TRITON_INTERPRET=1), "
                                "far too slow to time; checked by the test suite instead")
        if self.backend == "cuda" and device != "cuda":
            return "unavailable", "CUDA kernels need --device cuda"
        if self.backend == "cpu" and device != "cpu":
            return "unavailable", "CPU kernels need --device cpu"
        return "ok", ""

    def unsupported(self, case, inputs):
        import pyllm

        if case.op == "train_step":
            return None
        if case.op == "linear_cross_entropy":
            reasons = pyllm.backends.explain(case.op, inputs["hidden"], inputs["weight"], inputs["labels"])
        elif case.op == "attention":
            reasons = pyllm.backends.explain("attention", inputs["q"], inputs["k"], inputs["v"], causal=case.causal,
                                             key_padding_mask=inputs["mask"])
        elif case.op == "rotary":
            reasons = pyllm.backends.explain("rotary", inputs["q"], inputs["k"], inputs["cos"], inputs["sin"])
        elif case.op == "gelu":
            reasons = pyllm.backends.explain("gelu", inputs["x"], "tanh")
        else:
            x = inputs["x"]
            args = (x, (x.shape[-1],), inputs["w"]) + ((inputs["b"],) if case.op == "layer_norm" else ())
            reasons = pyllm.backends.explain(case.op, *args, NORM_EPS[case.op], residual=inputs["r"])
        why = reasons.get(self.backend)
        return "; ".join(why) if why else None

    def attention_fn(self, case, q, k, v, mask, scale):
        import pyllm

        return lambda: pyllm.attention(q, k, v, causal=case.causal, softmax_scale=scale, key_padding_mask=mask,
                                       backend=self.backend)

    def norm_fn(self, case, x, w, b, r, eps):
        import pyllm

        N = x.shape[-1]
        if case.op == "layer_norm":
            return lambda: pyllm.layer_norm(x, (N,), w, b, eps, residual=r, backend=self.backend)
        return lambda: pyllm.rms_norm(x, (N,), w, eps, residual=r, backend=self.backend)

    def rotary_fn(self, case, q, k, cos, sin):
        import pyllm

        return lambda: pyllm.rotary(q, k, cos, sin, backend=self.backend)

    def gelu_fn(self, case, x):
        import pyllm

        return lambda: pyllm.gelu(x, "tanh", backend=self.backend)

    def lce_fn(self, case, hidden, weight, labels):
        import pyllm

        return lambda: pyllm.linear_cross_entropy(hidden, weight, labels, backend=self.backend)


# ------------------------------------------------------------------------------------------- torch

def _sdpa_kwargs(q, k, mask, causal):
    """SDPA takes top-left is_causal and no key-padding argument: build one bool mask when needed."""
    Nq, Nk = q.shape[-2], k.shape[-2]
    if mask is None and (not causal or Nq == Nk):
        return {"attn_mask": None, "is_causal": causal}
    allowed = None if mask is None else mask[:, None, None, :]  # (B, 1, 1, Nk)
    if causal:  # pyllm's causal is bottom-right aligned
        tri = torch.ones(Nq, Nk, dtype=torch.bool, device=q.device).tril(Nk - Nq)
        allowed = tri if allowed is None else allowed & tri  # (B, 1, Nq, Nk)
    return {"attn_mask": allowed, "is_causal": False}


class SDPAProvider(Provider):
    ops = ("attention",)
    layout = "bhnd"

    def __init__(self, name: str, backend: str | None):
        self.name, self.sdpa_backend = name, backend
        self.quadratic = backend == "MATH"
        self.devices = ("cpu", "cuda") if backend is None else ("cuda",)
        self.describe = ("F.scaled_dot_product_attention (default dispatch)" if backend is None
                         else f"F.scaled_dot_product_attention under sdpa_kernel(SDPBackend.{backend})")

    def status(self, device):
        st = super().status(device)
        if st[0] != "ok" or self.sdpa_backend is None:
            return st
        if self.sdpa_backend == "FLASH_ATTENTION" and not torch.backends.cuda.is_flash_attention_available():
            return "unavailable", "this torch build has no flash SDPA kernel"
        if self.sdpa_backend == "CUDNN_ATTENTION" and not torch.backends.cudnn.is_available():
            return "unavailable", "cuDNN is not available"
        return "ok", ""

    def refuses(self, err):
        return self.sdpa_backend is not None and "No available kernel" in str(err)

    def attention_fn(self, case, q, k, v, mask, scale):
        kw = _sdpa_kwargs(q, k, mask, case.causal)
        gqa = q.shape[1] != k.shape[1]
        if self.sdpa_backend is None:
            ctx = contextlib.nullcontext
        else:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            backend = getattr(SDPBackend, self.sdpa_backend)
            ctx = lambda: sdpa_kernel(backend)  # noqa: E731

        def fn():
            with ctx():
                return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=gqa, **kw)
        return fn


class EagerAttention(Provider):
    """What users write by hand: softmax(q k^T * scale, masked) v in the input dtype."""

    name, ops, layout, quadratic = "eager", ("attention",), "bhnd", True
    describe = "eager PyTorch math: softmax(QK^T) V, in the input dtype"

    def attention_fn(self, case, q, k, v, mask, scale):
        kw = _sdpa_kwargs(q, k, mask, case.causal)
        allowed = kw["attn_mask"]
        if kw["is_causal"]:
            allowed = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
        rep = q.shape[1] // k.shape[1]

        def fn():
            kk = k.repeat_interleave(rep, dim=1) if rep > 1 else k  # GQA: expand kv heads
            vv = v.repeat_interleave(rep, dim=1) if rep > 1 else v
            s = torch.matmul(q, kk.transpose(-1, -2)) * scale  # (B, H, Nq, Nk)
            if allowed is not None:
                s = s.masked_fill(~allowed, float("-inf"))
            return torch.matmul(torch.softmax(s, dim=-1), vv)
        return fn


class TorchNorm(Provider):
    name, ops = "torch", ("layer_norm", "rms_norm")
    describe = "F.layer_norm / F.rms_norm (residual added first, unfused)"

    def norm_fn(self, case, x, w, b, r, eps):
        N = x.shape[-1]
        norm = ((lambda h: F.layer_norm(h, (N,), w, b, eps)) if case.op == "layer_norm"
                else (lambda h: F.rms_norm(h, (N,), w, eps)))
        if r is None:
            return lambda: norm(x)

        def fn():
            h = x + r
            return norm(h), h
        return fn


class TorchGelu(Provider):
    name, ops = "torch-gelu", ("gelu",)
    describe = 'F.gelu(x, approximate="tanh")'

    def gelu_fn(self, case, x):
        return lambda: F.gelu(x, approximate="tanh")


class TorchLinearCrossEntropy(Provider):
    name, ops = "torch-linear-ce", ("linear_cross_entropy",)
    describe = "F.cross_entropy(F.linear(hidden, weight).float(), labels) (the (tokens, vocab) logits stored)"

    def lce_fn(self, case, hidden, weight, labels):
        return lambda: F.cross_entropy(F.linear(hidden, weight).float(), labels)


# -------------------------------------------------------------------------------------------- peers

class RotateHalf(Provider):
    name, ops = "rotate-half", ("rotary",)
    describe = "q * cos + rotate_half(q) * sin, as transformers' Llama writes it (tables cast to the input dtype)"

    def rotary_fn(self, case, q, k, cos, sin):
        c, s = (torch.cat([t, t], dim=-1)[:, :, None].to(q.dtype) for t in (cos, sin))  # (1, N, 1, D)

        def rot(x):
            x1, x2 = x.chunk(2, dim=-1)
            return x * c + torch.cat([-x2, x1], dim=-1) * s
        return lambda: (rot(q), rot(k))


class PeerProvider(Provider):
    kind = "peer"
    module = ""
    devices = ("cuda",)

    def status(self, device):
        if importlib.util.find_spec(self.module) is None:
            return "not installed", f"pip install {self.module.replace('_', '-')} to compare"
        try:
            importlib.import_module(self.module)
        except Exception as e:  # noqa: BLE001
            return "unavailable", f"import {self.module} failed: {type(e).__name__}: {e}"
        return super().status(device)


class FlashAttnProvider(PeerProvider):
    name, module, ops = "flash_attn", "flash_attn", ("attention",)
    describe = "flash_attn.flash_attn_func (FlashAttention 2)"

    def unsupported(self, case, inputs):
        if case.dtype not in ("fp16", "bf16"):
            return "flash_attn takes fp16/bf16 only"
        if case.padding:
            return "key padding needs flash_attn_varlen_func (not wired here)"
        return None

    def attention_fn(self, case, q, k, v, mask, scale):
        from flash_attn import flash_attn_func

        return lambda: flash_attn_func(q, k, v, softmax_scale=scale, causal=case.causal)


class XformersProvider(PeerProvider):
    name, module, ops = "xformers", "xformers", ("attention",)
    describe = "xformers.ops.memory_efficient_attention"

    def unsupported(self, case, inputs):
        if case.padding:
            return "key padding needs a BlockDiagonal bias (not wired here)"
        if case.dim("Hq") != case.dim("Hkv"):
            return "GQA needs xformers' 5-D layout (not wired here)"
        return None

    def attention_fn(self, case, q, k, v, mask, scale):
        import xformers.ops as xops
        from xformers.ops.fmha import attn_bias

        bias = attn_bias.LowerTriangularFromBottomRightMask() if case.causal else None
        return lambda: xops.memory_efficient_attention(q, k, v, attn_bias=bias, scale=scale)


class LigerProvider(PeerProvider):
    name, module, ops = "liger_kernel", "liger_kernel", ("layer_norm", "rms_norm", "rotary", "linear_cross_entropy")
    describe = "liger_kernel's Triton LayerNorm/RMSNorm (residual added first), RoPE and fused linear cross-entropy"

    def rotary_fn(self, case, q, k, cos, sin):
        from liger_kernel.ops.rope import LigerRopeFunction

        c, s = (torch.cat([t, t], dim=-1).to(q.dtype) for t in (cos, sin))  # (1, N, D)
        # Liger takes (B, H, N, D): transposed views in, pyllm's layout out
        return lambda: tuple(t.transpose(1, 2) for t in LigerRopeFunction.apply(
            q.transpose(1, 2), k.transpose(1, 2), c, s))

    def lce_fn(self, case, hidden, weight, labels):
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        return lambda: liger_fused_linear_cross_entropy(hidden, weight, labels)

    def norm_fn(self, case, x, w, b, r, eps):
        if case.op == "layer_norm":
            from liger_kernel.ops.layer_norm import LigerLayerNormFunction

            norm = lambda h: LigerLayerNormFunction.apply(h, w, b, eps)  # noqa: E731
        else:
            from liger_kernel.ops.rms_norm import LigerRMSNormFunction

            def norm(h):
                try:  # newer versions: offset, casting mode, in_place (which would overwrite our dy)
                    return LigerRMSNormFunction.apply(h, w, eps, 0.0, "llama", False)
                except TypeError:
                    return LigerRMSNormFunction.apply(h, w, eps)
        return _with_residual(norm, x, r)


class ApexProvider(PeerProvider):
    name, module, ops = "apex", "apex", ("layer_norm", "rms_norm")
    describe = "apex.normalization fused_layer_norm_affine / fused_rms_norm_affine (residual added first)"

    def norm_fn(self, case, x, w, b, r, eps):
        from apex.normalization import fused_layer_norm as fln

        N = x.shape[-1]
        if case.op == "layer_norm":
            norm = lambda h: fln.fused_layer_norm_affine(h, w, b, (N,), eps)  # noqa: E731
        else:
            norm = lambda h: fln.fused_rms_norm_affine(h, w, (N,), eps)  # noqa: E731
        return _with_residual(norm, x, r)


def _with_residual(norm, x, r):
    if r is None:
        return lambda: norm(x)

    def fn():
        h = x + r
        return norm(h), h
    return fn


# ----------------------------------------------------------------------------------------- registry

def all_providers() -> list[Provider]:
    """Every provider this tool knows, available or not, in table order."""
    out: list[Provider] = [PyllmProvider(b) for b in ("cuda", "triton", "cpu", "reference")]
    out += [SDPAProvider("sdpa", None)]
    sdpa_backends = (("flash", "FLASH_ATTENTION"), ("efficient", "EFFICIENT_ATTENTION"), ("cudnn", "CUDNN_ATTENTION"),
                     ("math", "MATH"))
    out += [SDPAProvider(f"sdpa-{s}", b) for s, b in sdpa_backends]
    out += [EagerAttention(), TorchNorm(), TorchGelu(), RotateHalf(), TorchLinearCrossEntropy(), FlashAttnProvider(),
            XformersProvider(), LigerProvider(), ApexProvider()]
    return out


def select(names, ops, device) -> tuple[list[Provider], dict[str, dict]]:
    """The providers to run for ``ops`` and a {name: {kind, status, reason, ops, what}} table of all known
    providers of those ops (status "ok", "not installed", "unavailable", "excluded" or "not selected").

    ``names``: None for all; else names or groups ("pyllm", "torch", "peers"). Unknown names raise BenchError.
    The baseline of each op is always included so ratios exist.
    """
    known = {p.name: p for p in all_providers()}
    groups = {"pyllm": [n for n, p in known.items() if p.kind == "pyllm"],
              "torch": [n for n, p in known.items() if p.kind == "torch"],
              "peers": [n for n, p in known.items() if p.kind == "peer"]}
    if names:
        wanted = []
        for n in names:
            for part in str(n).split(","):
                part = part.strip()
                if part in groups:
                    wanted += groups[part]
                elif part in known:
                    wanted.append(part)
                else:
                    raise BenchError(f"--provider: unknown provider {part!r}; expected one of "
                                     f"{', '.join(list(known) + list(groups))}")
        wanted += [BASELINES[op] for op in ops]
    else:
        wanted = list(known)
    table, usable = {}, []
    for p in known.values():
        if not set(p.ops) & set(ops):
            continue
        state, why = p.status(device)
        if p.name not in wanted:
            state, why = "not selected", (f"{state}: {why}" if why else "")
        table[p.name] = {"kind": p.kind, "status": state, "reason": why, "ops": [o for o in p.ops if o in ops],
                         "what": p.describe}
        if state == "ok":
            usable.append(p)
    return usable, table
