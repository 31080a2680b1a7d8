"""LoRA fine-tuning through peft: adapters on a pyllm model, saved in peft's format for transformers.

``apply(model, "r=16,alpha=32,dropout=0.05,targets=q,k,v,o")`` injects peft's LoRA layers
(``peft.inject_adapter_in_model``; pyllm writes no adapter layers of its own) into the chosen linear
projections, freezes everything else but the task head, and returns the model. The fused attention and
norms stay in the path: LoRA wraps ``nn.Linear`` modules only.

Targets: ``q``, ``k``, ``v`` (pyllm computes them with one projection, ``attn.qkv``: the three are
adapted together, so they must be named together), ``o`` (``attn.proj``; Llama: ``self_attn.o_proj``),
``fc1`` / ``fc2`` (the MLP; Llama: ``gate_up`` (gate and up in one projection) / ``down_proj``), or any
linear module name of the model.

``save_adapter(model, folder, base_model)`` writes ``adapter_config.json`` + ``adapter_model.safetensors``
under transformers' module names, loadable with ``peft.PeftModel.from_pretrained`` on the transformers
model of the same architecture: the LoRA of pyllm's fused qkv becomes three LoRAs (query, key and value)
that share A and split B by rows, which gives the same outputs; GPT-2's Conv1D modules get
``fan_in_fan_out``. The task head is saved as peft's ``modules_to_save``. ``merge(model)`` folds the
adapters into the weights and removes them, leaving a plain pyllm model (``save_pretrained`` works).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from torch import nn

ALIASES = {"q": "qkv", "k": "qkv", "v": "qkv", "o": "proj"}
HEADS = ("classifier", "qa_outputs", "score")  # task heads: trained in full, saved as modules_to_save


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    targets: tuple = ("q", "k", "v", "o")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def parse(text: str) -> LoraSpec:
    """``"r=16,alpha=32,dropout=0.05,targets=q,k,v,o"`` -> LoraSpec; every key is optional; the names after
    ``targets=`` run to the end (or to the next ``key=``)."""
    fields, targets, key = {}, [], None
    for part in (p.strip() for p in str(text).split(",")):
        if not part:
            continue
        if "=" in part:
            key, value = (s.strip() for s in part.split("=", 1))
            if key not in ("r", "alpha", "dropout", "targets"):
                raise ValueError(f"lora: unknown key {key!r} in {text!r}; expected r, alpha, dropout, targets")
            if key == "targets":
                targets = [value] if value else []
            else:
                fields[key] = value
        elif key == "targets":
            targets.append(part)
        else:
            raise ValueError(f"lora: expected key=value, got {part!r} in {text!r}")
    try:
        spec = LoraSpec(r=int(fields.get("r", 16)), alpha=float(fields.get("alpha", 32)),
                        dropout=float(fields.get("dropout", 0.05)), targets=tuple(targets or ("q", "k", "v", "o")))
    except ValueError as e:
        raise ValueError(f"lora: r must be an int and alpha, dropout numbers, got {text!r} ({e})") from None
    if spec.r < 1:
        raise ValueError(f"lora: r must be >= 1, got {spec.r}")
    if not spec.alpha > 0:
        raise ValueError(f"lora: alpha must be > 0, got {spec.alpha:g}")
    if not 0 <= spec.dropout < 1:
        raise ValueError(f"lora: dropout must be in [0, 1), got {spec.dropout:g}")
    return spec


def linear_names(model: nn.Module) -> list[str]:
    """The distinct last names of the model's nn.Linear modules (what ``targets`` may name)."""
    return sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})


def _alias(target: str, names: set) -> str:
    """A target's module name in this model: q, k, v -> qkv; o -> proj (Llama: o_proj)."""
    if target == "o" and "proj" not in names and "o_proj" in names:
        return "o_proj"
    return ALIASES.get(target, target)


def _target_paths(model: nn.Module, spec: LoraSpec) -> list[str]:
    names = set(linear_names(model))
    qkv = {t for t in spec.targets if t in ("q", "k", "v")}
    if qkv and qkv != {"q", "k", "v"}:
        raise ValueError(f"lora: targets {sorted(qkv)} name part of q, k, v, which pyllm computes with one "
                         f"projection (qkv); name all three (q,k,v) or none")
    wanted = {_alias(t, names) for t in spec.targets}
    unknown = sorted(t for t in spec.targets if _alias(t, names) not in names or _alias(t, names) in HEADS)
    if unknown:
        raise ValueError(f"lora: unknown target(s) {unknown}; the model's linear modules are "
                         f"{sorted(names - set(HEADS))} (aliases: q, k, v -> qkv, o -> proj or o_proj)")
    paths = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in wanted]
    for p in paths:
        m = model.get_submodule(p)
        if spec.r > min(m.in_features, m.out_features):
            raise ValueError(f"lora: rank r={spec.r} is larger than the width of {p} "
                             f"({m.in_features} -> {m.out_features})")
    return paths


def apply(model: nn.Module, spec: LoraSpec | str, base_model: str | None = None) -> nn.Module:
    """Inject peft LoRA adapters into ``model`` (in place) and freeze all but the adapters and the task head.

    Afterwards ``model.save_pretrained(folder)`` writes the adapters (:func:`save_adapter`, with
    ``base_model`` recorded as peft's ``base_model_name_or_path``) instead of a full checkpoint."""
    spec = parse(spec) if isinstance(spec, str) else spec
    try:
        import peft
    except ImportError:
        raise ImportError("lora: needs peft (pip install 'pyllm[lora]' or pip install peft)") from None
    paths = _target_paths(model, spec)
    config = peft.LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout, target_modules=paths)
    peft.inject_adapter_in_model(config, model)
    for name, p in model.named_parameters():
        p.requires_grad = "lora_" in name or name.split(".", 1)[0] in HEADS
    model.lora_spec = spec
    model.save_pretrained = lambda folder, overwrite=False: save_adapter(model, folder, base_model)
    return model


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, tied parameters once."""
    seen, trainable, total = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total


def _lora_layers(model: nn.Module):
    from peft.tuners.lora import LoraLayer

    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]


def save_adapter(model: nn.Module, folder, base_model: str | None = None) -> Path:
    """Write the adapters and the task head in peft's format under transformers' names (see module doc)."""
    import peft
    from safetensors.torch import save_file

    from pyllm.models import hf_io

    spec: LoraSpec = model.lora_spec
    arch = hf_io._ARCH[type(model).__name__]
    rules = {r.pyllm: r for r in hf_io._rules(model, arch[1])}
    cfg = model.config
    sizes = {3: [cfg.num_heads * cfg.head_dim] + [cfg.num_kv_heads * cfg.head_dim] * 2,  # q, k, v
             2: [cfg.intermediate_size] * 2}  # Llama's gate and up
    tensors, targets, conv1d = {}, [], False
    for name, layer in _lora_layers(model):
        A, B = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
        rule = rules[name + ".weight"]
        parts = B.split(sizes[len(rule.hf)], 0) if rule.kind == "cat" else (B,)
        conv1d = conv1d or rule.kind == "t"
        for hf_key, b in zip(rule.hf, parts):
            module = hf_key[: -len(".weight")]
            targets.append(module)
            tensors[f"base_model.model.{module}.lora_A.weight"] = A
            tensors[f"base_model.model.{module}.lora_B.weight"] = b
    heads = []
    for key, value in model.state_dict().items():
        if key.split(".", 1)[0] in HEADS and key in rules:
            heads.append(rules[key].hf[0].rsplit(".", 1)[0])
            tensors[f"base_model.model.{rules[key].hf[0]}"] = value.detach()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = peft.LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout, target_modules=targets,
                             modules_to_save=sorted(set(heads)) or None, fan_in_fan_out=conv1d,
                             base_model_name_or_path=base_model)
    config.save_pretrained(str(folder))
    save_file({k: v.cpu().clone() for k, v in tensors.items()}, str(folder / "adapter_model.safetensors"),
              metadata={"format": "pt"})
    (folder / "pyllm_lora.json").write_text(json.dumps(spec.to_dict(), indent=2) + "\n")
    return folder


def merge(model: nn.Module) -> nn.Module:
    """Fold each adapter into its linear layer (peft's merge) and put the plain layer back; in place."""
    for name, layer in _lora_layers(model):
        layer.merge()
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, layer.get_base_layer())
    for p in model.parameters():
        p.requires_grad = True
    for attr in ("lora_spec", "save_pretrained"):  # back to the class's save_pretrained
        model.__dict__.pop(attr, None)
    return model


def describe(model: nn.Module) -> str:
    trainable, total = trainable_parameters(model)
    spec = model.lora_spec
    return (f"LoRA r={spec.r} alpha={spec.alpha:g} dropout={spec.dropout:g} on {','.join(spec.targets)}: "
            f"training {trainable:,} of {total:,} parameters ({100 * trainable / max(total, 1):.2f}%)")


__all__ = ["LoraSpec", "parse", "apply", "linear_names", "trainable_parameters", "save_adapter", "merge", "describe"]
