"""Global gradient-norm clipping that is correct for any mix of layouts.

Gradients can be plain tensors (single process, DDP), DTensors on the FSDP mesh, or
DTensors on a 2-D (dp x tp) mesh; torch's `clip_grad_norm_` refuses to stack norms that
live on different meshes. So: norm each group of same-mesh, same-placement grads, turn
each group norm into a plain full value, combine, and (with pipeline stages) sum across
the pp axis, since each stage holds different parameters.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor


def global_grad_norm(
    parameters: Iterable[torch.nn.Parameter], pp_group: dist.ProcessGroup | None = None
) -> torch.Tensor:
    groups: dict[object, list[torch.Tensor]] = defaultdict(list)
    for p in parameters:
        if p.grad is None:
            continue
        key = (p.grad.device_mesh, p.grad.placements) if isinstance(p.grad, DTensor) else None
        groups[key].append(p.grad)
    total_sq = None
    for grads in groups.values():
        norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        sq = norm.float() ** 2
        total_sq = sq if total_sq is None else total_sq + sq
    if total_sq is None:
        total_sq = torch.zeros(())
    if pp_group is not None and dist.get_world_size(pp_group) > 1:
        dist.all_reduce(total_sq, group=pp_group)
    return total_sq.sqrt()


def clip_grad_norm_(
    parameters: Iterable[torch.nn.Parameter], max_norm: float, pp_group: dist.ProcessGroup | None = None
) -> torch.Tensor:
    """Returns the pre-clip global norm; clips in place when max_norm > 0."""
    params = [p for p in parameters if p.grad is not None]
    total = global_grad_norm(params, pp_group)
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total
