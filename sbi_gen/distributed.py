"""Data-parallel training over several processes (``torchrun``), on CPUs (gloo) or GPUs (nccl).

Under ``torchrun --nproc-per-node N`` every process runs the same training: the same initial
weights and standardization (broadcast from rank 0), its own shard of the data, gradients
averaged across processes at every step, and validation losses summed across processes, so
that learning-rate and early-stopping decisions are the same everywhere and the replicas stay
identical. :func:`sbi_gen.train.fit` does all of this by itself when a process group is
initialized or when ``WORLD_SIZE`` > 1; only rank 0 should write files.

Gradients are synchronized by :class:`~torch.nn.parallel.DistributedDataParallel`, which hooks
``forward``; estimators are trained through ``loss(y, c)``, a method, so DDP wraps a
:class:`LossModule` whose ``forward`` is that loss.

Example: the command line trains one model on two processes and writes one checkpoint,

.. code-block:: text

    torchrun --nproc-per-node 2 -m sbi_gen.cli train data/particle.h5 --out models/particle

and a script run by ``torchrun`` does the same with

.. code-block:: python

    npe = NPE()
    npe.fit("data/particle.h5")  # joins the group, trains on its shard
    if distributed.is_main_process():
        save(npe, "models/particle")
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

__all__ = [
    "LossModule",
    "ProcessInfo",
    "all_reduce_min",
    "all_reduce_sum",
    "barrier",
    "broadcast_module",
    "init_from_env",
    "is_distributed",
    "is_main_process",
    "process_info",
    "rank_device",
    "shard",
    "shutdown",
    "wrap_for_training",
]


# Buffers (standardization statistics) are fixed during training: no re-broadcast at every
# forward. Newer torch names the option ``forward_sync_buffers`` and deprecates the old name.
_NO_BUFFER_SYNC = {
    "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
    else "broadcast_buffers": False
}


@dataclass(frozen=True)
class ProcessInfo:
    """This process's place in the group: ``rank`` of ``world_size``, ``local_rank`` on its machine."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value) if value else default
    except ValueError:
        raise RuntimeError(f"the environment variable {name}={value!r} is not an integer") from None


def init_from_env(device: str | torch.device = "cpu") -> bool:
    """Join the process group described by torchrun's environment, if there is one.

    Does nothing (and returns ``False``) when ``WORLD_SIZE`` is unset or 1. Otherwise
    initializes the default group (once) with ``nccl`` for a CUDA ``device`` and ``gloo`` for
    the CPU, binds the process to GPU ``LOCAL_RANK`` when training on CUDA, and returns ``True``.

    Example:
        >>> init_from_env("cpu")  # a plain process: no group
        False
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size() > 1
    if _env_int("WORLD_SIZE", 1) <= 1:
        return False
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    missing = [name for name in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(name)]
    if missing:
        raise RuntimeError(f"WORLD_SIZE > 1 but {', '.join(missing)} is not set; launch with torchrun")
    name = str(device)
    cuda = torch.cuda.is_available() if name == "auto" else torch.device(name).type == "cuda"
    if cuda:
        torch.cuda.set_device(_env_int("LOCAL_RANK", 0))
    dist.init_process_group(backend="nccl" if cuda and dist.is_nccl_available() else "gloo")
    return dist.get_world_size() > 1


def is_distributed() -> bool:
    """Whether this process is one of several in an initialized process group."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def process_info() -> ProcessInfo:
    """Rank, world size and local rank of this process (``ProcessInfo()`` when not distributed)."""
    if not is_distributed():
        return ProcessInfo()
    world = dist.get_world_size()
    return ProcessInfo(
        rank=dist.get_rank(),
        world_size=world,
        local_rank=_env_int("LOCAL_RANK", 0),
        local_world_size=_env_int("LOCAL_WORLD_SIZE", world),
    )


def is_main_process() -> bool:
    """True on rank 0 (and in a plain process): the one that writes checkpoints and prints."""
    return process_info().rank == 0


def rank_device(device: torch.device) -> torch.device:
    """The device of this process: ``cuda`` without an index becomes ``cuda:LOCAL_RANK`` when distributed.

    Example:
        >>> rank_device(torch.device("cpu"))
        device(type='cpu')
    """
    if device.type == "cuda" and device.index is None and is_distributed():
        return torch.device("cuda", process_info().local_rank)
    return device


def shard(items: np.ndarray | Tensor) -> np.ndarray | Tensor:
    """This process's share of ``items``: every ``world_size``-th item from its rank on.

    Example:
        >>> shard(np.arange(5))  # a plain process gets everything
        array([0, 1, 2, 3, 4])
    """
    info = process_info()
    return items[info.rank :: info.world_size]


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """``tensor`` summed over all processes (in place; unchanged in a plain process)."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_min(tensor: Tensor) -> Tensor:
    """Elementwise minimum of ``tensor`` over all processes (in place)."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return tensor


def broadcast_module(module: nn.Module) -> None:
    """Copy rank 0's parameters and buffers (standardization statistics included) to every process."""
    if not is_distributed():
        return
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            dist.broadcast(tensor.data, src=0)


def barrier() -> None:
    """Wait for every process (no-op in a plain process)."""
    if is_distributed():
        dist.barrier()


def shutdown() -> None:
    """Leave the process group after every process got here (no-op in a plain process)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


class LossModule(nn.Module):
    """``forward(y, c) = estimator.loss(y, c)``: the training loss as a module DDP can wrap.

    Example:
        >>> from sbi_gen.estimators import build_estimator
        >>> est = build_estimator("nsf", 1, (1,), transforms=1, hidden_features=[8])
        >>> LossModule(est)(torch.randn(4, 1), torch.randn(4, 1)).shape
        torch.Size([])
    """

    def __init__(self, estimator: nn.Module):
        super().__init__()
        self.estimator = estimator

    def forward(self, y: Tensor, c: Tensor) -> Tensor:
        return self.estimator.loss(y, c)


def wrap_for_training(estimator: nn.Module, device: torch.device) -> nn.Module:
    """The module to call for training steps: :class:`LossModule` of ``estimator``, inside DDP when distributed.

    Call :func:`broadcast_module` first if the processes' weights may differ. Buffers (the
    standardization statistics) are fixed during training, so DDP does not re-broadcast them
    at every step. Keep a reference to the returned module for as long as it trains: the
    averaging hooks live as long as the DDP object.
    """
    loss = LossModule(estimator)
    if not is_distributed():
        return loss
    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(loss, device_ids=device_ids, **_NO_BUFFER_SYNC)
