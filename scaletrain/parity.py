"""Layout parity: train one config under two layouts and compare the per-step losses.

Both runs start from the same weights (the init is layout-independent, see
scaletrain/parallel/init.py) and see the same global batches in the same order (the
loader's order does not depend on the data-parallel degree), so any difference is the
layout's numerics. This is the harness the test suite uses; `scaletrain parity` offers it
to users who add a recipe or a layout:

  scaletrain parity scaletrain/recipes/gpt/configs/tiny.yaml --a "" --b "--parallel.dp_shard 2 --parallel.tp 2"
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from scaletrain.config import load_config
from scaletrain.parallel.dims import implied_world_size
from scaletrain.validate import validate_config

# Overrides that make a run a pure numerics check: no checkpoints, TensorBoard or evaluation.
PARITY_OVERRIDES = [
    "--checkpoint.enable",
    "false",
    "--metrics.tensorboard",
    "false",
    "--checkpoint.resume",
    "false",
    "--eval.interval",
    "0",
]


def processes_for(config: str | None, overrides: list[str]) -> int:
    """World size a layout needs: the product of its degrees (dp_shard=-1 counts as 1)."""
    return implied_world_size(load_config(config, overrides).parallel.degrees)


def check_layout(config: str | None, overrides: list[str]) -> int:
    """Load and validate the layout's config for the world size it needs, as the trainer will; that size.

    Raises ValueError naming the field, so a bad layout fails before any process starts."""
    cfg = load_config(config, overrides + PARITY_OVERRIDES)
    nproc = implied_world_size(cfg.parallel.degrees)
    validate_config(cfg, nproc)
    return nproc


def run_layout(
    config: str | None, overrides: list[str], run_dir: Path, name: str, nproc: int | None = None, timeout_s: int = 600
) -> list[dict]:
    """Train under torchrun with `nproc` processes; returns the metrics.jsonl rows."""
    nproc = nproc or processes_for(config, overrides)
    shutil.rmtree(run_dir / name, ignore_errors=True)  # metrics.jsonl appends; start clean
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "scaletrain.train",
    ]
    cmd += ([config] if config else []) + list(overrides) + PARITY_OVERRIDES
    cmd += ["--job.run_dir", str(run_dir), "--job.name", name]
    # One thread per process: on a small machine, N processes x all cores would thrash.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
    if done.returncode != 0:
        raise RuntimeError(
            f"layout {' '.join(overrides) or '(default)'} failed:\n{done.stdout[-4000:]}\n{done.stderr[-8000:]}"
        )
    with open(run_dir / name / "metrics.jsonl") as f:
        return [json.loads(line) for line in f if line.strip()]


@dataclass
class ParityReport:
    steps: list[int]
    loss_a: list[float]
    loss_b: list[float]
    grad_norm_a: list[float]
    grad_norm_b: list[float]

    @property
    def max_loss_rel_diff(self) -> float:
        return max(abs(a - b) / max(abs(a), 1e-12) for a, b in zip(self.loss_a, self.loss_b, strict=True))

    @property
    def max_grad_norm_rel_diff(self) -> float:
        return max(abs(a - b) / max(abs(a), 1e-12) for a, b in zip(self.grad_norm_a, self.grad_norm_b, strict=True))

    def table(self) -> str:
        header = ("step", "loss a", "loss b", "rel diff", "gnorm a", "gnorm b", "rel diff")
        widths = (5, 12, 12, 10, 10, 10, 10)
        rows = [" ".join(f"{h:>{w}}" for h, w in zip(header, widths, strict=True))]
        for i, step in enumerate(self.steps):
            la, lb, ga, gb = self.loss_a[i], self.loss_b[i], self.grad_norm_a[i], self.grad_norm_b[i]
            rows.append(
                f"{step:>5} {la:>12.6f} {lb:>12.6f} {abs(la - lb) / max(abs(la), 1e-12):>10.2e} "
                f"{ga:>10.5f} {gb:>10.5f} {abs(ga - gb) / max(abs(ga), 1e-12):>10.2e}"
            )
        rows.append(
            f"max relative difference: loss {self.max_loss_rel_diff:.3e}, grad norm {self.max_grad_norm_rel_diff:.3e}"
        )
        return "\n".join(rows)


def compare(rows_a: list[dict], rows_b: list[dict]) -> ParityReport:
    # Training rows only: metrics.jsonl also holds evaluation rows (eval/...), which have no loss.
    rows_a, rows_b = ([r for r in rows if "loss" in r] for rows in (rows_a, rows_b))
    if [r["step"] for r in rows_a] != [r["step"] for r in rows_b]:
        raise ValueError("the two runs logged different steps; use the same train.steps and train.log_interval")
    return ParityReport(
        steps=[r["step"] for r in rows_a],
        loss_a=[r["loss"] for r in rows_a],
        loss_b=[r["loss"] for r in rows_b],
        grad_norm_a=[r["grad_norm"] for r in rows_a],
        grad_norm_b=[r["grad_norm"] for r in rows_b],
    )


def parity(
    config: str | None,
    overrides_a: list[str],
    overrides_b: list[str],
    common: list[str] | None = None,
    run_dir: Path | None = None,
) -> ParityReport:
    common = list(common or [])
    nproc_a, nproc_b = (check_layout(config, common + overrides) for overrides in (overrides_a, overrides_b))
    with tempfile.TemporaryDirectory(prefix="scaletrain-parity-") as tmp:
        root = Path(run_dir or tmp)
        rows_a = run_layout(config, common + overrides_a, root, "a", nproc=nproc_a)
        rows_b = run_layout(config, common + overrides_b, root, "b", nproc=nproc_b)
    return compare(rows_a, rows_b)


def split_overrides(text: str) -> list[str]:
    return shlex.split(text)
