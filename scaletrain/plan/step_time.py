"""A layout's step time on a GPU type, from its FLOPs and the bytes its collectives move.

    compute    = training FLOPs per rank (counted on the meta device, x the recompute of activation
                 checkpointing) / (peak x efficiency)
    fsdp       = parameter all-gathers (forward, and backward when resharded) and the gradient reduce-scatter
                 (each micro-batch's, unless parallel.fsdp_reduce_every_microbatch is off),
                 (n-1)/n of the shard group's bytes at its link's bandwidth; overlapped with compute, so only
                 what exceeds it is exposed
    replicate  = HSDP's / DDP's gradient all-reduce, 2(n-1)/n, exposed
    tp         = sequence-parallel all-gathers and reduce-scatters of the trunk activation, 4 per block in the
                 forward and 4 in the backward, (tp-1)/tp each, exposed
    ep         = expert parallel's all-to-alls: each routed token's activation (top_k copies) dispatched and
                 combined in the forward and again in the backward, (ep-1)/ep each, exposed
    bubble     = pipeline idle fraction (pp-1) / (microbatches x stages per rank + pp - 1)
    step       = (compute + exposed fsdp + replicate + tp + ep) / (1 - bubble)

Links: a group whose ranks fit in one node (axis order pp, dp_replicate, dp_shard, cp, tp: tp innermost)
uses the intra-node bandwidth, otherwise the inter-node one. This is a first-order model, stated so it can
be checked: it ignores latency, kernel-level overlap inside tensor parallel and the optimizer step.
"""

from __future__ import annotations

from dataclasses import dataclass

from scaletrain.config.schema import JobConfig
from scaletrain.metrics.device import lookup_spec
from scaletrain.parallel.batching import grad_accum_steps, pipeline_microbatches
from scaletrain.parallel.dims import ParallelDims


@dataclass(frozen=True)
class GPU:
    name: str
    memory_gib: float
    bf16_tflops: float  # dense peak
    fp32_tflops: float
    intra_node_gbs: float  # GB/s per GPU, one direction (NVLink)
    inter_node_gbs: float  # GB/s per GPU, one direction (the scale-out NIC)


def _gpu(key: str, table_name: str, memory_gib: float, intra: float, inter: float) -> tuple[str, GPU]:
    spec = lookup_spec(table_name)
    return key, GPU(spec.name, memory_gib, spec.bf16, spec.tf32 or spec.fp32, intra, inter)


# Peaks from scaletrain/metrics/device.py's datasheet table. Links: NVLink 4 (H100/H200) 450 GB/s and NVLink 3
# (A100) 300 GB/s per direction per GPU (NVIDIA datasheets); one 400 Gb/s (H100/H200) or 200 Gb/s (A100) NIC
# per GPU, as in DGX systems. Override with --intra-node-gbs / --inter-node-gbs.
GPUS = dict(
    [
        _gpu("h100", "H100", 80, 450, 50),
        _gpu("h200", "H200", 141, 450, 50),
        _gpu("a100", "A100", 80, 300, 25),
    ]
)

AC_RECOMPUTE = {"none": 1.0, "selective": 1.1, "full": 4 / 3}  # full AC redoes the forward (1 of 3 units)


@dataclass(frozen=True)
class StepTime:
    compute_s: float
    fsdp_s: float  # all of it; exposed_s counts what compute does not hide
    replicate_s: float
    tp_s: float
    bubble: float
    step_s: float
    ep_s: float = 0.0  # expert parallel's all-to-alls, exposed

    @property
    def exposed_fsdp_s(self) -> float:
        return max(0.0, self.fsdp_s - self.compute_s)


def _link_gbs(gpu: GPU, span: int, gpus_per_node: int) -> float:
    """Bandwidth of a group whose members are `span` ranks apart at most: inside a node or across nodes."""
    return gpu.intra_node_gbs if span <= gpus_per_node else gpu.inter_node_gbs


@dataclass(frozen=True)
class ModelFacts:
    """What the time model needs from the model, all layout-independent (meta-device counts)."""

    flops_per_sample: int  # training FLOPs (forward + backward) of one sample
    parameters: int
    trunk_elements_per_sample: int  # the activation between blocks, one whole sample (0 if no trunk)
    blocks: int  # the trunk's depth
    trainable: int = 0  # parameters with requires_grad (0: unknown)
    expert_blocks: int = 0  # blocks with routed experts (ModelSpec.expert_routing)
    top_k: int = 0  # experts each token goes to


def step_time(cfg: JobConfig, dims: ParallelDims, gpu: GPU, gpus_per_node: int, efficiency: float,
              model: ModelFacts) -> StepTime:  # fmt: skip
    """The model above for one optimizer step of `cfg`'s layout."""
    t = cfg.train
    low_precision = t.dtype in ("bf16", "fp16")
    peak = (gpu.bf16_tflops if low_precision else gpu.fp32_tflops) * 1e12
    compute_bytes = 2 if low_precision else 4
    samples_per_rank = t.global_batch_size / dims.dp_size
    recompute = AC_RECOMPUTE[cfg.activation_checkpoint.mode]
    flops = model.flops_per_sample * samples_per_rank * recompute / (dims.tp * dims.cp * dims.pp)
    compute_s = flops / (peak * efficiency)

    slice_elements = model.parameters / (dims.tp * dims.pp)  # elements of this rank's tp/pp slice, before FSDP
    fsdp_s = replicate_s = tp_s = 0.0
    shard = dims.dp_shard * (dims.cp if dims.fsdp_enabled or dims.hsdp_enabled else 1)
    if (dims.fsdp_enabled or dims.hsdp_enabled) and shard > 1:
        link = _link_gbs(gpu, dims.tp * shard, gpus_per_node) * 1e9
        gathers = 2 if cfg.parallel.reshard_after_forward != "never" else 1
        accum = grad_accum_steps(cfg, dims)
        gather_bytes = slice_elements * compute_bytes * gathers * accum
        scatters = accum if cfg.parallel.fsdp_reduce_every_microbatch else 1
        scatter_bytes = slice_elements * 4 * scatters  # fp32 gradients (train.reduce_dtype)
        fsdp_s = (gather_bytes + scatter_bytes) * (shard - 1) / shard / link
    replicas = dims.dp_replicate
    if replicas > 1:
        link = _link_gbs(gpu, dims.world_size // dims.pp, gpus_per_node) * 1e9
        grad_bytes = slice_elements * 4 / (shard if dims.hsdp_enabled else 1)
        replicate_s = 2 * grad_bytes * (replicas - 1) / replicas / link
    if dims.tp > 1:
        link = _link_gbs(gpu, dims.tp, gpus_per_node) * 1e9
        activation = model.trunk_elements_per_sample * compute_bytes * samples_per_rank / dims.cp
        tp_s = 8 * model.blocks / dims.pp * activation * (dims.tp - 1) / dims.tp / link
    ep_s = 0.0
    if cfg.parallel.ep > 1 and model.expert_blocks:
        # The ep group is carved from dp_shard x cp, outside tp: its ranks span ep x tp.
        link = _link_gbs(gpu, cfg.parallel.ep * dims.tp, gpus_per_node) * 1e9
        routed = model.trunk_elements_per_sample * model.top_k * compute_bytes * samples_per_rank / (dims.tp * dims.cp)
        ep_s = 4 * model.expert_blocks / dims.pp * routed * (cfg.parallel.ep - 1) / cfg.parallel.ep / link
    bubble = 0.0
    if dims.pp > 1:
        bubble = (dims.pp - 1) / (pipeline_microbatches(cfg, dims) * cfg.parallel.stages_per_rank + dims.pp - 1)
    busy = compute_s + max(0.0, fsdp_s - compute_s) + replicate_s + tp_s + ep_s
    return StepTime(compute_s, fsdp_s, replicate_s, tp_s, bubble, busy / (1 - bubble), ep_s)
