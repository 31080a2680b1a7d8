"""One configuration dataclass for both model families (BERT-style encoders, GPT-style decoders).

The fields flow down unchanged: models read them, blocks read them, nothing copies them into
other names. `from_pretrained` fills one from a Hugging Face config.json (see hf_io.py).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Optional

from pyllm import backends


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


ACTIVATIONS = ("gelu", "gelu_new", "gelu_tanh", "relu", "silu")
NORM_POSITIONS = ("pre", "post")
BACKENDS = ("auto",) + backends.NAMES


@dataclass
class TransformerConfig:
    """Hyperparameters of a BERT- or GPT-style Transformer.

    Defaults are BERT-base sized. `norm_position=None` means the family's own choice:
    "post" for BERT (LayerNorm after each residual add), "pre" for GPT (before each sublayer).

    `attention_dropout` is applied in training inside the fused kernel (`pyllm.attention(dropout_p=...)`:
    a Philox mask that torch's seed reproduces; the probabilities are never stored). Hidden dropout
    (after embeddings, attention output and MLP output) is applied as usual.
    """

    vocab_size: int = 30522
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    num_kv_heads: Optional[int] = None  # None = num_heads; fewer = grouped-query attention
    intermediate_size: Optional[int] = None  # None = 4 * hidden_size
    max_position_embeddings: int = 512
    type_vocab_size: int = 2  # BERT token types (segments); GPT models have none
    norm_position: Optional[str] = None  # "pre" / "post" / None (family default)
    activation: str = "gelu"  # gelu (erf), gelu_new / gelu_tanh (tanh approx.), relu, silu
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.0  # on the attention probabilities, in training (fused)
    classifier_dropout: Optional[float] = None  # None = hidden_dropout
    norm_eps: float = 1e-12
    initializer_range: float = 0.02
    tie_word_embeddings: bool = True
    num_labels: int = 2  # sequence / token classification heads
    pad_token_id: Optional[int] = 0
    bos_token_id: Optional[int] = None
    eos_token_id: Optional[int] = None
    backend: Optional[str] = None  # None = auto; else a pyllm.backends name for every op call
    id2label: Optional[dict] = field(default=None, repr=False)

    def __post_init__(self):
        if self.num_kv_heads is None:
            self.num_kv_heads = self.num_heads
        if self.intermediate_size is None:
            self.intermediate_size = 4 * self.hidden_size
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                     "intermediate_size", "max_position_embeddings", "num_labels"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"TransformerConfig: {name} must be a positive int, got {value!r}")
        if not isinstance(self.type_vocab_size, int) or self.type_vocab_size < 0:
            raise ValueError(f"TransformerConfig: type_vocab_size must be an int >= 0, got {self.type_vocab_size!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"TransformerConfig: hidden_size ({self.hidden_size}) must be divisible by "
                             f"num_heads ({self.num_heads})")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"TransformerConfig: num_heads ({self.num_heads}) must be divisible by "
                             f"num_kv_heads ({self.num_kv_heads})")
        if self.norm_position not in (None, *NORM_POSITIONS):
            raise ValueError(f"TransformerConfig: norm_position must be one of {NORM_POSITIONS} or None, "
                             f"got {self.norm_position!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"TransformerConfig: activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        for name in ("hidden_dropout", "attention_dropout", "classifier_dropout"):
            p = getattr(self, name)
            if p is not None and not (_is_number(p) and 0.0 <= p < 1.0):
                raise ValueError(f"TransformerConfig: {name} must be in [0, 1), got {p!r}")
        if not (_is_number(self.norm_eps) and self.norm_eps > 0):
            raise ValueError(f"TransformerConfig: norm_eps must be a number > 0, got {self.norm_eps!r}")
        if not (_is_number(self.initializer_range) and self.initializer_range >= 0):
            raise ValueError(f"TransformerConfig: initializer_range must be a number >= 0, got "
                             f"{self.initializer_range!r}")
        if self.backend is not None and self.backend not in BACKENDS:
            raise ValueError(f"TransformerConfig: backend must be None or one of {BACKENDS}, got {self.backend!r}")
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            tid = getattr(self, name)
            if tid is not None and not (isinstance(tid, int) and not isinstance(tid, bool)
                                        and 0 <= tid < self.vocab_size):
                raise ValueError(f"TransformerConfig: {name} must be in [0, vocab_size={self.vocab_size}), got {tid}")
        if self.id2label is not None:
            if not isinstance(self.id2label, dict):
                raise ValueError(f"TransformerConfig: id2label must be a dict {{id: label}}, got {self.id2label!r}")
            self.id2label = {int(k): str(v) for k, v in self.id2label.items()}
            if len(self.id2label) != self.num_labels:
                raise ValueError(f"TransformerConfig: id2label has {len(self.id2label)} entries but "
                                 f"num_labels is {self.num_labels}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TransformerConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"TransformerConfig.from_dict: unknown keys {unknown}; known keys are {sorted(known)}")
        return cls(**d)

    def replace(self, **changes) -> "TransformerConfig":
        """A copy with some fields changed (validated again)."""
        return type(self).from_dict({**self.to_dict(), **changes})
