"""Process-group setup: torchrun's environment, or a one-process group for plain `python`.

A one-process group keeps a single code path — the device mesh, DTensor and checkpoint
code run the same way for 1 or 1,000 ranks.
"""

from __future__ import annotations

import contextlib
import gc
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(backend: str = "auto", timeout_s: int = 600) -> DistInfo:
    rank = int(os.environ.get("RANK", "0"))
    world_size = world_size_from_env()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if backend == "auto":
        # gloo beside nccl so CPU-side collectives (checkpoint planning, objects) work on GPUs too.
        backend = "cuda:nccl,cpu:gloo" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        timeout = timedelta(seconds=timeout_s)
        if "MASTER_ADDR" in os.environ:
            dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timeout)
        else:
            if world_size != 1:
                raise RuntimeError("WORLD_SIZE > 1 but no MASTER_ADDR: launch with torchrun")
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    return DistInfo(rank, world_size, local_rank, device)


def destroy_distributed() -> None:
    """Tear down in a safe order: no rank leaves while others still talk to it, and gloo's
    worker threads drop their tensors while the interpreter is fully alive (otherwise exit
    can abort with "terminate called without an active exception")."""
    if dist.is_initialized():
        gc.collect()
        with contextlib.suppress(RuntimeError):
            dist.barrier()
        dist.destroy_process_group()
        gc.collect()
