"""pyllm's ops: one module per kernel family (validation, dispatch, autograd through torch.library)."""
from pyllm.ops import _autograd  # noqa: F401  (registers fakes and autograd for the kernel ops)
from pyllm.ops.activation import gelu
from pyllm.ops.attention import attention, attention_probs, attention_varlen, scaled_dot_product_attention
from pyllm.ops.layer_norm import layer_norm, rms_norm
from pyllm.ops.linear_cross_entropy import linear_cross_entropy
from pyllm.ops.rotary import rotary

__all__ = ["attention", "attention_varlen", "attention_probs", "scaled_dot_product_attention", "layer_norm", "rms_norm",
           "rotary", "linear_cross_entropy", "gelu"]
