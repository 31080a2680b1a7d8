"""Bridges to other libraries. `pyllm.integrations.hf.patch(model)` runs a transformers BERT or
GPT-2 model on pyllm's attention and LayerNorm (imported on demand; needs no transformers here)."""
