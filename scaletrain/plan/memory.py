"""Per-rank memory of a layout, from its parameter shards (shards.py) and the job's precision and optimizer.

Model state, as the trainer's census counts it (scaletrain/metrics/memory.py: live_tensor_bytes at a step
boundary; the ZeRO paper's "model states"), native engine:
  - parameters: fp32 masters, 4 bytes per local element. bf16/fp16 compute never changes that: FSDP2's
    MixedPrecisionPolicy casts while it all-gathers, autocast casts per op.
  - gradients: fp32, 4 bytes per local trainable element (FSDP2 reduce-scatters into the sharded fp32
    gradient whatever train.reduce_dtype is; DDP's gradients are views into its all-reduce buckets,
    scaletrain/parallel/data_parallel.py: gradient_as_bucket_view, so no second copy).
  - optimizer: AdamW's two fp32 moments, 8 bytes per local trainable element, plus one 4-byte step counter
    per parameter tensor (ignored: kilobytes).
  - EMA: one fp32 copy of the trainable weights when train.ema_decay > 0.
  - buffers: as built (RoPE tables, norms' running stats).
  - pipeline buffers: the stages' receive buffers (shards.py), in the compute dtype (fp32, or 2 bytes under
    bf16/fp16).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from scaletrain.config.schema import JobConfig
from scaletrain.parallel.dims import ParallelDims, implied_world_size
from scaletrain.plan.shards import RankShards

FP32 = 4
ADAMW_MOMENTS = 2
GIB, MIB = 2**30, 2**20


def display_unit(largest_bytes: int) -> tuple[str, int]:
    """("GiB", 2**30) for sizes of a GiB or more, else ("MiB", 2**20): tiny models' tables keep their digits."""
    return ("GiB", GIB) if largest_bytes >= GIB else ("MiB", MIB)


@dataclass(frozen=True)
class ModelStateBytes:
    parameters: int
    gradients: int
    optimizer: int
    ema: int
    buffers: int
    pipeline_buffers: int

    @property
    def total(self) -> int:
        return sum(asdict(self).values())


def model_state_bytes(shards: RankShards, cfg: JobConfig, dims: ParallelDims) -> ModelStateBytes:
    trainable = shards.trainable
    return ModelStateBytes(
        parameters=FP32 * shards.parameters,
        gradients=FP32 * trainable,
        optimizer=ADAMW_MOMENTS * FP32 * trainable,
        ema=FP32 * trainable if cfg.train.ema_decay > 0 else 0,
        buffers=shards.buffer_bytes,
        pipeline_buffers=(FP32 if cfg.train.dtype == "fp32" else 2) * shards.pipeline_buffer_elements,
    )


def predict_model_state(cfg: JobConfig, pp_rank: int = 0) -> ModelStateBytes:
    """Model-state bytes of the first rank of pipeline rank `pp_rank` in the layout `cfg.parallel` names."""
    from scaletrain.plan.shards import rank_shards
    from scaletrain.validate import validate_config

    dims = validate_config(cfg, implied_world_size(vars(cfg.parallel)))
    return model_state_bytes(rank_shards(cfg, dims, pp_rank), cfg, dims)


def loader_index_bytes(cfg: JobConfig, dataset_length: int | None = None) -> int:
    """Host memory of the data loader's order: one int64 per item of the data set (the epoch's permutation,
    scaletrain/data/loader.py). On the CPU the trainer's census counts it with the model state; on a GPU it is
    host memory."""
    if dataset_length is None:
        from scaletrain.registry import get_recipe

        dataset_length = len(get_recipe(cfg.recipe).data.build_dataset(cfg))
    return 8 * dataset_length
