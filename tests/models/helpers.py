"""Tiny configs and inputs shared by the model tests."""
import torch

from pyllm.models import TransformerConfig


def tiny_config(**changes) -> TransformerConfig:
    base = dict(vocab_size=97, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=48,
                max_position_embeddings=40, hidden_dropout=0.0, num_labels=3, initializer_range=0.2,
                pad_token_id=0)
    return TransformerConfig(**{**base, **changes})


def batch(B=3, N=11, vocab=97, pad_side="right", lengths=None, seed=0):
    """(input_ids, attention_mask): ids in [1, vocab), padding (id 0, mask 0) on `pad_side`."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (B, N), generator=g)
    lengths = lengths or [N - 2 * i for i in range(B)]
    mask = torch.zeros(B, N, dtype=torch.long)
    for i, n in enumerate(lengths):
        if pad_side == "right":
            mask[i, :n] = 1
        else:
            mask[i, N - n:] = 1
    return ids * mask, mask
