"""model.fused_norm with GroupNorm: the diffusion U-Net and the KL-VAE train the same with the fused
scaletrain/kernels/group_norm.py kernels (GroupNorm + SiLU in the residual blocks and before the output convolutions,
plain
GroupNorm in the U-Net's attention blocks) as without them.

Both models are built from the recipes' configs (scaletrain/recipes/diffusion/configs/unet-tiny.yaml and vae-tiny.yaml,
shrunk: 8x8 images, channels 16 / 8 in two levels, 4 groups; the U-Net with an attention block at its second
level), initialized by name (so fused and unfused start from the same weights), and trained 3 AdamW steps in this
process on one fixed batch, fp32; the U-Net's parameters are perturbed first, since its zero-initialized output
convolutions would otherwise leave every norm without a gradient at step 0. Tolerances, per step: loss 1e-5
relative, and at step 0 every parameter gradient atol 1e-5 / rtol 1e-4 (the kernels do the same fp32 math in
another order). Observed (printed with -s): loss 1.2e-6 relative (U-Net; step 0 bit-equal, then AdamW's
normalized first steps carry the fp32 rounding differences), 0 (VAE: bit-equal over the 3 steps). The fused runs must
dispatch the ``scaletrain_kernels`` group_norm ops and the unfused ones must not, so a flag that stops reaching its
kernel fails instead of comparing torch with itself. On CPU the kernels run in the Triton interpreter.

With -m slow: the same through the trainer (torchrun, scaletrain.parity's harness; loss 1e-5, grad norm 1e-4
relative), one process, for both recipes.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from ki_common import KernelOps

from scaletrain import ops
from scaletrain.config import load_config
from scaletrain.parallel import init_model
from scaletrain.parity import compare, run_layout
from scaletrain.recipes.diffusion.unet import GroupNorm, UNet
from scaletrain.recipes.diffusion.vae import KLAutoencoder, vae_loss
from scaletrain.registry import get_recipe
from scaletrain.validate import validate_config

CONFIGS = Path(__file__).resolve().parents[2] / "scaletrain" / "recipes" / "diffusion" / "configs"
UNET_TINY, VAE_TINY = str(CONFIGS / "unet-tiny.yaml"), str(CONFIGS / "vae-tiny.yaml")
SMALL = ["--model.image_size", "8", "--model.channel_mult", "1,2", "--model.groups", "4"]
UNET_SMALL = SMALL + ["--model.channels", "16", "--model.attention_levels", "1"]
VAE_SMALL = SMALL + ["--model.channels", "8"]
FUSED = ["--model.fused_norm", "true"]
LOSS_RTOL = 1e-5
GN_OPS = {"group_norm_fwd", "group_norm_bwd"}
STEPS = 3


@pytest.fixture(autouse=True)
def _triton_runs() -> None:
    if ops.fused_backend(torch.empty(0)) == "torch-fallback":
        pytest.skip("the Triton path cannot run here (no triton, or kernels imported before TRITON_INTERPRET=1)")


def _unet(fused: bool) -> UNet:
    cfg = load_config(UNET_TINY, UNET_SMALL + (FUSED if fused else []))
    model = init_model(UNet(cfg.model), "cpu", seed=0)
    with torch.no_grad():  # zero-initialized output convolutions: give every branch a gradient from step 0
        generator = torch.Generator().manual_seed(1)
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.05)
    return model


def _vae(fused: bool) -> KLAutoencoder:
    cfg = load_config(VAE_TINY, VAE_SMALL + (FUSED if fused else []))
    return init_model(KLAutoencoder(cfg.model), "cpu", seed=0)


def _unet_loss(model: UNet, batch: dict) -> torch.Tensor:
    return F.mse_loss(model(batch["x_t"], batch["t"], batch["y"]), batch["target"])


def _vae_loss(model: KLAutoencoder, batch: dict) -> torch.Tensor:
    return vae_loss(model(batch["image"], batch["noise"]), batch)


def _batch(kind: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    if kind == "vae":  # 8x8 images -> 4x4x4 latents
        return {"image": torch.rand(4, 3, 8, 8, generator=g) * 2 - 1, "noise": torch.randn(4, 4, 4, 4, generator=g)}
    return {"x_t": torch.randn(4, 3, 8, 8, generator=g), "t": torch.randint(0, 1000, (4,), generator=g).float(),
            "y": torch.randint(0, 6, (4,), generator=g), "target": torch.randn(4, 3, 8, 8, generator=g)}  # fmt: skip


def _train(model: torch.nn.Module, batch: dict, step_loss) -> tuple[list[float], dict, set[str]]:  # noqa: ANN001
    """STEPS AdamW steps on one batch; returns the losses, the step-0 gradients and the kernel ops dispatched."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    losses, first_grads = [], {}
    with KernelOps() as seen:
        for _ in range(STEPS):
            optimizer.zero_grad()
            loss = step_loss(model, batch)
            loss.backward()
            if not first_grads:
                first_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
            optimizer.step()
            losses.append(loss.item())
    return losses, first_grads, seen.names


def _check(name: str, plain: tuple, fused: tuple) -> None:
    (loss_a, grads_a, ops_a), (loss_b, grads_b, ops_b) = plain, fused
    assert GN_OPS <= ops_b, f"{name}: the fused model did not run the GroupNorm kernels ({ops_b})"
    assert not ops_a & GN_OPS, f"{name}: the unfused model ran the kernels ({ops_a})"
    rel = max(abs(a - b) / abs(a) for a, b in zip(loss_a, loss_b, strict=True))
    print(f"{name}: losses {loss_a} vs {loss_b}; max relative difference {rel:.2e}")
    assert rel <= LOSS_RTOL, (loss_a, loss_b)
    assert loss_b[-1] < loss_b[0], f"{name}: the fused model did not learn: {loss_b}"
    assert grads_a.keys() == grads_b.keys()
    norm_grads = [k for k in grads_a if "norm" in k]
    assert norm_grads and all(grads_a[k].abs().sum() > 0 for k in norm_grads), "every norm must get a gradient"
    for key, grad in grads_a.items():
        torch.testing.assert_close(grads_b[key], grad, atol=1e-5, rtol=1e-4, msg=lambda m, k=key: f"{k}: {m}")


def test_unet_trains_the_same_fused():
    plain, fused = _unet(False), _unet(True)
    norms = [m for m in fused.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert len(norms) == 21 and all(isinstance(m, GroupNorm) and m.fused for m in norms)
    assert sum(not m.silu for m in norms) == 4  # the attention blocks' norms: no SiLU before q/k/v
    batch = _batch("unet")
    _check("unet", _train(plain, batch, _unet_loss), _train(fused, batch, _unet_loss))


def test_vae_trains_the_same_fused():
    plain, fused = _vae(False), _vae(True)
    norms = [m for m in fused.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert len(norms) == 14 and all(isinstance(m, GroupNorm) and m.fused and m.silu for m in norms)
    batch = _batch("vae")
    _check("vae", _train(plain, batch, _vae_loss), _train(fused, batch, _vae_loss))


@pytest.mark.parametrize("silu", [False, True])
def test_group_norm_module_keeps_nn_group_norm_state_and_math(silu):  # noqa: ANN001
    """Same state as nn.GroupNorm (checkpoints and init_tensor unchanged); unfused it is nn.GroupNorm (+ F.silu)
    bit for bit, fused within 1e-5; the fused and unfused models have the same state_dict keys."""
    ours, theirs = GroupNorm(4, 12, silu=silu, fused=False), torch.nn.GroupNorm(4, 12)
    assert ours.state_dict().keys() == theirs.state_dict().keys() == {"weight", "bias"}
    assert (ours.num_groups, ours.num_channels, ours.eps) == (theirs.num_groups, theirs.num_channels, theirs.eps)
    with torch.no_grad():
        for p in ours.parameters():
            p.uniform_(0.5, 1.5)
    theirs.load_state_dict(ours.state_dict())
    fused = GroupNorm(4, 12, silu=silu, fused=True)
    fused.load_state_dict(ours.state_dict())
    x = torch.randn(3, 12, 5, 6)
    want = F.silu(theirs(x)) if silu else theirs(x)
    assert torch.equal(ours(x), want)
    torch.testing.assert_close(fused(x), want, atol=1e-5, rtol=1e-5)
    for build in (_unet, _vae):
        assert build(False).state_dict().keys() == build(True).state_dict().keys()


def test_unet_and_vae_accept_fused_norm():
    """The U-Net no longer refuses model.fused_norm, and the VAE's config has the field (off by default)."""
    for config in (UNET_TINY, VAE_TINY):
        assert load_config(config, []).model.fused_norm is False
        cfg = load_config(config, FUSED)
        assert cfg.model.fused_norm is True
        validate_config(cfg, 1)


@pytest.mark.parametrize("recipe", ["unet", "vae"])
def test_startup_line_reports_the_fused_norm(recipe):  # noqa: ANN001
    """`fused: norm (<backend>)` on the start-up kernels line: after the attention choice for the U-Net, alone for
    the VAE (which has no attention, and no line at all unfused)."""
    config = UNET_TINY if recipe == "unet" else VAE_TINY
    attention = "attention auto -> sdpa (cpu: Triton kernels only run interpreted off CUDA)"
    for fused in (False, True):
        cfg = load_config(config, FUSED if fused else [])
        dims = validate_config(cfg, 1)
        with torch.device("meta"):
            model = get_recipe(recipe).model.build(cfg.model)
        model = get_recipe(recipe).model.parallelize(model, dims, cfg)
        parts = ([attention] if recipe == "unet" else []) + (["fused: norm (triton-interpret)"] if fused else [])
        notes = get_recipe(recipe).model.startup_notes(model, cfg, dims)
        kernel_lines = [n for n in notes if n.startswith("kernels: ")]  # the U-Net also names its eval features
        assert kernel_lines == ([f"kernels: {' | '.join(parts)}"] if parts else []), notes


# -- through the trainer (torchrun) ---------------------------------------------------------------------------

TRAIN = ["--train.steps", "4", "--train.warmup_steps", "1", "--train.global_batch_size", "8", "--train.ema_decay",
         "0", "--eval.interval", "0", "--metrics.console", "false"]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["unet", "vae"])
def test_trainer_fused_norm(recipe, tmp_path):  # noqa: ANN001
    config, small = (UNET_TINY, UNET_SMALL) if recipe == "unet" else (VAE_TINY, VAE_SMALL)
    base = run_layout(config, small + TRAIN, tmp_path, "unfused", nproc=1)
    report = compare(base, run_layout(config, small + TRAIN + FUSED, tmp_path, "fused", nproc=1))
    print(report.table())
    assert len(report.steps) == 4
    assert report.max_loss_rel_diff <= LOSS_RTOL, report.table()
    assert report.max_grad_norm_rel_diff <= 1e-4, report.table()
