"""GAN recipe: a DCGAN-style generator and discriminator trained in alternating phases on images (the
bundled procedural shapes or a folder), with non-saturating, hinge or WGAN-GP losses.

The worked example of a recipe with several networks (docs/recipes.md): both networks are children of one
root module (`model.GAN`), and `StepSpec.phases` says what one step updates: the discriminator every step,
the generator every `model.n_critic` steps, each with its own AdamW groups, peak LR and betas.

  scaletrain train scaletrain/recipes/gan/configs/dcgan-tiny.yaml
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from scaletrain.config.schema import JobConfig
from scaletrain.images.datasets import ImageDataConfig, image_dataset, seeded_generator
from scaletrain.images.grid import image_grid
from scaletrain.images.quality import sample_metrics
from scaletrain.parallel import ParallelDims, checkpoint_compile_and_shard
from scaletrain.recipes.gan.model import GAN, GANConfig
from scaletrain.recipes.gan.sample import generate, sample
from scaletrain.registry import DataSpec, EvalSpec, ModelSpec, Phase, Recipe, StepSpec, register_recipe
from scaletrain.validate import check_all


class GANItems:
    """item i = {image, label, z, mix}: the generator's noise z and WGAN-GP's interpolation weight are drawn
    per global sample (seeded by (seed, i)), so every layout trains on the same fakes."""

    def __init__(self, base: Any, seed: int, latent_dim: int):
        self.base, self.seed, self.latent_dim = base, seed, latent_dim

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        generator = seeded_generator("gan", self.seed, int(i))
        item = self.base[int(i)]
        return {
            "image": item["image"],
            "label": item.get("label", torch.tensor(0)),
            "z": torch.randn(self.latent_dim, generator=generator),
            "mix": torch.rand((), generator=generator),
        }


def build_dataset(cfg: JobConfig) -> GANItems:
    return GANItems(image_dataset(cfg), cfg.job.seed, cfg.model.latent_dim)


def model_inputs(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    return batch["image"], batch["label"], batch["z"], batch["mix"]


def example_batch(cfg: JobConfig, batch_size: int) -> dict[str, torch.Tensor]:
    m = cfg.model
    return {
        "image": torch.empty(batch_size, m.in_channels, m.image_size, m.image_size, device="meta"),
        "label": torch.zeros(batch_size, dtype=torch.long, device="meta"),
        "z": torch.empty(batch_size, m.latent_dim, device="meta"),
        "mix": torch.empty(batch_size, device="meta"),
    }


def loss(output: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return output  # GAN.forward returns the phase's loss


def phases(cfg: JobConfig) -> list[Phase]:
    m = cfg.model
    betas = (m.beta1, m.beta2)
    return [
        Phase("discriminator", trains="discriminator", lr=m.d_lr or None, betas=betas, ema=False),
        Phase("generator", trains="generator", every=m.n_critic, lr=m.g_lr or None, betas=betas),
    ]


def parallelize(model: GAN, dims: ParallelDims, cfg: JobConfig) -> GAN:
    """Activation checkpointing -> compile -> FSDP2/DDP, with each network as one unit."""
    networks = [model.generator, model.discriminator]
    # The discriminator phase runs the generator under no_grad: DDP must not wait for its gradients.
    return checkpoint_compile_and_shard(model, networks, dims, cfg, find_unused_parameters=True)


def validate(cfg: JobConfig, dims: ParallelDims) -> None:
    m, d = cfg.model, cfg.data
    side_ok = m.image_size >= 8 and m.image_size & (m.image_size - 1) == 0
    check_all(
        [
            (side_ok, f"model.image_size: {m.image_size} is not allowed; use a power of two >= 8 (8, 16, 32, 64, ...)"),
            (m.n_critic >= 1, f"model.n_critic: {m.n_critic} is not allowed; use >= 1 discriminator updates per "
                              "generator update"),
            (m.latent_dim >= 1, f"model.latent_dim: {m.latent_dim} is not allowed; use >= 1"),
            (m.channels >= 1, f"model.channels: {m.channels} is not allowed; use >= 1"),
            (m.num_classes >= 0, f"model.num_classes: {m.num_classes} is not allowed; use 0 (unconditional) or more"),
            (m.gp_weight >= 0, f"model.gp_weight: {m.gp_weight} is not allowed; use >= 0"),
            (m.g_lr >= 0 and m.d_lr >= 0, "model.g_lr / model.d_lr: use > 0, or 0 for train.lr"),
            (0 <= m.beta1 < 1 and 0 <= m.beta2 < 1, "model.beta1 / model.beta2: use values in [0, 1)"),
            (d.source != "shapes" or m.in_channels == 3, "model.in_channels: the shapes data set is RGB; use 3"),
            (m.channels % min(m.groups, m.channels) == 0, f"model.groups: {m.groups} does not divide {m.channels}"),
        ]
    )  # fmt: skip
    if d.source == "folder":  # last: it reads the folder
        image_dataset(cfg)


@torch.no_grad()
def evaluate(model: nn.Module, cfg: JobConfig, dims: ParallelDims, step: int, logger: Any) -> dict[str, float]:
    """eval.num_samples images from fixed noise (the EMA generator when train.ema_decay > 0): a grid (one
    column per class when class-conditional), FID/KID against as many real images with the project's
    shapes-classifier features, and on class-conditional shapes the share drawn as the requested class."""
    m = cfg.model
    labels = (torch.arange(cfg.eval.num_samples) % max(1, m.num_classes)).long()
    images = generate(model, labels, m.latent_dim, seed=cfg.job.seed)
    logger.log_image(step, "samples", image_grid(images, m.num_classes or None))
    return sample_metrics(cfg, images, labels)


register_recipe(
    Recipe(
        name="gan",
        model=ModelSpec(config=GANConfig, build=GAN, parallelize=parallelize),
        data=DataSpec(config=ImageDataConfig, build_dataset=build_dataset, example_batch=example_batch),
        step=StepSpec(model_inputs=model_inputs, loss=loss, phases=phases),
        validate=validate,
        evaluation=EvalSpec(evaluate=evaluate, sample=sample),
    )
)
