"""`scaletrain bench`: scaletrain's step vs plain hand-written PyTorch loops, in one run.

The baselines, each trained by the same plain loop (AdamW, autocast, clip, step) on the same batches:
- "plain loop, scaletrain's model": the recipe's own model module, so the ratio isolates the framework's
  overhead (config plumbing, DTensor/mesh machinery, metrics) from the model's cost;
- the recipe's independent baselines (`Recipe.evaluation.bench_baselines`): models that share no code with the
  recipe's (the GPT recipe: a hand-written Llama and transformers' model of the same shape), so a slow
  model file shows too.
All loops are timed in alternating rounds and each reports its median round, so drift in machine load
(thermal, other processes) hits them equally.

  scaletrain bench scaletrain/recipes/gpt/configs/tiny.yaml --bench-steps 20 --bench-rounds 3

A recipe can add its own rows: when its `sample` hook has a `benchmark(model, cfg, rounds)`
method returning (what, rate, unit) rows, the trained model is timed by it too and the rows
are appended to the report (the diffusion recipes report sampling images/s this way). The core
only looks the hook up on the registered recipe; it never names a family.
"""

from __future__ import annotations

import contextlib
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from scaletrain.bench_pipeline import (
    PipelineBenchResult,
    TimelineRecorder,
    draw_timeline,
    gather_events,
    measured_bubble,
    theoretical_bubble,
)
from scaletrain.checkpoint import Checkpointer
from scaletrain.config import JobConfig
from scaletrain.config.schema import TORCH_DTYPES
from scaletrain.data import ShardedLoader
from scaletrain.distributed import destroy_distributed, init_distributed, world_size_from_env
from scaletrain.metrics import mfu
from scaletrain.parallel import init_model
from scaletrain.parallel.batching import pipeline_microbatches
from scaletrain.registry import get_recipe
from scaletrain.train import Trainer
from scaletrain.validate import validate_config

PLAIN = "plain loop, scaletrain's model"


@dataclass
class BenchResult:
    unit: str
    scaletrain_rate: float
    scaletrain_mfu: float | None
    # Every baseline loop: name -> (rate, mfu); PLAIN first.
    baselines: dict[str, tuple[float, float | None]]
    peak_note: str
    steps: int
    rounds: int
    # The recipe's own measurements (e.g. sampling): (what, rate, unit) rows.
    recipe_rows: list[tuple[str, float, str]] = field(default_factory=list)
    # With checkpointing on: scaletrain's rate after a checkpoint save, and its ratio to the plain loop then.
    after_save: tuple[float, float] | None = None

    @property
    def baseline_rate(self) -> float:
        return self.baselines[PLAIN][0]

    def ratio(self, baseline: str = PLAIN) -> float:
        return self.scaletrain_rate / self.baselines[baseline][0]

    def report(self) -> str:
        def fmt_mfu(value: float | None) -> str:
            return "n/a" if value is None else f"{100 * value:.1f}%"

        width = max(len(name) for name in [*self.baselines, "scaletrain"])
        rows = [f"{'loop':<{width}} {self.unit + '/s':>14} {'mfu':>8} {'scaletrain / loop':>18}"]
        rows.append(f"{'scaletrain':<{width}} {self.scaletrain_rate:>14.1f} {fmt_mfu(self.scaletrain_mfu):>8}")
        for name, (rate, value) in self.baselines.items():
            rows.append(f"{name:<{width}} {rate:>14.1f} {fmt_mfu(value):>8} {self.ratio(name):>18.3f}")
        if self.after_save is not None:
            rate, ratio = self.after_save
            rows.append(
                f"{'scaletrain after a save':<{width}} {rate:>14.1f} {'':>8} {ratio:>18.3f} (vs the plain loop, "
                f"timed again; before the save {self.ratio():.3f})"
            )
        return "\n".join(
            [
                *rows,
                f"median of {self.rounds} rounds x {self.steps} steps; a ratio below 1 means scaletrain is slower",
                f"mfu: {self.peak_note}",
                *(f"{what}: {rate:.2f} {unit}/s" for what, rate, unit in self.recipe_rows),
            ]
        )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class PlainLoop:
    """What a user would write by hand: model, AdamW, autocast, clip, step.

    `model` is the recipe's own module (loss from the recipe), or an independent baseline whose
    forward(batch) returns the loss itself."""

    def __init__(self, trainer: Trainer, model: torch.nn.Module | None = None):
        cfg, recipe = trainer.cfg, trainer.recipe
        self.cfg, self.recipe, self.device = cfg, recipe, trainer.device
        self.own_loss = model is not None
        if model is None:
            model = recipe.model.build(cfg.model).to(trainer.device)
            init_model(model, trainer.device, cfg.job.seed)
        self.model = model.to(trainer.device)
        fused = cfg.train.fused_optimizer and trainer.device.type == "cuda"

        def adamw(params, lr: float, betas: tuple[float, float]) -> torch.optim.AdamW:
            return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=cfg.train.weight_decay,
                                     fused=fused or None, foreach=None if fused else True)  # fmt: skip

        default_betas = (cfg.train.beta1, cfg.train.beta2)
        # Several networks (a GAN): one AdamW per phase over its own network, as a hand-written GAN loop has.
        self.phases = recipe.step.phases(cfg) if recipe.step.phases and not self.own_loss else [None]
        self.optimizers = [
            adamw(self.model.parameters(), cfg.train.lr, default_betas)
            if phase is None
            else adamw(self.model.get_submodule(phase.trains).parameters(), phase.lr or cfg.train.lr,
                       phase.betas or default_betas)  # fmt: skip
            for phase in self.phases
        ]
        self.steps_done = 0
        self.autocast = (
            (lambda: torch.autocast(trainer.device.type, dtype=TORCH_DTYPES[cfg.train.dtype]))
            if cfg.train.dtype != "fp32"
            else contextlib.nullcontext
        )
        self.loader = ShardedLoader(
            trainer.loader.dataset,
            global_batch_size=cfg.train.global_batch_size,
            micro_batch_size=trainer.micro_batch_size,
            dp_rank=0,
            dp_size=1,
            seed=cfg.job.seed,
        )

    def train_step(self) -> None:
        batches = self.loader.next_step()
        micro_batches = [{k: v.to(self.device, non_blocking=True) for k, v in b.items()} for b in batches]
        self.steps_done += 1
        for phase, optimizer in zip(self.phases, self.optimizers, strict=True):
            if phase is not None and self.steps_done % phase.every:
                continue
            kwargs = {} if phase is None else {"phase": phase.name}
            for batch in micro_batches:
                with self.autocast():
                    if self.own_loss:
                        loss = self.model(batch)
                    else:
                        output = self.model(*self.recipe.step.model_inputs(batch), **kwargs)
                        loss = self.recipe.step.loss(output, batch)
                loss = loss / len(micro_batches)
                loss.backward()
            params = [p for group in optimizer.param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(params, self.cfg.train.grad_clip or float("inf"))
            optimizer.step()
            self.model.zero_grad(set_to_none=True)  # a phase's backward also reaches the other network
            loss.item()  # the trainer reads the loss every step too


def _timed(step_fn, steps: int, device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step_fn()
    _sync(device)
    return time.perf_counter() - start


def _bench_config(cfg: JobConfig, total_steps: int) -> bool:
    """Bench settings in place; returns whether checkpointing was on (then the bench also times steps after a
    save, which it writes to a temporary folder: the run folder is never touched)."""
    with_save = cfg.checkpoint.enable
    cfg.checkpoint.enable = False
    cfg.checkpoint.resume = False
    cfg.metrics.tensorboard = False
    cfg.train.steps = max(cfg.train.steps, total_steps * 2)
    return with_save


def bench_pipeline(cfg: JobConfig, steps: int = 5, warmup: int = 2) -> PipelineBenchResult:
    """Under torchrun with pp > 1: throughput plus measured vs theoretical bubble, and a timeline PNG."""
    _bench_config(cfg, warmup + steps)
    dims = validate_config(cfg, world_size_from_env())
    if not dims.pp_enabled:
        raise ValueError("scaletrain bench under torchrun measures pipelines; set parallel.pp > 1")
    recipe = get_recipe(cfg.recipe)
    dataset = recipe.data.build_dataset(cfg)
    info = init_distributed(cfg.parallel.backend, cfg.parallel.timeout_s)
    try:
        trainer = Trainer(cfg, dims, dataset, info.device)
        recorder = TimelineRecorder(trainer.pipeline_stages, dist.get_rank())
        for _ in range(warmup):
            trainer.train_step()
        bubbles, seconds, last_events = [], [], []
        for _ in range(steps):
            recorder.clear()
            dist.barrier()
            start = time.perf_counter()
            trainer.train_step()
            seconds.append(time.perf_counter() - start)
            last_events = gather_events(recorder.events)
            bubbles.append(measured_bubble(last_events, dist.get_world_size()))
        png = None
        if dist.get_rank() == 0:
            trainer.run_dir.mkdir(parents=True, exist_ok=True)
            png = draw_timeline(last_events, dist.get_world_size(), trainer.run_dir / "pipeline_timeline.png")
        p = cfg.parallel
        microbatches = pipeline_microbatches(cfg, dims)
        return PipelineBenchResult(
            schedule=p.pp_schedule,
            pp=dims.pp,
            microbatches=microbatches,
            stages_per_rank=p.stages_per_rank,
            measured=min(bubbles),
            measured_median=statistics.median(bubbles),
            theory=theoretical_bubble(p.pp_schedule, dims.pp, microbatches, p.stages_per_rank),
            rate=trainer.units_per_step / statistics.median(seconds),
            unit=recipe.data.unit,
            timeline_png=png,
        )
    finally:
        destroy_distributed()


def bench(cfg: JobConfig, steps: int = 10, warmup: int = 3, rounds: int = 3) -> BenchResult:
    """Single process: the baseline is a one-device loop, so the comparison is one device."""
    if world_size_from_env() != 1:
        raise ValueError(
            "scaletrain bench compares against a one-process loop; run it without torchrun "
            "(under torchrun it measures pipeline bubbles, with parallel.pp > 1)"
        )
    with_save = _bench_config(cfg, warmup + steps * rounds * 2)
    dims = validate_config(cfg, 1)
    recipe = get_recipe(cfg.recipe)
    dataset = recipe.data.build_dataset(cfg)
    info = init_distributed(cfg.parallel.backend, cfg.parallel.timeout_s)
    try:
        trainer = Trainer(cfg, dims, dataset, info.device)
        loops = {PLAIN: PlainLoop(trainer)}
        baselines = recipe.evaluation.bench_baselines
        for name, build in (baselines(cfg) if baselines else {}).items():
            torch.manual_seed(cfg.job.seed)
            loops[name] = PlainLoop(trainer, build())
        for _ in range(warmup):
            trainer.train_step()
            for loop in loops.values():
                loop.train_step()
        times: dict[str, list[float]] = {name: [] for name in ["scaletrain", *loops]}
        for _ in range(rounds):
            for name, loop in loops.items():
                times[name].append(_timed(loop.train_step, steps, info.device))
            times["scaletrain"].append(_timed(trainer.train_step, steps, info.device))
        units = trainer.units_per_step * steps
        flops = trainer.flops_per_sample * cfg.train.global_batch_size * steps
        seconds = {name: statistics.median(t) for name, t in times.items()}
        rows = recipe_benchmarks(trainer, rounds)
        after_save = None
        if with_save:
            # Steps must not slow down once a checkpoint was written (tests/checkpoint/test_save_step_time.py).
            # With the run's checkpoint.async_mode: an async save leaves a writer thread behind.
            # Timed against the plain loop again, so drift in machine load does not read as a slowdown.
            after, plain_after = [], []
            with tempfile.TemporaryDirectory(prefix="scaletrain-bench-") as tmp:
                checkpointer = Checkpointer(Path(tmp), keep=1, async_mode=cfg.checkpoint.async_mode)
                trainer.save(checkpointer)
                checkpointer.finish()
                for _ in range(rounds):
                    plain_after.append(_timed(loops[PLAIN].train_step, steps, info.device))
                    after.append(_timed(trainer.train_step, steps, info.device))
                checkpointer.close()
            after_s = statistics.median(after)
            after_save = (units / after_s, statistics.median(plain_after) / after_s)
        st_s = seconds.pop("scaletrain")
        return BenchResult(
            unit=recipe.data.unit,
            scaletrain_rate=units / st_s,
            scaletrain_mfu=mfu(flops, st_s, 1, trainer.peak),
            baselines={name: (units / s, mfu(flops, s, 1, trainer.peak)) for name, s in seconds.items()},
            peak_note=trainer.peak_note,
            steps=steps,
            rounds=rounds,
            recipe_rows=rows,
            after_save=after_save,
        )
    finally:
        destroy_distributed()


def recipe_benchmarks(trainer: Trainer, rounds: int) -> list[tuple[str, float, str]]:
    """Rows from the recipe's `sample.benchmark` hook (see the module comment), on the trained model."""
    hook = getattr(trainer.recipe.evaluation.sample, "benchmark", None)
    if hook is None:
        return []
    trainer.model.eval()
    try:
        with torch.no_grad():
            return list(hook(trainer.model, trainer.cfg, rounds))
    finally:
        trainer.model.train()
