"""The "vae" recipe: trains the KL autoencoder of latent diffusion on images (shapes or a folder).

  scaletrain train scaletrain/recipes/diffusion/configs/vae-tiny.yaml
  python -m scaletrain.recipes.diffusion.latents runs/vae-tiny/checkpoints/step-00001000 \
      --config scaletrain/recipes/diffusion/configs/vae-tiny.yaml --out runs/vae-tiny/latents

Items are {image, noise}: the reparameterisation noise is drawn per global sample (seeded by
(seed, i)), so the VAE, too, trains identically under every layout. Data parallel only.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from scaletrain.config.schema import JobConfig
from scaletrain.images.datasets import ImagesWithNoise, image_dataset, images_with_noise_example
from scaletrain.images.grid import image_grid
from scaletrain.parallel.dims import ParallelDims
from scaletrain.validate import check_all


def latent_shape(cfg: JobConfig) -> tuple[int, int, int]:
    m = cfg.model
    side = m.image_size // m.downsample
    return (m.latent_channels, side, side)


def build_dataset(cfg: JobConfig) -> ImagesWithNoise:
    return ImagesWithNoise(image_dataset(cfg), cfg.job.seed, latent_shape(cfg), stream="vae-noise")


def model_inputs(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return batch["image"], batch["noise"]


def example_batch(cfg: JobConfig, batch_size: int) -> dict[str, torch.Tensor]:
    return images_with_noise_example(cfg, batch_size, latent_shape(cfg))


def validate(cfg: JobConfig, dims: ParallelDims) -> None:
    m, d = cfg.model, cfg.data
    checks = [
        (d.source != "latents", "data.source: the VAE trains on images; use shapes or folder"),
        (len(m.channel_mult) >= 1, "model.channel_mult: give at least one level"),
        (
            m.image_size % m.downsample == 0,
            f"model.image_size: {m.image_size} is not divisible by {m.downsample}, the VAE's downsampling "
            "(2^(len(model.channel_mult)-1))",
        ),
        (m.latent_channels >= 1, f"model.latent_channels: {m.latent_channels} is not allowed; use >= 1"),
        (m.kl_weight >= 0, f"model.kl_weight: {m.kl_weight} is not allowed; use >= 0"),
        (d.source != "shapes" or m.in_channels == 3, "model.in_channels: the shapes data set is RGB; use 3"),
    ]
    for mult in m.channel_mult:
        c = m.channels * mult
        checks.append((c % min(m.groups, c) == 0, f"model.groups: {m.groups} does not divide {c} channels"))
    check_all(checks)
    if d.source == "folder":  # last: it reads the folder (see recipe.check_data_files)
        image_dataset(cfg)


@torch.no_grad()
def evaluate(model: nn.Module, cfg: JobConfig, dims: ParallelDims, step: int, logger: Any) -> dict[str, float]:
    """Originals (top rows) over reconstructions (bottom rows) of the first eval.num_samples images."""
    data = image_dataset(cfg)
    n = min(cfg.eval.num_samples, len(data))
    device = next(model.parameters()).device
    x = torch.stack([data[i]["image"] for i in range(n)]).to(device)
    # Through forward (not encode/decode): FSDP2 gathers parameters in forward hooks. Zero
    # noise decodes the posterior mean.
    recon, _ = model(x, torch.zeros(n, *latent_shape(cfg), device=device))
    recon = recon.float().clamp(-1, 1)
    ncol = min(n, 8)
    rows = [t for start in range(0, n, ncol) for t in (x[start : start + ncol], recon[start : start + ncol])]
    logger.log_image(step, "reconstructions", image_grid(torch.cat(rows).cpu(), ncol))
    return {
        "recon_l1": (recon - x.float()).abs().mean().item(),
        "recon_mse": (recon - x.float()).square().mean().item(),
    }
