"""Hugging Face checkpoint folders <-> pyllm models, for the BERT and GPT-2 families.

A checkpoint folder holds config.json plus model.safetensors (or pytorch_model.bin, or a sharded
index of either). Tensor names are mapped by rules: one pyllm tensor comes from one or more HF
tensors ("copy"; "t" = transposed, for GPT-2's Conv1D (in, out) weights; "cat" = q, k and v
stacked into pyllm's single qkv projection). transformers itself is never imported here.
"""

from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from .config import TransformerConfig
from .hf_config import config_from_hf, config_to_hf

# pyllm class name -> (HF architecture name, HF prefix of the backbone, pyllm prefix of the backbone)
_ARCH = {
    "BertModel": ("BertModel", "", ""),
    "BertForMaskedLM": ("BertForMaskedLM", "bert.", "bert."),
    "BertForSequenceClassification": ("BertForSequenceClassification", "bert.", "bert."),
    "BertForTokenClassification": ("BertForTokenClassification", "bert.", "bert."),
    "BertForQuestionAnswering": ("BertForQuestionAnswering", "bert.", "bert."),
    "GPTModel": ("GPT2Model", "", ""),
    "GPTForCausalLM": ("GPT2LMHeadModel", "transformer.", "transformer."),
    "GPTForSequenceClassification": ("GPT2ForSequenceClassification", "transformer.", "transformer."),
}

# HF tensors that a model may legitimately not use: buffers, and other heads of the same family
_IGNORABLE = {
    "bert": re.compile(r"^(bert\.)?embeddings\.position_ids$|^(bert\.)?pooler\.|^cls\.|^classifier\.|^qa_outputs\."),
    "gpt2": re.compile(r"(^|\.)attn\.(masked_)?bias$|^lm_head\.|^score\.|^multiple_choice_head\."),
}


@dataclass
class Rule:
    pyllm: str  # pyllm state_dict key
    hf: tuple  # HF key(s)
    kind: str = "copy"  # "copy" | "t" | "cat"
    head: bool = False  # not part of the backbone: may be absent (then freshly initialized)


def _linear(p, h, kind="copy", head=False):
    return [Rule(f"{p}.weight", (f"{h}.weight",), kind, head), Rule(f"{p}.bias", (f"{h}.bias",), "copy", head)]


def _rules(model, hf_prefix: str) -> list[Rule]:
    """Mapping rules for `model`, reading the backbone under `hf_prefix` ("" or "bert."/"transformer.")."""
    name = type(model).__name__
    cfg = model.config
    P, H = _ARCH[name][2], hf_prefix
    rules: list[Rule] = []
    if model.family == "bert":
        E, HE = P + "embeddings.", H + "embeddings."
        rules += [Rule(E + "word.weight", (HE + "word_embeddings.weight",)),
                  Rule(E + "position.weight", (HE + "position_embeddings.weight",))]
        if cfg.type_vocab_size:
            rules.append(Rule(E + "token_type.weight", (HE + "token_type_embeddings.weight",)))
        rules += _linear(E + "norm", HE + "LayerNorm")
        for i in range(cfg.num_layers):
            L, HL = f"{P}encoder.layers.{i}.", f"{H}encoder.layer.{i}."
            qkv = [f"{HL}attention.self.{n}" for n in ("query", "key", "value")]
            rules += [Rule(L + "attn.qkv.weight", tuple(q + ".weight" for q in qkv), "cat"),
                      Rule(L + "attn.qkv.bias", tuple(q + ".bias" for q in qkv), "cat")]
            rules += _linear(L + "attn.proj", HL + "attention.output.dense")
            rules += _linear(L + "norm1", HL + "attention.output.LayerNorm")
            rules += _linear(L + "mlp.fc1", HL + "intermediate.dense")
            rules += _linear(L + "mlp.fc2", HL + "output.dense")
            rules += _linear(L + "norm2", HL + "output.LayerNorm")
        bert = model if name == "BertModel" else model.bert
        if bert.pooler is not None:
            rules += _linear(P + "pooler", H + "pooler.dense", head=True)
    else:
        rules += [Rule(P + "word.weight", (H + "wte.weight",)), Rule(P + "position.weight", (H + "wpe.weight",))]
        for i in range(cfg.num_layers):
            L, HL = f"{P}encoder.layers.{i}.", f"{H}h.{i}."
            rules += _linear(L + "norm1", HL + "ln_1")
            rules += _linear(L + "attn.qkv", HL + "attn.c_attn", "t")
            rules += _linear(L + "attn.proj", HL + "attn.c_proj", "t")
            rules += _linear(L + "norm2", HL + "ln_2")
            rules += _linear(L + "mlp.fc1", HL + "mlp.c_fc", "t")
            rules += _linear(L + "mlp.fc2", HL + "mlp.c_proj", "t")
        rules += _linear(P + "encoder.norm_f", H + "ln_f")
    tied = cfg.tie_word_embeddings
    if name == "BertForMaskedLM":
        rules += _linear("transform", "cls.predictions.transform.dense", head=True)
        rules += _linear("transform_norm", "cls.predictions.transform.LayerNorm", head=True)
        rules.append(Rule("decoder.bias", ("cls.predictions.bias",), head=True))
        if not tied:
            rules.append(Rule("decoder.weight", ("cls.predictions.decoder.weight",), head=True))
    elif name in ("BertForSequenceClassification", "BertForTokenClassification"):
        rules += _linear("classifier", "classifier", head=True)
    elif name == "BertForQuestionAnswering":
        rules += _linear("qa_outputs", "qa_outputs", head=True)
    elif name == "GPTForCausalLM" and not tied:
        rules.append(Rule("lm_head.weight", ("lm_head.weight",), head=True))
    elif name == "GPTForSequenceClassification":
        rules.append(Rule("score.weight", ("score.weight",), head=True))
    return rules


# ----------------------------------------------------------------------------- tensors


def _read_tensors(folder: Path) -> dict:
    from safetensors.torch import load_file
    for index_name, loader in (("model.safetensors.index.json", load_file),
                               ("pytorch_model.bin.index.json", None)):
        index = folder / index_name
        if index.exists():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            out = {}
            for s in shards:
                out.update(load_file(folder / s) if loader else torch.load(folder / s, map_location="cpu",
                                                                            weights_only=True))
            return out
    if (folder / "model.safetensors").exists():
        return load_file(folder / "model.safetensors")
    if (folder / "pytorch_model.bin").exists():
        return torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"from_pretrained: {folder} holds no model.safetensors or pytorch_model.bin "
                            f"(found: {sorted(p.name for p in folder.iterdir())})")


def _normalize_hf_keys(sd: dict) -> dict:
    """Old TF-converted names (LayerNorm.gamma/beta) and the duplicate MLM decoder bias."""
    out = {}
    for k, t in sd.items():
        k = re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", k)
        k = re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", k)
        out[k] = t
    if "cls.predictions.decoder.bias" in out:
        out.setdefault("cls.predictions.bias", out["cls.predictions.decoder.bias"])
        del out["cls.predictions.decoder.bias"]
    return out


def read_config(folder: Path, who: str) -> dict:
    """The folder's config.json, or FileNotFoundError naming the folder."""
    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"{who}: no config.json in {folder}")
    hf = json.loads((folder / "config.json").read_text())
    return hf


def load_pretrained(cls, folder, *, dtype: Optional[torch.dtype] = None, strict: bool = False, **overrides):
    folder = Path(folder)
    who = f"{cls.__name__}.from_pretrained"
    hf = read_config(folder, who)
    model_type = hf.get("model_type")
    if model_type != cls.family:
        raise ValueError(f"{who}: {folder} holds a {model_type!r} checkpoint (architectures "
                         f"{hf.get('architectures')}); {cls.__name__} reads {cls.family!r} checkpoints only "
                         f"(pyllm supports the BERT 'bert' and GPT-2 'gpt2' families)")
    fields = config_from_hf(hf, cls.family)
    if "num_labels" in overrides and "id2label" not in overrides:
        fields["id2label"] = None
    config = TransformerConfig(**{**fields, **overrides})
    model = cls(config)
    sd = _normalize_hf_keys(_read_tensors(folder))
    # the backbone sits under "bert." / "transformer." in head checkpoints, at the root in base ones
    base = "bert." if cls.family == "bert" else "transformer."
    hf_prefix = base if any(k.startswith(base) for k in sd) else ""
    params = model.state_dict()
    used, missing, missing_head, bad_shape = set(), [], [], []
    new_sd = {}
    for r in _rules(model, hf_prefix):
        used.update(k for k in r.hf if k in sd)  # q, v of an incomplete q/k/v group are not "unexpected"
        if not all(k in sd for k in r.hf):
            (missing_head if r.head else missing).append(", ".join(k for k in r.hf if k not in sd))
            continue
        parts = [sd[k] for k in r.hf]
        t = torch.cat(parts, 0) if r.kind == "cat" else parts[0].t() if r.kind == "t" else parts[0]
        if tuple(t.shape) != tuple(params[r.pyllm].shape):
            src = " + ".join(f"{k} {tuple(sd[k].shape)}" for k in r.hf)
            bad_shape.append(f"{r.pyllm}: expected {tuple(params[r.pyllm].shape)}, checkpoint gives "
                             f"{tuple(t.shape)} (from {src})")
            continue
        new_sd[r.pyllm] = t
    unexpected = [k for k in sd if k not in used and not _IGNORABLE[cls.family].search(k)]
    problems = []
    if missing:
        problems.append(f"missing tensors: {missing}")
    if strict and missing_head:
        problems.append(f"missing head tensors (strict=True): {missing_head}")
    if unexpected:
        problems.append(f"unexpected tensors: {unexpected}")
    if bad_shape:
        problems.append(f"mis-shaped tensors: {bad_shape}")
    if problems:
        raise ValueError(f"{who}: checkpoint {folder} does not fit {cls.__name__} ({config.num_layers} layers, "
                         f"hidden {config.hidden_size}): " + "; ".join(problems))
    if missing_head:
        warnings.warn(f"{who}: {missing_head} not in the checkpoint; those weights are newly initialized "
                      f"(train them before use)", stacklevel=3)
    with torch.no_grad():
        for k, t in new_sd.items():
            params[k].copy_(t)
    if dtype is not None:
        model.to(dtype)
    return model.eval()


def check_save_folder(folder: Path, who: str, overwrite: bool):
    """Nothing a user saved is overwritten: refuse a file, or a non-empty folder unless overwrite=True."""
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{who}: {folder} exists and is not a folder")
    if folder.exists() and any(folder.iterdir()) and not overwrite:
        held = sorted(p.name for p in folder.iterdir())
        raise FileExistsError(f"{who}: folder {folder} is not empty (holds {held[:8]}"
                              f"{' ...' if len(held) > 8 else ''}); pass overwrite=True to write into it")


def save_pretrained(model, folder, *, overwrite: bool = False):
    from safetensors.torch import save_file
    folder = Path(folder)
    who = f"{type(model).__name__}.save_pretrained"
    check_save_folder(folder, who, overwrite)
    hf_config = config_to_hf(model, _ARCH[type(model).__name__][0])
    params = model.state_dict()
    hf_prefix = _ARCH[type(model).__name__][1]
    tensors = {}
    for r in _rules(model, hf_prefix):
        t = params[r.pyllm].detach()
        if r.kind == "cat":
            sizes = [model.config.num_heads * model.config.head_dim] + [model.config.num_kv_heads *
                                                                        model.config.head_dim] * 2
            for k, part in zip(r.hf, t.split(sizes, 0)):
                tensors[k] = part
        else:
            tensors[r.hf[0]] = t.t() if r.kind == "t" else t
    if model.family == "bert" and not model.config.type_vocab_size:
        C = model.config.hidden_size
        tensors[hf_prefix + "embeddings.token_type_embeddings.weight"] = params[
            _ARCH[type(model).__name__][2] + "embeddings.word.weight"].new_zeros(1, C)
    tensors = {k: v.contiguous().cpu() for k, v in tensors.items()}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
