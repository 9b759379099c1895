"""Latent diffusion end to end: VAE -> latent cache (2 ranks) -> latent DiT -> decode -> PNG; VAE errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from scaletrain.config import load_config
from scaletrain.validate import validate_config

ROOT = Path(__file__).resolve().parents[2]
VAE = str(ROOT / "scaletrain/recipes/diffusion/configs/vae-tiny.yaml")
LDIT = str(ROOT / "scaletrain/recipes/diffusion/configs/latent-dit-tiny.yaml")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
# 16 px images -> 8 x 8 x 4 latents.
SMALL_VAE = ["--model.image_size", "16", "--model.channels", "16", "--model.channel_mult", "1,2", "--model.groups", "4"]


def _run(cmd: list[str], timeout: int = 600) -> str:
    done = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done.stdout


def test_vae_image_size_must_divide_by_its_downsampling():
    with pytest.raises(ValueError, match=r"model.image_size: 30 is not divisible by 4, the VAE's downsampling"):
        validate_config(load_config(VAE, ["--model.image_size", "30"]), 1)


def test_latent_dit_needs_a_cache_that_matches(tmp_path):
    with pytest.raises(ValueError, match=r"is not a latent cache"):
        validate_config(load_config(LDIT, ["--data.path", str(tmp_path)]), 1)
    with pytest.raises(ValueError, match=r"model.clip_x0"):
        validate_config(load_config(LDIT, ["--data.path", str(tmp_path), "--model.clip_x0", "true"]), 1)


@pytest.mark.slow
def test_vae_to_cache_to_latent_dit_to_png(tmp_path):
    py = sys.executable
    _run([py, "-m", "scaletrain.train", VAE, *SMALL_VAE, "--train.steps", "20", "--train.warmup_steps", "2",
          "--train.global_batch_size", "8", "--eval.interval", "20", "--eval.num_samples", "4",
          "--job.run_dir", str(tmp_path), "--job.name", "vae"])  # fmt: skip
    rows = [json.loads(x) for x in (tmp_path / "vae" / "metrics.jsonl").read_text().splitlines()]
    assert any("eval/recon_l1" in r for r in rows)
    vae_ckpt = tmp_path / "vae" / "checkpoints" / "step-00000020"
    cache = tmp_path / "latents"
    # Two ranks encode two halves of 40 images.
    _run([py, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
          "-m", "scaletrain.recipes.diffusion.latents",
          str(vae_ckpt), "--config", VAE, *SMALL_VAE, "--data.num_samples", "40", "--out", str(cache)])  # fmt: skip
    index = json.loads((cache / "index.json").read_text())
    assert [s["count"] for s in index["shards"]] == [20, 20] and index["latent_shape"] == [4, 8, 8]

    from scaletrain.recipes.diffusion.latents import LatentDataset

    ds = LatentDataset(cache, seed=0)
    assert len(ds) == 40 and ds[25]["latent"].shape == (4, 8, 8)
    assert torch.equal(ds[25]["latent"], LatentDataset(cache, seed=0)[25]["latent"])
    assert [int(ds[i]["label"]) for i in range(6)] == list(range(6))
    assert abs(float(torch.stack([ds[i]["latent"] for i in range(40)]).std()) - 1.0) < 0.3  # scale factor

    small_dit = ["--data.path", str(cache), "--model.dim", "32", "--model.depth", "1", "--model.n_heads", "2"]
    _run([py, "-m", "scaletrain.train", LDIT, *small_dit, "--train.steps", "4", "--train.warmup_steps", "1",
          "--train.global_batch_size", "8", "--eval.interval", "4", "--eval.num_samples", "6", "--model.eval_steps",
          "2", "--job.run_dir", str(tmp_path), "--job.name", "ldit"])  # fmt: skip
    out = tmp_path / "grid.png"
    ckpt = tmp_path / "ldit" / "checkpoints" / "step-00000004"
    stdout = _run([py, "-m", "scaletrain.cli", "sample", str(ckpt), "--config", LDIT, *small_dit, "--steps", "3",
                   "--cfg", "2.0", "--n", "4", "--out", str(out)])  # fmt: skip
    assert "images/s" in stdout
    assert np.asarray(Image.open(out)).shape == (18 + 2, 4 * 18 + 2, 3)  # decoded to 16 px images
