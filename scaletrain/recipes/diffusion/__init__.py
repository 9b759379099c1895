"""Diffusion recipes: DiT and U-Net denoisers (pixels or VAE latents) and the KL autoencoder.

  scaletrain train scaletrain/recipes/diffusion/configs/dit-tiny.yaml        # pixel DiT on bundled shapes, CPU minutes
  scaletrain train scaletrain/recipes/diffusion/configs/unet-tiny.yaml       # pixel U-Net
  scaletrain sample runs/dit-tiny/checkpoints/step-00000900 --sampler ddim --steps 50 --cfg 4.0 --class 3 --n 64

Registered recipes: "dit", "unet" and "vae" (latent diffusion = vae -> latents.py cache -> dit
on data.source=latents). Module map: process.py (schedules, losses' targets,
samplers), data.py (per-sample noise), dit.py / unet.py (models),
parallelize.py (TP/AC/compile/FSDP plans), recipe.py (dataset, loss, checks, eval grids),
sample_cli.py (`scaletrain sample`), vae.py + vae_recipe.py (KL autoencoder),
latents.py (latent cache). Image data, FID/KID and grids are the core's (scaletrain/images/).
"""

from __future__ import annotations

import dataclasses

from scaletrain.recipes.diffusion import recipe as _r
from scaletrain.recipes.diffusion import vae_recipe as _v
from scaletrain.recipes.diffusion.config import DiffusionDataConfig, DiTConfig, UNetConfig
from scaletrain.recipes.diffusion.dit import DiT
from scaletrain.recipes.diffusion.parallelize import parallelize_blocks, parallelize_dit, startup_notes
from scaletrain.recipes.diffusion.sample_cli import make_sample_command
from scaletrain.recipes.diffusion.unet import UNet
from scaletrain.recipes.diffusion.vae import KLAutoencoder, VAEConfig, vae_loss
from scaletrain.registry import (
    DataSpec,
    EvalSpec,
    ModelSpec,
    ParallelSupport,
    PipelineSpec,
    Recipe,
    StepSpec,
    register_recipe,
)

# What the two pixel/latent denoisers share: the same data, loss, evaluation and sampler.
_DENOISER_DATA = DataSpec(config=DiffusionDataConfig, build_dataset=_r.build_dataset, example_batch=_r.example_batch)
_DENOISER_STEP = StepSpec(model_inputs=_r.model_inputs, loss=_r.loss)

DIT = register_recipe(
    Recipe(
        name="dit",
        model=ModelSpec(
            config=DiTConfig, build=DiT, parallelize=parallelize_dit, startup_notes=_r.denoiser_startup_notes
        ),
        data=_DENOISER_DATA,
        step=_DENOISER_STEP,
        validate=_r.validate_dit,
        supports=ParallelSupport(
            tensor_parallel=True,
            # Stages pass (tokens, conditioning vector) along; see DiT.forward.
            pipeline=PipelineSpec(
                trunk="blocks",
                first=("patch_embed", "t_embedder", "y_embedder"),
                last=("final",),
                trunk_depth=lambda model_cfg: model_cfg.depth,
                with_trunk_depth=lambda model_cfg, n: dataclasses.replace(model_cfg, depth=n),
            ),
        ),
        evaluation=EvalSpec(evaluate=_r.evaluate, sample=make_sample_command("dit")),
    )
)
UNET = register_recipe(
    Recipe(
        name="unet",
        model=ModelSpec(
            config=UNetConfig, build=UNet, parallelize=parallelize_blocks, startup_notes=_r.denoiser_startup_notes
        ),
        data=_DENOISER_DATA,
        step=_DENOISER_STEP,
        validate=_r.validate_unet,
        evaluation=EvalSpec(evaluate=_r.evaluate, sample=make_sample_command("unet")),
    )
)
VAE = register_recipe(
    Recipe(
        name="vae",
        model=ModelSpec(
            config=VAEConfig, build=KLAutoencoder, parallelize=parallelize_blocks, startup_notes=startup_notes
        ),
        data=DataSpec(config=DiffusionDataConfig, build_dataset=_v.build_dataset, example_batch=_v.example_batch),
        step=StepSpec(model_inputs=_v.model_inputs, loss=vae_loss),
        validate=_v.validate,
        evaluation=EvalSpec(evaluate=_v.evaluate),
    )
)
