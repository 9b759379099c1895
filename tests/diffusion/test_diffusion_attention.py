"""model.attention in the diffusion recipes: every implementation of scaletrain.ops gives the
eager reference's outputs and gradients (DiT and U-Net, fp32), `auto` resolves once at
parallelize time, and a head dim the Triton kernel cannot take is refused before launch.

Tolerance: 1e-5 absolute on outputs and gradients (fp32; only the summation order differs —
measured ~1e-7). Triton runs interpreted on CPU (tests/conftest.py sets TRITON_INTERPRET=1).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from scaletrain.config import load_config
from scaletrain.parallel import init_model
from scaletrain.recipes.diffusion.config import DiTConfig, UNetConfig
from scaletrain.recipes.diffusion.dit import DiT
from scaletrain.recipes.diffusion.parallelize import resolve_attention, startup_notes
from scaletrain.recipes.diffusion.unet import UNet
from scaletrain.validate import validate_config

ATOL = 1e-5
DIT = DiTConfig(image_size=8, patch_size=2, dim=64, depth=1, n_heads=2, num_classes=3)
UNET = UNetConfig(image_size=8, channels=32, channel_mult=[1], blocks_per_level=1, attention_levels=[0], groups=8)
MODELS = {"dit": (DiT, DIT), "unet": (UNet, UNET)}
CONFIGS = Path(__file__).resolve().parents[2] / "scaletrain" / "recipes" / "diffusion" / "configs"


def _outputs_and_grads(name: str, impl: str, backward: bool = True) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    cls, cfg = MODELS[name]
    model = init_model(cls(dataclasses.replace(cfg, attention=impl)), "cpu", seed=0)
    with torch.no_grad():  # adaLN-Zero / zero-init outputs would hide the attention branch
        generator = torch.Generator().manual_seed(1)
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.05)
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, cfg.image_size, cfg.image_size, generator=generator)
    t = torch.tensor([10.0, 500.0])
    y = torch.tensor([0, 2])
    if not backward:
        with torch.no_grad():
            return model(x, t, y), {}
    out = model(x, t, y)
    (out * torch.randn(out.shape, generator=generator)).sum().backward()
    return out.detach(), {n: p.grad for n, p in model.named_parameters() if "attention" in n or "qkv" in n}


@pytest.mark.parametrize("impl", ["sdpa", "triton"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_attention_impls_match_eager(name, impl):
    ref_out, ref_grads = _outputs_and_grads(name, "eager")
    out, grads = _outputs_and_grads(name, impl)
    assert ref_grads and all(g.abs().sum() > 0 for g in ref_grads.values())  # the branch is live
    torch.testing.assert_close(out, ref_out, atol=ATOL, rtol=0)
    for key in ref_grads:
        torch.testing.assert_close(grads[key], ref_grads[key], atol=ATOL, rtol=0, msg=key)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_flex_forward_matches_eager(name):
    # Forward only: FlexAttention has no CPU backward (scaletrain.ops refuses to train with it there).
    ref_out, _ = _outputs_and_grads(name, "eager", backward=False)
    out, _ = _outputs_and_grads(name, "flex", backward=False)
    torch.testing.assert_close(out, ref_out, atol=ATOL, rtol=0)


def test_auto_resolves_once_and_is_reported():
    cfg = load_config(str(CONFIGS / "dit-tiny.yaml"), [])
    with torch.device("meta"):
        model = DiT(cfg.model)
    resolve_attention(model, cfg, tokens=64)
    assert startup_notes(model, cfg, validate_config(cfg, 1)) == [
        "kernels: attention auto -> sdpa (cpu: Triton kernels only run interpreted off CUDA)"
    ]
    impls = {block.attention.attention_fn.keywords["impl"] for block in model.blocks.values()}
    assert impls == {"sdpa"}


@pytest.mark.parametrize(
    ("config", "overrides", "message"),
    [
        ("dit-tiny.yaml", ["--model.dim", "96", "--model.n_heads", "4"], r"heads?.* 24"),
        ("unet-tiny.yaml", ["--model.channels", "48", "--model.groups", "8"], r"heads of 48"),
    ],
    ids=["dit", "unet"],
)
def test_triton_with_an_unsupported_head_dim_is_refused(config, overrides, message):
    cfg = load_config(str(CONFIGS / config), [*overrides, "--model.attention", "triton"])
    with pytest.raises(ValueError, match=r"model\.attention: triton needs a head dim .*" + message):
        validate_config(cfg, 1)
