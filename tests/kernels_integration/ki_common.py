"""Helpers shared by the kernels-integration tests (a module with a unique name: test folders have no __init__)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from st_common import KernelOps  # noqa: F401 - re-exported for the tests and their workers

REPO = Path(__file__).resolve().parents[2]


def run_interpreted_workers(script: str, nproc: int = 2) -> str:
    """Run `script` under torchrun with `nproc` gloo processes and the Triton interpreter; returns its stdout.

    Skips (pytest.skip) where that is not how the kernels run: on a GPU machine, or where the interpreter
    is off in this process. Fails with the tail of both streams if any worker fails.
    """
    import pytest
    import torch

    from scaletrain import ops

    if torch.cuda.is_available() or ops.fused_backend(torch.empty(0)) != "triton-interpret":
        pytest.skip("runs the kernels on CPU tensors over gloo: needs the Triton interpreter (no GPU)")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "1"}
    # tests/ too: the workers import ki_common, which takes KernelOps from st_common.
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", script]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return done.stdout
