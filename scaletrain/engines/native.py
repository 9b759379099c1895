"""The native engine: torch owns everything (FSDP2 / DDP / HSDP from the recipe's parallelize, TP, PP, CP)."""

from __future__ import annotations

import contextlib
import importlib.util
from contextlib import AbstractContextManager

import torch
from torch import nn

from scaletrain.checkpoint.store import ModuleState
from scaletrain.config.schema import TORCH_DTYPES, JobConfig
from scaletrain.engines.base import EngineSpec, autocast_to
from scaletrain.optim import build_optimizer, set_lr
from scaletrain.parallel.dims import ParallelDims
from scaletrain.parallel.grad_norm import clip_grad_norm_
from scaletrain.registry import get_recipe


class NativeEngine:
    name = "native"

    def __init__(self, model: nn.Module, cfg: JobConfig, dims: ParallelDims, device: torch.device):
        self.model, self.train, self.dims = model, cfg.train, dims
        self.description = dims.describe()
        phases = get_recipe(cfg.recipe).step.phases
        self.optimizer = build_optimizer(model, cfg.train, device.type, phases(cfg) if phases else ())
        if cfg.engine.apex:  # validate() checked that NVIDIA apex and a GPU are there
            self.optimizer = apex_fused_adamw(self.optimizer)
        self.scaler = torch.amp.GradScaler(device.type) if cfg.train.loss_scaler == "dynamic" else None
        # FSDP2 casts parameters itself (MixedPrecisionPolicy); elsewhere autocast does it.
        sharded = dims.fsdp_enabled or dims.hsdp_enabled
        self._autocast_dtype = None if sharded or cfg.train.dtype == "fp32" else TORCH_DTYPES[cfg.train.dtype]
        self._device_type = device.type
        self._reduce_every_microbatch = sharded and cfg.parallel.fsdp_reduce_every_microbatch
        self._replicated_shards = dims.hsdp_enabled

    def autocast(self) -> AbstractContextManager:
        return autocast_to(self._device_type, self._autocast_dtype)

    def micro_batch(self, last: bool) -> AbstractContextManager:
        # DDP (and FSDP2 when asked) skips the gradient reduction on non-final micro-batches. FSDP2 otherwise
        # reduce-scatters every one: skipping would keep each block's unsharded fp32 gradient to the end of the
        # step (Llama-3-70B, 64 ranks, FSDP only: 263 GiB per rank, per scaletrain plan).
        if self._reduce_every_microbatch:
            # HSDP: shard every micro-batch, all-reduce across replicas once
            if self._replicated_shards and hasattr(self.model, "set_requires_all_reduce"):
                self.model.set_requires_all_reduce(last)
        elif hasattr(self.model, "set_requires_gradient_sync"):
            self.model.set_requires_gradient_sync(last)
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def step(self, step: int, trains: str | None = None) -> tuple[float, float]:
        params = list(self.model.parameters())
        if trains is not None:  # one phase of a multi-network step: update that child only
            params = [p for name, p in self.model.named_parameters() if name.split(".", 1)[0] == trains]
            chosen = {id(p) for p in params}
            for p in self.model.parameters():
                if id(p) not in chosen:
                    p.grad = None  # what this phase's loss left on the other networks
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        # Pipeline stages hold different parameters: the norm sums over the pp group too.
        pp_group = self.dims.axis("pp").get_group() if self.dims.pp_enabled else None
        grad_norm = clip_grad_norm_(params, self.train.grad_clip, pp_group)
        lr = set_lr(self.optimizer, step, self.train)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(grad_norm), lr

    def checkpoint_state(self, with_optimizer: bool) -> ModuleState:
        return ModuleState(self.model, self.optimizer if with_optimizer else None)

    def state_dict(self) -> dict:
        return {"scaler": self.scaler.state_dict()} if self.scaler is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])


def apex_fused_adamw(reference: torch.optim.AdamW) -> torch.optim.Optimizer:
    """NVIDIA apex's FusedAdam in AdamW mode with `reference`'s parameter groups and hyperparameters."""
    from apex.optimizers import FusedAdam

    d = reference.defaults
    groups = [dict(group) for group in reference.param_groups]
    return FusedAdam(groups, lr=d["lr"], betas=d["betas"], eps=d["eps"], adam_w_mode=True)


def _nvidia_apex_problem() -> str | None:
    """Why NVIDIA apex's fused optimizer cannot run here, or None."""
    if importlib.util.find_spec("apex") is None or importlib.util.find_spec("apex.optimizers") is None:
        return "NVIDIA apex is not installed (PyPI's `apex` is an unrelated project)"
    if importlib.util.find_spec("fused_adam_cuda") is None and importlib.util.find_spec("amp_C") is None:
        return "apex is installed without its CUDA extensions (amp_C / fused_adam_cuda)"
    if not torch.cuda.is_available():
        return "apex's fused kernels need a CUDA GPU, and none is available"
    return None


def validate(cfg: JobConfig, dims: ParallelDims) -> None:
    """Layouts are checked by scaletrain.validate itself; here only the optional apex optimizer."""
    if cfg.engine.apex and (problem := _nvidia_apex_problem()):
        raise ValueError(
            f"engine.apex: {problem}. Build it from https://github.com/NVIDIA/apex (pip install -v "
            "--no-build-isolation --config-settings '--build-option=--cpp_ext' --config-settings "
            "'--build-option=--cuda_ext' ./ in its checkout), or leave engine.apex false: torch's fused AdamW "
            "and scaletrain's kernels are the default"
        )


SPEC = EngineSpec(name="native", validate=validate, build=NativeEngine)
