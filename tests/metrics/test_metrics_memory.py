"""The tensor census behind model_state_gib (scaletrain.metrics.live_tensor_bytes)."""

from __future__ import annotations

import weakref

import torch

from scaletrain.metrics import live_tensor_bytes


def test_census_counts_parameters_and_their_gradients_once():
    """A gradient autograd wrote has no Python object until asked for: the census reaches it through its
    parameter. A view shares its base's storage and adds nothing."""
    before = live_tensor_bytes("cpu")
    weight = torch.nn.Parameter(torch.zeros(1000))
    view = weight.detach()[:10]  # noqa: F841 - alive during the census
    assert live_tensor_bytes("cpu") - before == 4000
    (weight * 2).sum().backward()
    assert live_tensor_bytes("cpu") - before == 8000


def test_census_survives_dead_weak_proxies():
    """torch.compile leaves weakref proxies whose referents died; isinstance() on one raises ReferenceError."""

    class Referent:
        pass

    referent = Referent()
    proxies = [weakref.proxy(referent)]
    del referent
    assert live_tensor_bytes("cpu") >= 0
    assert len(proxies) == 1
