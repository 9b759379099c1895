"""Config validation for the kernel switches: each bad combination fails before any process group exists,
with a message naming the field. One test per case."""

from __future__ import annotations

import pytest
import torch.distributed as dist
from st_common import TINY

from scaletrain.config import ConfigError, load_config
from scaletrain.validate import validate_config


@pytest.fixture(autouse=True)
def _no_process_group():
    yield
    assert not dist.is_initialized(), "validation must not create a process group"


def _validate(world_size: int, *overrides: str) -> None:
    validate_config(load_config(TINY, list(overrides)), world_size)


def test_every_switch_on_is_valid():
    _validate(
        1, "--model.attention", "triton", "--model.fused_norm", "true", "--model.fused_rope", "true",
        "--model.fused_swiglu", "true", "--train.fused_cross_entropy", "true",
    )  # fmt: skip


def test_defaults_are_unfused():
    cfg = load_config(TINY, [])
    assert cfg.model.attention == "auto"  # sdpa on a CPU, see test_attention_auto.py
    assert not (cfg.model.fused_norm or cfg.model.fused_rope or cfg.model.fused_swiglu)
    assert not cfg.train.fused_cross_entropy


def test_unknown_attention_is_rejected():
    with pytest.raises(
        ConfigError,
        match="model.attention: 'fastest' is not allowed; choose one of 'auto', 'sdpa', 'eager', 'flex', 'triton'",
    ):
        _validate(1, "--model.attention", "fastest")


def test_fused_cross_entropy_is_valid_under_tensor_parallel():
    # The head is vocabulary-sharded there; the kernel runs per shard (test_vocab_parallel_ce.py).
    _validate(2, "--train.fused_cross_entropy", "true", "--parallel.tp", "2")


def test_fused_cross_entropy_is_valid_under_pipeline_parallel():
    # The last stage computes the loss in its forward (test_gpt_fused.py runs it).
    _validate(2, "--train.fused_cross_entropy", "true", "--parallel.pp", "2")


def test_fused_norm_accepts_layernorm():
    # GPT-2 style: LayerNorm with biases runs the fused LayerNorm kernel (scaletrain/kernels/layer_norm.py).
    _validate(1, "--model.fused_norm", "true", "--model.norm", "layernorm", "--model.bias", "true")


def test_fused_rope_needs_rope():
    with pytest.raises(ValueError, match="model.fused_rope: needs model.pos=rope, not learned"):
        _validate(1, "--model.fused_rope", "true", "--model.pos", "learned")


def test_fused_swiglu_needs_swiglu():
    with pytest.raises(ValueError, match="model.fused_swiglu: needs model.mlp=swiglu, not gelu"):
        _validate(1, "--model.fused_swiglu", "true", "--model.mlp", "gelu")


def test_auto_attention_accepts_any_head_dim():
    _validate(1, "--model.attention", "auto", "--model.dim", "96")  # head dim 24: auto picks sdpa


def test_triton_attention_needs_a_power_of_two_head_dim():
    # dim 96 / 4 heads = head dim 24
    with pytest.raises(ValueError, match=r"model.attention: 'triton' needs a head dim .* = 24\) that is a power"):
        _validate(1, "--model.attention", "triton", "--model.dim", "96")


def test_fused_cross_entropy_under_pp_needs_the_recipes_target_keyword(monkeypatch):  # noqa: ANN001
    # A family that fuses its loss but names no forward keyword for the targets could not compute the loss
    # on its last stage: refused before any process starts.
    import dataclasses

    from scaletrain import registry

    gpt = registry.get_recipe("gpt")
    pipeline = dataclasses.replace(gpt.supports.pipeline, target_kwarg=None)
    no_keyword = dataclasses.replace(gpt, supports=dataclasses.replace(gpt.supports, pipeline=pipeline))
    monkeypatch.setitem(registry._RECIPES, "gpt", no_keyword)
    with pytest.raises(ValueError, match=r"train.fused_cross_entropy: recipe 'gpt' names no forward keyword"):
        _validate(2, "--train.fused_cross_entropy", "true", "--parallel.pp", "2")
