"""How the global batch splits: over data-parallel ranks, accumulation steps and pipeline microbatches."""

from __future__ import annotations

from scaletrain.config.schema import JobConfig
from scaletrain.parallel.dims import ParallelDims


def micro_batch_size(cfg: JobConfig, dims: ParallelDims) -> int:
    return cfg.train.micro_batch_size or cfg.train.global_batch_size // dims.dp_size


def grad_accum_steps(cfg: JobConfig, dims: ParallelDims) -> int:
    return cfg.train.global_batch_size // (dims.dp_size * micro_batch_size(cfg, dims))


def pipeline_microbatches(cfg: JobConfig, dims: ParallelDims) -> int:
    return cfg.parallel.microbatches or dims.pp
