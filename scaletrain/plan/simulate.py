"""Activations and temporaries of a layout's training step, from running the step on fake tensors.

The recipe's parallelized model (shards.py: the real tensor-parallel, context-parallel and FSDP2 placements,
under a fake process group) is materialized as FakeTensors, which carry shapes, dtypes and devices but no
data, and the trainer's own micro step (scaletrain.train.micro_step: loss-parallel context, autocast, loss,
backward through the native engine, FSDP2's all-gathers and reduce-scatters) runs a step's micro-batches
under the tracker that the trainer's `metrics.step_memory` uses (scaletrain/metrics/step_memory.py). What the
simulation sees is what the real step allocates: saved activations per the activation-checkpointing mode,
their recomputation, the logits and loss, FSDP2's unsharded parameters and gradient buffers; the numbers are
exact up to what the fake kernels cannot know (CPU kernels' internal scratch, torch.compile's fusions).

The trainer measures its third step, the first steady one under DDP (which the simulation replaces: see
_without_replicas); the simulation's first step already counts as the real steady one does.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from scaletrain.config.schema import JobConfig
from scaletrain.engines.native import NativeEngine
from scaletrain.metrics.step_memory import StepMemoryTracker
from scaletrain.parallel.batching import grad_accum_steps, micro_batch_size, pipeline_microbatches
from scaletrain.parallel.dims import ParallelDims, implied_world_size
from scaletrain.parallel.pipeline import build_schedule, num_stages
from scaletrain.plan.shards import RankShards, _stage_ids, count_shards, parallelized_parts
from scaletrain.registry import get_recipe
from scaletrain.train import example_batch, local_batch, loss_context_for, micro_step

CPU = torch.device("cpu")


@contextlib.contextmanager
def _fake_mode() -> Iterator[FakeTensorMode]:
    """A fake-tensor mode with an empty op cache, with Python's cyclic garbage collector paused.

    The op cache is shared by every FakeTensorMode and keyed by tensor metadata: results cached during another
    layout's simulation were seen to change this one's count. The collector: some tensors die only with a
    reference cycle (FSDP2's gathered buffers, frames kept by caught exceptions), and when the collector
    happens to run decided whether they counted at the peak (Llama-3-8B's activations read 68.9, 76.4 or 80.2
    GiB run to run). Paused, they live to the end of the step: the same answer every time, an upper bound."""
    FakeTensorMode.cache_clear()
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            yield mode
    finally:
        if was_enabled:
            gc.enable()


def _as_simulated(cfg: JobConfig, dims: ParallelDims) -> tuple[JobConfig, ParallelDims]:
    """The layout as simulated: eager (compiled regions fuse ops and keep less, never more, in practice) and
    without DDP (_without_replicas)."""
    if cfg.train.compile:
        cfg = replace(cfg, train=replace(cfg.train, compile=False))
    if dims.ddp_enabled:  # the same local shards: DDP replicates
        cfg, dims = _without_replicas(cfg, dims)
    return cfg, dims


def share_pipeline_input(cfg: JobConfig, dims: ParallelDims) -> None:
    """Work out the stages' received activation now, so that simulations forked after this inherit it."""
    if dims.pp_enabled:
        trunk_input(*_as_simulated(cfg, dims))


def _without_replicas(cfg: JobConfig, dims: ParallelDims) -> tuple[JobConfig, ParallelDims]:
    """The same rank's step without DDP: DDP's reducer needs real storage, and it changes no activation (its
    gradients are views into its all-reduce buckets, model state). Each rank keeps its micro-batches."""
    from scaletrain.validate import validate_config

    replicas = dims.dp_replicate
    cfg = replace(cfg, parallel=replace(cfg.parallel, dp_replicate=1),
                  train=replace(cfg.train, global_batch_size=cfg.train.global_batch_size // replicas))  # fmt: skip
    return cfg, validate_config(cfg, dims.world_size // replicas)


def activation_peak_bytes(cfg: JobConfig, dims: ParallelDims, pp_rank: int = 0) -> int:
    """Peak bytes of activations and temporaries above the model state on the first rank of pipeline rank
    `pp_rank`, over one step's forward and backward (its parameter gradients left out: they are model state)."""
    return simulate_rank(cfg, dims, pp_rank)[1]


def simulate_rank(cfg: JobConfig, dims: ParallelDims, pp_rank: int = 0) -> tuple[RankShards, int]:
    """The first rank of pipeline rank `pp_rank`: its shards (shards.py) and its activation peak, from one build
    of its parallelized parts."""
    from torch._subclasses.fake_tensor import DataDependentOutputException

    try:
        return _simulate_rank(cfg, dims, pp_rank)
    except DataDependentOutputException as exc:
        # Fake tensors carry no values: a step whose shapes follow them (a mixture of experts: tokens per expert
        # follow the router's choices) cannot be run on them.
        raise ValueError(f"the step's shapes depend on data values ({exc.func}): routed experts (MoE) are not "
                         "simulated") from None  # fmt: skip


def _simulate_rank(cfg: JobConfig, dims: ParallelDims, pp_rank: int) -> tuple[RankShards, int]:
    if cfg.engine.name != "native":
        raise ValueError(f"engine.name: {cfg.engine.name!r} is not simulated; the native engine is")
    recipe = get_recipe(cfg.recipe)
    if recipe.step.phases is not None:
        raise ValueError(f"recipe: {cfg.recipe!r} trains in phases; the step simulation runs one-loss recipes")
    cfg, dims = _as_simulated(cfg, dims)
    if dims.pp_enabled:
        return _pipelined_peak(cfg, dims, pp_rank)
    # The middle micro-batches of an accumulation repeat the first: two are simulated at most.
    accum = grad_accum_steps(cfg, dims)
    # Under FSDP2 reducing every micro-batch (and not HSDP, whose last one all-reduces), each is like the last.
    alike = (dims.fsdp_enabled and not dims.hsdp_enabled) and cfg.parallel.fsdp_reduce_every_microbatch
    lasts = [False, True] if accum > 1 and not alike else [True]
    with parallelized_parts(cfg, dims) as (model,), _fake_mode():
        shards = count_shards([model], cfg, dims, 0)
        model.to_empty(device=CPU)
        model.train()
        engine = NativeEngine(model, cfg, dims, CPU)
        batch = _fake_batch(cfg, dims, micro_batch_size(cfg, dims))
        loss_context = loss_context_for(cfg, dims)
        with StepMemoryTracker() as tracker:
            for last in lasts:
                micro_step(engine, recipe, loss_context, batch, last, accum)
            return shards, tracker.split_peak([p.grad for p in model.parameters() if p.grad is not None])


def predict_activation_peak(cfg: JobConfig, pp_rank: int = 0) -> int:
    """activation_peak_bytes of the layout `cfg.parallel` names."""
    from scaletrain.validate import validate_config

    return activation_peak_bytes(cfg, validate_config(cfg, implied_world_size(vars(cfg.parallel))), pp_rank)


@dataclass(frozen=True)
class _StageProfile:
    """A pipeline stage's memory per microbatch on one rank, in bytes."""

    held: int  # what one microbatch leaves alive between its forward and backward (saved activations, output)
    base: int  # what the stage holds while any microbatch is in flight (FSDP's unsharded parameters)
    transient: int  # the most a backward needs on top of what is held


def _stage_profile(stage: nn.Module, sid: int, stages: int, cfg: JobConfig, dims: ParallelDims,
                   trunk_input: tuple[torch.Size, torch.dtype]) -> _StageProfile:  # fmt: skip
    """Two microbatches through the fake stage as the schedule runs them (two forwards, then their backwards):
    the second forward's growth is one microbatch's `held`, what the first left beyond it is `base`."""
    recipe, spec = get_recipe(cfg.recipe), get_recipe(cfg.recipe).supports.pipeline
    samples = micro_batch_size(cfg, dims) // pipeline_microbatches(cfg, dims)
    batch = _fake_batch(cfg, dims, samples)
    first, last = sid == 0, sid == stages - 1
    kwargs = {spec.target_kwarg: batch[spec.target_key]} if last and cfg.train.fused_cross_entropy else {}
    if first:
        inputs = recipe.step.model_inputs({k: v for k, v in batch.items() if not kwargs or k != spec.target_key})
    else:  # the receive buffer: model state (shards.py)
        inputs = (torch.zeros(trunk_input[0], dtype=trunk_input[1], requires_grad=True),)
    engine = NativeEngine(stage, cfg, dims, CPU)
    outputs, live = [], []
    with StepMemoryTracker() as tracker:
        for _ in range(2):
            with loss_context_for(cfg, dims)(), engine.autocast():
                output = stage(*inputs, **kwargs)
                if last:
                    output = recipe.step.loss(output, {spec.target_key: batch[spec.target_key]})
            outputs.append(output)
            live.append(tracker.live)
        # The gradients received from the next stage are receive buffers too (model state): left out below.
        output_grads = [None if last else torch.zeros_like(o) for o in outputs]
        for output, grad in zip(reversed(outputs), reversed(output_grads), strict=True):
            with loss_context_for(cfg, dims)():
                torch.autograd.backward(output, grad_tensors=grad)
        grads = [p.grad for p in stage.parameters() if p.grad is not None]
        peak = tracker.split_peak(grads + [g for g in output_grads if g is not None])
    held = live[1] - live[0]
    return _StageProfile(held=held, base=live[0] - held, transient=max(0, peak - live[1]))


def _fake_batch(cfg: JobConfig, dims: ParallelDims, samples: int) -> dict[str, torch.Tensor]:
    recipe = get_recipe(cfg.recipe)
    shapes = example_batch(recipe, cfg, None, samples)
    return local_batch({k: torch.zeros(v.shape, dtype=v.dtype) for k, v in shapes.items()}, CPU, dims, recipe)


_TRUNK_INPUTS: dict[tuple[str, int], tuple[torch.Size, torch.dtype]] = {}


def trunk_input(cfg: JobConfig, dims: ParallelDims) -> tuple[torch.Size, torch.dtype]:
    """Shape and dtype of what a non-first stage receives: the first stage's output for one pipeline microbatch
    as this layout's first stage makes it (under tensor parallel with sequence parallel, a share of the
    sequence), from pipeline rank 0's fake stage. The same for every pipeline rank and any depth: computed
    once per layout, on a copy one block deep per stage where the recipe can make one."""
    cfg = _one_block_per_stage(cfg, dims)
    key = (repr(cfg), dims.world_size)
    if key not in _TRUNK_INPUTS:
        _TRUNK_INPUTS[key] = _first_stage_output(cfg, dims)
    return _TRUNK_INPUTS[key]


def _one_block_per_stage(cfg: JobConfig, dims: ParallelDims) -> JobConfig:
    spec = get_recipe(cfg.recipe).supports.pipeline
    if spec.with_trunk_depth is None or cfg.parallel.pp_layer_boundaries:
        return cfg
    shallow = spec.with_trunk_depth(cfg.model, num_stages(dims.pp, cfg.parallel.stages_per_rank))
    return cfg if shallow is None else replace(cfg, model=shallow)


def _first_stage_output(cfg: JobConfig, dims: ParallelDims) -> tuple[torch.Size, torch.dtype]:
    recipe = get_recipe(cfg.recipe)
    with parallelized_parts(cfg, dims, 0) as parts, _fake_mode():
        first = parts[0]  # stage 0 is the first of pipeline rank 0's stages
        first.to_empty(device=CPU)
        batch = _fake_batch(cfg, dims, micro_batch_size(cfg, dims) // pipeline_microbatches(cfg, dims))
        with torch.no_grad():
            output = first(*recipe.step.model_inputs(batch))
        return output.shape, output.dtype


def _microbatches_in_flight(cfg: JobConfig, dims: ParallelDims, pp_rank: int, schedule: Any) -> list[dict[int, int]]:
    """For each action of this rank's schedule, how many microbatches each of its stages holds (forward done,
    backward not): from the schedule's own action order where it has one (multi-stage schedules), else GPipe's
    (all forwards, then all backwards) or 1F1B's (pp - rank forwards before the first backward)."""
    microbatches = pipeline_microbatches(cfg, dims)
    order = getattr(schedule, "pipeline_order", None)
    if order is None:
        sid = pp_rank
        depth = microbatches if cfg.parallel.pp_schedule == "gpipe" else min(microbatches, dims.pp - pp_rank)
        return [{sid: n} for n in range(1, depth + 1)]
    from torch.distributed.pipelining.schedules import BACKWARD_WEIGHT, FORWARD, FULL_BACKWARD, OVERLAP_F_B

    def compute_actions() -> Iterator[Any]:  # DualPipeV's overlapped pairs are a forward and a backward
        for action in order[pp_rank]:
            if action is not None and action.computation_type == OVERLAP_F_B:
                yield from action.sub_actions
            elif action is not None:
                yield action

    held: dict[int, int] = {}
    timeline = []
    for action in compute_actions():
        if action.computation_type == FORWARD:
            held[action.stage_index] = held.get(action.stage_index, 0) + 1
        # A split backward (zero bubble: I then W) keeps the microbatch's inputs until its weight pass.
        elif action.computation_type in (FULL_BACKWARD, BACKWARD_WEIGHT):
            held[action.stage_index] -= 1
        timeline.append(dict(held))
    return timeline


def _pipelined_peak(cfg: JobConfig, dims: ParallelDims, pp_rank: int) -> tuple[RankShards, int]:
    """This rank's stages each profiled for one microbatch (_stage_profile); the schedule's order says how many
    microbatches each holds at once. Peak = the most they hold together, plus the largest extra a single
    forward/backward needs on top of what it keeps."""
    received = trunk_input(cfg, dims)
    with parallelized_parts(cfg, dims, pp_rank) as parts, _fake_mode():
        shards = count_shards(parts, cfg, dims, pp_rank)
        stage_ids = _stage_ids(cfg, dims, pp_rank)
        count = num_stages(dims.pp, cfg.parallel.stages_per_rank)
        for part in parts:
            part.to_empty(device=CPU)
            part.train()
        pairs = zip(parts, stage_ids, strict=True)
        profiles = {sid: _stage_profile(part, sid, count, cfg, dims, received) for part, sid in pairs}
        microbatches, pp_group = pipeline_microbatches(cfg, dims), dims.axis("pp").get_group()
        schedule, _ = build_schedule(
            parts, stage_ids, count, CPU, pp_group, cfg.parallel.pp_schedule, microbatches, lambda output, _: output
        )
        timeline = _microbatches_in_flight(cfg, dims, pp_rank, schedule)
    held = max(sum(n * profiles[sid].held for sid, n in state.items()) for state in timeline)
    base = sum(p.base for p in profiles.values())
    return shards, base + held + max(p.transient for p in profiles.values())
