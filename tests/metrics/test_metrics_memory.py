"""The tensor census behind model_state_gib (scaletrain.metrics.live_tensor_bytes)."""

from __future__ import annotations

import subprocess
import sys
import weakref

from scaletrain.metrics import live_tensor_bytes

CENSUS_SCRIPT = """
import torch
from scaletrain.metrics import live_tensor_bytes

before = live_tensor_bytes("cpu")
weight = torch.nn.Parameter(torch.zeros(1000))
view = weight.detach()[:10]  # alive during the census
print(live_tensor_bytes("cpu") - before)
(weight * 2).sum().backward()
print(live_tensor_bytes("cpu") - before)
"""


def test_census_counts_parameters_and_their_gradients_once():
    """A gradient autograd wrote has no Python object until asked for: the census reaches it through its
    parameter. A view shares its base's storage and adds nothing. In a fresh interpreter: inside the suite's
    process, tensors earlier tests left behind are freed at any moment (16 bytes between two censuses, once)."""
    done = subprocess.run([sys.executable, "-c", CENSUS_SCRIPT], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["4000", "8000"], done.stdout + done.stderr


def test_census_survives_dead_weak_proxies():
    """torch.compile leaves weakref proxies whose referents died; isinstance() on one raises ReferenceError."""

    class Referent:
        pass

    referent = Referent()
    proxies = [weakref.proxy(referent)]
    del referent
    assert live_tensor_bytes("cpu") >= 0
    assert len(proxies) == 1
