"""Hugging Face folders <-> pyllm encoder-decoders, for model types bart, marian and t5.

config.json <-> Seq2SeqConfig (options pyllm cannot reproduce are refused by name), the tensors by
rules as in hf_io.py ("cat": transformers' separate q, k, v projections stacked into pyllm's one qkv
matmul, k and v into the cross-attention kv), and generation_config.json <-> `model.generation_config`.
transformers itself is never imported here.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional

import torch

from .hf_io import Rule, _read_tensors, check_save_folder, read_config, shard_bytes, write_checkpoint

_ACT_FROM_HF = {"gelu": "gelu", "gelu_new": "gelu_new", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu",
                "silu": "silu", "swish": "silu"}
_ACT_TO_HF = {"gelu": "gelu", "gelu_new": "gelu_new", "gelu_tanh": "gelu_pytorch_tanh", "relu": "relu",
              "silu": "silu"}
# transformers' generation_config.json keys that pyllm's seq2seq generate() reads
GENERATION_KEYS = ("decoder_start_token_id", "bos_token_id", "eos_token_id", "pad_token_id", "forced_bos_token_id",
                   "forced_eos_token_id", "max_length", "max_new_tokens", "num_beams", "length_penalty",
                   "early_stopping", "no_repeat_ngram_size", "do_sample", "temperature", "top_k", "top_p")
_ARCH = {"bart": "BartForConditionalGeneration", "marian": "MarianMTModel", "t5": "T5ForConditionalGeneration"}
_IGNORABLE = re.compile(r"(^|\.)(encoder|decoder)\.embed_tokens\.weight$|^lm_head\.weight$|embed_positions\.weight$"
                        r"|EncDecAttention\.relative_attention_bias\.weight$|(^|\.)(encoder|decoder)\.version$")


def _act(name: str) -> str:
    if name not in _ACT_FROM_HF:
        raise ValueError(f"from_pretrained: activation {name!r} is not supported; expected one of {sorted(_ACT_FROM_HF)}")
    return _ACT_FROM_HF[name]


def config_from_hf(hf: dict) -> dict:
    """Seq2SeqConfig keyword arguments from a bart / marian / t5 config.json."""
    mt = hf.get("model_type")

    def get(key, default):
        return default if hf.get(key) is None else hf[key]

    ids = dict(pad_token_id=hf.get("pad_token_id"), bos_token_id=hf.get("bos_token_id"),
               eos_token_id=hf.get("eos_token_id"), decoder_start_token_id=hf.get("decoder_start_token_id"))
    if mt == "t5":
        proj = get("feed_forward_proj", "relu")
        gated = proj.startswith("gated-")
        act = "gelu_new" if proj == "gated-gelu" else _act(proj.split("-")[-1])
        return dict(ids, model_type="t5", vocab_size=get("vocab_size", 32128), d_model=get("d_model", 512),
                    head_dim=get("d_kv", 64), ffn_dim=get("d_ff", 2048), encoder_layers=get("num_layers", 6),
                    decoder_layers=get("num_decoder_layers", get("num_layers", 6)), num_heads=get("num_heads", 8),
                    relative_attention_num_buckets=get("relative_attention_num_buckets", 32),
                    relative_attention_max_distance=get("relative_attention_max_distance", 128),
                    activation=act, gated_ffn=gated, dropout=get("dropout_rate", 0.1),
                    norm_eps=get("layer_norm_epsilon", 1e-6),
                    init_std=get("initializer_factor", 1.0) * get("d_model", 512) ** -0.5,
                    scale_decoder_outputs=hf.get("tie_word_embeddings", True) is not False,
                    tie_word_embeddings=hf.get("tie_word_embeddings", True) is not False,  # T5 v1.1: own lm_head
                    decoder_start_token_id=get("decoder_start_token_id", hf.get("pad_token_id", 0)))
    if mt not in ("bart", "marian"):
        raise ValueError(f"from_pretrained: model type {mt!r} is not an encoder-decoder pyllm reads; expected one of "
                         f"('bart', 'marian', 't5')")
    for a, b in (("encoder_attention_heads", "decoder_attention_heads"), ("encoder_ffn_dim", "decoder_ffn_dim")):
        if get(a, None) != get(b, get(a, None)):
            raise ValueError(f"from_pretrained: {a}={hf[a]} != {b}={hf[b]}; pyllm's encoder and decoder share one "
                             f"size")
    if mt == "marian" and (not get("share_encoder_decoder_embeddings", True)
                           or get("decoder_vocab_size", get("vocab_size", 0)) != get("vocab_size", 0)):
        raise ValueError("from_pretrained: Marian checkpoints with separate encoder and decoder vocabularies "
                         "(share_encoder_decoder_embeddings=False) are not supported")
    if hf.get("normalize_before") or hf.get("add_final_layer_norm"):
        raise ValueError("from_pretrained: pre-norm BART variants (normalize_before / add_final_layer_norm, mBART) "
                         "are not supported by model type 'bart'")
    return dict(ids, model_type=mt, vocab_size=get("vocab_size", 50265), d_model=get("d_model", 1024),
                encoder_layers=get("encoder_layers", 12), decoder_layers=get("decoder_layers", 12),
                num_heads=get("encoder_attention_heads", 16), ffn_dim=get("encoder_ffn_dim", 4096),
                activation=_act(get("activation_function", "gelu")),
                max_position_embeddings=get("max_position_embeddings", 1024), dropout=get("dropout", 0.1),
                attention_dropout=get("attention_dropout", 0.0), activation_dropout=get("activation_dropout", 0.0),
                init_std=get("init_std", 0.02), scale_embedding=bool(get("scale_embedding", False)),
                tie_word_embeddings=bool(get("tie_word_embeddings", True)))


def config_to_hf(model) -> dict:
    cfg = model.config
    who = f"{type(model).__name__}.save_pretrained"
    mt = cfg.model_type
    want = dict(position={"bart": "learned", "marian": "sinusoidal", "t5": "relative"}[mt],
                norm="rms" if mt == "t5" else "layer", norm_position="pre" if mt == "t5" else "post",
                layernorm_embedding=mt == "bart", scale_attention=mt != "t5", bias=mt != "t5",
                final_logits_bias=mt != "t5")
    for name, value in want.items():
        if getattr(cfg, name) != value:
            raise ValueError(f"{who}: {name}={getattr(cfg, name)!r}, but transformers' {mt} layout has {value!r}")
    common = dict(architectures=[_ARCH[mt]], model_type=mt, is_encoder_decoder=True, vocab_size=cfg.vocab_size,
                  d_model=cfg.d_model, pad_token_id=cfg.pad_token_id, bos_token_id=cfg.bos_token_id,
                  eos_token_id=cfg.eos_token_id, decoder_start_token_id=cfg.decoder_start_token_id,
                  tie_word_embeddings=cfg.tie_word_embeddings, dtype=str(model.dtype).removeprefix("torch."))
    if mt == "t5":
        if cfg.gated_ffn:
            proj = "gated-gelu" if cfg.activation == "gelu_new" else f"gated-{_ACT_TO_HF[cfg.activation]}"
        else:
            proj = _ACT_TO_HF[cfg.activation]
        if cfg.scale_decoder_outputs != cfg.tie_word_embeddings:
            raise ValueError(f"{who}: transformers' T5 scales the decoder output exactly when the LM head is tied; "
                             f"got scale_decoder_outputs={cfg.scale_decoder_outputs}, "
                             f"tie_word_embeddings={cfg.tie_word_embeddings}")
        return dict(common, d_kv=cfg.head_dim, d_ff=cfg.ffn_dim, num_layers=cfg.encoder_layers,
                    num_decoder_layers=cfg.decoder_layers, num_heads=cfg.num_heads,
                    relative_attention_num_buckets=cfg.relative_attention_num_buckets,
                    relative_attention_max_distance=cfg.relative_attention_max_distance, dropout_rate=cfg.dropout,
                    layer_norm_epsilon=cfg.norm_eps, feed_forward_proj=proj,
                    initializer_factor=cfg.init_std * cfg.d_model ** 0.5)
    if cfg.head_dim * cfg.num_heads != cfg.d_model:
        raise ValueError(f"{who}: head_dim * num_heads must equal d_model in transformers' {mt}, got "
                         f"{cfg.head_dim} * {cfg.num_heads} != {cfg.d_model}")
    if cfg.scale_decoder_outputs or cfg.gated_ffn:
        raise ValueError(f"{who}: scale_decoder_outputs / gated_ffn have no {mt} equivalent")
    if cfg.norm_eps != 1e-5:
        raise ValueError(f"{who}: transformers' {mt} LayerNorm eps is 1e-5, got norm_eps={cfg.norm_eps}")
    out = dict(common, encoder_layers=cfg.encoder_layers, decoder_layers=cfg.decoder_layers,
               encoder_attention_heads=cfg.num_heads, decoder_attention_heads=cfg.num_heads,
               encoder_ffn_dim=cfg.ffn_dim, decoder_ffn_dim=cfg.ffn_dim,
               activation_function=_ACT_TO_HF[cfg.activation] if cfg.activation != "silu" else "swish",
               max_position_embeddings=cfg.max_position_embeddings, dropout=cfg.dropout,
               attention_dropout=cfg.attention_dropout, activation_dropout=cfg.activation_dropout,
               init_std=cfg.init_std, scale_embedding=cfg.scale_embedding)
    if mt == "marian":
        out.update(share_encoder_decoder_embeddings=True, decoder_vocab_size=cfg.vocab_size)
    return out


def _linear(p, h, bias):
    return [Rule(f"{p}.weight", (f"{h}.weight",))] + ([Rule(f"{p}.bias", (f"{h}.bias",))] if bias else [])


def _cat(p, hs, bias):
    return [Rule(f"{p}.weight", tuple(f"{h}.weight" for h in hs), "cat")] + (
        [Rule(f"{p}.bias", tuple(f"{h}.bias" for h in hs), "cat")] if bias else [])


def _rules(model) -> list[Rule]:
    """pyllm state_dict key <- transformers key(s), for a Seq2SeqLM or an EncoderDecoderModel."""
    cfg = model.config
    lm = hasattr(model, "lm_head")
    P = "model." if lm else ""
    t5, b = cfg.model_type == "t5", cfg.bias
    H = "" if t5 else P  # transformers' BART nests the backbone under "model.", T5 does not
    rules = [Rule(P + "shared.weight", (H + "shared.weight",))]
    for side, n_layers in (("encoder", cfg.encoder_layers), ("decoder", cfg.decoder_layers)):
        S, HS = f"{P}{side}.", f"{H}{side}."
        if cfg.position == "learned":
            rules.append(Rule(S + "embed_positions.weight", (HS + "embed_positions.weight",)))
        if cfg.position == "relative":
            rules.append(Rule(S + "relative_attention_bias.weight",
                              (HS + "block.0.layer.0.SelfAttention.relative_attention_bias.weight",)))
        if cfg.layernorm_embedding:
            rules += _linear(S + "layernorm_embedding", HS + "layernorm_embedding", True)
        for i in range(n_layers):
            L = f"{S}layers.{i}."
            if t5:
                HL = f"{HS}block.{i}.layer."
                att, ffn_i = HL + "0.SelfAttention.", 2 if side == "decoder" else 1
                rules += _cat(L + "self_attn.qkv", [att + n for n in "qkv"], b) + _linear(L + "self_attn.o", att + "o", b)
                rules += _linear(L + "norm1", HL + "0.layer_norm", False)
                if side == "decoder":
                    x = HL + "1.EncDecAttention."
                    rules += (_linear(L + "cross_attn.q", x + "q", b) + _cat(L + "cross_attn.kv", [x + "k", x + "v"], b)
                              + _linear(L + "cross_attn.o", x + "o", b) + _linear(L + "norm_cross", HL + "1.layer_norm", False))
                F_ = f"{HL}{ffn_i}.DenseReluDense."
                rules += _linear(L + "ffn.fc1", F_ + ("wi_0" if cfg.gated_ffn else "wi"), b)
                if cfg.gated_ffn:
                    rules += _linear(L + "ffn.gate", F_ + "wi_1", b)
                rules += _linear(L + "ffn.fc2", F_ + "wo", b) + _linear(L + "norm2", f"{HL}{ffn_i}.layer_norm", False)
            else:
                HL = f"{HS}layers.{i}."
                att = HL + "self_attn."
                rules += _cat(L + "self_attn.qkv", [att + f"{n}_proj" for n in "qkv"], b)
                rules += _linear(L + "self_attn.o", att + "out_proj", b) + _linear(L + "norm1", HL + "self_attn_layer_norm", True)
                if side == "decoder":
                    x = HL + "encoder_attn."
                    rules += (_linear(L + "cross_attn.q", x + "q_proj", b)
                              + _cat(L + "cross_attn.kv", [x + "k_proj", x + "v_proj"], b)
                              + _linear(L + "cross_attn.o", x + "out_proj", b)
                              + _linear(L + "norm_cross", HL + "encoder_attn_layer_norm", True))
                rules += (_linear(L + "ffn.fc1", HL + "fc1", b) + _linear(L + "ffn.fc2", HL + "fc2", b)
                          + _linear(L + "norm2", HL + "final_layer_norm", True))
        if cfg.norm_position == "pre":
            rules += _linear(S + "norm_f", HS + ("final_layer_norm" if t5 else "layer_norm"), cfg.norm == "layer")
    if lm and not cfg.tie_word_embeddings:
        rules.append(Rule("lm_head.weight", ("lm_head.weight",)))
    if lm and cfg.final_logits_bias:
        rules.append(Rule("final_logits_bias", ("final_logits_bias",), head=True))  # transformers may omit it
    return rules


def _read_generation_config(folder: Path) -> dict:
    path = folder / "generation_config.json"
    if not path.exists():
        return {}
    gen = json.loads(path.read_text())
    return {k: gen[k] for k in GENERATION_KEYS if gen.get(k) is not None}


def load_pretrained(cls, folder, *, dtype: Optional[torch.dtype] = None, **overrides):
    folder = Path(folder)
    who = f"{cls.__name__}.from_pretrained"
    hf = read_config(folder, who)
    mt = hf.get("model_type")
    if mt not in cls.families:
        kind = ("an encoder-decoder" if hf.get("is_encoder_decoder") else "a decoder-only or encoder-only")
        raise ValueError(f"{who}: {folder} holds a {mt!r} checkpoint ({kind} model, architectures "
                         f"{hf.get('architectures')}); {cls.__name__} reads model types {cls.families}")
    fields = config_from_hf(hf)
    fields["generation"] = _read_generation_config(folder)
    config = cls.config_class(**{**fields, **overrides})  # Seq2SeqConfig
    model = cls(config)
    sd = _read_tensors(folder)
    params = model.state_dict()
    used, missing, bad_shape, loaded = set(), [], [], {}
    for r in _rules(model):
        if not all(k in sd for k in r.hf):
            if not r.head:
                missing.append(", ".join(k for k in r.hf if k not in sd))
            continue
        used.update(r.hf)
        parts = [sd[k] for k in r.hf]
        t = torch.cat(parts, 0) if r.kind == "cat" else parts[0]
        if tuple(t.shape) != tuple(params[r.pyllm].shape):
            bad_shape.append(f"{r.pyllm}: expected {tuple(params[r.pyllm].shape)}, checkpoint gives {tuple(t.shape)} "
                             f"(from {' + '.join(r.hf)})")
            continue
        loaded[r.pyllm] = t
    unexpected = [k for k in sd if k not in used and not _IGNORABLE.search(k)]
    shared = next(k for k in sd if k.endswith("shared.weight")) if any(k.endswith("shared.weight") for k in sd) else None
    if config.tie_word_embeddings and "lm_head.weight" in sd and shared and not torch.equal(sd["lm_head.weight"],
                                                                                          sd[shared]):
        unexpected.append("lm_head.weight (differs from the shared embedding, but config.json ties them)")
    problems = [f"{name}: {items}" for name, items in (("missing tensors", missing), ("unexpected tensors", unexpected),
                                                        ("mis-shaped tensors", bad_shape)) if items]
    if problems:
        raise ValueError(f"{who}: checkpoint {folder} does not fit {cls.__name__} ({config.model_type}, "
                         f"{config.encoder_layers}+{config.decoder_layers} layers, d_model {config.d_model}): "
                         + "; ".join(problems))
    with torch.no_grad():
        for k, t in loaded.items():
            params[k].copy_(t)
    if dtype is not None:
        model.to(dtype)
    return model.eval()


def save_pretrained(model, folder, *, overwrite: bool = False, max_shard_size=None):
    folder = Path(folder)
    who = f"{type(model).__name__}.save_pretrained"
    max_shard_size = shard_bytes(max_shard_size, who)
    check_save_folder(folder, who, overwrite)
    hf_config = config_to_hf(model)
    params = model.state_dict()
    inner = model.config.inner_dim
    tensors = {}
    for r in _rules(model):
        t = params[r.pyllm].detach()
        for k, part in zip(r.hf, t.split(inner, 0) if r.kind == "cat" else (t,)):
            tensors[k] = part.contiguous().cpu()
    gen = {k: v for k, v in model.generation_config.items() if k in GENERATION_KEYS}
    for k in ("decoder_start_token_id", "bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(model.config, k) is not None:
            gen.setdefault(k, getattr(model.config, k))
    # atomically, stale shards of an earlier save removed (hf_io.write_checkpoint)
    write_checkpoint(folder, tensors, {"config.json": hf_config, "generation_config.json": gen}, max_shard_size)
