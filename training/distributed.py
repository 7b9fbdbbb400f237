"""Data parallelism for the trainers, without a wrapper: every rank holds the whole model, takes
its slice of one global batch, normalizes its loss by the *global* token count, and the
gradients are summed across ranks before the (identical) optimizer step — so the update equals
the single-process update on the global batch, up to float summation order.

Launch with ``torchrun --nproc_per_node N -m aot.cli train-defender --no-prefect ...``;
``init_from_env`` starts the process group (NCCL on GPUs, gloo on CPUs) when torchrun set
WORLD_SIZE > 1. Without it every helper is the identity.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def init_from_env() -> None:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend="nccl" if cuda else "gloo")


def rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    return rank_world()[0] == 0


def all_sum(value: float | int | torch.Tensor) -> float:
    """Sum of a scalar over ranks (the value itself in one process)."""
    if rank_world()[1] == 1:
        return float(value)
    t = torch.tensor(float(value), dtype=torch.float64, device=_device())
    dist.all_reduce(t)
    return float(t)


def any_rank(flag: bool) -> bool:
    return all_sum(1.0 if flag else 0.0) > 0


def sum_gradients(params) -> None:
    if rank_world()[1] == 1:
        return
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad)


def barrier() -> None:
    if rank_world()[1] > 1:
        dist.barrier()


def _device() -> str:
    return f"cuda:{torch.cuda.current_device()}" if dist.get_backend() == "nccl" else "cpu"
