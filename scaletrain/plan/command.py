"""`scaletrain plan CONFIG`: what the config's layout needs per rank, before anything is launched.

For each pipeline rank (one line when pp = 1): the model state (shards.py + memory.py: parameters, gradients,
AdamW moments, EMA, buffers, pipeline receive buffers) and the activation peak (simulate.py: the step run on
fake tensors), their sum, and with --memory-limit-gb whether it fits. Exit status 1 when a rank does not fit.
"""

from __future__ import annotations

import gc
import os
import time
from dataclasses import asdict, replace
from pathlib import Path

from scaletrain.command_options import split_config, take_options
from scaletrain.config import load_config
from scaletrain.config.schema import ClusterSection
from scaletrain.parallel.batching import micro_batch_size
from scaletrain.parallel.dims import implied_world_size
from scaletrain.parallel.pipeline import SCHEDULE_NAMES
from scaletrain.plan.memory import GIB, display_unit
from scaletrain.plan.ranks import RankMemory, plan_memory, shallow_depths
from scaletrain.plan.search import (
    Cluster,
    columns,
    layouts,
    row_cells,
    search,
    write_csv,
    write_pngs,
)
from scaletrain.plan.step_time import AC_RECOMPUTE, GPU, GPUS
from scaletrain.registry import get_recipe
from scaletrain.validate import validate_config

USAGE = """usage: scaletrain plan CONFIG [--memory-limit-gb G] [--world-size N] [--exact] [--jobs J] [overrides]
       scaletrain plan CONFIG --calibrate [--steps 6] [--world-size N] [overrides]
       scaletrain plan CONFIG --gpus N [--gpu h100|h200|a100] [--gpus-per-node 8] [--top 10] [--tp 1,2,4,8]
                       [--pp 1,2,4] [--pp-schedule 1f1b,...] [--microbatches M,...] [--cp 1] [--ep 1]
                       [--ac none,selective,full] [--mbs 1,2,4] [--engines native,zero1,zero2,zero3]
                       [--efficiency 0.5]
                       [--intra-node-gbs B] [--inter-node-gbs B] [--memory-limit-gb G] [--size-all]
                       [--csv FILE] [--png DIR] [--jobs J] [overrides]
Per-rank memory of CONFIG's layout, predicted in this process without a GPU or a process group: the model
state from the layout's real parameter shards and the activation peak from its training step run on fake
tensors (the recipe's own parallelize, micro step and pipeline schedule). --memory-limit-gb: fail (exit 1)
when a rank's total exceeds it. Native engine or DeepSpeed ZeRO, one-loss recipes. A deep model is sized from
copies 3 and 4 blocks deep per stage, carried to its depth (scaletrain/plan/ranks.py); --exact simulates it whole.
--jobs: processes for the simulations (default: this machine's CPUs).
--calibrate: the prediction beside a real run of the layout here (torchrun, --steps steps): model state,
activation peak, step time per component, and the efficiency to give the search (scaletrain/plan/calibrate.py).
With --gpus: every tp x pp (x schedule x microbatches) x cp x FSDP/HSDP x ep x activation-checkpointing
x micro-batch (--mbs; default the
config's train.micro_batch_size if set, else 1,2,4; 0 = global batch / dp) layout of N GPUs, validated
(rejected ones say why), timed by a first-order model (scaletrain/plan/step_time.py)
and sized fastest first until --top of them fit (--size-all: every one); ranked by tokens/s per GPU among
those that fit (--memory-limit-gb, default the GPU's memory). --png DIR: memory.png (model state and
activations per layout against the limit) and step_time.png (compute, exposed communication, bubble).
--engines: native (the default) and/or DeepSpeed's ZeRO stages zero0..zero3 over all N GPUs, sized by the
engine's own account of its model state (EngineSpec.plan_cost) plus the activations of DDP over as many."""


def memory_table(ranks: list[RankMemory], limit_gib: float | None) -> list[str]:
    """One row per pipeline rank, in GiB (MiB for small models)."""
    unit, scale = display_unit(max(r.total for r in ranks))
    names = [name for name in asdict(ranks[0].state) if any(asdict(r.state)[name] for r in ranks)]
    header = ["rank", *names, "activations", "total", *(["headroom"] if limit_gib else [])]
    rows = []
    for r in ranks:
        state = asdict(r.state)
        row = [f"pp {r.pp_rank}" if len(ranks) > 1 else "every", *(f"{state[n] / scale:.2f}" for n in names),
               f"{r.activations / scale:.2f}", f"{r.total / scale:.2f}"]  # fmt: skip
        if limit_gib:
            row.append(f"{(limit_gib * GIB - r.total) / scale:.2f}")
        rows.append(row)
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True)) + f"   ({unit})"]
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    return lines


def cmd_plan(argv: list[str]) -> int:
    config, rest = split_config(argv)
    if config is None:
        raise ValueError("plan needs a CONFIG: scaletrain plan CONFIG [--memory-limit-gb G] [overrides]")
    options, overrides = take_options(rest, SEARCH_OPTIONS)
    limit = options.get("memory-limit-gb")
    if limit is not None and limit <= 0:
        raise ValueError(f"--memory-limit-gb: {limit} is not allowed; use a size in GiB > 0")
    if "gpus" in options:
        return search_command(config, overrides, options)
    cfg = load_config(config, overrides)
    world = options.get("world-size") or implied_world_size(vars(cfg.parallel))
    dims = validate_config(cfg, world)
    if options.get("calibrate"):
        from scaletrain.plan.calibrate import calibrate

        return calibrate(config, overrides, dims, options.get("steps", 6), _jobs(options))
    start = time.perf_counter()
    exact = bool(options.get("exact"))
    ranks = plan_memory(cfg, dims, exact, _jobs(options))
    print(f"# {cfg.recipe}: {dims.describe()} on {dims.world_size} ranks, micro-batch {micro_batch_size(cfg, dims)}, "
          f"{cfg.train.dtype}, activation checkpointing {cfg.activation_checkpoint.mode}")  # fmt: skip
    for line in memory_table(ranks, limit):
        print(line)
    print(
        f"# planned in {time.perf_counter() - start:.1f} s; activations: the peak of a step's forward and backward "
        "above the model state"
    )
    depths = None if exact else shallow_depths(cfg, dims)
    if depths is not None:
        print(f"# sized from copies {depths[0]} and {depths[1]} blocks deep, carried to the full depth "
              "(scaletrain/plan/ranks.py); --exact simulates the whole model")  # fmt: skip
    over = [r for r in ranks if limit is not None and r.total / GIB > limit]
    for r in over:
        print(f"does not fit: pp rank {r.pp_rank} needs {r.total / GIB:.3g} GiB > --memory-limit-gb {limit:g}")
    return 1 if over else 0


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


SEARCH_OPTIONS = {"memory-limit-gb": float, "world-size": int, "gpus": int, "gpu": str, "gpus-per-node": int,
                  "top": int, "tp": _ints, "pp": _ints, "ac": _names, "efficiency": float, "intra-node-gbs": float,
                  "inter-node-gbs": float, "csv": str, "png": str, "exact": bool, "cp": _ints, "mbs": _ints,
                  "size-all": bool, "jobs": int, "calibrate": bool, "steps": int, "ep": _ints,
                  "pp-schedule": _names, "microbatches": _ints, "engines": _names}  # fmt: skip
ENGINE_CHOICES = {"native": None, **{f"zero{stage}": stage for stage in range(4)}}


def _jobs(options: dict) -> int:
    """--jobs: processes for the simulations; default one per CPU this process may use."""
    jobs = options.get("jobs", len(os.sched_getaffinity(0)))
    if jobs < 1:
        raise ValueError(f"--jobs: {jobs} is not allowed; use >= 1 processes")
    return jobs


def _cluster_gpu(cluster: ClusterSection, options: dict) -> GPU:
    """The config's `cluster:` GPU, with the command's flags over it (--gpu, --intra-node-gbs, ...)."""
    name = str(options.get("gpu", cluster.gpu)).lower()
    field = "--gpu" if "gpu" in options else "cluster.gpu"
    if name == "custom":
        if cluster.peak_tflops <= 0 or cluster.memory_gib <= 0:
            raise ValueError(f"{field}: 'custom' needs cluster.peak_tflops and cluster.memory_gib > 0 "
                             f"(got {cluster.peak_tflops:g} and {cluster.memory_gib:g})")  # fmt: skip
        # fp32 runs: TF32 tensor cores at half the bf16 peak, as on the A100 and H100 (metrics/device.py).
        gpu = GPU("custom", cluster.memory_gib, cluster.peak_tflops, cluster.peak_tflops / 2, 0.0, 0.0)
    elif name in GPUS:
        gpu = GPUS[name]
    else:
        raise ValueError(f"{field}: {name!r} is not in the table; use one of {sorted(GPUS)}, or 'custom' with "
                         "cluster.peak_tflops and cluster.memory_gib")  # fmt: skip
    for key in ("peak_tflops", "memory_gib", "intra_node_gbs", "inter_node_gbs"):
        if getattr(cluster, key) < 0:
            raise ValueError(f"cluster.{key}: {getattr(cluster, key)} is not allowed; use >= 0 (0 = the table's)")
    for key in ("intra_node_latency_us", "inter_node_latency_us"):
        if getattr(cluster, key) < 0:
            raise ValueError(f"cluster.{key}: {getattr(cluster, key)} is not allowed; use microseconds >= 0")
    gpu = replace(gpu, intra_node_latency_us=cluster.intra_node_latency_us,
                  inter_node_latency_us=cluster.inter_node_latency_us)  # fmt: skip
    if cluster.peak_tflops:
        gpu = replace(gpu, bf16_tflops=cluster.peak_tflops)
    if cluster.memory_gib:
        gpu = replace(gpu, memory_gib=cluster.memory_gib)
    for flag, key in (("intra-node-gbs", "intra_node_gbs"), ("inter-node-gbs", "inter_node_gbs")):
        value = options.get(flag, getattr(cluster, key))
        if flag in options and value <= 0:
            raise ValueError(f"--{flag}: {value} is not allowed; use GB/s > 0")
        if value:
            gpu = replace(gpu, **{key: value})
    if not gpu.intra_node_gbs or not gpu.inter_node_gbs:
        raise ValueError("cluster.intra_node_gbs / inter_node_gbs: a custom GPU needs both links (GB/s > 0)")
    return gpu


def search_command(config: str, overrides: list[str], options: dict) -> int:
    base = load_config(config, overrides)  # the config before any layout's overrides
    section = base.cluster
    gpus, per_node = options["gpus"], options.get("gpus-per-node", section.gpus_per_node)
    if gpus < 1 or per_node < 1:
        raise ValueError(f"--gpus / --gpus-per-node: {gpus} / {per_node} are not allowed; use >= 1")
    gpu = _cluster_gpu(section, options)
    efficiency = options.get("efficiency", section.efficiency)
    if not 0 < efficiency <= 1:
        where = "--efficiency" if "efficiency" in options else "cluster.efficiency"
        raise ValueError(f"{where}: {efficiency} is not allowed; use a fraction of peak in (0, 1]")
    acs = options.get("ac", ["none", "selective", "full"])
    bad = [a for a in acs if a not in AC_RECOMPUTE]
    if bad:
        raise ValueError(f"--ac: {bad} not allowed; use some of {list(AC_RECOMPUTE)}")
    for flag, least, allowed in (("tp", 1, "degrees >= 1"), ("pp", 1, "degrees >= 1"), ("cp", 1, "degrees >= 1"),
                                 ("ep", 1, "degrees >= 1"), ("mbs", 0, "samples >= 1, or 0 for the config's"),
                                 ("microbatches", 0, "counts >= 1, or 0 for the config's")):  # fmt: skip
        if any(n < least for n in options.get(flag, [])):
            raise ValueError(f"--{flag}: {options[flag]} is not allowed; use {allowed}")
    top = options.get("top", 10)
    if top < 1:
        raise ValueError(f"--top: {top} is not allowed; use >= 1 layouts to show")
    cluster = Cluster(gpus, gpu, per_node, efficiency, options.get("memory-limit-gb", gpu.memory_gib))
    # Micro-batches: the config's when it sets one, else 1, 2 and 4 samples (each must divide a rank's batch).
    default_mbs = [0] if base.train.micro_batch_size else [1, 2, 4]
    schedules = options.get("pp-schedule", [""])
    bad = [name for name in schedules if name and name not in SCHEDULE_NAMES]
    if bad:
        raise ValueError(f"--pp-schedule: {bad} not allowed; use some of {list(SCHEDULE_NAMES)}")
    engines = options.get("engines", ["native"])
    bad = [name for name in engines if name not in ENGINE_CHOICES]
    if bad:
        raise ValueError(f"--engines: {bad} not allowed; use some of {list(ENGINE_CHOICES)} (zeroN: DeepSpeed)")
    tps = options.get("tp", [1, 2, 4, 8]) if "native" in engines else []  # no tp: no native layout
    candidates = layouts(gpus, per_node, tps, options.get("pp", [1, 2, 4]), acs, options.get("cp", [1]),
                         options.get("mbs", default_mbs), options.get("ep", [1]), schedules,
                         options.get("microbatches", [0]),
                         [ENGINE_CHOICES[name] for name in engines if name != "native"])  # fmt: skip
    if not candidates:
        raise ValueError(f"--gpus: no tp x pp x cp (x ep dividing the data-parallel ranks) of the given degrees "
                         f"divides {gpus} GPUs")
    start = time.perf_counter()
    # Each simulation collects garbage first (simulate.py: _fake_mode); with what is alive now (torch's modules:
    # 260k objects) set aside, that costs microseconds instead of a quarter second.
    gc.collect()
    gc.freeze()
    try:
        rows = search(config, overrides, candidates, cluster, None if options.get("size-all") else top, _jobs(options))
    finally:
        gc.unfreeze()
    limit = cluster.limit_gib
    shown = rows[:top]
    unit = get_recipe(base.recipe).data.unit
    header = columns(unit)[:-1]
    widths = [max(len(h), *(len(row_cells(r)[i]) for r in shown)) for i, h in enumerate(header)]
    fits = [r for r in rows if r.sized and not r.rejected]
    print(f"# {gpus} x {gpu.name} ({per_node} per node), limit {limit:g} GiB, efficiency {efficiency:g}: "
          f"{len(rows)} layouts, {sum(r.time is not None for r in rows)} valid, {sum(r.sized for r in rows)} sized "
          f"(fastest first), {len(fits)} fit; planned in {time.perf_counter() - start:.1f} s")  # fmt: skip
    print("  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True)))
    for r in shown:
        cells = row_cells(r)
        line = "  ".join(c.rjust(w) for c, w in zip(cells[:-1], widths, strict=True))
        print(line + (f"  ({cells[-1]})" if cells[-1] else ""))
    if "csv" in options:
        write_csv(rows, Path(options["csv"]), unit)
        print(f"# every layout: {options['csv']}")
    if "png" in options:
        for path in write_pngs(rows, Path(options["png"]), limit):
            print(f"# {path}")
    unsimulated = [r for r in rows if r.rejected.startswith("not simulated")]
    if not fits and unsimulated and not any(r.memory_bytes for r in rows):
        print(f"no layout could be sized: {unsimulated[0].rejected}; the times above stand")
        return 1
    if not fits:
        # Sized ones by what they need; the others by the model state they need at least.
        known = [r for r in rows if r.sized and (r.memory_bytes or r.state_floor)]
        closest = sorted(known, key=lambda r: r.memory_bytes or r.state_floor)[:3]
        hint = "; the closest: " + ", ".join(
            f"{r.layout.name} needs {r.memory_bytes / GIB:.3g} GiB" if r.memory_bytes
            else f"{r.layout.name} needs at least {r.state_floor / GIB:.3g} GiB" for r in closest
        )
        print(f"no layout fits {limit:g} GiB{hint if closest else ''}: raise tp, pp or cp, use ac=full, or a smaller "
              "micro-batch (--mbs 1,2)")  # fmt: skip
        return 1
    return 0
