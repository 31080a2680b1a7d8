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


def test_patch_on_a_non_transformers_module_says_what_to_use():
    with pytest.raises(ValueError, match="expected a transformers model.*got Linear.*replace_modules"):
        patch(torch.nn.Linear(2, 2))


# ---- every architecture: tiny random configs, patched vs unpatched, logits and one training step's gradients
def _tiny(name):
    llama_kw = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2)
    make = {
        "bert": lambda: transformers.BertForSequenceClassification(transformers.BertConfig(
            vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
            max_position_embeddings=40)),
        "gpt2": lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=97, n_positions=48, n_embd=32, n_layer=2, n_head=4, bos_token_id=1, eos_token_id=2)),
        "llama": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(**llama_kw)),
        "qwen2": lambda: transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**llama_kw)),
        # a window (4) shorter than the sequence (10): fused with window_size
        "mistral": lambda: transformers.MistralForCausalLM(transformers.MistralConfig(**llama_kw, sliding_window=4)),
        "t5": lambda: transformers.T5ForConditionalGeneration(transformers.T5Config(
            vocab_size=97, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4)),
        "bart": lambda: transformers.BartForConditionalGeneration(transformers.BartConfig(
            vocab_size=97, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48, max_position_embeddings=40)),
    }[name]
    torch.manual_seed(0)
    model = make()
    for m in model.modules():  # dropout off, so a training step is deterministic
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    for attr in ("dropout", "attention_dropout", "attn_dropout", "dropout_rate"):
        for m in model.modules():
            if isinstance(getattr(m, attr, None), float):
                setattr(m, attr, 0.0)
    return model


# fused calls per forward on a padded batch (the rest are transformers' own, each for a stated reason)
FUSED = {"bert": 2, "gpt2": 2, "llama": 2, "qwen2": 2, "mistral": 2, "t5": 0, "bart": 6}
NORMS = {"bert": ("LayerNorm", 5), "gpt2": ("LayerNorm", 5), "llama": ("LlamaRMSNorm", 5),
         "qwen2": ("Qwen2RMSNorm", 5), "mistral": ("MistralRMSNorm", 5), "t5": ("T5LayerNorm", 12),
         "bart": ("LayerNorm", 12)}


def _forward(model, name, ids, mask):
    kw = dict(attention_mask=mask)
    if name in ("t5", "bart"):
        kw["decoder_input_ids"] = ids[:, :6]
    if name == "bert":
        kw["labels"] = torch.tensor([0, 1, 0])
    else:
        kw["labels"] = (kw.get("decoder_input_ids", ids)).masked_fill(
            (mask[:, :6] if name in ("t5", "bart") else mask) == 0, -100)
    return model(ids, **kw)


@pytest.mark.parametrize("name", list(FUSED))
def test_every_architecture_patched_matches_unpatched(name, count_attention):
    import copy

    ids, mask = batch(B=3, N=10)
    want_model = _tiny(name).train()
    got_model = copy.deepcopy(want_model)
    patch(got_model)
    report = got_model.pyllm_patch_report
    # GPT-2's gelu_new MLP activation is swapped for pyllm.nn.GELU("tanh") too (one per layer)
    swapped = dict([NORMS[name]], **({"NewGELUActivation": 2} if name == "gpt2" else {}))
    assert report.swapped == swapped and report.attention.startswith("pyllm"), str(report)

    want, got = _forward(want_model, name, ids, mask), _forward(got_model, name, ids, mask)
    assert len(count_attention) == FUSED[name]
    real = mask.bool() if got.logits.shape[1] == ids.shape[1] else slice(None)
    torch.testing.assert_close(got.logits[real], want.logits[real], atol=1e-4, rtol=0)
    want.loss.backward()
    got.loss.backward()
    for (pname, p), q in zip(got_model.named_parameters(), want_model.parameters()):
        if q.grad is None:
            assert p.grad is None or not p.grad.any(), pname
            continue
        torch.testing.assert_close(p.grad, q.grad, atol=1e-4, rtol=1e-3, msg=pname)


@pytest.mark.parametrize("B,N", [(3, 8), (4, 4)])  # B == N once: a 2-D mask must never be read as (Nq, Nk)
def test_bert_output_attentions_on_padded_batch_fused_maps_equal_eager(B, N, count_attention):
    model = _tiny("bert").eval()
    ids, mask = batch(B=B, N=N, lengths=[N - i for i in range(B)])
    with torch.no_grad():
        want = model(ids, attention_mask=mask, output_attentions=True, output_hidden_states=True)
        patch(model)
        got = model(ids, attention_mask=mask, output_attentions=True, output_hidden_states=True)
    assert len(count_attention) == 2  # fused in both layers (maps from pyllm.attention_probs)
    real = mask.bool()
    torch.testing.assert_close(got.hidden_states[-1][real], want.hidden_states[-1][real], atol=1e-5, rtol=0)
    for a, b in zip(got.attentions, want.attentions):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_attention_dropout_in_training_runs_fused(monkeypatch):
    """Issue 13: a patched model trains with its attention dropout applied inside the fused kernel."""
    model = _tiny("llama").train()
    for m in model.modules():
        if hasattr(m, "attention_dropout"):
            m.attention_dropout = 0.5
    patch(model)
    rates, real = [], pyllm.attention
    monkeypatch.setattr(pyllm, "attention", lambda *a, **kw: rates.append(kw.get("dropout_p")) or real(*a, **kw))
    ids, mask = batch(B=2, N=6)
    torch.manual_seed(1)
    a = model(ids, attention_mask=mask).logits
    torch.manual_seed(1)
    b = model(ids, attention_mask=mask).logits
    assert rates == [0.5, 0.5, 0.5, 0.5]  # both layers, both calls: fused with the module's rate
    torch.testing.assert_close(a, b, atol=0, rtol=0)  # the mask follows torch's seed
    model.eval()
    c = model(ids, attention_mask=mask).logits
    assert rates[-2:] == [0.0, 0.0]  # eval: no dropout
    assert not torch.allclose(a, c)  # dropout changed the training output


def test_norm_classes_pyllm_does_not_know_are_left_and_reported():
    model = transformers.GemmaForCausalLM(transformers.GemmaConfig(
        vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8))
    patch(model)
    report = model.pyllm_patch_report
    # its norms are left (reported); its gelu_pytorch_tanh MLP activation is pyllm's fused GELU now
    assert report.swapped == {"GELUTanh": 1} and "GemmaRMSNorm" in report.left and "GemmaRMSNorm" in str(report)
    assert isinstance(model.model.layers[0].mlp.act_fn, pyllm.nn.GELU)


def test_replace_modules_swaps_llama_rms_norm_keeping_the_parameter():
    norm = transformers.models.llama.modeling_llama.LlamaRMSNorm(16, eps=1e-5)
    with torch.no_grad():
        norm.weight.normal_()
    holder = torch.nn.Sequential(norm)
    x = torch.randn(3, 16)
    want = norm(x)
    pyllm.nn.replace_modules(holder)
    assert isinstance(holder[0], pyllm.nn.RMSNorm) and holder[0].weight is norm.weight
    torch.testing.assert_close(holder[0](x), want, atol=1e-6, rtol=0)
    # fp32 weight, bf16 input: transformers' formula promotes to fp32, and so does the swapped module
    assert holder[0](x.bfloat16()).dtype == norm(x.bfloat16()).dtype == torch.float32


def test_attn_implementation_pyllm_in_a_fresh_process(tmp_path):
    """After `import pyllm.integrations.hf` (no patch()), from_pretrained(attn_implementation="pyllm") works,
    and T5 (whose position_bias is transformers' own path) gives transformers' output."""
    import subprocess
    import sys

    _tiny("llama").save_pretrained(tmp_path / "llama")
    _tiny("t5").save_pretrained(tmp_path / "t5")
    code = f"""
import torch, transformers, pyllm.integrations.hf
ids = torch.tensor([[5, 6, 7, 8, 9], [10, 11, 12, 0, 0]]); mask = (ids != 0).long()
for folder, cls, extra in (("{tmp_path / 'llama'}", transformers.AutoModelForCausalLM, {{}}),
                           ("{tmp_path / 't5'}", transformers.T5ForConditionalGeneration,
                            {{"decoder_input_ids": ids[:, :3]}})):
    ours = cls.from_pretrained(folder, attn_implementation="pyllm").eval()
    theirs = cls.from_pretrained(folder).eval()
    assert ours.config._attn_implementation == "pyllm"
    with torch.no_grad():
        a, b = ours(ids, attention_mask=mask, **extra).logits, theirs(ids, attention_mask=mask, **extra).logits
    err = (a - b)[mask.bool()[:, :a.shape[1]]].abs().max().item()
    assert err < 1e-4, err
print("ok")
"""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]


@pytest.fixture
def count_fallback(monkeypatch):
    """Counts calls that went to transformers' own attention, with the reason."""
    import pyllm.integrations.hf as hf

    reasons, real = [], hf._transformers_attention
    monkeypatch.setattr(hf, "_transformers_attention", lambda *a: reasons.append(a[-2]) or real(*a))
    return reasons


def test_mistral_sliding_window_runs_fused_through_generate_and_maps(count_attention, count_fallback):
    """Window 3 < 7 prompt tokens + 8 new: transformers' sliding cache (offset keys) included; the maps of
    output_attentions equal eager's, window and padding applied."""
    import copy

    torch.manual_seed(0)
    cfg = transformers.MistralConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, sliding_window=3,
                                     initializer_range=0.2, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    want_model = transformers.MistralForCausalLM(cfg).eval()
    got_model = patch(copy.deepcopy(want_model))
    ids, mask = batch(B=3, N=7, pad_side="left", lengths=[7, 5, 4])
    args = dict(attention_mask=mask, max_new_tokens=8, do_sample=False)
    with torch.no_grad():
        want, got = want_model.generate(ids, **args), got_model.generate(ids, **args)
    assert torch.equal(got, want) and len(set(want[0, 7:].tolist())) > 2
    assert len(count_attention) == 2 * 8 and count_fallback == []  # prefill + 7 decode steps, 2 layers, all fused
    eager = copy.deepcopy(want_model)
    eager.set_attn_implementation("eager")
    with torch.no_grad():
        a = got_model(ids, attention_mask=mask, output_attentions=True)
        b = eager(ids, attention_mask=mask, output_attentions=True)
    real = mask.bool()
    torch.testing.assert_close(a.logits[real], b.logits[real], atol=1e-4, rtol=0)
    for x, y in zip(a.attentions, b.attentions):
        assert bool((y[:, :, -1, :-3] == 0).all())  # the window hides all but the last 3 keys: not a no-op
        torch.testing.assert_close(x.transpose(1, 2)[real], y.transpose(1, 2)[real], atol=1e-6, rtol=0)  # real queries
    assert count_fallback == []


def test_qwen2_mixed_full_and_sliding_layers_patched_match(count_attention, count_fallback):
    import copy

    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, use_sliding_window=True, sliding_window=4, max_window_layers=1)).eval()
    assert model.config.layer_types == ["full_attention", "sliding_attention"]
    ids, mask = batch(B=3, N=10)
    with torch.no_grad():
        want = model(ids, attention_mask=mask).logits
        got = patch(copy.deepcopy(model))(ids, attention_mask=mask).logits
    torch.testing.assert_close(got[mask.bool()], want[mask.bool()], atol=1e-4, rtol=0)
    assert len(count_attention) == 2 and count_fallback == []


def test_a_window_the_mask_does_not_carry_goes_to_transformers(count_attention, count_fallback):
    """Per call: a layer's sliding_window that disagrees with the mask's, or that a plain mask does not carry,
    is transformers' own attention (its eager formula on the mask's window), never a silently different one."""
    import pyllm.integrations.hf as hf

    module = transformers.MistralForCausalLM(transformers.MistralConfig(
        vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, sliding_window=3)).model.layers[0].self_attn.eval()
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, 6, 8, generator=g) for h in (4, 2, 2))
    marked = torch.ones(2, 6, dtype=torch.bool)
    marked[1, 0] = False
    marked.pyllm_window = 3
    fused, _ = hf._attention(module, q, k, v, marked, scaling=8 ** -0.5, sliding_window=3)
    assert len(count_attention) == 1 and count_fallback == []
    other, _ = hf._attention(module, q, k, v, marked, scaling=8 ** -0.5, sliding_window=4)
    assert count_fallback == ["the layer's sliding_window 4 differs from the mask's 3"]
    # the mask's window, by transformers' eager (the padded query row, which sees no key, excepted: zeros vs uniform)
    torch.testing.assert_close(other[marked], fused[marked], atol=1e-5, rtol=0)
    plain = marked.clone()  # a clone carries no window
    hf._attention(module, q, k, v, plain, scaling=8 ** -0.5, sliding_window=3)
    assert count_fallback[-1] == "sliding_window 3 shorter than the 6 keys, and the mask does not carry it"
    mu = transformers.masking_utils
    assert hf.sliding_window_of(mu.sliding_window_causal_mask_function(5)) == 5
    assert hf.sliding_window_of(mu.and_masks(mu.causal_mask_function, mu.sliding_window_overlay(5))) is None
    assert hf.sliding_window_of(mu.causal_mask_function) is None


def test_patched_mistral_with_a_window_compiles_fullgraph():
    """Under torch.compile the window cannot ride on the mask (an attribute Dynamo does not trace): the mask
    builder gives transformers' 4-D mask there, and the call is transformers' own, still whole-graph."""
    import copy

    torch.manual_seed(0)
    model = transformers.MistralForCausalLM(transformers.MistralConfig(
        vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, sliding_window=3)).eval()
    ids, mask = batch(B=2, N=8, pad_side="left", lengths=[8, 6])
    with torch.no_grad():
        want = model(ids, attention_mask=mask).logits
        got = torch.compile(patch(copy.deepcopy(model)), fullgraph=True, backend="eager")(ids, attention_mask=mask)
    torch.testing.assert_close(got.logits[mask.bool()], want[mask.bool()], atol=1e-5, rtol=0)
