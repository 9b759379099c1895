"""The bytes a training step allocates on top of the model state, followed op by op.

`StepMemoryTracker` is a TorchDispatchMode: every tensor an operator returns whose storage is new (not alive
when the tracker started) is counted until its storage dies (a weakref callback on the storage object, which
PyTorch keeps alive exactly as long as the storage). Storages resized in place (FSDP2 grows and frees its
unsharded parameters with `UntypedStorage.resize_`) are followed too. The running total's high-water mark is
the step's peak above what existed before it: activations, temporaries (FSDP all-gather and reduce-scatter
buffers, the logits, recomputation under activation checkpointing) and the gradients made in the backward.

`split_peak()` then leaves out chosen storages, those that outlive the step as parameter gradients, and
replays the timeline: the peak of activations and temporaries alone.

The same tracker runs on real tensors (the trainer's `metrics.memory_breakdown`) and on fake ones
(scaletrain/plan's simulated step), so prediction and measurement count alike. torch.distributed._tools'
MemTracker does the same categorised, per module; this one is smaller and also follows the pipeline
schedules, DTensors and compiled regions the trainer uses.
"""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


def _storages_alive() -> list[torch.UntypedStorage]:
    """Every storage a Python tensor (or a DTensor's local tensor) holds now."""
    from torch.distributed.tensor import DTensor

    storages: dict[int, torch.UntypedStorage] = {}
    for obj in gc.get_objects():
        try:
            if not issubclass(type(obj), torch.Tensor):
                continue
            storage = (obj._local_tensor if type(obj) is DTensor else obj).untyped_storage()
            storages[storage._cdata] = storage
        except (ReferenceError, RuntimeError, NotImplementedError):
            continue  # dead weakref proxies; tensors without storage (functional wrappers)
    return list(storages.values())


def _storage(tensor: torch.Tensor) -> torch.UntypedStorage | None:
    from torch.distributed.tensor import DTensor

    try:
        return (tensor._local_tensor if isinstance(tensor, DTensor) else tensor).untyped_storage()
    except (RuntimeError, NotImplementedError):
        return None


class StepMemoryTracker(TorchDispatchMode):
    """Within the context: `peak` (bytes) and `timeline`, the (allocation id, +/- bytes) events for split_peak.

    Storages are told apart by their C++ address while they live; an address freed and reused is a new
    allocation with a new id, so the timeline never mixes two of them."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self.timeline: list[tuple[int, int]] = []
        self._ids: dict[int, int] = {}  # address of a storage counted now -> its allocation id
        self._sizes: dict[int, int] = {}  # allocation id -> bytes counted now
        self._refs: dict[int, weakref.ref] = {}  # address -> weakref (its callback ends the allocation)
        self._next_id = 0
        self._resize = None

    def _change(self, alloc: int, delta: int) -> None:
        if delta:
            self.live += delta
            self.peak = max(self.peak, self.live)
            self.timeline.append((alloc, delta))

    def _died(self, key: int) -> None:
        self._refs.pop(key, None)
        alloc = self._ids.pop(key, None)
        if alloc is not None:
            self._change(alloc, -self._sizes.pop(alloc))

    def _follow(self, storage: torch.UntypedStorage, new: bool) -> None:
        """Start following this storage: a new one adds its bytes now; one from before the step is the baseline
        (its later shrinking, growth or death moves the count from there)."""
        key = storage._cdata
        self._ids[key] = alloc = self._next_id
        self._next_id += 1
        self._sizes[alloc] = storage.nbytes()
        self._refs[key] = weakref.ref(storage, lambda _ref, key=key: self._died(key))
        if new:
            self._change(alloc, self._sizes[alloc])

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                storage = _storage(leaf)
                if storage is not None and storage._cdata not in self._ids:
                    self._follow(storage, new=True)
        return out

    def _resized(self, storage: torch.UntypedStorage, size: int) -> None:
        """After storage.resize_(size)."""
        alloc = self._ids.get(storage._cdata)
        if alloc is None:  # held only from C++ when the step began: its old size is unknown
            self._follow(storage, new=True)
        else:
            delta, self._sizes[alloc] = size - self._sizes[alloc], size
            self._change(alloc, delta)

    def __enter__(self) -> StepMemoryTracker:
        for storage in _storages_alive():  # what exists already is not the step's, until it is resized
            self._follow(storage, new=False)
        real_resize = self._resize = torch.UntypedStorage.resize_
        tracker = self

        def resize_(storage: torch.UntypedStorage, size: int) -> torch.UntypedStorage:
            result = real_resize(storage, size)
            tracker._resized(storage, size)
            return result

        torch.UntypedStorage.resize_ = resize_
        return super().__enter__()

    def __exit__(self, *exc: object) -> None:
        torch.UntypedStorage.resize_ = self._resize
        super().__exit__(*exc)

    def split_peak(self, leave_out: Iterable[torch.Tensor]) -> int:
        """The peak of the timeline without the allocations that `leave_out`'s storages are now (call it while
        they live, before they are freed)."""
        storages = (_storage(t) for t in leave_out)
        skip = {self._ids.get(s._cdata) for s in storages if s is not None}
        live = peak = 0
        for alloc, delta in self.timeline:
            if alloc not in skip:
                live += delta
                peak = max(peak, live)
        return peak
