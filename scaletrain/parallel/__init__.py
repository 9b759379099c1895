"""Parallelism as functions applied to a model built on the meta device.

Order, as a recipe's `parallelize` applies them (see scaletrain/recipes/gpt/parallelize.py):
tensor parallel -> activation checkpointing -> torch.compile -> FSDP2 / DDP.
TP first because it rewrites parameters into DTensors that the later steps wrap;
FSDP last because it must see the final module structure to group parameters.
"""

from scaletrain.parallel.activation_checkpoint import apply_activation_checkpointing
from scaletrain.parallel.blocks import checkpoint_compile_and_shard
from scaletrain.parallel.compile import apply_compile
from scaletrain.parallel.data_parallel import apply_data_parallel
from scaletrain.parallel.dims import ParallelDims
from scaletrain.parallel.init import init_model

__all__ = [
    "ParallelDims",
    "apply_activation_checkpointing",
    "apply_compile",
    "apply_data_parallel",
    "checkpoint_compile_and_shard",
    "init_model",
]
