"""Data-parallel training over several processes: torchrun's environment, the process group, batch shards.

`torchrun --nproc_per_node N -m edgelora.cli train ...` starts N copies of the CLI; each finds its rank in the
environment (`launch_from_env`), joins the process group (`process_group`: NCCL on CUDA, gloo on CPU) and
calls `train_adapter`, which sees the group (`world`), gives each process its shard of every global batch and
lets DistributedDataParallel average the adapter's gradients, so N processes take the steps one would.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from edgelora.errors import EdgeloraError

LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass(frozen=True)
class Launch:
    """This process's place in a multi-process launch (what torchrun exports)."""

    rank: int
    world_size: int
    local_rank: int


def launch_from_env(environ: Mapping[str, str] = os.environ) -> Launch | None:
    """The launch this process belongs to, from torchrun's variables; None when it runs alone (WORLD_SIZE unset or 1)."""
    if "WORLD_SIZE" not in environ:
        return None
    try:
        rank, world_size, local_rank = (int(environ[k]) for k in LAUNCH_VARS)
    except (KeyError, ValueError):
        shown = ", ".join(f"{k}={environ.get(k, '(unset)')}" for k in LAUNCH_VARS)
        raise EdgeloraError(f"multi-process launch variables are incomplete ({shown}); "
                            "start with: torchrun --nproc_per_node N -m edgelora.cli train ...") from None
    if world_size < 1 or not 0 <= rank < world_size or local_rank < 0:
        raise EdgeloraError(f"RANK={rank} does not fit WORLD_SIZE={world_size} (LOCAL_RANK={local_rank}); "
                            "start with: torchrun --nproc_per_node N -m edgelora.cli train ...")
    return None if world_size == 1 else Launch(rank, world_size, local_rank)


@contextlib.contextmanager
def process_group(launch: Launch, device: torch.device) -> Iterator[torch.device]:
    """Join the launch's process group for the block and leave it on exit; yields this process's device.

    CUDA: NCCL, one GPU per process (`cuda:LOCAL_RANK`). CPU: gloo. The rendezvous address is torchrun's
    MASTER_ADDR / MASTER_PORT.
    """
    if device.type == "cuda":
        visible = torch.cuda.device_count()
        if launch.local_rank >= visible:
            raise EdgeloraError(f"LOCAL_RANK={launch.local_rank} but {visible} CUDA GPU(s) are visible; "
                                f"use --nproc_per_node {visible} or fewer, or device='cpu'")
        device = torch.device("cuda", launch.local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend, rank=launch.rank, world_size=launch.world_size)
    try:
        yield device
    finally:
        dist.destroy_process_group()


def world() -> tuple[int, int]:
    """(rank, number of processes) of the initialised default process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def on_rank0(check: Callable[[], None]) -> None:
    """Run `check` on rank 0 alone and raise its EdgeloraError on every process.

    For checks that create and remove probe files and directories (`atomic.check_writable`): run by every
    process at once, one could remove a directory another is probing.
    """
    rank, world_size = world()
    if world_size == 1:
        check()
        return
    message = None
    if rank == 0:
        try:
            check()
        except EdgeloraError as exc:
            message = str(exc)
    message = broadcast(message)
    if message is not None:
        raise EdgeloraError(message)


def shard(batch: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    """This process's rows of one global batch: contiguous slices whose sizes differ by at most one.

    Like `DistributedSampler`, every process sees a disjoint part of each epoch; unlike it, the global batch
    is the one a single process would draw, and no example is repeated to even out the shards.
    """
    return np.array_split(batch, world_size)[rank]


def broadcast(value: Any) -> Any:
    """Rank 0's `value` on every process (a picklable object)."""
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(value: Any) -> list[Any]:
    """Every process's `value`, in rank order, on every process (a picklable object)."""
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def all_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of `tensor` over the processes (a new tensor; `tensor` is left as it was)."""
    total = tensor.detach().clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total
