"""Per-rank parameter shards of a layout, from the recipe's own parallelize under a fake process group.

torch's "fake" backend (torch.testing._internal.distributed.fake_pg, as torchtitan's memory estimator uses)
accepts every collective and moves no data, so a DeviceMesh of any size exists in one process. The model is
built on the meta device, split into this rank's pipeline stages the way the trainer splits it, and handed
to the recipe's parallelize: tensor-parallel and FSDP2 placements are then the real ones, and each
parameter's local shard is what that rank would hold.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor
from torch.utils._pytree import tree_leaves

from scaletrain.config.schema import JobConfig
from scaletrain.parallel.batching import micro_batch_size, pipeline_microbatches
from scaletrain.parallel.dims import ParallelDims
from scaletrain.parallel.pipeline import build_stage_module, num_stages, split_layers, stage_ids_for_rank
from scaletrain.registry import get_recipe
from scaletrain.train import example_batch


@dataclass(frozen=True)
class RankShards:
    """What one rank holds: its parameters' local element counts (trainable and frozen) and buffers' bytes."""

    trainable: int  # elements of parameters with requires_grad (they get gradients and optimizer states)
    frozen: int
    buffer_bytes: int
    # Pipeline stages' receive buffers (torch's PipelineStage keeps one per microbatch: the activation from
    # the previous stage, and the gradient from the next), in elements.
    pipeline_buffer_elements: int = 0

    @property
    def parameters(self) -> int:
        return self.trainable + self.frozen


@contextlib.contextmanager
def fake_world(world_size: int, rank: int = 0) -> Iterator[None]:
    """A default process group of `world_size` fake ranks, as `rank`; the previous state restored after."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("scaletrain plan builds fake process groups; run it outside torchrun")
    dist.init_process_group("fake", rank=rank, world_size=world_size, store=FakeStore())
    try:
        yield
    finally:
        dist.destroy_process_group()
        _forget_dtensor_plans()


def _forget_dtensor_plans() -> None:
    """DTensor caches its sharding decisions by mesh shape, and those name the groups of the mesh they were made
    on: after a fake world ends, the next (equal-looking mesh, new groups) must not reuse them."""
    from torch.distributed.tensor import debug

    clear = getattr(debug, "_clear_sharding_prop_cache", None)  # private; present in torch 2.4-2.13
    if clear is not None:
        clear()


def _local_numel(param: torch.Tensor) -> int:
    return param.to_local().numel() if isinstance(param, DTensor) else param.numel()


def _stage_split(model: nn.Module, cfg: JobConfig, dims: ParallelDims) -> tuple[int, list[list[int]]]:
    """(number of stages, the trunk's blocks of each), as the trainer splits them (train.py: _build_model_parts)."""
    spec = get_recipe(cfg.recipe).supports.pipeline
    stages = num_stages(dims.pp, cfg.parallel.stages_per_rank)
    return stages, split_layers(len(getattr(model, spec.trunk)), stages, cfg.parallel.pp_layer_boundaries or None)


def _stage_ids(cfg: JobConfig, dims: ParallelDims, pp_rank: int) -> list[int]:
    return stage_ids_for_rank(pp_rank, dims.pp, cfg.parallel.stages_per_rank, cfg.parallel.pp_schedule)


def _stage_modules(model: nn.Module, cfg: JobConfig, dims: ParallelDims, pp_rank: int) -> list[nn.Module]:
    spec = get_recipe(cfg.recipe).supports.pipeline
    stages, layer_split = _stage_split(model, cfg, dims)
    return [build_stage_module(model, spec, layer_split[sid], sid, stages) for sid in _stage_ids(cfg, dims, pp_rank)]


def _pipeline_buffer_elements(cfg: JobConfig, dims: ParallelDims, pp_rank: int) -> int:
    """Elements of this rank's stage receive buffers: for each pipeline microbatch, a non-first stage holds the
    activation it receives and a non-last stage the gradient of the one it sends; both are the trunk's
    activation, whose size per sample a meta-device forward of the first stage gives."""
    per_sample = trunk_elements_per_sample(cfg, dims)
    stages = num_stages(dims.pp, cfg.parallel.stages_per_rank)
    microbatches = pipeline_microbatches(cfg, dims)
    samples = micro_batch_size(cfg, dims) // microbatches
    buffers = sum((sid > 0) + (sid < stages - 1) for sid in _stage_ids(cfg, dims, pp_rank))
    return buffers * microbatches * samples * per_sample


@contextlib.contextmanager
def parallelized_parts(cfg: JobConfig, dims: ParallelDims, pp_rank: int = 0) -> Iterator[list[nn.Module]]:
    """The meta-device model parts (pipeline stages) of the first rank of pipeline rank `pp_rank`, parallelized by
    the recipe under a fake world of the layout's size, eager (compiling changes no shard and no tensor the
    simulation counts, and costs seconds); valid inside the context."""
    recipe = get_recipe(cfg.recipe)
    if cfg.train.compile:
        cfg = replace(cfg, train=replace(cfg.train, compile=False))
    rank = pp_rank * (dims.world_size // dims.pp)
    with fake_world(dims.world_size, rank), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # FSDP/DTensor warnings about meta tensors and fake groups
        dims.build_mesh("cpu")
        try:
            with torch.device("meta"):
                model = recipe.model.build(cfg.model)
            parts = _stage_modules(model, cfg, dims, pp_rank) if dims.pp_enabled else [model]
            yield [recipe.model.parallelize(part, dims, cfg) for part in parts]
        finally:
            dims._mesh, dims._axes, dims._expert_root = None, {}, None  # the fake mesh dies with its group


def trunk_elements_per_sample(cfg: JobConfig, dims: ParallelDims) -> int:
    """Elements of one sample's activation between the trunk's blocks (what pipeline stages pass on and tensor
    parallel gathers), from a meta-device forward of the first stage."""
    recipe = get_recipe(cfg.recipe)
    with torch.device("meta"):
        model = recipe.model.build(cfg.model)
    stages, layer_split = _stage_split(model, cfg, dims)
    first = build_stage_module(model, recipe.supports.pipeline, layer_split[0], 0, stages)
    output = first(*recipe.step.model_inputs(example_batch(recipe, cfg, None, 1)))
    # Some stages pass several tensors on (DiT: the tokens and the conditioning vector).
    return sum(t.numel() for t in tree_leaves(output) if isinstance(t, torch.Tensor))


def rank_shards(cfg: JobConfig, dims: ParallelDims, pp_rank: int = 0) -> RankShards:
    """The shards of the first rank of pipeline rank `pp_rank` (every rank of a stage holds the same amount,
    up to FSDP's rounding)."""
    with parallelized_parts(cfg, dims, pp_rank) as parts:
        return count_shards(parts, cfg, dims, pp_rank)


def count_shards(parts: list[nn.Module], cfg: JobConfig, dims: ParallelDims, pp_rank: int) -> RankShards:
    """What the parallelized (still meta) parts of pipeline rank `pp_rank` hold locally."""
    trainable = frozen = buffer_bytes = 0
    for part in parts:
        for param in part.parameters():
            if param.requires_grad:
                trainable += _local_numel(param)
            else:
                frozen += _local_numel(param)
        buffer_bytes += sum(_local_numel(b) * b.element_size() for b in part.buffers())
    pipeline = _pipeline_buffer_elements(cfg, dims, pp_rank) if dims.pp_enabled else 0
    return RankShards(trainable, frozen, buffer_bytes, pipeline)
