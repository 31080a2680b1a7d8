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


def _direct_cases():
    from pyllm.models import LlamaConfig, LlamaForCausalLM

    llama = dict(vocab_size=97, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=40,
                 max_position_embeddings=64)
    return {
        "gpt": lambda: GPTForCausalLM(tiny_config(max_position_embeddings=64)),
        "gpt_gqa": lambda: GPTForCausalLM(tiny_config(max_position_embeddings=64, num_kv_heads=2)),
        "llama": lambda: LlamaForCausalLM(LlamaConfig(**llama)),
        "qwen2_bias_window": lambda: LlamaForCausalLM(LlamaConfig(**llama, attention_bias=True, sliding_window=6,
                                                                  tie_word_embeddings=False)),
        "qwen2_bias": lambda: LlamaForCausalLM(LlamaConfig(**llama, attention_bias=True, mlp_bias=True,
                                                           tie_word_embeddings=False)),
        "gpt_gelu_tanh": lambda: GPTForCausalLM(tiny_config(max_position_embeddings=64, activation="gelu_new")),
        "gpt_relu_bf16": lambda: GPTForCausalLM(tiny_config(max_position_embeddings=64, activation="relu")).bfloat16(),
    }


@pytest.mark.parametrize("arch", ["gpt", "gpt_gqa", "llama", "qwen2_bias_window", "qwen2_bias", "gpt_gelu_tanh",
                                  "gpt_relu_bf16"])
@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("min_rows", [1, 2])
def test_direct_decode_step_equals_the_module_path(arch, rows, min_rows, monkeypatch):
    """generate()'s decode steps call the submodules' forward directly (decode_step(direct=True)) where
    direct_decode_ok allows it, and with the model's decode_plan() run the blocks as one C++ call: the same ops
    in the same order, so the hidden states and the caches are the module path's bit for bit, padded rows (key
    padding mask), biases, activations, bf16 and sliding windows (no plan: the decode methods) included; with one
    row taking the decode GEMV (min_rows 1, CPUs where torch's gemv is not MKL's on Intel) and not (2)."""
    import pyllm.nn.linear as linear
    from pyllm.models import block as B
    from pyllm.ops import decode_stack

    monkeypatch.setattr(linear, "DECODE_MIN_ROWS", min_rows)

    torch.manual_seed(0)
    model = _direct_cases()[arch]().eval()
    body = model.transformer if hasattr(model, "transformer") else model.model
    ids, mask = batch(B=rows, N=9, pad_side="left", lengths=[9, 5, 2][:rows])
    taken, fast = [], decode_stack._FAST
    if fast is not None:  # what the C++ step returned, each step
        monkeypatch.setattr(decode_stack, "_FAST", lambda *a: taken.append(fast(*a)) or taken[-1])
    with torch.no_grad():
        assert B.direct_decode_ok(body)
        plan = body.decode_plan()
        assert (plan is None) == (arch == "qwen2_bias_window" or not decode_stack.available())
        caches = [KVCache(model.config.num_layers, capacity=20) for _ in range(3)]
        for cache in caches:
            body(ids, attention_mask=mask, cache=cache)
        kpm = torch.cat([mask, torch.ones(rows, 8, dtype=torch.long)], 1).bool()
        pos = mask.sum(-1, keepdim=True)
        tok = ids[:, -1:]
        for step in range(8):
            cur = 9 + step + 1
            outs = [body.decode_step(tok, pos + step, kpm[:, :cur] if rows > 1 else None, cache, direct=d, plan=p)
                    for cache, (d, p) in zip(caches, ((True, plan), (True, None), (False, None)))]
            assert torch.equal(outs[0], outs[2]) and torch.equal(outs[1], outs[2]), f"step {step}"
            tok = model.lm_head(outs[0][:, -1]).argmax(-1, keepdim=True)
        assert len(taken) == (8 if plan is not None else 0) and all(t is not None for t in taken)
        for layer in range(model.config.num_layers):  # the written columns (the rest is uninitialized)
            assert caches[0].lengths[layer] == caches[1].lengths[layer] == caches[2].lengths[layer] == 17
            for c in caches[:2]:
                for a, b in ((c.k[layer], caches[2].k[layer]), (c.v[layer], caches[2].v[layer])):
                    assert torch.equal(a[:, :17], b[:, :17])


def test_stack_plan_declines_what_it_cannot_stand_for():
    """decode_plan() is None where the C++ step would not compute what the decode methods do, and a plan's step
    returns None, having written nothing, where it cannot take the call (the decode methods then run it)."""
    from pyllm import backends
    from pyllm.ops import decode_stack

    if not decode_stack.available():
        pytest.skip("pyllm._C without decode_stack_fast (an extension built before it)")
    torch.manual_seed(0)
    model = GPTForCausalLM(tiny_config(max_position_embeddings=64)).eval()
    body = model.transformer
    with torch.no_grad():
        assert body.decode_plan() is not None
        body.blocks.layers[1].mlp.act = torch.tanh  # a function the C++ step does not know
        assert body.decode_plan() is None
        body.blocks.layers[1].mlp.act = body.blocks.layers[0].mlp.act
        body.blocks.layers[1].norm2.eps = 1e-3  # one eps for the whole stack only
        assert body.decode_plan() is None
        body.blocks.layers[1].norm2.eps = body.blocks.layers[0].norm2.eps
        body.blocks.layers[0].attn.qkv.backend = "reference"
        assert body.decode_plan() is None
        body.blocks.layers[0].attn.qkv.backend = None
        plan = body.decode_plan()
        ids, _ = batch(B=1, N=5)
        x = torch.randn(1, 1, model.config.hidden_size)
        small = KVCache(model.config.num_layers, capacity=5)  # full: the next token needs the buffers to grow
        body(ids, cache=small)
        before = [k.clone() for k in small.k]
        assert plan(x, None, small) is None and small.lengths == [5] * model.config.num_layers
        assert all(torch.equal(a, b) for a, b in zip(before, small.k))
        roomy = KVCache(model.config.num_layers, capacity=8)
        body(ids, cache=roomy)
        with backends.use("reference"):
            assert plan(x, None, roomy) is None and roomy.lengths[0] == 5
        assert plan(x.double(), None, roomy) is None  # the cache's dtype differs
        assert plan(x, None, roomy) is not None and roomy.lengths == [6] * model.config.num_layers


def test_direct_decode_only_where_it_is_exact(monkeypatch):
    """Hooks, training mode, grad mode, a user's subclass or a post-norm stack keep generate() on the module path
    (nn.Module.__call__ and everything it runs)."""
    from pyllm.models import block as B

    torch.manual_seed(0)
    model = GPTForCausalLM(tiny_config(max_position_embeddings=64)).eval()
    body = model.transformer
    with torch.no_grad():
        assert B.direct_decode_ok(body)
        calls = []
        handle = body.blocks.layers[1].mlp.fc2.register_forward_hook(lambda *a: calls.append(1))
        assert not B.direct_decode_ok(body)
        ids, _ = batch(B=1, N=5)
        model.generate(ids, max_new_tokens=4)
        assert len(calls) == 4  # the prompt and every decode step ran the hook
        handle.remove()
        handle = body.blocks.layers[0].attn.register_forward_pre_hook(lambda *a: None)
        assert not B.direct_decode_ok(body)
        handle.remove()
        handle = torch.nn.modules.module.register_module_forward_hook(lambda *a: None)
        try:
            assert not B.direct_decode_ok(body)
        finally:
            handle.remove()
        assert B.direct_decode_ok(body)
        body.blocks.layers[0].mlp.train()
        assert not B.direct_decode_ok(body)
        body.eval()

        class MyMLP(B.MLP):  # a user's subclass may change forward: decode would not follow it
            pass

        body.blocks.layers[0].mlp.__class__ = MyMLP
        assert not B.direct_decode_ok(body)
        body.blocks.layers[0].mlp.__class__ = B.MLP
        assert B.direct_decode_ok(body)
    assert not B.direct_decode_ok(body)  # grad mode on
    post = GPTForCausalLM(tiny_config(max_position_embeddings=64, norm_position="post")).eval()
    with torch.no_grad():
        assert not B.direct_decode_ok(post.transformer)
    from pyllm.train import lora

    adapted = lora.apply(GPTForCausalLM(tiny_config(max_position_embeddings=64)), "r=4,alpha=8,targets=q,k,v,o").eval()
    with torch.no_grad():  # peft's LoRA layers replace pyllm's Linear: their forward is not the decode path's
        assert not B.direct_decode_ok(adapted.transformer)
    seen = []
    monkeypatch.setattr(B.BlockStack, "decode", lambda self, *a: seen.append(1) or B.BlockStack.forward(self, *a[:3]))
    model.generate(batch(B=1, N=5)[0], max_new_tokens=3)
    assert len(seen) == 2  # the direct path did run in generate (the prompt goes through forward)


def test_bench_generate_times_the_module_path_beside_the_direct_one(tmp_path):
    """benchmarks/bench_generate.py --tiny --module-path: both of pyllm's eager paths give transformers' tokens and
    are timed in the same run (a smoke run: the timings themselves are not asserted)."""
    import json
    import os
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.path.insert(0, os.path.join(root, "benchmarks"))
    try:
        import bench_generate
    finally:
        sys.path.pop(0)
    out = tmp_path / "gen.json"
    rc = bench_generate.main(["--device", "cpu", "--quick", "--tiny", "--module-path", "--batch", "1", "3",
                              "--repeats", "1", "--max-s", "2", "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert rc == 0 and len(rows) == 4 and all(r["same_tokens"] for r in rows)
    for r in rows:
        assert r["pyllm-module_decode_step_ms"] > 0 and r["module_ratio"] > 0 and r["ratio"] > 0
