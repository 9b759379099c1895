"""Ray Train: a local Ray instance runs the tiny job on 2 CPU workers (needs `pip install "ray[train]"`)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest
from launch_common import REPO, TINY_CONFIG, TINY_RUN, logged_losses, logged_steps, subprocess_env


@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason='Ray is not installed: pip install "ray[train]"')
def test_two_cpu_workers(tmp_path):
    # A child process, so Ray's local instance (raylet, GCS, workers) starts and stops with it.
    cmd = [sys.executable, "-m", "scaletrain.launchers.cli", "ray", TINY_CONFIG, "--nproc-per-node", "2",
           *TINY_RUN, "--job.run_dir", str(tmp_path)]
    env = subprocess_env(RAY_USAGE_STATS_ENABLED="0")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    assert "dp_shard=2 on 2 x cpu" in output  # Ray's 2 workers formed one process group
    assert logged_steps(tmp_path) == [1, 2, 3]
    assert all(loss == loss for loss in logged_losses(tmp_path))  # no NaN
