"""`scaletrain plan CONFIG --gpus N`: every layout of N GPUs, checked, timed and sized, best first.

Layouts are tp x pp x cp x data parallel (FSDP2 over what is left, or HSDP with one replica per node), each
with every activation-checkpointing mode and micro-batch size asked for. Each goes through the trainer's own
validation (a rejected one keeps its reason) and the step-time model (step_time.py, a formula); then, fastest
first, memory (ranks.py: model state and the activation peak, per pipeline rank, simulated) until enough fit:
a layout slower than those cannot rank above them, so it is left unsized unless asked. Rows are ranked by
tokens per second per GPU among those that fit the memory limit; the rest follow, with why.
"""

from __future__ import annotations

import csv
import itertools
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from scaletrain.config import MissingDataError, load_config
from scaletrain.config.schema import JobConfig
from scaletrain.engines import get_engine
from scaletrain.parallel.batching import micro_batch_size
from scaletrain.parallel.dims import ParallelDims
from scaletrain.plan.memory import GIB, display_unit
from scaletrain.plan.step_time import GPU, ModelFacts, StepTime, step_time
from scaletrain.registry import get_recipe
from scaletrain.validate import validate_config

MULTI_STAGE = {"interleaved_1f1b": 2, "zero_bubble": 2, "zbv": 2, "dualpipev": 2}  # stages per rank


@dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    cp: int
    dp_replicate: int
    dp_shard: int
    ac: str
    micro_batch: int = 0  # samples per rank per forward; 0 = the config's (global batch / dp unless it sets one)
    ep: int = 1  # expert parallel, borrowed from dp_shard x cp
    schedule: str = ""  # pipeline schedule; "" = the config's
    microbatches: int = 0  # pipeline microbatches; 0 = the config's
    zero_stage: int = -1  # DeepSpeed's ZeRO stage 0-3 (engine.name=deepspeed, over dp_shard); -1 = native engine

    @property
    def overrides(self) -> list[str]:
        pipeline = []
        if self.schedule:
            stages = MULTI_STAGE.get(self.schedule, 1)
            pipeline += ["--parallel.pp_schedule", self.schedule, "--parallel.stages_per_rank", str(stages)]
        if self.microbatches:
            pipeline += ["--parallel.microbatches", str(self.microbatches)]
        if self.zero_stage >= 0:
            pipeline += ["--engine.name", "deepspeed", "--engine.deepspeed.zero_stage", str(self.zero_stage)]
        return ["--parallel.tp", str(self.tp), "--parallel.pp", str(self.pp), "--parallel.dp_replicate",
                str(self.dp_replicate), "--parallel.dp_shard", str(self.dp_shard), "--parallel.cp", str(self.cp),
                "--parallel.ep", str(self.ep), "--activation_checkpoint.mode", self.ac, *pipeline,
                *(["--train.micro_batch_size", str(self.micro_batch)] if self.micro_batch else [])]  # fmt: skip

    @property
    def name(self) -> str:
        data = f"hsdp{self.dp_replicate}x{self.dp_shard}" if self.dp_replicate > 1 else f"fsdp{self.dp_shard}"
        if self.zero_stage >= 0:
            data = f"zero{self.zero_stage} dp{self.dp_shard}"
        pipeline = f"pp{self.pp}" if self.pp > 1 else ""
        if pipeline and (self.schedule or self.microbatches):
            pipeline += f"({self.schedule or 'config'}" + (f"/m{self.microbatches})" if self.microbatches else ")")
        parts = [f"tp{self.tp}" if self.tp > 1 else "", pipeline, f"cp{self.cp}" if self.cp > 1 else "", data,
                 f"ep{self.ep}" if self.ep > 1 else "", f"ac={self.ac}",
                 f"mbs={self.micro_batch}" if self.micro_batch else ""]  # fmt: skip
        return " ".join(p for p in parts if p)


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
    sized: bool = False  # memory predicted (the search sizes the fastest layouts until enough of them fit)
    micro_batch: int = 0  # samples per rank per forward
    state_floor: int = 0  # model_state_floor: a bound known before any simulation
    # The validated config and dims `timed` made, kept for `sized` (one load and validation per layout).
    cfg: JobConfig | None = field(default=None, compare=False, repr=False)
    dims: ParallelDims | None = field(default=None, compare=False, repr=False)


def layouts(gpus: int, gpus_per_node: int, tps: list[int], pps: list[int], acs: list[str], cps: list[int] = (1,),
            micro_batches: list[int] = (0,), eps: list[int] = (1,), schedules: list[str] = ("",),
            pipeline_microbatches: list[int] = (0,), zero_stages: list[int] = ()) -> list[Layout]:  # fmt: skip
    """Every combination that divides `gpus`; pipeline schedules and microbatch counts only where pp > 1, expert
    parallel only where it divides the data-parallel ranks it is carved from (dp_shard x cp); DeepSpeed's
    `zero_stages` over all the GPUs (its data parallelism is all it does)."""
    found = [Layout(1, 1, 1, 1, gpus, ac, mbs, zero_stage=stage)
             for stage, ac, mbs in itertools.product(zero_stages, acs, micro_batches)]  # fmt: skip
    for tp, pp, cp, ac, mbs, ep in itertools.product(tps, pps, cps, acs, micro_batches, eps):
        if gpus % (tp * pp * cp):
            continue
        dp = gpus // (tp * pp * cp)
        nodes = max(1, gpus // gpus_per_node)
        shardings = [(1, dp)]
        if 1 < nodes < dp and dp % nodes == 0:  # HSDP: shard inside a node, replicate across nodes
            shardings.append((nodes, dp // nodes))
        pipelines = itertools.product(schedules, pipeline_microbatches) if pp > 1 else [("", 0)]
        for (replicas, shard), (schedule, count) in itertools.product(shardings, list(pipelines)):
            if (shard * cp) % ep == 0:
                found.append(Layout(tp, pp, cp, replicas, shard, ac, mbs, ep, schedule, count))
    return found


def model_facts(cfg: JobConfig) -> ModelFacts:
    """FLOPs and parameters from the meta-device model; the trunk activation from a two-stage split of it (its
    first stage's output), for recipes that declare a pipeline trunk. A trunk of like blocks is counted on
    copies one and two blocks deep and carried to its depth, as ranks.py does with memory: both counts are
    linear in depth, exactly (Llama-3-70B: 2.4 s at 80 blocks, 0.12 s for the two copies)."""
    from scaletrain.plan.shards import trunk_elements_per_sample

    pipeline = get_recipe(cfg.recipe).supports.pipeline
    depth = pipeline.trunk_depth(cfg.model) if pipeline is not None else 0
    copies = None
    if pipeline is not None and pipeline.with_trunk_depth is not None and depth > 2:
        copies = [pipeline.with_trunk_depth(cfg.model, n) for n in (1, 2)]
    if copies is None or None in copies:
        flops, parameters, trainable = _counts(cfg)
    else:
        one, two = (_counts(replace(cfg, model=m)) for m in copies)
        flops, parameters, trainable = (a + (depth - 1) * (b - a) for a, b in zip(one, two, strict=True))
    routing = get_recipe(cfg.recipe).model.expert_routing
    expert_blocks, top_k = routing(cfg.model) if routing is not None else (0, 0)
    if pipeline is None:
        return ModelFacts(flops, parameters, 0, 0, trainable, expert_blocks, top_k)
    split = replace(cfg.parallel, pp=2, tp=1, cp=1, dp_shard=1, dp_replicate=1, ep=1, stages_per_rank=1,
                    pp_schedule="1f1b", pp_layer_boundaries=[])  # fmt: skip
    two_stages = replace(cfg, parallel=split, model=copies[1] if copies and copies[1] is not None else cfg.model)
    trunk = trunk_elements_per_sample(two_stages, ParallelDims.resolve(two_stages.parallel.degrees, 2))
    return ModelFacts(flops, parameters, trunk, depth, trainable, expert_blocks, top_k)


def _counts(cfg: JobConfig) -> tuple[int, int, int]:
    """Training FLOPs per sample, parameters and trainable parameters of the config's model."""
    from scaletrain.plan.summary import model_summary

    with torch.device("meta"):
        model = get_recipe(cfg.recipe).model.build(cfg.model)
    summary = model_summary(cfg, model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return int(summary["train_flops_per_sample"]), int(summary["parameters"]), trainable


def model_state_floor(cfg: JobConfig, dims: ParallelDims, facts: ModelFacts) -> int:
    """The fewest bytes of model state the fullest rank can hold: each parameter's fp32 master, and for the
    trainable ones a gradient and AdamW's two moments (and EMA's copy), spread over the ranks that split them
    (the fullest holds at least their mean). What ranks.py simulates is never less."""
    plan_cost = get_engine(cfg.engine.name).plan_cost
    if plan_cost is not None:  # the engine's own account (DeepSpeed's ZeRO formulas), exact
        cost = plan_cost(cfg, dims, facts.parameters, facts.trainable or facts.parameters)
        ema = 4 * (facts.trainable or facts.parameters) if cfg.train.ema_decay > 0 else 0
        return cost.parameter_bytes + cost.gradient_bytes + cost.optimizer_bytes + ema
    per_trainable = 16 + (4 if cfg.train.ema_decay > 0 else 0)
    total = 4 * (facts.parameters - facts.trainable) + per_trainable * facts.trainable
    sharded = dims.fsdp_enabled or dims.hsdp_enabled
    return total // (dims.tp * dims.pp * (dims.dp_shard * dims.cp if sharded else 1))


@dataclass(frozen=True)
class Cluster:
    gpus: int
    gpu: GPU
    gpus_per_node: int
    efficiency: float  # achieved fraction of the GPU's peak FLOP rate
    limit_gib: float


def timed(config: str, overrides: list[str], layout: Layout, cluster: Cluster, facts: ModelFacts) -> Row:
    """The layout validated as the trainer validates it, and timed (step_time.py); not yet sized."""
    cfg = load_config(config, [*overrides, *layout.overrides])
    try:
        dims = validate_config(cfg, cluster.gpus)
    except MissingDataError:
        raise  # no layout can be sized without the data's shapes: one error, not one per layout
    except ValueError as exc:
        return Row(layout, rejected=str(exc))
    time = step_time(cfg, dims, cluster.gpu, cluster.gpus_per_node, cluster.efficiency, facts)
    units = get_recipe(cfg.recipe).data.units_per_sample(cfg)
    tokens = cfg.train.global_batch_size * units / time.step_s / cluster.gpus
    flops = facts.flops_per_sample * cfg.train.global_batch_size / time.step_s / cluster.gpus
    gpu = cluster.gpu
    peak = (gpu.bf16_tflops if cfg.train.dtype in ("bf16", "fp16") else gpu.fp32_tflops) * 1e12
    return Row(layout, time=time, tokens_per_gpu_s=tokens, mfu=flops / peak, micro_batch=micro_batch_size(cfg, dims),
               state_floor=model_state_floor(cfg, dims, facts), cfg=cfg, dims=dims)  # fmt: skip


def sized(row: Row, cluster: Cluster, jobs: int = 1) -> Row:
    """`row` (a timed one) with its fullest pipeline rank's predicted memory, rejected when over the limit."""
    from scaletrain.plan.ranks import plan_memory

    try:
        fullest = max(plan_memory(row.cfg, row.dims, jobs=jobs), key=lambda rank: rank.total)
    except ValueError as exc:
        return replace(row, rejected=f"not simulated: {exc}", sized=True)
    memory = fullest.total
    over = memory > cluster.limit_gib * GIB
    rejected = f"needs {memory / GIB:.3g} GiB > {cluster.limit_gib:g}" if over else ""
    return replace(row, rejected=rejected, memory_bytes=memory, state_bytes=fullest.state.total,
                   activation_bytes=fullest.activations, sized=True)  # fmt: skip


MORE_CHECKPOINTING = {"none": 0, "selective": 1, "full": 2}  # keeps less activation memory, left to right


def _needs_at_least(row: Row, other: Row) -> bool:
    """`row` needs no less memory than `other`: the same pipeline split, and no more activation checkpointing,
    no smaller micro-batch, no more tensor or context parallel and no fewer replicas (with as many GPUs, those
    shard the model state and the activations over fewer ranks, never more)."""
    a, b = row.layout, other.layout
    return (
        (a.pp, a.schedule, a.microbatches, a.zero_stage) == (b.pp, b.schedule, b.microbatches, b.zero_stage)
        and a.ep <= b.ep
        and MORE_CHECKPOINTING[a.ac] <= MORE_CHECKPOINTING[b.ac]
        and row.micro_batch >= other.micro_batch
        and a.tp <= b.tp
        and a.cp <= b.cp
        and a.dp_replicate >= b.dp_replicate
    )


def search(config: str, overrides: list[str], candidates: list[Layout], cluster: Cluster, enough: int | None,
           jobs: int = 1) -> list[Row]:  # fmt: skip
    """Every candidate timed; then sized fastest first until `enough` fit (None: all simulated). Timing is a formula
    and sizing a simulation, and a layout slower than `enough` that fit cannot enter the ranking above them:
    so only the ones that could are simulated. Before a layout, the least needy one it needs at least as much
    as (_needs_at_least; with the same checkpointing) is sized, and then its own smallest micro-batch: when one
    of them does not fit, neither does this one, nor any other that needs at least as much, and those are
    rejected without a simulation."""
    facts = model_facts(load_config(config, overrides))
    rows = [timed(config, overrides, c, cluster, facts) for c in candidates]
    rows.sort(key=lambda r: -r.tokens_per_gpu_s)
    index = {r.layout: i for i, r in enumerate(rows)}

    limit = cluster.limit_gib * GIB

    def size(i: int) -> None:
        too_big = [r for r in rows if r.sized and r.memory_bytes > limit]
        bound = next((r for r in too_big if _needs_at_least(rows[i], r)), None) if enough is not None else None
        if enough is not None and rows[i].state_floor > limit:
            rows[i] = replace(rows[i], sized=True, rejected=f"model state alone needs at least "
                              f"{rows[i].state_floor / GIB:.3g} GiB > {cluster.limit_gib:g}")  # fmt: skip
        elif bound is None:
            rows[i] = sized(rows[i], cluster, jobs)
        else:
            rows[i] = replace(rows[i], sized=True, rejected=f"needs more than {bound.layout.name}: "
                              f"{bound.memory_bytes / GIB:.3g} GiB > {cluster.limit_gib:g}")  # fmt: skip

    for n, row in enumerate(list(rows)):
        # Fits sized ahead of their turn (as another's bound) are slower: they count once they are reached.
        if row.time is None or (enough is not None and sum(r.sized and not r.rejected for r in rows[:n]) >= enough):
            continue
        below = [r for r in rows if r.time is not None and r.layout.ac == row.layout.ac and _needs_at_least(row, r)]
        least = min(below, key=lambda r: (r.micro_batch, -r.layout.tp, -r.layout.cp, -r.layout.ep,
                                          r.layout.dp_replicate))  # fmt: skip
        # Then its own smallest micro-batch: when the least needy fits, that one may not (and bounds its family).
        family = [r for r in below if r.layout == replace(row.layout, micro_batch=r.layout.micro_batch)]
        smallest = min(family, key=lambda r: r.micro_batch)
        for r in (least, smallest, row):
            if not rows[index[r.layout]].sized:
                size(index[r.layout])
    return ranked(rows)


def ranked(rows: list[Row]) -> list[Row]:
    """Those that fit, fastest first; then those left unsized (fastest first); then those that do not fit
    (smallest first); then the invalid ones."""
    fits = sorted((r for r in rows if r.sized and not r.rejected), key=lambda r: -r.tokens_per_gpu_s)
    unsized = sorted((r for r in rows if r.time is not None and not r.sized), key=lambda r: -r.tokens_per_gpu_s)
    too_big = sorted((r for r in rows if r.sized and r.rejected), key=lambda r: (not r.memory_bytes, r.memory_bytes))
    invalid = [r for r in rows if r.time is None]
    return fits + unsized + too_big + invalid


def columns(unit: str) -> list[str]:
    """The table's header; `unit` is what the recipe counts (tokens, images, ...)."""
    return ["layout", f"{unit}/s/GPU", "MFU", "memory GiB", "compute s", "fsdp s", "replicate s", "tp s", "ep s",
            "bubble", "step s", "rejected"]  # fmt: skip


NOT_SIZED = "not sized: slower than the fastest that fit (--size-all sizes it)"


def row_cells(row: Row) -> list[str]:
    t = row.time
    if t is None:
        return [row.layout.name, "", "", "", "", "", "", "", "", "", "", row.rejected]
    memory = f"{row.memory_bytes / GIB:.3g}" if row.memory_bytes else ""
    why = row.rejected if row.sized else NOT_SIZED
    return [row.layout.name, f"{row.tokens_per_gpu_s:,.0f}", f"{row.mfu:.1%}", memory,
            f"{t.compute_s:.3g}", f"{t.fsdp_s:.3g}", f"{t.replicate_s:.3g}", f"{t.tp_s:.3g}", f"{t.ep_s:.3g}",
            f"{t.bubble:.2f}", f"{t.step_s:.3g}", why]  # fmt: skip


def write_csv(rows: list[Row], path: Path, unit: str) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns(unit))
        writer.writerows(row_cells(r) for r in rows)


def write_pngs(rows: list[Row], folder: Path, limit_gib: float) -> list[Path]:
    """memory.png: each sized layout's fullest rank, model state and activations stacked, against the limit;
    step_time.png: each sized layout's step split into compute, exposed FSDP, replicate, TP, EP and bubble."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plotted = [r for r in rows if r.memory_bytes and r.time is not None]
    names = [r.layout.name for r in plotted]
    folder.mkdir(parents=True, exist_ok=True)
    fig, axis = plt.subplots(figsize=(8, 0.35 * len(plotted) + 1.5))
    largest = max(r.memory_bytes for r in plotted)
    unit, scale = display_unit(largest)
    state = [r.state_bytes / scale for r in plotted]
    axis.barh(names, state, color="tab:orange", label="model state")
    axis.barh(names, [r.activation_bytes / scale for r in plotted], left=state, color="tab:blue", label="activations")
    if limit_gib * GIB <= 1.5 * largest:  # a limit far beyond every bar would flatten them
        axis.axvline(limit_gib * GIB / scale, color="black", linestyle="--", label=f"limit {limit_gib:g} GiB")
    axis.set_xlabel(f"{unit} on the fullest rank (limit {limit_gib:g} GiB)")
    memory = _save(fig, axis, folder / "memory.png")

    fig, axis = plt.subplots(figsize=(8, 0.35 * len(plotted) + 1.5))
    left = [0.0] * len(plotted)
    parts = {
        "compute": [r.time.compute_s for r in plotted],
        "exposed FSDP": [r.time.exposed_fsdp_s for r in plotted],
        "replicate": [r.time.replicate_s for r in plotted],
        "TP": [r.time.tp_s for r in plotted],
        "EP": [r.time.ep_s for r in plotted],
        "bubble": [r.time.step_s * r.time.bubble for r in plotted],
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
