"""pyllm.integrations.hf.patch: a live transformers BERT / GPT-2 on pyllm attention and LayerNorm."""
import os

import pytest
import torch

import pyllm
from pyllm.integrations.hf import patch

from .helpers import batch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")


@pytest.fixture
def count_attention(monkeypatch):
    """Counts pyllm.attention calls, proving patched models really go through it."""
    calls = []
    real = pyllm.attention

    def counted(*args, **kwargs):
        calls.append((kwargs.get("key_padding_mask") is not None, kwargs.get("backend")))
        return real(*args, **kwargs)

    monkeypatch.setattr(pyllm, "attention", counted)
    return calls


def _tiny_bert():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=48, max_position_embeddings=40, initializer_range=0.2)
    return transformers.BertForSequenceClassification(cfg).eval()


def _tiny_gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=97, n_positions=48, n_embd=32, n_layer=2, n_head=4,
                                  initializer_range=0.2, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return transformers.GPT2LMHeadModel(cfg).eval()


def test_patched_bert_matches_unpatched(count_attention):
    model = _tiny_bert()
    ids, mask = batch()
    with torch.no_grad():
        want = model(ids, attention_mask=mask, output_hidden_states=True)
    assert patch(model) is model
    assert sum(isinstance(m, pyllm.nn.LayerNorm) for m in model.modules()) == 5  # emb + 2 per layer
    with torch.no_grad():
        got = model(ids, attention_mask=mask, output_hidden_states=True)
    assert count_attention == [(True, None), (True, None)]  # both layers, with the padding mask
    real = mask.bool()
    torch.testing.assert_close(got.hidden_states[-1][real], want.hidden_states[-1][real], atol=1e-4, rtol=0)
    torch.testing.assert_close(got.logits, want.logits, atol=1e-4, rtol=0)
    # a custom 4-D mask is beyond the fused op: it falls back to transformers' SDPA, still correct
    mask4d = mask.bool()[:, None, None, :].expand(-1, 1, ids.shape[1], -1)
    with torch.no_grad():
        got4d = model(ids, attention_mask=mask4d)
    torch.testing.assert_close(got4d.logits, want.logits, atol=1e-4, rtol=0)


def test_patched_gpt2_matches_and_generates_the_same(count_attention):
    model = _tiny_gpt2()
    ids, mask = batch(B=3, N=8, pad_side="left", lengths=[8, 5, 3])
    with torch.no_grad():
        want = model(ids, attention_mask=mask).logits
        want_gen = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    patch(model, backend="reference")
    with torch.no_grad():
        got = model(ids, attention_mask=mask).logits
        got_gen = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], atol=1e-4, rtol=0)
    assert torch.equal(got_gen, want_gen)  # through transformers' own KV cache
    assert len(count_attention) > 2 and all(backend == "reference" for _, backend in count_attention)


def test_training_step_on_patched_model():
    """Same loss and gradients as unpatched (dropout off), and the optimizer made before patch()
    still updates the swapped LayerNorms' parameters."""
    ids, mask = batch()
    labels = torch.tensor([0, 1, 0])
    ref = _tiny_bert().train()
    for m in ref.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    ref_loss = ref(ids, attention_mask=mask, labels=labels).loss
    ref_loss.backward()

    model = _tiny_bert().train()
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    patch(model)
    loss = model(ids, attention_mask=mask, labels=labels).loss
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=0)
    loss.backward()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, q.grad, atol=1e-4, rtol=1e-3, msg=name)
    ln = model.bert.encoder.layer[0].output.LayerNorm
    before = ln.weight.detach().clone()
    opt.step()
    assert not torch.equal(ln.weight, before)
    assert model(ids, attention_mask=mask, labels=labels).loss < loss


def test_patch_refuses_other_models():
    cfg = transformers.GPT2Config(vocab_size=10, n_positions=8, n_embd=8, n_layer=1, n_head=2)
    model = transformers.GPT2LMHeadModel(cfg)
    model.config.model_type = "llama"
    with pytest.raises(ValueError, match="expected a transformers BERT or GPT-2 model.*'llama'"):
        patch(model)
    with pytest.raises(ValueError, match="model_type None"):
        patch(torch.nn.Linear(2, 2))
