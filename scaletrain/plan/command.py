"""`scaletrain plan CONFIG`: what the config's layout needs per rank, before anything is launched.

For each pipeline rank (one line when pp = 1): the model state (shards.py + memory.py: parameters, gradients,
AdamW moments, EMA, buffers, pipeline receive buffers) and the activation peak (simulate.py: the step run on
fake tensors), their sum, and with --memory-limit-gb whether it fits. Exit status 1 when a rank does not fit.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from scaletrain.command_options import split_config, take_options
from scaletrain.config import load_config
from scaletrain.config.schema import JobConfig
from scaletrain.parallel.batching import micro_batch_size
from scaletrain.parallel.dims import ParallelDims, implied_world_size
from scaletrain.plan.memory import ModelStateBytes, model_state_bytes
from scaletrain.plan.search import (
    COLUMNS,
    evaluate,
    layouts,
    model_facts,
    ranked,
    row_cells,
    write_csv,
    write_pngs,
)
from scaletrain.plan.shards import rank_shards
from scaletrain.plan.simulate import activation_peak_bytes
from scaletrain.plan.step_time import AC_RECOMPUTE, GPU, GPUS
from scaletrain.validate import validate_config

GIB = 2**30

USAGE = """usage: scaletrain plan CONFIG [--memory-limit-gb G] [--world-size N] [--section.field VALUE ...]
       scaletrain plan CONFIG --gpus N [--gpu h100|h200|a100] [--gpus-per-node 8] [--top 10] [--tp 1,2,4,8]
                       [--pp 1,2,4] [--ac none,selective,full] [--efficiency 0.5] [--intra-node-gbs B]
                       [--inter-node-gbs B] [--memory-limit-gb G] [--csv FILE] [--png DIR] [overrides]
Per-rank memory of CONFIG's layout, predicted in this process without a GPU or a process group: the model
state from the layout's real parameter shards and the activation peak from its training step run on fake
tensors (the recipe's own parallelize, micro step and pipeline schedule). --memory-limit-gb: fail (exit 1)
when a rank's total exceeds it. Native engine, one-loss recipes.
With --gpus: every tp x pp x FSDP/HSDP x activation-checkpointing layout of N GPUs, validated (rejected ones
say why), sized, and timed by a first-order model (scaletrain/plan/step_time.py); ranked by tokens/s per GPU
among those that fit (--memory-limit-gb, default the GPU's memory). --png DIR: memory.png (model state and
activations per layout against the limit) and step_time.png (compute, exposed communication, bubble)."""


@dataclass(frozen=True)
class RankMemory:
    pp_rank: int
    state: ModelStateBytes
    activations: int

    @property
    def total(self) -> int:
        return self.state.total + self.activations


def plan_memory(cfg: JobConfig, dims: ParallelDims) -> list[RankMemory]:
    """Every pipeline rank's predicted memory (the first rank of each: the others of a stage hold the same)."""
    if cfg.engine.name != "native":
        raise ValueError(f"engine.name: the planner predicts the native engine, not {cfg.engine.name!r}")
    return [
        RankMemory(pp_rank, model_state_bytes(rank_shards(cfg, dims, pp_rank), cfg, dims),
                   activation_peak_bytes(cfg, dims, pp_rank))
        for pp_rank in range(dims.pp)
    ]  # fmt: skip


def memory_table(ranks: list[RankMemory], limit_gib: float | None) -> list[str]:
    """One row per pipeline rank, in GiB (MiB for small models)."""
    unit, scale = ("GiB", GIB) if max(r.total for r in ranks) >= GIB else ("MiB", 2**20)
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
    start = time.perf_counter()
    ranks = plan_memory(cfg, dims)
    print(f"# {cfg.recipe}: {dims.describe()} on {dims.world_size} ranks, micro-batch {micro_batch_size(cfg, dims)}, "
          f"{cfg.train.dtype}, activation checkpointing {cfg.activation_checkpoint.mode}")  # fmt: skip
    for line in memory_table(ranks, limit):
        print(line)
    print(
        f"# planned in {time.perf_counter() - start:.1f} s; activations: the peak of a step's forward and backward "
        "above the model state"
    )
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
                  "inter-node-gbs": float, "csv": str, "png": str}  # fmt: skip


def _gpu(options: dict) -> GPU:
    name = str(options.get("gpu", "h100")).lower()
    if name not in GPUS:
        raise ValueError(f"--gpu: {name!r} is not in the table; use one of {sorted(GPUS)}")
    gpu = GPUS[name]
    for flag, field in (("intra-node-gbs", "intra_node_gbs"), ("inter-node-gbs", "inter_node_gbs")):
        if flag in options:
            if options[flag] <= 0:
                raise ValueError(f"--{flag}: {options[flag]} is not allowed; use GB/s > 0")
            gpu = replace(gpu, **{field: options[flag]})
    return gpu


def search_command(config: str, overrides: list[str], options: dict) -> int:
    gpus, per_node = options["gpus"], options.get("gpus-per-node", 8)
    if gpus < 1 or per_node < 1:
        raise ValueError(f"--gpus / --gpus-per-node: {gpus} / {per_node} are not allowed; use >= 1")
    gpu = _gpu(options)
    efficiency = options.get("efficiency", 0.5)
    if not 0 < efficiency <= 1:
        raise ValueError(f"--efficiency: {efficiency} is not allowed; use a fraction of peak in (0, 1]")
    acs = options.get("ac", ["none", "selective", "full"])
    bad = [a for a in acs if a not in AC_RECOMPUTE]
    if bad:
        raise ValueError(f"--ac: {bad} not allowed; use some of {list(AC_RECOMPUTE)}")
    limit = options.get("memory-limit-gb", gpu.memory_gib)
    candidates = layouts(gpus, per_node, options.get("tp", [1, 2, 4, 8]), options.get("pp", [1, 2, 4]), acs)
    if not candidates:
        raise ValueError(f"--gpus: no tp x pp of the given degrees divides {gpus} GPUs")
    start = time.perf_counter()
    facts = model_facts(load_config(config, overrides))
    rows = ranked([evaluate(config, overrides, c, gpus, gpu, per_node, efficiency, facts, limit) for c in candidates])
    shown = rows[: options.get("top", 10)]
    widths = [max(len(h), *(len(row_cells(r)[i]) for r in shown)) for i, h in enumerate(COLUMNS[:-1])]
    print(f"# {gpus} x {gpu.name} ({per_node} per node), limit {limit:g} GiB, efficiency {efficiency:g}: "
          f"{sum(not r.rejected for r in rows)} of {len(rows)} layouts fit; planned in "
          f"{time.perf_counter() - start:.1f} s")  # fmt: skip
    print("  ".join(h.rjust(w) for h, w in zip(COLUMNS[:-1], widths, strict=True)))
    for r in shown:
        cells = row_cells(r)
        print(
            "  ".join(c.rjust(w) for c, w in zip(cells[:-1], widths, strict=True))
            + (f"  ({r.rejected})" if r.rejected else "")
        )
    if "csv" in options:
        write_csv(rows, Path(options["csv"]))
        print(f"# every layout: {options['csv']}")
    if "png" in options:
        for path in write_pngs(rows, Path(options["png"]), limit):
            print(f"# {path}")
    if all(r.rejected for r in rows):
        fitting = [r for r in rows if r.time is not None]
        hint = (
            f"; the smallest needs {fitting[0].memory_bytes / GIB:.3g} GiB ({fitting[0].layout.name})"
            if fitting
            else ""
        )
        print(f"no layout fits {limit:g} GiB{hint}: raise tp or pp, use ac=full, or a smaller micro-batch")
        return 1
    return 0
