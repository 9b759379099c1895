"""DiT / U-Net: meta-device init covers every tensor and equals a plain CPU init; shapes; adaLN-Zero."""

from __future__ import annotations

import itertools

import pytest
import torch

from scaletrain.parallel import init_model
from scaletrain.recipes.diffusion.config import DiTConfig, UNetConfig
from scaletrain.recipes.diffusion.dit import DiT
from scaletrain.recipes.diffusion.unet import UNet

DIT = DiTConfig(image_size=16, patch_size=4, dim=64, depth=2, n_heads=4, num_classes=3)
UNET = UNetConfig(
    image_size=16, channels=32, channel_mult=[1, 2], blocks_per_level=1, attention_levels=[1], groups=8, num_classes=3
)
BUILDERS = {"dit": (DiT, DIT), "unet": (UNet, UNET)}


def _tensors(model):
    return dict(itertools.chain(model.named_parameters(), model.named_buffers()))


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_meta_init_covers_every_tensor_and_equals_cpu_init(name):
    cls, cfg = BUILDERS[name]
    with torch.device("meta"):
        meta = cls(cfg)
    meta.to_empty(device="cpu")
    for t in _tensors(meta).values():
        t.data.fill_(float("nan"))  # anything init_tensor skips stays NaN
    init_model(meta, "cpu", seed=3)
    cpu = init_model(cls(cfg), "cpu", seed=3)
    a, b = _tensors(meta), _tensors(cpu)
    assert a.keys() == b.keys() and len(a) > 10
    for key in a:
        assert torch.isfinite(a[key]).all(), key
        assert torch.equal(a[key], b[key]), key
    other = init_model(cls(cfg), "cpu", seed=4)
    assert any(not torch.equal(a[k], v) for k, v in _tensors(other).items())  # the seed matters


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_forward_shape_and_zero_initial_output(name):
    cls, cfg = BUILDERS[name]
    model = init_model(cls(cfg), "cpu", seed=0)
    x = torch.randn(2, 3, 16, 16)
    out = model(x, torch.tensor([10.0, 900.0]), torch.tensor([0, 3]))
    assert out.shape == x.shape
    # adaLN-Zero / zero-initialised output convolutions: the untrained model predicts exactly 0,
    # and the first gradient step still reaches the output layer.
    assert torch.count_nonzero(out) == 0
    out.square().add(out).sum().backward()  # loss whose gradient is nonzero at out == 0
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert any(g is not None and g.abs().sum() > 0 for g in grads.values())


def test_dit_patchify_roundtrip():
    model = init_model(DiT(DIT), "cpu", seed=0)
    x = torch.randn(2, 3, 16, 16)
    tokens = model.patchify(x)
    assert tokens.shape == (2, 16, 48)
    # Token 1 is the patch at row 0, column 1 (pixels 0..3, 4..7), in (row, col, channel) order.
    assert torch.equal(tokens[0, 1], x[0, :, 0:4, 4:8].permute(1, 2, 0).reshape(-1))
    assert torch.equal(model.unpatchify(tokens), x)


def test_class_label_changes_the_output_once_trained_weights_are_nonzero():
    model = init_model(DiT(DIT), "cpu", seed=0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("adaln.weight") or n.startswith("final.linear"):
                p.normal_(std=0.05)
    x, t = torch.randn(1, 3, 16, 16), torch.tensor([100.0])
    assert not torch.allclose(model(x, t, torch.tensor([0])), model(x, t, torch.tensor([1])))


# Peebles & Xie, Table 4: parameters and forward GFLOPs (multiply-accumulates) at 256 px, patch 2.
DIT_SIZES = {"s": (33e6, 6.06e9), "b": (130e6, 23.01e9), "l": (458e6, 80.71e9), "xl": (675e6, 118.64e9)}


@pytest.mark.parametrize("size", sorted(DIT_SIZES))
def test_dit_configs_match_the_paper_on_the_meta_device(size):
    """`scaletrain config show` of scaletrain/recipes/diffusion/configs/dit-<size>-2.yaml: parameters and
    FLOPs as published (DiT-XL/2: 675M, 118.6 GMACs per forward)."""
    from pathlib import Path

    from scaletrain.cli import model_summary
    from scaletrain.config import load_config

    config = Path(__file__).resolve().parents[2] / f"scaletrain/recipes/diffusion/configs/dit-{size}-2.yaml"
    summary = model_summary(load_config(config))
    params, macs = DIT_SIZES[size]
    assert summary["parameters"] == pytest.approx(params, rel=0.01)
    # Training = forward + backward = 3 x forward; a MAC is 2 FLOPs.
    assert summary["train_flops_per_sample"] == pytest.approx(3 * 2 * macs, rel=0.02)
