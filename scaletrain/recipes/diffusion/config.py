"""Config sections of the diffusion recipes (the `model` and `data` sections of a job config).

Diffusion settings (schedule, prediction, guidance dropout, evaluation sampler) live in the
model section: they define what the network computes, so a checkpoint is only meaningful
with them. Sizes of the DiT follow Peebles & Xie (S/B/L/XL, patch 2/4/8); see configs/.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from scaletrain.config.schema import opt
from scaletrain.images.datasets import ImageDataConfig


@dataclass
class DiffusionSettings:
    schedule: Literal["linear", "cosine", "flow"] = opt(
        "linear", "Noise schedule: DDPM linear, cosine, or rectified flow (x_t = (1-t) x0 + t eps)."
    )
    prediction: Literal["eps", "v", "x0"] = opt("eps", "What the network predicts (flow: v = eps - x0).")
    time_sampling: Literal["uniform", "logit_normal"] = opt(
        "uniform",
        "Training times of the flow schedule: uniform in [0, 1], or logit_normal (sigmoid of a standard normal, "
        "as in SD3: most training on mid-way noise levels).",
    )
    timesteps: int = opt(1000, "Training timesteps T of the DDPM schedules.")
    num_classes: int = opt(0, "Classes for class conditioning; 0 = unconditional.")
    class_dropout: float = opt(0.1, "Probability of training on the null class (classifier-free guidance).")
    in_channels: int = opt(3, "Image (or latent) channels.")
    image_size: int = opt(32, "Height = width of the model input, in pixels (or latent cells).")
    eval_sampler: Literal["ddpm", "ddim"] = opt("ddim", "Sampler of the sample grids written at eval.interval.")
    eval_steps: int = opt(50, "Sampling steps of the eval grids (ddim).")
    eval_guidance: float = opt(1.0, "Classifier-free guidance scale of the eval grids (1 = off).")
    clip_x0: bool = opt(True, "Clip predicted x0 to [-1, 1] while sampling (pixel space).")
    attention: Literal["auto", "sdpa", "eager", "flex", "triton"] = opt(
        "auto",
        "Attention implementation (scaletrain.ops; non-causal here): auto = the fastest for the device and "
        "shapes, sdpa = torch SDPA, eager = plain matmul+softmax, flex = flex_attention, triton = the fused "
        "flash-attention kernel (head dim a power of two in [16, 128]).",
    )
    fused_norm: bool = opt(
        False,
        "Fused Triton norm kernels. DiT: each LayerNorm + adaLN modulate (norm(x) * (1 + scale) + shift) as one "
        "kernel (scaletrain/kernels/layer_norm.py). U-Net: each GroupNorm + SiLU (and the attention blocks' GroupNorm) "
        "as one "
        "kernel (scaletrain/kernels/group_norm.py).",
    )
    eval_inception_weights: str = opt(
        "",
        "Local Inception-v3 state dict (e.g. pytorch-fid's pt_inception-2015-12-05-6726825d.pth): the eval "
        "grids also report fid_inception/kid_inception against real images. Empty = shapes-classifier metrics only.",
    )


@dataclass
class DiTConfig(DiffusionSettings):
    patch_size: int = opt(2, "Patch side p; the image is cut into (image_size/p)^2 tokens.")
    dim: int = opt(384, "Transformer width D.")
    depth: int = opt(12, "Number of DiT blocks.")
    n_heads: int = opt(6, "Attention heads.")
    mlp_ratio: float = opt(4.0, "MLP hidden width / D.")

    @property
    def hidden_dim(self) -> int:
        return int(self.dim * self.mlp_ratio)


@dataclass
class UNetConfig(DiffusionSettings):
    channels: int = opt(64, "Base channel count.")
    channel_mult: list[int] = opt([1, 2, 2], "Channel multiplier per resolution level (each level halves H, W).")
    blocks_per_level: int = opt(2, "Residual blocks per level.")
    attention_levels: list[int] = opt([2], "Levels (0 = full resolution) with a self-attention block.")
    groups: int = opt(32, "GroupNorm groups.")
    dropout: float = opt(0.0, "Dropout in residual blocks (kept 0 for layout parity: dropout is per rank).")


@dataclass
class DiffusionDataConfig(ImageDataConfig):
    """The core's image data, plus a latent cache (the latent DiT) and per-image noise draws."""

    source: Literal["shapes", "folder", "latents"] = opt(
        "shapes", "Bundled procedural shapes, a user image folder (data.path), or a latent cache (data.path)."
    )
    path: str = opt("", "Image folder (root/<class>/*.png or root/*.png) or latent cache folder.")
    noise_draws: int = opt(0, "Noise draws per image for folder/latent data; 0 = automatic (~4M items).")
