"""pyllm.models without transformers: config checks, every head's shapes and loss, checkpointing,
backends, and bad inputs."""
import pytest
import torch
import torch.nn.functional as F

import pyllm
from pyllm.models import (BertForMaskedLM, BertForQuestionAnswering, BertForSequenceClassification,
                          BertForTokenClassification, BertModel, GPTForCausalLM, GPTForSequenceClassification,
                          GPTModel, TransformerConfig)

from ..conftest import need
from .helpers import batch, tiny_config

# ----------------------------------------------------------------------------- config


def test_config_defaults_and_round_trip():
    cfg = TransformerConfig(hidden_size=64, num_heads=4)
    assert cfg.num_kv_heads == 4 and cfg.intermediate_size == 256 and cfg.head_dim == 16
    assert TransformerConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.replace(num_layers=3).num_layers == 3


@pytest.mark.parametrize("changes, words", [
    (dict(hidden_size=30, num_heads=4), "hidden_size (30) must be divisible by num_heads (4)"),
    (dict(num_heads=4, hidden_size=32, num_kv_heads=3), "num_heads (4) must be divisible by num_kv_heads (3)"),
    (dict(activation="tanh"), "activation must be one of"),
    (dict(norm_position="middle"), "norm_position"),
    (dict(hidden_dropout=1.5), "hidden_dropout must be in [0, 1)"),
    (dict(vocab_size=0), "vocab_size must be a positive int"),
    (dict(backend="tpu"), "backend must be None or one of"),
    (dict(vocab_size=10, eos_token_id=10), "eos_token_id must be in [0, vocab_size=10)"),
])
def test_config_errors(changes, words):
    with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        TransformerConfig(**changes)


def test_config_from_dict_unknown_key():
    with pytest.raises(ValueError, match="unknown keys.*n_embd"):
        TransformerConfig.from_dict({"n_embd": 8})


# ----------------------------------------------------------------------------- heads


def test_bert_heads_shapes_and_losses():
    cfg = tiny_config()
    ids, mask = batch()
    B, N = ids.shape
    out = BertModel(cfg)(ids, mask)
    assert out.last_hidden_state.shape == (B, N, 32) and out.pooler_output.shape == (B, 32)

    labels = torch.full((B, N), -100)
    labels[:, 1] = ids[:, 1]
    mlm = BertForMaskedLM(cfg)
    o = mlm(ids, mask, labels=labels)
    assert o.logits.shape == (B, N, 97)
    torch.testing.assert_close(o.loss, F.cross_entropy(o.logits[:, 1], ids[:, 1]))  # -100 ignored
    assert mlm.decoder.weight is mlm.bert.embeddings.word.weight  # tied

    o = BertForSequenceClassification(cfg)(ids, mask, labels=torch.tensor([0, 2, 1]))
    assert o.logits.shape == (B, 3)
    torch.testing.assert_close(o.loss, F.cross_entropy(o.logits, torch.tensor([0, 2, 1])))
    reg = BertForSequenceClassification(cfg.replace(num_labels=1))(ids, mask, labels=torch.rand(B))
    assert reg.logits.shape == (B, 1) and reg.loss.ndim == 0
    multi = BertForSequenceClassification(cfg)(ids, mask, labels=torch.rand(B, 3).round())
    assert multi.loss.ndim == 0

    tl = torch.randint(0, 3, (B, N)).masked_fill(mask == 0, -100)
    o = BertForTokenClassification(cfg)(ids, mask, labels=tl)
    assert o.logits.shape == (B, N, 3)
    keep = tl != -100
    torch.testing.assert_close(o.loss, F.cross_entropy(o.logits[keep], tl[keep]))

    s, e = torch.tensor([1, 2, 99]), torch.tensor([3, 4, 99])  # 99: outside, ignored
    o = BertForQuestionAnswering(cfg)(ids, mask, start_positions=s, end_positions=e)
    assert o.start_logits.shape == (B, N) and o.end_logits.shape == (B, N)
    want = (F.cross_entropy(o.start_logits[:2], s[:2]) + F.cross_entropy(o.end_logits[:2], e[:2])) / 2
    torch.testing.assert_close(o.loss, want)


def test_gpt_heads_shapes_and_losses():
    cfg = tiny_config()
    ids, mask = batch()
    B, N = ids.shape
    assert GPTModel(cfg)(ids, mask).last_hidden_state.shape == (B, N, 32)
    lm = GPTForCausalLM(cfg)
    assert lm.lm_head.weight is lm.transformer.word.weight
    labels = ids.masked_fill(mask == 0, -100)
    o = lm(ids, mask, labels=labels, return_logits=True)
    assert o.logits.shape == (B, N, 97)
    lg, lb = o.logits[:, :-1], labels[:, 1:]
    torch.testing.assert_close(o.loss, F.cross_entropy(lg[lb != -100], lb[lb != -100]))
    fused = lm(ids, mask, labels=labels)  # training with labels: the fused loss, no (B, N, vocab) logits
    assert fused.logits is None
    torch.testing.assert_close(fused.loss, o.loss, atol=1e-5, rtol=1e-5)
    fused.loss.backward()
    g = lm.lm_head.weight.grad.clone()
    lm.zero_grad()
    o.loss.backward()
    torch.testing.assert_close(g, lm.lm_head.weight.grad, atol=1e-5, rtol=1e-5)
    assert lm.eval()(ids, mask, labels=labels).logits.shape == (B, N, 97)
    sc = GPTForSequenceClassification(cfg)
    o = sc(ids, mask, labels=torch.tensor([0, 1, 2]))
    assert o.logits.shape == (B, 3)
    # the score is read at each row's last real token: row 1 alone gives the same logits
    n1 = int(mask[1].sum())
    torch.testing.assert_close(sc(ids[1:2, :n1]).logits, o.logits[1:2], atol=1e-5, rtol=1e-5)


def test_pre_and_post_norm_both_train():
    for norm_position in ("pre", "post"):
        for cls in (BertForMaskedLM, GPTForCausalLM):
            model = cls(tiny_config(norm_position=norm_position))
            ids, mask = batch()
            model(ids, mask, labels=ids).loss.backward()
            assert all(p.grad is not None and torch.isfinite(p.grad).all()
                       for p in model.parameters() if p.requires_grad)


def test_gradient_checkpointing_same_gradients():
    ids, mask = batch()
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = GPTForCausalLM(tiny_config(num_kv_heads=2))
        if ckpt:
            model.gradient_checkpointing_enable()
        assert model.gradient_checkpointing == ckpt
        model.train()
        model(ids, mask, labels=ids).loss.backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_gradient_checkpointing_saves_less_for_backward():
    """The 'limited memory' story: with checkpointing only block inputs are kept for backward."""
    ids, mask = batch(B=2, N=32)
    saved_bytes = {}
    for ckpt in (False, True):
        model = GPTForCausalLM(tiny_config(num_layers=4, max_position_embeddings=64)).train()
        model.gradient_checkpointing = ckpt
        sizes = []

        def pack(t):
            sizes.append(0 if isinstance(t, torch.nn.Parameter) else t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(ids, mask, labels=ids).loss
        loss.backward()
        saved_bytes[ckpt] = sum(sizes)
    assert saved_bytes[True] < saved_bytes[False] / 3


def test_padding_does_not_change_real_positions():
    """BERT with right padding, GPT with left padding: each row equals the row run alone."""
    ids, mask = batch()
    bert = BertModel(tiny_config()).eval()
    h = bert(ids, mask).last_hidden_state
    for i in range(ids.shape[0]):
        n = int(mask[i].sum())
        torch.testing.assert_close(bert(ids[i:i + 1, :n]).last_hidden_state[0], h[i, :n], atol=1e-5, rtol=1e-5)
    ids, mask = batch(pad_side="left")
    gpt = GPTModel(tiny_config()).eval()
    h = gpt(ids, mask).last_hidden_state
    N = ids.shape[1]
    for i in range(ids.shape[0]):
        n = int(mask[i].sum())
        torch.testing.assert_close(gpt(ids[i:i + 1, N - n:]).last_hidden_state[0], h[i, N - n:],
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cls, backend", [(BertForSequenceClassification, "cpu"), (GPTForCausalLM, "cpu"),
                                          (GPTForCausalLM, "triton")])
def test_kernel_backends_agree_with_reference(cls, backend):
    """The same model on the reference and on a kernel backend: outputs and every gradient.
    (Triton runs under the interpreter on CPU: one layer keeps it to seconds.)"""
    need(backend)
    ids, mask = batch(B=2, N=7)
    labels = torch.tensor([0, 2]) if cls is BertForSequenceClassification else ids
    outs, grads = [], []
    for name in ("reference", backend):
        torch.manual_seed(0)
        model = cls(tiny_config(backend=name, num_kv_heads=2, num_layers=1 if backend == "triton" else 2))
        out = model(ids, mask, labels=labels)
        out.loss.backward()
        outs.append([out.loss.detach()] + ([] if out.logits is None else [out.logits.detach()]))
        grads.append([p.grad for p in model.parameters()])
    torch.testing.assert_close(outs[0], outs[1], atol=1e-4, rtol=1e-4)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_backend_context_manager_reaches_models():
    model = BertModel(tiny_config()).eval()
    ids, mask = batch()
    with pyllm.backends.use("reference"):
        a = model(ids, mask).last_hidden_state
    torch.testing.assert_close(a, model(ids, mask).last_hidden_state, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------- bad input


def test_bad_inputs_name_expected_and_received():
    cfg = tiny_config()
    bert, gpt = BertForSequenceClassification(cfg), GPTForCausalLM(cfg)
    ids, mask = batch()
    with pytest.raises(ValueError, match=r"token id 97, outside the vocabulary \[0, 97\)"):
        bert(ids.clone().fill_(97))
    with pytest.raises(ValueError, match=r"token id -1"):
        gpt(ids - 1)
    with pytest.raises(ValueError, match=r"sequence length 41 exceeds max_position_embeddings=40"):
        bert(torch.ones(1, 41, dtype=torch.long))
    with pytest.raises(ValueError, match=r"attention_mask must have shape \(3, 11\).*got \(3, 10\)"):
        bert(ids, mask[:, :10])
    with pytest.raises(ValueError, match=r"labels must have shape \(3,\), got \(2,\)"):
        bert(ids, mask, labels=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"labels holds 5; expected class ids in \[0, 3\)"):
        bert(ids, mask, labels=torch.tensor([0, 1, 5]))
    with pytest.raises(ValueError, match=r"labels must have shape \(3, 11\), got \(3, 10\)"):
        gpt(ids, mask, labels=ids[:, :10])
    with pytest.raises(ValueError, match=r"input_ids must be a \(batch, seqlen\) tensor, got \(11,\)"):
        gpt(ids[0])
    with pytest.raises(ValueError, match=r"token_type_ids holds 2, outside \[0, type_vocab_size=2\)"):
        bert(ids, mask, token_type_ids=torch.full_like(ids, 2))
    with pytest.raises(ValueError, match=r"position_ids must be in \[0, max_position_embeddings=40\), got .*40\]"):
        gpt(ids, position_ids=torch.arange(30, 41)[None])
    with pytest.raises(ValueError, match=r"start_positions must have 3 values"):
        BertForQuestionAnswering(cfg)(ids, start_positions=torch.tensor([1]), end_positions=torch.tensor([1]))


def test_gpt_layer_stack_is_not_called_encoder_and_old_state_dicts_load():
    """GPT's layers are `blocks` (a BlockStack, shared with BERT's encoder); state dicts saved under the old
    name `encoder.` (checkpoint.pt of earlier runs) still load, exactly."""
    from pyllm.models.block import BlockStack

    torch.manual_seed(0)
    model = GPTForCausalLM(tiny_config(type_vocab_size=0))
    assert isinstance(model.transformer.blocks, BlockStack) and not hasattr(model.transformer, "encoder")
    old = {k.replace("transformer.blocks.", "transformer.encoder."): v for k, v in model.state_dict().items()}
    assert any(k.startswith("transformer.encoder.") for k in old)
    fresh = GPTForCausalLM(tiny_config(type_vocab_size=0))
    fresh.load_state_dict(old)
    for k, v in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k


def test_attention_dropout_is_applied_in_training_and_reproducible():
    """attention_dropout drops attention probabilities inside the fused kernel, in training only."""
    ids, mask = batch()
    torch.manual_seed(0)
    model = BertForMaskedLM(tiny_config(attention_dropout=0.5))
    torch.manual_seed(0)
    plain = BertForMaskedLM(tiny_config(attention_dropout=0.0))
    model.train(), plain.train()
    torch.manual_seed(3)
    a = model(ids, attention_mask=mask).logits
    torch.manual_seed(3)
    b = model(ids, attention_mask=mask).logits
    torch.testing.assert_close(a, b, atol=0, rtol=0)  # the Philox mask follows torch's seed
    torch.manual_seed(3)
    assert not torch.allclose(a, plain(ids, attention_mask=mask).logits)  # something was dropped
    model.eval(), plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(ids, attention_mask=mask).logits, plain(ids, attention_mask=mask).logits)
