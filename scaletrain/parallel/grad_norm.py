"""Global gradient-norm clipping that is correct for any mix of layouts.

Gradients can be plain tensors (single process, DDP), DTensors on the FSDP mesh, on a 2-D
(dp x tp) mesh, or, for routed experts, on the (efsdp, ep) expert mesh; torch's `clip_grad_norm_`
refuses to stack norms that live on different meshes. So: sum the squares of each group of
same-mesh, same-placement grads into a plain full value, combine, and (with pipeline stages) sum
across the pp axis, since each stage holds different parameters.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor


def _by_layout(parameters: Iterable[torch.nn.Parameter]) -> list[list[torch.nn.Parameter]]:
    """Parameters with gradients, grouped by their gradients' (mesh, placements); plain tensors together."""
    groups: dict[object, list[torch.nn.Parameter]] = defaultdict(list)
    for p in parameters:
        if p.grad is None:
            continue
        key = (p.grad.device_mesh, p.grad.placements) if isinstance(p.grad, DTensor) else None
        groups[key].append(p)
    return list(groups.values())


def _squared_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """Sum of squares of same-layout gradients as a plain full value."""
    if isinstance(grads[0], DTensor) and any(p.is_partial() for p in grads[0].placements):
        # Pending sums (replicated weights under TP without FSDP): DTensor reduces them to compute the norm.
        return torch.nn.utils.get_total_norm(grads, norm_type=2.0).full_tensor().float() ** 2
    # Otherwise each rank's shards, summed over the mesh dims they are sharded on (not the replicated ones).
    # By hand rather than DTensor's full_tensor(), which for the expert mesh (efsdp, ep) tries to flatten
    # dims the root mesh does not hold in that order, and fails.
    local = [g.to_local() if isinstance(g, DTensor) else g for g in grads]
    sq = torch.nn.utils.get_total_norm(local, norm_type=2.0).float() ** 2
    if isinstance(grads[0], DTensor):
        mesh = grads[0].device_mesh
        for dim, placement in enumerate(grads[0].placements):
            if not placement.is_replicate():  # Shard, or FSDP's _StridedShard over a Shard
                dist.all_reduce(sq, group=mesh.get_group(dim))
    return sq


def global_grad_norm(
    parameters: Iterable[torch.nn.Parameter], pp_group: dist.ProcessGroup | None = None
) -> torch.Tensor:
    total_sq = None
    for group in _by_layout(parameters):
        grads = [p.grad for p in group]
        sq = _squared_norm(grads)
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
    groups = _by_layout(parameters)
    total = global_grad_norm((p for group in groups for p in group), pp_group)
    if max_norm > 0:
        for group in groups:  # one call per layout: DTensor ops refuse to mix meshes (expert parallel has two)
            torch.nn.utils.clip_grads_with_norm_(group, max_norm, total)
    return total
