"""What to measure: benchmark cases, named presets, user shapes, and the work each case does.

A :class:`Case` is one (op, mode, dtype, shape, options) point. FLOPs follow FlashAttention's count
(4 * B * H * Nq * Nk * D for the forward, halved when causal, x2.5 backward, x3.5 forward+backward);
bytes are the minimum an ideal kernel must move (each input read once, each output written once).
Everything here is plain Python: no torch import, so the CLI stays fast.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

OPS = ("attention", "layer_norm", "rms_norm", "rotary", "train_step", "linear_cross_entropy", "gelu")
MODES = ("fwd", "bwd", "fwd+bwd")  # train_step has the single mode "step"
DTYPES = {"fp32": 4, "fp16": 2, "bf16": 2, "fp64": 8}  # name -> bytes per element
_DTYPE_ALIASES = {"float32": "fp32", "float": "fp32", "float16": "fp16", "half": "fp16",
                  "bfloat16": "bf16", "float64": "fp64", "double": "fp64"}
PRESETS = ("quick", "default", "long", "decode", "small", "sweep")
# decode and small: issue 15's small-call cases (one generation step; small-batch inference and the norms
# at BERT/GPT-2 width), fwd only for decode, fwd and fwd+bwd for small, fp32 and bf16 (small: fp32 norms).
_SMALL_PRESETS = ("decode", "small")
# sweep: the ratio to torch from the smallest size to the largest, fp32 and bf16 (README's size-sweep plot):
# attention decode (Nq=1, fwd), prefill (Nq=Nk, fwd) and training (Nq=Nk, fwd+bwd); the norms over rows.
SWEEP_DECODE_NK = (16, 64, 256, 1024, 4096)
SWEEP_SEQ = (16, 64, 256, 1024, 2048)
SWEEP_ROWS = (16, 128, 1024, 4096, 16384)

# Attention dims are (B, Hq, Hkv, Nq, Nk, D); norms (M, N); training step (B, T) of a preset model.
_DIM_NAMES = {"attention": ("B", "Hq", "Hkv", "Nq", "Nk", "D"), "layer_norm": ("M", "N"),
              "rms_norm": ("M", "N"), "rotary": ("B", "N", "Hq", "Hk", "D"), "train_step": ("B", "T"),
              "linear_cross_entropy": ("N", "H", "V"), "gelu": ("M", "N")}


class BenchError(ValueError):
    """A bad request (unknown op or provider, impossible shape): the CLI prints it and exits with 2."""


@dataclass(frozen=True)
class Case:
    """One measurement point. ``dims`` are named by op (see ``_DIM_NAMES``); ``sweep`` tags the axis it
    belongs to (plots draw one line per provider along it); ``timed=False`` measures memory only."""

    op: str
    mode: str
    dtype: str
    dims: tuple[int, ...]
    causal: bool = False
    padding: bool = False
    residual: bool = False
    sweep: str = ""
    timed: bool = True
    model: tuple[tuple[str, int], ...] = ()  # train_step: model config (layers, hidden, heads, vocab)

    def dim(self, name: str) -> int:
        return self.dims[_DIM_NAMES[self.op].index(name)]

    @property
    def shape(self) -> dict[str, int]:
        return dict(zip(_DIM_NAMES[self.op], self.dims))

    @property
    def elem_bytes(self) -> int:
        return DTYPES[self.dtype]

    @property
    def torch_dtype(self):
        """The case's dtype as a ``torch.dtype`` (torch is imported here, not when spec is)."""
        import torch

        return getattr(torch, {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "fp64": "float64"}[self.dtype])

    def with_(self, **kw) -> "Case":
        return dataclasses.replace(self, **kw)

    def label(self) -> str:
        """Short shape text for tables: 'B4 H8 N1024 D64 causal', 'B1 H8/2 N128 D32 pad', '4096x768 +res'."""
        if self.op == "attention":
            B, Hq, Hkv, Nq, Nk, D = self.dims
            h = f"H{Hq}" if Hq == Hkv else f"H{Hq}/{Hkv}"
            n = f"N{Nq}" if Nq == Nk else f"N{Nq}:{Nk}"
            extra = (" causal" if self.causal else "") + (" pad" if self.padding else "")
            return f"B{B} {h} {n} D{D}{extra}"
        if self.op == "rotary":
            B, N, Hq, Hk, D = self.dims
            return f"B{B} N{N} H{Hq}/{Hk} D{D}"
        if self.op == "train_step":
            m = dict(self.model)
            return f"B{self.dims[0]} T{self.dims[1]} L{m.get('layers')} d{m.get('hidden')}"
        if self.op == "linear_cross_entropy":
            return "N{} H{} V{}".format(*self.dims)
        if self.op == "gelu":
            return "{}x{} tanh".format(*self.dims)
        return f"{self.dims[0]}x{self.dims[1]}" + (" +res" if self.residual else "")

    def key(self) -> tuple:
        """Identity without the mode: cases that share it share inputs and the correctness check."""
        return (self.op, self.dtype, self.dims, self.causal, self.padding, self.residual, self.model)

    def to_dict(self) -> dict:
        d = {"op": self.op, "mode": self.mode, "dtype": self.dtype, "shape": self.shape,
             "causal": self.causal, "padding": self.padding, "residual": self.residual,
             "sweep": self.sweep, "timed": self.timed, "label": self.label()}
        if self.model:
            d["model"] = dict(self.model)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Case":
        dims = tuple(int(d["shape"][n]) for n in _DIM_NAMES[d["op"]])
        return cls(op=d["op"], mode=d["mode"], dtype=d["dtype"], dims=dims, causal=d["causal"],
                   padding=d["padding"], residual=d["residual"], sweep=d.get("sweep", ""),
                   timed=d.get("timed", True), model=tuple(sorted(d.get("model", {}).items())))


# ---------------------------------------------------------------------------------------------- work

def kept_pairs(case: Case, key_lens=None) -> int:
    """The (query, key) pairs per head that the mask leaves, summed over the batch: causal (bottom-right
    aligned, query i sees key j iff j <= i + Nk - Nq) and key padding (``key_lens``: the number of real keys
    of each batch row, the first ones; required when ``case.padding``)."""
    B, _, _, Nq, Nk, _ = case.dims
    if case.padding and key_lens is None:
        raise ValueError(f"kept_pairs: case {case.label()} has padding; pass key_lens (real keys per batch row)")
    lens = [min(int(n), Nk) for n in key_lens] if key_lens is not None else [Nk] * B
    if len(lens) != B:
        raise ValueError(f"kept_pairs: key_lens has {len(lens)} entries but the case has B={B}")
    if not case.causal:
        return Nq * sum(lens)
    return sum(max(0, min(n, i + Nk - Nq + 1)) for n in lens for i in range(Nq))


def flops(case: Case, key_lens=None) -> float | None:
    """FLOPs of one call. Attention: FlashAttention's 4*D per (query, key) pair and head, counting only the
    pairs the mask leaves (:func:`kept_pairs`), so a provider that computes masked pairs is not credited for
    them; x2.5 for bwd, x3.5 for fwd+bwd. A training step: ~6*params*tokens plus causal attention."""
    if case.op == "attention":
        _, Hq, _, _, _, D = case.dims
        f = 4.0 * Hq * D * kept_pairs(case, key_lens)
        return f * {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}[case.mode]
    if case.op == "train_step":
        m = dict(case.model)
        B, T = case.dims
        L, d, V = m["layers"], m["hidden"], m["vocab"]
        params = 12 * L * d * d + V * d  # blocks + the (tied) output projection
        attn = 4.0 * B * T * (T + 1) / 2 * d * L * 3.5  # causal attention (the kept pairs), fwd + bwd
        return 6.0 * params * B * T + attn
    if case.op == "linear_cross_entropy":  # logits, then dhidden and dweight: 2*N*H*V each
        N, H, V = case.dims
        return 2.0 * N * H * V * {"fwd": 1.0, "bwd": 2.0, "fwd+bwd": 3.0}[case.mode]
    return None  # a norm's FLOPs say nothing; its figure is GB/s


def bytes_moved(case: Case, key_lens=None) -> float | None:
    """The least bytes an ideal kernel reads plus writes for one call. Attention reads only the real keys and
    values (``key_lens`` as in :func:`kept_pairs`) and writes every output and gradient, padded rows included."""
    e = case.elem_bytes
    if case.op == "attention":
        B, Hq, Hkv, Nq, Nk, D = case.dims
        if case.padding and key_lens is None:
            raise ValueError(f"bytes_moved: case {case.label()} has padding; pass key_lens (real keys per batch row)")
        real = sum(min(int(n), Nk) for n in key_lens) if key_lens is not None else B * Nk
        q, kv, kv_read = B * Nq * Hq * D, B * Nk * Hkv * D, real * Hkv * D
        fwd = e * (2 * q + 2 * kv_read)  # read q and the real k, v; write o
        bwd = e * (4 * q + 2 * kv_read + 2 * kv) + 4 * B * Hq * Nq  # read q o do (+lse), real k v; write dq dk dv
        return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[case.mode]
    if case.op in ("layer_norm", "rms_norm"):
        M, N = case.dims
        r = 1 if case.residual else 0
        params = (2 if case.op == "layer_norm" else 1) * N * e
        fwd = e * M * N * (2 + 2 * r) + params  # read x (+res); write y (+h)
        bwd = e * M * N * (3 + r) + 8 * M + 2 * params  # read dy, h (+dh); write dx; stats; dw, db
        return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[case.mode]
    if case.op == "rotary":
        B, N, Hq, Hk, D = case.dims
        one = e * 2 * B * N * (Hq + Hk) * D + 4 * 2 * N * D // 2  # read q, k (+ fp32 cos, sin); write both
        return {"fwd": one, "bwd": one, "fwd+bwd": 2 * one}[case.mode]
    if case.op == "gelu":  # fwd: read x, write y; bwd: read dy, x, write dx
        M, N = case.dims
        return e * M * N * {"fwd": 2, "bwd": 3, "fwd+bwd": 5}[case.mode]
    return None


# ------------------------------------------------------------------------------------------ parsing

def parse_dtype(name: str) -> str:
    n = _DTYPE_ALIASES.get(name.lower(), name.lower())
    if n not in DTYPES:
        raise BenchError(f"--dtype: expected one of {', '.join(DTYPES)}, got {name!r}")
    return n


def parse_ops(names) -> list[str]:
    out = []
    for n in names or OPS:
        for part in str(n).split(","):
            part = part.strip().replace("-", "_")
            if part == "norms":
                out += ["layer_norm", "rms_norm"]
                continue
            if part not in OPS:
                raise BenchError(f"--op: expected one of {', '.join(OPS)}, got {part!r}")
            out.append(part)
    return list(dict.fromkeys(out))


def parse_modes(names) -> list[str]:
    out = []
    for n in names or MODES:
        for part in str(n).split(","):
            part = part.strip().replace("fwdbwd", "fwd+bwd").replace("fwd_bwd", "fwd+bwd")
            if part not in MODES:
                raise BenchError(f"--mode: expected one of {', '.join(MODES)}, got {part!r}")
            out.append(part)
    return list(dict.fromkeys(out))


def parse_shape(text: str, ops: list[str]) -> tuple[str, tuple[int, ...]]:
    """'B,H,N,D' or 'B,H,N,D,Hkv' -> attention; 'M,N' -> the norms (or 'B,T' with 'train_step=B,T').

    An explicit 'op=' prefix picks the op. Returns (op or 'norm', dims in the op's order).
    """
    op = None
    body = text
    if "=" in text:
        op, body = text.split("=", 1)
        op = op.strip().replace("-", "_")
        if op not in OPS:
            raise BenchError(f"--shape {text!r}: op before '=' must be one of {', '.join(OPS)}, got {op!r}")
    try:
        nums = [int(x) for x in body.replace("x", ",").split(",") if x.strip() != ""]
    except ValueError:
        raise BenchError(f"--shape {text!r}: expected comma-separated integers like 4,8,1024,64 or 4096,768")
    if any(n <= 0 for n in nums):
        raise BenchError(f"--shape {text!r}: every size must be a positive integer, got {nums}")
    if op is None:
        if len(nums) in (4, 5):
            op = "attention"
        elif len(nums) == 3:
            op = "linear_cross_entropy"
        elif len(nums) == 2:
            op = "train_step" if ops == ["train_step"] else "norm"
        else:
            raise BenchError(f"--shape {text!r}: expected 4 or 5 numbers (B,H,N,D[,Hkv]) for attention, "
                             f"3 (tokens,hidden,vocab) for linear_cross_entropy or 2 (M,N) for the norms, "
                             f"got {len(nums)}")
    if op == "attention":
        if len(nums) not in (4, 5):
            raise BenchError(f"--shape {text!r}: attention takes B,H,N,D or B,H,N,D,Hkv, got {len(nums)} numbers")
        B, H, N, D = nums[:4]
        Hkv = nums[4] if len(nums) == 5 else H
        return "attention", check_attention_dims((B, H, Hkv, N, N, D), f"--shape {text!r}")
    if op == "linear_cross_entropy":
        if len(nums) != 3:
            raise BenchError(f"--shape {text!r}: linear_cross_entropy takes tokens,hidden,vocab, got {len(nums)} numbers")
        return op, tuple(nums)
    if len(nums) != 2:
        raise BenchError(f"--shape {text!r}: {op} takes 2 numbers, got {len(nums)}")
    if op == "norm" and ops == ["gelu"]:
        op = "gelu"
    return ("norm" if op in ("norm", "layer_norm", "rms_norm") else op), tuple(nums)


def check_attention_dims(dims: tuple[int, ...], where: str) -> tuple[int, ...]:
    B, Hq, Hkv, Nq, Nk, D = dims
    if min(dims) <= 0:
        raise BenchError(f"{where}: every size must be positive, got B={B} Hq={Hq} Hkv={Hkv} N={Nq} D={D}")
    if Hq % Hkv:
        raise BenchError(f"{where}: query heads ({Hq}) must be a multiple of kv heads ({Hkv}) for GQA")
    return dims


# ------------------------------------------------------------------------------------------ presets

def default_dtypes(op: str, device: str, preset: str = "default") -> list[str]:
    if preset in ("decode", "sweep"):
        return ["fp32", "bf16"]
    if preset == "small":
        return ["fp32", "bf16"] if op == "attention" else ["fp32"]
    if preset == "quick":
        return ["bf16"] if device == "cuda" else ["fp32"]
    if device == "cuda":
        return ["bf16"] if op in ("attention", "train_step") else ["bf16", "fp32"]
    return ["fp32"] if op in ("attention", "train_step") else ["fp32", "bf16"]


def default_modes(op: str, preset: str) -> list[str]:
    """The modes a preset runs when ``--mode`` is not given: decode is inference only."""
    if preset == "decode":
        return ["fwd"]
    if preset in ("small", "sweep"):
        return ["fwd", "fwd+bwd"]
    return list(MODES)


def _attn(B, H, N, D, Hkv=None, **kw):
    return dict(dims=(B, H, Hkv or H, N, N, D), **kw)


def preset_points(preset: str, op: str, device: str) -> list[dict]:
    """The (dims, flags, sweep) points of a preset for one op; dtypes and modes are applied by the caller."""
    gpu = device == "cuda"
    if preset not in PRESETS:
        raise BenchError(f"--preset: expected one of {', '.join(PRESETS)}, got {preset!r}")
    if preset in _SMALL_PRESETS:
        return _small_points(preset, op)
    if preset == "sweep":
        return _sweep_points(op)
    if op == "attention":
        if preset == "quick":
            seq, B, H, D, extra_n = [64, 128, 256], 1, 2, 32, 128
            heads = []
        elif preset == "default":
            seq = [512, 1024, 2048, 4096, 8192, 16384] if gpu else [256, 512, 1024, 2048, 4096]
            B, H, D, extra_n = (2, 16, 128, 2048) if gpu else (1, 8, 64, 1024)
            heads = [(1, 8), (4, 8), (8, 16), (16, 16)] if gpu else [(1, 4), (2, 8), (4, 8)]
        else:
            seq = [1024, 2048, 4096, 8192, 16384, 32768] if gpu else [512, 1024, 2048, 4096, 8192]
            B, H, D, extra_n = (1, 16, 128, 4096) if gpu else (1, 8, 64, 2048)
            heads = [(4, 16), (16, 16)] if gpu else [(2, 8)]
        pts = []
        for causal in (False, True):
            pts += [_attn(B, H, n, D, causal=causal, sweep="seqlen") for n in seq]
        dims = [32, 64] if preset == "quick" else [64, 128, 256] if gpu else [32, 64, 128]
        pts += [_attn(B, H, extra_n, d, causal=True, sweep="head_dim") for d in dims if d != D]
        pts += [_attn(b, h, extra_n, D, causal=True, sweep="batch_heads") for b, h in heads if (b, h) != (B, H)]
        pts.append(_attn(B, 2 * H, extra_n, D, Hkv=max(1, H // 2), causal=True, sweep="gqa"))
        pts.append(_attn(max(2, B), H, extra_n, D, causal=True, padding=True, sweep="padding"))
        return pts
    if op in ("layer_norm", "rms_norm"):
        if preset == "quick":
            M, hidden = 256, [256, 1024]
        elif preset == "default":
            M, hidden = (16384, [768, 1024, 2048, 4096, 8192]) if gpu else (4096, [768, 1024, 2048, 4096])
        else:
            M, hidden = (32768, [1024, 2048, 4096, 8192, 16384]) if gpu else (8192, [768, 1024, 2048, 4096, 8192])
        return [dict(dims=(M, n), residual=r, sweep="hidden") for r in (False, True) for n in hidden]
    if op == "rotary":  # (B, N, Hq, Hk, D): a Llama-3-8B-like layer (32/8 heads of 128), a small GQA model
        if preset == "quick":
            return [dict(dims=(1, 128, 8, 2, 64), sweep="model")]
        big = (1, 4096, 32, 8, 128) if gpu else (1, 1024, 32, 8, 128)
        return [dict(dims=big, sweep="model"), dict(dims=(8, 512, 12, 4, 64), sweep="model")]
    if op == "train_step":
        model = {"quick": dict(layers=2, hidden=64, heads=4, vocab=256),
                 "default": dict(layers=12, hidden=768, heads=12, vocab=50304) if gpu
                 else dict(layers=4, hidden=256, heads=4, vocab=4096),
                 "long": dict(layers=12, hidden=768, heads=12, vocab=50304) if gpu
                 else dict(layers=6, hidden=384, heads=6, vocab=8192)}[preset]
        bt = {"quick": (2, 64), "default": (8, 1024) if gpu else (4, 256),
              "long": (8, 2048) if gpu else (4, 512)}[preset]
        return [dict(dims=bt, model=tuple(sorted(model.items())), sweep="model")]
    if op == "gelu":  # (rows, width): GPT-2-small / -medium MLPs (4 x 768, 4 x 1024) at 2048 tokens
        dims = {"quick": [(256, 1024)], "default": [(2048, 3072), (2048, 4096)],
                "long": [(8192, 3072), (8192, 4096)]}[preset]
        return [dict(dims=d, sweep="width") for d in dims]
    if op == "linear_cross_entropy":  # (tokens, hidden, vocab); "long" is issue 17's memory comparison
        dims = {"quick": [(1024, 256, 8000)], "default": [(2048, 1024, 32000)],
                "long": [(8192, 2048, 32000), (8192, 2048, 128256)]}[preset]
        return [dict(dims=d, sweep="vocab") for d in dims]
    raise BenchError(f"--op: expected one of {', '.join(OPS)}, got {op!r}")


def _small_points(preset: str, op: str) -> list[dict]:
    """Issue 15's table: decode steps (Nq=1) at B1 H12 Nk 128 / 1024 and B8 H12 Nk 512; LayerNorm and RMSNorm
    16x768 and 128x768; attention B1 H12 Nq=Nk=16. Head dim 64 (GPT-2 / BERT-base)."""
    if preset == "decode":
        if op != "attention":
            return []
        return [dict(dims=(B, 12, 12, 1, nk, 64), sweep="decode") for B, nk in ((1, 128), (1, 1024), (8, 512))]
    if op == "attention":
        return [_attn(1, 12, 16, 64, sweep="small")]
    if op in ("layer_norm", "rms_norm"):
        return [dict(dims=(m, 768), sweep="small") for m in (16, 128)]
    return []


def _sweep_points(op: str) -> list[dict]:
    """The size sweep at GPT-2 / BERT-base width (12 heads of 64, hidden 768). A point's ``modes`` limits
    the modes it runs in: a decode step is inference (fwd), the Nq=Nk points are prefill (fwd) and training
    (fwd+bwd, causal)."""
    if op == "attention":
        return ([dict(dims=(1, 12, 12, 1, nk, 64), sweep="sweep-decode", modes=("fwd",)) for nk in SWEEP_DECODE_NK]
                + [_attn(1, 12, n, 64, causal=True, sweep="sweep-seq") for n in SWEEP_SEQ])
    if op in ("layer_norm", "rms_norm"):
        return [dict(dims=(m, 768), sweep="sweep-rows") for m in SWEEP_ROWS]
    return []


def build_cases(ops, modes, dtypes, preset, device, shapes=(), causal="preset", padding=False,
                residual="preset") -> list[Case]:
    """Expand presets (or user shapes) x modes x dtypes into cases, in a stable order.

    ``shapes``: parsed (op, dims) pairs from :func:`parse_shape`; when given, only the ops they apply to run.
    ``causal`` / ``residual``: "no", "yes", "both" or "preset" (the preset's choice; "both" for user shapes).
    ``modes``: None = the preset's (:func:`default_modes`).
    """
    points: dict[str, list[dict]] = {}
    if shapes:
        for op_kind, dims in shapes:
            targets = ["layer_norm", "rms_norm"] if op_kind == "norm" else [op_kind]
            for op in targets:
                if op not in ops:
                    continue
                if op == "attention":
                    cs = [False, True] if causal in ("both", "preset") else [causal == "yes"]
                    points.setdefault(op, []).extend(
                        dict(dims=dims, causal=c, padding=padding, sweep="user") for c in cs)
                elif op == "train_step":
                    model = preset_points("default" if preset in _SMALL_PRESETS else preset, "train_step",
                                          device)[0]["model"]
                    points.setdefault(op, []).append(dict(dims=dims, model=model, sweep="user"))
                else:
                    rs = [False, True] if residual in ("both", "preset") else [residual == "yes"]
                    points.setdefault(op, []).extend(dict(dims=dims, residual=r, sweep="user") for r in rs)
        if not points:
            raise BenchError(f"--shape: none of the shapes applies to the selected ops ({', '.join(ops)})")
    else:
        for op in ops:
            pts = preset_points(preset, op, device)
            if op == "attention":
                if causal in ("yes", "no"):
                    pts = [p for p in pts if p.get("causal", False) == (causal == "yes")]
                if padding:
                    pts = [dict(p, padding=True) for p in pts]
            if op in ("layer_norm", "rms_norm") and residual in ("yes", "no"):
                pts = [p for p in pts if p.get("residual", False) == (residual == "yes")]
            points[op] = pts
    cases = []
    for op, pts in points.items():
        op_modes = ["step"] if op == "train_step" else (modes or default_modes(op, preset))
        if op == "linear_cross_entropy":
            op_modes = ["fwd+bwd"]  # its gradients are computed in the forward pass: fwd+bwd is the comparison
        for dt in (dtypes or default_dtypes(op, device, preset)):
            for p in pts:
                p = dict(p)
                only = p.pop("modes", None)
                for m in op_modes:
                    if only is None or m in only:
                        cases.append(Case(op=op, mode=m, dtype=dt, **p))
    return list(dict.fromkeys(cases))
