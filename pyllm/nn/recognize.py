"""Recognise RMSNorm modules of other libraries (transformers' LlamaRMSNorm and its many copies, T5LayerNorm)
by the code of their forward, so they can be served by pyllm's fused RMSNorm with the same Parameters.

A class is recognised when its forward parses to the same syntax tree (docstrings and comments aside) as
one of the known formulas below; anything else, e.g. Gemma's ``(1 + weight)`` variant, is not touched.
"""
from __future__ import annotations

import ast
import functools
import inspect
import textwrap

import torch
from torch import Tensor

from pyllm.nn.norm import RMSNorm
from pyllm.ops import rms_norm

# transformers' LlamaRMSNorm.forward (copied verbatim into Qwen2, Mistral, Phi3, Olmo, ... as *RMSNorm):
# normalize in fp32, round to the input dtype, then scale (output dtype: promote(weight, input)).
_LLAMA = '''
def forward(self, hidden_states):
    input_dtype = hidden_states.dtype
    hidden_states = hidden_states.to(torch.float32)
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
    return self.weight * hidden_states.to(input_dtype)
'''
# transformers' T5LayerNorm.forward (also LongT5, UMT5, Pix2Struct): same math, fp32 unless weight is half.
_T5 = '''
def forward(self, hidden_states):
    variance = hidden_states.to(torch.float32).pow(2).mean(-1, keepdim=True)
    hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
    if self.weight.dtype in [torch.float16, torch.bfloat16]:
        hidden_states = hidden_states.to(self.weight.dtype)
    return self.weight * hidden_states
'''


def _tree(source: str) -> str:
    """The forward's syntax tree as text: docstring dropped, the input argument named hidden_states."""
    fn = ast.parse(textwrap.dedent(source)).body[0]
    arg = fn.args.args[1].arg
    for node in ast.walk(fn):
        if isinstance(node, ast.Name) and node.id == arg:
            node.id = "hidden_states"
    body = [s for s in fn.body if not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant))]
    args = ast.arguments(posonlyargs=[], args=[ast.arg("self"), ast.arg("hidden_states")], kwonlyargs=[],
                         kw_defaults=[], defaults=[])
    fn = ast.FunctionDef(name="forward", args=args, body=body, decorator_list=[], returns=None, type_params=[])
    return ast.dump(fn, annotate_fields=False)


_KNOWN = {_tree(_LLAMA): "llama", _tree(_T5): "t5"}


@functools.lru_cache(maxsize=None)
def _kind_of_class(cls: type) -> str | None:
    try:
        source = inspect.getsource(cls.forward)
        if len(ast.parse(textwrap.dedent(source)).body[0].args.args) != 2:
            return None
        return _KNOWN.get(_tree(source))
    except (OSError, TypeError, SyntaxError, IndexError, AttributeError):
        return None


def rms_norm_kind(module: torch.nn.Module) -> str | None:
    """"llama" or "t5" when ``module`` computes one of the known RMSNorm formulas over its last dim with a
    1-D ``weight`` Parameter and a float ``variance_epsilon``; else None."""
    if isinstance(module, torch.nn.RMSNorm):
        return None  # torch's own: pyllm.nn.replace_modules handles it
    weight, eps = getattr(module, "weight", None), getattr(module, "variance_epsilon", None)
    if not isinstance(weight, torch.nn.Parameter) or weight.dim() != 1 or not isinstance(eps, (int, float)):
        return None
    return _kind_of_class(type(module))


class MatchedRMSNorm(RMSNorm):
    """pyllm's fused RMSNorm standing in for a recognised module: the same ``weight`` Parameter (optimizers
    keep tracking it), its epsilon, and its output dtype -- transformers' formulas promote to the weight's
    dtype (a bf16 input with an fp32 weight gives fp32; T5 gives the weight's dtype when it is half)."""

    def __init__(self, module: torch.nn.Module, kind: str, backend: str | None = None):
        w = module.weight
        super().__init__(w.shape[0], eps=float(module.variance_epsilon), backend=backend, device=w.device,
                         dtype=w.dtype)
        self.weight = w
        self.kind = kind
        self.replaced = type(module).__name__
        self.train(module.training)

    @property
    def variance_epsilon(self) -> float:  # the attribute name transformers' code reads
        return self.eps

    def _out_dtype(self, x: Tensor) -> torch.dtype:
        w = self.weight.dtype
        if self.kind == "t5":
            half = w in (torch.float16, torch.bfloat16)
            return w if half else torch.promote_types(torch.promote_types(x.dtype, torch.float32), w)
        return torch.promote_types(x.dtype, w)

    def forward(self, x: Tensor, residual: Tensor | None = None):
        out = self._out_dtype(x)
        if out == x.dtype:
            return super().forward(x, residual)
        work = torch.promote_types(out, x.dtype)
        y = rms_norm(x.to(work), self.normalized_shape, self.weight, self.eps,
                     residual=None if residual is None else residual.to(work), backend=self.backend)
        return y.to(out) if residual is None else (y[0].to(out), y[1])

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, replaces={self.replaced}"
