"""Normalizing flows on images: RealNVP (Dinh et al. 2017) and Glow (Kingma & Dhariwal 2018).

Both are multi-scale: after each level but the last, half of the channels are factored out as latents
(standard normal), and the rest go on at half the resolution. The exact log-likelihood is the latents'
log-density plus the sum of every layer's log|det Jacobian|.

  RealNVP level: `steps` affine couplings with alternating checkerboard masks, then (if not the last level)
                 squeeze and `steps` couplings with alternating channel masks, then split.
  Glow level:    squeeze, then `steps` x [actnorm, invertible 1x1 conv (LU), affine coupling], then split.

Inputs are n_bits images dequantized with uniform noise: y = (x + u) / 2^n_bits - 1/2 with u ~ U[0, 1)
drawn per global sample (the data item's `noise`), so every layout sees the same y. Then
  bits/dim = -log p(y) / (D ln 2) + n_bits,
and n_bits is the uniform distribution's bits/dim: the baseline a flow must beat.

Actnorm's data-dependent init is stored in buffers beside zero-initialized parameters (the scale and bias
used are init + parameter): FSDP2 shards parameters, not buffers, so the init writes plain tensors, and the
same values on every rank. They are computed from the same fixed items on every rank (`data_init`).

Shape legend: B batch, C channels, H/W height/width, D = C*H*W.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from scaletrain.config.schema import opt


@dataclass
class FlowConfig:
    kind: Literal["realnvp", "glow"] = opt(
        "glow",
        "realnvp = affine couplings with checkerboard and channel masks; glow = actnorm + invertible 1x1 conv + "
        "affine coupling.",
    )
    image_size: int = opt(16, "Image side; must halve `levels` times (glow) or levels - 1 times (realnvp).")
    in_channels: int = opt(3, "Image channels (3 for the shapes data set).")
    levels: int = opt(2, "Scales L: after each level but the last, half the channels are factored out.")
    steps: int = opt(4, "Flow steps per level (glow's K; realnvp: couplings per mask type).")
    hidden: int = opt(64, "Width of each coupling's convolutional network.")
    n_bits: int = opt(8, "Bits per colour value the images are quantized to (and dequantized from).")
    init_samples: int = opt(128, "Items actnorm's data-dependent init sees (the same items on every rank).")
    temperature: float = opt(0.7, "Std of the latents when sampling for the eval grid (1 = the model's own).")


def squeeze(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, 4C, H/2, W/2): each 2x2 patch into channels."""
    B, C, H, W = x.shape
    return x.view(B, C, H // 2, 2, W // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(B, 4 * C, H // 2, W // 2)


def unsqueeze(x: torch.Tensor) -> torch.Tensor:
    B, C, H, W = x.shape
    return x.view(B, C // 4, 2, 2, H, W).permute(0, 1, 4, 2, 5, 3).reshape(B, C // 4, 2 * H, 2 * W)


class ActNorm(nn.Module):
    """Per-channel affine y = (x + b) * exp(logs), b and logs first set from data (zero mean, unit variance)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.empty(channels))
        self.logs = nn.Parameter(torch.empty(channels))
        self.register_buffer("init_bias", torch.empty(channels))
        self.register_buffer("init_logs", torch.empty(channels))
        self.initializing = False  # set by Flow.forward(mode="init")

    def _affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        bias, logs = self.init_bias + self.bias, self.init_logs + self.logs
        return bias.view(1, -1, 1, 1), logs.view(1, -1, 1, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.initializing:
            with torch.no_grad():
                mean = x.mean(dim=(0, 2, 3))
                std = (x - mean.view(1, -1, 1, 1)).square().mean(dim=(0, 2, 3)).sqrt()
                self.init_bias.copy_(-mean)
                self.init_logs.copy_(-torch.log(std + 1e-6))
        bias, logs = self._affine()
        return (x + bias) * logs.exp(), logs.sum() * x.shape[2] * x.shape[3] * x.new_ones(x.shape[0])

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        bias, logs = self._affine()
        return y * (-logs).exp() - bias


class InvertibleConv1x1(nn.Module):
    """A learned channel mixing W = P L (U + diag(sign(s) exp(log|s|))), LU-parametrized so log|det W| is
    sum(log|s|); started from a random rotation."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.lower = nn.Parameter(torch.empty(channels, channels))
        self.upper = nn.Parameter(torch.empty(channels, channels))
        self.log_s = nn.Parameter(torch.empty(channels))
        self.register_buffer("perm", torch.empty(channels, channels))
        self.register_buffer("sign_s", torch.empty(channels))

    def weight(self) -> torch.Tensor:
        eye = torch.eye(self.lower.shape[0], device=self.lower.device, dtype=self.lower.dtype)
        lower = self.lower.tril(-1) + eye
        upper = self.upper.triu(1) + torch.diag(self.sign_s * self.log_s.exp())
        return self.perm @ lower @ upper

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = F.conv2d(x, self.weight()[:, :, None, None])
        return y, self.log_s.sum() * x.shape[2] * x.shape[3] * x.new_ones(x.shape[0])

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return F.conv2d(y, torch.linalg.inv(self.weight())[:, :, None, None])

    @staticmethod
    def initial(channels: int, seed: int) -> dict[str, torch.Tensor]:
        """LU factors of a random rotation (Glow's init), the same for every tensor of one layer."""
        q, _ = torch.linalg.qr(torch.randn(channels, channels, generator=torch.Generator().manual_seed(seed)))
        perm, lower, upper = torch.linalg.lu(q)
        s = torch.diagonal(upper)
        return {"perm": perm, "lower": lower, "upper": upper, "log_s": s.abs().log(), "sign_s": s.sign()}


class AffineCoupling(nn.Module):
    """Half of the values (by channel, or by a checkerboard) pass unchanged and set a scale and shift for the
    other half: y_b = x_b * scale(x_a) + shift(x_a). Glow: scale = sigmoid(h + 2); RealNVP: exp(tanh(h))."""

    def __init__(self, channels: int, hidden: int, mask: Literal["channel", "checkerboard"], parity: int,
                 kind: str) -> None:  # fmt: skip
        super().__init__()
        self.mask, self.parity, self.kind = mask, parity, kind
        c_in = channels // 2 if mask == "channel" else channels
        c_out = channels - channels // 2 if mask == "channel" else channels
        self.net = nn.Sequential(
            nn.Conv2d(c_in, hidden, 3, padding=1), nn.ReLU(), nn.Conv2d(hidden, hidden, 1), nn.ReLU(),
            nn.Conv2d(hidden, 2 * c_out, 3, padding=1),  # zero-initialized: each coupling starts as the identity
        )  # fmt: skip

    def _checkerboard(self, x: torch.Tensor) -> torch.Tensor:
        H, W = x.shape[2:]
        grid = torch.arange(H, device=x.device)[:, None] + torch.arange(W, device=x.device)[None, :]
        return ((grid + self.parity) % 2).to(x.dtype).view(1, 1, H, W)  # 1 = passes unchanged

    def _scale_shift(self, condition: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shift, raw = self.net(condition).chunk(2, dim=1)
        log_scale = F.logsigmoid(raw + 2.0) if self.kind == "glow" else torch.tanh(raw)
        return log_scale, shift

    def _halves(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = x[:, : x.shape[1] // 2], x[:, x.shape[1] // 2 :]
        return (a, b) if self.parity == 0 else (b, a)

    def _join(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.cat([a, b] if self.parity == 0 else [b, a], dim=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.mask == "channel":
            a, b = self._halves(x)
            log_scale, shift = self._scale_shift(a)
            return self._join(a, (b + shift) * log_scale.exp()), log_scale.flatten(1).sum(1)
        keep = self._checkerboard(x)
        log_scale, shift = self._scale_shift(x * keep)
        log_scale, shift = log_scale * (1 - keep), shift * (1 - keep)
        return x * keep + (1 - keep) * (x + shift) * log_scale.exp(), log_scale.flatten(1).sum(1)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        if self.mask == "channel":
            a, b = self._halves(y)
            log_scale, shift = self._scale_shift(a)
            return self._join(a, b * (-log_scale).exp() - shift)
        keep = self._checkerboard(y)
        log_scale, shift = self._scale_shift(y * keep)
        return y * keep + (1 - keep) * (y * (-log_scale).exp() - shift)


class Level(nn.Module):
    """One scale: its flow steps, applied at (squeeze_first ? after : before) a squeeze (see the module doc)."""

    def __init__(self, cfg: FlowConfig, channels: int, last: bool) -> None:
        super().__init__()
        self.cfg, self.last = cfg, last
        layers: list[nn.Module] = []
        if cfg.kind == "glow":
            c = 4 * channels
            for _ in range(cfg.steps):
                layers += [ActNorm(c), InvertibleConv1x1(c), AffineCoupling(c, cfg.hidden, "channel", 0, "glow")]
        else:
            layers += [AffineCoupling(channels, cfg.hidden, "checkerboard", i % 2, "realnvp") for i in range(cfg.steps)]
            if not last:
                c = 4 * channels
                layers += [AffineCoupling(c, cfg.hidden, "channel", i % 2, "realnvp") for i in range(cfg.steps)]
        self.layers = nn.ModuleList(layers)

    def _squeezes_before(self, index: int) -> bool:
        """Glow squeezes before its first layer; RealNVP before its first channel coupling."""
        return index == 0 if self.cfg.kind == "glow" else index == self.cfg.steps

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logdet = x.new_zeros(x.shape[0])
        for index, layer in enumerate(self.layers):
            if self._squeezes_before(index):
                x = squeeze(x)
            x, ld = layer(x)
            logdet = logdet + ld
        return x, logdet

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        for index in reversed(range(len(self.layers))):
            y = self.layers[index].inverse(y)
            if self._squeezes_before(index):
                y = unsqueeze(y)
        return y


class Flow(nn.Module):
    def __init__(self, cfg: FlowConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.levels = nn.ModuleList()
        channels = cfg.in_channels
        for index in range(cfg.levels):
            last = index == cfg.levels - 1
            self.levels.append(Level(cfg, channels, last))
            squeezed = not last or cfg.kind == "glow"
            channels = (4 * channels if squeezed else channels) // (1 if last else 2)

    def encode(self, y: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """y -> (the latents each level factors out, the last level's whole output; sum of log|det J|)."""
        latents, logdet = [], y.new_zeros(y.shape[0])
        for index, level in enumerate(self.levels):
            y, ld = level(y)
            logdet = logdet + ld
            if index < len(self.levels) - 1:
                z, y = y.chunk(2, dim=1)
                latents.append(z)
        return [*latents, y], logdet

    def decode(self, latents: list[torch.Tensor]) -> torch.Tensor:
        y = latents[-1]
        for index in reversed(range(len(self.levels))):
            if index < len(self.levels) - 1:
                y = torch.cat([latents[index], y], dim=1)
            y = self.levels[index].inverse(y)
        return y

    def latent_shapes(self) -> list[tuple[int, int, int]]:
        """(C, H, W) of each latent encode returns, in order."""
        cfg, shapes = self.cfg, []
        channels, side = cfg.in_channels, cfg.image_size
        for index in range(cfg.levels):
            last = index == cfg.levels - 1
            if not last or cfg.kind == "glow":  # squeezed in this level
                channels, side = 4 * channels, side // 2
            if not last:
                channels //= 2  # the other half is factored out here
            shapes.append((channels, side, side))
        return shapes

    def dequantize(self, image: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> n_bits integers -> y = (x + u) / 2^n_bits - 1/2 in [-1/2, 1/2)."""
        bins = 2**self.cfg.n_bits
        x = torch.floor((image + 1) / 2 * bins).clamp(0, bins - 1)
        return (x + noise) / bins - 0.5

    def bits_per_dim(self, y: torch.Tensor) -> torch.Tensor:
        """Per sample: -log p(y) / (D ln 2) + n_bits, the discrete images' bits per value."""
        latents, logdet = self.encode(y)
        log_pz = sum(-0.5 * (z.square() + math.log(2 * math.pi)).flatten(1).sum(1) for z in latents)
        dims = y[0].numel()
        return -(log_pz + logdet) / (dims * math.log(2)) + self.cfg.n_bits

    def forward(self, image: torch.Tensor, noise: torch.Tensor, mode: str = "loss") -> torch.Tensor:
        """mode loss: mean bits/dim; bits: per sample; init: actnorm's data-dependent init (bits/dim too);
        sample: images from the standard-normal `noise` (image-shaped; split into the levels' latents)."""
        if mode == "sample":
            shapes = self.latent_shapes()
            parts = noise.flatten(1).split([math.prod(s) for s in shapes], dim=1)
            y = self.decode([p.reshape(-1, *s) for p, s in zip(parts, shapes, strict=True)])
            return ((y + 0.5) * 2 - 1).clamp(-1, 1)
        y = self.dequantize(image, noise)
        actnorms = [m for m in self.modules() if isinstance(m, ActNorm)]
        for m in actnorms:
            m.initializing = mode == "init"
        try:
            bits = self.bits_per_dim(y)
        finally:
            for m in actnorms:
                m.initializing = False
        return bits if mode == "bits" else bits.mean()

    def init_tensor(self, name: str, tensor: torch.Tensor, generator: torch.Generator) -> None:
        """Couplings' networks: torch's default conv init, the last conv zero (identity start); actnorm:
        zeros (the data-dependent part lives in its init_* buffers, set by data_init); 1x1 convs: LU of a
        random rotation seeded by the layer's name."""
        module_name, leaf = name.rsplit(".", 1)
        module = self.get_submodule(module_name)
        if isinstance(module, InvertibleConv1x1):
            values = InvertibleConv1x1.initial(module.log_s.shape[0], zlib.crc32(module_name.encode()))
            tensor.copy_(values[leaf])
        elif isinstance(module, ActNorm):
            tensor.zero_()
        elif isinstance(module, nn.Conv2d):
            last = module_name.endswith(".net.4")
            if last or leaf == "bias":
                tensor.zero_()
            else:
                bound = 1.0 / math.sqrt(tensor[0].numel())
                tensor.uniform_(-bound, bound, generator=generator)
        else:
            raise KeyError(f"Flow.init_tensor does not know how to initialize {name!r}")
