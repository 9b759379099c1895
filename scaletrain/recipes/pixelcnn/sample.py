"""Autoregressive sampling from a PixelCNN, and `scaletrain sample CHECKPOINT ...`.

  scaletrain sample runs/pixelcnn-tiny/checkpoints/step-00000600 --n 36 --class 2 --out grid.png
  scaletrain sample CKPT --temperature 0.8          # every class in turn, one column per class

One forward pass per sub-pixel (softmax) or per pixel (logistic mixture), in raster order. The network is
causal, so rows below the one being drawn cannot change it: each pass runs on rows 0..r only. Random draws
come from a CPU generator seeded by --seed, so a sample does not depend on the device.
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
from scaletrain.recipes.pixelcnn.model import PixelCNNConfig, adjusted_mean, levels_to_image, split_mixture


def _draw_softmax(logits_BK: torch.Tensor, temperature: float, generator: torch.Generator) -> torch.Tensor:
    return torch.multinomial(torch.softmax(logits_BK / temperature, dim=1), 1, generator=generator)[:, 0]


def _draw_mixture_pixel(
    raw_BF11: torch.Tensor, cfg: PixelCNNConfig, temperature: float, generator: torch.Generator
) -> torch.Tensor:
    """One pixel from the mixture head: a component, then R, then G given R, then B given R and G (their means
    move with the values drawn before them); each value snapped to its level. Returns (B, C) in [-1, 1]."""
    logits, means, log_scales, coeffs = split_mixture(raw_BF11, cfg)
    rows = torch.arange(raw_BF11.shape[0])
    component = _draw_softmax(logits[:, :, 0, 0], temperature, generator)
    pixel = torch.zeros(raw_BF11.shape[0], cfg.in_channels, 1, 1)
    for c in range(cfg.in_channels):
        mean = adjusted_mean(means, coeffs, pixel, c)[rows, component, 0, 0]
        scale = log_scales[rows, c, component, 0, 0].exp() * temperature
        u = torch.rand(mean.shape, generator=generator).clamp(1e-5, 1 - 1e-5)
        value = mean + scale * (torch.log(u) - torch.log1p(-u))  # logistic by inverting its CDF
        level = torch.round((value.clamp(-1, 1) + 1) / 2 * (2**cfg.n_bits - 1))  # the nearest bin centre
        pixel[:, c, 0, 0] = levels_to_image(level, cfg.n_bits)
    return pixel[:, :, 0, 0]


@torch.no_grad()
def generate(
    model: nn.Module, cfg: PixelCNNConfig, labels: torch.Tensor, temperature: float, seed: int
) -> torch.Tensor:
    """len(labels) images in [-1, 1] (the n_bits levels, as levels_to_image maps them), drawn through the root
    module's forward (mode="head"), where FSDP2 gathers the weights."""
    K, C, S = 2**cfg.n_bits, cfg.in_channels, cfg.image_size
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    image = torch.full((len(labels), C, S, S), -1.0)  # level 0 until drawn; never seen before it is
    labels = labels.to(device)

    def head(r: int, w: int) -> torch.Tensor:  # rows 0..r suffice: nothing below row r reaches it
        return model(image[:, :, : r + 1].to(device), labels, mode="head").float().cpu()[:, :, r, w]

    for r in range(S):
        for w in range(S):
            if cfg.output == "logistic_mixture":
                image[:, :, r, w] = _draw_mixture_pixel(head(r, w)[:, :, None, None], cfg, temperature, generator)
                continue
            for c in range(C):
                drawn = _draw_softmax(head(r, w)[:, c * K : (c + 1) * K], temperature, generator)
                image[:, c, r, w] = levels_to_image(drawn.float(), cfg.n_bits)
    return image


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="scaletrain sample", description="Sample a PNG grid from a PixelCNN checkpoint.")
    p.add_argument("checkpoint", help="a checkpoint folder (runs/<name>/checkpoints/step-XXXXXXXX)")
    p.add_argument("--class", dest="label", type=int, default=None, help="class to draw (default: every class)")
    p.add_argument("--n", type=int, default=36, help="number of images")
    p.add_argument("--temperature", type=float, default=None, help="default: model.temperature")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="grid.png", help="output PNG")
    p.add_argument("--ema", choices=["auto", "yes", "no"], default="auto", help="use the EMA weights if present")
    p.add_argument("--config", default=None, help="training config YAML, when the checkpoint does not carry one")
    return p


def sample(argv: list[str]) -> None:
    args, overrides = _parser().parse_known_args(argv)
    if args.n < 1:
        raise ValueError(f"--n: {args.n} is not allowed; use >= 1")
    folder = Path(args.checkpoint)
    cfg = load_job_config(folder, "pixelcnn", args.config, overrides)
    temperature = cfg.model.temperature if args.temperature is None else args.temperature
    if temperature <= 0:
        raise ValueError(f"--temperature: {temperature} is not allowed; use > 0")
    labels = class_labels(cfg.model.num_classes, args.n, args.label)
    init_distributed("auto")
    try:
        model = load_model(folder, "pixelcnn", cfg, args.ema)
        start = time.perf_counter()
        images = generate(model, cfg.model, labels, temperature, args.seed)
        seconds = time.perf_counter() - start
    finally:
        destroy_distributed()
    ncol = cfg.model.num_classes if cfg.model.num_classes and args.label is None else min(8, args.n)
    save_png(image_grid(images, ncol), args.out)
    print(f"wrote {args.out}: {args.n} images at temperature {temperature} in {seconds:.1f}s")
