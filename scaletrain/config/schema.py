"""The job config: nested dataclasses, one per section, one help string per field.

Recipe-specific sections (`model`, `data`) are dataclasses that the recipe registers;
the loader swaps them in once it knows `recipe`. Everything else is the same for every
model family. The help strings become `scaletrain config help` and CLI error messages.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch


def opt(default: Any, help: str) -> Any:
    """A dataclass field with a help string (mutable defaults go through a factory)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class JobSection:
    name: str = opt("default", "Run name; outputs go to <run_dir>/<name>/.")
    run_dir: str = opt("runs", "Folder holding one sub-folder per run.")
    seed: int = opt(0, "Seed for weights, data order and dropout; same seed + layout = same run.")
    deterministic: bool = opt(False, "Use deterministic algorithms (bitwise repeatable, slower on GPU).")
    description: str = opt("", "Free text, stored with the run.")


# What train.dtype and train.reduce_dtype name, for every layer that casts (autocast, FSDP2, kernels' choice).
TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class TrainSection:
    steps: int = opt(200, "Number of optimizer steps.")
    global_batch_size: int = opt(16, "Samples per optimizer step, over all data-parallel ranks.")
    micro_batch_size: int = opt(0, "Samples per rank per forward; 0 = global_batch_size / dp (no accumulation).")
    lr: float = opt(3e-3, "Peak learning rate.")
    min_lr_ratio: float = opt(0.1, "Final LR as a fraction of the peak (cosine, linear and WSD decay).")
    warmup_steps: int = opt(20, "Linear warmup steps.")
    schedule: Literal["cosine", "linear", "wsd", "constant"] = opt(
        "cosine", "LR schedule after warmup; wsd = warmup-stable-decay."
    )
    wsd_decay_fraction: float = opt(0.2, "WSD: fraction of steps spent in the final decay.")
    weight_decay: float = opt(
        0.1, "AdamW weight decay on every matrix (embedding and position tables included); none on norms and biases."
    )
    beta1: float = opt(0.9, "AdamW beta1.")
    beta2: float = opt(0.95, "AdamW beta2.")
    eps: float = opt(1e-8, "AdamW epsilon.")
    fused_optimizer: bool = opt(True, "Use the fused (or foreach) AdamW implementation when the device has it.")
    grad_clip: float = opt(1.0, "Clip the global gradient norm to this value; 0 disables clipping.")
    dtype: Literal["fp32", "bf16", "fp16"] = opt(
        "fp32", "Compute dtype: FSDP2 MixedPrecisionPolicy when sharding, autocast otherwise."
    )
    reduce_dtype: Literal["fp32", "bf16"] = opt("fp32", "Gradient reduction dtype under FSDP2 mixed precision.")
    loss_scaler: Literal["none", "dynamic"] = opt("none", "Loss scaling; fp16 needs 'dynamic'.")
    compile: bool = opt(False, "torch.compile each repeated block.")
    ema_decay: float = opt(0.0, "Keep an exponential moving average of the weights with this decay (0 = off).")
    ema_warmup: bool = opt(
        True,
        "Ramp the EMA decay as min(ema_decay, (1 + n) / (10 + n)) after n optimizer steps (diffusers' EMAModel "
        "default): without it a short run's EMA still holds 0.995^300 = 22 % of the random initialization at step 300.",
    )
    log_interval: int = opt(1, "Log metrics every N steps.")
    abort_on_nan: bool = opt(True, "Stop with an error naming the step when the loss is NaN or Inf.")
    fused_cross_entropy: bool = opt(False, "Fused linear+cross-entropy kernel in chunks: never materializes logits.")


@dataclass
class ParallelSection:
    dp_replicate: int = opt(1, "Data-parallel replicas (DDP, or the replicate axis of HSDP).")
    dp_shard: int = opt(-1, "FSDP2 shard degree; -1 = whatever the world size leaves over.")
    cp: int = opt(1, "Context-parallel degree (sequence split across ranks).")
    tp: int = opt(1, "Tensor-parallel degree.")
    pp: int = opt(1, "Pipeline-parallel degree.")
    ep: int = opt(
        1,
        "Expert-parallel degree: each mixture-of-experts block's routed experts split over this many ranks, "
        "borrowed from dp_shard x cp (so it must divide dp_shard x cp and adds no processes).",
    )
    loss_parallel: bool = opt(True, "With tp > 1, compute cross-entropy on vocab-sharded logits.")
    reshard_after_forward: Literal["default", "always", "never"] = opt(
        "default",
        "FSDP2: free gathered params after forward (always), keep them (never), or all but the root (default).",
    )
    fsdp_cpu_offload: bool = opt(False, "FSDP2: keep params, grads and optimizer state on the CPU (needs a GPU).")
    fsdp_reduce_every_microbatch: bool = opt(
        True,
        "FSDP2/HSDP with gradient accumulation: reduce-scatter each micro-batch's gradients into the sharded ones "
        "(ZeRO-3's memory; HSDP's all-reduce still waits for the last). false: keep them unsharded until the last "
        "micro-batch, one reduce-scatter per step but a full fp32 gradient of the rank's model meanwhile.",
    )
    pp_schedule: Literal["gpipe", "1f1b", "interleaved_1f1b", "zero_bubble", "zbv", "dualpipev"] = opt(
        "1f1b", "Pipeline schedule; zero_bubble = interleaved zero-bubble, zbv/dualpipev = V-shaped (2 stages/rank)."
    )
    pp_layer_boundaries: list[int] = opt([], "Explicit stage cuts as layer indices (e.g. 3,6); empty = balanced.")
    microbatches: int = opt(0, "Pipeline microbatches per step; 0 = pp.")
    stages_per_rank: int = opt(1, "Virtual pipeline stages per rank (interleaved schedules).")
    cp_method: Literal["ring", "alltoall"] = opt("ring", "Context-parallel attention method.")
    backend: Literal["auto", "nccl", "gloo"] = opt("auto", "Process-group backend; auto = nccl on CUDA, else gloo.")
    timeout_s: int = opt(600, "Collective timeout in seconds.")
    step_timeout_s: float = opt(
        0.0,
        "Watchdog: a step or checkpoint save on any rank taking longer than this prints that rank's Python "
        "stacks and exits with an error (so torchrun can restart the group); 0 = off.",
    )

    @property
    def degrees(self) -> dict[str, int]:
        return {
            "pp": self.pp,
            "dp_replicate": self.dp_replicate,
            "dp_shard": self.dp_shard,
            "cp": self.cp,
            "tp": self.tp,
        }


@dataclass
class ActivationCheckpointSection:
    mode: Literal["none", "full", "selective"] = opt("none", "Recompute activations in backward.")
    selective: str = opt(
        "op", "With mode=selective: 'op' (save matmul/attention outputs, recompute the rest) or N (every N-th block)."
    )


@dataclass
class CheckpointSection:
    enable: bool = opt(True, "Write checkpoints.")
    interval: int = opt(100, "Save every N steps (and at the end).")
    keep: int = opt(2, "Keep the newest K complete checkpoints.")
    resume: bool = opt(True, "Continue from the newest complete checkpoint in the run folder, if any.")
    load_path: str = opt("", "Initial weights to load (a checkpoint folder) when not resuming.")
    async_mode: Literal["none", "async"] = opt(
        "none", "none = save and return; async = copy to CPU, write in a background thread, publish at the next save."
    )
    fallback: bool = opt(False, "If the newest checkpoint is damaged, resume from the previous complete one (logged).")
    verify: Literal["checksum", "size"] = opt(
        "checksum", "Before resuming, check each file's SHA-256 (checksum) or only its size against the manifest."
    )


@dataclass
class MetricsSection:
    console: bool = opt(True, "Print a progress line on rank 0.")
    jsonl: bool = opt(True, "Write metrics.jsonl in the run folder.")
    tensorboard: bool = opt(True, "Write TensorBoard events to <run>/tb.")
    wandb: bool = opt(False, "Log to Weights & Biases (needs wandb installed).")
    wandb_project: str = opt("scaletrain", "W&B project.")
    mlflow: bool = opt(False, "Log to MLflow (needs mlflow installed).")
    mlflow_experiment: str = opt("scaletrain", "MLflow experiment.")
    peak_tflops: float = opt(0.0, "Device peak TFLOP/s for MFU; 0 = look the device up in the known-GPU table.")
    step_memory: bool = opt(
        False,
        "Follow every tensor the third step's forward and backward allocate (slow: Python per operator) and log "
        "activation_peak_gib: the peak of activations and temporaries above the model state (train.steps >= 3).",
    )


@dataclass
class EvalSection:
    interval: int = opt(0, "Run the recipe's evaluation (samples, metrics) every N steps; 0 = never.")
    num_samples: int = opt(16, "Samples the evaluation generates (for families that sample).")


@dataclass
class DeepSpeedSection:
    zero_stage: int = opt(
        2, "ZeRO stage: 0 = data parallel, 1 = optimizer states sharded, 2 = + gradients, 3 = + parameters."
    )
    offload_optimizer: Literal["none", "cpu", "nvme"] = opt(
        "none", "Where ZeRO keeps optimizer states and their update (stages 1-3)."
    )
    offload_param: Literal["none", "cpu", "nvme"] = opt("none", "Where ZeRO-3 keeps the parameters.")
    nvme_path: str = opt("", "An existing folder for offload=nvme (a fast local disk).")
    config: str = opt(
        "",
        "An existing ds_config.json, merged with this config: its other keys pass through to DeepSpeed; a value "
        "that contradicts a scaletrain field (batch sizes, precision, ZeRO stage, clipping) is refused naming both.",
    )


@dataclass
class FairscaleSection:
    mode: Literal["oss", "sharded_ddp"] = opt(
        "sharded_ddp",
        "oss = optimizer states sharded (ZeRO-1) under torch DDP; sharded_ddp = OSS + ShardedDDP, gradients sharded "
        "too (ZeRO-2).",
    )


@dataclass
class EngineSection:
    name: Literal["native", "deepspeed", "fairscale", "megatron"] = opt(
        "native",
        "Who owns parameters, gradients and optimizer state: native = torch (FSDP2/DDP/TP/PP/CP); deepspeed = "
        "DeepSpeed's engine (ZeRO 0-3, offload); fairscale = OSS / ShardedDDP; megatron = megatron-core's "
        "model (recipes with Recipe.megatron, e.g. gpt; its tensor parallel x data parallel). The others: data "
        "parallel only.",
    )
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)
    fairscale: FairscaleSection = field(default_factory=FairscaleSection)
    apex: bool = opt(
        False,
        "NVIDIA apex's FusedAdam (AdamW mode) as the native engine's optimizer; needs apex built with its CUDA "
        "extensions and a GPU (PyPI's `apex` is another project). Default: torch's fused AdamW.",
    )


@dataclass
class ClusterSection:
    """The machines `scaletrain plan --gpus N` plans for (scaletrain/plan/step_time.py); training ignores it."""

    gpu: str = opt(
        "h100", "A GPU of the planner's table (h100, h200, a100), or 'custom' with peak_tflops and memory_gib."
    )
    gpus_per_node: int = opt(8, "GPUs per node: groups within one node use the intra-node link.")
    peak_tflops: float = opt(
        0.0, "Dense bf16 peak per GPU in TFLOP/s; 0 = the table's (fp32 runs use the table's fp32 peak)."
    )
    memory_gib: float = opt(0.0, "Memory per GPU in GiB; 0 = the table's.")
    intra_node_gbs: float = opt(0.0, "GB/s per GPU, one direction, inside a node (NVLink); 0 = the table's.")
    inter_node_gbs: float = opt(0.0, "GB/s per GPU, one direction, across nodes (the NIC); 0 = the table's.")
    intra_node_latency_us: float = opt(3.4, "Latency per ring step inside a node, in us (NCCL's ring/Simple, NVLink).")
    inter_node_latency_us: float = opt(9.6, "Latency per ring step across nodes, in us (NCCL's ring/Simple, network).")
    efficiency: float = opt(
        0.5, "Fraction of the peak FLOP rate compute reaches (scaletrain plan --calibrate measures it)."
    )


@dataclass
class JobConfig:
    recipe: str = opt("gpt", "Model family; `scaletrain recipes` lists the registered ones.")
    job: JobSection = field(default_factory=JobSection)
    model: Any = None  # the recipe's model dataclass
    data: Any = None  # the recipe's data dataclass
    train: TrainSection = field(default_factory=TrainSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    activation_checkpoint: ActivationCheckpointSection = field(default_factory=ActivationCheckpointSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    metrics: MetricsSection = field(default_factory=MetricsSection)
    eval: EvalSection = field(default_factory=EvalSection)
    engine: EngineSection = field(default_factory=EngineSection)
    cluster: ClusterSection = field(default_factory=ClusterSection)
