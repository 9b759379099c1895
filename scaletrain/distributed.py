"""Process-group setup: torchrun's environment, or a one-process group for plain `python`.

A one-process group keeps a single code path — the device mesh, DTensor and checkpoint
code run the same way for 1 or 1,000 ranks.

Elastic restarts. torchrun (c10d or standalone rendezvous, torch >= 2.5) hands its workers
one TCPStore that its agent created at the first rendezvous and keeps for every restart
(TORCHELASTIC_USE_AGENT_STORE=True, the same MASTER_PORT on every attempt), and
`init_process_group("env://")` puts no per-attempt prefix on the keys. The dead group's
keys therefore survive: gloo's connectFullMesh reads each peer's address from
`default_pg/0//cpu//0/<rank>`, and a restarted rank that gets there before its peer
re-published reads the killed process's address — "Connection refused", or a connect that
waits for a peer that never comes. On one node the agent's restart count is the attempt
number every worker agrees on, so we prefix the keys with it (`_elastic_store`). Across
nodes torchrun's count is per agent and can differ (pytorch/pytorch#135712), so there we
rely on torchrun getting TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (c10d rendezvous only: rank 0
then hosts a fresh store per attempt; `scaletrain launch torchrun` sets it) and warn otherwise.
"""

from __future__ import annotations

import contextlib
import gc
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, NoReturn

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


def _elastic_store(world_size: int, timeout: timedelta) -> dist.Store | None:
    """torchrun's shared store with this restart's key prefix; None where env:// is already right."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None  # not torchrun, or a store that lives for one attempt only
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    num_agents = int(os.environ.get("GROUP_WORLD_SIZE", "1"))
    if num_agents != 1:
        # Restart counts are per agent and may disagree between nodes: a prefix could split
        # the group, so leave the keys alone and say how to avoid stale ones.
        if int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) > 0 and os.environ.get("RANK") == "0":
            print(
                f"scaletrain: warning: torchrun shares one TCPStore across restarts on {num_agents} nodes; a "
                "restarted group may read the dead group's addresses and fail to connect. With the c10d "
                "rendezvous set TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 for torchrun on every node (scaletrain "
                "launch torchrun does); the static one (--node-rank) always shares its store.",
                file=sys.stderr,
                flush=True,
            )
        return None
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size, is_master=False, timeout=timeout
    )
    return dist.PrefixStore(f"scaletrain/attempt-{attempt}", store)


def training_device_type() -> str:
    """The device type a run trains on: CUDA whenever it is present, else the CPU (recipes resolve attention
    and kernel choices for it before the process group exists)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def init_distributed(backend: str = "auto", timeout_s: int = 600) -> DistInfo:
    rank = int(os.environ.get("RANK", "0"))
    world_size = world_size_from_env()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if training_device_type() == "cuda":
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
            store = _elastic_store(world_size, timeout)
            dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout)
        else:
            if world_size != 1:
                raise RuntimeError("WORLD_SIZE > 1 but no MASTER_ADDR: launch with torchrun")
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    return DistInfo(rank, world_size, local_rank, device)


def destroy_distributed(wait_for_peers: bool = True) -> None:
    """Tear down in a safe order: no rank leaves while others still talk to it, and gloo's
    worker threads drop their tensors while the interpreter is fully alive (otherwise exit
    can abort with "terminate called without an active exception").

    A rank leaving on an error passes wait_for_peers=False: its peers may be blocked in a
    collective it will never join, so a barrier would hang it (and hide its error) until
    the process-group timeout; the launcher stops the others once it exits."""
    if dist.is_initialized():
        gc.collect()
        if wait_for_peers:
            with contextlib.suppress(RuntimeError):
                dist.barrier()
        dist.destroy_process_group()
        gc.collect()


def exit_without_finalization(code: int) -> NoReturn:
    """Leave without running interpreter finalization.

    gloo's worker threads can still hold tensors when Python tears down its modules, and
    releasing them then aborts the process ("terminate called without an active exception")
    even though the work finished and every file is written. Callers have closed their
    outputs by now, so skip the teardown.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run_as_worker(main: Callable[[], Any]) -> NoReturn:
    """Entry point of a module torchrun starts (`python -m scaletrain.train`, `scaletrain.cli`, ...):
    run `main` and exit with its status, skipping finalization (see exit_without_finalization).
    Library calls of the same `main` return normally. An exception other than SystemExit
    propagates, so its traceback prints as usual."""
    try:
        result = main()
    except SystemExit as exc:
        result = exc.code
    exit_without_finalization(result if isinstance(result, int) else (0 if result is None else 1))
