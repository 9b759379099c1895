"""Training steps after a checkpoint save run as fast as before it.

They once did not: DCP's collectives ran large copies on gloo's worker threads, each of which then kept an
OpenMP team of its own; with more OpenMP threads than cores, GNU OpenMP stops spinning between parallel
regions, and every later step of the tiny GPT on 2 cores ran 20-35% slower (voluntary context switches per
step ~10 -> ~1,200). A fresh process (earlier tests leave threads behind) trains, saves, trains again.

Margins: the save may add no OS thread and no more than 50 + 3x the context switches per step (the
mechanism, free of timing noise), and the median step after the save stays within 1.2x of the one before
(observed 1.01-1.08 with the fix, 1.17-1.36 without).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

WORKER = Path(__file__).with_name("save_step_time_worker.py")


def test_steps_after_a_save_run_as_before(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(WORKER.parent), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, str(WORKER), str(tmp_path)], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    before, after = report["before"], report["after"]
    print(report)
    assert after["threads"] == before["threads"], report
    assert after["switches_per_step"] <= 50 + 3 * before["switches_per_step"], report
    assert after["median_s"] <= 1.2 * before["median_s"], report
