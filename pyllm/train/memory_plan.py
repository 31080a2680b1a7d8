"""A memory plan before the run: the peak memory of one training step, part by part.

``plan(model, batch_size=..., seq_len=...)`` -> :class:`MemoryPlan`; ``pyllm plan`` prints it, and the
first lines of ``pyllm pretrain`` / ``finetune`` print its one-line summary.

What is counted, and how (one training step = forward, backward, gradient clipping, AdamW step):

- **parameters**: every parameter and buffer of the model (tied weights once), built on the ``meta`` device
  from the config, so nothing is allocated; with ``lora`` the adapters peft will add (r x (in + out) per
  adapted linear, in float32).
- **gradients**: one per *trainable* parameter, in its dtype. With LoRA only the adapters and the task head.
- **optimizer states**: AdamW's ``exp_avg`` and ``exp_avg_sq``, two float32 tensors per trainable parameter.
- **activations**: what the autograd graph keeps for the backward pass. It is *derived from pyllm's own
  forward code*, op by op (``_Graph`` below walks ``Block.forward``, ``LlamaBlock.forward``,
  ``Seq2SeqLayer.forward`` and the heads the way they run): a Linear keeps its input when its weight trains
  (under autocast: the 16-bit copy of it) and, under autocast, a 16-bit copy of its weight; ``pyllm.attention``
  keeps q, k, v (views of the one qkv projection; Llama's rotated q and k are new tensors), its output and
  the float32 log-sum-exp -- never a seqlen x seqlen tensor (FlashAttention-2, linear in N); the fused
  norms keep ``x + residual`` and their statistics (mean and rstd, float32; RMSNorm only rstd); GELU and SiLU
  keep their input, ReLU its output; dropout with p > 0 keeps its mask (on the CPU a mask of the input's
  dtype, on CUDA one byte an element). Each tensor is counted once however many ops keep it. With
  activation checkpointing a layer keeps only its inputs, and its backward recomputes the layer's full set.
- **logits / loss**: unfused, the (tokens, vocab) logits, the float32 copy ``F.cross_entropy`` takes and its
  log-softmax (kept), and in the backward pass their float32 gradients; fused
  (:func:`pyllm.linear_cross_entropy`, a causal-LM head that takes ``return_logits``), one chunk of float32 logits
  and the gradients of the hidden states and of the weight, which the op computes in its forward pass.
- **temporary**: what exists only for a moment: inside a layer's backward, its output's gradient (and the
  residual stream's) and, at its widest op, the gradients of that op's output and input (less what the ops
  after it kept, released by then); a tied weight's second gradient before it is summed in (pyllm's
  fused AdamW updates in place, on the CPU and on CUDA: no temporaries).

The peak is the largest of three moments: the end of the forward pass, each segment of the backward pass
(the gradient of a segment's parameters exists from then on, the activations of later segments are gone),
and the optimizer step (every gradient). With gradient accumulation the micro-batches after the first run
with every gradient already allocated. The plan is per process (data parallel replicas each hold it all).

Checked against measurements (tests/train/test_memory_plan.py): the activations the plan derives equal the
storages autograd keeps (``torch.autograd.graph.saved_tensors_hooks``) for every family, to nll_loss's
4-byte scalar; and the step's peak is within 15% of the measured high-water mark of the process's resident memory on the
CPU (on CUDA the same comparison is ``torch.cuda.max_memory_allocated``).
"""
from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

ARCHS = ("gpt", "bert", "llama", "bart", "t5")
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_memory(text, who: str = "plan") -> int:
    """``"24GB"``, ``"24 GiB"``, ``"512MiB"``, ``"2e9"`` -> bytes (GB = 10**9, GiB = 2**30)."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value, unit = float(text), ""
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
        if not m or m.group(2).upper() not in _UNITS:
            raise ValueError(f"{who}: memory must be a size such as 24GB, 24GiB or 512MiB, got {text!r}")
        value, unit = float(m.group(1)), m.group(2).upper()
    nbytes = int(value * _UNITS[unit])
    if nbytes <= 0:
        raise ValueError(f"{who}: memory must be more than 0 bytes, got {text!r}")
    return nbytes


def device_memory(device: str = "auto") -> tuple[int, str]:
    """(bytes, where from): the CUDA device's total memory, else the CPU's available RAM (MemAvailable)."""
    import torch

    if device != "cpu" and torch.cuda.is_available():
        index = int(device.split(":")[1]) if device.startswith("cuda:") else 0
        p = torch.cuda.get_device_properties(index)
        return p.total_memory, f"{p.name} total memory"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024, "MemAvailable in /proc/meminfo"
    except OSError:
        pass
    raise ValueError("plan: cannot read the available memory of this machine (no CUDA device, no /proc/meminfo); "
                     "give memory, e.g. memory='24GB'")


def fmt_bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}" if unit == "GiB" else f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"


# ----------------------------------------------------------------------------- the result


@dataclass
class MemoryPlan:
    """The estimated peak of one training step, in bytes, and its parts at that moment.

    ``peak == parameters + gradients + optimizer_states + activations + logits + temporary``; ``resident``
    (parameters + optimizer states) is what exists between steps besides the gradients, so
    ``peak - resident`` is what one step adds. ``layers``: (name, bytes) of what each segment of the model
    keeps for the backward pass (embeddings, each layer, the head). ``proposal``: with ``memory``, the largest
    micro-batch (and the accumulation) that keeps ``effective_batch`` and fits.
    """

    model: str
    micro_batch: int
    seq_len: int
    target_len: Optional[int]
    precision: str
    gradient_checkpointing: bool
    gradient_accumulation_steps: int
    lora: Optional[str]
    fused_loss: bool
    device: str
    num_parameters: int
    trainable_parameters: int
    parameters: int
    gradients: int
    optimizer_states: int
    activations: int
    logits: int
    temporary: int
    peak: int
    phase: str  # when the peak happens
    layers: list = field(default_factory=list, repr=False)
    memory: Optional[int] = None
    memory_source: Optional[str] = None
    effective_batch: Optional[int] = None
    proposal: Optional[dict] = None

    @property
    def resident(self) -> int:
        return self.parameters + self.optimizer_states

    @property
    def parts(self) -> dict:
        return {"parameters": self.parameters, "gradients": self.gradients,
                "optimizer states": self.optimizer_states, "activations": self.activations,
                "logits/loss": self.logits, "temporary": self.temporary}

    def summary(self) -> str:
        """One line: the estimated peak and its parts, in one unit."""
        unit, size = ("GiB", 2**30) if self.peak >= 2**30 else ("MiB", 2**20)
        names = {"optimizer states": "optimizer", "logits/loss": "logits"}
        parts = " + ".join(f"{names.get(k, k)} {v / size:.1f}" for k, v in self.parts.items())
        fit = ""
        if self.memory is not None:
            fit = f"; {'fits' if self.peak <= self.memory else 'does NOT fit'} in {fmt_bytes(self.memory)}"
        return f"memory plan: peak {self.peak / size:.1f} {unit} per step = {parts} {unit}{fit}"

    def table(self) -> str:
        """The plan as a readable table (what ``pyllm plan`` prints)."""
        lora = f", LoRA {self.lora}" if self.lora else ""
        tgt = f" + target {self.target_len}" if self.target_len else ""
        lines = [f"{self.model}: {self.num_parameters / 1e6:.2f}M parameters, {self.trainable_parameters / 1e6:.2f}M "
                 f"trainable{lora}",
                 f"micro-batch {self.micro_batch} x seq {self.seq_len}{tgt}, accumulation "
                 f"{self.gradient_accumulation_steps}, {self.precision}, checkpointing "
                 f"{'on' if self.gradient_checkpointing else 'off'}, loss {'fused' if self.fused_loss else 'unfused'}"
                 f", {self.device}", ""]
        width = max(len(k) for k in self.parts) + 2
        lines.append(f"{'part':<{width}}{'bytes':>14}  {'share':>6}")
        for k, v in self.parts.items():
            lines.append(f"{k:<{width}}{fmt_bytes(v):>14}  {100 * v / max(self.peak, 1):5.1f}%")
        lines.append(f"{'peak':<{width}}{fmt_bytes(self.peak):>14}  at {self.phase}")
        lines.append("")
        lines.append("kept for backward, per segment:")
        for name, nbytes in _runs(self.layers):
            lines.append(f"  {name:<{width + 10}}{fmt_bytes(nbytes):>14}")
        if self.memory is not None:
            lines.append("")
            verdict = "fits" if self.peak <= self.memory else "does NOT fit"
            lines.append(f"memory {fmt_bytes(self.memory)} ({self.memory_source}): this plan {verdict}")
            if self.proposal:
                p = self.proposal
                lines.append(f"proposal for an effective batch of {self.effective_batch}: micro-batch "
                             f"{p['micro_batch']} x accumulation {p['gradient_accumulation_steps']} "
                             f"(peak {fmt_bytes(p['peak'])})")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "resident": self.resident}


def _runs(layers: list) -> list:
    """[(name, bytes)] with runs of equal layers ("layer 3" .. "layer 9") as one row, "layers 3-9 (each)"."""
    out = []
    for name, nbytes in layers:
        m = re.fullmatch(r"(.*)layer (\d+)", name)
        last = out[-1] if out else None
        if m and last and last[2] == m.group(1) and last[1] == nbytes:
            out[-1] = (f"{m.group(1)}layers {last[3]}-{m.group(2)} (each)", nbytes, m.group(1), last[3])
        else:
            out.append((name, nbytes, m.group(1) if m else None, m.group(2) if m else None))
    return [(name, nbytes) for name, nbytes, _, _ in out]


# ----------------------------------------------------------------------------- the forward, symbolically


@dataclass(frozen=True)
class _T:
    """A tensor of the forward pass: its storage name, element count, element size (bytes), requires_grad."""

    name: str
    numel: int
    size: int
    grad: bool = True  # requires grad: ops on it are recorded (with LoRA, not before the first adapter)

    @property
    def nbytes(self) -> int:
        return self.numel * self.size


class _Graph:
    """What autograd keeps, op by op, as pyllm's forward code runs (a symbolic forward pass).

    Each op method mirrors what the op saves for backward (see the module docstring); ``keep`` records a
    storage once, in the segment (embeddings, a layer, the head) that first keeps it.
    """

    def __init__(self, model, precision: str, device: str, lora: dict, trainable: set):
        self.model = model
        self.trainable = trainable  # ids of the parameters that get gradients
        self.autocast = precision in ("bf16", "fp16")
        self.e = 2 if self.autocast else _param_size(model)  # matmul output element size
        self.cuda = device.startswith("cuda")
        self.lora = lora  # linear module -> (rank, dropout) of its adapter
        self.kept: dict[str, tuple[int, str]] = {}  # storage -> (bytes, segment)
        self.segment = "embeddings"
        self.n = 0
        self.marked: Optional[set] = None  # what was kept when the MLP's widest backward moment was marked

    def mark(self) -> None:
        """The MLP's widest backward moment: what ops after this point keep is released by then."""
        self.marked = set(self.kept)

    def new(self, numel: int, size: int, tag: str = "t", grad: bool = True) -> _T:
        self.n += 1
        return _T(f"{tag}{self.n}", int(numel), size, grad)

    def keep(self, t: _T) -> None:
        if t.numel and t.name not in self.kept:
            self.kept[t.name] = (t.nbytes, self.segment)

    def trains(self, p) -> bool:
        return id(p) in self.trainable

    def keep_bytes(self, nbytes: int, tag: str) -> None:
        self.keep(self.new(nbytes, 1, tag))

    def cast(self, x: _T, copy: bool = False) -> _T:
        """Autocast's 16-bit copy of an op's input: a new one per op (autocast caches only weights), the same
        tensor when it is 16-bit already, unless ``copy`` (peft casts an adapter's input to the adapter's
        float32 first, so autocast copies it back)."""
        if not self.autocast or (x.size == 2 and not copy):
            return x
        return self.new(x.numel, 2, "cast", x.grad)

    def linear(self, x: _T, mod) -> _T:
        """nn.Linear (or a peft LoRA layer around one): keeps its input when its weight trains, its 16-bit
        weight under autocast, and an adapter's (dropped-out) input and its rank-r projection."""
        base = getattr(mod, "base_layer", mod)
        rows = x.numel // base.in_features
        trains = self.trains(base.weight)
        if trains:
            self.keep(self.cast(x))
        if self.autocast and x.grad:  # the cast weight is what the input's gradient needs
            self.keep_bytes(2 * base.weight.numel(), "w16_")
        adapter = self.lora.get(mod)
        if adapter:
            r, p = adapter
            # peft casts the input to the adapter's dtype (float32) before its dropout
            xin = self.dropout(_T(x.name, x.numel, _param_size(self.model), x.grad) if self.autocast else x, p)
            self.keep(self.cast(xin, copy=True))
            self.keep(self.new(rows * r, self.e, "lora"))
            if self.autocast:  # lora_B's 16-bit weight (and lora_A's when its input needs a gradient)
                self.keep_bytes(2 * r * ((base.in_features if x.grad else 0) + base.out_features), "w16_")
        grad = x.grad or trains or bool(adapter)
        return self.new(rows * base.out_features, self.e, "lin", grad)

    def dropout(self, x: _T, p: float) -> _T:
        """p = 0 returns the input itself; else a mask is kept (CUDA: bool; CPU: the input's dtype)."""
        if not p:
            return x
        if x.grad:
            self.keep(self.new(x.numel, 1 if self.cuda else x.size, "mask"))
        return self.new(x.numel, x.size, "drop", x.grad)

    def norm(self, x: _T, residual: Optional[_T] = None, rms: bool = False, weight=None) -> tuple[_T, _T]:
        """pyllm's fused LayerNorm/RMSNorm: keeps x + residual (promoted; x itself without a residual) and
        float32 rstd (and mean for LayerNorm), one per row; returns (normed, x + residual)."""
        rows = x.numel // self.hidden
        grad = x.grad or (residual is not None and residual.grad) or (weight is not None and self.trains(weight))
        if residual is None:
            h = x
        else:
            h = self.new(x.numel, max(x.size, residual.size), "h", grad)
        if grad:
            self.keep(h)
            self.keep(self.new(rows * (1 if rms else 2), 4, "stats"))
        return self.new(x.numel, h.size, "normed", grad), h

    def attention(self, keep: list, rows: int, heads: int, head_dim: int) -> _T:
        """pyllm.attention: keeps q, k, v (their storages), its output and the float32 lse (B, H, N)."""
        grad = any(t.grad for t in keep)
        o = self.new(rows * heads * head_dim, self.e, "attn_o", grad)
        if grad:
            for t in keep + [o, self.new(rows * heads, 4, "lse")]:
                self.keep(t)
        return o

    def act(self, x: _T, kind: str) -> _T:
        """GELU / SiLU keep their input; ReLU its output."""
        y = self.new(x.numel, x.size, "act", x.grad)
        if x.grad:
            self.keep(y if kind == "relu" else x)
        return y

    def embedding(self, mod, ids_numel: int) -> _T:
        """nn.Embedding keeps the int64 indices when its weight trains."""
        trains = self.trains(mod.weight)
        if trains:
            self.keep(self.new(ids_numel, 8, "ids"))
        return self.new(ids_numel * mod.embedding_dim, _param_size(self.model), "emb", trains)


def _param_size(model) -> int:
    return next(model.parameters()).element_size()


# ----------------------------------------------------------------------------- the families


def _self_attention(g: _Graph, attn, x: _T) -> _T:
    """pyllm.models.block.SelfAttention.forward: qkv (one matmul), attention on views of it, proj, dropout."""
    rows = x.numel // g.hidden
    qkv = g.linear(x, attn.qkv)
    o = g.attention([qkv], rows, attn.num_heads, attn.head_dim)
    return g.dropout(g.linear(o, attn.proj), attn.dropout.p)


def _block(g: _Graph, blk, x: _T, residual: Optional[_T]):
    """pyllm.models.block.Block.forward (post-norm BERT, pre-norm GPT)."""
    def mlp(h):
        a = g.act(g.linear(h, blk.mlp.fc1), _act_kind(blk.mlp.act))
        g.mark()  # the activation's backward: d(act out) and d(act in)
        return g.dropout(g.linear(a, blk.mlp.fc2), blk.mlp.dropout.p)

    if not blk.pre_norm:
        x, _ = g.norm(_self_attention(g, blk.attn, x), residual=x)
        x, _ = g.norm(mlp(x), residual=x)
        return x, None
    if residual is None:
        residual, normed = x, g.norm(x)[0]
    else:
        normed, residual = g.norm(x, residual)
    normed, residual = g.norm(_self_attention(g, blk.attn, normed), residual)
    return mlp(normed), residual


def _act_kind(fn) -> str:
    import torch.nn.functional as F

    return "relu" if fn is F.relu else "gelu"


def _llama_block(g: _Graph, blk, x: _T, residual: Optional[_T], rows: int):
    """pyllm.models.llama.LlamaBlock.forward: RMSNorm, qkv, fused rotary (new q and k), attention (v a view of
    the qkv output), o_proj, RMSNorm, SwiGLU (gate_up in one matmul; silu keeps gate, the product keeps both)."""
    at = blk.self_attn
    if residual is None:
        residual, normed = x, g.norm(x, rms=True)[0]
    else:
        normed, residual = g.norm(x, residual, rms=True)
    qkv = g.linear(normed, at.qkv)
    q = g.new(rows * at.num_heads * at.head_dim, g.e, "rot_q", qkv.grad)
    k = g.new(rows * at.num_kv_heads * at.head_dim, g.e, "rot_k", qkv.grad)
    o = g.attention([q, k, qkv], rows, at.num_heads, at.head_dim)
    normed, residual = g.norm(g.linear(o, at.o_proj), residual, rms=True)
    gate_up = g.linear(normed, blk.mlp.gate_up)  # (rows, 2I): silu keeps gate, a view of it
    silu = g.new(gate_up.numel // 2, g.e, "silu", gate_up.grad)
    if gate_up.grad:
        g.keep(gate_up)
        g.keep(silu)  # the product keeps both factors: silu(gate) and up (the other half of gate_up)
    prod = g.new(silu.numel, g.e, "prod", gate_up.grad)
    g.mark()  # the product's backward: d(prod), d(silu out) and d(up)
    return g.linear(prod, blk.mlp.down_proj), residual


def _seq2seq_layer(g: _Graph, layer, x: _T, residual: Optional[_T], rows: int, mem: Optional[_T], mrows: int):
    """pyllm.models.seq2seq.Seq2SeqLayer.forward: self-attention, cross-attention (decoder), FFN; each
    sublayer post-norm (BART) or pre-norm with the residual add fused into the next norm (T5)."""
    rms = layer.norm1.__class__.__name__ == "RMSNorm"

    def attention(h, at, cross):
        if cross:
            q = g.linear(h, at.q)
            kv = g.linear(mem, at.kv)
            o = g.attention([q, kv], rows, at.num_heads, at.head_dim)
        else:
            o = g.attention([g.linear(h, at.qkv)], rows, at.num_heads, at.head_dim)
        return g.linear(o, at.o)

    def ffn(h):
        f = layer.ffn
        a = g.act(g.linear(h, f.fc1), _act_kind(f.act))
        if f.gate is not None:
            gt = g.linear(h, f.gate)
            g.keep(a)
            g.keep(gt)
            a = g.new(a.numel, a.size, "gated")
        g.mark()
        return g.linear(g.dropout(a, f.dropout.p), f.fc2)

    subs = [(layer.norm1, lambda h: attention(h, layer.self_attn, False))]
    if layer.cross_attn is not None:
        subs.append((layer.norm_cross, lambda h: attention(h, layer.cross_attn, True)))
    subs.append((layer.norm2, ffn))
    for _, sub in subs:
        if layer.pre_norm:
            if residual is None:
                residual, normed = x, g.norm(x, rms=rms)[0]
            else:
                normed, residual = g.norm(x, residual, rms=rms)
            x = g.dropout(sub(normed), layer.dropout.p)
        else:
            x, _ = g.norm(g.dropout(sub(x), layer.dropout.p), residual=x, rms=rms)
    return x, residual


@dataclass
class _Segment:
    name: str
    modules: list = field(default_factory=list)
    kept: int = 0  # bytes kept for backward through the forward pass
    recompute: int = 0  # checkpointed layer: what its backward recomputes (its full set)
    grads: int = 0  # gradients of its trainable parameters (first produced in its backward)
    transient: int = 0  # the largest gradient temporaries inside its backward
    early_grads: Optional[int] = None  # of ``grads``, those that exist at that moment (None: all)
    released: int = 0  # kept by the ops after the MLP's activation: released before its backward


class _Walk:
    """Runs the symbolic forward of a whole model: segments with what they keep, their gradients and
    the transients of their backward; and the loss head's own terms."""

    def __init__(self, model, batch: int, seq: int, precision: str, device: str, lora: dict, trainable: set,
                 ckpt: bool, fused: bool, target: Optional[int]):
        self.g = _Graph(model, precision, device, lora, trainable)
        self.model, self.B, self.N, self.ckpt, self.fused = model, batch, seq, ckpt, fused
        self.target = target
        self.segments: list[_Segment] = []
        self.fwd_transient = 0  # the loss head's forward temporaries (logits)
        self.loss_kept = 0  # the loss head's kept tensors (log-softmax, or the fused op's gradients)
        self.loss_bwd = 0  # the loss head's backward temporaries
        self.loss_dweight = 0  # fused loss: the weight gradient it hands to autograd

    def run_segment(self, name: str, modules, fn, inputs=(), layer: bool = False):
        """Run ``fn()`` as segment ``name``; a checkpointed layer keeps only ``inputs`` (and its backward
        recomputes the rest)."""
        g = self.g
        g.segment = name
        if layer and self.ckpt:  # torch.utils.checkpoint keeps the layer's inputs
            for t in inputs:
                if t is not None:
                    g.keep(t)
        before = set(g.kept)
        g.marked = None
        out = fn()
        seg = _Segment(name, list(modules))
        if g.marked is not None:
            seg.released = sum(b for k, (b, s) in g.kept.items() if s == name and k not in g.marked)
        if layer and self.ckpt:
            new = [k for k in g.kept if k not in before]
            seg.recompute = sum(g.kept[k][0] for k in new)
            for k in new:
                del g.kept[k]
        self.segments.append(seg)
        return out

    def backward_transient(self, rows: int, hidden: int, mlp: int, attn: int, residual_stream: bool, mlp_out):
        """Beyond what a layer keeps, its backward holds the gradient of its output (and of the residual
        stream), and at its widest moment the gradients of one sublayer's intermediates (:func:`_widest`).
        The MLP is the last sublayer, so its backward runs first: by its widest moment what the ops after
        the marked point kept has been released, and only the MLP's output projection (``mlp_out``) has
        its weight gradient."""
        g, seg = self.g, self.segments[-1]
        stream = rows * hidden * 4 * (2 if residual_stream else 1)
        at_mlp, at_attn = stream + rows * mlp * g.e - seg.released, stream + rows * attn * g.e
        seg.transient = max(at_mlp, at_attn, 0)
        seg.early_grads = (sum(p.numel() * p.element_size() for p in mlp_out.parameters() if g.trains(p))
                           if at_mlp >= at_attn else None)

    def finish(self, adapters_to_add: dict) -> None:
        """Bytes kept per segment; gradients by the segment whose backward produces them first (the last one
        to use a tied weight); a tied weight's later use adds a full-size gradient that is summed into it."""
        for seg in self.segments:
            seg.kept = sum(b for b, s in self.g.kept.values() if s == seg.name)
        seen = set()
        for seg in reversed(self.segments):
            for m in seg.modules:
                for p in m.parameters():
                    if not self.g.trains(p):
                        continue
                    if id(p) in seen:
                        seg.transient = max(seg.transient, p.numel() * p.element_size())
                        continue
                    seen.add(id(p))
                    seg.grads += p.numel() * p.element_size()
        for path, (mod, r) in adapters_to_add.items():  # a LoRA spec not applied yet: float32 A and B
            _segment_of(path, self.segments).grads += 4 * r * (mod.in_features + mod.out_features)


def _lora_adapters(model, lora) -> dict:
    """{linear module: (rank, dropout)} of a LoRA spec (not yet applied) or of peft layers already in the model."""
    out = {}
    if lora is not None:
        from . import lora as L

        spec = L.parse(lora) if isinstance(lora, str) else lora
        for path in L._target_paths(model, spec):
            out[model.get_submodule(path)] = (spec.r, spec.dropout)
        return out
    for _, m in model.named_modules():
        if hasattr(m, "lora_A") and hasattr(m, "base_layer") and "default" in getattr(m, "lora_A", {}):
            r = m.lora_A["default"].out_features
            drop = m.lora_dropout["default"]
            out[m] = (r, getattr(drop, "p", 0.0))
    return out


def _walk_decoder_only(w: _Walk, model):
    """GPT (pyllm.models.gpt: Block stack) and Llama: embeddings, layers, final norm, and the head (causal LM
    or a classifier reading one row per sequence)."""
    g, B, N = w.g, w.B, w.N
    rows, cfg = B * N, model.config
    llama = _family(model) == "llama"
    base = model.model if llama else model.transformer
    g.hidden = cfg.hidden_size
    cos_sin = None
    if llama:
        x = w.run_segment("embeddings", [base.embed_tokens], lambda: g.embedding(base.embed_tokens, rows))
        cos_sin = g.new(2 * N * (cfg.head_dim // 2), 4, "cos_sin")  # (1, N, D/2) x 2, one for every layer
        blocks = list(base.layers)
    else:
        def embeddings():
            word = g.embedding(base.word, rows)
            g.embedding(base.position, N)  # position ids (1, N)
            return g.dropout(g.new(word.numel, word.size, "sum", word.grad), base.dropout.p)

        x = w.run_segment("embeddings", [base.word, base.position], embeddings)
        blocks = list(base.blocks.layers)
    residual = None
    mlp, attn = _widest(cfg.intermediate_size, llama, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim)
    for i, blk in enumerate(blocks):
        if llama:
            def layer(blk=blk, x=x, residual=residual):
                g.keep(cos_sin)
                return _llama_block(g, blk, x, residual, rows)
        else:
            def layer(blk=blk, x=x, residual=residual):
                return _block(g, blk, x, residual)
        x, residual = w.run_segment(f"layer {i}", [blk], layer, (x, residual, cos_sin), layer=True)
        w.backward_transient(rows, g.hidden, mlp, attn, True, blk.mlp.down_proj if llama else blk.mlp.fc2)
    final_norm = base.norm if llama else base.blocks.norm_f
    head_mods = [m for n, m in model.named_children() if n not in ("model", "transformer")] + [final_norm]

    def head():
        h = g.norm(x, residual, rms=llama)[0] if residual is not None else g.norm(x, rms=llama)[0]
        if hasattr(model, "lm_head"):
            _causal_lm_loss(w, h, model.lm_head, rows, B)
        else:  # h[arange(B), last]: the score keeps one row per sequence
            if g.trains(model.score.weight):
                g.keep(g.new(B * g.hidden, h.size, "last"))
            _class_loss(g, g.new(B * model.score.out_features, g.e, "logits"), B)

    w.run_segment("head", head_mods, head)


def _widest(inter: int, gated: bool, heads: int, kv_heads: int, head_dim: int) -> tuple[int, int]:
    """Gradient elements per row at a layer's widest backward moments: (MLP, attention). MLP: the
    activation's backward holds d(act out) and d(act in), 2I; the gated (SwiGLU) product's holds d(prod),
    d(silu out) and d(up), 3I. Attention: d(o) and dq, dk, dv."""
    return (3 if gated else 2) * inter, (2 * heads + 2 * kv_heads) * head_dim


def _causal_lm_loss(w: _Walk, h: _T, lm_head, rows: int, B: int, bias_numel: int = 0):
    """The causal-LM loss: fused (pyllm.linear_cross_entropy keeps dhidden and dweight; one chunk of float32
    logits at a time) or unfused (logits, the float32 copy of the shifted logits, their log-softmax kept;
    in backward the log-softmax's output gradient and input gradient, then the logits' gradient)."""
    g = w.g
    V, C = lm_head.out_features, lm_head.in_features
    if w.fused:
        e = g.e
        dh = g.new(rows * C, e, "dhidden")
        dw = g.new(V * C, e, "dweight")
        g.keep(dh)
        g.keep(dw)
        w.loss_kept = dh.nbytes + dw.nbytes
        if bias_numel or lm_head.bias is not None:  # the bias gradient, computed in the same pass
            db = g.new(bias_numel or V, e, "dbias")
            g.keep(db)
            w.loss_kept += db.nbytes
        chunk = _lce_chunk(rows, C, V, cpu=not g.cuda)
        # forward: the float32 accumulator of dweight and one chunk's float32 logits (+ their 16-bit product)
        w.fwd_transient = V * C * 4 * (g.e != 4) + chunk * V * (4 + (g.e != 4) * g.e) + (V * C * 2 if g.autocast
                                                                                        else 0)
        # backward: the op's gradients times the incoming scalar (new tensors) while the kept ones live; the
        # weight's becomes its .grad (a new tensor summed into it when a 16-bit copy or accumulation
        # intervenes: counted by _estimate)
        w.loss_bwd = dh.nbytes + (dw.nbytes if g.autocast else 0)
        w.loss_dweight = dw.nbytes
        return
    if g.trains(lm_head.weight):
        g.keep(g.cast(h))
    if g.autocast:
        g.keep_bytes(2 * V * C, "w16_")
    shifted = B and (rows - B) * V  # logits[:, :-1], (B * (N - 1), V)
    logsm = g.new(shifted, 4, "log_softmax")
    g.keep(logsm)
    g.keep(g.new(rows - B, 8, "targets"))  # nll_loss keeps the (shifted, flattened) labels
    w.loss_kept = logsm.nbytes
    # forward: logits (rows, V), the contiguous copy of the shifted slice, its float32 copy, the log-softmax
    w.fwd_transient = rows * V * g.e + shifted * g.e + (shifted * 4 if g.e != 4 else 0)
    # backward: d(log-softmax) and d(logits) in float32 while the log-softmax is kept; then the slice's
    # gradient, zeros of the full logits plus the copy
    w.loss_bwd = max(2 * shifted * 4, rows * V * g.e + shifted * 4)


def _lce_chunk(N: int, H: int, V: int, cpu: bool = False) -> int:
    """csrc/linear_cross_entropy.h auto_chunk: about N / ceil(V / H) tokens, a power of two, at least 256; on
    the CPU (csrc/cpu/linear_cross_entropy.cpp cpu_chunk) raised to the power of two of rows whose float32
    logits, twice over, fit 8 MiB."""
    ratio = max(1, -(-V // max(H, 1)))
    c = max(1, -(-N // ratio))
    p = 1
    while p < c:
        p <<= 1
    chunk = max(min(max(p, 256), N), 1)
    if cpu:
        fit = 1
        while 2 * fit * V * 4 <= 8 << 20:
            fit <<= 1
        chunk = max(min(max(fit, max(p, 256)), N), 1)
    return chunk


def _walk_bert(w: _Walk, model):
    """BERT: embeddings (word + position + token type, LayerNorm, dropout), post-norm blocks, and the head."""
    g, B, N = w.g, w.B, w.N
    rows = B * N
    bert = model.bert
    cfg = model.config
    g.hidden = cfg.hidden_size
    e = bert.embeddings
    mods = [m for m in (e.word, e.position, e.token_type, e.norm) if m is not None]

    def embeddings():
        s = g.embedding(e.word, rows)
        g.embedding(e.position, N)  # position ids (1, N)
        if e.token_type is not None:
            g.embedding(e.token_type, rows)
        return g.dropout(g.norm(s)[0], e.dropout.p)

    x = w.run_segment("embeddings", mods, embeddings)
    mlp, attn = _widest(cfg.intermediate_size, False, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim)
    for i, blk in enumerate(bert.encoder.layers):
        x, _ = w.run_segment(f"layer {i}", [blk], lambda blk=blk, x=x: _block(g, blk, x, None), (x,), layer=True)
        w.backward_transient(rows, g.hidden, mlp, attn, False, blk.mlp.fc2)
    head_mods = [m for n, m in model.named_children() if n != "bert"] + ([bert.pooler] if bert.pooler else [])
    w.run_segment("head", head_mods, lambda: _bert_head(w, model, x, rows, B))


def _bert_head(w: _Walk, model, x: _T, rows: int, B: int):
    g = w.g
    name = type(model).__name__
    if name == "BertForSequenceClassification":
        pooler = model.bert.pooler
        if g.trains(pooler.weight):  # the pooler keeps x[:, 0]: in float32 a view, so the whole last hidden
            # state stays alive; under autocast its 16-bit copy
            g.keep(g.new(B * g.hidden, 2, "cls16") if g.autocast else x)
        if g.autocast and x.grad:
            g.keep_bytes(2 * pooler.weight.numel(), "w16_")
        g.keep(g.new(B * g.hidden, g.e, "tanh"))
        _class_loss(g, g.linear(g.dropout(g.new(B * g.hidden, g.e, "pooled"), model.dropout.p), model.classifier), B)
    elif name == "BertForTokenClassification":
        _class_loss(g, g.linear(g.dropout(x, model.dropout.p), model.classifier), rows)
    elif name == "BertForQuestionAnswering":
        g.linear(x, model.qa_outputs)
    else:  # BertForMaskedLM: transform, activation, LayerNorm, decoder -> logits, cross-entropy in float32
        t = g.act(g.linear(x, model.transform), _act_kind(model.act))
        _logits_loss(w, g.norm(t)[0], model.decoder, rows)


def _logits_loss(w: _Walk, h: _T, head, rows: int, biased: bool = False) -> None:
    """Full logits then ``F.cross_entropy(logits.flatten(0, 1).float(), labels)`` (BERT's MLM head, the
    encoder-decoders): the head keeps its input (and its 16-bit weight), the float32 log-softmax is kept; the
    forward also holds the logits (+ the biased copy, + the float32 copy under autocast), the backward two
    float32 gradients of that size (+ their 16-bit copy)."""
    g, V = w.g, head.out_features
    if g.trains(head.weight):
        g.keep(g.cast(h))
    if g.autocast:
        g.keep_bytes(2 * head.weight.numel(), "w16_")
    logsm = g.new(rows * V, 4, "log_softmax")
    g.keep(logsm)
    w.loss_kept = logsm.nbytes
    w.fwd_transient = rows * V * g.e * (2 if biased else 1) + (rows * V * 4 if g.e != 4 else 0)
    w.loss_bwd = 2 * rows * V * 4 + (rows * V * g.e if g.e != 4 else 0)


def _class_loss(g: _Graph, logits: _T, rows: int) -> None:
    """F.cross_entropy on class logits: keeps the float32 log-softmax and the int64 labels."""
    g.keep(g.new(logits.numel, 4, "log_softmax"))
    g.keep(g.new(rows, 8, "targets"))


def _walk_seq2seq(w: _Walk, model):
    """BART / Marian / T5: encoder over the source (seq_len), decoder over the target (target_len) with
    cross-attention to the encoder output, and the LM head (the fused loss when the model takes
    ``return_logits``, else the logits)."""
    g, B, M = w.g, w.B, w.N
    N = w.target or w.N
    cfg = model.config
    g.hidden = cfg.d_model
    enc, dec = model.model.encoder, model.model.decoder
    mlp, attn = _widest(cfg.ffn_dim, cfg.gated_ffn, cfg.num_heads, cfg.num_heads, cfg.head_dim)
    pre = cfg.norm_position == "pre"
    rms = cfg.norm == "rms"

    def stack_embed(stack, rows, n):
        def run():
            x = g.embedding(stack.embed_tokens, rows)
            if stack.relative_attention_bias is not None and g.trains(stack.relative_attention_bias.weight):
                g.keep(g.new(n * n, 8, "buckets"))
                g.keep(g.new(cfg.num_heads * n * n, 4, "position_bias"))
            if stack.layernorm_embedding is not None:
                x = g.norm(x, rms=rms)[0]
            return g.dropout(x, stack.dropout.p)
        return run

    def stack(st, rows, n, mem, mrows, tag):
        mods = [m for m in (st.embed_positions, st.relative_attention_bias, st.layernorm_embedding) if m is not None]
        x = w.run_segment(f"{tag} embeddings", mods + ([model.model.shared] if tag == "encoder" else []),
                          stack_embed(st, rows, n))
        residual = None
        for i, layer in enumerate(st.layers):
            ins = (x, residual, mem)
            x, residual = w.run_segment(
                f"{tag} layer {i}", [layer],
                lambda layer=layer, x=x, residual=residual: _seq2seq_layer(g, layer, x, residual, rows, mem, mrows),
                ins, layer=True)
            w.backward_transient(rows, g.hidden, mlp, attn, pre, layer.ffn.fc2)
        return x, residual

    x, residual = stack(enc, B * M, M, None, 0, "encoder")
    if enc.norm_f is not None:
        g.segment = w.segments[-1].name
        x = g.dropout(g.norm(x, residual, rms=rms)[0] if residual is not None else g.norm(x, rms=rms)[0],
                      enc.dropout.p)
    mem = x
    y, residual = stack(dec, B * N, N, mem, B * M, "decoder")

    def head():
        h = y
        if dec.norm_f is not None:
            h = g.dropout(g.norm(y, residual, rms=rms)[0] if residual is not None else g.norm(y, rms=rms)[0],
                          dec.dropout.p)
        if w.fused:  # training with labels: pyllm.linear_cross_entropy (LM head, final_logits_bias, loss)
            _causal_lm_loss(w, h, model.lm_head, B * N, B,
                            bias_numel=model.lm_head.out_features if model.final_logits_bias is not None else 0)
            return
        g.keep(g.new(B * N, 8, "targets"))  # nll_loss keeps the labels
        _logits_loss(w, h, model.lm_head, B * N, biased=model.final_logits_bias is not None)

    w.run_segment("head", [model.lm_head], head)


# ----------------------------------------------------------------------------- the model to plan for


def fuses_loss(model) -> bool:
    """Whether the model's training loss is pyllm.linear_cross_entropy: a causal LM whose forward takes
    ``return_logits`` (GPTForCausalLM; the logits are formed only when asked for)."""
    import inspect

    return hasattr(model, "lm_head") and "return_logits" in inspect.signature(type(model).forward).parameters


def _family(model) -> str:
    name = type(model).__name__
    if name.startswith(("Bart", "T5")) or hasattr(model, "lm_head") and hasattr(model, "final_logits_bias"):
        return "seq2seq"
    if name.startswith("Llama"):
        return "llama"
    if name.startswith("Bert"):
        return "bert"
    if name.startswith("GPT"):
        return "gpt"
    raise ValueError(f"plan: model must be a pyllm model (BERT, GPT, Llama, BART/Marian/T5), got {name}")


_HEADS = {  # (family, task) -> model class
    ("gpt", "clm"): "GPTForCausalLM", ("gpt", "sequence-classification"): "GPTForSequenceClassification",
    ("bert", "mlm"): "BertForMaskedLM", ("bert", "sequence-classification"): "BertForSequenceClassification",
    ("bert", "token-classification"): "BertForTokenClassification",
    ("bert", "question-answering"): "BertForQuestionAnswering",
    ("llama", "clm"): "LlamaForCausalLM", ("llama", "sequence-classification"): "LlamaForSequenceClassification",
    ("bart", "translation"): "BartForConditionalGeneration", ("bart", "summarization"): "BartForConditionalGeneration",
    ("t5", "translation"): "T5ForConditionalGeneration", ("t5", "summarization"): "T5ForConditionalGeneration",
}
_MODEL_TYPES = {"gpt2": "gpt", "bert": "bert", "llama": "llama", "qwen2": "llama", "mistral": "llama",
                "bart": "bart", "marian": "bart", "t5": "t5"}


def _default_task(arch: str) -> str:
    return {"gpt": "clm", "llama": "clm", "bert": "mlm"}.get(arch, "translation")


def _head_class(arch: str, task: str):
    import pyllm.models as M

    name = _HEADS.get((arch, task))
    if name is None:
        ok = sorted(t for a, t in _HEADS if a == arch)
        raise ValueError(f"plan: task must be one of {ok} for a {arch} model, got {task!r}")
    return getattr(M, name)


def build_meta_model(arch: Optional[str] = None, *, model_dir=None, task: Optional[str] = None,
                     num_labels: int = 2, **sizes):
    """A pyllm model on the ``meta`` device (no memory): from a checkpoint folder's config.json, or from an
    architecture name and sizes (the fields of its config class: hidden_size, num_layers, ...)."""
    import torch

    import pyllm.models as M

    overrides = {}
    if model_dir is not None:
        folder = Path(model_dir)
        cfg_file = folder / "config.json"
        if not cfg_file.is_file():
            raise FileNotFoundError(f"plan: model {folder} holds no config.json (expected a model or run folder)")
        hf = json.loads(cfg_file.read_text(encoding="utf-8"))
        arch = _MODEL_TYPES.get(hf.get("model_type"))
        if arch is None:
            raise ValueError(f"plan: model {folder} holds a {hf.get('model_type')!r} model; expected one of "
                             f"{sorted(_MODEL_TYPES)}")
        if arch in ("bart", "t5"):
            from pyllm.models.seq2seq_io import config_from_hf as s2s

            fields = s2s(hf)
        else:
            from pyllm.models.hf_config import config_from_hf

            fields = config_from_hf(hf, {"gpt": "gpt2"}.get(arch, arch))
        fields.pop("id2label", None)
        fields.update({k: v for k, v in sizes.items() if v is not None})
    else:
        if arch not in ARCHS:
            raise ValueError(f"plan: arch must be one of {list(ARCHS)}, got {arch!r}")
        fields = {k: v for k, v in sizes.items() if v is not None}
    if arch in ("bart", "t5"):  # the decoder-only names of the sizes, in Seq2SeqConfig's words
        for mine, theirs in (("hidden_size", "d_model"), ("intermediate_size", "ffn_dim")):
            if mine in fields:
                fields[theirs] = fields.pop(mine)
        if "num_layers" in fields:
            n = fields.pop("num_layers")
            fields["encoder_layers"] = fields["decoder_layers"] = n
        fields.pop("num_kv_heads", None)
    task = task or _default_task(arch)
    cls = _head_class(arch, task)
    if task in ("sequence-classification", "token-classification") and arch not in ("bart", "t5"):
        overrides["num_labels"] = num_labels
    if arch in ("bart", "t5"):
        fields.setdefault("model_type", arch if model_dir is None else fields.get("model_type", arch))
        config = M.Seq2SeqConfig(**fields)
    else:
        config = cls.config_class(**{**fields, **overrides})
    with torch.device("meta"):
        return cls(config)


PRETRAIN_SIZES = dict(vocab_size=8192, hidden_size=256, num_layers=4, num_heads=4)  # PretrainConfig's defaults


def plan_from_config(cfg) -> MemoryPlan:
    """The plan ``pyllm plan`` prints, from its :class:`~pyllm.train.config.PlanConfig`."""
    sizes = {k: getattr(cfg, k) for k in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                                          "intermediate_size")}
    task = cfg.task
    if cfg.model is None:
        sizes = {k: PRETRAIN_SIZES[k] if v is None and k in PRETRAIN_SIZES else v for k, v in sizes.items()}
        sizes["max_position_embeddings"] = max(512, cfg.seq_len, cfg.target_len or 0)
        if cfg.arch == "gpt":
            sizes.update(activation="gelu_new", hidden_dropout=0.0)  # the pretrain run's GPT
    elif task is None and (Path(cfg.model) / "pyllm_task.json").is_file():  # a run folder knows its task
        task = json.loads((Path(cfg.model) / "pyllm_task.json").read_text(encoding="utf-8")).get("task")
    device = cfg.device
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    return plan(cfg.model, arch=cfg.arch, task=task, num_labels=cfg.num_labels, batch_size=cfg.batch_size,
                seq_len=cfg.seq_len, target_len=cfg.target_len, precision=cfg.precision,
                gradient_checkpointing=cfg.gradient_checkpointing,
                gradient_accumulation_steps=cfg.gradient_accumulation_steps, lora=cfg.lora, fused_loss=cfg.fused_loss,
                device=device, memory=cfg.memory, **sizes)


def for_run(model, cfg, seq_len: int, device, world_size: int = 1, target_len: Optional[int] = None) -> MemoryPlan:
    """The plan of a training run's step (per process) for its live model (adapters applied, if any)."""
    return plan(model, batch_size=cfg.batch_size // world_size, seq_len=seq_len, target_len=target_len,
                precision=cfg.precision, gradient_checkpointing=cfg.gradient_checkpointing,
                gradient_accumulation_steps=cfg.gradient_accumulation_steps, device=str(device))


def _proposal(make, effective: int, memory: int):
    """The largest micro-batch dividing ``effective`` whose plan fits ``memory``: (plan at micro-batch 1,
    {micro_batch, gradient_accumulation_steps, peak} or None)."""
    first = None
    for acc in range(1, effective + 1):
        if effective % acc:
            continue
        p = make(effective // acc, acc)
        first = p
        if p.peak <= memory:
            return p, {"micro_batch": effective // acc, "gradient_accumulation_steps": acc, "peak": p.peak}
    return first, None


def plan(model=None, *, batch_size: int = 8, seq_len: int = 128, target_len: Optional[int] = None,
         precision: str = "fp32", gradient_checkpointing: bool = False, gradient_accumulation_steps: int = 1,
         lora=None, fused_loss: Optional[bool] = None, device: str = "cpu", memory=None, arch: Optional[str] = None,
         task: Optional[str] = None, num_labels: int = 2, **sizes) -> MemoryPlan:
    """The memory plan of one training step.

    model: a pyllm model (a live one: its parameters' ``requires_grad`` and any peft adapters are read as they
        are), or a checkpoint / run folder, or None with ``arch`` ("gpt", "bert", "llama", "bart", "t5") and
        the config's size fields as keywords (``hidden_size=768, num_layers=12, vocab_size=...``).
    batch_size: the global batch per optimizer step (split into ``gradient_accumulation_steps`` micro-batches);
        seq_len: tokens per sequence (the encoder's for seq2seq; ``target_len`` the decoder's, default seq_len).
    precision: "fp32", or "bf16" / "fp16" autocast. lora: a spec "r=16,alpha=32,dropout=0.05,targets=q,k,v,o"
        for a model without adapters. fused_loss: None = what the model does (a causal-LM head whose forward
        takes return_logits trains with the fused loss: GPT's; the other heads form logits); False plans them with logits (``return_logits=True``).
    memory: bytes or a size ("24GB"); "auto" = the device's (CUDA total memory, or MemAvailable on the CPU).
        With it, ``proposal`` holds the largest micro-batch (and accumulation) that keeps ``batch_size`` and fits;
        if even a micro-batch of 1 does not fit, ValueError names the part that is too large.
    """
    import torch

    who = "plan"
    for name, value in (("batch_size", batch_size), ("seq_len", seq_len),
                        ("gradient_accumulation_steps", gradient_accumulation_steps)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{who}: {name} must be an int >= 1, got {value!r}")
    if target_len is not None and (not isinstance(target_len, int) or target_len < 1):
        raise ValueError(f"{who}: target_len must be None or an int >= 1, got {target_len!r}")
    if batch_size % gradient_accumulation_steps:
        raise ValueError(f"{who}: batch_size ({batch_size}) must be divisible by gradient_accumulation_steps "
                         f"({gradient_accumulation_steps})")
    if precision not in ("fp32", "bf16", "fp16"):
        raise ValueError(f"{who}: precision must be one of ['fp32', 'bf16', 'fp16'], got {precision!r}")
    if not isinstance(model, torch.nn.Module):
        model = (build_meta_model(model_dir=model, task=task, num_labels=num_labels, **sizes) if model is not None
                 else build_meta_model(arch or "gpt", task=task, num_labels=num_labels, **sizes))
    family = _family(model)
    lora_text = lora if isinstance(lora, str) else None
    adapters = _lora_adapters(model, lora)
    if lora is None and adapters:
        lora_text = getattr(getattr(model, "lora_spec", None), "to_dict", lambda: "peft adapters")()
        lora_text = ",".join(f"{k}={v if not isinstance(v, (tuple, list)) else ','.join(v)}"
                             for k, v in lora_text.items()) if isinstance(lora_text, dict) else lora_text
    can_fuse = fuses_loss(model)
    if fused_loss and not can_fuse:
        raise ValueError(f"{who}: fused_loss=True, but {type(model).__name__} computes its loss from full logits "
                         f"(a causal LM whose forward takes return_logits trains with pyllm.linear_cross_entropy); "
                         f"expected fused_loss None or False, got True")
    fused = can_fuse if fused_loss is None else bool(fused_loss)
    if family == "seq2seq" and seq_len > model.config.max_position_embeddings and model.config.position != "relative":
        raise ValueError(f"{who}: seq_len {seq_len} exceeds the model's max_position_embeddings "
                         f"{model.config.max_position_embeddings}")
    if family != "seq2seq" and seq_len > model.config.max_position_embeddings:
        raise ValueError(f"{who}: seq_len {seq_len} exceeds the model's max_position_embeddings "
                         f"{model.config.max_position_embeddings}")

    def make(micro: int, accumulation: int) -> MemoryPlan:
        return _estimate(model, family, micro, seq_len, target_len, precision, device, adapters, lora is not None,
                         gradient_checkpointing, accumulation, fused, lora_text)

    result = make(batch_size // gradient_accumulation_steps, gradient_accumulation_steps)
    if memory is None:
        return result
    if memory == "auto":
        nbytes, source = device_memory(device)
    else:
        nbytes, source = parse_memory(memory, who), "given"
    at_one, proposal = _proposal(make, batch_size, nbytes)
    if proposal is None:
        raise ValueError(_too_large(at_one, nbytes, memory if memory != "auto" else fmt_bytes(nbytes)))
    result.memory, result.memory_source, result.effective_batch, result.proposal = nbytes, source, batch_size, proposal
    return result


def _too_large(p: MemoryPlan, nbytes: int, given) -> str:
    """Why a micro-batch of 1 does not fit, in the bad-input form (argument, expected, received), naming the
    part that is too large."""
    static = p.parameters + p.optimizer_states + p.gradients
    parts = ", ".join(f"{k} {fmt_bytes(v)}" for k, v in p.parts.items())
    if static > nbytes:
        why = (f"the parameters, gradients and optimizer states alone need {fmt_bytes(static)} (train fewer "
               f"parameters with --lora, or shard them with --distributed fsdp)")
    else:
        name, size = max(((k, v) for k, v in p.parts.items() if k in ("activations", "logits/loss", "temporary")),
                         key=lambda kv: kv[1])
        tries = {"activations": ["--gradient-checkpointing"] * (not p.gradient_checkpointing)
                 + ["--precision bf16"] * (p.precision == "fp32"),
                 "logits/loss": ["the fused loss"] * (not p.fused_loss)}.get(name, [])
        hint = ", ".join(tries + ["a shorter --seq-len"])
        why = (f"after the parameters and optimizer states, {name} is the largest part: {fmt_bytes(size)} for "
               f"one sequence of {p.seq_len} tokens (try {hint})")
    return (f"plan: memory must be at least {fmt_bytes(p.peak)} for a micro-batch of 1, got {given}: {why}; "
            f"the peak at batch 1 is {parts}")


def _trainable(model, adapters: dict, spec_given: bool) -> tuple[set, dict]:
    """(ids of the parameters that get gradients, {path: (linear, rank)} of adapters still to add). A LoRA spec
    not yet applied freezes all but the task head (as lora.apply does); a live model says it by requires_grad."""
    from .lora import HEADS

    if not spec_given:
        return {id(p) for p in model.parameters() if p.requires_grad}, {}
    heads = {id(q) for name in HEADS if hasattr(model, name) for q in getattr(model, name).parameters()}
    paths = {n: (m, adapters[m][0]) for n, m in model.named_modules() if m in adapters}
    return heads, paths


def _segment_of(path: str, segments: list) -> _Segment:
    """The segment of a module path (its layer; the head otherwise)."""
    m = re.search(r"(?:(encoder|decoder)\.)?layers\.(\d+)\.", path)
    if m:
        names = [f"{m.group(1)} layer {m.group(2)}", f"layer {m.group(2)}"] if m.group(1) else [f"layer {m.group(2)}"]
        for seg in segments:
            if seg.name in names:
                return seg
    return segments[-1]


def _estimate(model, family, micro, seq, target, precision, device, adapters, spec_given, ckpt, accumulation, fused,
              lora_text) -> MemoryPlan:
    """One plan at micro-batch ``micro``: the walk, then the candidate moments of the peak."""
    trainable, to_add = _trainable(model, adapters, spec_given)
    w = _Walk(model, micro, seq, precision, device, adapters, trainable, ckpt, fused, target)
    {"bert": _walk_bert, "seq2seq": _walk_seq2seq}.get(family, _walk_decoder_only)(w, model)
    w.finish(to_add)
    seen, params, total, n_train, largest = set(), 0, 0, 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        params += p.numel() * p.element_size()
        total += p.numel()
        if id(p) in trainable:
            n_train += p.numel()
            largest = max(largest, p.numel() * p.element_size())
    params += sum(b.numel() * b.element_size() for b in model.buffers())
    added = sum(r * (m.in_features + m.out_features) for m, r in to_add.values())
    params, total, n_train = params + 4 * added, total + added, n_train + added
    segs = w.segments
    grads_all = sum(s.grads for s in segs)
    opt_tmp = 0  # the fused AdamW (pyllm.train.optim) updates in place on both devices
    acc_grads = grads_all if accumulation > 1 else 0  # later micro-batches start with every gradient
    kept_all, loss = sum(s.kept for s in segs), w.loss_kept
    # (grads, activations, logits/loss, temporary, when)
    moments = [(acc_grads, kept_all - loss, loss + w.fwd_transient, 0, "the end of the forward pass")]
    grads = acc_grads
    if acc_grads:  # every weight gradient is a new tensor summed into .grad: the largest one is extra
        for seg in segs:
            seg.transient += max((p.numel() * p.element_size() for m in seg.modules for p in m.parameters()
                                  if id(p) in trainable), default=0)
        w.loss_bwd += w.loss_dweight
    for i in range(len(segs) - 1, -1, -1):
        seg = segs[i]
        acts = sum(s.kept for s in segs[:i]) + seg.kept + seg.recompute
        if seg.name == "head":  # first the loss's backward (the fused op hands over the weight's gradient
            # then; unfused, the logits' gradients come and go before the head's weight gradient exists)
            at_loss = grads + (seg.grads if w.fused and not acc_grads else 0)
            moments.append((at_loss, acts - loss, loss + w.loss_bwd, 0, "the backward pass (loss)"))
            acts -= loss
        early = seg.grads if acc_grads or seg.early_grads is None else seg.early_grads
        moments.append((grads + (0 if acc_grads else early), acts, 0, seg.transient, f"the backward pass ({seg.name})"))
        grads += 0 if acc_grads else seg.grads
        moments.append((grads, acts, 0, 0, f"the backward pass ({seg.name})"))
    moments.append((grads_all, 0, 0, opt_tmp, "the optimizer step"))
    grads, acts, logits, tmp, phase = max(moments, key=lambda m: sum(m[:4]))
    return MemoryPlan(
        model=type(model).__name__, micro_batch=micro, seq_len=seq, target_len=target, precision=precision,
        gradient_checkpointing=ckpt, gradient_accumulation_steps=accumulation, lora=lora_text, fused_loss=fused,
        device=device, num_parameters=total, trainable_parameters=n_train, parameters=params, gradients=grads,
        optimizer_states=8 * n_train, activations=acts, logits=logits, temporary=tmp,
        peak=params + 8 * n_train + grads + acts + logits + tmp, phase=phase,
        layers=[(s.name, s.kept) for s in segs])


__all__ = ["MemoryPlan", "plan", "plan_from_config", "for_run", "parse_memory", "device_memory", "build_meta_model",
           "fmt_bytes", "ARCHS"]
