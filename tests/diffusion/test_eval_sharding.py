"""Evaluation sample grids are generated in shards across data-parallel ranks, not once per rank.

Each data-parallel index draws ceil(n / dp) of the eval.num_samples images (tp peers draw the
same ones: TP needs equal inputs), rank 0 gathers them, logs the grid and computes the metrics,
and the grid equals the one-process grid (per-sample noise; the weights are equal up to
reduction order, so within 1e-4). n = 5 over dp = 2 also exercises the padding of the last shard.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
DIT = str(ROOT / "scaletrain/recipes/diffusion/configs/dit-tiny.yaml")
WORKER = str(Path(__file__).with_name("eval_shard_worker.py"))
N, STEPS = 5, 3
SMALL = ["--model.image_size", "16", "--model.patch_size", "4", "--model.dim", "64", "--model.depth", "2",
         "--model.n_heads", "4", "--eval.num_samples", str(N), "--model.eval_steps", str(STEPS),
         "--model.eval_guidance", "2.0", "--train.ema_decay", "0", "--checkpoint.enable", "false",
         "--metrics.tensorboard", "false"]  # fmt: skip


def _run(out: Path, nproc: int, *layout: str) -> tuple[torch.Tensor, list[dict]]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", WORKER,
           str(out), DIT, *SMALL, *layout, "--job.run_dir", str(out)]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    ranks = [json.loads((out / f"rank-{r}.json").read_text()) for r in range(nproc)]
    return torch.load(out / "grid.pt", weights_only=True), ranks


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> tuple[torch.Tensor, list[dict]]:
    return _run(tmp_path_factory.mktemp("single"), 1)


def _check(one_process, grid, ranks, dp: int) -> None:
    ref_grid, (ref,) = one_process
    # Guidance doubles each forward's batch (conditional + unconditional halves).
    assert ref["forward_samples"] == 2 * N * STEPS
    per = -(-N // dp)
    for r in ranks:
        assert r["forward_samples"] == 2 * per * STEPS, ranks  # its share, not the whole grid
        assert r["forwards"] == ref["forwards"]  # same number of collectives on every rank
    assert ranks[0]["metrics"] and all(not r["metrics"] for r in ranks[1:])  # rank 0 scores
    assert set(ranks[0]["metrics"]) == set(ref["metrics"]) == {
        "fid_shapes", "kid_shapes", "class_accuracy_shapes", "diversity_shapes"
    }
    assert not any(r["text"] for r in ranks)  # the extractor is named once, at start-up (test_errors_and_sample.py)
    torch.testing.assert_close(grid, ref_grid, atol=1e-4, rtol=0)
    assert ranks[0]["metrics"]["class_accuracy_shapes"] == ref["metrics"]["class_accuracy_shapes"]


def test_fsdp2_ranks_each_draw_half_and_rank0_gets_the_one_process_grid(one_process, tmp_path):
    grid, ranks = _run(tmp_path, 2, "--parallel.dp_shard", "2")
    _check(one_process, grid, ranks, dp=2)


@pytest.mark.slow
def test_tp_peers_draw_the_same_share_under_tp2_x_fsdp2(one_process, tmp_path):
    grid, ranks = _run(tmp_path, 4, "--parallel.dp_shard", "2", "--parallel.tp", "2")
    _check(one_process, grid, ranks, dp=2)
