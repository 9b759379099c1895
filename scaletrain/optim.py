"""AdamW with decay/no-decay groups and the LR schedules (warmup + cosine / linear / WSD / constant)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from scaletrain.config.schema import TrainSection

if TYPE_CHECKING:
    from scaletrain.registry import Phase


def group_index(param: torch.Tensor) -> int:
    """Which of build_optimizer's parameter groups holds `param`: 0 = weight decay (matrices), 1 = none
    (vectors: norm gains, biases; decaying a gain towards 0 fights the normalization it exists for)."""
    return 0 if param.ndim >= 2 else 1


def build_optimizer(
    model: nn.Module, train: TrainSection, device_type: str, phases: Sequence[Phase] = ()
) -> torch.optim.AdamW:
    """AdamW over the trainable parameters: decay and no-decay groups, and with phases (a recipe with several
    networks) those two per trained child, each with the phase's peak LR (`peak_lr`, read by set_lr) and
    betas. Children no phase trains are left out (the trainer froze them)."""
    children = {phase.trains: phase for phase in phases}
    groups: dict[tuple[str, int], dict] = {}
    for name, p in model.named_parameters():
        child = name.split(".", 1)[0] if phases else ""
        if not p.requires_grad or (phases and child not in children):
            continue
        key = (child, group_index(p))
        if key not in groups:
            phase = children.get(child)
            groups[key] = {"params": [], "weight_decay": train.weight_decay if key[1] == 0 else 0.0}
            if phase is not None:
                groups[key]["peak_lr"] = phase.lr or train.lr
                groups[key]["betas"] = phase.betas or (train.beta1, train.beta2)
        groups[key]["params"].append(p)
    # Without phases, always the two groups (checkpoints index them): add an empty one if a model lacks it.
    param_groups = [groups.get(("", i), {"params": [], "weight_decay": (train.weight_decay, 0.0)[i]}) for i in (0, 1)]
    if phases:
        param_groups = [groups[key] for key in sorted(groups)]
    # fused is fastest on GPUs; on CPU the foreach path is used so that every layout
    # (plain tensors or DTensors) runs the same arithmetic and parity holds exactly.
    fused = train.fused_optimizer and device_type == "cuda"
    return torch.optim.AdamW(
        param_groups,
        lr=train.lr,
        betas=(train.beta1, train.beta2),
        eps=train.eps,
        fused=fused or None,
        foreach=None if fused else True,
    )


# The tensors torch's AdamW keeps per parameter (the names DCP's flattened state dicts carry).
ADAMW_MOMENTS = ("exp_avg", "exp_avg_sq")  # one per element; "step" is one scalar
ADAMW_STATE_KEYS = ("step", *ADAMW_MOMENTS)


def adamw_initial_state(param: torch.Tensor) -> dict[str, torch.Tensor]:
    """The state torch's AdamW creates for `param` at its first update: engines that keep the state
    themselves build it before a checkpoint is loaded into it (zeros and step 0 change nothing)."""
    return {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(param), "exp_avg_sq": torch.zeros_like(param)}


def lr_multiplier(step: int, train: TrainSection) -> float:
    """LR at optimizer step `step` (0-based) as a fraction of the peak."""
    warmup, total, floor = train.warmup_steps, train.steps, train.min_lr_ratio
    if warmup and step < warmup:
        return (step + 1) / warmup
    if train.schedule == "constant":
        return 1.0
    if train.schedule == "wsd":
        decay_steps = max(1, int(round(train.wsd_decay_fraction * total)))
        decay_start = total - decay_steps
        if step < decay_start:
            return 1.0
        progress = (step - decay_start) / decay_steps
        return floor + (1.0 - floor) * (1.0 - progress)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if train.schedule == "linear":
        return floor + (1.0 - floor) * (1.0 - progress)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, step: int, train: TrainSection) -> float:
    """Set the LR for optimizer step `step`. Stateless: a pure function of the step, so a
    resumed run (even with a changed schedule) needs no scheduler state."""
    multiplier = lr_multiplier(step, train)
    for group in optimizer.param_groups:
        group["lr"] = group.get("peak_lr", train.lr) * multiplier
    return train.lr * multiplier
