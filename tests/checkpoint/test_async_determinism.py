"""Async checkpoint saves do not change training: runs with an async save every 3 steps are bitwise equal to
a run with sync saves: every step's loss and grad norm, and every saved tensor shard and RNG state.

A stress loop because the failure was rare: one async run in 19 once drifted from its first save on (grad
norms off by up to 1.2e-5, losses by 2.4e-7). Saves now copy the state on the training thread and write the
copy from one long-lived writer thread whose torch ops, like those of its gloo group's workers, run with one
intra-op thread (scaletrain/checkpoint/store.py, `AsyncWriter`), so nothing a save does reaches the training
thread's numerics. The layouts alternate between one process with 2 intra-op threads (where the thread
count of the training thread matters) and FSDP2 on 2 ranks (collectives of training and saving at once).

The default suite runs one async run per layout; `-m slow` runs ST_ASYNC_RUNS (default 20).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from ckpt_harness import BASE, TINY

STEPS = ["--train.steps", "12", "--checkpoint.interval", "3", "--train.log_interval", "1"]
LAYOUTS = {
    "single-2threads": (1, "2", []),
    "fsdp2": (2, "1", ["--parallel.dp_shard", "2"]),
}
# Compared file by file; trainer.json echoes the config (async_mode) and .metadata is DCP's planner output.
COMPARED_PREFIXES = ("rng/", "__")


def _train(run_dir: Path, layout: str, async_mode: str) -> tuple[list[tuple[float, float]], dict[str, str]]:
    """Train the tiny GPT; returns each step's (loss, grad_norm) and the last checkpoint's file hashes."""
    nproc, threads, overrides = LAYOUTS[layout]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    cmd += ["-m", "scaletrain.cli", "train", TINY, *BASE, *STEPS, *overrides]
    cmd += ["--checkpoint.async_mode", async_mode, "--job.run_dir", str(run_dir), "--job.name", "run"]
    done = subprocess.run(
        cmd, env={**os.environ, "OMP_NUM_THREADS": threads}, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-4000:]
    rows = [json.loads(line) for line in (run_dir / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [(row["loss"], row["grad_norm"]) for row in rows if "grad_norm" in row]
    manifest = json.loads((run_dir / "run" / "checkpoints" / "step-00000012" / "manifest.json").read_text())
    files = {name: entry["sha256"] for name, entry in manifest["files"].items() if name.startswith(COMPARED_PREFIXES)}
    return steps, files


@pytest.fixture(scope="module")
def sync_reference(tmp_path_factory):
    cache: dict[str, tuple] = {}

    def get(layout: str) -> tuple:
        if layout not in cache:
            cache[layout] = _train(tmp_path_factory.mktemp(f"sync-{layout}"), layout, "none")
        return cache[layout]

    return get


def _assert_async_run_is_bitwise_equal(layout: str, sync_reference, tmp_path: Path) -> None:
    want_steps, want_files = sync_reference(layout)
    got_steps, got_files = _train(tmp_path, layout, "async")
    assert len(got_steps) == 12
    differing = [(i + 1, a, b) for i, (a, b) in enumerate(zip(got_steps, want_steps, strict=True)) if a != b]
    assert not differing, differing
    assert any(name.startswith("__") for name in want_files) and got_files == want_files


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_an_async_run_is_bitwise_equal_to_a_sync_run(layout, sync_reference, tmp_path):
    _assert_async_run_is_bitwise_equal(layout, sync_reference, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("run", range(int(os.environ.get("ST_ASYNC_RUNS", "20"))))
def test_async_runs_stress(run, sync_reference, tmp_path):
    _assert_async_run_is_bitwise_equal(sorted(LAYOUTS)[run % len(LAYOUTS)], sync_reference, tmp_path)
