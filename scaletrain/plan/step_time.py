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
    engines    = an engine that owns data parallelism (DeepSpeed's ZeRO stages) says what it moves
                 (EngineSpec.plan_cost): its prefetched gathers and in-backward reductions count as fsdp
                 (overlapped), what the step waits for as replicate (exposed)
    step       = (compute + exposed fsdp + replicate + tp + ep) / (1 - bubble)

Links: a group whose ranks fit in one node (axis order pp, dp_replicate, dp_shard, cp, tp: tp innermost)
uses the intra-node bandwidth, otherwise the inter-node one.

Latency: every collective also pays NCCL's ring model (src/graph/tuning.cc, ring / Simple protocol): a
base of 8.4 us plus, per ring step, 3.4 us over NVLink or 9.6 us over the network, with n - 1 steps for an
all-gather or reduce-scatter over n ranks (2(n - 1) for an all-reduce), of which (nodes - 1) (twice that)
cross the network. Counted per collective: FSDP2 gathers and scatters once per unit (each trunk block and
the root) per micro-batch, TP 8 per block, EP 4 per routed block per micro-batch, HSDP one all-reduce per
unit, DDP one per 25 MiB bucket. The hop latencies are `cluster.intra_node_latency_us` /
`inter_node_latency_us`. This is a first-order model, stated so it can be checked: it ignores
kernel-level overlap inside tensor parallel and the optimizer step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from scaletrain.config.schema import JobConfig
from scaletrain.engines import get_engine
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
    intra_node_latency_us: float = 3.4  # per ring step over NVLink (NCCL's ring / Simple hardware latency)
    inter_node_latency_us: float = 9.6  # per ring step across nodes
    base_latency_us: float = 8.4  # per collective (NCCL's ring / Simple base latency)


DDP_BUCKET_BYTES = 25 * 2**20  # DDP's default bucket_cap_mb


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


def collective_latency_s(gpu: GPU, ranks: int, span: int, gpus_per_node: int, all_reduce: bool = False) -> float:
    """One ring collective's latency over `ranks` ranks spread over `span` consecutive ranks (NCCL's model)."""
    if ranks <= 1:
        return 0.0
    nodes = min(ranks, math.ceil(span / gpus_per_node))
    rounds = 2 if all_reduce else 1
    steps, across = rounds * (ranks - 1), rounds * (nodes - 1)
    hops_us = (steps - across) * gpu.intra_node_latency_us + across * gpu.inter_node_latency_us
    return (gpu.base_latency_us + hops_us) / 1e6


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

    plan_cost = get_engine(cfg.engine.name).plan_cost
    if plan_cost is not None:  # an engine that owns data parallelism (DeepSpeed ZeRO): no tp, pp, cp or ep
        cost = plan_cost(cfg, dims, int(model.parameters), int(model.trainable or model.parameters))
        link = _link_gbs(gpu, dims.dp_shard, gpus_per_node) * 1e9
        latency = collective_latency_s(gpu, dims.dp_shard, dims.dp_shard, gpus_per_node)
        fsdp_s = cost.overlapped_bytes / link + cost.overlapped_calls * latency
        replicate_s = cost.exposed_bytes / link + cost.exposed_calls * latency
        busy = compute_s + max(0.0, fsdp_s - compute_s) + replicate_s
        return StepTime(compute_s, fsdp_s, replicate_s, 0.0, 0.0, busy)

    slice_elements = model.parameters / (dims.tp * dims.pp)  # elements of this rank's tp/pp slice, before FSDP
    fsdp_s = replicate_s = tp_s = 0.0
    # Forwards per rank per step (micro-batches, or the pipeline's microbatches); FSDP2 units on this stage.
    forwards = pipeline_microbatches(cfg, dims) if dims.pp > 1 else grad_accum_steps(cfg, dims)
    units = model.blocks / dims.pp + 1
    shard = dims.dp_shard * (dims.cp if dims.fsdp_enabled or dims.hsdp_enabled else 1)
    if (dims.fsdp_enabled or dims.hsdp_enabled) and shard > 1:
        link = _link_gbs(gpu, dims.tp * shard, gpus_per_node) * 1e9
        gathers = 2 if cfg.parallel.reshard_after_forward != "never" else 1
        accum = grad_accum_steps(cfg, dims)
        gather_bytes = slice_elements * compute_bytes * gathers * accum
        scatters = accum if cfg.parallel.fsdp_reduce_every_microbatch else 1
        scatter_bytes = slice_elements * 4 * scatters  # fp32 gradients (train.reduce_dtype)
        calls = units * (gathers * accum + scatters)
        latency = calls * collective_latency_s(gpu, shard, dims.tp * shard, gpus_per_node)
        fsdp_s = (gather_bytes + scatter_bytes) * (shard - 1) / shard / link + latency
    replicas = dims.dp_replicate
    if replicas > 1:
        span = dims.world_size // dims.pp
        link = _link_gbs(gpu, span, gpus_per_node) * 1e9
        grad_bytes = slice_elements * 4 / (shard if dims.hsdp_enabled else 1)
        calls = units if dims.hsdp_enabled else math.ceil(grad_bytes / DDP_BUCKET_BYTES)
        latency = calls * collective_latency_s(gpu, replicas, span, gpus_per_node, all_reduce=True)
        replicate_s = 2 * grad_bytes * (replicas - 1) / replicas / link + latency
    if dims.tp > 1:
        link = _link_gbs(gpu, dims.tp, gpus_per_node) * 1e9
        activation = model.trunk_elements_per_sample * compute_bytes * samples_per_rank / dims.cp
        calls = 8 * model.blocks / dims.pp * forwards
        tp_s = (8 * model.blocks / dims.pp * activation * (dims.tp - 1) / dims.tp / link
                + calls * collective_latency_s(gpu, dims.tp, dims.tp, gpus_per_node))  # fmt: skip
    ep_s = 0.0
    if cfg.parallel.ep > 1 and model.expert_blocks:
        # The ep group is carved from dp_shard x cp, outside tp: its ranks span ep x tp.
        ep = cfg.parallel.ep
        link = _link_gbs(gpu, ep * dims.tp, gpus_per_node) * 1e9
        routed = model.trunk_elements_per_sample * model.top_k * compute_bytes * samples_per_rank / (dims.tp * dims.cp)
        calls = 4 * model.expert_blocks / dims.pp * forwards
        ep_s = (4 * model.expert_blocks / dims.pp * routed * (ep - 1) / ep / link
                + calls * collective_latency_s(gpu, ep, ep * dims.tp, gpus_per_node))  # fmt: skip
    bubble = 0.0
    if dims.pp > 1:
        bubble = (dims.pp - 1) / (pipeline_microbatches(cfg, dims) * cfg.parallel.stages_per_rank + dims.pp - 1)
    busy = compute_s + max(0.0, fsdp_s - compute_s) + replicate_s + tp_s + ep_s
    return StepTime(compute_s, fsdp_s, replicate_s, tp_s, bubble, busy / (1 - bubble), ep_s)
