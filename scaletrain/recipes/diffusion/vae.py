"""KL autoencoder (the "VAE" of latent diffusion): encoder -> diagonal Gaussian latent -> decoder.

A plain nn.Module; `init_tensor` fills every parameter by name (layout-independent init).
The encoder downsamples by 2^(len(channel_mult)-1) and outputs the mean and log-variance of
q(z | x); the decoder mirrors it. Training loss = reconstruction (L1 or MSE, per pixel) +
kl_weight * KL(q(z|x) || N(0, I)) (per latent element); the tiny default KL weight keeps
the latent close to a Gaussian without blurring (as Stable Diffusion's f8 autoencoder does).
A perceptual/adversarial term is not implemented yet.

Every GroupNorm is followed by SiLU and is a `GroupNorm(silu=True)` (unet.py; nn.GroupNorm's state, so
checkpoints are unchanged): with model.fused_norm each norm -> SiLU pair runs as one fused Triton kernel.

The reparameterisation noise comes from the data item (seeded per global sample), so, like
the denoisers, the VAE trains identically under every layout.

Shape legend: B batch, C image channels, Z latent channels, H/W height/width (h/w latent).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from scaletrain.config.schema import opt
from scaletrain.recipes.diffusion.unet import group_norm


@dataclass
class VAEConfig:
    in_channels: int = opt(3, "Image channels.")
    image_size: int = opt(32, "Training image height = width, in pixels.")
    channels: int = opt(32, "Base channel count.")
    channel_mult: list[int] = opt([1, 2, 2], "Channel multiplier per level; each level after the first halves H, W.")
    latent_channels: int = opt(4, "Latent channels Z.")
    groups: int = opt(8, "GroupNorm groups.")
    kl_weight: float = opt(1e-6, "Weight of the KL term (per latent element, vs the per-pixel L1).")
    fused_norm: bool = opt(
        False,
        "Each GroupNorm + SiLU (all of the VAE's norms) as one fused Triton kernel (scaletrain/kernels/group_norm.py), "
        "as "
        "model.fused_norm does for the U-Net.",
    )

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)


class Block(nn.Module):
    """Pre-norm residual block without conditioning."""

    def __init__(self, c_in: int, c_out: int, groups: int, fused_norm: bool = False):
        super().__init__()
        self.norm1 = group_norm(c_in, groups, silu=True, fused=fused_norm)  # GroupNorm -> SiLU
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = group_norm(c_out, groups, silu=True, fused=fused_norm)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv2(self.norm2(self.conv1(self.norm1(x))))
        return (x if self.skip is None else self.skip(x)) + h


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch = cfg.channels
        self.conv_in = nn.Conv2d(cfg.in_channels, ch, 3, padding=1)
        layers: list[nn.Module] = []
        c = ch
        for level, mult in enumerate(cfg.channel_mult):
            layers.append(Block(c, ch * mult, cfg.groups, cfg.fused_norm))
            c = ch * mult
            if level < len(cfg.channel_mult) - 1:
                layers.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
        layers.append(Block(c, c, cfg.groups, cfg.fused_norm))
        self.layers = nn.Sequential(*layers)
        self.norm_out = group_norm(c, cfg.groups, silu=True, fused=cfg.fused_norm)  # GroupNorm -> SiLU -> conv_out
        self.conv_out = nn.Conv2d(c, 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        return self.conv_out(self.norm_out(self.layers(self.conv_in(x_BCHW))))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch = cfg.channels
        c = ch * cfg.channel_mult[-1]
        self.conv_in = nn.Conv2d(cfg.latent_channels, c, 3, padding=1)
        layers: list[nn.Module] = [Block(c, c, cfg.groups, cfg.fused_norm)]
        for level in reversed(range(len(cfg.channel_mult))):
            layers.append(Block(c, ch * cfg.channel_mult[level], cfg.groups, cfg.fused_norm))
            c = ch * cfg.channel_mult[level]
            if level > 0:
                layers += [nn.Upsample(scale_factor=2.0, mode="nearest"), nn.Conv2d(c, c, 3, padding=1)]
        self.layers = nn.Sequential(*layers)
        self.norm_out = group_norm(c, cfg.groups, silu=True, fused=cfg.fused_norm)  # GroupNorm -> SiLU -> conv_out
        self.conv_out = nn.Conv2d(c, cfg.in_channels, 3, padding=1)

    def forward(self, z_BZhw: torch.Tensor) -> torch.Tensor:
        return self.conv_out(self.norm_out(self.layers(self.conv_in(z_BZhw))))


class KLAutoencoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)

    def encode(self, x_BCHW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, logvar) of q(z | x), each [B, Z, h, w]."""
        mean, logvar = self.encoder(x_BCHW).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)  # exp() stays finite in fp32 and bf16

    def decode(self, z_BZhw: torch.Tensor) -> torch.Tensor:
        return self.decoder(z_BZhw)

    def forward(self, x_BCHW: torch.Tensor, noise_BZhw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(reconstruction, kl_weight * KL per sample [B]) with z drawn by reparameterisation."""
        mean, logvar = self.encode(x_BCHW)
        z = mean + torch.exp(0.5 * logvar) * noise_BZhw.to(mean.dtype)
        kl_B = 0.5 * (mean.float().square() + logvar.float().exp() - 1.0 - logvar.float()).mean(dim=(1, 2, 3))
        return self.decode(z), self.cfg.kl_weight * kl_B

    def fsdp_blocks(self) -> list[nn.Module]:
        return [m for m in (*self.encoder.layers, *self.decoder.layers) if isinstance(m, Block)]

    @torch.no_grad()
    def init_tensor(self, name: str, tensor: torch.Tensor, generator: torch.Generator) -> None:
        """Fill the full value of parameter/buffer `name` (see scaletrain/parallel/init.py)."""
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "bias":
            tensor.zero_()
        elif "norm" in name:
            tensor.fill_(1.0)
        elif leaf == "weight":
            # PyTorch's default conv init bound 1/sqrt(fan_in); residual branches' last conv is
            # scaled down so deep stacks start close to the identity.
            bound = 1.0 / math.sqrt(tensor[0].numel())
            if name.endswith("conv2.weight"):
                bound *= 0.1
            tensor.uniform_(-bound, bound, generator=generator)
        else:
            raise KeyError(f"KLAutoencoder.init_tensor does not know how to initialize {name!r}")


def vae_loss(output: tuple[torch.Tensor, torch.Tensor], batch: dict[str, torch.Tensor]) -> torch.Tensor:
    recon, kl_B = output
    return (recon.float() - batch["image"].float()).abs().mean() + kl_B.float().mean()
