"""``pyllm pretrain | finetune | evaluate | predict | generate | plan``.

``add_parsers(subparsers)`` adds the six subcommands to the ``pyllm`` parser. Every option is a
field of the command's dataclass in :mod:`pyllm.train.config` (its flag, its help line, its default
and its allowed values come from there), so the flags, the keys of a ``--config file.json`` and the
keyword arguments of :mod:`pyllm.train.api` always agree. Precedence: defaults < config file < flags.

This module imports only the standard library and ``pyllm.train.config`` at the top: torch,
tokenizers and the models load when a command runs.
"""

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from . import config as C

_KINDS = {int: int, float: float, str: str}


def _help(f: dataclasses.Field) -> str:
    """The field's help line with its default stated once (a None default in the words of ``shown``)."""
    shown = f.metadata["shown"] if f.default is None else f.default
    if shown is None:
        return f.metadata["help"]
    return f"{f.metadata['help']} (default: {shown})"


def _add_options(p: argparse.ArgumentParser, cls) -> None:
    p.add_argument("--config", metavar="FILE.json",
                   help="JSON object of options; keys are the flag names with underscores (flags override)")
    for f in dataclasses.fields(cls):
        kind, _ = C.base_type(f)
        nargs = f.metadata["positional"]
        if nargs:
            p.add_argument(f.name, nargs=nargs, help=_help(f))
        elif kind is bool:
            p.add_argument("--" + f.name.replace("_", "-"), action=argparse.BooleanOptionalAction, help=_help(f))
        elif kind is list:
            p.add_argument("--" + f.name.replace("_", "-"), nargs="+", metavar="LABEL", help=_help(f))
        else:
            p.add_argument("--" + f.name.replace("_", "-"), type=_KINDS[kind], choices=f.metadata["choices"],
                           help=_help(f))


def _print_metrics(metrics: dict, keys) -> None:
    for k in keys:
        if k in metrics:
            v = metrics[k]
            print(f"  {k:<26} {v:.4f}" if isinstance(v, float) else f"  {k:<26} {v}")


def _command(fn):
    """Run ``fn(config_file, flags)``: a clear one-line message and exit code, no traceback, for the
    user's mistakes (2) and failed runs (1); Ctrl-C -> 130 after the trainer has saved."""

    def run(args) -> int:
        cls = args.config_class
        flags = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
        try:
            return fn(getattr(args, "config", None), flags)
        except KeyboardInterrupt:
            print(f"\npyllm {cls.command}: interrupted; the run was saved (continue it with --resume)",
                  file=sys.stderr)
            return 130
        except (ValueError, OSError, TypeError) as e:  # OSError: missing, existing, unwritable paths
            print(f"pyllm {cls.command}: error: {e.as_flags() if isinstance(e, C.ConfigError) else e}",
                  file=sys.stderr)
            return 2
        except RuntimeError as e:  # NonFiniteLossError and friends
            print(f"pyllm {cls.command}: error: {e}", file=sys.stderr)
            return 1

    return run


@_command
def cmd_pretrain(config_file, flags: dict) -> int:
    from .api import pretrain

    result = pretrain(config_file, **flags)
    m = result.metrics
    print(f"pretrained {m.get('parameters', 0) / 1e6:.2f}M parameters for {m['steps']} steps "
          f"({m['tokens']} tokens, {m['train_seconds']:.0f} s, {m['tokens_per_s']:.0f} tokens/s) -> "
          f"{result.output_dir}")
    losses = [r["loss"] for r in result.history if "loss" in r]
    if losses:
        print(f"  train loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    _print_metrics(m, ["eval_loss", "eval_perplexity", "peak_memory_mb", "planned_peak_mb", "stopped"])
    if m.get("sample"):
        print(f"sample:\n  {m['sample']}")
    return 0


@_command
def cmd_finetune(config_file, flags: dict) -> int:
    from .api import finetune

    result = finetune(config_file, **flags)
    m = result.metrics
    print(f"fine-tuned for {m['steps']} steps on {m['train_examples']} examples "
          f"({m['train_seconds']:.0f} s) -> {result.output_dir}")
    _print_metrics(m, ["eval_accuracy", "eval_macro_f1", "majority_class_accuracy", "eval_f1", "eval_exact_match",
                       "eval_bleu", "eval_chrf", "eval_rouge1", "eval_rouge2", "eval_rougeL",  # translation etc.
                       "eval_loss", "train_loss", "peak_memory_mb", "planned_peak_mb", "stopped"])
    for s in m.get("samples", []):  # translation / summarization: a few validation sources, references, outputs
        print(f"  {s['source']!r}\n    -> {s['output']!r}\n    reference {s['reference']!r}")
    return 0


@_command
def cmd_evaluate(config_file, flags: dict) -> int:
    from .api import evaluate

    cfg = C.from_sources(C.EvaluateConfig, config_file, flags)
    metrics = evaluate(cfg.folder, cfg.data, batch_size=cfg.batch_size, device=cfg.device,
                       max_examples=cfg.max_examples, max_files=cfg.max_files)
    print(f"evaluated {cfg.folder}:")
    _print_metrics(metrics, list(metrics))
    return 0


def _read_inputs(cfg: C.PredictConfig) -> list:
    items = list(cfg.text or [])
    if cfg.file:
        path = Path(cfg.file)
        if not path.is_file():
            raise FileNotFoundError(f"--file {path} does not exist")
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            if path.suffix == ".jsonl":
                try:
                    item = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
                if not isinstance(item, dict) or not ("text" in item or {"question", "context"} <= set(item)):
                    got = sorted(item) if isinstance(item, dict) else type(item).__name__
                    raise ValueError(f"{path}:{lineno}: expected an object with 'text' (and optionally "
                                     f"'text_pair'), or with 'question' and 'context'; got {got}")
                items.append(item)
            else:
                items.append(line)
    if not items:
        raise ValueError("nothing to predict: give texts as arguments or --file")
    return items


@_command
def cmd_predict(config_file, flags: dict) -> int:
    from .api import predict

    cfg = C.from_sources(C.PredictConfig, config_file, flags)
    items = _read_inputs(cfg)
    for x, r in zip(items, predict(cfg.folder, items, batch_size=cfg.batch_size, device=cfg.device)):
        if cfg.json:
            print(json.dumps({"input": x, **r}))
        elif "label" in r:
            print(f"{r['label']}\t{r['score']:.3f}\t{x if isinstance(x, str) else x.get('text')}")
        elif "output" in r:  # translation / summarization: one output line per input
            print(r["output"])
        elif "tags" in r:
            print(" ".join(f"{t}/{g}" for t, g in zip(r["tokens"], r["tags"])))
        else:
            print(f"{r['answer']!r}\t[{r['start']}:{r['end']}]")
    return 0


@_command
def cmd_generate(config_file, flags: dict) -> int:
    from .api import generate

    cfg = C.from_sources(C.GenerateConfig, config_file, flags)
    outs = generate(cfg.folder, cfg.prompt or ["Return the"], max_new_tokens=cfg.max_new_tokens,
                    temperature=cfg.temperature, top_k=cfg.top_k, seed=cfg.seed, device=cfg.device)
    for text in outs:
        print(text)
        print("---")
    return 0


@_command
def cmd_plan(config_file, flags: dict) -> int:
    from .memory_plan import plan_from_config

    cfg = C.from_sources(C.PlanConfig, config_file, flags)
    p = plan_from_config(cfg)
    print(json.dumps(p.to_dict(), indent=2) if cfg.json else p.table())
    return 0


COMMANDS = [  # (config class, function, one-line help)
    (C.PretrainConfig, cmd_pretrain, "pretrain a GPT (clm), BERT (mlm), T5 (span) or BART (denoise); default: stdlib "
                                   "docstrings"),
    (C.FinetuneConfig, cmd_finetune, "fine-tune for classification, tagging or QA; default: MiniLM on stdlib topics"),
    (C.EvaluateConfig, cmd_evaluate, "score a fine-tuned or pretrained run folder"),
    (C.PredictConfig, cmd_predict, "predict labels, tags or answer spans with a fine-tuned folder"),
    (C.GenerateConfig, cmd_generate, "continue prompts with a causal LM folder"),
    (C.PlanConfig, cmd_plan, "estimate the peak memory of a training step; propose a batch that fits --memory"),
]


def _description(cls) -> str:
    text = " ".join(cls.__doc__.split())
    if getattr(cls, "time_cap", None):
        text += (f" A run given none of --max-steps, --epochs, --max-time, --resume stops after "
                 f"{cls.time_cap:.0f} s of training (cleanly: saved and resumable).")
    return text


def add_parsers(subparsers) -> None:
    """Add pretrain, finetune, evaluate, predict, generate and plan to ``pyllm``'s subparsers."""
    for cls, func, help_ in COMMANDS:
        p = subparsers.add_parser(cls.command, help=help_, description=_description(cls),
                                  argument_default=argparse.SUPPRESS)
        _add_options(p, cls)
        p.set_defaults(func=func, config_class=cls)
