"""Training steps after a checkpoint save run as fast as before it.

They once did not: DCP's collectives ran large copies on gloo's worker threads, each of which then kept an
OpenMP team of its own; with more OpenMP threads than cores, GNU OpenMP stops spinning between parallel
regions, and every later step of the tiny GPT on 2 cores ran 20-35% slower (voluntary context switches per
step ~10 -> ~1,200). A fresh process (earlier tests leave threads behind) trains, saves, trains again.

Margins: a sync save may add no OS thread, an async one exactly the four it owns (its writer thread and
its gloo group's event loop and two workers; an OpenMP team in any of them would add more), and neither more
than 50 + 3x the voluntary context switches per step (the async group's event loop wakes ~100 times a
second: 27 -> ~60 per step). These are the mechanism and free of timing noise: without the fix a sync
save took 6 -> 9 threads and 12 -> 1,251 switches per step, an async one 6 -> 11 and 30 -> 981. Step times
are printed, not asserted (on 2 shared cores a loaded CI machine moves medians by more than the 20-35% the
bug cost); `scaletrain bench` measures them against the plain loop, after a save too.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("save_step_time_worker.py")


# Threads a save may leave behind: an async save's writer thread and its group's gloo loop and 2 workers.
NEW_THREADS = {"none": 0, "async": 4}


@pytest.mark.parametrize("async_mode", sorted(NEW_THREADS))
def test_a_save_leaves_no_thread_behind_to_slow_later_steps(tmp_path, async_mode):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(WORKER.parent), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, str(WORKER), str(tmp_path), async_mode], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    before, after = report["before"], report["after"]
    print(report)
    assert after["threads"] == before["threads"] + NEW_THREADS[async_mode], report
    assert after["switches_per_step"] <= 50 + 3 * before["switches_per_step"], report
