"""Diffusion recipes: DiT and U-Net denoisers (pixels or VAE latents) and the KL autoencoder.

  scaletrain train scaletrain/recipes/diffusion/configs/dit-tiny.yaml        # pixel DiT on bundled shapes, CPU minutes
  scaletrain train scaletrain/recipes/diffusion/configs/unet-tiny.yaml       # pixel U-Net
  scaletrain sample runs/dit-tiny/checkpoints/step-00000900 --sampler ddim --steps 50 --cfg 4.0 --class 3 --n 64

Registered recipes: "dit", "unet" and "vae" (latent diffusion = vae -> latents.py cache -> dit
on data.source=latents). Module map: process.py (schedules, losses' targets,
samplers), data.py (shapes, image folders, per-sample noise), dit.py / unet.py (models),
parallelize.py (TP/AC/compile/FSDP plans), recipe.py (dataset, loss, checks, eval grids),
sample_cli.py (`scaletrain sample`), vae.py + vae_recipe.py (KL autoencoder),
latents.py (latent cache), metrics.py (FID/KID, shapes classifier).
"""

from __future__ import annotations

from scaletrain.recipes.diffusion import recipe as _r
from scaletrain.recipes.diffusion import vae_recipe as _v
from scaletrain.recipes.diffusion.config import DiTConfig, ImageDataConfig, UNetConfig
from scaletrain.recipes.diffusion.dit import DiT
from scaletrain.recipes.diffusion.parallelize import parallelize_blocks, parallelize_dit, startup_notes
from scaletrain.recipes.diffusion.sample_cli import make_sample_command
from scaletrain.recipes.diffusion.unet import UNet
from scaletrain.recipes.diffusion.vae import KLAutoencoder, VAEConfig, vae_loss
from scaletrain.registry import PipelineSpec, Recipe, register_recipe

# What the two pixel/latent denoisers share: the same data, loss, evaluation and sampler.
_DENOISER = dict(
    data_config=ImageDataConfig,
    build_dataset=_r.build_dataset,
    model_inputs=_r.model_inputs,
    loss=_r.loss,
    evaluate=_r.evaluate,
    example_batch=_r.example_batch,
    startup_notes=_r.denoiser_startup_notes,
)

DIT = register_recipe(
    Recipe(
        name="dit",
        model_config=DiTConfig,
        build_model=DiT,
        parallelize=parallelize_dit,
        validate=_r.validate_dit,
        sample=make_sample_command("dit"),
        supports_tensor_parallel=True,
        # Stages pass (tokens, conditioning vector) along; see DiT.forward.
        pipeline=PipelineSpec(
            trunk="blocks",
            first=("patch_embed", "t_embedder", "y_embedder"),
            last=("final",),
            trunk_depth=lambda model_cfg: model_cfg.depth,
        ),
        **_DENOISER,
    )
)
UNET = register_recipe(
    Recipe(
        name="unet",
        model_config=UNetConfig,
        build_model=UNet,
        parallelize=parallelize_blocks,
        validate=_r.validate_unet,
        sample=make_sample_command("unet"),
        **_DENOISER,
    )
)
VAE = register_recipe(
    Recipe(
        name="vae",
        model_config=VAEConfig,
        data_config=ImageDataConfig,
        build_model=KLAutoencoder,
        parallelize=parallelize_blocks,
        build_dataset=_v.build_dataset,
        model_inputs=_v.model_inputs,
        loss=vae_loss,
        validate=_v.validate,
        evaluate=_v.evaluate,
        example_batch=_v.example_batch,
        startup_notes=startup_notes,
    )
)
