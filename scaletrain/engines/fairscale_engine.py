"""fairscale as the engine, for code bases that still use it: OSS (optimizer states sharded, ZeRO-1) under
torch DDP, or OSS + ShardedDDP (gradients sharded too, ZeRO-2).

fairscale 0.4.13 is the last release (2022). What works with torch 2.11-2.13 on CPU/gloo is offered here;
its FullyShardedDataParallel is not (it creates CUDA streams on first forward, even on a CPU machine;
native FSDP2 is its successor). scaletrain's AdamW is wrapped by OSS with the same parameter groups as
native, so fairscale runs compute what native runs compute (tests/engines/test_fairscale.py).
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
from contextlib import AbstractContextManager
from itertools import chain
from typing import Any

import torch
from torch import nn

from scaletrain.checkpoint.store import flat_optimizer_entries, flat_param_state
from scaletrain.config.schema import TORCH_DTYPES, JobConfig
from scaletrain.engines.base import EngineSpec, autocast_to
from scaletrain.optim import ADAMW_STATE_KEYS, adamw_initial_state, build_optimizer, set_lr
from scaletrain.parallel.dims import ParallelDims

_DESCRIPTIONS = {"oss": "fairscale OSS (ZeRO-1) + DDP", "sharded_ddp": "fairscale OSS + ShardedDDP (ZeRO-2)"}


class FairscaleEngine:
    name = "fairscale"

    def __init__(self, model: nn.Module, cfg: JobConfig, dims: ParallelDims, device: torch.device):
        from fairscale.nn.data_parallel import ShardedDataParallel
        from fairscale.optim.oss import OSS

        mode = cfg.engine.fairscale.mode
        self.train, self.module, self.description = cfg.train, model, _DESCRIPTIONS[mode]
        reference = build_optimizer(model, cfg.train, device.type)  # the parameter groups and hyperparameters
        groups = [dict(group) for group in reference.param_groups]
        accepted = inspect.signature(type(reference)).parameters  # defaults also hold derived entries
        settings = {k: v for k, v in reference.defaults.items() if k in accepted}
        self.optimizer = OSS(groups, optim=type(reference), **settings)
        if mode == "sharded_ddp":
            self.model: nn.Module = ShardedDataParallel(model, self.optimizer)
        else:
            self.model = torch.nn.parallel.DistributedDataParallel(model)
        self._autocast_dtype = None if cfg.train.dtype == "fp32" else TORCH_DTYPES[cfg.train.dtype]
        self._device_type = device.type

    def autocast(self) -> AbstractContextManager:
        return autocast_to(self._device_type, self._autocast_dtype)

    def micro_batch(self, last: bool) -> AbstractContextManager:
        # DDP and ShardedDDP both reduce gradients unless inside no_sync() (which must span forward and backward).
        return contextlib.nullcontext() if last else self.model.no_sync()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self, step: int) -> tuple[float, float]:
        # OSS computes the global norm over every rank's shard (ShardedDDP leaves each rank its shard's grads).
        grad_norm = self.optimizer.clip_grad_norm(self.train.grad_clip or float("inf"))
        lr = set_lr(self.optimizer, step, self.train)
        self.optimizer.step()
        # Zeroed, not set to None: ShardedDDP's gradients are views into its reduce buckets, and a fresh
        # gradient tensor after set_to_none would leave the bucket reducing last step's values (seen: losses
        # off the native run's from step 2).
        self.optimizer.zero_grad(set_to_none=False)
        return float(grad_norm), lr

    def checkpoint_state(self, with_optimizer: bool) -> FairscaleState:
        return FairscaleState(self.module, self.optimizer if with_optimizer else None)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class FairscaleState:
    """Parameters (replicated) and OSS's sharded AdamW state in native's checkpoint format: per-parameter
    entries under full names (`state.<name>.exp_avg`, `param_groups.<name>.lr`, ...), as DCP's flattened
    optimizer state dicts store them. OSS gathers and re-shards the state (collective)."""

    def __init__(self, module: nn.Module, optimizer: Any | None):
        self.module, self.optimizer = module, optimizer
        names = {id(p): name for name, p in module.named_parameters()}
        # OSS keeps the full parameter groups in their original order: that order indexes its state dict.
        self.order = (
            [names[id(p)] for p in chain.from_iterable(g["params"] for g in optimizer.param_groups)]
            if optimizer is not None
            else []
        )

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"model": dict(self.module.state_dict())}
        if self.optimizer is None:
            return state
        full = self.optimizer.state_dict(all_ranks=True)
        flat: dict[str, Any] = {}
        for group in full["param_groups"]:
            settings = {k: v for k, v in group.items() if k != "params"}
            for index in group["params"]:
                name = self.order[index]
                # Before the first step there is no state yet: AdamW's own initial values, as the load template.
                param_state = full["state"].get(index) or adamw_initial_state(self.module.get_parameter(name))
                flat.update(flat_optimizer_entries(name, param_state, settings))
        state["optimizer"] = flat
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["model"])
        if self.optimizer is None:
            return
        per_param = {
            index: flat_param_state(state["optimizer"], name, ADAMW_STATE_KEYS) for index, name in enumerate(self.order)
        }
        groups, start = [], 0
        for group in self.optimizer.param_groups:
            count = len(group["params"])
            groups.append(
                {**{k: v for k, v in group.items() if k != "params"}, "params": list(range(start, start + count))}
            )
            start += count
        self.optimizer.load_state_dict({"state": per_param, "param_groups": groups})


def validate(cfg: JobConfig, dims: ParallelDims) -> None:
    for axis in ("tp", "pp", "cp", "dp_replicate"):
        if getattr(dims, axis) > 1:
            raise ValueError(
                f"parallel.{axis}: {getattr(dims, axis)} is not available with engine.name=fairscale (data parallel "
                "over every rank only); use engine.name=native for tensor, pipeline or context parallel and HSDP"
            )
    if cfg.train.dtype == "fp16":
        raise ValueError(
            "train.dtype: fp16 with engine.name=fairscale is not supported (it needs fairscale's ShardedGradScaler); "
            "use bf16, or engine.name=native / deepspeed for fp16"
        )
    if importlib.util.find_spec("fairscale") is None:
        raise ValueError("engine.name: fairscale is not installed; pip install 'scaletrain[engines]' (or fairscale)")


SPEC = EngineSpec(
    name="fairscale",
    validate=validate,
    build=FairscaleEngine,
    owns_data_parallel=True,
    presets={mode: ["--engine.fairscale.mode", mode] for mode in _DESCRIPTIONS},
)
