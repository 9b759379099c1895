"""The weight EMA: the decay schedule, and the average it keeps, against a hand-computed one."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from scaletrain.ema import EMA


def _weights_after_each_step(steps: int) -> list[torch.Tensor]:
    return [torch.full((2,), float(step)) for step in range(1, steps + 1)]


@pytest.mark.parametrize("warmup", [True, False])
def test_average_matches_the_recurrence(warmup):
    model = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.zero_()
    ema = EMA(model, decay=0.9, warmup=warmup)
    expected = torch.zeros(2)
    for step, weights in enumerate(_weights_after_each_step(30), start=1):
        with torch.no_grad():
            model.weight.copy_(weights[None])
        ema.update(model, step)
        decay = min(0.9, (1 + step) / (10 + step)) if warmup else 0.9
        expected = decay * expected + (1 - decay) * weights
        torch.testing.assert_close(ema.shadow["weight"][0], expected)


def test_warmup_forgets_the_initialization_that_a_fixed_decay_keeps():
    model = nn.Linear(4, 4, bias=False)
    init = model.weight.detach().clone()
    warm, fixed = EMA(model, 0.995, warmup=True), EMA(model, 0.995, warmup=False)
    with torch.no_grad():
        model.weight.add_(1.0)  # the trained weights: init + 1 everywhere
    for step in range(1, 301):
        warm.update(model, step)
        fixed.update(model, step)
    # Share of the initialization left in the average: 0.995**300 = 22 % without the warm-up.
    left_fixed = 1 - (fixed.shadow["weight"] - init).mean().item()
    left_warm = 1 - (warm.shadow["weight"] - init).mean().item()
    assert left_fixed == pytest.approx(0.995**300, rel=1e-3)
    assert left_warm < 1e-6
    assert warm.decay_at(1) == pytest.approx(2 / 11) and warm.decay_at(10**6) == 0.995
