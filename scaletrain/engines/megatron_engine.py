"""megatron-core as the engine: the recipe's model as megatron-core's own model (its GPTModel with megatron's
parallel linears and layer specs), trained by scaletrain's loop, optimizer, data and checkpoints.

The recipe says how (`Recipe.megatron`, scaletrain/recipes/gpt/megatron.py): the config translation, the
model, and the weight mapping both ways. The megatron model starts from the recipe model's initialized
weights, mapped, so it starts where a native run starts; checkpoints hold weights and AdamW state under the
recipe's names, unsplit, so they resume under native or any other engine, at any layout, and export like
native ones.

Layouts: megatron's tensor parallel over `parallel.tp` (its Column/RowParallel linears, vocab-parallel
embedding and cross-entropy), torch DDP over the data-parallel ranks. Megatron orders ranks tp-fastest as
scaletrain's mesh does, so its tp peers are the mesh's. Megatron's sequence and pipeline parallel, its
distributed optimizer and its MoE layer are not wired (refused, naming what they need; engine.name=native
has SP/PP/EP).
"""

from __future__ import annotations

import contextlib
import importlib.util
from contextlib import AbstractContextManager
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from scaletrain.checkpoint.store import flat_optimizer_entries, flat_param_state
from scaletrain.config.schema import TORCH_DTYPES, JobConfig
from scaletrain.engines.base import EngineSpec, autocast_to
from scaletrain.optim import ADAMW_MOMENTS, ADAMW_STATE_KEYS, adamw_initial_state, build_optimizer, group_index, set_lr
from scaletrain.parallel.dims import ParallelDims
from scaletrain.registry import MegatronInterop, get_recipe

_EXTRA = "_extra_state"  # megatron's per-module placeholders for Transformer Engine state: nothing here


class CausalLM(nn.Module):
    """The trainer's call, forward(tokens[, targets]), on megatron's forward(tokens, positions, mask, labels):
    with targets, the mean loss from megatron's vocab-parallel cross-entropy (the recipe's loss takes a 0-dim
    output as the loss); without, the logits (one tp rank only: under tp each rank holds a vocabulary slice)."""

    def __init__(self, megatron_model: nn.Module, tp: int) -> None:
        super().__init__()
        self.megatron, self.tp = megatron_model, tp

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
        if targets is not None:  # causal: the core attention masks
            return self.megatron(tokens, positions, attention_mask=None, labels=targets).mean()
        if self.tp > 1:
            raise ValueError("engine.name=megatron with parallel.tp > 1 computes the loss from targets only")
        return self.megatron(tokens, positions, attention_mask=None)


class TensorParallelSplit:
    """Where megatron keeps each tensor over the tp ranks, from its own parameter attributes
    (`tensor_model_parallel`, `partition_dim`): full (tp size 1) tensors split into this rank's part and
    gathered back. A gated MLP's fc1 is [gate; up] unsplit but [gate_r; up_r] on rank r (megatron's GLU halves
    the output it computes locally), so its halves split separately."""

    def __init__(self, model: nn.Module, group: dist.ProcessGroup | None, size: int, rank: int) -> None:
        from megatron.core.transformer.mlp import MLP

        self.group, self.size, self.rank = group, size, rank
        self.dims = {
            name: p.partition_dim for name, p in model.named_parameters() if getattr(p, "tensor_model_parallel", False)
        }
        self.glu = {
            f"{name}.linear_fc1.{leaf}"
            for name, module in model.named_modules()
            if isinstance(module, MLP) and module.config.gated_linear_unit
            for leaf in ("weight", "bias")
        }

    def local(self, name: str, full: torch.Tensor) -> torch.Tensor:
        dim = self.dims.get(name)
        if dim is None or self.size == 1:
            return full
        halves = full.chunk(2, dim) if name in self.glu else (full,)
        return torch.cat([half.chunk(self.size, dim)[self.rank] for half in halves], dim).contiguous()

    def full(self, name: str, local: torch.Tensor) -> torch.Tensor:
        """Collective over the tp group (every rank calls it for the same names in the same order)."""
        dim = self.dims.get(name)
        if dim is None or self.size == 1:
            return local
        parts = [torch.empty_like(local) for _ in range(self.size)]
        dist.all_gather(parts, local.contiguous(), group=self.group)
        if name not in self.glu:
            return torch.cat(parts, dim)
        halves = [part.chunk(2, dim) for part in parts]
        return torch.cat([torch.cat([h[i] for h in halves], dim) for i in (0, 1)], dim)


def _clip_tensor_parallel(params: list[nn.Parameter], max_norm: float, tp_group: dist.ProcessGroup | None) -> float:
    """Global gradient norm under megatron's tensor parallel: each tp-split gradient's squares summed over the
    tp ranks, a replicated one (norms, row-parallel biases: the same on every tp rank) counted once."""
    grads = [p.grad for p in params if p.grad is not None]
    split = [p.grad for p in params if p.grad is not None and getattr(p, "tensor_model_parallel", False)]
    replicated = [g for g in grads if not any(g is s for s in split)]
    split_sq = torch.nn.utils.get_total_norm(split).float() ** 2 if split else torch.zeros(())
    if tp_group is not None:
        dist.all_reduce(split_sq, group=tp_group)
    replicated_sq = torch.nn.utils.get_total_norm(replicated).float() ** 2 if replicated else torch.zeros(())
    total = (split_sq + replicated_sq).sqrt()
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return float(total)


class MegatronEngine:
    name = "megatron"

    def __init__(self, model: nn.Module, cfg: JobConfig, dims: ParallelDims, device: torch.device):
        from megatron.core import parallel_state

        if not parallel_state.model_parallel_is_initialized():
            parallel_state.initialize_model_parallel(tensor_model_parallel_size=dims.tp)
        tp_rank = parallel_state.get_tensor_model_parallel_rank()
        if dims.tp > 1 and tp_rank != dims.axis("tp").get_local_rank():
            raise RuntimeError(f"megatron's tp rank {tp_rank} is not the mesh's: rank orders differ")
        self.tp_group = parallel_state.get_tensor_model_parallel_group() if dims.tp > 1 else None
        self.train, self.model_cfg = cfg.train, cfg.model
        self.interop: MegatronInterop = get_recipe(cfg.recipe).megatron
        megatron_model = self.interop.build(cfg.model, tensor_model_parallel_size=dims.tp)
        self.module = CausalLM(megatron_model, dims.tp).to(device)
        self.split = TensorParallelSplit(megatron_model, self.tp_group, dims.tp, tp_rank)
        mapped = self.interop.to_megatron(cfg.model, dict(model.state_dict()))
        result = megatron_model.load_state_dict({k: self.split.local(k, v) for k, v in mapped.items()}, strict=False)
        missing = [k for k in result.missing_keys if not k.endswith(_EXTRA)]
        if missing or result.unexpected_keys:
            raise RuntimeError(f"megatron mapping: missing {missing}, unexpected {result.unexpected_keys}")
        model.to("meta")  # the recipe's copy of the weights is not trained: free it
        # Replicated over tp but each rank's gradient covers only its own heads: q/k norms act per head. Megatron
        # sums them over tp in finalize_model_grads (_allreduce_non_tensor_model_parallel_grads), which belongs
        # to its own DDP; under torch DDP the engine does the same.
        self.tp_summed = [
            p for name, p in megatron_model.named_parameters() if "q_layernorm" in name or "k_layernorm" in name
        ]
        dp_size = parallel_state.get_data_parallel_world_size()
        self.model: nn.Module = (
            torch.nn.parallel.DistributedDataParallel(
                self.module, process_group=parallel_state.get_data_parallel_group()
            )
            if dp_size > 1
            else self.module
        )
        self.optimizer = build_optimizer(self.module, cfg.train, device.type)
        layout = [f"tp={dims.tp}"] if dims.tp > 1 else []
        layout += [f"DDP over {dp_size}"] if dp_size > 1 else []
        self.description = f"megatron-core GPTModel{' + ' if layout else ''}{' x '.join(layout)}"
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
        if self.tp_group is not None:
            for param in self.tp_summed:
                dist.all_reduce(param.grad, group=self.tp_group)
        grad_norm = _clip_tensor_parallel(list(self.module.parameters()), self.train.grad_clip, self.tp_group)
        lr = set_lr(self.optimizer, step, self.train)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm, lr

    def checkpoint_state(self, with_optimizer: bool) -> MegatronState:
        return MegatronState(self, self.optimizer if with_optimizer else None)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class MegatronState:
    """Weights and AdamW state under the recipe's names (native's checkpoint format): megatron's tensors
    gathered over the tp ranks and mapped by the recipe's from_megatron, the optimizer's moments the same way
    as the weights they belong to (a fused tensor such as linear_qkv splits into the recipe's wq, wk, wv,
    moments included). Every rank holds the full tensors while a checkpoint is written or read."""

    def __init__(self, engine: MegatronEngine, optimizer: torch.optim.Optimizer | None):
        self.engine, self.optimizer = engine, optimizer
        self.params = {name: p for name, p in engine.module.megatron.named_parameters()}

    def _to_recipe(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        full = {name: self.engine.split.full(name, t) for name, t in tensors.items()}
        return self.engine.interop.from_megatron(self.engine.model_cfg, full)

    def _to_megatron(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        full = self.engine.interop.to_megatron(self.engine.model_cfg, tensors)
        return {name: self.engine.split.local(name, t) for name, t in full.items()}

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
        weights = self._to_megatron(state["model"])
        result = self.engine.module.megatron.load_state_dict(weights, strict=False)
        assert not result.unexpected_keys and all(k.endswith(_EXTRA) for k in result.missing_keys), result
        if self.optimizer is None:
            return
        names = list(state["model"])
        recipe_state = {n: flat_param_state(state["optimizer"], n, ADAMW_STATE_KEYS) for n in names}
        moments = {key: self._to_megatron({n: s[key] for n, s in recipe_state.items()}) for key in ADAMW_MOMENTS}
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
    if dims.pp > 1:
        raise ValueError(
            f"parallel.pp: {dims.pp} is not wired for engine.name=megatron: megatron's pipeline schedules are not "
            "driven by scaletrain's loop yet, and they need CUDA (megatron/core/pipeline_parallel/schedules.py "
            "counts tokens in torch.zeros([], device='cuda') in every forward_backward_* function); use "
            "engine.name=native for pipeline parallel"
        )
    for axis in ("cp", "dp_replicate", "ep"):
        if getattr(dims, axis) > 1:
            raise ValueError(
                f"parallel.{axis}: {getattr(dims, axis)} is not wired for engine.name=megatron (tensor parallel "
                "and data parallel over the other ranks only); use engine.name=native for context and expert "
                "parallel and HSDP"
            )
    problems = interop.refusals(cfg.model, dims.tp)
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
    lines = [f"megatron-core arguments (what its classes receive; tensor_model_parallel_size {dims.tp}):"]
    for cls, arguments in get_recipe(cfg.recipe).megatron.arguments(cfg.model).items():
        lines.append(f"  {cls}:")
        for key, value in arguments.items():
            lines.append(f"    {key}: {value.__name__ if callable(value) else value}")
    return lines


SPEC = EngineSpec(
    name="megatron",
    validate=validate,
    build=MegatronEngine,
    owns_data_parallel=True,
    owns_model_parallel=True,
    show=show,
)
