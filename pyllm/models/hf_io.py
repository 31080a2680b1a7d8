"""Hugging Face checkpoint folders <-> pyllm models: BERT, GPT-2 and the Llama family (llama, qwen2, mistral).

A checkpoint folder holds config.json plus model.safetensors (or pytorch_model.bin, or a sharded
index of either). Tensor names are mapped by rules: one pyllm tensor comes from one or more HF
tensors ("copy"; "t" = transposed, for GPT-2's Conv1D (in, out) weights; "cat" = q, k and v
stacked into pyllm's single qkv projection). transformers itself is never imported here.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from .hf_config import ConfigJsonError, config_from_hf, config_to_hf

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
    # Llama family: the architecture name is prefixed by the model type's ("Llama", "Qwen2", "Mistral")
    "LlamaModel": ("Model", "", ""),
    "LlamaForCausalLM": ("ForCausalLM", "model.", "model."),
    "LlamaForSequenceClassification": ("ForSequenceClassification", "model.", "model."),
}
_LLAMA_ARCH_PREFIX = {"llama": "Llama", "qwen2": "Qwen2", "mistral": "Mistral"}
# HF model_type -> the pyllm family that reads it
_FAMILY_OF = {"bert": "bert", "gpt2": "gpt2", "llama": "llama", "qwen2": "llama", "mistral": "llama"}

# HF tensors that a model may legitimately not use: buffers, and other heads of the same family
_IGNORABLE = {
    "bert": re.compile(r"^(bert\.)?embeddings\.position_ids$|^(bert\.)?pooler\.|^cls\.|^classifier\.|^qa_outputs\."),
    "gpt2": re.compile(r"(^|\.)attn\.(masked_)?bias$|^lm_head\.|^score\.|^multiple_choice_head\."),
    "llama": re.compile(r"(^|\.)rotary_emb\.inv_freq$|^lm_head\.|^score\."),
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
    elif model.family == "llama":
        rules.append(Rule(P + "embed_tokens.weight", (H + "embed_tokens.weight",)))
        for i in range(cfg.num_layers):
            L, HL = f"{P}layers.{i}.", f"{H}layers.{i}."
            qkv = [f"{HL}self_attn.{n}_proj" for n in "qkv"]
            rules.append(Rule(L + "self_attn.qkv.weight", tuple(q + ".weight" for q in qkv), "cat"))
            if cfg.attention_bias:
                rules.append(Rule(L + "self_attn.qkv.bias", tuple(q + ".bias" for q in qkv), "cat"))
            rules.append(Rule(L + "self_attn.o_proj.weight", (HL + "self_attn.o_proj.weight",)))
            gate_up = (HL + "mlp.gate_proj", HL + "mlp.up_proj")
            rules.append(Rule(L + "mlp.gate_up.weight", tuple(g + ".weight" for g in gate_up), "cat"))
            rules.append(Rule(L + "mlp.down_proj.weight", (HL + "mlp.down_proj.weight",)))
            if cfg.mlp_bias:
                rules.append(Rule(L + "mlp.gate_up.bias", tuple(g + ".bias" for g in gate_up), "cat"))
                rules.append(Rule(L + "mlp.down_proj.bias", (HL + "mlp.down_proj.bias",)))
            for norm in ("input_layernorm", "post_attention_layernorm"):
                rules.append(Rule(f"{L}{norm}.weight", (f"{HL}{norm}.weight",)))
        rules.append(Rule(P + "norm.weight", (H + "norm.weight",)))
    else:
        rules += [Rule(P + "word.weight", (H + "wte.weight",)), Rule(P + "position.weight", (H + "wpe.weight",))]
        for i in range(cfg.num_layers):
            L, HL = f"{P}blocks.layers.{i}.", f"{H}h.{i}."
            rules += _linear(L + "norm1", HL + "ln_1")
            rules += _linear(L + "attn.qkv", HL + "attn.c_attn", "t")
            rules += _linear(L + "attn.proj", HL + "attn.c_proj", "t")
            rules += _linear(L + "norm2", HL + "ln_2")
            rules += _linear(L + "mlp.fc1", HL + "mlp.c_fc", "t")
            rules += _linear(L + "mlp.fc2", HL + "mlp.c_proj", "t")
        rules += _linear(P + "blocks.norm_f", H + "ln_f")
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
    elif name in ("GPTForCausalLM", "LlamaForCausalLM") and not tied:
        rules.append(Rule("lm_head.weight", ("lm_head.weight",), head=True))
    elif name in ("GPTForSequenceClassification", "LlamaForSequenceClassification"):
        rules.append(Rule("score.weight", ("score.weight",), head=True))
    return rules


# ----------------------------------------------------------------------------- tensors


def _read_tensors(folder: Path) -> dict:
    """transformers' order: model.safetensors, its sharded index, pytorch_model.bin, its index."""
    from safetensors.torch import load_file
    if (folder / "model.safetensors").exists():
        return load_file(folder / "model.safetensors")
    for index_name, loader in (("model.safetensors.index.json", load_file),
                               ("pytorch_model.bin.index.json", None)):
        index = folder / index_name
        if index.exists():
            shards = _index_shards(index)
            out = {}
            for s in shards:
                out.update(load_file(folder / s) if loader else torch.load(folder / s, map_location="cpu",
                                                                            weights_only=True))
            return out
    if (folder / "pytorch_model.bin").exists():
        return torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"from_pretrained: {folder} holds no model.safetensors or pytorch_model.bin "
                            f"(found: {sorted(p.name for p in folder.iterdir())})")


def _index_shards(index: Path) -> list[str]:
    """The shard files a sharded checkpoint's index lists (its ``weight_map``: tensor name -> file)."""
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"from_pretrained: {index}: not valid JSON ({e}); expected an object with a 'weight_map' "
                         "of tensor name -> shard file") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        got = f"a {type(data).__name__}" if not isinstance(data, dict) else (
            "no 'weight_map'" if "weight_map" not in data else f"'weight_map' {str(weight_map)[:60]}")
        raise ValueError(f"from_pretrained: {index}: expected an object with a 'weight_map' of tensor name -> "
                         f"shard file (a string), got {got}")
    return sorted(set(weight_map.values()))


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
    """The folder's config.json as a dict: FileNotFoundError without one, ValueError naming the file
    when it is not a JSON object (shared by the encoder-decoder reader, seq2seq_io)."""
    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"{who}: no config.json in {folder}")
    try:
        hf = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{who}: {folder / 'config.json'} is not valid JSON ({e})") from None
    if not isinstance(hf, dict):
        raise ValueError(f"{who}: {folder / 'config.json'} must hold a JSON object, got a {type(hf).__name__}")
    return hf


def load_pretrained(cls, folder, *, dtype: Optional[torch.dtype] = None, strict: bool = False, **overrides):
    folder = Path(folder)
    who = f"{cls.__name__}.from_pretrained"
    hf = read_config(folder, who)
    dtype = _as_dtype(dtype, who)
    model_type = hf.get("model_type")
    if _FAMILY_OF.get(model_type) != cls.family:
        mine = sorted(t for t, f in _FAMILY_OF.items() if f == cls.family)
        raise ValueError(f"{who}: {folder} holds a {model_type!r} checkpoint (architectures "
                         f"{hf.get('architectures')}); {cls.__name__} reads {' / '.join(map(repr, mine))} "
                         f"checkpoints only (pyllm supports model types {sorted(_FAMILY_OF)})")
    try:
        fields = config_from_hf(hf, cls.family)
    except ConfigJsonError as e:
        raise ValueError(f"{who}: {folder / 'config.json'}: {e}") from None
    if "num_labels" in overrides and "id2label" not in overrides:
        fields["id2label"] = None
    config = cls.config_class(**{**fields, **overrides})
    model = cls(config)
    sd = _normalize_hf_keys(_read_tensors(folder))
    # the backbone sits under "bert." / "transformer." / "model." in head checkpoints, at the root in base ones
    base = {"bert": "bert.", "gpt2": "transformer.", "llama": "model."}[cls.family]
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


def _as_dtype(dtype, who: str) -> Optional[torch.dtype]:
    """None, a floating torch.dtype, or its name ("float16", "bfloat16", "float32", "float64")."""
    named = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
    if dtype is not None and not (isinstance(named, torch.dtype) and named.is_floating_point):
        raise ValueError(f"{who}: dtype must be a torch floating dtype or its name ('float16', 'bfloat16', "
                         f"'float32', 'float64'), got {dtype!r}")
    return named


def check_save_folder(folder: Path, who: str, overwrite: bool) -> None:
    """Nothing a user saved is overwritten: refuse a file, or a non-empty folder unless overwrite=True."""
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{who}: {folder} exists and is not a folder")
    if folder.exists() and any(folder.iterdir()) and not overwrite:
        held = sorted(p.name for p in folder.iterdir())
        raise FileExistsError(f"{who}: folder {folder} is not empty (holds {held[:8]}"
                              f"{' ...' if len(held) > 8 else ''}); pass overwrite=True to write into it")


def save_pretrained(model, folder, *, overwrite: bool = False, max_shard_size=None):
    folder = Path(folder)
    who = f"{type(model).__name__}.save_pretrained"
    max_shard_size = shard_bytes(max_shard_size, who)
    check_save_folder(folder, who, overwrite)
    arch = _ARCH[type(model).__name__][0]
    if model.family == "llama":
        arch = _LLAMA_ARCH_PREFIX[model.config.model_type] + arch
    hf_config = config_to_hf(model, arch)
    params = model.state_dict()
    hf_prefix = _ARCH[type(model).__name__][1]
    tensors = {}
    for r in _rules(model, hf_prefix):
        t = params[r.pyllm].detach()
        if r.kind == "cat":
            sizes = [model.config.num_heads * model.config.head_dim] + [model.config.num_kv_heads *
                                                                        model.config.head_dim] * 2
            if len(r.hf) == 2:  # Llama's gate and up projections
                sizes = [model.config.intermediate_size] * 2
            for k, part in zip(r.hf, t.split(sizes, 0)):
                tensors[k] = part
        else:
            tensors[r.hf[0]] = t.t() if r.kind == "t" else t
    if model.family == "bert" and not model.config.type_vocab_size:
        C = model.config.hidden_size
        tensors[hf_prefix + "embeddings.token_type_embeddings.weight"] = params[
            _ARCH[type(model).__name__][2] + "embeddings.word.weight"].new_zeros(1, C)
    write_checkpoint(folder, tensors, {"config.json": hf_config}, max_shard_size)


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def shard_bytes(max_shard_size, who: str) -> Optional[int]:
    """None, a byte count, or transformers' spelling ("5GB" = 5 * 10**9, "500MiB" = 500 * 2**20) -> bytes."""
    if max_shard_size is None:
        return None
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", max_shard_size) if isinstance(max_shard_size, str) else None
    if m and m.group(2).upper() in _UNITS:
        size = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    elif isinstance(max_shard_size, int) and not isinstance(max_shard_size, bool):
        size = max_shard_size
    else:
        size = 0
    if size < 1:
        raise ValueError(f"{who}: max_shard_size must be None, a positive number of bytes or a size such as "
                         f"'5GB' / '500MiB' (units {sorted(u for u in _UNITS if u)}), got {max_shard_size!r}")
    return size


def _shards(tensors: dict, max_shard_size: Optional[int]) -> dict:
    """{file name: {tensor name: tensor}}: model.safetensors alone when everything fits one shard, else
    transformers' model-00001-of-0000N.safetensors, filled in order up to max_shard_size bytes each (a
    tensor larger than that gets a shard of its own)."""
    groups, size = [{}], 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        if max_shard_size is not None and groups[-1] and size + n > max_shard_size:
            groups.append({})
            size = 0
        groups[-1][name] = t
        size += n
    if len(groups) == 1:
        return {"model.safetensors": groups[0]}
    return {f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors": g for i, g in enumerate(groups)}


def write_checkpoint(folder: Path, tensors: dict, json_files: dict, max_shard_size: Optional[int] = None) -> None:
    """model.safetensors (or, past ``max_shard_size`` bytes, shards and model.safetensors.index.json as
    transformers writes them) and the JSON files ``{name: object}`` (config.json, ...) into ``folder``
    (shared by the encoder-decoder writer, seq2seq_io)."""
    from safetensors.torch import save_file
    tensors = {k: v.contiguous().cpu() for k, v in tensors.items()}
    shards = _shards(tensors, max_shard_size)
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
                 "weight_map": {k: f for f, group in shards.items() for k in group}}
        json_files = {"model.safetensors.index.json": index, **json_files}
    folder.mkdir(parents=True, exist_ok=True)
    # All files are written under temporary names and renamed into place (a failed or killed
    # save leaves the old files), then the weights of an earlier save that would shadow or
    # outlive the new ones (a sharded index and its shards, or a single model.safetensors when
    # sharding) are removed, as transformers does.
    written = []
    try:
        for name, write in (*((f, lambda p, g=g: save_file(g, p, metadata={"format": "pt"})) for f, g in shards.items()),
                            *((name, lambda p, obj=obj: Path(p).write_text(
                                json.dumps(obj, indent=2, sort_keys=True) + "\n")) for name, obj in json_files.items())):
            fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".tmp")
            os.close(fd)
            written.append((tmp, folder / name))
            write(tmp)
        for tmp, path in written:
            os.replace(tmp, path)
    finally:
        for tmp, _ in written:
            if os.path.exists(tmp):
                os.unlink(tmp)
    for stale in _earlier_weight_files(folder, keep={path.name for _, path in written}):
        stale.unlink()


_SHARD = re.compile(r"^(model|pytorch_model)-\d+-of-\d+\.(safetensors|bin)$")


def _earlier_weight_files(folder: Path, keep: set) -> list[Path]:
    """Weights in ``folder`` not among the files just written (``keep``): sharded ones (index files, the
    shards they list, shard-named files), and model.safetensors when a sharded save replaces it."""
    stale = {folder / "model.safetensors"}
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = folder / index_name
        if index.exists():
            stale.add(index)
            try:
                shards = json.loads(index.read_text()).get("weight_map", {}).values()
            except (ValueError, AttributeError):
                shards = []
            stale.update(folder / s for s in shards if isinstance(s, str) and "/" not in s)
    stale.update(p for p in folder.iterdir() if _SHARD.match(p.name))
    return sorted(p for p in stale if p.is_file() and p.name not in keep)
