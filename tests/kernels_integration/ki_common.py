"""Helpers shared by the kernels-integration tests (a module with a unique name: test folders have no __init__)."""

from __future__ import annotations

from torch.utils._python_dispatch import TorchDispatchMode


class KernelOps(TorchDispatchMode):
    """Records the scaletrain_kernels ops dispatched inside the block."""

    def __init__(self) -> None:
        super().__init__()
        self.names: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        if func.namespace == "scaletrain_kernels":
            self.names.add(func._opname)
        return func(*args, **(kwargs or {}))
