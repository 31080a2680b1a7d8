"""Encoder-decoders (bart, marian, t5) against transformers on tiny random configs: logits and loss on
padded batches, save/load both ways, greedy and beam generation token for token; cache; bad input."""
import json
import os
import warnings

import pytest
import torch

from pyllm.models import (BartForConditionalGeneration, BartModel, GPTForCausalLM, Seq2SeqConfig,
                          T5ForConditionalGeneration, load_tokenizer)
from pyllm.models.seq2seq import sinusoidal_table

from .helpers import tiny_config

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

V = 61


def _hf_configs():
    common = dict(vocab_size=V, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                  decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48, max_position_embeddings=40,
                  dropout=0.0)
    return {
        "bart": (transformers.BartConfig(**common, pad_token_id=1, bos_token_id=0, eos_token_id=2,
                                         decoder_start_token_id=2, forced_eos_token_id=2),
                 transformers.BartForConditionalGeneration, BartForConditionalGeneration),
        "marian": (transformers.MarianConfig(**common, pad_token_id=60, eos_token_id=0, decoder_start_token_id=60),
                   transformers.MarianMTModel, BartForConditionalGeneration),
        "t5": (transformers.T5Config(vocab_size=V, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                                     dropout_rate=0.0, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
                                     relative_attention_num_buckets=8, relative_attention_max_distance=20),
               transformers.T5ForConditionalGeneration, T5ForConditionalGeneration),
        "t5-gated": (transformers.T5Config(vocab_size=V, d_model=32, d_kv=16, d_ff=40, num_layers=3,
                                           num_decoder_layers=2, num_heads=3, dropout_rate=0.0,
                                           feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1,
                                           decoder_start_token_id=0, relative_attention_num_buckets=8,
                                           relative_attention_max_distance=20),
                     transformers.T5ForConditionalGeneration, T5ForConditionalGeneration),
    }


@pytest.fixture(scope="module", params=["bart", "marian", "t5", "t5-gated"])
def pair(request, tmp_path_factory):
    """(name, HF config, transformers model, pyllm model read from the transformers folder)."""
    torch.manual_seed(0)
    hc, hcls, pcls = _hf_configs()[request.param]
    hm = hcls(hc).eval()
    with torch.no_grad():
        for n, p in hm.named_parameters():
            if "embed_positions" not in n or request.param == "bart":  # Marian's table is fixed sinusoids
                p.normal_(0, 0.3 if p.dim() > 1 else 0.1)
        # make EOS likely enough that some hypotheses end before the length limit
        if hasattr(hm, "final_logits_bias"):
            hm.final_logits_bias[0, hc.eos_token_id] = 0.3
        else:
            hm.shared.weight[hc.eos_token_id] *= 2
    folder = tmp_path_factory.mktemp(request.param)
    hm.save_pretrained(folder)
    return request.param, hc, hm, pcls.from_pretrained(folder)


def _source(hc, seed=0):
    """Right-padded source batch (3, 9) and target labels (3, 7) with -100 padding."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V - 2, (3, 9), generator=g)
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 6:] = 0
    mask[2, 3:] = 0
    labels = torch.randint(3, V - 2, (3, 7), generator=g)
    labels[2, 5:] = -100
    return ids.masked_fill(mask == 0, hc.pad_token_id), mask, labels


def test_logits_loss_encoder_state_match_transformers(pair):
    name, hc, hm, pm = pair
    ids, mask, labels = _source(hc)
    dmask = (labels != -100).long()
    with torch.no_grad():
        ho = hm(input_ids=ids, attention_mask=mask, labels=labels, decoder_attention_mask=dmask)
        po = pm(ids, mask, labels=labels, decoder_attention_mask=dmask)
    assert po.logits.shape == ho.logits.shape == (3, 7, V)
    torch.testing.assert_close(po.logits, ho.logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(po.loss, ho.loss, atol=1e-5, rtol=0)
    real = mask.bool()
    torch.testing.assert_close(po.encoder_last_hidden_state[real], ho.encoder_last_hidden_state[real], atol=1e-4,
                               rtol=0)


def test_training_loss_through_linear_cross_entropy(pair):
    """model.train() with labels: the loss comes from the fused linear cross-entropy (no logits formed); it
    and its gradients equal the logits path's (and the loss transformers' model gives)."""
    name, hc, hm, pm = pair
    ids, mask, labels = _source(hc, seed=5)
    hm.zero_grad(set_to_none=True)
    expected = hm(input_ids=ids, attention_mask=mask, labels=labels).loss
    expected.backward()
    expected = expected.detach()
    hf_embedding_grad = hm.get_input_embeddings().weight.grad.clone()
    hm.zero_grad(set_to_none=True)
    pm.train()
    try:
        grads = []
        for return_logits in (None, True):
            pm.zero_grad(set_to_none=True)
            out = pm(ids, mask, labels=labels, return_logits=return_logits)
            assert (out.logits is None) == (return_logits is None)
            torch.testing.assert_close(out.loss, expected, atol=1e-5, rtol=0)
            out.loss.backward()
            grads.append({n: p.grad.clone() for n, p in pm.named_parameters() if p.grad is not None})
        assert grads[0].keys() == grads[1].keys() and "model.shared.weight" in grads[0]
        for n in grads[0]:
            torch.testing.assert_close(grads[0][n], grads[1][n], atol=1e-5, rtol=1e-4)
        # the shared embedding's gradient gathers every path (padded encoder, decoder, LM head): as transformers'
        # (but for the pad row: transformers' Marian embedding has padding_idx, which zeroes that row's gradient
        # although Marian's decoder start token is the pad token)
        rows = torch.arange(V) != hc.pad_token_id
        torch.testing.assert_close(grads[0]["model.shared.weight"][rows], hf_embedding_grad[rows], atol=1e-5,
                                   rtol=1e-4)
    finally:
        pm.zero_grad(set_to_none=True)
        pm.eval()


def test_save_pretrained_loads_back_into_transformers(pair, tmp_path):
    name, hc, hm, pm = pair
    pm.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == name.split("-")[0]
    back = type(hm).from_pretrained(tmp_path).eval()
    ids, mask, labels = _source(hc, seed=1)
    with torch.no_grad():
        a = back(input_ids=ids, attention_mask=mask, labels=labels)
        b = pm(ids, mask, labels=labels)
    torch.testing.assert_close(b.logits, a.logits, atol=1e-4, rtol=0)
    assert json.loads((tmp_path / "generation_config.json").read_text())["decoder_start_token_id"] == \
        hc.decoder_start_token_id


def test_generate_runs_the_decode_gemv(pair):
    """The decoder's projections and LM head are pyllm.nn.Linear: a generation step's few rows (here 3 sources,
    greedy and 3 beams) run pyllm::linear_decode; the token-for-token tests against transformers cover its
    numbers."""
    from torch.profiler import profile

    from pyllm.nn import linear

    name, hc, hm, pm = pair
    ids, mask, _ = _source(hc, seed=2)
    assert 2 <= ids.shape[0] and 3 * ids.shape[0] <= linear.DECODE_ROWS
    for beams in (1, 3):
        with profile() as prof:
            pm.generate(ids, mask, max_new_tokens=3, num_beams=beams)
        calls = [e.name for e in prof.events() if e.name == "pyllm::linear_decode"]
        assert len(calls) >= 3, f"{name}, {beams} beams: {len(calls)} decode GEMV calls"


@pytest.mark.parametrize("kw", [dict(num_beams=1), dict(num_beams=3),
                                dict(num_beams=4, length_penalty=0.6, no_repeat_ngram_size=2),
                                dict(num_beams=3, early_stopping=True),
                                dict(num_beams=2, early_stopping="never", length_penalty=1.5)],
                         ids=["greedy", "beam3", "beam4-lp-ngram", "beam3-early", "beam2-never"])
def test_generate_matches_transformers_token_for_token(pair, kw):
    name, hc, hm, pm = pair
    ids, mask, _ = _source(hc, seed=2)
    h = hm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False, **kw)
    p = pm.generate(ids, mask, max_new_tokens=12, **kw)
    assert p.tolist() == h.tolist()
    # the cached decoder (self-attention KV cache, cross-attention K/V once) equals full recomputation
    assert pm.generate(ids, mask, max_new_tokens=12, use_cache=False, **kw).tolist() == p.tolist()


def test_beam_search_padded_row_decodes_as_alone(pair):
    name, hc, hm, pm = pair
    ids, mask, _ = _source(hc, seed=3)
    both = pm.generate(ids, mask, max_new_tokens=8, num_beams=3)
    alone = pm.generate(ids[2:, :3], mask[2:, :3], max_new_tokens=8, num_beams=3)
    assert both[2, :alone.shape[1]].tolist() == alone[0].tolist()


def test_sampling_is_seeded_and_in_vocab(pair):
    name, hc, hm, pm = pair
    ids, mask, _ = _source(hc)
    kw = dict(max_new_tokens=6, do_sample=True, temperature=0.7, top_k=10, top_p=0.9)
    a = pm.generate(ids, mask, generator=torch.Generator().manual_seed(5), **kw)
    b = pm.generate(ids, mask, generator=torch.Generator().manual_seed(5), **kw)
    assert a.tolist() == b.tolist() and a.shape[0] == 3 and int(a.max()) < V
    assert (a[:, 0] == hc.decoder_start_token_id).all()


@pytest.mark.parametrize("kw", [dict(num_beams=3, top_k=10, top_p=0.9, temperature=0.8),
                                dict(num_beams=2, top_k=None, top_p=None),
                                dict(num_beams=4, top_k=5, top_p=None, length_penalty=0.6, no_repeat_ngram_size=2),
                                dict(num_beams=3, top_k=1, top_p=None)],
                         ids=["beam3-k10-p0.9-t0.8", "beam2-full", "beam4-k5-lp-ngram", "beam3-k1"])
def test_beam_sampling_matches_transformers_under_a_seed(pair, kw):
    """do_sample=True with num_beams > 1 on a padded batch draws what transformers' beam sample draws from
    the same torch seed (same warpers, same multinomial over the same scores), with or without the cache."""
    name, hc, hm, pm = pair
    ids, mask, _ = _source(hc, seed=2)
    for seed in (0, 1):
        torch.manual_seed(seed)
        h = hm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=True, **kw)
        torch.manual_seed(seed)
        p = pm.generate(ids, mask, max_new_tokens=10, do_sample=True, **kw)
        assert p.tolist() == h.tolist()
        torch.manual_seed(seed)
        assert pm.generate(ids, mask, max_new_tokens=10, do_sample=True, use_cache=False, **kw).tolist() == p.tolist()


def test_beam_sampling_is_seeded_and_batched(pair):
    name, hc, hm, pm = pair
    ids, mask, _ = _source(hc, seed=4)
    kw = dict(max_new_tokens=8, do_sample=True, num_beams=3, temperature=1.5, top_k=20)
    runs = [pm.generate(ids, mask, generator=torch.Generator().manual_seed(s), **kw) for s in (5, 5, 6, 7, 8)]
    assert runs[0].tolist() == runs[1].tolist()  # the generator alone decides
    assert any(r.tolist() != runs[0].tolist() for r in runs[2:])  # and it does decide
    for r in runs:
        assert r.shape[0] == 3 and (r[:, 0] == hc.decoder_start_token_id).all() and int(r.max()) < V
    with pytest.raises(ValueError, match="top_k must be None or an int >= 1, got 0"):
        pm.generate(ids, mask, do_sample=True, num_beams=2, top_k=0)
    with pytest.raises(ValueError, match="temperature must be > 0 when sampling, got 0"):
        pm.generate(ids, mask, do_sample=True, num_beams=2, temperature=0)
    with pytest.raises(ValueError, match="do_sample must be True or False, got 'yes'"):
        pm.generate(ids, mask, do_sample="yes", num_beams=2)


def test_generation_config_defaults_are_read(tmp_path):
    cfg = Seq2SeqConfig(model_type="bart", vocab_size=V, d_model=32, encoder_layers=1, decoder_layers=1, num_heads=4,
                        ffn_dim=48, max_position_embeddings=40, dropout=0.0)
    model = BartForConditionalGeneration(cfg).eval()
    model.generation_config.update(forced_bos_token_id=7, max_new_tokens=5, num_beams=2, decoder_start_token_id=9)
    model.save_pretrained(tmp_path)
    back = BartForConditionalGeneration.from_pretrained(tmp_path)
    out = back.generate(torch.tensor([[5, 6, 2]]))
    assert out[0, 0] == 9 and out[0, 1] == 7 and out.shape[1] <= 6


def test_marian_sinusoids_match_transformers():
    emb = transformers.models.marian.modeling_marian.MarianSinusoidalPositionalEmbedding(12, 10)
    torch.testing.assert_close(sinusoidal_table(12, 10), emb.create_weight(), atol=1e-6, rtol=0)


def test_t5_relative_bias_gets_gradient_and_backward_runs():
    cfg = Seq2SeqConfig(model_type="t5", vocab_size=V, d_model=32, encoder_layers=2, decoder_layers=2, num_heads=4,
                        ffn_dim=48, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, dropout=0.0)
    model = T5ForConditionalGeneration(cfg)
    ids = torch.randint(2, V, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 4:] = 0
    model(ids, mask, labels=torch.randint(2, V, (2, 5))).loss.backward()
    for stack in (model.model.encoder, model.model.decoder):
        g = stack.relative_attention_bias.weight.grad
        assert g is not None and bool(g.abs().sum() > 0)


def test_bad_input_names_the_argument(tmp_path):
    cfg = Seq2SeqConfig(model_type="bart", vocab_size=V, d_model=32, encoder_layers=1, decoder_layers=1, num_heads=4,
                        ffn_dim=48, max_position_embeddings=16)
    model = BartForConditionalGeneration(cfg).eval()
    ids = torch.tensor([[5, 6, 2]])
    with pytest.raises(ValueError, match="num_beams must be an int >= 1, got 0"):
        model.generate(ids, num_beams=0)
    with pytest.raises(ValueError, match="max_new_tokens must be an int >= 1, got 0"):
        model.generate(ids, max_new_tokens=0)
    with pytest.raises(ValueError, match="max_new_tokens = 21 exceeds max_position_embeddings=16"):
        model.generate(ids, max_new_tokens=20)
    with pytest.raises(ValueError, match="decoder_input_ids holds token id 99"):
        model(ids, decoder_input_ids=torch.tensor([[2, 99]]))
    with pytest.raises(ValueError, match=r"labels must have shape \(1, 2\)"):
        model(ids, decoder_input_ids=torch.tensor([[2, 3]]), labels=torch.tensor([[2, 3, 4]]))
    with pytest.raises(ValueError, match="takes model types \\('t5',\\)"):
        T5ForConditionalGeneration(cfg)
    # a seq2seq class pointed at a decoder-only checkpoint, and the reverse
    GPTForCausalLM(tiny_config()).save_pretrained(tmp_path / "gpt")
    with pytest.raises(ValueError, match=r"'gpt2' checkpoint \(a decoder-only or encoder-only model.*"
                                         r"reads model types \('bart', 'marian'\)"):
        BartForConditionalGeneration.from_pretrained(tmp_path / "gpt")
    model.save_pretrained(tmp_path / "bart")
    with pytest.raises(ValueError, match="'bart' checkpoint"):
        GPTForCausalLM.from_pretrained(tmp_path / "bart")


def test_bart_model_shifts_input_ids_by_default():
    cfg = Seq2SeqConfig(model_type="bart", vocab_size=V, d_model=32, encoder_layers=1, decoder_layers=1, num_heads=4,
                        ffn_dim=48, max_position_embeddings=16, dropout=0.0)
    model = BartModel(cfg).eval()
    ids = torch.tensor([[5, 6, 7, 2]])
    out = model(ids)
    assert out.last_hidden_state.shape == (1, 4, 32) and out.encoder_last_hidden_state.shape == (1, 4, 32)
    explicit = model(ids, decoder_input_ids=torch.tensor([[2, 5, 6, 7]]))
    torch.testing.assert_close(out.last_hidden_state, explicit.last_hidden_state)


def test_sentencepiece_only_folder_says_what_is_missing(tmp_path):
    (tmp_path / "spiece.model").write_bytes(b"\x00")
    with pytest.raises(FileNotFoundError, match=r"only SentencePiece models \['spiece.model'\] and no tokenizer.json"):
        load_tokenizer(tmp_path)


def test_tokenizer_json_of_a_t5_style_folder_round_trips(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    words = ["<pad>", "</s>", "<unk>", "un", "deux", "trois"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"pad_token": "<pad>", "eos_token": "</s>"}))
    t = load_tokenizer(tmp_path)
    enc = t(["un deux trois", "deux"])
    assert enc["input_ids"].tolist() == [[3, 4, 5], [4, 0, 0]] and t.eos_token_id == 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert t.decode(enc["input_ids"][0]) == "un deux trois"


def test_gradient_checkpointing_gives_the_same_gradients():
    cfg = Seq2SeqConfig(model_type="t5", vocab_size=V, d_model=32, encoder_layers=2, decoder_layers=2, num_heads=4,
                        ffn_dim=48, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, dropout=0.0)
    model = T5ForConditionalGeneration(cfg).train()
    ids, labels = torch.randint(2, V, (2, 7)), torch.randint(2, V, (2, 5))
    model(ids, labels=labels).loss.backward()
    want = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.gradient_checkpointing = True
    assert model.gradient_checkpointing
    model(ids, labels=labels).loss.backward()
    for w, p in zip(want, model.parameters()):
        torch.testing.assert_close(p.grad, w, atol=1e-6, rtol=1e-5)


def test_one_embedding_lookup_for_both_sides_matches_two(pair):
    """forward() looks up the source and target tokens in one call (one gradient for the shared table): the same
    loss and gradients as encode() and decode() looking them up apiece, and the same weights after an AdamW step."""
    name, hc, hm, pm = pair
    ids, mask, labels = _source(hc, seed=7)
    dec = pm(ids, mask, labels=labels).logits.argmax(-1)  # any valid decoder_input_ids
    before = {n: t.clone() for n, t in pm.state_dict().items()}
    models = {"joint": pm, "apart": type(pm)(pm.config)}
    models["apart"].load_state_dict(before)
    out = {}
    for k, m in models.items():
        m.train()
        opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
        if k == "joint":
            loss = m(ids, mask, decoder_input_ids=dec, labels=labels, return_logits=True).loss
        else:
            memory = m.model.encode(ids, mask)
            h = m.model.decode(dec, memory, mask)
            loss = torch.nn.functional.cross_entropy(m.logits(h).flatten(0, 1), labels.flatten())
        loss.backward()
        grads = {n: p.grad.clone() for n, p in m.named_parameters()}
        opt.step()
        out[k] = loss.detach(), grads, {n: p.detach().clone() for n, p in m.named_parameters()}
        m.zero_grad(set_to_none=True)
        m.eval()
    pm.load_state_dict(before)  # the fixture is shared: undo the step
    torch.testing.assert_close(out["joint"][0], out["apart"][0], atol=1e-5, rtol=0)
    for i in (1, 2):
        assert out["joint"][i].keys() == out["apart"][i].keys()
        for n in out["joint"][i]:
            torch.testing.assert_close(out["joint"][i][n], out["apart"][i][n], atol=1e-5, rtol=1e-4, msg=n)


def test_untied_lm_head_is_read_not_dropped(tmp_path):
    cfg = Seq2SeqConfig(model_type="bart", vocab_size=V, d_model=32, encoder_layers=1, decoder_layers=1, num_heads=4,
                        ffn_dim=48, max_position_embeddings=16, tie_word_embeddings=False)
    model = BartForConditionalGeneration(cfg).eval()
    model.save_pretrained(tmp_path / "untied")
    back = BartForConditionalGeneration.from_pretrained(tmp_path / "untied")
    assert not back.config.tie_word_embeddings
    torch.testing.assert_close(back.lm_head.weight, model.lm_head.weight)
    # a tied config with a different lm_head tensor is refused, not silently ignored
    hf_cfg = json.loads((tmp_path / "untied" / "config.json").read_text())
    (tmp_path / "untied" / "config.json").write_text(json.dumps({**hf_cfg, "tie_word_embeddings": True}))
    with pytest.raises(ValueError, match="lm_head.weight \\(differs from the shared embedding"):
        BartForConditionalGeneration.from_pretrained(tmp_path / "untied")
