"""Autoencoder recipe: beta-VAE, VQ-VAE and the denoising autoencoder on images (shapes or a folder).
Latent diffusion's KL-VAE stays the diffusion family's `vae` recipe; this family shares its encoder and
decoder (model.py).

  scaletrain train scaletrain/recipes/autoencoder/configs/vqvae-tiny.yaml
  scaletrain train scaletrain/recipes/autoencoder/configs/vqvae-tiny.yaml --model.kind beta-vae \
      --model.beta 4 --model.free_bits 0.1 --model.kl_anneal_steps 100
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from scaletrain.config.schema import JobConfig
from scaletrain.images.datasets import ImageDataConfig, ImagesWithNoise, image_dataset, images_with_noise_example
from scaletrain.images.grid import image_grid
from scaletrain.parallel import ParallelDims, checkpoint_compile_and_shard
from scaletrain.recipes.autoencoder.model import Autoencoder, AutoencoderConfig
from scaletrain.registry import DataSpec, EvalSpec, ModelSpec, Recipe, StepSpec, register_recipe
from scaletrain.validate import check_all


def noise_shape(cfg: JobConfig) -> tuple[int, int, int]:
    """The denoising autoencoder's input noise is image-shaped; the beta-VAE's reparameterisation noise is
    latent-shaped (the VQ-VAE ignores it)."""
    m = cfg.model
    if m.kind == "denoising":
        return (m.in_channels, m.image_size, m.image_size)
    side = m.image_size // m.downsample
    return (m.latent_channels, side, side)


def build_dataset(cfg: JobConfig) -> ImagesWithNoise:
    return ImagesWithNoise(image_dataset(cfg), cfg.job.seed, noise_shape(cfg), stream="autoencoder")


def model_inputs(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return batch["image"], batch["noise"]


def example_batch(cfg: JobConfig, batch_size: int) -> dict[str, torch.Tensor]:
    return images_with_noise_example(cfg, batch_size, noise_shape(cfg))


def loss(output: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return output  # Autoencoder.forward returns the mean loss


def after_step(model: nn.Module, dims: ParallelDims) -> dict[str, float]:
    """The codebook's moving averages and beta's clock, from sums over every data-parallel rank."""
    group = dims.axis("dp_cp").get_group() if dims.dp_size * dims.cp > 1 else None
    return model.after_step(group)


def parallelize(model: Autoencoder, dims: ParallelDims, cfg: JobConfig) -> Autoencoder:
    blocks = model.fsdp_blocks()
    return checkpoint_compile_and_shard(model, blocks, dims, cfg)


@torch.no_grad()
def evaluate(model: nn.Module, cfg: JobConfig, dims: ParallelDims, step: int, logger: Any) -> dict[str, float]:
    """Held-out images (shapes after data.num_samples; a folder's last images): originals over
    reconstructions, reconstruction MSE; beta-VAE also a grid decoded from prior samples."""
    m, n = cfg.model, cfg.eval.num_samples
    base = image_dataset(cfg)
    start = cfg.data.num_samples if cfg.data.source == "shapes" else max(0, len(base) - n)
    device = next(model.parameters()).device
    x = torch.stack([base[i]["image"] for i in range(start, start + n)]).to(device)
    recon = model(x, torch.zeros(n, *noise_shape(cfg), device=device), mode="reconstruct").float().clamp(-1, 1)
    ncol = min(n, 8)
    rows = [t for s in range(0, n, ncol) for t in (x[s : s + ncol], recon[s : s + ncol])]
    logger.log_image(step, "reconstructions", image_grid(torch.cat(rows).cpu(), ncol))
    if m.kind == "beta-vae":
        prior = torch.randn(n, *noise_shape(cfg), generator=torch.Generator().manual_seed(cfg.job.seed))
        logger.log_image(step, "prior_samples", image_grid(model(x, prior.to(device), mode="decode").float().cpu()))
    return {"recon_mse": (recon - x.float()).square().mean().item()}


def validate(cfg: JobConfig, dims: ParallelDims) -> None:
    m, d = cfg.model, cfg.data
    check_all(
        [
            (m.beta >= 0, f"model.beta: {m.beta} is not allowed; use >= 0"),
            (m.codebook_size >= 1, f"model.codebook_size: {m.codebook_size} is not allowed; use >= 1"),
            (0 < m.codebook_decay < 1, f"model.codebook_decay: {m.codebook_decay} is not allowed; use (0, 1)"),
            (m.free_bits >= 0, f"model.free_bits: {m.free_bits} is not allowed; use >= 0"),
            (m.kl_anneal_steps >= 0, f"model.kl_anneal_steps: {m.kl_anneal_steps} is not allowed; use >= 0"),
            (m.recon_std > 0, f"model.recon_std: {m.recon_std} is not allowed; use > 0"),
            (m.noise_std >= 0, f"model.noise_std: {m.noise_std} is not allowed; use >= 0"),
            (m.image_size % m.downsample == 0,
             f"model.image_size: {m.image_size} is not divisible by {m.downsample}, the encoder's downsampling"),
            (d.source != "shapes" or m.in_channels == 3, "model.in_channels: the shapes data set is RGB; use 3"),
        ]
    )  # fmt: skip
    if d.source == "folder":
        image_dataset(cfg)


register_recipe(
    Recipe(
        name="autoencoder",
        model=ModelSpec(config=AutoencoderConfig, build=Autoencoder, parallelize=parallelize),
        data=DataSpec(config=ImageDataConfig, build_dataset=build_dataset, example_batch=example_batch),
        step=StepSpec(model_inputs=model_inputs, loss=loss, after_step=after_step),
        validate=validate,
        evaluation=EvalSpec(evaluate=evaluate),
    )
)
