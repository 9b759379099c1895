"""megatron-core as the engine: the recipe's model as megatron-core's own model (its GPTModel with megatron's
parallel linears and layer specs), trained by scaletrain's loop, optimizer, data and checkpoints.

The recipe says how (`Recipe.megatron`, scaletrain/recipes/gpt/megatron.py): the config translation, the
model, and the weight mapping both ways. The megatron model starts from the recipe model's initialized
weights, mapped, so it starts where a native run starts; checkpoints hold weights and AdamW state under the
recipe's names, so they resume under native or any other engine and export like native ones.

Data parallel over every rank is torch DDP around the megatron model. Megatron's tensor and pipeline
parallel, its distributed optimizer and its MoE layer are not wired yet (refused: engine.name=native has
TP/PP/EP).
"""

from __future__ import annotations

import contextlib
import importlib.util
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import nn

from scaletrain.checkpoint.store import flat_optimizer_entries, flat_param_state
from scaletrain.config.schema import TORCH_DTYPES, JobConfig
from scaletrain.engines.base import EngineSpec, autocast_to
from scaletrain.optim import ADAMW_MOMENTS, ADAMW_STATE_KEYS, adamw_initial_state, build_optimizer, group_index, set_lr
from scaletrain.parallel.dims import ParallelDims
from scaletrain.parallel.grad_norm import clip_grad_norm_
from scaletrain.registry import MegatronInterop, get_recipe

_EXTRA = "_extra_state"  # megatron's per-module placeholders for Transformer Engine state: nothing here


class CausalLM(nn.Module):
    """The trainer's call, forward(tokens[, targets]), on megatron's forward(tokens, positions, mask)."""

    def __init__(self, megatron_model: nn.Module) -> None:
        super().__init__()
        self.megatron = megatron_model

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
        return self.megatron(tokens, positions, attention_mask=None)  # causal: the core attention masks


class MegatronEngine:
    name = "megatron"

    def __init__(self, model: nn.Module, cfg: JobConfig, dims: ParallelDims, device: torch.device):
        from megatron.core import parallel_state

        if not parallel_state.model_parallel_is_initialized():
            parallel_state.initialize_model_parallel(1, 1)  # tensor / pipeline size 1: data parallel only
        self.train, self.model_cfg = cfg.train, cfg.model
        self.interop: MegatronInterop = get_recipe(cfg.recipe).megatron
        self.module = CausalLM(self.interop.build(cfg.model)).to(device)
        mapped = self.interop.to_megatron(cfg.model, dict(model.state_dict()))
        result = self.module.megatron.load_state_dict(mapped, strict=False)
        missing = [k for k in result.missing_keys if not k.endswith(_EXTRA)]
        if missing or result.unexpected_keys:
            raise RuntimeError(f"megatron mapping: missing {missing}, unexpected {result.unexpected_keys}")
        model.to("meta")  # the recipe's copy of the weights is not trained: free it
        self.model: nn.Module = (
            torch.nn.parallel.DistributedDataParallel(self.module) if dims.world_size > 1 else self.module
        )
        self.optimizer = build_optimizer(self.module, cfg.train, device.type)
        self.description = f"megatron-core GPTModel{f' + DDP over {dims.world_size}' if dims.world_size > 1 else ''}"
        self._autocast_dtype = None if cfg.train.dtype == "fp32" else TORCH_DTYPES[cfg.train.dtype]
        self._device_type = device.type

    def autocast(self) -> AbstractContextManager:
        return autocast_to(self._device_type, self._autocast_dtype)

    def micro_batch(self, last: bool) -> AbstractContextManager:
        no_sync = getattr(self.model, "no_sync", None)  # DDP: reduce on the last micro-batch only
        return contextlib.nullcontext() if last or no_sync is None else no_sync()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self, step: int) -> tuple[float, float]:
        grad_norm = clip_grad_norm_(list(self.module.parameters()), self.train.grad_clip)
        lr = set_lr(self.optimizer, step, self.train)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(grad_norm), lr

    def checkpoint_state(self, with_optimizer: bool) -> MegatronState:
        return MegatronState(self, self.optimizer if with_optimizer else None)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class MegatronState:
    """Weights and AdamW state under the recipe's names (native's checkpoint format): megatron's tensors
    mapped by the recipe's from_megatron, the optimizer's moments the same way as the weights they belong to
    (a fused tensor such as linear_qkv splits into the recipe's wq, wk, wv, moments included)."""

    def __init__(self, engine: MegatronEngine, optimizer: torch.optim.Optimizer | None):
        self.engine, self.optimizer = engine, optimizer
        self.params = {name: p for name, p in engine.module.megatron.named_parameters()}

    def _to_recipe(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.engine.interop.from_megatron(self.engine.model_cfg, tensors)

    def state_dict(self) -> dict[str, Any]:
        weights = {k: v for k, v in self.engine.module.megatron.state_dict().items() if not k.endswith(_EXTRA)}
        state: dict[str, Any] = {"model": self._to_recipe(weights)}
        if self.optimizer is None:
            return state
        per_param = {n: self.optimizer.state.get(p) or adamw_initial_state(p) for n, p in self.params.items()}
        moments = {key: self._to_recipe({n: s[key] for n, s in per_param.items()}) for key in ADAMW_MOMENTS}
        step = next(iter(per_param.values()))["step"]  # every weight is updated at every step
        flat: dict[str, Any] = {}
        for name, weight in state["model"].items():
            group = self.optimizer.param_groups[group_index(weight)]
            settings = {k: v for k, v in group.items() if k != "params"}
            param_state = {"step": step.clone(), **{key: moments[key][name] for key in moments}}
            flat.update(flat_optimizer_entries(name, param_state, settings))
        state["optimizer"] = flat
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        to_megatron = self.engine.interop.to_megatron
        weights = to_megatron(self.engine.model_cfg, state["model"])
        result = self.engine.module.megatron.load_state_dict(weights, strict=False)
        assert not result.unexpected_keys and all(k.endswith(_EXTRA) for k in result.missing_keys), result
        if self.optimizer is None:
            return
        names = list(state["model"])
        recipe_state = {n: flat_param_state(state["optimizer"], n, ADAMW_STATE_KEYS) for n in names}
        moments = {
            key: to_megatron(self.engine.model_cfg, {n: s[key] for n, s in recipe_state.items()})
            for key in ADAMW_MOMENTS
        }
        step = recipe_state[names[0]]["step"]
        for name, param in self.params.items():
            self.optimizer.state[param] = {"step": step.clone(), **{key: moments[key][name] for key in moments}}


def validate(cfg: JobConfig, dims: ParallelDims) -> None:
    interop = get_recipe(cfg.recipe).megatron
    if interop is None:
        raise ValueError(
            f"engine.name: megatron needs the recipe's megatron-core mapping (Recipe.megatron); recipe "
            f"{cfg.recipe!r} has none — use engine.name=native"
        )
    for axis in ("tp", "pp", "cp", "dp_replicate", "ep"):
        if getattr(dims, axis) > 1:
            raise ValueError(
                f"parallel.{axis}: {getattr(dims, axis)} is not wired for engine.name=megatron yet (data parallel "
                "over every rank only); use engine.name=native for tensor, pipeline, context and expert parallel"
            )
    problems = interop.refusals(cfg.model)
    if problems:
        raise ValueError(f"engine.name: megatron cannot express this model: {'; '.join(problems)}")
    for field, on in (
        ("train.fused_cross_entropy", cfg.train.fused_cross_entropy),
        ("train.compile", cfg.train.compile),
    ):
        if on:
            raise ValueError(f"{field}: not available with engine.name=megatron (megatron's model computes logits)")
    if cfg.train.dtype == "fp16":
        raise ValueError("train.dtype: fp16 with engine.name=megatron is not supported; use bf16 or fp32")
    if cfg.train.ema_decay > 0:
        raise ValueError("train.ema_decay: EMA weights are not kept for engine.name=megatron; set train.ema_decay=0")
    if cfg.activation_checkpoint.mode != "none":
        raise ValueError(
            "activation_checkpoint.mode: scaletrain's activation checkpointing wraps the recipe's blocks, which "
            "engine.name=megatron does not run; use mode=none"
        )
    if importlib.util.find_spec("megatron.core") is None:
        raise ValueError("engine.name: megatron-core is not installed; pip install 'scaletrain[engines]'")


def show(cfg: JobConfig, dims: ParallelDims) -> list[str]:
    lines = ["megatron-core arguments (what its classes receive; tensor / pipeline size 1):"]
    for cls, arguments in get_recipe(cfg.recipe).megatron.arguments(cfg.model).items():
        lines.append(f"  {cls}:")
        for key, value in arguments.items():
            lines.append(f"    {key}: {value.__name__ if callable(value) else value}")
    return lines


SPEC = EngineSpec(name="megatron", validate=validate, build=MegatronEngine, owns_data_parallel=True, show=show)
