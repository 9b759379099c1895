"""Helpers shared by the kernels-integration tests (a module with a unique name: test folders have no __init__)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from torch.utils._python_dispatch import TorchDispatchMode

REPO = Path(__file__).resolve().parents[2]


class KernelOps(TorchDispatchMode):
    """Records the scaletrain_kernels ops dispatched inside the block."""

    def __init__(self) -> None:
        super().__init__()
        self.names: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        if func.namespace == "scaletrain_kernels":
            self.names.add(func._opname)
        return func(*args, **(kwargs or {}))


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
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", script]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return done.stdout
