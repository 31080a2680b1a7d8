"""Drop-in modules: same constructors, parameters and state_dict keys as torch's."""
from pyllm.nn.activation import GELU
from pyllm.nn.attention import MultiheadAttention
from pyllm.nn.linear import Linear
from pyllm.nn.norm import LayerNorm, RMSNorm
from pyllm.nn.replace import replace_modules

__all__ = ["Linear", "LayerNorm", "RMSNorm", "GELU", "MultiheadAttention", "replace_modules"]
