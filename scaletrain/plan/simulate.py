"""Activations and temporaries of a layout's training step, from running the step on fake tensors.

The recipe's parallelized model (shards.py: the real tensor-parallel, context-parallel and FSDP2 placements,
under a fake process group) is materialized as FakeTensors, which carry shapes, dtypes and devices but no
data, and the trainer's own micro step (scaletrain.train.micro_step: loss-parallel context, autocast, loss,
backward through the native engine, FSDP2's all-gathers and reduce-scatters) runs a step's micro-batches
under the tracker that the trainer's `metrics.step_memory` uses (scaletrain/metrics/step_memory.py). What the
simulation sees is what the real step allocates: saved activations per the activation-checkpointing mode,
their recomputation, the logits and loss, FSDP2's unsharded parameters and gradient buffers; the numbers are
exact up to what the fake kernels cannot know (CPU kernels' internal scratch, torch.compile's fusions).

The step is simulated twice and the second measured: lazily built state exists by then. (The trainer measures
its third step, the first steady one under DDP, which the simulation replaces: see _without_replicas.)
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from scaletrain.config.schema import JobConfig
from scaletrain.engines.native import NativeEngine
from scaletrain.metrics.step_memory import StepMemoryTracker
from scaletrain.parallel.batching import grad_accum_steps, micro_batch_size
from scaletrain.parallel.dims import ParallelDims, implied_world_size
from scaletrain.plan.shards import parallelized_parts
from scaletrain.registry import get_recipe
from scaletrain.train import example_batch, local_batch, loss_context_for, micro_step

CPU = torch.device("cpu")


def _without_replicas(cfg: JobConfig, dims: ParallelDims) -> tuple[JobConfig, ParallelDims]:
    """The same rank's step without DDP: DDP's reducer needs real storage, and it changes no activation (its
    gradients are views into its all-reduce buckets, model state). Each rank keeps its micro-batches."""
    from scaletrain.validate import validate_config

    replicas = dims.dp_replicate
    cfg = replace(cfg, parallel=replace(cfg.parallel, dp_replicate=1),
                  train=replace(cfg.train, global_batch_size=cfg.train.global_batch_size // replicas))  # fmt: skip
    return cfg, validate_config(cfg, dims.world_size // replicas)


def activation_peak_bytes(cfg: JobConfig, dims: ParallelDims) -> int:
    """Peak bytes of activations and temporaries above the model state on the first rank of a non-pipelined
    layout, over one step's forward and backward (its parameter gradients left out: they are model state)."""
    if dims.pp_enabled:
        raise NotImplementedError("the step simulation does not run pipeline schedules yet")
    if cfg.engine.name != "native":
        raise NotImplementedError(f"engine.name: {cfg.engine.name!r} is not simulated; the native engine is")
    recipe = get_recipe(cfg.recipe)
    if recipe.step.phases is not None:
        raise NotImplementedError(f"recipe {cfg.recipe!r} trains in phases; the simulation runs one-loss steps")
    if dims.ddp_enabled:
        cfg, dims = _without_replicas(cfg, dims)
    accum = grad_accum_steps(cfg, dims)
    with parallelized_parts(cfg, dims) as (model,), FakeTensorMode(allow_non_fake_inputs=True):
        model.to_empty(device=CPU)
        model.train()
        engine = NativeEngine(model, cfg, dims, CPU)
        shapes = example_batch(recipe, cfg, None, micro_batch_size(cfg, dims))
        batch = local_batch({k: torch.zeros(v.shape, dtype=v.dtype) for k, v in shapes.items()}, CPU, dims, recipe)
        loss_context = loss_context_for(cfg, dims)
        for _ in range(2):
            engine.optimizer.zero_grad(set_to_none=True)
            with StepMemoryTracker() as tracker:
                for index in range(accum):
                    micro_step(engine, recipe, loss_context, batch, index == accum - 1, accum)
                peak = tracker.split_peak([p.grad for p in model.parameters() if p.grad is not None])
    return peak


def predict_activation_peak(cfg: JobConfig) -> int:
    """activation_peak_bytes of the layout `cfg.parallel` names."""
    from scaletrain.validate import validate_config

    return activation_peak_bytes(cfg, validate_config(cfg, implied_world_size(vars(cfg.parallel))))
