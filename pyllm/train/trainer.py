"""The training core shared by pretraining and every fine-tuning task.

One loop: deterministic global batches -> micro-batches (gradient accumulation)
-> each process's slice (data parallel) -> forward under autocast -> backward
-> unscale, clip, AdamW step, schedule. Around it: evaluation and early
stopping, a tqdm bar, a JSONL metrics log and loss curve, atomic checkpoints
that resume exactly, a clear stop on a NaN/inf loss, and a save on Ctrl-C.

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
    step: int = 0  # optimizer steps done
    epoch: int = 0
    batch: int = 0  # next batch index within the epoch
    tokens: int = 0  # real (non-padding) tokens trained on, all processes
    best: Optional[float] = None
    bad_evals: int = 0
    elapsed: float = 0.0  # seconds of training before this process (resumed runs)


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
        self.eval_features = eval_features
        self.evaluate_fn = evaluate
        self.monitor = monitor
        self.save_model = save_model
        self.description = description
        self.on_checkpoint = on_checkpoint
        self._model_saved = False

    # -- public -------------------------------------------------------------------

    def train(self) -> TrainResult:
        info, device = dist.setup(self.cfg.distributed, dist.resolve_device(self.cfg.device))
        try:
            return self._train(info, device)
        finally:
            dist.teardown(info)

    # -- setup ----------------------------------------------------------------------

    def _geometry(self, info) -> tuple[int, int, int, int]:
        cfg = self.cfg
        G, A, W = cfg.batch_size, cfg.gradient_accumulation_steps, info.world_size
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

    def _autocast(self, device):
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.cfg.precision)
        if dtype is None:
            return contextlib.nullcontext
        return lambda: torch.autocast(device_type=device.type, dtype=dtype)

    # -- the loop -------------------------------------------------------------------

    def _train(self, info, device) -> TrainResult:
        cfg = self.cfg
        micro, local, steps_per_epoch, total = self._geometry(info)
        model = self.model.to(device)
        if cfg.gradient_checkpointing:
            if not hasattr(type(model), "gradient_checkpointing") and not hasattr(model, "gradient_checkpointing"):
                raise ValueError(f"Trainer: {type(model).__name__} has no gradient_checkpointing flag")
            model.gradient_checkpointing = True
        model.train()
        wrapped = dist.wrap(model, info, device)
        optimizer = build_optimizer(wrapped, cfg)
        scheduler = build_scheduler(optimizer, cfg, total)
        scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
        autocast = self._autocast(device)
        state = _State()
        if info.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        log = MetricsLog(self.output_dir / "metrics.jsonl", enabled=info.is_main)
        if cfg.resume:
            self._restore(load_checkpoint(self.output_dir), wrapped, optimizer, scheduler, scaler, state, info)
            log.truncate_after(state.step)
        dist.barrier(info)

        bar = None
        if cfg.progress and info.is_main:
            from tqdm.auto import tqdm

            bar = tqdm(total=total, initial=state.step, desc=self.description, unit="step", dynamic_ncols=True)
        t_start = time.perf_counter() - state.elapsed  # elapsed counts all sessions of the run
        self._session_start = time.perf_counter()  # max_time counts this one
        window = {"loss": 0.0, "steps": 0, "tokens": 0, "t": time.perf_counter()}
        stopped, last_eval = "completed", {}
        ctx = dict(wrapped=wrapped, optimizer=optimizer, scheduler=scheduler, scaler=scaler, state=state,
                   info=info, log=log, device=device, autocast=autocast)
        try:
            while state.step < total and stopped == "completed":
                order = epoch_order(len(self.train_features), cfg.seed, state.epoch)
                while state.batch < steps_per_epoch and state.step < total:
                    idx = order[state.batch * cfg.batch_size : (state.batch + 1) * cfg.batch_size].tolist()
                    loss, tokens, grad_norm, over_time = self._step(idx, micro, local, t_start, **ctx)
                    state.step += 1
                    state.batch += 1
                    state.tokens += tokens
                    window["loss"] += loss
                    window["steps"] += 1
                    window["tokens"] += tokens
                    if bar is not None:
                        bar.update(1)
                    if state.step % cfg.log_every == 0 or state.step == total:
                        rec = self._log_window(window, state, scheduler, grad_norm, t_start, device)
                        log.write(rec)
                        if bar is not None:
                            bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{rec['lr']:.2e}",
                                            tok_s=f"{rec['tokens_per_s']:.0f}")
                    end_of_epoch = state.batch >= steps_per_epoch
                    due = (cfg.eval_every and state.step % cfg.eval_every == 0) or (
                        cfg.eval_every is None and end_of_epoch)
                    if due and state.step < total:
                        last_eval = self._evaluate(ctx, state)
                        if self._should_stop_early(last_eval, state, model, wrapped, info):
                            stopped = "early_stopping"
                    if cfg.save_every and state.step % cfg.save_every == 0:
                        self._save(ctx, elapsed=time.perf_counter() - t_start)
                    if over_time and stopped == "completed":
                        stopped = "time_limit"
                    if stopped != "completed":
                        break
                if state.batch >= steps_per_epoch:
                    state.epoch += 1
                    state.batch = 0
        except KeyboardInterrupt:
            # Save what we have (the last completed step), then let the caller see the interrupt.
            if bar is not None:
                bar.close()
            self._save_model(model, wrapped, info)
            self._save(ctx, elapsed=time.perf_counter() - t_start)
            if info.is_main:
                log.write({"step": state.step, "event": "interrupted"})
                self._plot(log)
            raise
        if bar is not None:
            bar.close()
        if window["steps"]:  # stopped early (time limit, early stopping): log the partial window
            log.write(self._log_window(window, state, scheduler, grad_norm, t_start, device))
        elapsed = time.perf_counter() - t_start
        if self.evaluate_fn is not None and self.eval_features and stopped != "early_stopping":
            last_eval = self._evaluate(ctx, state)
            self._should_stop_early(last_eval, state, model, wrapped, info)  # updates the best model
        if not (cfg.early_stopping_patience and state.best is not None):
            self._save_model(model, wrapped, info)
        self._save(ctx, elapsed=elapsed)
        metrics = {
            "steps": state.step,
            "epochs": round(state.epoch + state.batch / steps_per_epoch, 4),
            "tokens": state.tokens,
            "train_seconds": round(elapsed, 3),
            "tokens_per_s": round(state.tokens / max(elapsed, 1e-9), 1),
            "peak_memory_mb": round(max(dist.all_mean([peak_memory_mb(device)], info)[0], 0.0), 1),
            "stopped": stopped,
        }
        train_losses = [r["loss"] for r in log.read() if "loss" in r] if info.is_main else []
        if train_losses:
            metrics["train_loss"] = train_losses[-1]
        metrics.update({f"eval_{k}": v for k, v in last_eval.items()})
        if state.best is not None:
            metrics[f"best_eval_{self.monitor[0]}"] = state.best
        if info.is_main:
            log.write({"step": state.step, "event": "end", **metrics})
            self._plot(log)
        return TrainResult(self.output_dir, metrics, log.read() if info.is_main else [], stopped, state.step)

    def _step(self, idx, micro, local, t_start, *, wrapped, optimizer, scheduler, scaler, state, info, log,
              device, autocast):
        """One optimizer step over the global batch ``idx``; returns (mean loss, tokens, grad norm, over time)."""
        cfg = self.cfg
        A = cfg.gradient_accumulation_steps
        optimizer.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), device=device, dtype=torch.float64)
        tokens = 0
        for a in range(A):
            mine = idx[a * micro : (a + 1) * micro][info.rank * local : (info.rank + 1) * local]
            gen = torch.Generator().manual_seed(_seed(cfg.seed, state.epoch, state.batch, a, info.rank))
            batch = self.collator([self.train_features[i] for i in mine], gen)
            tokens += int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            last = a == A - 1
            if info.mode == "ddp" and not last:
                sync = wrapped.no_sync()  # accumulate locally; all-reduce once on the last micro-batch
            else:
                sync = contextlib.nullcontext()
                if info.mode == "fsdp" and A > 1:
                    wrapped.set_requires_gradient_sync(last)
            with sync:
                with autocast():
                    loss = wrapped(**batch).loss / A
                scaler.scale(loss).backward()
            loss_sum += loss.detach().double()
        over = cfg.max_time is not None and time.perf_counter() - self._session_start > cfg.max_time
        # One all-reduce: loss (mean over processes), tokens (sum), time-up vote (rank 0 decides).
        loss_total, tokens, over_votes = dist.all_sum(
            [float(loss_sum), float(tokens), float(over and info.is_main)], info)
        loss_mean = loss_total / info.world_size
        if not math.isfinite(loss_mean):
            self._non_finite(loss_mean, state, log, info)
        scaler.unscale_(optimizer)
        params = [p for g in optimizer.param_groups for p in g["params"]]
        if cfg.max_grad_norm:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm))
        else:
            grad_norm = float(torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None]))
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        return loss_mean, int(tokens), grad_norm, over_votes > 0

    def _non_finite(self, value, state, log, info):
        path = self.output_dir / CHECKPOINT
        if path.exists():
            ck = load_checkpoint(self.output_dir)
            where = f"the last good checkpoint is kept: {path} (step {ck['state']['step']}); " \
                    f"resume from it with resume=True (--resume) after lowering the learning rate"
        else:
            where = "no checkpoint had been written yet (set save_every to keep one)"
        log.write({"step": state.step + 1, "event": "non_finite_loss", "value": value})
        raise NonFiniteLossError(
            f"training loss is {value} at step {state.step + 1} (epoch {state.epoch}); stopped without applying "
            f"that update. {where}. Common causes: a learning rate too high, fp16 overflow (try bf16), bad data."
        )

    def _log_window(self, window, state, scheduler, grad_norm, t_start, device) -> dict:
        now = time.perf_counter()
        rec = {
            "step": state.step,
            "epoch": state.epoch,
            "loss": window["loss"] / window["steps"],
            "lr": scheduler.get_last_lr()[0],
            "grad_norm": grad_norm,
            "tokens_per_s": window["tokens"] / max(now - window["t"], 1e-9),
            "tokens": state.tokens,
            "elapsed_s": round(now - t_start, 3),
            "peak_memory_mb": round(peak_memory_mb(device), 1),
        }
        window.update(loss=0.0, steps=0, tokens=0, t=now)
        return rec

    # -- evaluation and early stopping ----------------------------------------------------

    def _evaluate(self, ctx, state) -> dict:
        if self.evaluate_fn is None or not self.eval_features:
            return {}
        wrapped = ctx["wrapped"]
        wrapped.eval()
        try:
            with torch.no_grad():
                metrics = self.evaluate_fn(
                    wrapped, self.eval_features, batch_size=self.cfg.eval_batch_size or self.cfg.batch_size,
                    device=ctx["device"], autocast=ctx["autocast"],
                )
        finally:
            wrapped.train()
        ctx["log"].write({"step": state.step, "epoch": state.epoch, **{f"eval_{k}": v for k, v in metrics.items()}})
        return metrics

    def _should_stop_early(self, metrics, state, model, wrapped, info) -> bool:
        name, mode = self.monitor
        value = metrics.get(name)
        if value is None or not isinstance(value, (int, float)) or not math.isfinite(value):
            return False
        better = state.best is None or (value < state.best if mode == "min" else value > state.best)
        if better:
            state.best, state.bad_evals = float(value), 0
            if self.cfg.early_stopping_patience:
                self._save_model(model, wrapped, info)  # keep the best model
            return False
        state.bad_evals += 1
        return bool(self.cfg.early_stopping_patience) and state.bad_evals >= self.cfg.early_stopping_patience

    # -- checkpoints ----------------------------------------------------------------------

    def _save_model(self, model, wrapped, info) -> None:
        """Write the model folder (rank 0). Under FSDP the parameters are sharded, so every
        process joins in gathering them and rank 0 saves a plain copy of the model."""
        if self.save_model is None:
            return
        self._check_weights(wrapped, info)
        self._model_saved = True
        if info.mode == "fsdp":
            state = self._model_state(wrapped, info)
            if info.is_main:
                # fully_shard swaps the class for a generated FSDP<Name> subclass; save the original.
                cls = next(c for c in type(model).__mro__ if not c.__name__.startswith("FSDP"))
                plain = cls(model.config)
                plain.load_state_dict(state)
                self.save_model(plain, self.output_dir)
        elif info.is_main:
            self.save_model(dist.unwrap(model), self.output_dir)
        dist.barrier(info)

    def _model_state(self, wrapped, info):
        if info.mode == "fsdp":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            return get_model_state_dict(wrapped, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {k: v.detach().cpu() for k, v in dist.unwrap(wrapped).state_dict().items()}

    def _optim_state(self, wrapped, optimizer, info):
        if info.mode == "fsdp":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            return get_optimizer_state_dict(wrapped, optimizer,
                                            options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return optimizer.state_dict()

    def _check_weights(self, wrapped, info) -> None:
        """Never save weights that are not finite (an update can break them without a NaN loss:
        the last step of a run with a huge learning rate). Every process checks its own copy or shard."""
        params = [getattr(p, "_local_tensor", p) for p in wrapped.parameters()]  # FSDP2: the local shard
        bad = next((n for n, p in zip((n for n, _ in wrapped.named_parameters()), params)
                    if not bool(torch.isfinite(p).all())), None)
        if dist.all_sum([float(bad is not None)], info)[0]:
            raise NonFiniteLossError(f"the weights are not finite after the last update ({bad or 'on another process'}"
                                     "); nothing was saved over the last good checkpoint. Common causes: a learning "
                                     "rate too high, fp16 overflow (try bf16), bad data.")

    def _save(self, ctx, elapsed: float) -> None:
        info, state, wrapped = ctx["info"], ctx["state"], ctx["wrapped"]
        self._check_weights(wrapped, info)
        if not self._model_saved:  # the first checkpoint comes with a loadable model
            self._save_model(dist.unwrap(wrapped), wrapped, info)
        model_state = self._model_state(wrapped, info)  # collective under FSDP: every rank calls it
        optim_state = self._optim_state(wrapped, ctx["optimizer"], info)
        rngs = dist.gather_objects(rng_state(), info)
        if info.is_main:
            save_checkpoint({
                "model": model_state,
                "optimizer": optim_state,
                "scheduler": ctx["scheduler"].state_dict(),
                "scaler": ctx["scaler"].state_dict(),
                "rng": rngs,
                "state": {**vars(state), "elapsed": elapsed},
                "world_size": info.world_size,
                "config": vars(self.cfg),
            }, self.output_dir)
            if self.on_checkpoint is not None and state.step > 0:  # step 0 (Ctrl-C at once): nothing to keep
                self.on_checkpoint()
        dist.barrier(info)

    def _restore(self, ck, wrapped, optimizer, scheduler, scaler, state, info) -> None:
        if info.mode == "fsdp":
            from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                                 set_optimizer_state_dict)

            opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=False)
            set_model_state_dict(wrapped, ck["model"], options=opts)
            set_optimizer_state_dict(wrapped, optimizer, ck["optimizer"], options=opts)
        else:
            dist.unwrap(wrapped).load_state_dict(ck["model"])
            optimizer.load_state_dict(ck["optimizer"])
        scheduler.load_state_dict(ck["scheduler"])
        scaler.load_state_dict(ck["scaler"])
        for k, v in ck["state"].items():
            setattr(state, k, v)
        rngs = ck["rng"]
        # Same world size: each process gets its own RNG back; otherwise rank 0's, offset by rank.
        if len(rngs) == info.world_size:
            set_rng_state(rngs[info.rank])
        else:
            set_rng_state(rngs[0])
            torch.manual_seed(_seed(self.cfg.seed, state.step, info.rank))

    def _plot(self, log) -> None:
        if self.cfg.plot:
            plot_loss_curve(log.read(), self.output_dir / "loss_curve.png", title=self.description)
