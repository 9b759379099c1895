"""Exponential moving average of the weights, kept in the same layout as the weights.

Each EMA tensor is a clone of its parameter, so under FSDP2 or TP it is a DTensor with the
parameter's placements: each rank averages only its own shard (no communication, 1/N of
the memory), and the checkpoint stores it by parameter name like the model itself.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


class EMA:
    def __init__(self, model: nn.Module, decay: float, warmup: bool = True, children: set[str] | None = None):
        """children: average only these children of the root module (None = every trained parameter)."""
        if not 0.0 < decay < 1.0:
            raise ValueError(f"train.ema_decay: {decay} is not allowed; use a value in (0, 1)")
        self.decay, self.warmup = decay, warmup
        self.names = [
            n
            for n, p in model.named_parameters()
            if p.requires_grad and (children is None or n.split(".", 1)[0] in children)
        ]
        params = dict(model.named_parameters())
        self.shadow = {n: params[n].detach().clone() for n in self.names}

    def decay_at(self, step: int) -> float:
        """The decay applied by the update after optimizer step `step` (1-based)."""
        # The warm-up (as diffusers' EMAModel): the average follows the weights closely while they
        # move fast, and reaches `decay` only after ~9/(1-decay) steps.
        return min(self.decay, (1 + step) / (10 + step)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        params = dict(model.named_parameters())
        current = [params[n].detach() for n in self.names]
        averages = [self.shadow[n] for n in self.names]
        torch._foreach_lerp_(averages, current, 1.0 - self.decay_at(step))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = set(self.names) - set(state)
        if missing:
            raise KeyError(f"EMA state is missing {sorted(missing)[:5]}")
        with torch.no_grad():
            for n in self.names:
                self.shadow[n].copy_(state[n])

    @contextlib.contextmanager
    def swapped_into(self, model: nn.Module) -> Iterator[nn.Module]:
        """Temporarily put the EMA weights into `model` (e.g. to sample), then restore."""
        params = dict(model.named_parameters())
        with torch.no_grad():
            backup = {n: params[n].detach().clone() for n in self.names}
            for n in self.names:
                params[n].copy_(self.shadow[n])
        try:
            yield model
        finally:
            with torch.no_grad():
                for n in self.names:
                    params[n].copy_(backup[n])
