"""pyllm's ops: one module per kernel family (validation, dispatch, autograd through torch.library)."""
from pyllm.ops import _autograd  # noqa: F401  (registers fakes and autograd for the kernel ops)
from pyllm.ops.attention import attention, scaled_dot_product_attention
from pyllm.ops.layer_norm import layer_norm, rms_norm
from pyllm.ops.linear_cross_entropy import linear_cross_entropy

__all__ = ["attention", "scaled_dot_product_attention", "layer_norm", "rms_norm", "linear_cross_entropy"]
