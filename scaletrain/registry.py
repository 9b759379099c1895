"""The recipe registry: how the core finds model families without naming them.

A recipe is one small spec (`Recipe`) that a family registers at import time. The core
discovers families by importing every sub-package of the `scaletrain.recipes` package and every
`scaletrain.recipes` entry point (for families shipped in other packages); it never
imports a family by name. Unknown or duplicate names fail loudly with the known names.
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
import warnings
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
    # ParallelSupport.fused_cross_entropy), so the last stage's forward needs the targets: the keyword that takes them.
    target_kwarg: str | None = None
    # model config -> the number of blocks in the trunk: the core checks that they split over the
    # stages (parallel.pp x stages_per_rank, parallel.pp_layer_boundaries) before any process starts.
    trunk_depth: Callable[[Any], int] = lambda model_cfg: model_cfg.n_layers
    # (model config, n) -> the same model with n blocks, or None where its blocks differ from one another (then
    # a shallower copy would not scale linearly): the planner sizes deep models from two shallow ones.
    with_trunk_depth: Callable[[Any, int], Any] | None = None


@dataclass(frozen=True)
class ModelSpec:
    """The network: its config section, how it is built and how it is laid out.

    build:        model config -> nn.Module; called under `torch.device("meta")`. The module has
                  `init_tensor(name, tensor, generator)` filling the *full* value of each parameter or
                  buffer, so initialization is independent of the layout.
    parallelize:  (model, dims, job config) -> model; applies TP, activation checkpointing, compile and
                  FSDP/DDP in that order (see scaletrain.parallel).
    startup_notes: (parallelized model, job config, dims) -> lines the trainer prints at start-up (e.g.
                  which kernels run). Returned, never attached: the core reads nothing back from a model.

    A recipe that trains several networks (a GAN's generator and discriminator, a policy beside a frozen
    reference model) builds them as the named children of one root module: one init, one parallelize,
    one checkpoint state dict, one reshard path for all of them.
    """

    config: type  # the dataclass of the `model:` config section
    build: Callable[[Any], nn.Module]
    parallelize: Callable[[nn.Module, ParallelDims, JobConfig], nn.Module]
    startup_notes: Callable[[nn.Module, JobConfig, ParallelDims], list[str]] | None = None
    # (model on meta, model config) -> the parameters one token uses, for models that route (MoE); `config
    # show` prints it beside the total. FLOPs need no hook: they are counted on the routed path.
    active_parameters: Callable[[nn.Module, Any], int] | None = None
    # model config -> (routed-expert blocks, experts each token goes to): what expert parallel's all-to-alls
    # move, for the planner's step time (scaletrain/plan/step_time.py). None: the model does not route.
    expert_routing: Callable[[Any], tuple[int, int]] | None = None
    # (parallelized + initialized model, job config, dataset) -> a line to print: data-dependent
    # initialization (Glow's actnorm), run once before the first step of a fresh run; not on resume, nor after
    # checkpoint.load_path loaded weights. It must give every rank the same values (e.g. from the same items).
    data_init: Callable[[nn.Module, JobConfig, Any], str] | None = None


@dataclass(frozen=True)
class DataSpec:
    """The data: its config section and the dataset the core's loader orders, shards and resumes.

    build_dataset: job config -> map-style dataset; item i is a dict of tensors and must be a pure function
                  of i (the core's loader owns order, sharding and resumption).
    example_batch: (job config, batch size) -> batch dict on the meta device, shaped like the data: used to
                  count FLOPs without reading any data (a 70B config on a laptop). None = item 0 of the
                  dataset, expanded.
    """

    config: type  # the dataclass of the `data:` config section
    build_dataset: Callable[[JobConfig], Any]
    unit: Literal["tokens", "samples"] = "samples"  # what throughput counts
    units_per_sample: Callable[[JobConfig], int] = lambda cfg: 1
    example_batch: Callable[[JobConfig, int], dict[str, torch.Tensor]] | None = None


@dataclass(frozen=True)
class Phase:
    """One update inside a training step of a recipe with several networks (a GAN's discriminator, then
    its generator). The root module's forward is called with `phase=name` and returns that phase's loss; the
    trainer back-propagates it over the step's micro-batches and updates the child module `trains` alone.

    trains: the root module's child this phase updates (its parameters, its AdamW groups). Gradients the
            phase's backward leaves on other children (a GAN's generator loss reaches the discriminator's
            weights) are dropped before the update.
    every:  run on steps s (1-based) with s % every == 0, e.g. a WGAN critic's n_critic updates per
            generator update: the critic phase every step, the generator phase every n_critic.
    lr:     this child's peak LR (None = train.lr), following the job's schedule; two-time-scale GANs give
            the discriminator a larger one.
    betas:  this child's AdamW betas (None = train.beta1, train.beta2); GANs use (0.5, 0.999) or (0, 0.9).
    ema:    whether train.ema_decay keeps an average of this child's weights (a GAN's generator: yes; its
            discriminator: no).
    """

    name: str
    trains: str
    every: int = 1
    lr: float | None = None
    betas: tuple[float, float] | None = None
    ema: bool = True


@dataclass(frozen=True)
class StepSpec:
    """What one micro-batch computes: the model is called with `model_inputs(batch)` and the trainer
    back-propagates `loss(output, batch)`, a scalar mean over the micro-batch.

    after_step: (model, dims) -> metrics; called on every rank after each optimizer step, for state that is
    not trained by gradients (e.g. MoE routing biases set from the experts' load, summed over the ranks).
    The metrics join the step's logged ones.
    phases: job config -> the updates of one step, in order (see Phase), for recipes whose root module holds
    several trained networks; None = one update of every parameter (the usual case). Each phase logs
    `<name>/loss` and `<name>/grad_norm`; `loss` and `grad_norm` are the sums over the phases that ran.
    frozen: with phases, the root's children no phase trains, on purpose (a reference or teacher model):
    requires_grad False, no optimizer state. A child with parameters that is neither trained nor named here
    is refused at start-up (it would silently never learn: a phase forgotten).
    """

    model_inputs: Callable[[dict[str, torch.Tensor]], tuple]
    loss: Callable[[Any, dict[str, torch.Tensor]], torch.Tensor]
    after_step: Callable[[nn.Module, ParallelDims], dict[str, float]] | None = None
    phases: Callable[[JobConfig], list[Phase]] | None = None
    frozen: tuple[str, ...] = ()


@dataclass(frozen=True)
class ParallelSupport:
    """The layouts a recipe's parallelize implements beyond data parallel (DDP/FSDP2/HSDP, always offered).

    The core refuses a layout that needs one the recipe does not declare, before any process starts (a
    recipe without a TP plan once ran tp=2 as the same work on every rank).
    """

    tensor_parallel: bool = False  # parallelize shards the model over the "tp" mesh axis
    # For families with vocab-sized outputs: under TP the loss may be computed on vocab-sharded logits.
    loss_parallel: bool = False
    # For a cross-entropy over an output projection: train.fused_cross_entropy computes it in chunks inside
    # the model's forward(inputs, targets) (scaletrain/ops.py: linear_cross_entropy).
    fused_cross_entropy: bool = False
    pipeline: PipelineSpec | None = None  # how the model splits into stages; None = no pp > 1
    # Batch entries whose dim 1 is the sequence (sharded across cp ranks); empty = no cp > 1. The
    # recipe's parallelize must then install context-parallel attention.
    context_parallel_keys: tuple[str, ...] = ()
    # parallelize splits routed experts over the "ep" ranks (scaletrain/parallel/expert_parallel.py); the
    # recipe's validate checks its own divisibility (experts per ep rank).
    expert_parallel: bool = False


@dataclass(frozen=True)
class EvalSpec:
    """Optional: what a recipe offers beyond the training loss.

    evaluate: (model, job config, dims, step, logger) -> dict of metrics; called every eval.interval steps on
              every rank, with the EMA weights when train.ema_decay > 0 (e.g. sample grids via
              logger.log_image); dims is the run's layout, its mesh built (to split work over data ranks).
    sample:   argv -> None; the `scaletrain sample <ckpt> ...` command for this family.
    bench_baselines: job config -> {name: factory of a module whose forward(batch) returns the mean loss}:
              `scaletrain bench`'s independent baselines, sharing no code with the recipe's model, so a
              slow model file shows.
    """

    evaluate: Callable[[nn.Module, JobConfig, ParallelDims, int, Any], dict[str, float]] | None = None
    # Whether evaluate also works when pipeline stages split the model (it then gets this rank's stages, and
    # combines over the pp ranks itself); otherwise eval.interval is refused with parallel.pp > 1.
    evaluate_under_pipeline: bool = False
    sample: Callable[[list[str]], None] | None = None
    bench_baselines: Callable[[JobConfig], dict[str, Callable[[], nn.Module]]] | None = None


@dataclass(frozen=True)
class HFInterop:
    """Hugging Face interop: `scaletrain export --format hf` and `scaletrain import hf`.

    export:      (job config, full state dict, out dir) -> None; writes config.json + model.safetensors (+ the
                 tokenizer of job config.data; data is None for imported weights, whose tokenizer scaletrain
                 never saw).
    import_:     hf dir -> (model config overrides, full state dict).
    model_types: the config.json `model_type` values import_ reads (how `import hf` picks the recipe).
    """

    export: Callable[[Any, dict[str, torch.Tensor], Path], None]
    import_: Callable[[Path], tuple[dict[str, Any], dict[str, torch.Tensor]]]
    model_types: tuple[str, ...]


@dataclass(frozen=True)
class MegatronInterop:
    """How `engine.name=megatron` trains this family with megatron-core's model (scaletrain/engines/megatron_engine.py).

    refusals: (model config, tensor-parallel size) -> what megatron cannot express (empty = everything maps).
    arguments: model config -> the arguments megatron's classes get (`scaletrain config show` prints them).
    build:    (model config, **TransformerConfig parallel arguments) -> megatron-core's model (on the CPU;
              megatron's parallel_state initialized). Its forward(tokens, positions, attention_mask=None,
              labels=None) returns logits, or given labels the per-token loss (megatron's vocab-parallel
              cross-entropy: under tensor parallel each rank holds a slice of the vocabulary's logits).
    to_megatron / from_megatron: (model config, tensors by name) -> the same tensors under the other side's
              names, unsplit (tensor-parallel size 1; the engine splits them over the tp ranks from megatron's
              own parameter attributes); applied to weights and to per-weight optimizer state alike.
    """

    refusals: Callable[[Any, int], list[str]]
    arguments: Callable[[Any], dict[str, Any]]
    build: Callable[..., nn.Module]
    to_megatron: Callable[[Any, dict[str, torch.Tensor]], dict[str, torch.Tensor]]
    from_megatron: Callable[[Any, dict[str, torch.Tensor]], dict[str, torch.Tensor]]


@dataclass(frozen=True)
class Recipe:
    """What a model family gives the core: required groups first, optional ones after.

    validate: (job config, parallel dims) -> None; the family's own config rules, raising ValueError that
              names the field. Called once, before any process group exists.
    """

    name: str  # what a config's `recipe:` selects
    model: ModelSpec
    data: DataSpec
    step: StepSpec
    validate: Callable[[JobConfig, ParallelDims], None] | None = None
    supports: ParallelSupport = ParallelSupport()
    evaluation: EvalSpec = EvalSpec()
    hf: HFInterop | None = None
    megatron: MegatronInterop | None = None


# The bundled families are the sub-packages of this package; the core scans it and never names one.
RECIPES_PACKAGE = "scaletrain.recipes"
_RECIPES: dict[str, Recipe] = {}
_BROKEN: dict[str, Exception] = {}  # where -> the error it raised on import
_discovered = False


def register_recipe(recipe: Recipe) -> Recipe:
    if recipe.name in _RECIPES and _RECIPES[recipe.name] is not recipe:
        raise ValueError(f"recipe {recipe.name!r} is registered twice; known: {sorted(_RECIPES)}")
    _RECIPES[recipe.name] = recipe
    return recipe


def discover_recipes() -> None:
    """Import every family under the `scaletrain.recipes` package and every registered entry point.

    A family that fails to import does not take the others down with it (a third-party package with a
    broken dependency must not stop a GPT run): its error is kept, warned about, and raised in full when
    that family is asked for."""
    global _discovered
    if _discovered:
        return
    _discovered = True
    package = importlib.import_module(RECIPES_PACKAGE)
    modules = [f"{RECIPES_PACKAGE}.{info.name}" for info in pkgutil.iter_modules(package.__path__) if info.ispkg]
    loaders = [(module, functools.partial(importlib.import_module, module)) for module in modules]
    loaders += [(f"entry point {ep.name} = {ep.value}", ep.load) for ep in entry_points(group="scaletrain.recipes")]
    for where, load in loaders:
        try:
            load()
        except Exception as exc:  # noqa: BLE001 - any import-time failure of one family, reported below
            _BROKEN[where] = exc
            warnings.warn(f"recipe package {where} failed to import ({type(exc).__name__}: {exc}); "
                          "its recipes are unavailable", stacklevel=2)  # fmt: skip


def get_recipe(name: str) -> Recipe:
    discover_recipes()
    if name not in _RECIPES:
        broken = [where for where in _BROKEN if where.rsplit(".", 1)[-1] == name or f" {name} = " in where]
        if broken:
            raise ValueError(f"recipe: {name!r} is in {broken[0]}, which failed to import") from _BROKEN[broken[0]]
        failed = f"; failed to import: {sorted(_BROKEN)}" if _BROKEN else ""
        raise ValueError(f"recipe: unknown recipe {name!r}; known recipes: {sorted(_RECIPES)}{failed}")
    return _RECIPES[name]


def known_recipes() -> list[str]:
    discover_recipes()
    return sorted(_RECIPES)
