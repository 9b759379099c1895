"""`scaletrain bench CONFIG --engines ...`: the same model, data and world size under each engine, in one run.

  scaletrain bench scaletrain/recipes/gpt/configs/tiny.yaml --nproc 2 \
      --engines native,deepspeed:zero1,deepspeed:zero2,deepspeed:zero2-offload,deepspeed:zero3,fairscale:oss

Each entry is `ENGINE` or `ENGINE:PRESET` (the presets an engine declares, e.g. deepspeed:zero3-offload);
native runs as FSDP2 over the same ranks. Every entry is validated before the first one starts. Each trains
under torchrun (one thread per process) with checkpoints and evaluation off; the rate is the median of the
steps after the warm-up; model state = the bytes of the tensors rank 0 holds at the second step's boundary
(parameters, gradients, optimizer states, the engine's buffers) less those it held before the model existed
(scaletrain.metrics.live_tensor_bytes); peak memory = the peak resident set (CPU) or allocated (GPU). Results
are printed and written as CSV, Markdown and a PNG bar chart (matplotlib, when installed).
"""

from __future__ import annotations

import csv
import statistics
from dataclasses import dataclass
from pathlib import Path

from scaletrain.config import load_config
from scaletrain.engines import get_engine
from scaletrain.parity import check_layout, run_layout
from scaletrain.registry import get_recipe


@dataclass
class EngineRow:
    entry: str
    rate: float  # units (tokens or samples) per second, median over the timed steps
    peak_mem_gib: float
    model_state_gib: float  # live tensors at the second step's boundary, less those before the model (rank 0)
    final_loss: float


def engine_overrides(entry: str, nproc: int) -> list[str]:
    """`deepspeed:zero3` -> the overrides that select it on `nproc` data-parallel ranks."""
    name, _, preset = entry.partition(":")
    spec = get_engine(name)  # raises naming the known engines
    if preset and preset not in spec.presets:
        known = sorted(spec.presets) or ["(none)"]
        raise ValueError(f"--engines: {entry!r}: engine {name!r} has no preset {preset!r}; known: {known}")
    return ["--engine.name", name, *spec.presets.get(preset, []), "--parallel.dp_shard", str(nproc)]


def bench_engines(
    config: str | None, entries: list[str], nproc: int, overrides: list[str], out_dir: Path, warmup: int = 2
) -> tuple[list[EngineRow], str]:
    """Run every entry; returns the rows and the recipe's throughput unit (tokens or samples)."""
    if not entries:
        raise ValueError("--engines: name at least one engine, e.g. native,deepspeed:zero2")
    runs = {entry: overrides + engine_overrides(entry, nproc) for entry in entries}
    for entry, flags in runs.items():  # every entry is checked before any runs
        if check_layout(config, flags) != nproc:
            raise ValueError(f"--engines: {entry!r} needs another world size than --nproc {nproc}")
    job = load_config(config, overrides)
    steps = job.train.steps
    if steps <= warmup:
        raise ValueError(f"train.steps: {steps} leaves no timed step after {warmup} warm-up steps; use more")
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for entry, flags in runs.items():
        print(f"bench: {entry} on {nproc} ranks ...", flush=True)
        metrics = [r for r in run_layout(config, flags, out_dir, entry.replace(":", "-"), nproc=nproc) if "loss" in r]
        timed = metrics[warmup:]
        rows.append(
            EngineRow(
                entry=entry,
                rate=statistics.median(r["throughput"] for r in timed),
                peak_mem_gib=max(r["mem_gib"] for r in metrics),
                model_state_gib=next(r["model_state_gib"] for r in metrics if "model_state_gib" in r),
                final_loss=metrics[-1]["loss"],
            )
        )
    unit = get_recipe(job.recipe).data.unit
    write_reports(rows, unit, out_dir)
    return rows, unit


def _ratios(rows: list[EngineRow]) -> tuple[str, list[float]]:
    base = next((r for r in rows if r.entry == "native"), rows[0])
    return base.entry, [r.rate / base.rate for r in rows]


def table(rows: list[EngineRow], unit: str) -> str:
    base, ratios = _ratios(rows)
    lines = [
        f"| engine | {unit}/s | vs {base} | model state per rank (MiB) | peak memory, rank 0 (GiB) | final loss |",
        "|---|---|---|---|---|---|",
    ]
    for row, ratio in zip(rows, ratios, strict=True):
        state_mib = row.model_state_gib * 1024
        lines.append(
            f"| {row.entry} | {row.rate:,.0f} | {ratio:.2f} | {state_mib:,.1f} | {row.peak_mem_gib:.2f} | "
            f"{row.final_loss:.4f} |"
        )
    return "\n".join(lines)


def write_reports(rows: list[EngineRow], unit: str, out_dir: Path) -> None:
    base, ratios = _ratios(rows)
    with open(out_dir / "engines.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(
            ["engine", f"{unit}_per_s", f"ratio_to_{base}", "model_state_mib", "peak_mem_gib", "final_loss"]
        )
        for row, ratio in zip(rows, ratios, strict=True):
            state_mib = f"{row.model_state_gib * 1024:.2f}"
            writer.writerow(
                [row.entry, f"{row.rate:.1f}", f"{ratio:.3f}", state_mib, f"{row.peak_mem_gib:.3f}", row.final_loss]
            )
    (out_dir / "engines.md").write_text(table(rows, unit) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("bench: matplotlib is not installed; no engines.png (the CSV has the numbers)")
        return
    fig, (speed, state) = plt.subplots(1, 2, figsize=(10, 3.5))
    names = [r.entry for r in rows]
    speed.barh(names, [r.rate for r in rows], color="tab:blue")
    speed.set_xlabel(f"{unit}/s")
    state.barh(names, [r.model_state_gib * 1024 for r in rows], color="tab:orange")
    state.set_xlabel("model state per rank (MiB)")
    state.set_yticks([])
    for axis in (speed, state):
        axis.invert_yaxis()
    fig.tight_layout()
    fig.savefig(out_dir / "engines.png", dpi=120)
    plt.close(fig)
