"""Cross-field checks of a job, run once before any process group or model exists.

`validate_config(cfg, world_size)` checks the whole config for that many processes and returns the resolved
layout (ParallelDims) that everything after it uses. It sits above scaletrain.config (plain dataclasses) and
scaletrain.parallel, which both stay free of each other's checks. Each failure is a ValueError naming the
field, the value and what would be allowed.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from scaletrain.config.schema import JobConfig
from scaletrain.engines import get_engine
from scaletrain.parallel.batching import micro_batch_size, pipeline_microbatches
from scaletrain.parallel.dims import ParallelDims
from scaletrain.parallel.pipeline import num_stages, split_layers, validate_pipeline
from scaletrain.registry import get_recipe


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def check_all(checks: Iterable[tuple[bool, str]]) -> None:
    """Raise ValueError with the message of the first failed (ok, message) pair: how recipes list their rules."""
    for ok, message in checks:
        _check(ok, message)


def uses_loss_parallel(cfg: JobConfig, dims: ParallelDims) -> bool:
    """Whether the loss runs on vocabulary-sharded logits: the one place this is decided, read by the trainer
    (the loss context) and by the recipe's TP plan (the output projection's layout)."""
    if get_engine(cfg.engine.name).owns_model_parallel:  # the engine's own model computes the loss
        return False
    return dims.tp_enabled and cfg.parallel.loss_parallel and get_recipe(cfg.recipe).supports.loss_parallel


def validate_config(cfg: JobConfig, world_size: int) -> ParallelDims:
    """Check the whole config for `world_size` processes; returns the resolved parallel dims."""
    engine = get_engine(cfg.engine.name)
    dims = ParallelDims.resolve(
        cfg.parallel.degrees, world_size, engine_data_parallel=engine.owns_data_parallel, ep=cfg.parallel.ep
    )
    t, p = cfg.train, cfg.parallel

    _check(t.steps >= 1, f"train.steps: {t.steps} is not allowed; use >= 1")
    _check(t.lr > 0, f"train.lr: {t.lr} is not allowed; use > 0")
    _check(0 <= t.min_lr_ratio <= 1, f"train.min_lr_ratio: {t.min_lr_ratio} is not allowed; use a value in [0, 1]")
    _check(
        0 <= t.warmup_steps <= t.steps, f"train.warmup_steps: {t.warmup_steps} must be in [0, train.steps={t.steps}]"
    )
    _check(0 < t.wsd_decay_fraction <= 1, f"train.wsd_decay_fraction: {t.wsd_decay_fraction} must be in (0, 1]")
    _check(0 <= t.beta1 < 1, f"train.beta1: {t.beta1} is not allowed; use a value in [0, 1)")
    _check(0 <= t.beta2 < 1, f"train.beta2: {t.beta2} is not allowed; use a value in [0, 1)")
    _check(t.eps > 0, f"train.eps: {t.eps} is not allowed; use > 0")
    _check(t.weight_decay >= 0, f"train.weight_decay: {t.weight_decay} is not allowed; use >= 0")
    _check(0 <= t.ema_decay < 1, f"train.ema_decay: {t.ema_decay} is not allowed; use 0 (off) or a value in (0, 1)")
    _check(t.grad_clip >= 0, f"train.grad_clip: {t.grad_clip} is not allowed; use >= 0 (0 disables clipping)")
    _check(t.log_interval >= 1, f"train.log_interval: {t.log_interval} is not allowed; use >= 1")

    gbs, mbs = t.global_batch_size, t.micro_batch_size
    _check(gbs >= 1, f"train.global_batch_size: {gbs} is not allowed; use >= 1")
    _check(mbs >= 0, f"train.micro_batch_size: {mbs} is not allowed; use 0 (auto) or >= 1")
    _check(
        gbs % dims.dp_size == 0,
        f"train.global_batch_size: {gbs} is not divisible by the data-parallel degree {dims.dp_size} "
        f"(dp_replicate={dims.dp_replicate} x dp_shard={dims.dp_shard})",
    )
    _check(
        mbs == 0 or gbs % (dims.dp_size * mbs) == 0,
        f"train.micro_batch_size: global_batch_size {gbs} is not divisible by dp {dims.dp_size} x "
        f"micro_batch_size {mbs}; pick a micro batch that divides {gbs // dims.dp_size}",
    )

    if t.dtype == "fp16":
        _check(
            t.loss_scaler == "dynamic",
            "train.loss_scaler: fp16 training needs loss scaling (gradients underflow); set train.loss_scaler=dynamic",
        )
    else:
        _check(
            t.loss_scaler == "none",
            f"train.loss_scaler: loss scaling is only for fp16; with train.dtype={t.dtype} use 'none'",
        )
    if p.fsdp_cpu_offload:
        _check(
            torch.cuda.is_available(),
            "parallel.fsdp_cpu_offload: FSDP2's CPU offload needs a GPU (it moves shards between device and host); "
            "it is not available on a CPU-only machine",
        )
        _check(dims.fsdp_enabled or dims.hsdp_enabled, "parallel.fsdp_cpu_offload: needs FSDP (dp_shard > 1)")
    _check(
        not (dims.dp_replicate > 1 and dims.dp_shard == 1 and (dims.tp > 1 or dims.cp > 1 or dims.pp > 1)),
        "parallel.dp_replicate: replication combined with tp/cp/pp runs as HSDP; set dp_shard >= 2 "
        "(e.g. dp_replicate=1, dp_shard=N for FSDP) — DDP does not compose with tensor, context or pipeline parallel",
    )
    recipe = get_recipe(cfg.recipe)
    _check(
        dims.tp == 1 or recipe.supports.tensor_parallel,
        f"parallel.tp: recipe {cfg.recipe!r} has no tensor-parallel plan (Recipe.supports.tensor_parallel); "
        "use tp=1 and scale with data parallel (dp_shard / dp_replicate)",
    )
    _check(
        dims.ep == 1 or recipe.supports.expert_parallel,
        f"parallel.ep: recipe {cfg.recipe!r} has no routed experts to split (Recipe.supports.expert_parallel); "
        "use ep=1",
    )
    _check(
        recipe.step.phases is None or cfg.engine.name == "native",
        f"engine.name: recipe {cfg.recipe!r} trains several networks in phases (a step per network); "
        f"engine.name={cfg.engine.name} steps one model with one optimizer: use engine.name=native",
    )
    _check(
        not cfg.metrics.step_memory or (recipe.step.phases is None and t.steps >= 3),
        "metrics.step_memory: it follows the third step of a one-loss recipe; "
        + (f"recipe {cfg.recipe!r} trains in phases" if recipe.step.phases else f"use train.steps >= 3, not {t.steps}"),
    )
    _check(
        dims.ep == 1 or not engine.owns_data_parallel,
        f"parallel.ep: expert parallel runs on the native engine only; engine.name={cfg.engine.name} shards "
        "over the data-parallel ranks itself",
    )
    if dims.pp > 1:
        _check(
            t.dtype != "fp16",
            "train.dtype: fp16 needs loss scaling, which the pipeline schedules do not apply (they run their "
            "own backward); with parallel.pp > 1 use bf16",
        )
        pipeline = recipe.supports.pipeline
        _check(pipeline is not None, f"parallel.pp: recipe {cfg.recipe!r} does not support pipeline parallel")
        validate_pipeline(
            p.pp_schedule,
            dims.pp,
            p.stages_per_rank,
            pipeline_microbatches(cfg, dims),
            micro_batch_size(cfg, dims),
            None,
        )
        # Raises naming parallel.pp / pp_layer_boundaries when the trunk's blocks do not split.
        stages = num_stages(dims.pp, p.stages_per_rank)
        split_layers(pipeline.trunk_depth(cfg.model), stages, p.pp_layer_boundaries or None)
        _check(
            not t.fused_cross_entropy or pipeline.target_kwarg is not None,
            f"train.fused_cross_entropy: recipe {cfg.recipe!r} names no forward keyword for the targets "
            "(PipelineSpec.target_kwarg), so its last pipeline stage cannot compute the fused loss",
        )
        _check(
            not cfg.eval.interval or recipe.evaluation.evaluate is None or recipe.evaluation.evaluate_under_pipeline,
            f"eval.interval: the evaluation of recipe {cfg.recipe!r} runs the whole model on one rank, which "
            f"pipeline parallel (parallel.pp={dims.pp}) splits across ranks; set eval.interval=0 and evaluate "
            "a checkpoint afterwards (e.g. `scaletrain sample`)",
        )
    _check(
        not t.fused_cross_entropy or recipe.supports.fused_cross_entropy,
        f"train.fused_cross_entropy: recipe {cfg.recipe!r} has no cross-entropy over an output projection to "
        "fuse; leave it false",
    )
    if dims.cp > 1:
        _check(
            bool(recipe.supports.context_parallel_keys),
            f"parallel.cp: recipe {cfg.recipe!r} does not support context parallel",
        )

    c = cfg.checkpoint
    _check(c.interval >= 1, f"checkpoint.interval: {c.interval} is not allowed; use >= 1")
    _check(c.keep >= 1, f"checkpoint.keep: {c.keep} is not allowed; use >= 1")

    _check(
        not cfg.engine.apex or cfg.engine.name == "native",
        f"engine.apex: apex's FusedAdam replaces the native engine's optimizer; {cfg.engine.name} brings its own",
    )
    engine.validate(cfg, dims)
    if recipe.validate is not None:
        recipe.validate(cfg, dims)
    return dims
