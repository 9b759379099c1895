"""Learning checks for the GAN, flow and autoencoder families on the bundled shapes (CPU, one process).

The bounds sit between what a working model reaches and what a broken or untrained one does; the
observed numbers (2 CPU cores, torch 2.13) are in each test. GAN and autoencoder runs take minutes:
`-m slow`. The flows learn in seconds and run in the default suite.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from st_common import REPO

CONFIGS = REPO / "scaletrain" / "recipes"
QUIET = ["--checkpoint.enable", "false", "--metrics.tensorboard", "false", "--train.log_interval", "50"]


def train(config: str, tmp_path, name: str, *overrides: str) -> list[dict]:
    cmd = [sys.executable, "-m", "scaletrain.train", str(CONFIGS / config), *QUIET, *overrides,
           "--job.run_dir", str(tmp_path), "--job.name", name]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True, timeout=1200)
    return [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]


def last(rows: list[dict], key: str) -> float:
    return [r[key] for r in rows if key in r][-1]


@pytest.mark.parametrize("kind", ["glow", "realnvp"])
def test_flows_beat_the_uniform_baseline(kind, tmp_path):
    """400 steps of the glow-tiny config (5-bit 16x16 shapes; uniform = 5 bits/dim). Observed held-out:
    Glow 2.36, RealNVP 2.03 bits/dim. A flow that does not learn stays near 4.2 (its start)."""
    rows = train("flow/configs/glow-tiny.yaml", tmp_path, kind, "--model.kind", kind, "--eval.interval", "400")
    bits = last(rows, "eval/bits_per_dim_heldout")
    assert bits < 3.0 < last(rows, "eval/bits_per_dim_uniform"), bits


@pytest.mark.slow
def test_conditional_gan_learns_shapes_and_classes(tmp_path):
    """sngan-cond-tiny (hinge, spectral norm, class-conditional group norms, projection discriminator, TTUR,
    EMA), 1500 steps. Over the 200 in-loop samples: FID (shapes features) untrained 126, trained 5.6;
    samples classified as the requested class 58 % (chance 1/6); within-class diversity 1.44. With the class
    added to z instead of in the norms, the generator drew one image per class: diversity 0.22, FID 45."""
    untrained = train("gan/configs/sngan-cond-tiny.yaml", tmp_path, "untrained", "--train.steps", "1")
    trained = train("gan/configs/sngan-cond-tiny.yaml", tmp_path, "trained", "--eval.interval", "1500")
    fid_before, fid_after = last(untrained, "eval/fid_shapes"), last(trained, "eval/fid_shapes")
    assert fid_after < 0.2 * fid_before, (fid_before, fid_after)
    assert last(trained, "eval/class_accuracy_shapes") > 1 / 6 + 0.2
    assert last(trained, "eval/diversity_shapes") > 0.6  # no per-class mode collapse


@pytest.mark.slow
def test_vqvae_reconstructs_and_uses_its_codebook(tmp_path):
    """vqvae-tiny, 400 steps (~75 s): held-out MSE 0.0080 and codebook perplexity 22.5 of 64 codes. Without
    dead-code restarts (model.dead_code_threshold 0): MSE 0.0165, perplexity 6.9."""
    rows = train("autoencoder/configs/vqvae-tiny.yaml", tmp_path, "vq", "--eval.interval", "400")
    assert last(rows, "eval/recon_mse") < 0.012
    assert last(rows, "codebook_perplexity") > 12


@pytest.mark.slow
def test_free_bits_prevent_the_collapse_of_a_strong_beta(tmp_path):
    """beta-VAE, beta 16, sigma 0.5, 4 latent channels (256 latent dims), 300 steps each. Plain: KL 0.024
    nats per dim, half the dims inactive (KL < 0.01), held-out MSE 0.085. With 0.5 free bits: KL 0.41, all
    dims active, MSE 0.014."""
    common = ["--model.kind", "beta-vae", "--model.beta", "16", "--model.recon_std", "0.5",
              "--model.latent_channels", "4", "--train.steps", "300", "--eval.interval", "300"]  # fmt: skip
    plain = train("autoencoder/configs/vqvae-tiny.yaml", tmp_path, "plain", *common)
    free = train("autoencoder/configs/vqvae-tiny.yaml", tmp_path, "free", *common, "--model.free_bits", "0.5")
    assert last(plain, "active_dims") < 0.75 and last(plain, "kl_per_dim") < 0.1
    assert last(free, "active_dims") == 1.0 and last(free, "kl_per_dim") > 0.3
    assert last(free, "eval/recon_mse") < 0.5 * last(plain, "eval/recon_mse")
