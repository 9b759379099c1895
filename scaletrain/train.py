"""The training loop, for every recipe and every layout.

Runbook:
  scaletrain train scaletrain/recipes/gpt/configs/tiny.yaml                     # one process, CPU or one GPU
  scaletrain train scaletrain/recipes/gpt/configs/tiny.yaml --train.steps 50    # dotted overrides
  torchrun --nproc-per-node 4 -m scaletrain.train scaletrain/recipes/gpt/configs/tiny.yaml \
      --parallel.dp_shard 2 --parallel.tp 2                          # FSDP2 x TP on 4 processes
  scaletrain config show scaletrain/recipes/gpt/configs/tiny.yaml               # the resolved config

Order of work: parse + validate the whole config (no process group yet) -> build the
dataset (bad data files fail here) -> process group + device mesh -> model on the meta
device -> FLOPs counted on meta -> recipe.model.parallelize -> materialize + init -> optimizer
-> resume from the newest complete checkpoint if there is one -> loop.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import sys
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import loss_parallel

from scaletrain.checkpoint import Checkpointer, CheckpointError, CheckpointMismatchError, seed_rng
from scaletrain.checkpoint.faults import Preemption, StepWatchdog
from scaletrain.config import JobConfig, config_to_dict, load_config
from scaletrain.config.schema import TORCH_DTYPES
from scaletrain.data import ShardedLoader
from scaletrain.distributed import destroy_distributed, init_distributed, run_as_worker, world_size_from_env
from scaletrain.ema import EMA
from scaletrain.engines import Engine, get_engine
from scaletrain.metrics import MetricLogger, count_train_flops, live_tensor_bytes, mfu, peak_memory_gib, peak_tflops
from scaletrain.metrics.step_memory import StepMemoryTracker
from scaletrain.parallel import ParallelDims, init_model
from scaletrain.parallel.batching import grad_accum_steps, micro_batch_size, pipeline_microbatches
from scaletrain.parallel.context_parallel import shard_sequence
from scaletrain.parallel.pipeline import (
    build_schedule,
    build_stage_module,
    num_stages,
    split_layers,
    stage_ids_for_rank,
    stage_union,
)
from scaletrain.registry import Phase, Recipe, get_recipe
from scaletrain.validate import uses_loss_parallel, validate_config


class NonFiniteLossError(FloatingPointError):
    pass


def example_batch(recipe: Recipe, cfg: JobConfig, dataset: Any | None, batch_size: int = 1) -> dict[str, torch.Tensor]:
    """A batch on the meta device shaped like the training data (for FLOP counting)."""
    if recipe.data.example_batch is not None:
        return recipe.data.example_batch(cfg, batch_size)
    if dataset is None:
        dataset = recipe.data.build_dataset(cfg)
    item = dataset[0]
    return {k: v.unsqueeze(0).expand(batch_size, *v.shape).to("meta") for k, v in item.items()}


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def flops_per_sample(recipe: Recipe, cfg: JobConfig, model: torch.nn.Module, dataset: Any | None = None) -> int:
    """Training FLOPs (forward + backward) of one sample, counted on the meta device; for a recipe with
    phases, each phase's count over the steps it runs on (a WGAN generator phase every n_critic steps)."""
    batch = example_batch(recipe, cfg, dataset)
    inputs = recipe.step.model_inputs(batch)

    def loss(output: Any) -> torch.Tensor:
        return recipe.step.loss(output, batch)

    if recipe.step.phases is None:
        return count_train_flops(model, inputs, loss_fn=loss)
    phases = recipe.step.phases(cfg)
    return round(sum(count_train_flops(model, inputs, loss, {"phase": p.name}) / p.every for p in phases))


def freeze_untrained(model: torch.nn.Module, phases: list[Phase], frozen: tuple[str, ...] = ()) -> None:
    """requires_grad False on the root's children named `frozen` (a reference or teacher network); refuses a
    phase that trains no child of the root, and a child with parameters that is neither trained nor frozen."""
    children = {name for name, child in model.named_children() if any(True for _ in child.parameters())}
    trained = {phase.trains for phase in phases}
    for phase in phases:
        if phase.trains not in children:
            raise ValueError(f"phase {phase.name!r} trains {phase.trains!r}, which is not one of the model's "
                             f"children with parameters: {sorted(children)}")  # fmt: skip
    forgotten = sorted(children - trained - set(frozen))
    if forgotten:
        raise ValueError(f"model: {forgotten} have parameters, but no phase trains them (no optimizer) and "
                         f"StepSpec.frozen does not name them; phases train {sorted(trained)}")  # fmt: skip
    for name, param in model.named_parameters():
        if name.split(".", 1)[0] not in trained:
            param.requires_grad_(False)


def _full(value: torch.Tensor) -> torch.Tensor:
    return value.full_tensor() if isinstance(value, DTensor) else value


STEP_MEMORY_STEP = 2  # metrics.step_memory follows the step after this many (0-based index)


def local_batch(
    batch: dict[str, torch.Tensor], device: torch.device, dims: ParallelDims, recipe: Recipe
) -> dict[str, torch.Tensor]:
    """Move to the device; with cp > 1 keep this rank's load-balanced slice of the sequence."""
    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    if dims.cp_enabled:
        cp_mesh = dims.axis("cp")
        rank, cp = cp_mesh.get_local_rank(), cp_mesh.size()
        keys = recipe.supports.context_parallel_keys
        batch = {k: shard_sequence(v, rank, cp) if k in keys else v for k, v in batch.items()}
    return batch


def micro_step(engine: Engine, recipe: Recipe, loss_context: Callable[[], AbstractContextManager],
               batch: dict[str, torch.Tensor], last: bool, accum_steps: int, **phase: str) -> torch.Tensor:  # fmt: skip
    """Forward and backward of one micro-batch (not pipelined); its loss, detached. `scaletrain plan` runs the
    same function on fake tensors."""
    # Only the last micro-batch's backward reduces gradients across data-parallel ranks.
    with loss_context(), engine.micro_batch(last=last):
        with engine.autocast():
            output = engine.model(*recipe.step.model_inputs(batch), **phase)
        # Mean over the micro-batch, divided by the accumulation count: summed over
        # micro-batches and averaged over dp ranks this is the global-batch mean.
        loss = recipe.step.loss(output, batch) / accum_steps
        engine.backward(loss)
    return loss.detach()


def loss_context_for(cfg: JobConfig, dims: ParallelDims) -> Callable[[], AbstractContextManager]:
    """Tensor parallel's loss_parallel when the head is split over the vocabulary, else nothing."""
    return loss_parallel if uses_loss_parallel(cfg, dims) else contextlib.nullcontext


class Trainer:
    """Holds the built pieces of one run; `fit()` runs the loop."""

    def __init__(self, cfg: JobConfig, dims: ParallelDims, dataset: Any, device: torch.device):
        self.cfg, self.dims, self.device = cfg, dims, device
        self.recipe = get_recipe(cfg.recipe)
        self.rank = dist.get_rank()
        self.run_dir = Path(cfg.job.run_dir) / cfg.job.name
        dims.build_mesh(device.type)
        seed_rng(cfg.job.seed)  # torch, Python and NumPy: recipes may draw from any of them
        if cfg.job.deterministic:
            torch.use_deterministic_algorithms(True)

        # Tensors alive before the model exists (the dataset's, ...): subtracted from the model-state census.
        self._bytes_before_model = live_tensor_bytes(device.type)
        with torch.device("meta"):
            model = self.recipe.model.build(cfg.model)
        self.num_params = count_params(model)
        self.flops_per_sample = flops_per_sample(self.recipe, cfg, model, dataset)
        self.micro_batch_size = micro_batch_size(cfg, dims)
        # Pipeline state, set by _build_model_parts when pp > 1; one process holds every stage otherwise.
        self.schedule = None
        self.pipeline_stages: list[Any] = []
        self.is_first_stage = self.is_last_stage = True
        self._schedule_can_skip_outputs = False
        self._accum_steps = 1  # micro-batches in the current step: the pipeline loss divides by it
        self.model_parts = self._build_model_parts(model)
        # One module holding every parameter this rank trains under the whole model's names:
        # the model itself, or a union of this rank's pipeline stages.
        pipeline = self.recipe.supports.pipeline
        self.model = stage_union(self.model_parts, pipeline) if dims.pp_enabled else self.model_parts[0]

        # A recipe with several networks updates them in phases; those no phase trains are frozen.
        self.phases = self.recipe.step.phases(cfg) if self.recipe.step.phases else []
        if self.phases:
            freeze_untrained(self.model, self.phases, self.recipe.step.frozen)
        # The engine owns the optimizer step (and, for DeepSpeed, data parallelism); see scaletrain/engines.
        self.engine: Engine = get_engine(cfg.engine.name).build(self.model, cfg, dims, device)
        self.optimizer = self.engine.optimizer
        ema_children = {phase.trains for phase in self.phases if phase.ema} if self.phases else None
        t = cfg.train
        self.ema = EMA(self.model, t.ema_decay, t.ema_warmup, ema_children) if t.ema_decay > 0 else None
        dp_rank, dp_size = dims.dp_coordinates()
        self.loader = ShardedLoader(
            dataset,
            global_batch_size=cfg.train.global_batch_size,
            micro_batch_size=self.micro_batch_size,
            dp_rank=dp_rank,
            dp_size=dp_size,
            seed=cfg.job.seed,
            num_workers=getattr(cfg.data, "num_workers", 0),
        )
        self.loss_context = loss_context_for(cfg, dims)
        self.units_per_step = cfg.train.global_batch_size * self.recipe.data.units_per_sample(cfg)
        self.peak, self.peak_note = peak_tflops(device, TORCH_DTYPES[cfg.train.dtype], cfg.metrics.peak_tflops)
        self.step = 0
        c = cfg.checkpoint
        self.checkpointer = Checkpointer(
            self.checkpoint_root, keep=c.keep, async_mode=c.async_mode, fallback=c.fallback, verify=c.verify
        )
        self.watchdog = StepWatchdog(cfg.parallel.step_timeout_s, self.rank)  # started by fit()
        self.preemption = Preemption()  # its signal handlers are installed by fit() only

    # -- building -----------------------------------------------------------------------------
    def _build_model_parts(self, model: torch.nn.Module) -> list[torch.nn.Module]:
        """Split into this rank's pipeline stages (if pp > 1), parallelize and initialize each."""
        cfg, dims, p = self.cfg, self.dims, self.cfg.parallel
        if dims.pp_enabled:
            spec = self.recipe.supports.pipeline
            stages = num_stages(dims.pp, p.stages_per_rank)
            layer_split = split_layers(len(getattr(model, spec.trunk)), stages, p.pp_layer_boundaries or None)
            pp_mesh = dims.axis("pp")
            stage_ids = stage_ids_for_rank(pp_mesh.get_local_rank(), dims.pp, p.stages_per_rank, p.pp_schedule)
            parts = [build_stage_module(model, spec, layer_split[sid], sid, stages) for sid in stage_ids]
        else:
            parts = [model]
        if not get_engine(cfg.engine.name).owns_model_parallel:
            parts = [self.recipe.model.parallelize(part, dims, cfg) for part in parts]
        for part in parts:
            init_model(part, self.device, cfg.job.seed)
            part.train()
        if dims.pp_enabled:
            self.schedule, self.pipeline_stages = build_schedule(
                parts,
                stage_ids,
                stages,
                self.device,
                pp_mesh.get_group(),
                p.pp_schedule,
                pipeline_microbatches(cfg, dims),
                self._pipeline_loss,
            )
            self.is_first_stage, self.is_last_stage = 0 in stage_ids, stages - 1 in stage_ids
            self._schedule_can_skip_outputs = "return_outputs" in inspect.signature(self.schedule.step).parameters
        return parts

    def _pipeline_loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        # Mean over the microbatch, divided by the accumulation count; the schedule divides
        # the gradients by the number of pipeline microbatches.
        return self.recipe.step.loss(output, {self.recipe.supports.pipeline.target_key: target}) / self._accum_steps

    # -- checkpoints --------------------------------------------------------------------------
    @property
    def checkpoint_root(self) -> Path:
        return self.run_dir / "checkpoints"

    def maybe_resume(self) -> str | None:
        """Collective: resume from the newest intact checkpoint, or load checkpoint.load_path.

        Returns the lines to print (what was loaded, damaged checkpoints skipped), or None.
        """
        ckpt = self.cfg.checkpoint
        if ckpt.enable:
            self.checkpointer.check_writable()
        folder, notes = self.checkpointer.find_resumable() if ckpt.resume else (None, [])
        if folder is not None:
            try:
                notes += self._load(folder, with_optimizer=True)
            except CheckpointMismatchError as exc:
                raise CheckpointMismatchError(
                    f"{exc}. This run folder holds an earlier run of another model: to start a new run, give it "
                    f"another name (--job.name NAME) or skip resuming (--checkpoint.resume false)"
                ) from exc
            notes.append(f"resumed from {folder} (step {self.step})")
            if self.step >= self.cfg.train.steps:
                notes.append(
                    f"nothing to train: step {self.step} >= train.steps {self.cfg.train.steps}. Raise train.steps "
                    "to continue this run, or start a new one with --job.name NAME or --checkpoint.resume false"
                )
        elif ckpt.load_path:
            weights = self.engine.checkpoint_state(with_optimizer=False)
            _, load_notes = self.checkpointer.load(Path(ckpt.load_path), weights)
            notes += load_notes + [f"loaded initial weights from {ckpt.load_path}"]
        return "\n".join(notes) or None

    def _load(self, folder: Path, with_optimizer: bool) -> list[str]:
        # rng_seed: restore every rank's RNG states (or re-seed them when the world size changed).
        state, notes = self.checkpointer.load(
            folder,
            self.engine.checkpoint_state(with_optimizer),
            extra_tensors=self._extra_tensors(),
            verified=True,
            rng_seed=self.cfg.job.seed,
        )
        self.step = state["step"]
        self.loader.load_state_dict(state["data"])
        # "scaler": checkpoints written before engines existed held only the native loss scaler.
        self.engine.load_state_dict(state.get("engine") or {"scaler": state.get("scaler")})
        return notes

    def _extra_tensors(self) -> dict[str, dict[str, torch.Tensor]]:
        return {"ema": self.ema.state_dict()} if self.ema is not None else {}

    def save(self, checkpointer: Checkpointer | None = None) -> Path:
        """Collective: checkpoint the current step (published now, or at the next save when async), with
        the run's checkpointer unless given another (`scaletrain bench` saves into a temporary folder)."""
        trainer_state = {
            "step": self.step,
            "data": self.loader.state_dict(),
            "engine": {"name": self.engine.name, **self.engine.state_dict()},
            "recipe": self.cfg.recipe,
            "num_params": self.num_params,
            "config": config_to_dict(self.cfg),  # export and `ckpt info` rebuild the model from it
        }
        self.watchdog.arm(f"the checkpoint save of step {self.step}")
        folder = (checkpointer or self.checkpointer).save(
            self.step,
            self.engine.checkpoint_state(with_optimizer=True),
            trainer_state,
            layout=self.engine.description,
            extra_tensors=self._extra_tensors(),
        )
        self.watchdog.disarm()
        return folder

    def _start_fault_handling(self) -> None:
        self.preemption.install()
        self.watchdog.start()

    def _stop_fault_handling(self) -> None:
        self.preemption.uninstall()
        self.watchdog.stop()

    def _after_step(self, logger: MetricLogger) -> bool:
        """At a step boundary: the periodic save; on SIGTERM/SIGUSR1 (any rank) a final save. True = stop."""
        cfg = self.cfg
        self.watchdog.disarm()
        saved = cfg.checkpoint.enable and (self.step % cfg.checkpoint.interval == 0 or self.step == cfg.train.steps)
        if saved:
            logger.log_text(f"checkpoint saved: {self.save()}")
        signal_name = self.preemption.agreed()
        if signal_name is None:
            return False
        if cfg.checkpoint.enable and not saved:
            logger.log_text(f"checkpoint saved: {self.save()}")
        self.checkpointer.finish()
        logger.log_text(
            f"{signal_name}: stopped at step {self.step} after a final checkpoint; rerun the same command to continue"
            if cfg.checkpoint.enable
            else f"{signal_name}: stopped at step {self.step} (checkpoint.enable=false: nothing saved)"
        )
        return True

    # -- one optimizer step -------------------------------------------------------------------
    def train_step(self) -> dict[str, float]:
        micro_batches = [self._local_batch(batch) for batch in self.loader.next_step()]
        self._accum_steps = len(micro_batches)
        if self.phases:
            metrics = self._phased_updates(micro_batches)
        else:
            loss_sum, step_memory = self._tracked_forward_backward(micro_batches)
            census = {**self._state_census(), **step_memory}
            grad_norm, lr = self.engine.step(self.step)
            metrics = {"loss": self._mean_over_ranks(loss_sum), "grad_norm": float(grad_norm), "lr": lr, **census}
        recipe_metrics = self.recipe.step.after_step(self.model, self.dims) if self.recipe.step.after_step else {}
        if self.ema is not None:
            self.ema.update(self.model, self.step + 1)  # self.step counts the steps before this one
        self.step += 1
        return {**metrics, **recipe_metrics}

    def _tracked_forward_backward(self, micro_batches: list[dict[str, torch.Tensor]]) -> tuple[torch.Tensor, dict]:
        """_forward_backward; at the third step with metrics.step_memory, under the step-memory tracker: the peak
        of what it allocated, less the gradients it leaves (model state), as activation_peak_gib. The third, as
        the first steady one: DDP rebuilds its gradient buckets in the second."""
        if not (self.cfg.metrics.step_memory and self.step == STEP_MEMORY_STEP):
            return self._forward_backward(micro_batches), {}
        with StepMemoryTracker() as tracker:
            loss_sum = self._forward_backward(micro_batches)
            grads = [p.grad for p in self.model.parameters() if p.grad is not None]
            peak = tracker.split_peak(grads)
        return loss_sum, {"activation_peak_gib": peak / 2**30}

    def _forward_backward(self, micro_batches: list[dict[str, torch.Tensor]], **phase: str) -> torch.Tensor:
        """Forward and backward over the step's micro-batches; returns this rank's summed loss."""
        loss_sum = torch.zeros((), device=self.device)
        for index, batch in enumerate(micro_batches):
            if self.schedule is not None:
                loss_sum += self._pipeline_micro_step(batch)
                continue
            last = index == len(micro_batches) - 1
            loss = micro_step(self.engine, self.recipe, self.loss_context, batch, last, len(micro_batches), **phase)
            loss_sum += _full(loss).float()
        return loss_sum

    def _phased_updates(self, micro_batches: list[dict[str, torch.Tensor]]) -> dict[str, float]:
        """A recipe with several networks: each phase due at this step runs forward/backward over the
        micro-batches and updates its own network (scaletrain.registry.Phase)."""
        metrics: dict[str, float] = {"loss": 0.0, "grad_norm": 0.0}
        due = [phase for phase in self.phases if (self.step + 1) % phase.every == 0]
        for index, phase in enumerate(due):
            loss_sum = self._forward_backward(micro_batches, phase=phase.name)
            if index == len(due) - 1:
                metrics.update(self._state_census())
            grad_norm, metrics["lr"] = self.engine.step(self.step, trains=phase.trains)
            metrics[f"{phase.name}/loss"] = self._mean_over_ranks(loss_sum)
            metrics[f"{phase.name}/grad_norm"] = float(grad_norm)
            metrics["loss"] += metrics[f"{phase.name}/loss"]
            metrics["grad_norm"] += float(grad_norm)
        return metrics

    def _state_census(self) -> dict[str, float]:
        """At the second step's boundary, before its update (gradients and optimizer states both exist): the
        model state's bytes on this rank."""
        if self.step != 1:
            return {}
        return {"model_state_gib": (live_tensor_bytes(self.device.type) - self._bytes_before_model) / 2**30}

    def _mean_over_ranks(self, loss_sum: torch.Tensor) -> float:
        if self.dims.pp_enabled:  # only the last stage computed the loss
            dist.all_reduce(loss_sum, group=self.dims.axis("pp").get_group())
        if self.dims.dp_size * self.dims.cp > 1:
            dist.all_reduce(loss_sum, op=dist.ReduceOp.AVG, group=self.dims.axis("dp_cp").get_group())
        return loss_sum.item()

    def _local_batch(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return local_batch(batch, self.device, self.dims, self.recipe)

    def _pipeline_micro_step(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        spec = self.recipe.supports.pipeline
        target = batch[spec.target_key] if self.is_last_stage else None
        stage_kwargs = {}
        if self.cfg.train.fused_cross_entropy:
            # The last stage computes the loss in its forward: its targets go in as a keyword (the schedule
            # splits keywords into microbatches like inputs and hands them to every stage of this rank),
            # and not positionally to the first stage, which may sit on the same rank.
            batch = {k: v for k, v in batch.items() if k != spec.target_key}
            stage_kwargs = {spec.target_kwarg: target} if self.is_last_stage else {}
        inputs = self.recipe.step.model_inputs(batch) if self.is_first_stage else ()
        if self._schedule_can_skip_outputs:
            # Only the losses are used: don't concatenate the last stage's microbatch outputs (the full
            # logits, or the per-microbatch scalar losses of a fused loss, which cannot be concatenated).
            stage_kwargs["return_outputs"] = False
        losses: list[torch.Tensor] = []
        with self.loss_context(), self.engine.autocast():
            self.schedule.step(*inputs, target=target, losses=losses, **stage_kwargs)
        if not losses:
            return torch.zeros((), device=self.device)
        return torch.stack([_full(x.detach()).float() for x in losses]).mean()

    def fit(self) -> list[dict[str, float]]:
        cfg = self.cfg
        logger = MetricLogger(
            cfg.metrics,
            str(self.run_dir),
            self.rank,
            config_to_dict(cfg),
            unit=self.recipe.data.unit,
            total_steps=cfg.train.steps,
        )
        try:
            self._announce(logger)
            self._start_fault_handling()
            history = []
            while self.step < cfg.train.steps:
                self.watchdog.arm(f"step {self.step + 1}")
                start = time.perf_counter()
                metrics = self.train_step()
                if self.device.type == "cuda":
                    torch.cuda.synchronize()
                seconds = time.perf_counter() - start
                if cfg.train.abort_on_nan and not math.isfinite(metrics["loss"]):
                    raise NonFiniteLossError(f"loss is {metrics['loss']} at step {self.step}; stopping")
                flops = self.flops_per_sample * cfg.train.global_batch_size
                metrics.update(
                    step_time_s=seconds,
                    throughput=self.units_per_step / seconds,
                    mfu=mfu(flops, seconds, self.dims.world_size, self.peak),
                    mem_gib=peak_memory_gib(self.device),
                )
                history.append({"step": self.step, **metrics})
                if self.step % cfg.train.log_interval == 0 or self.step == cfg.train.steps:
                    logger.log(self.step, metrics)
                if (
                    cfg.eval.interval
                    and self.recipe.evaluation.evaluate is not None
                    and (self.step % cfg.eval.interval == 0 or self.step == cfg.train.steps)
                ):
                    self.evaluate(logger)
                if self._after_step(logger):
                    break
            self.checkpointer.close()  # publish an async save still in flight, stop its writer thread
            return history
        finally:
            self._stop_fault_handling()
            logger.close()
            self.loader.close()

    def evaluate(self, logger: MetricLogger) -> dict[str, float]:
        self.model.eval()
        ema = self.ema.swapped_into(self.model) if self.ema is not None else contextlib.nullcontext(self.model)
        try:
            with torch.no_grad(), ema as model:
                results = self.recipe.evaluation.evaluate(model, self.cfg, self.dims, self.step, logger) or {}
        finally:
            self.model.train()
        if results:
            logger.log(self.step, {f"eval/{k}": v for k, v in results.items()})
        return results

    def _announce(self, logger: MetricLogger) -> None:
        cfg, dims = self.cfg, self.dims
        resumed = self.maybe_resume()
        data_init = self.recipe.model.data_init
        if data_init is not None and self.step == 0 and not cfg.checkpoint.load_path:
            resumed = "\n".join(filter(None, [resumed, data_init(self.model, cfg, self.loader.dataset)]))
        lines = [
            f"scaletrain: recipe {cfg.recipe} | {self.num_params / 1e6:.2f}M params | "
            f"{self.flops_per_sample / 1e9:.3f} GFLOP/sample (fwd+bwd)",
            f"layout: {self.engine.description} on {dims.world_size} x {self.device.type} | "
            f"global batch {cfg.train.global_batch_size} = dp {dims.dp_size} x micro {self.micro_batch_size} x "
            f"accum {grad_accum_steps(cfg, dims)} | dtype {cfg.train.dtype}",
            f"data: {len(self.loader.dataset)} samples | run dir {self.run_dir}",
            f"mfu: {self.peak_note}",
        ]
        if self.recipe.model.startup_notes is not None:  # recipe lines, e.g. which kernels run
            lines += self.recipe.model.startup_notes(self.model_parts[0], cfg, dims)
        if resumed:
            lines.append(resumed)
        for line in lines:
            logger.log_text(line)


def run(cfg: JobConfig, dims: ParallelDims | None = None) -> list[dict[str, float]]:
    """Build and train (validating first unless given the layout validation returned); returns the per-step
    metrics (on every rank)."""
    if dims is None:
        dims = validate_config(cfg, world_size_from_env())
    dataset = get_recipe(cfg.recipe).data.build_dataset(cfg)
    info = init_distributed(cfg.parallel.backend, cfg.parallel.timeout_s)
    finished = False
    try:
        trainer = Trainer(cfg, dims, dataset, info.device)
        history = trainer.fit()
        # Drop every object that may still reference in-flight gloo work (FSDP/DDP reduce
        # handles) while all ranks are alive; see destroy_distributed.
        del trainer
        finished = True
        return history
    finally:
        destroy_distributed(wait_for_peers=finished)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    path = argv.pop(0) if argv and not argv[0].startswith("--") else None
    try:
        # Every config problem surfaces here, before a process group or model exists.
        cfg = load_config(path, argv)
        dims = validate_config(cfg, world_size_from_env())
    except ValueError as exc:
        print(f"scaletrain: config error: {exc}", file=sys.stderr)
        raise SystemExit(2) from exc
    try:
        run(cfg, dims)
    except (NonFiniteLossError, CheckpointError) as exc:
        print(f"scaletrain: error: {exc}", file=sys.stderr)
        raise SystemExit(1) from exc


if __name__ == "__main__":
    run_as_worker(main)
