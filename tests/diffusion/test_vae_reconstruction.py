"""The KL autoencoder reaches a stated reconstruction error on held-out bundled shapes.

Train the "vae" recipe for CPU seconds (fast) or minutes (slow), load the checkpoint (EMA off:
vae-tiny trains without it) and reconstruct 256 held-out shapes (a seed the training data does
not use) from the posterior mean. MSE is per pixel on images in [-1, 1]. Baselines on the same
images: the untrained model, and the training set's mean image (which is also as good as each
image's own mean colour here, ~0.11).

Measured (shared 2-core CPU, one thread; deterministic given the seeds and thread count):
  fast, 16 px, 16 channels, levels (1, 2) -> 8x8x4 latents, 300 steps of 32 (~20 s):
      MSE 0.0123 (PSNR 25.1 dB; 0.0122 with two threads) vs mean image 0.112 and untrained 0.52
  slow, vae-tiny.yaml as shipped: 32 px -> 8x8x4 latents, 600 steps (~7 min):
      MSE 0.0044 (PSNR 29.6 dB; 0.0045 with two threads) vs mean image 0.123 and untrained 0.67
Bounds: about twice the measured MSE, and well below both baselines.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
VAE = str(ROOT / "scaletrain/recipes/diffusion/configs/vae-tiny.yaml")
HELD_OUT_SEED = 12345  # training uses data.shapes_seed 0 (and the eval's held-out 1)


def _train(tmp_path: Path, steps: int, *overrides: str) -> Path:
    # One thread: on a shared, oversubscribed 2-core machine two OpenMP threads ran 6x slower, not faster.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "scaletrain.train", VAE, *overrides, "--train.steps", str(steps),
           "--checkpoint.interval", str(steps), "--eval.interval", "0", "--metrics.tensorboard", "false",
           "--job.run_dir", str(tmp_path), "--job.name", "vae"]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return tmp_path / "vae" / "checkpoints" / f"step-{steps:08d}"


def _reconstruction_mse(ckpt: Path, n: int = 256) -> dict[str, float]:
    from scaletrain.checkpoint.loading import load_job_config, load_model
    from scaletrain.distributed import destroy_distributed, init_distributed
    from scaletrain.images.datasets import ShapesDataset
    from scaletrain.parallel import init_model
    from scaletrain.registry import get_recipe

    cfg = load_job_config(ckpt, "vae", None, [])  # the config the trainer stored
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        init_distributed()
        try:
            trained = load_model(ckpt, "vae", cfg)
            with torch.device("meta"):
                untrained = get_recipe("vae").model.build(cfg.model)
            init_model(untrained, torch.device("cpu"), cfg.job.seed)  # the weights training started from
        finally:
            destroy_distributed()
        m = cfg.model
        held_out = ShapesDataset(n, m.image_size, 6, seed=HELD_OUT_SEED)
        x = torch.stack([held_out[i]["image"] for i in range(n)])
        train = ShapesDataset(2048, m.image_size, 6, seed=cfg.data.shapes_seed)
        mean_image = torch.stack([train[i]["image"] for i in range(len(train))]).mean(dim=0)
        side = m.image_size // m.downsample
        zero_noise = torch.zeros(n, m.latent_channels, side, side)  # decode the posterior mean
        out = {"mean_image": (mean_image - x).square().mean().item()}
        with torch.no_grad():
            for name, model in (("trained", trained), ("untrained", untrained.eval())):
                recon, _ = model(x, zero_noise)
                out[name] = (recon.clamp(-1, 1) - x).square().mean().item()
    finally:
        torch.set_num_threads(threads)
    print(f"held-out reconstruction MSE: {out}")
    return out


def test_vae_reconstructs_held_out_shapes_after_seconds_of_training(tmp_path):
    small = ["--model.image_size", "16", "--model.channels", "16", "--model.channel_mult", "1,2",
             "--model.groups", "4", "--train.warmup_steps", "10", "--train.lr", "2e-3"]  # fmt: skip
    mse = _reconstruction_mse(_train(tmp_path, 300, *small))
    assert mse["trained"] < 0.025, mse
    assert mse["trained"] < 0.25 * mse["mean_image"], mse
    assert mse["trained"] < 0.05 * mse["untrained"], mse


@pytest.mark.slow
@pytest.mark.timeout(2400)  # ~7 min on the shared CPU; more when it is heavily loaded
def test_vae_tiny_as_shipped_reaches_its_stated_reconstruction_error(tmp_path):
    mse = _reconstruction_mse(_train(tmp_path, 600))
    assert mse["trained"] < 0.01, mse
    assert mse["trained"] < 0.1 * mse["mean_image"], mse
    assert mse["trained"] < 0.02 * mse["untrained"], mse
