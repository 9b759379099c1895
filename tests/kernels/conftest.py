"""Test setup for kernels/: run Triton kernels through the interpreter when there is no GPU.

TRITON_INTERPRET must be set before triton (and therefore ``kernels``) is imported: ``triton.jit`` picks
interpreted vs compiled at decoration time and ``kernels.INTERPRET`` is read once at import.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from scaletrain import kernels  # noqa: E402
from scaletrain.kernels._triton import use_triton  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def device() -> torch.device:
    """Device for kernel tests; skips when the Triton path cannot run (else tests would compare the
    reference fallback with itself and prove nothing)."""
    if not kernels.TRITON_AVAILABLE:
        pytest.skip("triton is not installed; the fallback is covered by test_fallback.py")
    if not use_triton(torch.empty(0, device=DEVICE)):
        pytest.skip("kernels was imported before TRITON_INTERPRET=1 was set; run pytest tests/kernels alone")
    return DEVICE
