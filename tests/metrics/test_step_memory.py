"""The step-memory tracker behind `metrics.step_memory` and `scaletrain plan`'s activation prediction.

Sizes below are exact: fp32 tensors of N elements are 4N bytes, and the tracker must see each allocation
once, when an operator returns it, and drop it when its storage dies (not when one of its views does).
"""

from __future__ import annotations

import torch

from scaletrain.metrics.step_memory import StepMemoryTracker

N = 1024
MB = 4 * N  # bytes of one fp32 tensor of N elements


def test_peak_counts_what_is_alive_together_and_not_what_existed_before():
    before = torch.ones(N)  # alive before the step: never counted
    with StepMemoryTracker() as tracker:
        a = before * 2  # +1
        b = a + 1  # +1 (2 alive)
        view = b.view(32, 32)  # a view: no new storage
        del a  # -1
        c = view.exp()  # +1 (b, c alive)
        del b, view, c  # all freed
        d = before.sin()  # +1
    assert tracker.peak == 2 * MB
    assert tracker.live == MB  # d
    assert d.shape == (N,)


def test_split_peak_leaves_out_what_outlives_the_step():
    with StepMemoryTracker() as tracker:
        kept = torch.zeros(3 * N)  # like a gradient: still alive at the end
        temporary = torch.ones(N) * 3
        del temporary
        later = torch.ones(2 * N)
    assert tracker.peak == 5 * MB  # kept with later (temporary, 1, was gone by then)
    assert tracker.split_peak([kept]) == 2 * MB  # later alone
    assert later.numel() == 2 * N


def test_a_reused_address_is_a_new_allocation():
    with StepMemoryTracker() as tracker:
        for _ in range(5):
            x = torch.empty(N) + 1  # the allocator hands back the same block: each is counted once, then freed
            del x
        kept = torch.ones(N)
    assert tracker.peak == 2 * MB  # empty's result and its + 1 alive together
    assert tracker.split_peak([kept]) == 2 * MB


def test_storages_grown_in_place_are_followed():
    """FSDP2 frees and regrows its unsharded parameters with UntypedStorage.resize_."""
    held = torch.ones(N)
    with StepMemoryTracker() as tracker:
        held.untyped_storage().resize_(0)
        held.untyped_storage().resize_(4 * MB)
        grown = tracker.peak
        held.untyped_storage().resize_(0)
    assert grown == 3 * MB  # from 1 MB to 0 (-1), then to 4 MB (+4)
    assert tracker.live == -MB  # the step freed what it found

    # A storage that was 0 bytes when the step began (FSDP2's resharded parameters) counts from 0.
    with StepMemoryTracker() as tracker:
        held.untyped_storage().resize_(2 * MB)
        held.untyped_storage().resize_(0)
    assert (tracker.peak, tracker.live) == (2 * MB, 0)
