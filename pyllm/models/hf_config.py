"""config.json of Hugging Face BERT / GPT-2 / Llama-family checkpoints <-> pyllm config fields.

Field names differ per family (BERT: num_hidden_layers, hidden_act, layer_norm_eps; GPT-2: n_layer,
activation_function, layer_norm_epsilon); options pyllm's models cannot reproduce are refused by
name instead of being silently dropped.
"""

from __future__ import annotations

# pyllm activation name <-> transformers' hidden_act / activation_function
_ACT_FROM_HF = {"gelu": "gelu", "gelu_new": "gelu_new", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh",
                "relu": "relu", "silu": "silu", "swish": "silu"}
_ACT_TO_HF = {"gelu": "gelu", "gelu_new": "gelu_new", "gelu_tanh": "gelu_pytorch_tanh", "relu": "relu", "silu": "silu"}


class ConfigJsonError(ValueError):
    """A config.json value of the wrong type (the caller adds which file)."""


def config_from_hf(hf: dict, family: str) -> dict:
    """TransformerConfig keyword arguments from a checkpoint's config.json (`family`: "bert" / "gpt2")."""
    def get(key, default):
        """hf[key] (default when absent or null), of the default's type: a clear error otherwise."""
        v = hf.get(key)
        if v is None:
            return default
        kind = type(default)
        ok = isinstance(v, bool) if kind is bool else isinstance(v, int) and not isinstance(v, bool) if kind is int \
            else isinstance(v, (int, float)) and not isinstance(v, bool) if kind is float else isinstance(v, kind)
        if not ok:
            words = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}[kind]
            raise ConfigJsonError(f"{key} must be {words}, got {v!r} ({type(v).__name__})")
        return v

    def act(name):
        if name not in _ACT_FROM_HF:
            raise ValueError(f"from_pretrained: activation {name!r} is not supported; expected one of "
                             f"{sorted(_ACT_FROM_HF)}")
        return _ACT_FROM_HF[name]

    id2label = hf.get("id2label")
    if id2label is not None and not isinstance(id2label, dict):
        raise ConfigJsonError(f"id2label must be an object {{id: label}}, got {type(id2label).__name__}")
    num_labels = len(id2label) if id2label else get("num_labels", 2)
    if family == "llama":
        return _llama_from_hf(hf, act, num_labels, id2label)
    common = dict(num_labels=num_labels, id2label=id2label, initializer_range=get("initializer_range", 0.02),
                  tie_word_embeddings=bool(get("tie_word_embeddings", True)),
                  bos_token_id=hf.get("bos_token_id"), eos_token_id=hf.get("eos_token_id"))
    if family == "bert":
        if get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"from_pretrained: position_embedding_type {hf['position_embedding_type']!r} is not "
                             f"supported; pyllm's BERT has absolute positions only")
        if hf.get("is_decoder") or hf.get("add_cross_attention"):
            raise ValueError("from_pretrained: decoder / cross-attention BERT checkpoints are not supported")
        return dict(common, vocab_size=get("vocab_size", 30522), hidden_size=get("hidden_size", 768),
                    num_layers=get("num_hidden_layers", 12), num_heads=get("num_attention_heads", 12),
                    intermediate_size=get("intermediate_size", 3072),
                    max_position_embeddings=get("max_position_embeddings", 512),
                    type_vocab_size=get("type_vocab_size", 2), norm_position="post",
                    activation=act(get("hidden_act", "gelu")), hidden_dropout=get("hidden_dropout_prob", 0.1),
                    attention_dropout=get("attention_probs_dropout_prob", 0.1),
                    classifier_dropout=hf.get("classifier_dropout"), norm_eps=get("layer_norm_eps", 1e-12),
                    pad_token_id=hf.get("pad_token_id", 0))
    if hf.get("add_cross_attention"):
        raise ValueError("from_pretrained: GPT-2 checkpoints with cross-attention are not supported")
    if not get("scale_attn_weights", True) or hf.get("scale_attn_by_inverse_layer_idx"):
        raise ValueError("from_pretrained: GPT-2 checkpoints with scale_attn_weights=False or "
                         "scale_attn_by_inverse_layer_idx=True are not supported")
    n_embd = get("n_embd", get("hidden_size", 768))
    return dict(common, vocab_size=get("vocab_size", 50257), hidden_size=n_embd,
                num_layers=get("n_layer", get("num_hidden_layers", 12)),
                num_heads=get("n_head", get("num_attention_heads", 12)),
                intermediate_size=get("n_inner", 4 * n_embd), max_position_embeddings=get("n_positions", 1024),
                type_vocab_size=0, norm_position="pre", activation=act(get("activation_function", "gelu_new")),
                hidden_dropout=get("resid_pdrop", 0.1), attention_dropout=get("attn_pdrop", 0.1),
                norm_eps=get("layer_norm_epsilon", 1e-5), pad_token_id=hf.get("pad_token_id"))


def _llama_from_hf(hf: dict, act, num_labels: int, id2label) -> dict:
    """LlamaConfig keyword arguments from a llama / qwen2 / mistral config.json (transformers 4.x or 5.x)."""
    model_type = hf["model_type"]
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        if hf.get(key) is None:
            raise ValueError(f"from_pretrained: config.json of this {model_type!r} checkpoint has no {key!r} field")
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})  # 5.x / 4.x spelling
    theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
    if "type" in rope:
        rope["rope_type"] = rope.pop("type")
    scaling = rope if rope.get("rope_type", "default") != "default" else None
    window, layer_types = hf.get("sliding_window"), hf.get("layer_types")
    num_layers = hf["num_hidden_layers"]
    if model_type == "qwen2":
        if not hf.get("use_sliding_window", False):
            window = None
        if layer_types is None and window is not None:  # transformers 4.x: sliding from max_window_layers on
            first = hf.get("max_window_layers", num_layers)
            layer_types = ["sliding_attention" if i >= first else "full_attention" for i in range(num_layers)]
    eos = hf.get("eos_token_id")
    eos = eos[0] if isinstance(eos, list) else eos  # Llama 3 lists several; generate() stops at the first
    return dict(model_type=model_type, vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
                num_layers=num_layers, num_heads=hf["num_attention_heads"],
                num_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
                intermediate_size=hf["intermediate_size"], head_dim=hf.get("head_dim"),
                max_position_embeddings=hf.get("max_position_embeddings") or 2048,
                activation=act(hf.get("hidden_act") or "silu"), norm_eps=hf.get("rms_norm_eps") or 1e-6,
                attention_dropout=hf.get("attention_dropout") or 0.0, hidden_dropout=0.0,
                initializer_range=hf.get("initializer_range") or 0.02,
                tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
                pad_token_id=hf.get("pad_token_id"), bos_token_id=hf.get("bos_token_id"), eos_token_id=eos,
                num_labels=num_labels, id2label=id2label, rope_theta=float(theta), rope_scaling=scaling,
                attention_bias=bool(hf.get("attention_bias", model_type == "qwen2")),
                mlp_bias=bool(hf.get("mlp_bias", False)), sliding_window=window, layer_types=layer_types)


def _llama_to_hf(model, common: dict) -> dict:
    cfg = model.config
    who = f"{type(model).__name__}.save_pretrained"
    if cfg.activation != "silu":
        raise ValueError(f"{who}: activation={cfg.activation!r}; the transformers Llama family uses 'silu'")
    if cfg.model_type == "qwen2" and (cfg.mlp_bias or cfg.head_dim != cfg.hidden_size // cfg.num_heads):
        raise ValueError(f"{who}: transformers' Qwen2 has no mlp_bias and no explicit head_dim")
    if cfg.model_type != "llama" and cfg.mlp_bias:
        raise ValueError(f"{who}: mlp_bias=True exists only in transformers' Llama (model_type 'llama')")
    if cfg.model_type == "llama" and cfg.sliding_window is not None:
        raise ValueError(f"{who}: sliding_window is not part of transformers' Llama; use model_type 'mistral' "
                         f"or 'qwen2'")
    if cfg.model_type == "mistral" and cfg.attention_bias:
        raise ValueError(f"{who}: transformers' Mistral has no attention bias")
    rope = {"rope_type": cfg.rope_type, "rope_theta": cfg.rope_theta,
            **{k: v for k, v in (cfg.rope_scaling or {}).items() if k not in ("rope_type", "type")}}
    out = dict(common, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
               num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
               num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, hidden_act="silu",
               max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=cfg.norm_eps,
               attention_dropout=cfg.attention_dropout, rope_parameters=rope, rope_theta=cfg.rope_theta)
    if cfg.model_type == "llama":
        out.update(attention_bias=cfg.attention_bias, mlp_bias=cfg.mlp_bias)
    elif cfg.model_type == "mistral":
        out.update(sliding_window=cfg.sliding_window)
    else:  # qwen2: bias on q/k/v is fixed there
        if not cfg.attention_bias:
            raise ValueError(f"{who}: transformers' Qwen2 always has q/k/v bias; attention_bias=False cannot be "
                             f"written as model_type 'qwen2'")
        del out["head_dim"]
        types = cfg.layer_types or ["sliding_attention" if cfg.sliding_window else "full_attention"] * cfg.num_layers
        out.update(use_sliding_window=cfg.sliding_window is not None, sliding_window=cfg.sliding_window,
                   layer_types=types, max_window_layers=types.index("sliding_attention")
                   if "sliding_attention" in types else cfg.num_layers)
    return out


def _common_to_hf(model, architecture: str, model_type: str) -> dict:
    cfg = model.config
    id2label = cfg.id2label or {i: f"LABEL_{i}" for i in range(cfg.num_labels)}
    if type(model).__name__ == "BertForQuestionAnswering":  # transformers sizes qa_outputs by num_labels
        id2label = {0: "LABEL_0", 1: "LABEL_1"}
    return dict(architectures=[architecture], model_type=model_type, vocab_size=cfg.vocab_size,
                initializer_range=cfg.initializer_range, tie_word_embeddings=cfg.tie_word_embeddings,
                pad_token_id=cfg.pad_token_id, bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id,
                id2label={str(k): v for k, v in id2label.items()}, label2id={v: k for k, v in id2label.items()},
                dtype=str(model.dtype).removeprefix("torch."))


def config_to_hf(model, architecture: str) -> dict:
    """HF config.json fields for `model`; `architecture` is the transformers class name to record."""
    cfg, name, fam = model.config, type(model).__name__, model.family
    who = f"{name}.save_pretrained"
    if fam == "llama":
        return _llama_to_hf(model, _common_to_hf(model, architecture, cfg.model_type))
    if cfg.num_kv_heads != cfg.num_heads:
        raise ValueError(f"{who}: num_kv_heads={cfg.num_kv_heads} != num_heads={cfg.num_heads}; transformers' "
                         f"{'BERT' if fam == 'bert' else 'GPT-2'} has no grouped-query attention")
    want = "post" if fam == "bert" else "pre"
    if cfg.norm_position != want:
        raise ValueError(f"{who}: norm_position={cfg.norm_position!r}; the transformers "
                         f"{'BERT' if fam == 'bert' else 'GPT-2'} layout is {want!r}-norm")
    common = _common_to_hf(model, architecture, fam)
    if fam == "bert":
        return dict(common, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
                    num_attention_heads=cfg.num_heads, intermediate_size=cfg.intermediate_size,
                    hidden_act=_ACT_TO_HF[cfg.activation], hidden_dropout_prob=cfg.hidden_dropout,
                    attention_probs_dropout_prob=cfg.attention_dropout,
                    max_position_embeddings=cfg.max_position_embeddings,
                    type_vocab_size=max(cfg.type_vocab_size, 1),  # HF BERT always has one; we write zeros
                    layer_norm_eps=cfg.norm_eps, position_embedding_type="absolute",
                    classifier_dropout=cfg.classifier_dropout)
    return dict(common, n_embd=cfg.hidden_size, n_layer=cfg.num_layers, n_head=cfg.num_heads,
                n_inner=cfg.intermediate_size, n_positions=cfg.max_position_embeddings,
                activation_function=_ACT_TO_HF[cfg.activation], resid_pdrop=cfg.hidden_dropout,
                embd_pdrop=cfg.hidden_dropout, attn_pdrop=cfg.attention_dropout, layer_norm_epsilon=cfg.norm_eps,
                scale_attn_weights=True)
