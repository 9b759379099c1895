"""LR schedules (pure functions of the step) and the optimizer's parameter groups."""

from __future__ import annotations

import math

import pytest

from scaletrain.config import load_config
from scaletrain.config.schema import TrainSection
from scaletrain.optim import build_optimizer, lr_multiplier
from scaletrain.recipes.gpt.model import GPT


def _train(**kw) -> TrainSection:
    return TrainSection(**{"steps": 100, "warmup_steps": 10, "min_lr_ratio": 0.1, **kw})


def test_warmup_is_linear_to_peak():
    t = _train()
    assert [lr_multiplier(s, t) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])


def test_cosine_decays_to_floor():
    t = _train(schedule="cosine")
    assert lr_multiplier(10, t) == pytest.approx(1.0)
    assert lr_multiplier(55, t) == pytest.approx(0.1 + 0.9 * 0.5)  # halfway: cos term = 0
    assert lr_multiplier(100, t) == pytest.approx(0.1)


def test_wsd_is_flat_then_decays_linearly():
    t = _train(schedule="wsd", wsd_decay_fraction=0.2)
    assert lr_multiplier(50, t) == 1.0 and lr_multiplier(79, t) == 1.0
    assert lr_multiplier(90, t) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_multiplier(100, t) == pytest.approx(0.1)


def test_linear_and_constant():
    assert lr_multiplier(55, _train(schedule="linear")) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_multiplier(99, _train(schedule="constant")) == 1.0


def test_norms_and_biases_are_not_decayed():
    """What train.weight_decay's help says, by name: every matrix decays (the position table included), norm
    gains and biases do not."""
    gpt2 = ["--model.norm", "layernorm", "--model.pos", "learned", "--model.mlp", "gelu", "--model.bias", "true"]
    cfg = load_config("scaletrain/recipes/gpt/configs/tiny.yaml", gpt2)
    model = GPT(cfg.model)
    optimizer = build_optimizer(model, cfg.train, "cpu")
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == cfg.train.weight_decay and no_decay["weight_decay"] == 0.0
    names = {id(p): name for name, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    kept = {names[id(p)] for p in no_decay["params"]}
    matrices = {"tok_embeddings.weight", "pos_embeddings.weight", "output.weight", "layers.0.attention.wq.weight"}
    assert matrices <= decayed
    assert all(name.endswith(".bias") or "norm" in name for name in kept) and "layers.0.attention_norm.weight" in kept
    assert not any(name.endswith(".bias") or "norm" in name for name in decayed)
    assert math.isclose(
        sum(p.numel() for g in optimizer.param_groups for p in g["params"]), sum(p.numel() for p in model.parameters())
    )
