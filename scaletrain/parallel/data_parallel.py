"""Data parallelism: FSDP2 (ZeRO-3), HSDP (replicate x shard) or DDP, chosen by the dims.

FSDP2 is applied per repeated block and then to the root, so each block's parameters are
all-gathered just before it runs and freed after (reshard_after_forward), which is what
bounds memory at one block's full weights. The root group holds what is left (embeddings,
final norm, head); it is not resharded after forward by default because backward needs
it first.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

from scaletrain.config.schema import TORCH_DTYPES, ParallelSection, TrainSection
from scaletrain.parallel.dims import ParallelDims
from scaletrain.parallel.expert_parallel import apply_expert_fsdp


def _reshard_after_forward(policy: str, is_root: bool, pipelined: bool) -> bool:
    if policy == "always":
        return True
    if policy == "never":
        return False
    # With pipeline stages each block runs once per microbatch: resharding would repeat the
    # all-gather for every microbatch, so keep the stage's weights gathered through the step.
    return not is_root and not pipelined


def fsdp_options(train: TrainSection, parallel: ParallelSection, is_root: bool, pipelined: bool) -> dict:
    """fully_shard's keyword arguments other than the mesh, as the job config sets them."""
    return {
        "mp_policy": MixedPrecisionPolicy(
            param_dtype=TORCH_DTYPES[train.dtype], reduce_dtype=TORCH_DTYPES[train.reduce_dtype]
        ),
        "offload_policy": CPUOffloadPolicy() if parallel.fsdp_cpu_offload else OffloadPolicy(),
        "reshard_after_forward": _reshard_after_forward(parallel.reshard_after_forward, is_root, pipelined),
    }


def apply_fsdp(
    model: nn.Module, blocks: Sequence[nn.Module], dims: ParallelDims, train: TrainSection, parallel: ParallelSection
) -> None:
    # HSDP: replicate across the outer axis, shard across the inner (which includes cp,
    # because cp ranks hold identical weights and can share the shards).
    fsdp_mesh = dims.hsdp_mesh() if dims.dp_replicate > 1 else dims.axis("dp_shard_cp")
    block_options = fsdp_options(train, parallel, is_root=False, pipelined=dims.pp_enabled)
    for block in blocks:
        fully_shard(block, mesh=fsdp_mesh, **block_options)
    fully_shard(model, mesh=fsdp_mesh, **fsdp_options(train, parallel, is_root=True, pipelined=dims.pp_enabled))


def apply_ddp(model: nn.Module, dims: ParallelDims, find_unused_parameters: bool = False) -> None:
    # The composable `replicate` keeps parameter names unchanged (no `.module.` prefix),
    # so checkpoints move freely between DDP and every other layout.
    from torch.distributed._composable.replicate import replicate

    # gradient_as_bucket_view: gradients are views into the all-reduce buckets instead of a second fp32 copy
    # of every gradient beside them (DDP's default keeps both).
    replicate(
        model,
        device_mesh=dims.axis("dp_replicate"),
        bucket_cap_mb=100,
        find_unused_parameters=find_unused_parameters,
        gradient_as_bucket_view=True,
    )


def apply_data_parallel(
    model: nn.Module,
    blocks: Sequence[nn.Module],
    dims: ParallelDims,
    train: TrainSection,
    parallel: ParallelSection,
    experts: Sequence[nn.Module] = (),
    find_unused_parameters: bool = False,
) -> str:
    """Apply whichever data parallelism the dims ask for; returns its name for the logs.

    experts: modules of routed-expert weights (scaletrain/parallel/expert_parallel.py); under expert or tensor
    parallel they get FSDP groups of their own, over the ranks that hold the same experts and see other
    tokens (edp x tp) — also when nothing else is data-parallel (tp alone), to sum their gradients over tp.
    find_unused_parameters: for DDP, when a forward may leave parameters without gradients (a GAN's
    discriminator phase runs the generator under no_grad)."""
    if dims.ddp_enabled:  # replicas only: no tp, no ep
        apply_ddp(model, dims, find_unused_parameters)
        return "ddp"
    if experts and (dims.ep_enabled or dims.tp_enabled) and not dims.engine_data_parallel:
        # Before the blocks' groups, which then leave the experts' parameters out.
        apply_expert_fsdp(experts, dims, fsdp_options(train, parallel, is_root=False, pipelined=dims.pp_enabled))
    if dims.fsdp_enabled or dims.hsdp_enabled:
        apply_fsdp(model, blocks, dims, train, parallel)
        return "hsdp" if dims.hsdp_enabled else "fsdp"
    return "none"
