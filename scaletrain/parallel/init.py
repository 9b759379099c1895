"""Materialize a model built on the meta device and initialize it independently of layout.

Every parameter and buffer is initialized from its *full* (global) shape with a generator
seeded by (seed, name); each rank then keeps only its own slice. So a model sharded by
FSDP, split by TP or left whole gets exactly the same weights — which is what makes
layout-parity tests meaningful, and means a run can change layout without a seed
checkpoint. The cost is one full tensor at a time on each rank (the largest parameter),
never the whole model.

The model owns the recipe: `model.init_tensor(name, tensor, generator)` fills `tensor`
in place for every name, and raises for a name it does not know.
"""

from __future__ import annotations

import itertools
import zlib

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset


def _name_seed(seed: int, name: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


def _local_slice(full: torch.Tensor, dtensor: DTensor) -> torch.Tensor:
    shape, offset = compute_local_shape_and_global_offset(full.shape, dtensor.device_mesh, dtensor.placements)
    index = tuple(slice(o, o + s) for o, s in zip(offset, shape, strict=True))
    return full[index]


@torch.no_grad()
def init_model(model: nn.Module, device: torch.device | str, seed: int) -> nn.Module:
    """Allocate (if on meta) and initialize every parameter and buffer of `model`."""
    device = torch.device(device)
    if any(t.is_meta for t in itertools.chain(model.parameters(), model.buffers())):
        model.to_empty(device=device)
    for name, tensor in itertools.chain(model.named_parameters(), model.named_buffers()):
        full = torch.empty(tensor.shape, dtype=tensor.dtype, device=device)
        if full.is_floating_point():
            full.fill_(float("nan"))  # what init_tensor leaves unfilled stays NaN, and is caught below
        generator = torch.Generator(device=device).manual_seed(_name_seed(seed, name))
        model.init_tensor(name, full, generator)
        if full.is_floating_point() and full.isnan().any():
            raise RuntimeError(f"{type(model).__name__}.init_tensor left (part of) {name!r} unset")
        if isinstance(tensor, DTensor):
            tensor.to_local().copy_(_local_slice(full, tensor))
        else:
            tensor.copy_(full)
    return model
