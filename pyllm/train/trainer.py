"""The training core shared by pretraining and every fine-tuning task.

One loop: deterministic global batches -> micro-batches (gradient accumulation)
-> each process's slice (data parallel) -> forward under autocast -> backward
-> unscale, clip, AdamW step, schedule. Around it: evaluation and early
stopping, a tqdm bar, a JSONL metrics log and loss curve, atomic checkpoints
that resume exactly, a clear stop on a NaN/inf loss, and a save on Ctrl-C.

``Trainer.train`` reads as three steps: ``_setup`` (model on its device, optimizer, schedule,
log; the checkpoint when resuming), ``_loop`` (the steps), ``_finish`` (last evaluation, save,
metrics). Everything the loop touches is an attribute of the trainer; the process (rank, world
size, device) is handed in, set up once by the caller (:mod:`pyllm.train.api`).

Exact resumption rests on two choices: the order of the examples in an epoch
is a function of (seed, epoch) alone, and any randomness a collator uses (MLM
masks) comes from a generator seeded by (seed, epoch, batch, micro-batch,
rank). A checkpoint therefore only needs the data position (epoch, batch) plus
the model/optimizer/scheduler/scaler/RNG states.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from . import dist
from .checkpoint import CHECKPOINT, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .optim import build_optimizer, build_scheduler
from .report import MetricsLog, peak_memory_mb, plot_loss_curve


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the run stopped without applying that step."""


@dataclass
class TrainResult:
    """What a run returns: where it wrote, its final metrics and its log."""

    output_dir: Path
    metrics: dict
    history: list = field(default_factory=list, repr=False)
    stopped: str = "completed"  # completed / early_stopping / time_limit / interrupted
    steps: int = 0

    def __getitem__(self, key):
        return self.metrics[key]


@dataclass
class _State:
    """The loop's position and records: what a checkpoint saves besides the tensors."""

    step: int = 0  # optimizer steps done
    epoch: int = 0
    batch: int = 0  # next batch index within the epoch
    tokens: int = 0  # real (non-padding) tokens trained on, all processes
    best: Optional[float] = None
    bad_evals: int = 0
    elapsed: float = 0.0  # seconds of training before this process (resumed runs)


@dataclass
class _Window:
    """Train loss and tokens since the last log record."""

    loss: float = 0.0
    steps: int = 0
    tokens: int = 0
    t: float = field(default_factory=time.perf_counter)


def _seed(*parts: int) -> int:
    h = 0
    for p in parts:
        h = (h * 1_000_003 + int(p) + 1) % (2**61 - 1)
    return h


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The example order of one epoch: a function of (seed, epoch) only."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(_seed(seed, epoch)))


class Trainer:
    """Train ``model`` on ``train_features`` batched by ``collator``.

    Args:
        model: a pyllm model (anything called as ``model(**batch)`` returning ``.loss``).
        train_features: a sequence of feature dicts (see :mod:`pyllm.data.features`).
        collator: ``collator(list_of_features, generator) -> dict of tensors``.
        cfg: a :class:`~pyllm.train.config.TrainConfig` (or subclass).
        output_dir: the folder to write in (the api stages it: see :mod:`pyllm.train.run_folder`).
        process: this process's rank, world size and device (:func:`pyllm.train.dist.setup`);
            default: this process alone, on ``cfg.device``.
        eval_features / evaluate: ``evaluate(model, eval_features, batch_size=, device=, autocast=)``
            returning a dict of metrics (``loss``, ``accuracy`` ...); logged with an ``eval_`` prefix.
        monitor: (metric name, "min"|"max") for early stopping and the best model.
        save_model: ``save_model(unwrapped_model, folder)`` writes the model folder
            (weights, config, tokenizer); called at the end, on Ctrl-C, at each new best
            evaluation when early stopping is on, and with the first checkpoint (so a folder
            holding a checkpoint always holds a loadable model too).
        on_checkpoint: called (rank 0) after each checkpoint past step 0, when the folder holds a
            complete, loadable and resumable run (see :mod:`pyllm.train.run_folder`).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        train_features: Sequence[dict],
        collator: Callable,
        cfg,
        output_dir,
        process: Optional[dist.DistInfo] = None,
        *,
        eval_features: Optional[Sequence[dict]] = None,
        evaluate: Optional[Callable] = None,
        monitor: tuple[str, str] = ("loss", "min"),
        save_model: Optional[Callable] = None,
        description: str = "train",
        on_checkpoint: Optional[Callable[[], None]] = None,
    ):
        self.model = model
        self.train_features = train_features
        self.collator = collator
        self.cfg = cfg
        self.output_dir = Path(output_dir)
        self.process = process or dist.DistInfo(device=dist.resolve_device(cfg.device))
        self.eval_features = eval_features
        self.evaluate_fn = evaluate
        self.monitor = monitor
        self.save_model = save_model
        self.description = description
        self.on_checkpoint = on_checkpoint
        self._model_saved = False

    def train(self) -> TrainResult:
        self._setup()
        try:
            self._loop()
        except KeyboardInterrupt:
            self._interrupted()  # save the last completed step, then let the caller see the interrupt
            raise
        return self._finish()

    # -- setup ----------------------------------------------------------------------------------

    def _setup(self) -> None:
        cfg, p = self.cfg, self.process
        self.micro, self.local, self.steps_per_epoch, self.total = self._geometry()
        self.model.to(p.device)
        if cfg.gradient_checkpointing:
            if not hasattr(self.model, "gradient_checkpointing"):
                raise ValueError(f"Trainer: {type(self.model).__name__} has no gradient_checkpointing flag")
            self.model.gradient_checkpointing = True
        self.model.train()
        self.wrapped = dist.wrap(self.model, p)
        self.optimizer = build_optimizer(self.wrapped, cfg)
        self.scheduler = build_scheduler(self.optimizer, cfg, self.total)
        self.scaler = torch.amp.GradScaler(p.device.type, enabled=cfg.precision == "fp16")
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision)
        self.autocast = (lambda: torch.autocast(p.device.type, dtype=dtype)) if dtype else contextlib.nullcontext
        self.state, self.saved_step = _State(), None
        if p.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        self.log = MetricsLog(self.output_dir / "metrics.jsonl", enabled=p.is_main)
        if cfg.resume:
            self._load_checkpoint()
            self.log.truncate_after(self.state.step)
        dist.barrier(p)
        self.bar = None
        if cfg.progress and p.is_main:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.total, initial=self.state.step, desc=self.description, unit="step",
                            dynamic_ncols=True)
        self.t_start = time.perf_counter() - self.state.elapsed  # elapsed counts all sessions of the run
        self.session_start = time.perf_counter()  # max_time counts this one
        self.window, self.stopped, self.last_eval, self.grad_norm = _Window(), "completed", {}, 0.0

    def _geometry(self) -> tuple[int, int, int, int]:
        """(micro-batch, this process's share of it, steps per epoch, total steps)."""
        cfg = self.cfg
        G, A, W = cfg.batch_size, cfg.gradient_accumulation_steps, self.process.world_size
        micro = G // A
        if micro % W:
            raise ValueError(
                f"Trainer: each micro-batch (batch_size {G} / gradient_accumulation_steps {A} = {micro}) "
                f"must split evenly over {W} processes"
            )
        n = len(self.train_features)
        steps_per_epoch = n // G
        if steps_per_epoch == 0:
            raise ValueError(f"Trainer: {n} training examples are fewer than one batch of batch_size={G}")
        total = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))
        return micro, micro // W, steps_per_epoch, total

    # -- the loop -------------------------------------------------------------------------------

    def _loop(self) -> None:
        cfg, s = self.cfg, self.state
        while s.step < self.total and self.stopped == "completed":
            order = epoch_order(len(self.train_features), cfg.seed, s.epoch)
            while s.batch < self.steps_per_epoch and s.step < self.total and self.stopped == "completed":
                idx = order[s.batch * cfg.batch_size : (s.batch + 1) * cfg.batch_size].tolist()
                loss, tokens, over_time = self._step(idx)
                s.step, s.batch, s.tokens = s.step + 1, s.batch + 1, s.tokens + tokens
                self.window.loss, self.window.steps, self.window.tokens = (
                    self.window.loss + loss, self.window.steps + 1, self.window.tokens + tokens)
                if self.bar is not None:
                    self.bar.update(1)
                if s.step % cfg.log_every == 0 or s.step == self.total:
                    self._log_train()
                end_of_epoch = s.batch >= self.steps_per_epoch
                if s.step < self.total and (cfg.eval_every and s.step % cfg.eval_every == 0
                                            or cfg.eval_every is None and end_of_epoch):
                    if self._evaluate() and self._no_longer_improving():
                        self.stopped = "early_stopping"
                if cfg.save_every and s.step % cfg.save_every == 0:
                    self._save_checkpoint()
                if over_time and self.stopped == "completed":
                    self.stopped = "time_limit"
            if s.batch >= self.steps_per_epoch:
                s.epoch, s.batch = s.epoch + 1, 0

    def _step(self, idx: list[int]) -> tuple[float, int, bool]:
        """One optimizer step over the global batch ``idx``: (mean loss, tokens, time is up)."""
        cfg, p = self.cfg, self.process
        A = cfg.gradient_accumulation_steps
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), device=p.device, dtype=torch.float64)
        tokens = 0
        for a in range(A):
            mine = idx[a * self.micro : (a + 1) * self.micro][p.rank * self.local : (p.rank + 1) * self.local]
            gen = torch.Generator().manual_seed(_seed(cfg.seed, self.state.epoch, self.state.batch, a, p.rank))
            batch = self.collator([self.train_features[i] for i in mine], gen)
            tokens += int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()
            batch = {k: v.to(p.device, non_blocking=True) for k, v in batch.items()}
            with self._gradient_sync(last=a == A - 1):
                with self.autocast():
                    loss = self.wrapped(**batch).loss / A
                self.scaler.scale(loss).backward()
            loss_sum += loss.detach().double()
        over = cfg.max_time is not None and time.perf_counter() - self.session_start > cfg.max_time
        # One all-reduce: loss (mean over processes), tokens (sum), time-up vote (rank 0 decides).
        loss_total, tokens, over_votes = dist.all_sum([float(loss_sum), float(tokens), float(over and p.is_main)], p)
        loss_mean = loss_total / p.world_size
        if not math.isfinite(loss_mean):
            self._non_finite(loss_mean)
        self.scaler.unscale_(self.optimizer)
        params = [q for g in self.optimizer.param_groups for q in g["params"]]
        if cfg.max_grad_norm:
            self.grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm))
        else:
            self.grad_norm = float(torch.nn.utils.get_total_norm([q.grad for q in params if q.grad is not None]))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return loss_mean, int(tokens), over_votes > 0

    def _gradient_sync(self, last: bool):
        """DDP: accumulate locally, all-reduce once on the last micro-batch (FSDP: the same by a flag)."""
        mode = self.process.mode
        if mode == "ddp" and not last:
            return self.wrapped.no_sync()
        if mode == "fsdp" and self.cfg.gradient_accumulation_steps > 1:
            self.wrapped.set_requires_gradient_sync(last)
        return contextlib.nullcontext()

    def _non_finite(self, value: float):
        if self.saved_step is not None:
            where = (f"the last good checkpoint is kept: {self.output_dir / CHECKPOINT} (step {self.saved_step}); "
                     f"resume from it with resume=True (--resume) after lowering the learning rate")
        else:
            where = "no checkpoint had been written yet (set save_every to keep one)"
        s = self.state
        self.log.write({"step": s.step + 1, "event": "non_finite_loss", "value": value})
        raise NonFiniteLossError(
            f"training loss is {value} at step {s.step + 1} (epoch {s.epoch}); stopped without applying "
            f"that update. {where}. Common causes: a learning rate too high, fp16 overflow (try bf16), bad data."
        )

    def _log_train(self) -> None:
        """A train record of the steps since the last one (rank 0 writes it)."""
        now, w, s = time.perf_counter(), self.window, self.state
        rec = {
            "step": s.step,
            "epoch": s.epoch,
            "loss": w.loss / w.steps,
            "lr": self.scheduler.get_last_lr()[0],
            "grad_norm": self.grad_norm,
            "tokens_per_s": w.tokens / max(now - w.t, 1e-9),
            "tokens": s.tokens,
            "elapsed_s": round(now - self.t_start, 3),
            "peak_memory_mb": round(peak_memory_mb(self.process.device), 1),
        }
        self.log.write(rec)
        self.window = _Window(t=now)
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{rec['lr']:.2e}", tok_s=f"{rec['tokens_per_s']:.0f}")

    # -- evaluation and early stopping ------------------------------------------------------------

    def _evaluate(self) -> dict:
        """Evaluate (every process: all agree on the metrics), log, remember; {} when there is nothing to score."""
        if self.evaluate_fn is None or not self.eval_features:
            return {}
        self.wrapped.eval()
        try:
            with torch.no_grad():
                metrics = self.evaluate_fn(self.wrapped, self.eval_features,
                                           batch_size=self.cfg.eval_batch_size or self.cfg.batch_size,
                                           device=self.process.device, autocast=self.autocast)
        finally:
            self.wrapped.train()
        s = self.state
        self.log.write({"step": s.step, "epoch": s.epoch, **{f"eval_{k}": v for k, v in metrics.items()}})
        self.last_eval = metrics
        return metrics

    def _no_longer_improving(self) -> bool:
        """Track the best monitored value (saving the best model when early stopping is on);
        True when ``early_stopping_patience`` evaluations in a row brought no improvement."""
        name, mode = self.monitor
        value, s, patience = self.last_eval.get(name), self.state, self.cfg.early_stopping_patience
        if value is None or not isinstance(value, (int, float)) or not math.isfinite(value):
            return False
        if s.best is None or (value < s.best if mode == "min" else value > s.best):
            s.best, s.bad_evals = float(value), 0
            if patience:
                self._save_model()  # keep the best model
            return False
        s.bad_evals += 1
        return bool(patience) and s.bad_evals >= patience

    # -- the end -----------------------------------------------------------------------------------

    def _finish(self) -> TrainResult:
        cfg, s, p = self.cfg, self.state, self.process
        if self.bar is not None:
            self.bar.close()
        if self.window.steps:  # stopped early (time limit, early stopping): log the partial window
            self._log_train()
        elapsed = time.perf_counter() - self.t_start
        if self.stopped != "early_stopping" and self._evaluate():
            self._no_longer_improving()  # updates the best model
        if not (cfg.early_stopping_patience and s.best is not None):
            self._save_model()
        self._save_checkpoint(elapsed)  # publishes the run: the model is saved first
        metrics = {
            "steps": s.step,
            "epochs": round(s.epoch + s.batch / self.steps_per_epoch, 4),
            "tokens": s.tokens,
            "train_seconds": round(elapsed, 3),
            "tokens_per_s": round(s.tokens / max(elapsed, 1e-9), 1),
            "peak_memory_mb": round(max(dist.all_mean([peak_memory_mb(p.device)], p)[0], 0.0), 1),
            "stopped": self.stopped,
        }
        train_losses = [r["loss"] for r in self.log.read() if "loss" in r] if p.is_main else []
        if train_losses:
            metrics["train_loss"] = train_losses[-1]
        metrics.update({f"eval_{k}": v for k, v in self.last_eval.items()})
        if s.best is not None:
            metrics[f"best_eval_{self.monitor[0]}"] = s.best
        if p.is_main:
            self.log.write({"step": s.step, "event": "end", **metrics})
            self._plot()
        return TrainResult(self.output_dir, metrics, self.log.read() if p.is_main else [], self.stopped, s.step)

    def _interrupted(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self._save_model()
        self._save_checkpoint()  # publishes the run (once a step is done): the model is saved first
        if self.process.is_main:
            self.log.write({"step": self.state.step, "event": "interrupted"})
            self._plot()

    def _plot(self) -> None:
        if self.cfg.plot:
            plot_loss_curve(self.log.read(), self.output_dir / "loss_curve.png", title=self.description)

    # -- saving and loading: the model folder and the checkpoint ----------------------------------

    def _save_model(self) -> None:
        """Write the model folder (rank 0). Under FSDP the parameters are sharded, so every
        process joins in gathering them and rank 0 saves a plain copy of the model."""
        if self.save_model is None:
            return
        self._check_weights()
        self._model_saved = True
        p = self.process
        if p.mode == "fsdp":
            state = self._model_state()
            if p.is_main:
                # fully_shard swaps the class for a generated FSDP<Name> subclass; save the original.
                cls = next(c for c in type(self.model).__mro__ if not c.__name__.startswith("FSDP"))
                plain = cls(self.model.config)
                plain.load_state_dict(state)
                self.save_model(plain, self.output_dir)
        elif p.is_main:
            self.save_model(dist.unwrap(self.model), self.output_dir)
        dist.barrier(p)

    def _model_state(self) -> dict:
        if self.process.mode == "fsdp":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            return get_model_state_dict(self.wrapped, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {k: v.detach().cpu() for k, v in dist.unwrap(self.wrapped).state_dict().items()}

    def _optimizer_state(self) -> dict:
        if self.process.mode == "fsdp":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            return get_optimizer_state_dict(self.wrapped, self.optimizer,
                                            options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return self.optimizer.state_dict()

    def _check_weights(self) -> None:
        """Never save weights that are not finite (an update can break them without a NaN loss:
        the last step of a run with a huge learning rate). Every process checks its own copy or shard."""
        names = [n for n, _ in self.wrapped.named_parameters()]
        params = [getattr(q, "_local_tensor", q) for q in self.wrapped.parameters()]  # FSDP2: the local shard
        bad = next((n for n, q in zip(names, params) if not bool(torch.isfinite(q).all())), None)
        if dist.all_sum([float(bad is not None)], self.process)[0]:
            raise NonFiniteLossError(f"the weights are not finite after the last update ({bad or 'on another process'}"
                                     "); nothing was saved over the last good checkpoint. Common causes: a learning "
                                     "rate too high, fp16 overflow (try bf16), bad data.")

    def _save_checkpoint(self, elapsed: Optional[float] = None) -> None:
        """Everything a resumed run needs, in ``output_dir/checkpoint.safetensors`` (every process joins
        in), with a loadable model the first time; then the run is published (``on_checkpoint``)."""
        p = self.process
        elapsed = time.perf_counter() - self.t_start if elapsed is None else elapsed
        self._check_weights()
        if not self._model_saved:  # the first checkpoint comes with a loadable model
            self._save_model()
        model_state = self._model_state()  # collective under FSDP: every rank calls it
        optim_state = self._optimizer_state()
        rngs = dist.gather_objects(rng_state(), p)
        if p.is_main:
            save_checkpoint({
                "model": model_state,
                "optimizer": optim_state,
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(),
                "rng": rngs,
                "state": {**vars(self.state), "elapsed": elapsed},
                "world_size": p.world_size,
                "config": vars(self.cfg),
            }, self.output_dir)
            if self.on_checkpoint is not None and self.state.step > 0:  # step 0 (Ctrl-C at once): nothing to keep
                self.on_checkpoint()
        self.saved_step = self.state.step
        dist.barrier(p)

    def _load_checkpoint(self) -> None:
        p, ck = self.process, load_checkpoint(self.output_dir)
        if p.mode == "fsdp":
            from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                                 set_optimizer_state_dict)

            opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=False)
            set_model_state_dict(self.wrapped, ck["model"], options=opts)
            set_optimizer_state_dict(self.wrapped, self.optimizer, ck["optimizer"], options=opts)
        else:
            dist.unwrap(self.wrapped).load_state_dict(ck["model"])
            self.optimizer.load_state_dict(ck["optimizer"])
        self.scheduler.load_state_dict(ck["scheduler"])
        self.scaler.load_state_dict(ck["scaler"])
        for k, v in ck["state"].items():
            setattr(self.state, k, v)
        self.saved_step = self.state.step
        rngs = ck["rng"]
        # Same world size: each process gets its own RNG back; otherwise rank 0's, offset by rank.
        if len(rngs) == p.world_size:
            set_rng_state(rngs[p.rank])
        else:
            set_rng_state(rngs[0])
            torch.manual_seed(_seed(self.cfg.seed, self.state.step, p.rank))
