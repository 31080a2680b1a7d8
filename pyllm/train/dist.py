"""Distributed training helpers: process group setup, DDP/FSDP wrapping, reductions.

A run launched by ``torchrun --nproc_per_node N`` (or any launcher that sets
RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT) trains data-parallel: each
process takes its slice of every global batch and gradients are averaged.
Backend: NCCL on CUDA, gloo on CPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    """This process's place in the run: its rank among ``world_size`` processes and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    mode: str = "none"  # none / ddp / fsdp
    owns_group: bool = False  # we created the process group, so we destroy it
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device={name!r} was asked for but CUDA is not available on this machine")
    return dev


def setup(mode: str, device: torch.device) -> DistInfo:
    """Join (or create) the process group when the environment says we are one of many; under
    CUDA each process takes the GPU of its local rank."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if mode == "none" or world == 1 and not dist.is_initialized():
        return DistInfo(device=device)
    if mode == "auto":
        mode = "ddp"
    owns = False
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
        owns = True
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, mode, owns, device)


def wrap(model: torch.nn.Module, info: DistInfo) -> torch.nn.Module:
    if info.mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(model, device_ids=[info.device.index] if info.device.type == "cuda" else None)
    if info.mode == "fsdp":
        # FSDP2: shard every Transformer block, then the root (embeddings, head).
        from torch.distributed.fsdp import fully_shard

        blocks = [m for m in model.modules() if type(m).__name__.endswith(("Block", "Layer")) and m is not model]
        for m in blocks:
            fully_shard(m)
        fully_shard(model)
        return model
    return model


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def all_mean(values: list[float], info: DistInfo) -> list[float]:
    """The mean of each value over the processes (identity when not distributed)."""
    if info.world_size == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return (t / info.world_size).tolist()


def all_sum(values: list[float], info: DistInfo) -> list[float]:
    if info.world_size == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def gather_objects(obj, info: DistInfo) -> list:
    if info.world_size == 1:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(info: DistInfo) -> None:
    if info.world_size > 1:
        dist.barrier()


def teardown(info: DistInfo) -> None:
    if info.owns_group and dist.is_initialized():
        dist.destroy_process_group()
