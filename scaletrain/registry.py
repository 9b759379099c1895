"""The recipe registry: how the core finds model families without naming them.

A recipe is one small spec (`Recipe`) that a family registers at import time. The core
discovers families by importing every sub-package of the `scaletrain.recipes` package and every
`scaletrain.recipes` entry point (for families shipped in other packages); it never
imports a family by name. Unknown or duplicate names fail loudly with the known names.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from pathlib import Path

    import torch
    from torch import nn

    from scaletrain.config.schema import JobConfig
    from scaletrain.parallel.dims import ParallelDims


@dataclass(frozen=True)
class PipelineSpec:
    """How a recipe's model splits into pipeline stages (see scaletrain/parallel/pipeline.py).

    The model's forward must accept the previous stage's output when its `first` modules are
    None, and return the trunk's output when its `last` modules are None.
    """

    trunk: str = "layers"  # attribute holding an nn.ModuleDict of repeated blocks
    first: tuple[str, ...] = ()  # modules that run before the trunk (removed from later stages)
    last: tuple[str, ...] = ()  # modules that run after it (removed from earlier stages)
    target_key: str = "target"  # the batch entry the loss compares the last stage's output with
    # With train.fused_cross_entropy the model computes its loss inside forward (Recipe.
    # supports_fused_cross_entropy), so the last stage's forward needs the targets: the keyword that takes them.
    target_kwarg: str | None = None
    # model config -> the number of blocks in the trunk: the core checks that they split over the
    # stages (parallel.pp x stages_per_rank, parallel.pp_layer_boundaries) before any process starts.
    trunk_depth: Callable[[Any], int] = lambda model_cfg: model_cfg.n_layers


@dataclass(frozen=True)
class Recipe:
    """What a model family gives the core.

    build_model:  model config -> nn.Module; called under `torch.device("meta")`. The module
                  has `init_tensor(name, tensor, generator)` filling the *full* value of each
                  parameter or buffer, so initialization is independent of the layout.
    parallelize:  (model, dims, job config) -> model; applies TP, activation checkpointing,
                  compile and FSDP/DDP in that order (see scaletrain.parallel).
    build_dataset: job config -> map-style dataset; item i is a dict of tensors and must be a
                  pure function of i (the core's loader owns order, sharding and resumption).
    model_inputs: batch dict -> tuple of positional model inputs.
    loss:         (model output, batch dict) -> scalar mean loss over the batch.
    validate:     (job config, parallel dims) -> None; raises ValueError naming a field.
    units_per_sample: job config -> tokens (or 1 for sample-counted families) per sample.
    evaluate:     (model, job config, step, logger) -> dict of metrics; called every eval.interval
                  steps on every rank with the EMA weights when train.ema_decay > 0 (e.g. to
                  write sample grids with logger.log_image).
    sample:       argv -> None; the `scaletrain sample <ckpt> ...` command for this family.
    example_batch: (job config, batch size) -> batch dict on the meta device, shaped like the
                  data — used to count FLOPs without reading any data (e.g. for a 70B config
                  on a laptop). Without it the core uses item 0 of the dataset.
    """

    name: str
    model_config: type
    data_config: type
    build_model: Callable[[Any], nn.Module]
    parallelize: Callable[[nn.Module, ParallelDims, JobConfig], nn.Module]
    build_dataset: Callable[[JobConfig], Any]
    model_inputs: Callable[[dict[str, torch.Tensor]], tuple]
    loss: Callable[[Any, dict[str, torch.Tensor]], torch.Tensor]
    validate: Callable[[JobConfig, ParallelDims], None] | None = None
    units_per_sample: Callable[[JobConfig], int] = lambda cfg: 1
    unit: Literal["tokens", "samples"] = "samples"
    # Capabilities: the core refuses a layout that needs one the recipe does not declare, before any
    # process starts (a recipe without a TP plan once ran tp=2 as the same work on every rank).
    # Tensor parallel: its parallelize shards the model over the "tp" mesh axis.
    supports_tensor_parallel: bool = False
    # For families with vocab-sized outputs: TP may compute the loss on sharded logits.
    supports_loss_parallel: bool = False
    # For families whose loss is a cross-entropy over an output projection: train.fused_cross_entropy
    # computes it in chunks inside the model's forward (scaletrain/ops.py: linear_cross_entropy).
    supports_fused_cross_entropy: bool = False
    evaluate: Callable[[nn.Module, JobConfig, int, Any], dict[str, float]] | None = None
    # (parallelized model, job config, dims) -> lines the trainer prints at start-up (e.g. which kernels
    # run). Returned, never attached to the model: the core reads nothing back from a model by getattr.
    startup_notes: Callable[[nn.Module, JobConfig, ParallelDims], list[str]] | None = None
    sample: Callable[[list[str]], None] | None = None
    # Pipeline parallel: how the model splits; None = the family does not support pp > 1.
    pipeline: PipelineSpec | None = None
    # Context parallel: batch entries whose dim 1 is the sequence (sharded across cp ranks);
    # empty = the family does not support cp > 1. Its parallelize must install cp attention.
    context_parallel_keys: tuple[str, ...] = ()
    example_batch: Callable[[JobConfig, int], dict[str, torch.Tensor]] | None = None
    # Hugging Face interop (`scaletrain export --format hf`, `scaletrain import hf`), optional:
    # export_hf(job config, full state dict, out dir) writes config.json + model.safetensors (+ the tokenizer
    # of job config.data; data is None for imported weights, whose tokenizer scaletrain never saw);
    # import_hf(hf dir) -> (model config overrides, full state dict); hf_model_types are the
    # config.json `model_type` values import_hf reads (how `import hf` picks the recipe).
    export_hf: Callable[[Any, dict[str, torch.Tensor], Path], None] | None = None
    import_hf: Callable[[Path], tuple[dict[str, Any], dict[str, torch.Tensor]]] | None = None
    hf_model_types: tuple[str, ...] = ()
    # `scaletrain bench`'s independent baselines: job config -> {name: factory of a module whose forward(batch)
    # returns the mean loss}. Models that share no code with the recipe's, so a slow model file shows.
    bench_baselines: Callable[[JobConfig], dict[str, Callable[[], nn.Module]]] | None = None


# The bundled families are the sub-packages of this package; the core scans it and never names one.
RECIPES_PACKAGE = "scaletrain.recipes"
_RECIPES: dict[str, Recipe] = {}
_discovered = False


def register_recipe(recipe: Recipe) -> Recipe:
    if recipe.name in _RECIPES and _RECIPES[recipe.name] is not recipe:
        raise ValueError(f"recipe {recipe.name!r} is registered twice; known: {sorted(_RECIPES)}")
    _RECIPES[recipe.name] = recipe
    return recipe


def discover_recipes() -> None:
    """Import every family under the `scaletrain.recipes` package and every registered entry point."""
    global _discovered
    if _discovered:
        return
    _discovered = True
    package = importlib.import_module(RECIPES_PACKAGE)
    for info in pkgutil.iter_modules(package.__path__):
        if info.ispkg:
            importlib.import_module(f"{RECIPES_PACKAGE}.{info.name}")
    for ep in entry_points(group="scaletrain.recipes"):
        ep.load()


def get_recipe(name: str) -> Recipe:
    discover_recipes()
    if name not in _RECIPES:
        raise ValueError(f"recipe: unknown recipe {name!r}; known recipes: {sorted(_RECIPES)}")
    return _RECIPES[name]


def known_recipes() -> list[str]:
    discover_recipes()
    return sorted(_RECIPES)
