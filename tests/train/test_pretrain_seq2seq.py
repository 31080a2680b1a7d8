"""Encoder-decoder pretraining: T5 span corruption and BART text infilling (pyllm.data.noising), and
`pretrain(objective="span" | "denoise")` end to end on tiny models."""

import json

import pytest
import torch

from pyllm import data as D
from pyllm.data.noising import _num_noise
from pyllm.train import pretrain
from pyllm.train.config import ConfigError

from .conftest import QUIET, TINY_MODEL, words_corpus
from .test_train import falling, losses


@pytest.fixture(scope="module")
def t5_tok():
    return D.train_bpe(words_corpus(), 300, special_tokens=D.span_corruption_specials())


@pytest.fixture(scope="module")
def bart_tok():
    return D.train_bpe(words_corpus(), 300, special_tokens=D.text_infilling_specials())


def _sentinel_ids(tok):
    vocab = tok._tok.get_vocab()
    return [vocab[f"<extra_id_{k}>"] for k in range(100)]


# -- span corruption -----------------------------------------------------------------------------------

@pytest.mark.parametrize("length", [7, 33, 114, 500])
def test_noise_mask_density_and_spans(length):
    noise, spans = _num_noise(length, 0.15, 3.0)
    assert noise == round(0.15 * length) and spans == max(round(noise / 3.0), 1)
    for seed in range(5):
        m = D.random_spans_noise_mask(length, generator=torch.Generator().manual_seed(seed))
        assert m.shape == (length,) and not m[0]  # starts with a non-noise span, as T5's does
        assert int(m.sum()) == noise
        starts = int((m[1:] & ~m[:-1]).sum())
        assert starts == spans
    # the mean span length over many blocks is the mean asked for
    mask = torch.stack([D.random_spans_noise_mask(500, 0.15, 3.0, torch.Generator().manual_seed(s))
                        for s in range(20)])
    n_spans = int((mask[:, 1:] & ~mask[:, :-1]).sum())
    assert abs(int(mask.sum()) / n_spans - 3.0) < 0.1


def test_span_corruption_sentinels_lengths_and_reconstruction(t5_tok):
    feats = D.seq2seq_lm_features(words_corpus(), t5_tok, objective="span", block_size=40, noise_density=0.15,
                                  mean_span_length=3.0)
    L = len(feats[0]["input_ids"])
    assert D.span_corruption_lengths(L)[0] == 40 and D.span_corruption_lengths(L + 1)[0] > 40
    batch = D.SpanCorruptionCollator(t5_tok)(feats[:6], torch.Generator().manual_seed(0))
    in_len, label_len = D.span_corruption_lengths(L)
    assert batch["input_ids"].shape == (6, in_len) and batch["labels"].shape == (6, label_len)
    assert bool(batch["attention_mask"].all())  # every example has the same lengths: no padding
    sentinels = _sentinel_ids(t5_tok)
    assert sentinels[0] == t5_tok.vocab_size - 1  # <extra_id_0> is the last id, as in T5's vocabularies
    eos = t5_tok.eos_token_id
    for f, x, y in zip(feats, batch["input_ids"].tolist(), batch["labels"].tolist()):
        assert x[-1] == eos and y[-1] == eos
        k = sum(t in sentinels for t in x)
        assert k == sum(t in sentinels for t in y) >= 1
        assert [t for t in x if t in sentinels] == sentinels[:k] == [t for t in y if t in sentinels]
        # filling each sentinel of the input with what follows it in the labels gives the block back
        spans, cur = {}, None
        for t in y[:-1]:
            if t in sentinels:
                cur = t
                spans[cur] = []
            else:
                spans[cur].append(t)
        rebuilt = [u for t in x[:-1] for u in (spans[t] if t in sentinels else [t])]
        assert rebuilt == f["input_ids"]
        hidden = len(y) - 1 - k
        assert hidden == round(0.15 * L)


def test_span_corruption_deterministic_under_a_seed(t5_tok):
    feats = D.seq2seq_lm_features(words_corpus(), t5_tok, objective="span", block_size=32, noise_density=0.15,
                                  mean_span_length=3.0)[:4]
    c = D.SpanCorruptionCollator(t5_tok)
    a, b = (c(feats, torch.Generator().manual_seed(7)) for _ in range(2))
    other = c(feats, torch.Generator().manual_seed(8))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["input_ids"], other["input_ids"])


def test_span_corruption_needs_sentinels(bart_tok):
    with pytest.raises(ValueError, match="sentinel tokens <extra_id_0>"):
        D.SpanCorruptionCollator(bart_tok)
    with pytest.raises(ValueError, match="noise_density must be in \\(0, 1\\), got 1.5"):
        D.SpanCorruptionCollator(bart_tok, noise_density=1.5)


# -- text infilling -----------------------------------------------------------------------------------

def test_text_infilling_masks_spans_with_one_token_each(bart_tok):
    feats = D.seq2seq_lm_features(words_corpus(), bart_tok, objective="denoise", block_size=64, noise_density=0.3,
                                  mean_span_length=3.0)
    assert all(len(f["input_ids"]) == 64 and f["input_ids"][-1] == bart_tok.eos_token_id for f in feats)
    c = D.TextInfillingCollator(bart_tok)
    batch = c(feats[:16], torch.Generator().manual_seed(0))
    mask_id = bart_tok.mask_token_id
    assert torch.equal(batch["labels"], torch.tensor([f["input_ids"] for f in feats[:16]]))
    hidden_total = 0
    for f, x, m in zip(feats, batch["input_ids"].tolist(), batch["attention_mask"].tolist()):
        n = sum(m)
        x = x[:n]
        assert x[-1] == bart_tok.eos_token_id
        assert all(not (a == b == mask_id) for a, b in zip(x, x[1:]))  # spans never touch: one mask per span
        # the unmasked tokens are the block's, in order (a subsequence)
        kept = [t for t in x if t != mask_id]
        it = iter(f["input_ids"])
        assert all(t in it for t in kept)
        hidden_total += len(f["input_ids"]) - len(kept)
        assert len(f["input_ids"]) - len(kept) == -(-63 * 3 // 10)  # ceil(0.3 * 63) of the tokens before EOS
    assert hidden_total / (16 * 63) == pytest.approx(0.3, abs=0.01)
    # Poisson(3) span lengths: about (1 - e^-3) * 19 / 3 masks per block (length-0 spans insert one)
    masks = int((batch["input_ids"] == mask_id).sum()) / 16
    assert 4 <= masks <= 9


def test_text_infilling_deterministic_and_permutation(bart_tok):
    feats = D.seq2seq_lm_features(words_corpus(), bart_tok, objective="denoise", block_size=48, noise_density=0.3,
                                  mean_span_length=3.0)[:4]
    c = D.TextInfillingCollator(bart_tok, permute_sentences=True)
    a, b = (c(feats, torch.Generator().manual_seed(3)) for _ in range(2))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # permutation alone (nothing masked would be density 0: use the sentence shuffle directly)
    body = feats[0]["input_ids"][:-1]
    shuffled = c._permute(body, torch.Generator().manual_seed(1))
    assert sorted(shuffled) == sorted(body) and shuffled != body
    with pytest.raises(ValueError, match="<mask>"):
        D.TextInfillingCollator(D.train_bpe(words_corpus(), 300))


# -- pretrain through the API ---------------------------------------------------------------------------

@pytest.mark.parametrize("objective,model_type", [("span", "t5"), ("denoise", "bart")])
def test_pretrain_seq2seq_objective(tmp_path, corpus_file, objective, model_type):
    r = pretrain(objective=objective, train_file=str(corpus_file), output_dir=str(tmp_path / objective),
                 max_steps=12, batch_size=8, log_every=1, learning_rate=3e-3, warmup_steps=2,
                 **QUIET, **{**TINY_MODEL, "num_layers": 1})
    values = losses(r.output_dir)
    assert len(values) == 12 and all(torch.isfinite(torch.tensor(values)))
    assert falling(values)
    assert json.loads((r.output_dir / "config.json").read_text())["model_type"] == model_type
    task = json.loads((r.output_dir / "pyllm_task.json").read_text())
    assert task["task"] == objective and task["noise_density"] == (0.15 if objective == "span" else 0.3)
    from pyllm.train import evaluate
    metrics = evaluate(r.output_dir, str(corpus_file), max_examples=8)
    assert metrics["loss"] > 0 and metrics["perplexity"] > 1


def test_pretrain_objective_and_model_type_must_agree(tmp_path, corpus_file):
    kw = dict(train_file=str(corpus_file), max_steps=1, batch_size=4, **QUIET, **{**TINY_MODEL, "num_layers": 1})
    t5 = pretrain(objective="span", output_dir=str(tmp_path / "t5"), **kw).output_dir
    for objective, needed in (("denoise", "bart or marian"), ("clm", "gpt2 or llama"), ("mlm", "bert")):
        with pytest.raises(ValueError, match=f"objective '{objective}' needs a model of type {needed}; --init-from "
                                             f".* holds a 't5' model \\(a 't5' model pretrains with objective 'span'"):
            pretrain(objective=objective, init_from=str(t5), output_dir=str(tmp_path / objective), **kw)
        assert not (tmp_path / objective).exists()
    with pytest.raises(ConfigError, match="noise_density applies to objectives 'span' and 'denoise', not 'clm'"):
        pretrain(noise_density=0.2, output_dir=str(tmp_path / "x"), **kw)
    with pytest.raises(ConfigError, match="permute_sentences applies to objective 'denoise'"):
        pretrain(objective="span", permute_sentences=True, output_dir=str(tmp_path / "x"), **kw)
    D.train_bpe(words_corpus(), 300).save_pretrained(tmp_path / "plain-bpe")
    with pytest.raises(ValueError, match="sentinel tokens"):  # a tokenizer without T5's sentinels
        pretrain(objective="span", tokenizer=str(tmp_path / "plain-bpe"), output_dir=str(tmp_path / "y"), **kw)
    assert not (tmp_path / "y").exists()
