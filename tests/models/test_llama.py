"""Llama / Qwen2 / Mistral on pyllm: parity with transformers on tiny random configs (logits on padded
batches, greedy generation, checkpoints both ways, rope scaling, sliding windows) and bad input."""
import json
import os

import pytest
import torch

from pyllm.models import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification, LlamaModel

from .helpers import batch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

TINY = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, initializer_range=0.2, max_position_embeddings=64, bos_token_id=1,
            eos_token_id=2, pad_token_id=0)
# windows shorter than the test sequences, so the sliding path is exercised (Qwen2: on layer 1 only)
TYPES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(use_sliding_window=True, sliding_window=4, max_window_layers=1)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=5)),
}


def _hf_model(model_type, cls_name=None, **changes):
    conf_name, model_name, extra = TYPES[model_type]
    torch.manual_seed(0)
    cfg = getattr(transformers, conf_name)(**{**TINY, **extra, **changes})
    return getattr(transformers, cls_name or model_name)(cfg).eval()


def _saved(tmp_path, model_type, **kw):
    hf = _hf_model(model_type, **kw)
    hf.save_pretrained(tmp_path)
    return hf


@pytest.mark.parametrize("model_type", list(TYPES))
def test_logits_and_greedy_generate_match_transformers(tmp_path, model_type):
    theirs = _saved(tmp_path, model_type)
    ours = LlamaForCausalLM.from_pretrained(tmp_path)
    assert ours.config.model_type == model_type and ours.config.num_kv_heads == 2
    ids, mask = batch(B=3, N=11)  # right-padded
    with torch.no_grad():
        a, b = ours(ids, mask).logits, theirs(ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(a[real], b[real], atol=1e-4, rtol=0)

    # left-padded prompts, as generate expects; transformers derives positions from the mask the same way
    ids, mask = batch(B=3, N=7, pad_side="left", lengths=[7, 5, 3], seed=1)
    args = dict(max_new_tokens=10, eos_token_id=2, pad_token_id=0)
    with torch.no_grad():
        got = ours.generate(ids, attention_mask=mask, **args)
        want = theirs.generate(ids, attention_mask=mask, do_sample=False, **args)
    assert torch.equal(got, want)
    assert len(set(got[0, 7:].tolist())) > 2  # not one repeated token


@pytest.mark.parametrize("model_type", list(TYPES))
def test_save_pretrained_loads_back_into_transformers(tmp_path, model_type):
    theirs = _saved(tmp_path / "hf", model_type)
    ours = LlamaForCausalLM.from_pretrained(tmp_path / "hf")
    ours.save_pretrained(tmp_path / "ours")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
    assert type(back) is type(theirs)
    ids, mask = batch(B=2, N=9)
    with torch.no_grad():
        torch.testing.assert_close(back(ids, attention_mask=mask).logits, theirs(ids, attention_mask=mask).logits,
                                   atol=1e-5, rtol=0)


@pytest.mark.parametrize("rope", [
    {"rope_type": "linear", "factor": 2.0},
    {"rope_type": "dynamic", "factor": 2.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 8},
])
def test_rope_scaling_matches_transformers(tmp_path, rope):
    # dynamic: max_position_embeddings=8 < 13 tokens, so NTK scaling is active past position 8
    max_pos = 8 if rope["rope_type"] == "dynamic" else 64
    theirs = _saved(tmp_path, "llama", rope_parameters={**rope, "rope_theta": 500.0}, max_position_embeddings=max_pos)
    ours = LlamaForCausalLM.from_pretrained(tmp_path)
    assert ours.config.rope_type == rope["rope_type"] and ours.config.rope_theta == 500.0
    ids = torch.randint(1, 97, (2, 13), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, atol=1e-4, rtol=0)


def test_sharded_checkpoint_tied_embeddings_and_base_model(tmp_path):
    theirs = _hf_model("llama", tie_word_embeddings=True)
    theirs.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    ours = LlamaForCausalLM.from_pretrained(tmp_path)
    assert ours.lm_head.weight is ours.model.embed_tokens.weight
    ids, mask = batch(B=2, N=9)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids, mask).logits[mask.bool()],
                                   theirs(ids, attention_mask=mask).logits[mask.bool()], atol=1e-4, rtol=0)
        base = LlamaModel.from_pretrained(tmp_path)(ids, mask).last_hidden_state
    torch.testing.assert_close(base, ours.model(ids, mask).last_hidden_state)


def test_sequence_classification_matches_transformers(tmp_path):
    theirs = _saved(tmp_path, "qwen2", cls_name="Qwen2ForSequenceClassification", num_labels=3)
    ours = LlamaForSequenceClassification.from_pretrained(tmp_path)
    ids, mask = batch(B=3, N=10)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids, mask).logits, theirs(ids, attention_mask=mask).logits,
                                   atol=1e-4, rtol=0)
    labels = torch.tensor([0, 2, 1])
    out = ours.train()(ids, mask, labels=labels)
    out.loss.backward()
    assert out.loss.item() > 0 and ours.score.weight.grad is not None


def test_cache_gradient_checkpointing_and_gqa_without_copies():
    cfg = LlamaConfig(vocab_size=50, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=1,
                      intermediate_size=40, max_position_embeddings=32, sliding_window=6)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    ids = torch.randint(0, 50, (2, 12))
    full = model(ids).logits
    out = model(ids[:, :9], use_cache=True)  # prefill, then three single-token steps
    steps = [model(ids[:, i:i + 1], cache=out.cache).logits for i in range(9, 12)]
    torch.testing.assert_close(torch.cat([out.logits, *steps], 1), full, atol=1e-5, rtol=0)
    model.train()
    model.gradient_checkpointing = True
    loss = model(ids, labels=ids).loss
    loss.backward()
    assert model.gradient_checkpointing and model.model.embed_tokens.weight.grad.abs().sum() > 0


def test_bad_input_names_what_is_wrong(tmp_path):
    with pytest.raises(ValueError, match=r"rope_scaling type 'yarn' is not supported; supported types are"):
        LlamaConfig(rope_scaling={"rope_type": "yarn", "factor": 2.0})
    with pytest.raises(ValueError, match=r"rope_scaling of type 'llama3' needs the field 'low_freq_factor'"):
        LlamaConfig(rope_scaling={"rope_type": "llama3", "factor": 2.0})
    with pytest.raises(ValueError, match="model_type must be one of"):
        LlamaConfig(model_type="gemma")

    transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=97, n_positions=16, n_embd=32, n_layer=1,
                                                         n_head=4)).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ValueError, match=r"holds a 'gpt2' checkpoint.*reads 'llama' / 'mistral' / 'qwen2' "
                                         r"checkpoints only.*supports model types"):
        LlamaForCausalLM.from_pretrained(tmp_path / "gpt2")

    folder = tmp_path / "llama"
    _saved(folder, "llama")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "intermediate_size"}))
    with pytest.raises(ValueError, match="has no 'intermediate_size' field"):
        LlamaForCausalLM.from_pretrained(folder)
    (folder / "config.json").write_text(json.dumps({**config, "intermediate_size": 40}))
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.down_proj\.weight: expected \(32, 40\), "
                                         r"checkpoint gives \(32, 48\)"):
        LlamaForCausalLM.from_pretrained(folder)
    with pytest.raises(ValueError, match="must be a LlamaConfig"):
        LlamaModel(config=__import__("pyllm").models.TransformerConfig())


def test_llama_style_tokenizer_folder_loads_through_load_tokenizer(tmp_path):
    """A byte-level BPE tokenizer.json with <s> / </s> (as Llama 3 / Qwen2 folders ship) reads like transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    from pyllm.models import load_tokenizer

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["pyllm runs llama on fused kernels", "rotary embeddings and grouped queries"] * 20,
                            trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>"],
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                pad_token="<pad>")
    fast.save_pretrained(tmp_path)
    ours, theirs = load_tokenizer(tmp_path), transformers.AutoTokenizer.from_pretrained(tmp_path)
    texts = ["pyllm runs llama", "grouped queries on fused kernels, rotary"]
    enc, want = ours(texts), theirs(texts, padding=True, return_tensors="pt")
    assert torch.equal(enc["input_ids"], want["input_ids"])
    assert torch.equal(enc["attention_mask"], want["attention_mask"])
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (1, 2, 0)
    assert ours.decode(enc["input_ids"][0].tolist()) == theirs.decode(want["input_ids"][0], skip_special_tokens=True)


@pytest.mark.parametrize("tied", [False, True])
def test_training_loss_is_fused_and_equals_the_unfused_path(tied):
    """model.train() with labels: linear_cross_entropy (no (B, N, vocab) logits); same loss and gradients."""
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=40,
                      max_position_embeddings=32, tie_word_embeddings=tied)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).train()
    ids, mask = batch(B=3, N=11)
    labels = ids.masked_fill(mask == 0, -100)
    fused = model(ids, mask, labels=labels)
    assert fused.logits is None
    fused.loss.backward()
    fused_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    plain = model(ids, mask, labels=labels, return_logits=True)
    assert plain.logits.shape == (3, 11, 97)
    lg, lb = plain.logits[:, :-1], labels[:, 1:]
    torch.testing.assert_close(plain.loss, torch.nn.functional.cross_entropy(lg[lb != -100], lb[lb != -100]))
    torch.testing.assert_close(fused.loss, plain.loss, atol=1e-5, rtol=1e-5)
    plain.loss.backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(fused_grads[n], p.grad, atol=1e-5, rtol=1e-4, msg=n)
    assert model.eval()(ids, mask, labels=labels).logits.shape == (3, 11, 97)  # eval: logits as usual


def test_sharded_save_loads_in_transformers_and_back(tmp_path):
    """save_pretrained(max_shard_size=...) writes transformers' index + shards; both libraries read them;
    a later save into the same folder (sharded or not) leaves no weights of the earlier one behind."""
    theirs = _hf_model("mistral")
    theirs.save_pretrained(tmp_path / "hf")
    ours = LlamaForCausalLM.from_pretrained(tmp_path / "hf")
    out = tmp_path / "ours"
    ours.save_pretrained(out, max_shard_size="20KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert sorted(p.name for p in out.glob("*.safetensors")) == shards  # no model.safetensors beside them
    from safetensors import safe_open
    for shard in shards:
        with safe_open(out / shard, "pt") as f:
            names = list(f.keys())
            assert sum(f.get_tensor(n).numel() * 4 for n in names) <= 20_000 or len(names) == 1
    assert index["metadata"]["total_size"] == sum(p.numel() * 4 for p in theirs.parameters())
    back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ids, mask = batch(B=2, N=9)
    with torch.no_grad():
        want = theirs(ids, attention_mask=mask).logits
        torch.testing.assert_close(back(ids, attention_mask=mask).logits, want, atol=1e-5, rtol=0)
        torch.testing.assert_close(LlamaForCausalLM.from_pretrained(out)(ids, mask).logits[mask.bool()],
                                   want[mask.bool()], atol=1e-4, rtol=0)
    ours.save_pretrained(out, overwrite=True)  # unsharded over sharded: index and shards go
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    ours.save_pretrained(out, overwrite=True, max_shard_size=30_000)  # and back: model.safetensors goes
    assert not (out / "model.safetensors").exists() and (out / "model.safetensors.index.json").exists()
    with pytest.raises(ValueError, match=r"max_shard_size must be None, a positive number of bytes or a size "
                                         r"such as '5GB'.*got '20 parsecs'"):
        ours.save_pretrained(tmp_path / "bad", max_shard_size="20 parsecs")
    assert not (tmp_path / "bad").exists()
