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
