"""`scaletrain sample CHECKPOINT ...` for the GAN: a PNG grid from the (EMA) generator.

  scaletrain sample runs/dcgan-tiny/checkpoints/step-00000600 --n 64 --out grid.png
  scaletrain sample CKPT --class 2 --truncation 0.7 --metrics     # one class, shrunk noise, + FID/KID

The model config comes from the checkpoint (or --config); EMA weights are used when it has them.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch import nn

from scaletrain.checkpoint.loading import load_job_config, load_model
from scaletrain.distributed import destroy_distributed, init_distributed
from scaletrain.images.grid import class_labels, image_grid, save_png


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="scaletrain sample", description="Sample a PNG grid from a GAN checkpoint.")
    p.add_argument("checkpoint", help="a checkpoint folder (runs/<name>/checkpoints/step-XXXXXXXX)")
    p.add_argument("--class", dest="label", type=int, default=None, help="class to draw (default: every class)")
    p.add_argument("--n", type=int, default=64, help="number of images")
    p.add_argument("--truncation", type=float, default=1.0, help="scale of the noise z (< 1: fewer, cleaner modes)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="grid.png", help="output PNG")
    p.add_argument("--ema", choices=["auto", "yes", "no"], default="auto", help="use the EMA weights if present")
    p.add_argument("--config", default=None, help="training config YAML, when the checkpoint does not carry one")
    p.add_argument("--metrics", action="store_true", help="also print FID/KID against --n real images")
    return p


@torch.no_grad()
def generate(
    model: nn.Module, labels: torch.Tensor, latent_dim: int, seed: int, truncation: float = 1.0
) -> torch.Tensor:
    """Images in [-1, 1] for `labels`, noise from `seed`, through the root module's forward (phase="sample",
    where FSDP2 gathers the generator's weights)."""
    device = next(model.parameters()).device
    z = torch.randn(len(labels), latent_dim, generator=torch.Generator().manual_seed(seed)) * truncation
    n = len(labels)
    unused = torch.zeros(n, device=device)
    return model(unused, labels.to(device), z.to(device), unused, phase="sample").float().clamp(-1, 1).cpu()


def sample(argv: list[str]) -> None:
    args, overrides = _parser().parse_known_args(argv)
    if args.n < 1:
        raise ValueError(f"--n: {args.n} is not allowed; use >= 1")
    if args.truncation <= 0:
        raise ValueError(f"--truncation: {args.truncation} is not allowed; use > 0")
    folder = Path(args.checkpoint)
    cfg = load_job_config(folder, "gan", args.config, overrides)
    labels = class_labels(cfg.model.num_classes, args.n, args.label)
    init_distributed("auto")
    try:
        model = load_model(folder, "gan", cfg, args.ema)
        start = time.perf_counter()
        images = generate(model, labels, cfg.model.latent_dim, args.seed, args.truncation)
        seconds = time.perf_counter() - start
    finally:
        destroy_distributed()
    ncol = cfg.model.num_classes if cfg.model.num_classes and args.label is None else min(8, args.n)
    save_png(image_grid(images, ncol), args.out)
    print(f"wrote {args.out}: {args.n} images in {seconds:.2f}s")
    if args.metrics:
        from scaletrain.images.quality import feature_labels, sample_metrics

        for line in feature_labels(cfg):
            print(f"features: {line}")
        for key, value in sample_metrics(cfg, images, labels).items():
            print(f"{key}: {value:.6g}")
