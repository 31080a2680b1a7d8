"""Packed documents (pyllm.data.PackedCollator + cu_seqlens): attention never crosses a document, so the
packed loss equals the per-document losses computed separately (GPT and Llama, with a sliding window)."""
import pytest
import torch

from pyllm.data import IGNORE_INDEX, PackedCollator
from pyllm.models import GPTForCausalLM, GPTModel
from pyllm.models.llama import LlamaConfig, LlamaForCausalLM
from tests.models.helpers import tiny_config

DOCS = [[5, 9, 3, 7, 11], [4], [8, 2, 6, 1, 12, 15, 3, 9, 10], [13, 14, 2]]


def test_collator_layout():
    b = PackedCollator()([{"input_ids": d} for d in DOCS])
    assert b["cu_seqlens"].dtype == torch.int32 and b["cu_seqlens"].tolist() == [0, 5, 6, 15, 18]
    assert b["input_ids"].shape == (1, 18) and b["input_ids"][0].tolist() == sum(DOCS, [])
    assert b["position_ids"][0].tolist() == list(range(5)) + [0] + list(range(9)) + list(range(3))
    assert (b["labels"][0, [0, 5, 6, 15]] == IGNORE_INDEX).all()
    with pytest.raises(ValueError, match="no tokens"):
        PackedCollator()([{"input_ids": []}])


def _models(backend):
    torch.manual_seed(0)
    yield GPTForCausalLM(tiny_config(attention_dropout=0.0, backend=backend))
    torch.manual_seed(0)
    yield LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                                       intermediate_size=40, max_position_embeddings=40, sliding_window=4,
                                       backend=backend))


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_packed_loss_equals_per_document_loss(backend, train):
    batch = PackedCollator()([{"input_ids": d} for d in DOCS])
    for model in _models(backend):
        model.train(train)
        packed = model(**batch)
        total, count = 0.0, 0
        for d in DOCS:
            if len(d) < 2:
                continue  # a one-token document predicts nothing
            ids = torch.tensor([d])
            total = total + model(ids, labels=ids).loss * (len(d) - 1)
            count += len(d) - 1
        torch.testing.assert_close(packed.loss, total / count, atol=1e-5, rtol=1e-5)
        if not train:  # the hidden states of each document, too
            h = model(**{k: v for k, v in batch.items() if k != "labels"}).last_hidden_state[0]
            for d, s in zip(DOCS, batch["cu_seqlens"].tolist()):
                alone = model(torch.tensor([d])).last_hidden_state[0]
                torch.testing.assert_close(h[s:s + len(d)], alone, atol=1e-5, rtol=1e-5)


def test_packed_input_errors():
    model = GPTModel(tiny_config())
    ids = torch.randint(1, 97, (1, 6))
    with pytest.raises(TypeError, match="cu_seqlens must be a 1-D int32 tensor"):
        model(ids, cu_seqlens=torch.tensor([0, 6]))
    with pytest.raises(ValueError, match="cu_seqlens must rise from 0 to the 6 tokens"):
        model(ids, cu_seqlens=torch.tensor([0, 4], dtype=torch.int32))
    with pytest.raises(ValueError, match="excludes attention_mask"):
        model(ids, attention_mask=torch.ones(1, 6), cu_seqlens=torch.tensor([0, 6], dtype=torch.int32))
