"""BART and Marian: post-norm encoder-decoders with learned (BART) or sinusoidal (Marian) positions.

`BartForConditionalGeneration(config)` with `Seq2SeqConfig(model_type="bart" | "marian", ...)`;
`from_pretrained(folder)` reads Hugging Face `bart` and `marian` folders. Calling conventions are
transformers': `model(input_ids, attention_mask, decoder_input_ids=None, decoder_attention_mask=None,
labels=None)` -> `.loss`, `.logits` (B, N, vocab), `.encoder_last_hidden_state` (B, M, C).
"""

from __future__ import annotations

from .seq2seq import EncoderDecoderModel, Seq2SeqLM, shift_tokens_right


class BartModel(EncoderDecoderModel):
    """The BART / Marian encoder-decoder without the LM head (outputs: last_hidden_state (B, N, C),
    encoder_last_hidden_state (B, M, C)). Without decoder_input_ids the decoder reads input_ids shifted
    right (BART's denoising convention, as in transformers)."""

    families = ("bart", "marian")

    def default_decoder_input_ids(self, input_ids, who: str):
        if input_ids is None:
            raise ValueError(f"{who}: pass decoder_input_ids (or input_ids to shift right)")
        return shift_tokens_right(input_ids, self.config.pad_token_id, self.config.decoder_start_token_id)


class BartForConditionalGeneration(Seq2SeqLM):
    """BART / Marian with the LM head tied to the shared embedding, plus final_logits_bias."""

    families = ("bart", "marian")
    base_class = BartModel


__all__ = ["BartModel", "BartForConditionalGeneration"]
