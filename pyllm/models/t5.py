"""T5: a pre-norm encoder-decoder with RMS-style "T5 LayerNorm" (pyllm.rms_norm), relative position
bias, unscaled attention and a plain (ReLU) or gated (T5 v1.1: gelu) feed-forward.

`T5ForConditionalGeneration(Seq2SeqConfig(model_type="t5", ...))`; `from_pretrained(folder)` reads
Hugging Face `t5` folders. The relative position bias is computed once per stack from the first
layer's table (transformers' layout: `block.0.layer.0.SelfAttention.relative_attention_bias`) and added
to every layer's self-attention scores through `seq2seq.biased_attention`; cross-attention has no bias
and runs on the fused kernel.
"""

from __future__ import annotations

from .seq2seq import EncoderDecoderModel, Seq2SeqLM


class T5Model(EncoderDecoderModel):
    """T5 without the LM head: last_hidden_state (B, N, C), encoder_last_hidden_state (B, M, C)."""

    families = ("t5",)


class T5ForConditionalGeneration(Seq2SeqLM):
    """T5 with the LM head (tied: the decoder output is scaled by d_model ** -0.5 first, as in T5)."""

    families = ("t5",)
    base_class = T5Model


__all__ = ["T5Model", "T5ForConditionalGeneration"]
