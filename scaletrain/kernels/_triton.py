"""Guarded Triton import, runtime flags and the custom-op registration helper.

Every kernel file imports ``triton``/``tl`` from here instead of directly, so the package imports on a
machine without Triton: there the names are stubs whose ``jit`` leaves the function undecorated (it is
never launched) and the public functions fall back to the plain-torch references.

Why a helper for op registration: on a real GPU we register with ``torch.library.triton_op`` and launch
through ``wrap_triton`` so torch.compile/inductor can see into the kernels. Under ``TRITON_INTERPRET=1``
(CPU tests) ``wrap_triton`` cannot trace interpreted kernels with fake tensors, so we register an opaque
``torch.library.custom_op`` with an explicit fake (meta) implementation instead; torch.compile then
treats the op as a black box, which is still correct.
"""

import math
import os
from collections.abc import Callable, Sequence
from types import SimpleNamespace
from typing import Any

import torch

try:  # Triton may be missing (CPU-only wheels, macOS) or broken; either way we fall back.
    import triton
    import triton.language as tl

    TRITON_AVAILABLE = True
except Exception:  # noqa: BLE001 - any import failure means "no triton"
    TRITON_AVAILABLE = False

    def _jit(fn: Callable | None = None, **_: Any) -> Any:
        return fn if fn is not None else (lambda f: f)

    triton = SimpleNamespace(
        jit=_jit,
        cdiv=lambda a, b: -(-a // b),
        next_power_of_2=lambda n: 1 << max(0, math.ceil(math.log2(max(n, 1)))),
    )
    tl = SimpleNamespace(constexpr=Any)

# The interpreter runs kernels with numpy on CPU tensors; it is what the CPU test-suite uses.
INTERPRET: bool = os.environ.get("TRITON_INTERPRET", "0") == "1"

# triton_op/wrap_triton exist from torch 2.6; they need compiled (not interpreted) kernels.
_USE_TRITON_OP: bool = (
    TRITON_AVAILABLE and not INTERPRET and hasattr(torch.library, "triton_op") and hasattr(torch.library, "wrap_triton")
)

OP_NAMESPACE = "scaletrain_kernels"


def use_triton(*tensors: torch.Tensor) -> bool:
    """True when the Triton path can run on these tensors (CUDA, or CPU under the interpreter)."""
    if not TRITON_AVAILABLE:
        return False
    if INTERPRET:
        return all(t.device.type == "cpu" for t in tensors)
    return all(t.is_cuda for t in tensors)


def launch(kernel: Any) -> Any:
    """Return the launchable form of a jitted kernel (wrapped for tracing when registered with triton_op)."""
    return torch.library.wrap_triton(kernel) if _USE_TRITON_OP else kernel


def kernel_op(name: str, *, mutates_args: Sequence[str] = (), fake: Callable | None = None) -> Callable:
    """Register ``fn`` as ``scaletrain_kernels::<name>``; ``fake`` computes output metadata for custom_op."""

    def deco(fn: Callable) -> Any:
        qualname = f"{OP_NAMESPACE}::{name}"
        if _USE_TRITON_OP:
            return torch.library.triton_op(qualname, fn, mutates_args=tuple(mutates_args))
        op = torch.library.custom_op(qualname, fn, mutates_args=tuple(mutates_args))
        if fake is not None:
            op.register_fake(fake)
        return op

    return deco


def num_programs_hint(device: torch.device) -> int:
    """How many persistent programs to launch for reduction-style kernels (a few per SM on GPU)."""
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # interpreter: few programs keeps the numpy overhead low
