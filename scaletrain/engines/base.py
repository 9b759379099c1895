"""The interface between the train loop and whatever owns the optimizer step.

Per optimizer step the trainer runs, for each micro-batch,

    with engine.micro_batch(last=...):        # gradients are reduced across ranks on the last one only
        with engine.autocast():
            output = engine.model(*inputs)
        engine.backward(loss(output))

and after the last one `engine.step(step)`, which clips, sets the LR for that step, updates and clears
the gradients.
Checkpoints hold `engine.checkpoint_state(...)` through the core's checkpointer: one format for every engine.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import torch
from torch import nn

if TYPE_CHECKING:
    from scaletrain.checkpoint.store import CheckpointState
    from scaletrain.config.schema import JobConfig
    from scaletrain.parallel.dims import ParallelDims


class Engine(Protocol):
    name: str
    description: str  # for the start-up line, e.g. "dp_shard=2 x tp=2" or "deepspeed ZeRO-3"
    model: nn.Module  # what the forward runs (the library's wrapper where it has one)
    optimizer: torch.optim.Optimizer

    def autocast(self) -> AbstractContextManager: ...

    def micro_batch(self, last: bool) -> AbstractContextManager: ...

    def backward(self, loss: torch.Tensor) -> None: ...

    def step(self, step: int) -> tuple[float, float]:
        """Clip, set the LR of optimizer step `step` (0-based), update, zero the gradients.
        Returns (gradient norm before clipping, LR). The native engine also takes `trains=CHILD`: one phase
        of a recipe with several networks (scaletrain.registry.Phase), which updates that child only."""
        ...

    def checkpoint_state(self, with_optimizer: bool) -> CheckpointState:
        """Model (+ optimizer) state under full names: native and engine checkpoints share one format."""
        ...

    def state_dict(self) -> dict:
        """What else the engine must restore on resume (e.g. a loss scaler); JSON-serializable."""
        ...

    def load_state_dict(self, state: dict) -> None: ...


def autocast_to(device_type: str, dtype: torch.dtype | None) -> AbstractContextManager:
    """torch.autocast to `dtype`, or nothing for fp32 (dtype None)."""
    return contextlib.nullcontext() if dtype is None else torch.autocast(device_type, dtype=dtype)


@dataclass(frozen=True)
class DataParallelCost:
    """What an engine that owns data parallelism holds and moves per rank in one optimizer step, for
    `scaletrain plan` (scaletrain/plan/step_time.py, ranks.py). Bytes on the wire are per rank, with the ring's
    (n-1)/n already applied; `*_calls` count ring passes (an all-reduce is two)."""

    parameter_bytes: int
    gradient_bytes: int
    optimizer_bytes: int  # moments, and fp32 master weights where the engine keeps them
    buffer_bytes: int  # the engine's own (communication buckets)
    overlapped_bytes: int  # prefetched parameter gathers and in-backward reductions, hidden behind compute
    overlapped_calls: int
    exposed_bytes: int  # what the step waits for (a boundary reduction, the gather after the update)
    exposed_calls: int


@dataclass(frozen=True)
class EngineSpec:
    name: str
    # (job config, resolved dims) -> None; raises ValueError naming the field, before any process group.
    validate: Callable[[JobConfig, ParallelDims], None]
    # (parallelized + initialized model, job config, dims, device) -> Engine
    build: Callable[[nn.Module, JobConfig, ParallelDims, torch.device], Engine]
    # The engine replicates/shards over the data axis itself: recipes' parallelize applies no FSDP/DDP.
    owns_data_parallel: bool = False
    # The engine builds the tensor-parallel model itself (megatron's parallel layers): the trainer hands it the
    # recipe's initialized model whole, and the recipe's parallelize is not applied.
    owns_model_parallel: bool = False
    # (job config, dims) -> lines `scaletrain config show` prints, e.g. the library's own resolved config.
    show: Callable[[JobConfig, ParallelDims], list[str]] | None = None
    # Named settings `scaletrain bench --engines NAME:PRESET` runs (e.g. deepspeed:zero3-offload), as overrides.
    presets: dict[str, list[str]] = field(default_factory=dict)
    # (job config, dims, parameters, trainable parameters) -> its data parallelism's memory and traffic per rank,
    # for engines that own data parallelism and that `scaletrain plan` can search (None: not planned).
    plan_cost: Callable[[JobConfig, ParallelDims, int, int], DataParallelCost] | None = None
