"""DeepSpeed as the engine: ZeRO stages 0-3 with CPU/NVMe offload, on the recipe's model and scaletrain's data.

The recipe's parallelize still applies activation checkpointing and compile; data parallelism is DeepSpeed's
(ParallelDims.engine_data_parallel). scaletrain's AdamW (same parameter groups as native) is handed to
DeepSpeed as the client optimizer, and scaletrain sets its LR every step from the shared schedule, so a
DeepSpeed run computes what a native run computes: tests/engines/ compare their losses.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import math
import os
import warnings
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from scaletrain.checkpoint.store import CheckpointState, ModuleState, flat_optimizer_entries, flat_param_state
from scaletrain.config.schema import TORCH_DTYPES, JobConfig
from scaletrain.engines.base import DataParallelCost, EngineSpec, autocast_to
from scaletrain.optim import ADAMW_MOMENTS, adamw_initial_state, build_optimizer, set_lr
from scaletrain.parallel.batching import grad_accum_steps, micro_batch_size
from scaletrain.parallel.dims import ParallelDims

# (scaletrain field, the DeepSpeed JSON key derived from it): what a user's ds_config.json may not contradict.
_DERIVED_KEYS = (
    ("train.global_batch_size", "train_batch_size"),
    ("train.micro_batch_size", "train_micro_batch_size_per_gpu"),
    ("train.micro_batch_size", "gradient_accumulation_steps"),
    ("train.grad_clip", "gradient_clipping"),
    ("train.dtype", "bf16.enabled"),
    ("train.dtype", "fp16.enabled"),
    ("engine.deepspeed.zero_stage", "zero_optimization.stage"),
    ("engine.deepspeed.offload_optimizer", "zero_optimization.offload_optimizer.device"),
    ("engine.deepspeed.offload_param", "zero_optimization.offload_param.device"),
)


def _offload(device: str, nvme_path: str) -> dict[str, Any]:
    entry: dict[str, Any] = {"device": device}
    if device == "nvme":
        entry["nvme_path"] = nvme_path
    return entry


def _get(tree: dict[str, Any], dotted: str) -> Any:
    node: Any = tree
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _user_json(path: str) -> dict[str, Any]:
    if not path:
        return {}
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"engine.deepspeed.config: {path!r} does not exist")
    try:
        loaded = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"engine.deepspeed.config: {path!r} is not valid JSON: {exc}") from exc
    if not isinstance(loaded, dict):
        raise ValueError(f"engine.deepspeed.config: {path!r} must hold a JSON object")
    return loaded


def deepspeed_config(cfg: JobConfig, dims: ParallelDims) -> dict[str, Any]:
    """The DeepSpeed JSON this job runs with: derived from the scaletrain config, merged with the user's
    ds_config.json (engine.deepspeed.config), whose values may add to it but not contradict it."""
    t, d = cfg.train, cfg.engine.deepspeed
    zero: dict[str, Any] = {"stage": d.zero_stage}
    if d.offload_optimizer != "none":
        zero["offload_optimizer"] = _offload(d.offload_optimizer, d.nvme_path)
    if d.offload_param != "none":
        zero["offload_param"] = _offload(d.offload_param, d.nvme_path)
    derived: dict[str, Any] = {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": micro_batch_size(cfg, dims),
        "gradient_accumulation_steps": grad_accum_steps(cfg, dims),
        "gradient_clipping": t.grad_clip,
        "bf16": {"enabled": t.dtype == "bf16"},
        "fp16": {"enabled": t.dtype == "fp16"},  # loss_scale 0 (DeepSpeed's default) = dynamic
        "zero_optimization": zero,
        # scaletrain's AdamW is the client optimizer, also with offload: on a CPU host DeepSpeedCPUAdam would
        # compute the same update; torch's keeps the numbers identical to native runs.
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,  # scaletrain's logger reports progress
    }
    user = _user_json(d.config)
    for field_name, ds_key in _DERIVED_KEYS:
        theirs, ours = _get(user, ds_key), _get(derived, ds_key)
        # "auto" (Hugging Face Trainer-style JSONs) means: take it from the job, as scaletrain does anyway.
        if theirs not in (None, "auto") and ours is not None and theirs != ours:
            raise ValueError(
                f"engine.deepspeed.config: {ds_key} = {theirs!r} in {d.config} contradicts {field_name} "
                f"(which gives {ds_key} = {ours!r}); set --{field_name} to match, or remove it from the JSON"
            )
    for owned in ("optimizer", "scheduler"):
        if owned in user:
            raise ValueError(
                f"engine.deepspeed.config: {d.config} sets {owned!r}; scaletrain owns the optimizer and LR schedule "
                "(train.lr, train.schedule, train.beta1/beta2, ...): remove it from the JSON"
            )
    return _merge(user, derived)


def cpu_has_fp16() -> bool:
    """Whether DeepSpeed's CPU accelerator accepts fp16 on this machine: it asks oneDNN, which has fp16 only
    on CPUs with AVX512-FP16 or AMX-FP16 (recent Xeons; not, for one, the AMD EPYC a CI machine had)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    except (AttributeError, RuntimeError):
        return False


class DeepSpeedEngine:
    name = "deepspeed"

    def __init__(self, model: nn.Module, cfg: JobConfig, dims: ParallelDims, device: torch.device):
        if device.type == "cpu":
            os.environ.setdefault("DS_ACCELERATOR", "cpu")  # instead of a warning that it guessed so
            if cfg.train.dtype == "fp16" and not cpu_has_fp16():
                raise ValueError(
                    "train.dtype: fp16 with engine.name=deepspeed on this CPU is refused by DeepSpeed's CPU "
                    "accelerator: oneDNN has no fp16 here (it needs AVX512-FP16 or AMX-FP16). Use bf16 or fp32, "
                    "or the native engine, or a GPU"
                )
        import deepspeed
        from deepspeed.utils import logger as ds_logger

        ds_logger.setLevel(logging.WARNING)  # its INFO lines would drown scaletrain's progress output
        # DeepSpeed 0.19 calls torch's older collective names, which warn on every step.
        warnings.filterwarnings("ignore", message=r".*is deprecated. Please use", category=FutureWarning)
        self.train = cfg.train
        self.config = deepspeed_config(cfg, dims)
        self._low_precision = None if cfg.train.dtype == "fp32" else TORCH_DTYPES[cfg.train.dtype]
        self._device_type = device.type
        d = cfg.engine.deepspeed
        offload = [
            f"{what} offload to {where}"
            for what, where in (("optimizer", d.offload_optimizer), ("parameter", d.offload_param))
            if where != "none"
        ]
        self.description = f"deepspeed ZeRO-{d.zero_stage}" + "".join(f" + {o}" for o in offload)
        optimizer = build_optimizer(model, cfg.train, device.type)
        # Parameter name -> its param group's hyperparameters, for checkpoints in native's format (ZeRO
        # replaces the groups' parameter lists with flat partitions).
        group_index = {id(p): i for i, g in enumerate(optimizer.param_groups) for p in g["params"]}
        self._group_of = {
            name: {k: v for k, v in optimizer.param_groups[group_index[id(p)]].items() if k != "params"}
            for name, p in model.named_parameters()
            if id(p) in group_index
        }
        self.model, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=self.config, dist_init_required=False
        )

    def autocast(self) -> AbstractContextManager:
        # DeepSpeed casts the weights to bf16/fp16 but not the inputs: autocast makes an fp32 input (an image,
        # a noise level) meet them in the low precision, and keeps norms and softmax in fp32.
        return autocast_to(self._device_type, self._low_precision)

    def micro_batch(self, last: bool) -> AbstractContextManager:
        # DeepSpeed reduces (ZeRO-1/2/3 by reduce-scatter) on the boundary micro-batch only.
        self.model.set_gradient_accumulation_boundary(last)
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        self.model.backward(loss, scale_wrt_gas=False)  # the trainer already divided by the micro-batch count

    def step(self, step: int) -> tuple[float, float]:
        lr = set_lr(self.optimizer, step, self.train)
        # ZeRO stages report the norm they clipped with; stage 0 does not, so measure its (already
        # all-reduced) gradients first.
        norm = self._stage0_grad_norm() if self.config["zero_optimization"]["stage"] == 0 else None
        self.model.step()
        if norm is None:
            norm = self.model.get_global_grad_norm()
        return float(norm), lr

    def _stage0_grad_norm(self) -> float:
        grads = [p.grad for p in self.model.module.parameters() if p.grad is not None]
        return float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0

    def checkpoint_state(self, with_optimizer: bool) -> CheckpointState:
        return DeepSpeedState(self.model, self._group_of, with_optimizer)

    def state_dict(self) -> dict:
        """fp16: the dynamic loss scaler's state, so a resumed run scales (and skips overflowing steps) as the
        uninterrupted one would."""
        scaler = getattr(self.optimizer, "loss_scaler", None)
        if scaler is None or not getattr(scaler, "dynamic", False):
            return {}
        return {"loss_scaler": {key: getattr(scaler, key) for key in _SCALER_STATE}}

    def load_state_dict(self, state: dict) -> None:
        scaler = getattr(self.optimizer, "loss_scaler", None)
        for key, value in state.get("loss_scaler", {}).items():
            setattr(scaler, key, value)


# DeepSpeed's DynamicLossScaler: what changes as it trains (runtime/fp16/loss_scaler.py).
_SCALER_STATE = ("cur_scale", "cur_iter", "last_overflow_iter", "cur_hysteresis")


class DeepSpeedState:
    """A DeepSpeed engine's model and optimizer state in native's checkpoint format (full parameter names and
    shapes, fp32 master weights, AdamW moments per parameter), so that native and DeepSpeed runs of any
    stage resume each other's checkpoints and `export` / `ckpt info` read them unchanged.

    ZeRO-1/2/3 keep fp32 masters and moments in flat per-rank partitions; DeepSpeed's tensor-fragment API
    (`safe_get_full_*` / `safe_set_full_*`, collective: every rank calls it per parameter in the same order)
    gathers and scatters them. Each rank holds one full copy while a checkpoint is written or read.
    """

    def __init__(self, engine: Any, group_of: dict[str, dict[str, Any]], with_optimizer: bool):
        self.engine, self.group_of, self.with_optimizer = engine, group_of, with_optimizer
        self.stage = engine.zero_optimization_stage()
        self.module: nn.Module = engine.module

    def _base_optimizer(self) -> torch.optim.Optimizer:
        # Stage 0 hands back the client optimizer; ZeRO wraps it and keeps it as `.optimizer`.
        return self.engine.optimizer if self.stage == 0 else self.engine.optimizer.optimizer

    def state_dict(self) -> dict[str, Any]:
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        if self.stage == 0:  # parameters and optimizer are plain torch ones
            return ModuleState(self.module, self._base_optimizer() if self.with_optimizer else None).state_dict()
        params = dict(self.module.named_parameters())
        model = {
            name: safe_get_full_fp32_param(params[name]) if name in params else value
            for name, value in self.module.state_dict(keep_vars=True).items()
        }
        state: dict[str, Any] = {"model": model}
        if self.with_optimizer:
            optim: dict[str, Any] = {}
            self._ensure_adam_state()
            step = self._adam_step()
            for name, param in params.items():
                if name not in self.group_of:
                    continue
                moments = {key: safe_get_full_optimizer_state(param, key) for key in ADAMW_MOMENTS}
                optim.update(flat_optimizer_entries(name, {"step": step.clone(), **moments}, self.group_of[name]))
            state["optimizer"] = optim
        return state

    def _ensure_adam_state(self) -> None:
        """Give every flat partition its AdamW state and link the per-parameter views into it.

        Before the first update (a checkpoint being loaded) the state does not exist yet: zeros and step 0 are
        what AdamW would create itself, so a run that never loads anything trains the same."""
        base = self._base_optimizer()
        if self.stage == 3:  # its groups hold the flat partition only while it is being updated
            flats = list(self.engine.optimizer.fp32_partitioned_groups_flat)
        else:
            flats = [flat for group in base.param_groups for flat in group["params"]]
        for flat in flats:
            if not base.state.get(flat):
                base.state[flat] = adamw_initial_state(flat)
        self._link_moment_views()

    def _link_moment_views(self) -> None:
        # ZeRO-1/2 point each parameter's fragment at its slice of the flat AdamW state. DeepSpeed 0.19.8 links
        # them once, right after the first param group's first update, when the other groups have no state
        # yet: scaletrain's second group (norms and biases) would keep empty views. Relink now, when every
        # group has state. (ZeRO-3 indexes the flat state directly.)
        zero = self.engine.optimizer
        if hasattr(zero, "_lazy_init_hp_params_optimizer_state"):
            zero._hp_optimizer_states_linked = False
            zero._lazy_init_hp_params_optimizer_state()

    def _adam_step(self) -> torch.Tensor:
        states = [s for s in self._base_optimizer().state.values() if "step" in s]
        step = states[0]["step"] if states else 0.0
        return torch.as_tensor(step, dtype=torch.float32).clone()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        import deepspeed
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        if self.stage == 0:
            ModuleState(self.module, self._base_optimizer() if self.with_optimizer else None).load_state_dict(state)
            return
        model = state["model"]
        with torch.no_grad():
            for name, param in self.module.named_parameters():
                value = model[name]
                # The compute copy (full for ZeRO-1/2; gathered and re-partitioned for ZeRO-3) ...
                with deepspeed.zero.GatheredParameters([param], modifier_rank=0, enabled=self.stage == 3):
                    param.data.copy_(value.to(param.dtype))
                safe_set_full_fp32_param(param, value.float())  # ... and the fp32 master in the partitions
            for name, buffer in self.module.named_buffers():
                if name in model:
                    buffer.copy_(model[name])
        if not self.with_optimizer:
            return
        optim = state["optimizer"]
        self._ensure_adam_state()
        step = next(v for k, v in optim.items() if k.endswith(".step"))
        for flat_state in self._base_optimizer().state.values():
            flat_state["step"] = step.clone()
        for name, param in self.module.named_parameters():
            if name in self.group_of:
                for key, value in flat_param_state(optim, name, ADAMW_MOMENTS).items():
                    safe_set_full_optimizer_state(param, value, key)


def validate(cfg: JobConfig, dims: ParallelDims) -> None:
    d, t = cfg.engine.deepspeed, cfg.train
    if d.zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"engine.deepspeed.zero_stage: {d.zero_stage} is not allowed; choose 0, 1, 2 or 3")
    for axis in ("tp", "pp", "cp", "dp_replicate"):
        if getattr(dims, axis) > 1:
            raise ValueError(
                f"parallel.{axis}: {getattr(dims, axis)} is not available with engine.name=deepspeed (its data "
                "parallel spans every rank, set by dp_shard); use engine.name=native for tensor, pipeline or "
                "context parallel and HSDP"
            )
    if d.offload_optimizer != "none" and d.zero_stage == 0:
        raise ValueError("engine.deepspeed.offload_optimizer: needs zero_stage 1, 2 or 3")
    if d.offload_param != "none" and d.zero_stage != 3:
        raise ValueError(f"engine.deepspeed.offload_param: needs zero_stage 3 (got {d.zero_stage})")
    if "nvme" in (d.offload_optimizer, d.offload_param):
        if not d.nvme_path:
            raise ValueError("engine.deepspeed.nvme_path: offload to nvme needs an existing folder here")
        if not Path(d.nvme_path).is_dir():
            raise ValueError(f"engine.deepspeed.nvme_path: {d.nvme_path!r} is not an existing folder")
    if t.ema_decay > 0 and d.zero_stage == 3:
        raise ValueError(
            "train.ema_decay: an EMA of ZeRO-3's partitioned parameters is not supported yet; use zero_stage <= 2"
        )
    deepspeed_config(cfg, dims)  # a contradicting ds_config.json fails here, before any process group
    if importlib.util.find_spec("deepspeed") is None:
        raise ValueError("engine.name: deepspeed is not installed; pip install 'scaletrain[engines]' (or deepspeed)")


def show(cfg: JobConfig, dims: ParallelDims) -> list[str]:
    text = json.dumps(deepspeed_config(cfg, dims), indent=2)
    return [f"deepspeed config for {dims.world_size} ranks (what DeepSpeed receives):", *text.splitlines()]


def _preset(stage: int, offload: bool = False) -> list[str]:
    flags = ["--engine.deepspeed.zero_stage", str(stage)]
    if offload:
        flags += ["--engine.deepspeed.offload_optimizer", "cpu"] + (
            ["--engine.deepspeed.offload_param", "cpu"] if stage == 3 else []
        )
    return flags


DEFAULT_BUCKET_ELEMENTS = 500_000_000  # DeepSpeed's reduce_bucket_size and allgather_bucket_size defaults


def _elements(zero: dict[str, Any], key: str) -> int:
    """A bucket size from the ZeRO section: DeepSpeed's default when absent or "auto" (Hugging Face JSONs)."""
    value = zero.get(key)
    return int(value) if isinstance(value, (int, float)) and value > 0 else DEFAULT_BUCKET_ELEMENTS


def plan_cost(cfg: JobConfig, dims: ParallelDims, parameters: int, trainable: int) -> DataParallelCost:
    """ZeRO's memory and traffic per rank (Rajbhandari et al. 2020), as this engine runs it: the module's
    weights and gradients in the compute dtype (fp32, or 2 bytes under bf16/fp16) with fp32 master weights
    and AdamW's two fp32 moments beside them (no masters in fp32). Stage 1 partitions the optimizer state,
    2 also the gradients, 3 also the weights; stage 1 still holds every gradient during backward, the peak
    counted here. Traffic over n ranks: stage 0 all-reduces the gradients at the boundary; 1 reduce-scatters
    them there and 2 after every micro-batch (in backward, overlapped); both all-gather the updated weights
    after the step; 3 gathers the weights in forward and backward and reduce-scatters gradients every
    micro-batch, prefetched like FSDP2. Stage 3 also keeps a reduce bucket (reduce_bucket_size elements, 5e8
    by default: 0.93 GiB in bf16, measured, docs/engines.md). Offload is not planned."""
    zero = deepspeed_config(cfg, dims)["zero_optimization"]
    stage, n = zero["stage"], dims.dp_shard
    low = cfg.train.dtype in ("bf16", "fp16")
    width = 2 if low else 4
    partitioned = n if stage >= 1 else 1
    masters = 4 * trainable if low else 0
    ring = (n - 1) / n
    accum = grad_accum_steps(cfg, dims)
    bucket = _elements(zero, "reduce_bucket_size")
    buckets = math.ceil(trainable / bucket)
    gathers = math.ceil(parameters / _elements(zero, "allgather_bucket_size"))
    gradients, weights = width * trainable * ring, width * parameters * ring  # 0 bytes on one rank
    # stage -> ((overlapped bytes, calls), (exposed bytes, calls))
    overlapped_exposed = {
        0: ((0, 0), (2 * gradients, 2 * buckets)),
        1: ((0, 0), (gradients + weights, buckets + gathers)),
        2: ((accum * gradients, accum * buckets), (weights, gathers)),
        3: ((accum * (2 * weights + gradients), accum * (2 * gathers + buckets)), (0, 0)),
    }
    ((overlapped, overlapped_calls), (exposed, exposed_calls)) = overlapped_exposed[stage] if n > 1 else ((0, 0),) * 2
    return DataParallelCost(
        parameter_bytes=width * parameters // (n if stage == 3 else 1),
        gradient_bytes=width * trainable // (n if stage >= 2 else 1),
        optimizer_bytes=(masters + 8 * trainable) // partitioned,
        buffer_bytes=width * min(trainable, bucket) if stage == 3 else 0,
        overlapped_bytes=round(overlapped),
        overlapped_calls=overlapped_calls,
        exposed_bytes=round(exposed),
        exposed_calls=exposed_calls,
    )


SPEC = EngineSpec(
    name="deepspeed",
    validate=validate,
    build=DeepSpeedEngine,
    owns_data_parallel=True,
    show=show,
    plan_cost=plan_cost,
    presets={
        **{f"zero{stage}": _preset(stage) for stage in range(4)},
        "zero2-offload": _preset(2, offload=True),  # optimizer states and update on the CPU
        "zero3-offload": _preset(3, offload=True),  # and the parameters too
    },
)
