"""MultiheadAttention on pyllm's fused attention (a subclass of torch's: same constructor and state_dict)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from pyllm.ops import attention


class MultiheadAttention(torch.nn.MultiheadAttention):
    """``torch.nn.MultiheadAttention`` whose attention runs on pyllm's kernels.

    Same constructor, ``forward`` signature, parameters and state_dict keys as torch's. Calls the fused
    path cannot serve go to torch's implementation (the reference): ``need_weights=True`` (the fused
    kernels never form the weights -- note torch's default is True, pass ``need_weights=False``),
    ``add_bias_kv``, ``add_zero_attn``, attention dropout while training, float masks, and explicit
    ``attn_mask`` other than the causal hint. Pass ``backend=`` to pin a pyllm backend.
    """

    def __init__(self, *args, backend: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.backend = backend

    def _fused_ok(self, key_padding_mask, need_weights, attn_mask, is_causal, L, S) -> bool:
        if need_weights or self.bias_k is not None or self.add_zero_attn:
            return False
        if self.training and self.dropout > 0.0:
            return False
        if key_padding_mask is not None and key_padding_mask.dtype != torch.bool:
            return False
        if attn_mask is not None and not (is_causal and key_padding_mask is None and L == S):
            return False
        return True

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None = None,
                need_weights: bool = True, attn_mask: Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False):
        batched = query.dim() == 3
        seq_dim = (1 if self.batch_first else 0) if batched else 0
        L, S = query.shape[seq_dim], key.shape[seq_dim]
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint (as torch.nn.MultiheadAttention)")
        if not self._fused_ok(key_padding_mask, need_weights, attn_mask, is_causal, L, S):
            return super().forward(query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
                                   attn_mask=attn_mask, average_attn_weights=average_attn_weights,
                                   is_causal=is_causal)
        if not batched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            key_padding_mask = None if key_padding_mask is None else key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))  # -> (B, N, E)
        E, H = self.embed_dim, self.num_heads
        if self._qkv_same_embed_dim:
            w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        else:
            w_q, w_k, w_v = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        b_q, b_k, b_v = (None,) * 3 if self.in_proj_bias is None else self.in_proj_bias.chunk(3)
        B = query.shape[0]
        q = F.linear(query, w_q, b_q).view(B, L, H, E // H)  # (B, L, H, hd)
        k = F.linear(key, w_k, b_k).view(B, S, H, E // H)
        v = F.linear(value, w_v, b_v).view(B, S, H, E // H)
        # torch's key_padding_mask is True = ignore; pyllm's is True = a real token
        kpm = None if key_padding_mask is None else ~key_padding_mask
        o = attention(q, k, v, causal=bool(is_causal), key_padding_mask=kpm, backend=self.backend)
        out = self.out_proj(o.reshape(B, L, E))  # (B, L, E)
        if not batched:
            out = out.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        return out, None
