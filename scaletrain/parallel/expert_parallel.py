"""Expert parallel: a mixture-of-experts block's routed experts split over the `ep` ranks, tokens sent to the
rank of their expert and back.

Experts are stacked weights ([E, ...] parameters), sharded on dim 0 over the `ep` mesh axis: rank i of an ep
group holds experts [i*E/ep, (i+1)*E/ep). The block routes its own tokens and sorts the (token, expert) pairs
by expert, so the rows bound for each ep rank are contiguous; then

  1. `dispatch` exchanges the per-expert counts (an all-to-all of E numbers), so every rank knows how many rows
     each source sends to each of its experts (uneven splits and zeros are fine), sends the rows (an autograd
     all-to-all: its backward is the reverse all-to-all), and reorders what arrived from (source, expert)
     order to (expert, source) order, so each local expert's rows are one run for the grouped GEMM;
  2. the experts run on the received rows;
  3. `combine` undoes the reorder and sends the results back, in the order the block sent them.

Gradients: every rank with the same ep coordinate holds the same experts and received other tokens, so the
experts get their own FSDP2 group over those ranks (efsdp = edp x tp, see ParallelDims). Each expert's
gradient arrives summed over its ep group's tokens by the backward all-to-all; FSDP then sums over efsdp and
divides by the data-parallel size (dp_replicate x dp_shard x cp), which makes it the global-batch mean that
the dense parameters get from FSDP's own average over dp_shard x cp.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._functional_collectives import all_to_all_single_autograd
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from scaletrain.parallel.dims import ParallelDims


@dataclass
class ExpertRoute:
    """What `combine` needs to send a dispatch's results back."""

    group: dist.ProcessGroup
    send_splits: list[int]  # rows this rank sent to each ep rank
    recv_splits: list[int]  # rows it received from each
    order: torch.Tensor  # received rows (source-major) -> expert-major


def dispatch(
    x_PD: torch.Tensor, counts_E: torch.Tensor, group: dist.ProcessGroup
) -> tuple[torch.Tensor, torch.Tensor, ExpertRoute]:
    """Send rows sorted by global expert to the experts' ranks. counts_E: rows per global expert (all E).

    Returns (rows for this rank's experts in expert-major order, rows per local expert, the route back)."""
    ep = dist.get_world_size(group)
    local = counts_E.numel() // ep
    received_E = torch.empty_like(counts_E)  # [source, local expert], flattened
    dist.all_to_all_single(received_E, counts_E.contiguous(), group=group)
    send_splits = counts_E.view(ep, local).sum(1).tolist()
    recv_splits = received_E.view(ep, local).sum(1).tolist()
    x_QD = all_to_all_single_autograd(x_PD, recv_splits, send_splits, group)
    # Each received row's local expert, then a stable sort by it: expert-major, source order inside.
    segment_Q = torch.repeat_interleave(torch.arange(ep * local, device=counts_E.device), received_E)
    order_Q = torch.argsort(segment_Q % local, stable=True)
    route = ExpertRoute(group, send_splits, recv_splits, order_Q)
    return x_QD[order_Q], received_E.view(ep, local).sum(0), route


def combine(y_QD: torch.Tensor, route: ExpertRoute) -> torch.Tensor:
    """The experts' outputs back to the ranks that sent the rows, in the order they were sent."""
    y_source_major = torch.empty_like(y_QD).index_copy(0, route.order, y_QD)
    return all_to_all_single_autograd(y_source_major, route.send_splits, route.recv_splits, route.group)


def local_weight(weight: torch.Tensor) -> torch.Tensor:
    """This rank's experts of a stacked expert weight (the whole stack when it is not sharded over ep)."""
    return weight.to_local() if isinstance(weight, DTensor) else weight


def apply_expert_parallel(experts: Sequence[nn.Module], ep_mesh: DeviceMesh) -> None:
    """Shard every parameter of each module (stacked [E, ...] expert weights) on dim 0 over ep."""
    for module in experts:
        for name, param in list(module.named_parameters(recurse=False)):
            sharded = distribute_tensor(param.data, ep_mesh, [Shard(0)])
            module.register_parameter(name, nn.Parameter(sharded, requires_grad=param.requires_grad))


def apply_expert_fsdp(experts: Sequence[nn.Module], dims: ParallelDims, fsdp_options: dict) -> None:
    """FSDP2 for routed experts over the ranks that hold the same experts (see the module docstring)."""
    mesh = dims.expert_fsdp_mesh()
    shards = dims.axis("efsdp").size()

    def placement(param: nn.Parameter) -> Shard:
        # Shard the local experts when they split evenly, else their model dim (few experts per rank).
        local_experts = local_weight(param).shape[0]
        return Shard(0) if local_experts % shards == 0 else Shard(1)

    for module in experts:
        fully_shard(module, mesh=mesh, shard_placement_fn=placement, **fsdp_options)
        module.set_gradient_divide_factor(float(dims.dp_size * dims.cp))
        if mesh.device_type == "cpu" and shards > 1:
            # A custom divide factor becomes a pre-multiplied sum, which gloo does not have. (Not on one
            # shard: there torch 2.13 skips the collective, divides, and then divides again after a forced sum.)
            module.set_force_sum_reduction_for_comms(True)
