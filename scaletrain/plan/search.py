"""`scaletrain plan CONFIG --gpus N`: every layout of N GPUs, checked, sized and timed, best first.

Layouts are tp x pp x data parallel (FSDP2 over what is left, or HSDP with one replica per node), each with
every activation-checkpointing mode asked for. Each goes through the trainer's own validation (a rejected one
keeps its reason), then memory (shards.py + simulate.py: model state and the activation peak, per pipeline
rank) and the step-time model (step_time.py). Rows are ranked by tokens per second per GPU among those that
fit the memory limit; the rest follow, with why.
"""

from __future__ import annotations

import csv
import itertools
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from scaletrain.config import load_config
from scaletrain.config.schema import JobConfig
from scaletrain.parallel.dims import ParallelDims
from scaletrain.plan.step_time import GPU, ModelFacts, StepTime, step_time
from scaletrain.registry import get_recipe
from scaletrain.validate import validate_config

GIB = 2**30


@dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    dp_replicate: int
    dp_shard: int
    ac: str

    @property
    def overrides(self) -> list[str]:
        return ["--parallel.tp", str(self.tp), "--parallel.pp", str(self.pp), "--parallel.dp_replicate",
                str(self.dp_replicate), "--parallel.dp_shard", str(self.dp_shard), "--parallel.cp", "1",
                "--activation_checkpoint.mode", self.ac]  # fmt: skip

    @property
    def name(self) -> str:
        data = f"hsdp{self.dp_replicate}x{self.dp_shard}" if self.dp_replicate > 1 else f"fsdp{self.dp_shard}"
        parts = [f"tp{self.tp}" if self.tp > 1 else "", f"pp{self.pp}" if self.pp > 1 else "", data]
        return " ".join(p for p in parts if p) + f" ac={self.ac}"


@dataclass(frozen=True)
class Row:
    layout: Layout
    rejected: str = ""  # why the layout cannot run (validation) or does not fit
    memory_bytes: int = 0  # the fullest pipeline rank's total
    state_bytes: int = 0  # of which model state
    activation_bytes: int = 0  # and activation peak
    time: StepTime | None = None
    tokens_per_gpu_s: float = 0.0
    mfu: float = 0.0


def layouts(gpus: int, gpus_per_node: int, tps: list[int], pps: list[int], acs: list[str]) -> list[Layout]:
    found = []
    for tp, pp, ac in itertools.product(tps, pps, acs):
        if gpus % (tp * pp):
            continue
        dp = gpus // (tp * pp)
        found.append(Layout(tp, pp, 1, dp, ac))
        nodes = max(1, gpus // gpus_per_node)
        if 1 < nodes < dp and dp % nodes == 0:  # HSDP: shard inside a node, replicate across nodes
            found.append(Layout(tp, pp, nodes, dp // nodes, ac))
    return found


def model_facts(cfg: JobConfig) -> ModelFacts:
    """FLOPs and parameters from the meta-device model; the trunk activation from a two-stage split of it (its
    first stage's output), for recipes that declare a pipeline trunk."""
    from scaletrain.plan.shards import trunk_elements_per_sample
    from scaletrain.plan.summary import model_summary

    summary = model_summary(cfg)
    flops, parameters = int(summary["train_flops_per_sample"]), int(summary["parameters"])
    pipeline = get_recipe(cfg.recipe).supports.pipeline
    if pipeline is None:
        return ModelFacts(flops, parameters, 0, 0)
    split = replace(cfg.parallel, pp=2, tp=1, cp=1, dp_shard=1, dp_replicate=1, ep=1, stages_per_rank=1,
                    pp_schedule="1f1b", pp_layer_boundaries=[])  # fmt: skip
    two_stages = replace(cfg, parallel=split)
    dims = ParallelDims.resolve(two_stages.parallel.degrees, 2)
    return ModelFacts(flops, parameters, trunk_elements_per_sample(two_stages, dims), pipeline.trunk_depth(cfg.model))


def evaluate(config: str, overrides: list[str], layout: Layout, gpus: int, gpu: GPU, gpus_per_node: int,
             efficiency: float, facts: ModelFacts, limit_gib: float) -> Row:  # fmt: skip
    from scaletrain.plan.command import plan_memory

    cfg = load_config(config, [*overrides, *layout.overrides])
    try:
        dims = validate_config(cfg, gpus)
    except ValueError as exc:
        return Row(layout, rejected=str(exc))
    try:
        fullest = max(plan_memory(cfg, dims), key=lambda rank: rank.total)
    except ValueError as exc:
        return Row(layout, rejected=f"not simulated: {exc}")
    memory = fullest.total
    time = step_time(cfg, dims, gpu, gpus_per_node, efficiency, facts)
    units = get_recipe(cfg.recipe).data.units_per_sample(cfg)
    tokens = cfg.train.global_batch_size * units / time.step_s / gpus
    flops = facts.flops_per_sample * cfg.train.global_batch_size / time.step_s / gpus
    peak = (gpu.bf16_tflops if cfg.train.dtype in ("bf16", "fp16") else gpu.fp32_tflops) * 1e12
    rejected = f"needs {memory / GIB:.3g} GiB > {limit_gib:g}" if memory > limit_gib * GIB else ""
    return Row(layout, rejected, memory, fullest.state.total, fullest.activations, time, tokens, flops / peak)


def ranked(rows: list[Row]) -> list[Row]:
    """Those that fit, fastest first; then those that do not fit (smallest first); then the invalid ones."""
    fits = sorted((r for r in rows if not r.rejected), key=lambda r: -r.tokens_per_gpu_s)
    too_big = sorted((r for r in rows if r.rejected and r.time is not None), key=lambda r: r.memory_bytes)
    invalid = [r for r in rows if r.time is None]
    return fits + too_big + invalid


COLUMNS = ["layout", "tokens/s/GPU", "MFU", "memory GiB", "compute s", "fsdp s", "replicate s", "tp s",
           "bubble", "step s", "rejected"]  # fmt: skip


def row_cells(row: Row) -> list[str]:
    t = row.time
    if t is None:
        return [row.layout.name, "", "", "", "", "", "", "", "", "", row.rejected]
    return [row.layout.name, f"{row.tokens_per_gpu_s:,.0f}", f"{row.mfu:.1%}", f"{row.memory_bytes / GIB:.3g}",
            f"{t.compute_s:.3g}", f"{t.fsdp_s:.3g}", f"{t.replicate_s:.3g}", f"{t.tp_s:.3g}", f"{t.bubble:.2f}",
            f"{t.step_s:.3g}", row.rejected]  # fmt: skip


def write_csv(rows: list[Row], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(COLUMNS)
        writer.writerows(row_cells(r) for r in rows)


def write_pngs(rows: list[Row], folder: Path, limit_gib: float) -> list[Path]:
    """memory.png: each sized layout's fullest rank, model state and activations stacked, against the limit;
    step_time.png: each timed layout's step split into compute, exposed FSDP, replicate, TP and bubble."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timed = [r for r in rows if r.time is not None]
    names = [r.layout.name for r in timed]
    folder.mkdir(parents=True, exist_ok=True)
    fig, axis = plt.subplots(figsize=(8, 0.35 * len(timed) + 1.5))
    largest = max(r.memory_bytes for r in timed)
    unit, scale = ("GiB", GIB) if largest >= GIB else ("MiB", 2**20)
    state = [r.state_bytes / scale for r in timed]
    axis.barh(names, state, color="tab:orange", label="model state")
    axis.barh(names, [r.activation_bytes / scale for r in timed], left=state, color="tab:blue", label="activations")
    if limit_gib * GIB <= 1.5 * largest:  # a limit far beyond every bar would flatten them
        axis.axvline(limit_gib * GIB / scale, color="black", linestyle="--", label=f"limit {limit_gib:g} GiB")
    axis.set_xlabel(f"{unit} on the fullest rank (limit {limit_gib:g} GiB)")
    memory = _save(fig, axis, folder / "memory.png")

    fig, axis = plt.subplots(figsize=(8, 0.35 * len(timed) + 1.5))
    left = [0.0] * len(timed)
    parts = {
        "compute": [r.time.compute_s for r in timed],
        "exposed FSDP": [r.time.exposed_fsdp_s for r in timed],
        "replicate": [r.time.replicate_s for r in timed],
        "TP": [r.time.tp_s for r in timed],
        "bubble": [r.time.step_s * r.time.bubble for r in timed],
    }
    for label, values in parts.items():
        axis.barh(names, values, left=left, label=label)
        left = [a + b for a, b in zip(left, values, strict=True)]
    axis.set_xlabel("seconds per optimizer step")
    return [memory, _save(fig, axis, folder / "step_time.png")]


def _save(fig: Any, axis: Any, path: Path) -> Path:
    """Layouts top-down in ranked order, the legend outside the bars; written and closed."""
    import matplotlib.pyplot as plt

    axis.invert_yaxis()
    axis.legend(loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
