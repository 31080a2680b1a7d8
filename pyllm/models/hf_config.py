"""config.json of Hugging Face BERT / GPT-2 checkpoints <-> TransformerConfig fields.

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


def config_to_hf(model, architecture: str) -> dict:
    """HF config.json fields for `model`; `architecture` is the transformers class name to record."""
    cfg, name, fam = model.config, type(model).__name__, model.family
    who = f"{name}.save_pretrained"
    if cfg.num_kv_heads != cfg.num_heads:
        raise ValueError(f"{who}: num_kv_heads={cfg.num_kv_heads} != num_heads={cfg.num_heads}; transformers' "
                         f"{'BERT' if fam == 'bert' else 'GPT-2'} has no grouped-query attention")
    want = "post" if fam == "bert" else "pre"
    if cfg.norm_position != want:
        raise ValueError(f"{who}: norm_position={cfg.norm_position!r}; the transformers "
                         f"{'BERT' if fam == 'bert' else 'GPT-2'} layout is {want!r}-norm")
    id2label = cfg.id2label or {i: f"LABEL_{i}" for i in range(cfg.num_labels)}
    if name == "BertForQuestionAnswering":  # transformers sizes qa_outputs by num_labels: start and end
        id2label = {0: "LABEL_0", 1: "LABEL_1"}
    common = dict(architectures=[architecture], model_type=fam, vocab_size=cfg.vocab_size,
                  initializer_range=cfg.initializer_range, tie_word_embeddings=cfg.tie_word_embeddings,
                  pad_token_id=cfg.pad_token_id, bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id,
                  id2label={str(k): v for k, v in id2label.items()}, label2id={v: k for k, v in id2label.items()},
                  dtype=str(model.dtype).removeprefix("torch."))
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
