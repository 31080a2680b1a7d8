"""GPTForCausalLM.generate: KV cache vs recompute, left padding vs per row, EOS, sampling."""
import pytest
import torch

from pyllm.models import GPTForCausalLM, KVCache

from .helpers import batch, tiny_config


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GPTForCausalLM(tiny_config(max_position_embeddings=64)).eval()


def test_kv_cache_matches_no_cache(model):
    ids, mask = batch(pad_side="left")
    a = model.generate(ids, max_new_tokens=12, attention_mask=mask)
    b = model.generate(ids, max_new_tokens=12, attention_mask=mask, use_cache=False)
    assert a.shape == (3, 11 + 12)
    assert torch.equal(a, b)
    assert len(set(a[0, 11:].tolist())) > 2  # not a degenerate repeat: the test has teeth
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    s1 = model.generate(ids, 12, mask, do_sample=True, temperature=0.8, top_k=20, generator=g1)
    s2 = model.generate(ids, 12, mask, do_sample=True, temperature=0.8, top_k=20, generator=g2, use_cache=False)
    assert torch.equal(s1, s2)


@pytest.mark.parametrize("num_kv_heads", [4, 2, 1], ids=["MHA", "GQA", "MQA"])
def test_cached_forward_matches_full_forward(num_kv_heads):
    torch.manual_seed(0)
    model = GPTForCausalLM(tiny_config(num_kv_heads=num_kv_heads)).eval()
    ids, _ = batch(B=2, N=9)
    full = model(ids).logits
    cache = KVCache(model.config.num_layers)
    first = model(ids[:, :5], cache=cache).logits
    rest = [model(ids[:, t:t + 1], cache=cache).logits for t in range(5, 9)]
    torch.testing.assert_close(torch.cat([first, *rest], 1), full, atol=1e-5, rtol=1e-5)
    assert cache.seq_len == 9


def test_left_padded_batch_matches_each_row_alone(model):
    ids, mask = batch(pad_side="left", lengths=[11, 7, 3])
    out = model.generate(ids, max_new_tokens=10, attention_mask=mask)
    N = ids.shape[1]
    for i in range(3):
        n = int(mask[i].sum())
        alone = model.generate(ids[i:i + 1, N - n:], max_new_tokens=10)
        assert torch.equal(alone[0, n:], out[i, N:]), f"row {i}"


def test_eos_stops_rows_and_pads(model):
    ids, mask = batch(pad_side="left")
    free = model.generate(ids, max_new_tokens=10, attention_mask=mask)
    eos = int(free[0, 11 + 2])  # the token row 0 emits third becomes "EOS"
    out = model.generate(ids, max_new_tokens=10, attention_mask=mask, eos_token_id=eos, pad_token_id=0)
    new = out[0, 11:]
    stop = new.tolist().index(eos)
    assert stop <= 2 and (new[stop + 1:] == 0).all()
    for i in range(3):  # every row: identical until its own first EOS, pads after
        row, ref = out[i, 11:].tolist(), free[i, 11:].tolist()
        k = row.index(eos) if eos in row else len(row)
        assert row[:k + 1] == ref[:k + 1] and all(t == 0 for t in row[k + 1:])
    if all(eos in out[i, 11:].tolist() for i in range(3)):
        assert out.shape[1] < 11 + 10  # stopped early once every row finished


def test_sampling_filters(model):
    ids, mask = batch(pad_side="left")
    greedy = model.generate(ids, 8, mask)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(model.generate(ids, 8, mask, do_sample=True, top_k=1, generator=g), greedy)
    assert torch.equal(model.generate(ids, 8, mask, do_sample=True, top_p=1e-6, generator=g), greedy)
    a = model.generate(ids, 8, mask, do_sample=True, temperature=2.0, generator=torch.Generator().manual_seed(1))
    b = model.generate(ids, 8, mask, do_sample=True, temperature=2.0, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.equal(a, greedy)


def test_generate_bad_arguments(model):
    ids, mask = batch(pad_side="right")
    with pytest.raises(ValueError, match="row 1 has padding after real tokens; expected LEFT padding"):
        model.generate(ids, 4, mask)
    with pytest.raises(ValueError, match=r"prompt length 11 \+ max_new_tokens 60 exceeds max_position_embeddings=64"):
        model.generate(ids, 60)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        model.generate(ids, 4, do_sample=True, temperature=0.0)
    with pytest.raises(ValueError, match="top_p must be None or in"):
        model.generate(ids, 4, do_sample=True, top_p=1.5)
    with pytest.raises(ValueError, match=r"attention_mask must have shape \(3, 11\)"):
        model.generate(ids, 4, attention_mask=mask[:2])


def test_compiled_decode_step_gives_the_eager_tokens():
    """generate(compile=True): one static-shape graph (compiled once, no recompilation from step to step or
    on a second call) over the frozen cache gives the eager tokens: a 1-layer Llama through inductor, a GPT
    through the "eager" backend (graph capture only: cheap), padded batches, an EOS stop."""
    import torch._dynamo

    from pyllm.models import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=61, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1,
                                         intermediate_size=32, max_position_embeddings=32)).eval()
    gpt = GPTForCausalLM(tiny_config(vocab_size=61, max_position_embeddings=32)).eval()
    ids, mask = batch(B=2, N=5, vocab=61, pad_side="left", lengths=[5, 3])
    # (torch's config.patch, not monkeypatch: undoing a monkeypatch deletes a torch config entry)
    with torch._dynamo.config.patch(error_on_recompile=True), \
            torch._inductor.config.patch(compile_threads=1):  # no worker pool for one tiny graph
        for model, backend in ((llama, True), (gpt, "eager")):
            _compiled_equals_eager(model, backend, ids, mask)


def _compiled_equals_eager(model, backend, ids, mask):
    """The compiled tokens equal the eager ones, twice (no recompilation), and with an EOS stop."""
    torch._dynamo.reset()  # another model is another graph; within one model nothing may recompile
    want = model.generate(ids, attention_mask=mask, max_new_tokens=6)
    assert len(set(want[0, 5:].tolist())) > 2  # not one repeated token: the comparison has teeth
    for _ in range(2):  # the second call reuses the compiled step (error_on_recompile)
        assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=6, compile=backend), want)
    eos = int(want[1, 7])  # row 1 stops there, row 0 runs on; a finished row emits pad
    want = model.generate(ids, attention_mask=mask, max_new_tokens=6, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=6, eos_token_id=eos,
                                      pad_token_id=0, compile=backend), want)


def test_compiled_decode_refuses_what_it_cannot_do_and_frozen_cache_masks_numbers():
    from pyllm.models import LlamaConfig, LlamaForCausalLM

    llama = LlamaForCausalLM(LlamaConfig(vocab_size=61, hidden_size=16, num_layers=1, num_heads=2,
                                         intermediate_size=32, max_position_embeddings=32, sliding_window=8)).eval()
    ids = torch.randint(0, 61, (1, 5))
    with pytest.raises(ValueError, match=r"compile=True does not support a sliding window \(8\) shorter than the "
                                         r"prompt \+ new tokens \(11\)"):
        llama.generate(ids, max_new_tokens=6, compile=True)
    with pytest.raises(ValueError, match="compile=True needs use_cache=True"):
        llama.generate(ids, max_new_tokens=2, compile=True, use_cache=False)
    with pytest.raises(ValueError, match="compile must be True, False or a torch.compile backend name, got 1.5"):
        llama.generate(ids, max_new_tokens=2, compile=1.5)
    # the frozen cache's unwritten columns are zeros, whatever the memory held (masked keys still enter P @ V)
    cache = KVCache(1, capacity=6)
    cache.update(0, torch.ones(1, 2, 1, 4), torch.ones(1, 2, 1, 4))
    cache.k[0][:, 2:] = float("nan")
    cache.v[0][:, 2:] = float("inf")
    cache.freeze(torch.tensor([2]))
    assert torch.equal(cache.k[0][:, 2:], torch.zeros(1, 4, 1, 4)) and torch.equal(cache.v[0][:, 2:], cache.k[0][:, 2:])
    k, v = cache.update(0, torch.full((1, 1, 1, 4), 2.0), torch.full((1, 1, 1, 4), 3.0))
    assert k.shape == (1, 6, 1, 4) and k[0, 2, 0, 0] == 2 and v[0, 2, 0, 0] == 3 and k[0, 3].abs().sum() == 0
    with pytest.raises(ValueError, match="every layer needs a buffer of capacity 6 first"):
        KVCache(2, capacity=6).freeze(torch.tensor([0]))
