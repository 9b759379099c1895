"""`scaletrain bench` under torchrun with pp > 1: measured bubble from recorded timestamps vs theory.

Not a timing test: the bubble is a ratio of recorded intervals within one step. Stated bound:
within 5 points of (p-1)/(m+p-1) for GPipe and 1F1B with pp=2, m=4 (theory 20%); the model
is sized so compute dominates the (counted as idle) gloo transfers. The bound applies to the best of 12
steps: on a machine shared with two busy processes the best of 5 once measured 25+ % for GPipe (median 32 %),
because a rank descheduled mid-microbatch stretches its neighbour's wait; over 12 steps one runs clean.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from st_common import TINY

BUBBLE_POINTS = 5.0


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_measured_bubble_close_to_theory(schedule, tmp_path):
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "scaletrain.cli",
        "bench", TINY, "--parallel.pp", "2", "--parallel.pp_schedule", schedule, "--parallel.microbatches", "4",
        "--parallel.dp_shard", "1", "--model.dim", "256", "--model.n_layers", "4", "--data.seq_len", "128",
        "--train.global_batch_size", "16", "--job.run_dir", str(tmp_path), "--bench-steps", "12",
    ]  # fmt: skip
    done = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    match = re.search(r"bubble: measured ([\d.]+)% \| theory ([\d.]+)%", done.stdout)
    assert match, done.stdout
    measured, theory = float(match.group(1)), float(match.group(2))
    assert theory == pytest.approx(20.0)
    assert abs(measured - theory) <= BUBBLE_POINTS, done.stdout
    png = tmp_path / "gpt-tiny" / "pipeline_timeline.png"
    assert png.is_file() and png.stat().st_size > 1000
