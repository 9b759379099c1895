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


def _reshard_after_forward(policy: str, is_root: bool, pipelined: bool) -> bool:
    if policy == "always":
        return True
    if policy == "never":
        return False
    # With pipeline stages each block runs once per microbatch: resharding would repeat the
    # all-gather for every microbatch, so keep the stage's weights gathered through the step.
    return not is_root and not pipelined


def apply_fsdp(
    model: nn.Module, blocks: Sequence[nn.Module], dims: ParallelDims, train: TrainSection, parallel: ParallelSection
) -> None:
    # HSDP: replicate across the outer axis, shard across the inner (which includes cp,
    # because cp ranks hold identical weights and can share the shards).
    fsdp_mesh = dims.hsdp_mesh() if dims.dp_replicate > 1 else dims.axis("dp_shard_cp")
    mp_policy = MixedPrecisionPolicy(
        param_dtype=TORCH_DTYPES[train.dtype], reduce_dtype=TORCH_DTYPES[train.reduce_dtype]
    )
    offload: OffloadPolicy = CPUOffloadPolicy() if parallel.fsdp_cpu_offload else OffloadPolicy()
    for block in blocks:
        fully_shard(
            block,
            mesh=fsdp_mesh,
            mp_policy=mp_policy,
            offload_policy=offload,
            reshard_after_forward=_reshard_after_forward(
                parallel.reshard_after_forward, is_root=False, pipelined=dims.pp_enabled
            ),
        )
    fully_shard(
        model,
        mesh=fsdp_mesh,
        mp_policy=mp_policy,
        offload_policy=offload,
        reshard_after_forward=_reshard_after_forward(
            parallel.reshard_after_forward, is_root=True, pipelined=dims.pp_enabled
        ),
    )


def apply_ddp(model: nn.Module, dims: ParallelDims) -> None:
    # The composable `replicate` keeps parameter names unchanged (no `.module.` prefix),
    # so checkpoints move freely between DDP and every other layout.
    from torch.distributed._composable.replicate import replicate

    replicate(model, device_mesh=dims.axis("dp_replicate"), bucket_cap_mb=100)


def apply_data_parallel(
    model: nn.Module, blocks: Sequence[nn.Module], dims: ParallelDims, train: TrainSection, parallel: ParallelSection
) -> str:
    """Apply whichever data parallelism the dims ask for; returns its name for the logs."""
    if dims.ddp_enabled:
        apply_ddp(model, dims)
        return "ddp"
    if dims.fsdp_enabled or dims.hsdp_enabled:
        apply_fsdp(model, blocks, dims, train, parallel)
        return "hsdp" if dims.hsdp_enabled else "fsdp"
    return "none"
