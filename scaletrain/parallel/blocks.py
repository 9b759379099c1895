"""The steps every recipe's plan ends with, after its model-specific ones (tensor, context, expert parallel).

Activation checkpointing, then torch.compile, then FSDP2 / HSDP / DDP, each applied per repeated block: a
recipe names its blocks once and gets the core's order (scaletrain/parallel/__init__.py says why that order).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from scaletrain.config import JobConfig
from scaletrain.parallel.activation_checkpoint import apply_activation_checkpointing
from scaletrain.parallel.compile import apply_compile
from scaletrain.parallel.data_parallel import apply_data_parallel
from scaletrain.parallel.dims import ParallelDims


def checkpoint_compile_and_shard(
    model: nn.Module,
    blocks: Sequence[nn.Module],
    dims: ParallelDims,
    cfg: JobConfig,
    *,
    extra_units: Sequence[nn.Module] = (),
    experts: Sequence[nn.Module] = (),
    find_unused_parameters: bool = False,
) -> nn.Module:
    """Checkpoint and compile each of `blocks`, then make each of them (and `extra_units`: larger modules that
    are FSDP units without being checkpointed, such as a tower called on its own) a data-parallel unit.
    `experts` and `find_unused_parameters` go to apply_data_parallel. Returns the model for chaining."""
    apply_activation_checkpointing(blocks, cfg.activation_checkpoint)
    if cfg.train.compile:
        apply_compile(blocks)
    apply_data_parallel(model, [*blocks, *extra_units], dims, cfg.train, cfg.parallel, experts=experts,
                        find_unused_parameters=find_unused_parameters)  # fmt: skip
    return model
