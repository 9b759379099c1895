"""`scaletrain plan CONFIG`: what the config's layout needs per rank, before anything is launched.

For each pipeline rank (one line when pp = 1): the model state (shards.py + memory.py: parameters, gradients,
AdamW moments, EMA, buffers, pipeline receive buffers) and the activation peak (simulate.py: the step run on
fake tensors), their sum, and with --memory-limit-gb whether it fits. Exit status 1 when a rank does not fit.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

from scaletrain.config import load_config
from scaletrain.config.schema import JobConfig
from scaletrain.parallel.batching import micro_batch_size
from scaletrain.parallel.dims import ParallelDims, implied_world_size
from scaletrain.plan.memory import ModelStateBytes, model_state_bytes
from scaletrain.plan.shards import rank_shards
from scaletrain.plan.simulate import activation_peak_bytes
from scaletrain.validate import validate_config

GIB = 2**30

USAGE = """usage: scaletrain plan CONFIG [--memory-limit-gb G] [--world-size N] [--section.field VALUE ...]
Per-rank memory of CONFIG's layout, predicted in this process without a GPU or a process group: the model
state from the layout's real parameter shards and the activation peak from its training step run on fake
tensors (the recipe's own parallelize, micro step and pipeline schedule). --memory-limit-gb: fail (exit 1)
when a rank's total exceeds it. Native engine, one-loss recipes."""


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
    from scaletrain.cli import _split_config, _take_options

    config, rest = _split_config(argv)
    if config is None:
        raise ValueError("plan needs a CONFIG: scaletrain plan CONFIG [--memory-limit-gb G] [overrides]")
    options, overrides = _take_options(rest, {"memory-limit-gb": float, "world-size": int})
    limit = options.get("memory-limit-gb")
    if limit is not None and limit <= 0:
        raise ValueError(f"--memory-limit-gb: {limit} is not allowed; use a size in GiB > 0")
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
