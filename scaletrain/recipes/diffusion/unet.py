"""A small U-Net denoiser for pixel-space diffusion (in the style of Ho et al. 2020 / ADM).

A plain nn.Module with no parallel code; `init_tensor` fills every parameter by name so the
init is layout-independent. Residual blocks add a projection of the conditioning vector
(timestep MLP + class embedding); their last convolution, the attention output and the final
convolution start at zero, so every block starts as the identity (the U-Net analogue of
adaLN-Zero) and the model starts by predicting 0.

Every GroupNorm is a `GroupNorm` module (nn.GroupNorm's state, so checkpoints are unchanged); those that
SiLU follows (in the residual blocks and before the output convolution) apply the SiLU themselves, so that
with model.fused_norm each norm -> SiLU pair runs as one fused Triton kernel (scaletrain/kernels/group_norm.py).

Data parallel only: `fsdp_blocks()` lists the residual/attention blocks that FSDP2 shards
one at a time and that activation checkpointing wraps.

Shape legend: B batch, C channels, H/W height/width, D conditioning width.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from scaletrain import ops
from scaletrain.recipes.diffusion.config import UNetConfig
from scaletrain.recipes.diffusion.dit import timestep_features

# Parameters that start at zero (see the module docstring).
_ZERO_INIT = ("conv2.weight", "proj.weight", "out_conv.weight")


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm, optionally followed by SiLU (``silu``), through ``ops.group_norm``.

    Same state as nn.GroupNorm (``weight``, ``bias``; ``num_groups``, ``num_channels``, ``eps``), so checkpoints
    and `init_tensor` see no difference. Unfused it runs F.group_norm (+ F.silu), exactly what nn.GroupNorm
    followed by F.silu ran; with ``fused`` (model.fused_norm) the norm and the SiLU are one Triton kernel
    (``kernels.group_norm``). The VAE (vae.py) uses it too.
    """

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, *, silu: bool = False,
                 fused: bool = False) -> None:  # fmt: skip
        super().__init__(num_groups, num_channels, eps)
        self.silu, self.fused = silu, fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.group_norm(x, self.num_groups, self.weight, self.bias, self.eps, fused=self.fused, silu=self.silu)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, silu={self.silu}, fused={self.fused}"


def group_norm(channels: int, groups: int, *, silu: bool, fused: bool) -> GroupNorm:
    """The recipes' GroupNorm: min(groups, channels) groups."""
    return GroupNorm(min(groups, channels), channels, silu=silu, fused=fused)


class ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, cond_dim: int, groups: int, dropout: float, fused_norm: bool = False):
        super().__init__()
        self.norm1 = group_norm(c_in, groups, silu=True, fused=fused_norm)  # GroupNorm -> SiLU
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.cond = nn.Linear(cond_dim, c_out)
        self.norm2 = group_norm(c_out, groups, silu=True, fused=fused_norm)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else None

    def forward(self, x_BCHW: torch.Tensor, c_BD: torch.Tensor) -> torch.Tensor:
        h = self.conv1(self.norm1(x_BCHW))
        h = h + self.cond(F.silu(c_BD))[:, :, None, None]
        h = self.conv2(self.dropout(self.norm2(h)))
        return (x_BCHW if self.skip is None else self.skip(x_BCHW)) + h


class AttentionBlock(nn.Module):
    def __init__(self, channels: int, groups: int, attention: str = "auto", head_dim: int = 32,
                 fused_norm: bool = False) -> None:  # fmt: skip
        super().__init__()
        self.heads = max(1, channels // head_dim)
        self.head_dim = channels // self.heads
        self.attention_fn = ops.attention_fn(attention, causal=False)  # model.attention (scaletrain.ops)
        self.norm = group_norm(channels, groups, silu=False, fused=fused_norm)  # no SiLU before q/k/v
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x_BCHW: torch.Tensor, c_BD: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x_BCHW.shape
        qkv = self.qkv(self.norm(x_BCHW)).reshape(B, 3, self.heads, C // self.heads, H * W)
        q, k, v = (qkv[:, i].transpose(-1, -2) for i in range(3))  # B heads HW E
        out = self.attention_fn(q, k, v)
        return x_BCHW + self.proj(out.transpose(-1, -2).reshape(B, C, H, W))


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x_BCHW: torch.Tensor, c_BD: torch.Tensor) -> torch.Tensor:
        return self.conv(x_BCHW)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x_BCHW: torch.Tensor, c_BD: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x_BCHW, scale_factor=2.0, mode="nearest"))


class UNet(nn.Module):
    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        ch, groups = cfg.channels, cfg.groups
        cond_dim = 4 * ch
        self.t_fc1 = nn.Linear(ch, cond_dim)
        self.t_fc2 = nn.Linear(cond_dim, cond_dim)
        self.y_embedder = nn.Embedding(cfg.num_classes + 1, cond_dim) if cfg.num_classes > 0 else None
        self.in_conv = nn.Conv2d(cfg.in_channels, ch, 3, padding=1)
        # Encoder: per level, blocks_per_level res(+attn) blocks, then a downsample (not on the last).
        self.down = nn.ModuleList()
        skips = [ch]
        c = ch
        levels = len(cfg.channel_mult)
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.blocks_per_level):
                self.down.append(self._stage(c, ch * mult, level, cond_dim))
                c = ch * mult
                skips.append(c)
            if level < levels - 1:
                self.down.append(Downsample(c))
                skips.append(c)
        fused = cfg.fused_norm
        self.mid = nn.ModuleList(
            [
                ResBlock(c, c, cond_dim, groups, cfg.dropout, fused),
                AttentionBlock(c, groups, cfg.attention, fused_norm=fused),
                ResBlock(c, c, cond_dim, groups, cfg.dropout, fused),
            ]
        )
        # Decoder: mirror image; each res block consumes one encoder skip (channel concat).
        self.up = nn.ModuleList()
        for level in reversed(range(levels)):
            for _ in range(cfg.blocks_per_level + 1):
                self.up.append(self._stage(c + skips.pop(), ch * cfg.channel_mult[level], level, cond_dim))
                c = ch * cfg.channel_mult[level]
            if level > 0:
                self.up.append(Upsample(c))
        self.out_norm = group_norm(c, groups, silu=True, fused=fused)  # GroupNorm -> SiLU -> out_conv
        self.out_conv = nn.Conv2d(c, cfg.in_channels, 3, padding=1)

    def _stage(self, c_in: int, c_out: int, level: int, cond_dim: int) -> nn.Module:
        cfg = self.cfg
        layers = [ResBlock(c_in, c_out, cond_dim, cfg.groups, cfg.dropout, cfg.fused_norm)]
        if level in cfg.attention_levels:
            layers.append(AttentionBlock(c_out, cfg.groups, cfg.attention, fused_norm=cfg.fused_norm))
        return _Stage(*layers)

    def fsdp_blocks(self) -> list[nn.Module]:
        return [*self.down, *self.mid, *self.up]

    def forward(self, x_BCHW: torch.Tensor, t_B: torch.Tensor, y_B: torch.Tensor) -> torch.Tensor:
        features = timestep_features(t_B, self.cfg.channels).to(self.t_fc1.weight.dtype)
        c = self.t_fc2(F.silu(self.t_fc1(features)))
        if self.y_embedder is not None:
            c = c + self.y_embedder(y_B)
        h = self.in_conv(x_BCHW)
        skips = [h]
        for block in self.down:
            h = block(h, c)
            skips.append(h)
        for block in self.mid:
            h = block(h, c)
        for block in self.up:
            h = block(torch.cat([h, skips.pop()], dim=1), c) if isinstance(block, _Stage) else block(h, c)
        return self.out_conv(self.out_norm(h))

    @torch.no_grad()
    def init_tensor(self, name: str, tensor: torch.Tensor, generator: torch.Generator) -> None:
        """Fill the full value of parameter/buffer `name` (see scaletrain/parallel/init.py)."""
        leaf = name.rsplit(".", 1)[-1]
        if name.endswith(_ZERO_INIT) or leaf == "bias":
            tensor.zero_()
        elif "norm" in name:
            tensor.fill_(1.0)  # GroupNorm weight (biases handled above)
        elif name == "y_embedder.weight":
            nn.init.normal_(tensor, std=1.0, generator=generator)
        elif leaf == "weight":
            # PyTorch's default for Conv/Linear: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
            bound = 1.0 / math.sqrt(tensor[0].numel())
            tensor.uniform_(-bound, bound, generator=generator)
        else:
            raise KeyError(f"UNet.init_tensor does not know how to initialize {name!r}")


class _Stage(nn.Sequential):
    """A residual block optionally followed by attention; both take (x, c)."""

    def forward(self, x_BCHW: torch.Tensor, c_BD: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        for layer in self:
            x_BCHW = layer(x_BCHW, c_BD)
        return x_BCHW
