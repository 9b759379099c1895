"""Peak memory of the training process on one device, in GiB.

Accelerators (CUDA/ROCm, XPU) report the caching allocator's `max_memory_allocated`: the
tensors PyTorch held at the high-water mark, which is what decides out-of-memory. On the
CPU there is no allocator counter, so we report the process's peak resident set size;
that includes the interpreter and libraries, so treat it as an upper bound.
"""

from __future__ import annotations

import gc
import resource
import sys

import torch

_GIB = float(1 << 30)


def _accelerator_module(device: torch.device):
    """`torch.cuda` / `torch.xpu` when that backend has peak-memory counters, else None."""
    module = getattr(torch, device.type, None)
    if module is not None and hasattr(module, "max_memory_allocated") and hasattr(module, "reset_peak_memory_stats"):
        return module
    return None


def _max_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes (getrusage(2) on each).
    return peak if sys.platform == "darwin" else peak * 1024


def peak_memory_gib(device: torch.device) -> float:
    """Peak memory since the last `reset_peak_memory(device)` (or process start), in GiB.

    Devices with no counter at all (meta, MPS) return NaN rather than a misleading 0.
    """
    device = torch.device(device)
    if device.type == "cpu":
        return _max_rss_bytes() / _GIB
    module = _accelerator_module(device)
    if module is None:
        return float("nan")
    return module.max_memory_allocated(device) / _GIB


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak-memory window (e.g. after the first step, so warmup is excluded).

    On the CPU this asks Linux to reset the peak RSS (writing 5 to /proc/self/clear_refs,
    Linux >= 4.0); where that is not possible the CPU peak simply stays process-wide.
    """
    device = torch.device(device)
    if device.type == "cpu":
        try:
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")
        except OSError:
            pass  # not Linux, or not permitted: keep the process-wide peak
        return
    module = _accelerator_module(device)
    if module is not None:
        module.reset_peak_memory_stats(device)


def live_tensor_bytes(device_type: str) -> int:
    """Bytes of every tensor storage alive in this process on `device_type`, each storage counted once.

    A census of the tensors Python holds (parameters, gradients, optimizer states, an engine's flat
    partitions and buffers): what "model-state memory" means in the ZeRO paper, measured the same way under
    every engine. Taken at a step boundary, activations are gone; the difference from a census before the
    model was built is the model state (plus the engine's communication buffers, which it also holds).
    """
    from torch.distributed.tensor import DTensor

    # Garbage first: tensors in unreachable reference cycles are freed whenever the collector next runs, and
    # gc.get_objects() lists them until then (a tensor-parallel run's census read 10 % more, now and then).
    gc.collect()
    storages: dict[int, int] = {}

    def count(tensor: torch.Tensor) -> None:
        if type(tensor) is DTensor:
            tensor = tensor._local_tensor
        # Plain tensors and parameters only: torch.compile's fake and functional tensors (alive in its
        # caches) have no data, and other subclasses wrap the plain tensors counted anyway.
        if type(tensor) not in (torch.Tensor, torch.nn.Parameter) or tensor.device.type != device_type:
            return
        try:
            storage = tensor.untyped_storage()
            key, size = storage.data_ptr(), storage.nbytes()
        except (RuntimeError, NotImplementedError):  # e.g. sparse tensors, which have no single storage
            return
        storages[key] = max(storages.get(key, 0), size)

    for obj in gc.get_objects():
        # type(), not isinstance(): isinstance on a dead weakref proxy (torch.compile leaves some) raises.
        if not issubclass(type(obj), torch.Tensor):
            continue
        count(obj)
        # A gradient that autograd wrote lives in C++ until Python asks for it: no Python object for the
        # garbage collector to list, so it is reached through its parameter.
        if obj.is_leaf and obj.requires_grad and obj.grad is not None:
            count(obj.grad)
    return sum(storages.values())
