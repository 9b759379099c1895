"""DCGAN-style generator and discriminator under one root module, the GAN's losses, spectral norm.

The root module `GAN` holds `generator` and `discriminator` as children, so the core's init, parallelize,
checkpoints and resharding treat the pair as one model; its forward computes one phase's loss
(`phase="discriminator"` or `"generator"`, see scaletrain.registry.Phase), or samples (`phase="sample"`).
Everything goes through the root's forward, because that is where DDP and FSDP2 hook in.

No batch norm: its statistics depend on how the batch is split over ranks and micro-batches, so a run
would differ by layout. The generator uses group norm (per sample); the discriminator uses none, or
spectral norm.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from scaletrain.config.schema import opt

PHASES = ("discriminator", "generator")


@dataclass
class GANConfig:
    image_size: int = opt(32, "Image side (a power of two >= 8): the generator doubles 4x4 up to it.")
    in_channels: int = opt(3, "Image channels (3 for the shapes data set).")
    latent_dim: int = opt(64, "Size of the generator's input noise z.")
    channels: int = opt(32, "Width of the generator's last and the discriminator's first layer; doubles per level.")
    num_classes: int = opt(
        0,
        "0 = unconditional; > 0 = class-conditional: each generator level's group norm takes a per-class gain "
        "and shift (SNGAN/BigGAN's conditional batch norm), and the discriminator adds a projection term "
        "(Miyato & Koyama 2018).",
    )
    loss: Literal["nonsaturating", "hinge", "wgan-gp"] = opt(
        "nonsaturating",
        "nonsaturating = the original GAN's log loss with the generator's non-saturating form; hinge = "
        "SNGAN/BigGAN's; wgan-gp = Wasserstein critic with a gradient penalty (Gulrajani et al. 2017).",
    )
    gp_weight: float = opt(10.0, "WGAN-GP's gradient-penalty weight lambda.")
    n_critic: int = opt(1, "Discriminator updates per generator update (WGAN-GP uses 5).")
    spectral_norm: bool = opt(False, "Spectral normalization of the discriminator's weights (one power iteration).")
    g_lr: float = opt(0.0, "Generator's peak LR; 0 = train.lr.")
    d_lr: float = opt(0.0, "Discriminator's peak LR; 0 = train.lr (two-time-scale: often 2-4x the generator's).")
    beta1: float = opt(0.5, "AdamW beta1 of both networks (GANs use 0.5, or 0 for WGAN-GP).")
    beta2: float = opt(0.999, "AdamW beta2 of both networks (0.9 for WGAN-GP).")
    groups: int = opt(8, "Group-norm groups in the generator.")

    @property
    def levels(self) -> int:
        """Up-/down-sampling stages between 4x4 and the image."""
        return int(math.log2(self.image_size)) - 2


class SpectralNorm(nn.Module):
    """W / sigma(W) for a wrapped conv or linear layer, sigma estimated by one power iteration per training
    forward (Miyato et al. 2018). Written out rather than torch's parametrization so that FSDP2 sees a plain
    `weight` parameter; `u` is a buffer, the same on every rank (it depends on the weight only)."""

    def __init__(self, layer: nn.Conv2d | nn.Linear) -> None:
        super().__init__()
        self.layer = layer
        self.register_buffer("u", torch.empty(layer.weight.shape[0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.layer.weight.flatten(1)
        with torch.no_grad():
            u = self.u
            v = F.normalize(w.t() @ u, dim=0, eps=1e-12)
            u = F.normalize(w @ v, dim=0, eps=1e-12)
            if self.training:
                self.u.copy_(u)
        sigma = u @ w @ v
        weight = self.layer.weight / sigma
        if isinstance(self.layer, nn.Conv2d):
            return F.conv2d(x, weight, self.layer.bias, self.layer.stride, self.layer.padding)
        return F.linear(x, weight, self.layer.bias)


class ClassNorm(nn.Module):
    """Group norm with a per-class gain and shift (SNGAN/BigGAN's conditional batch norm, per sample so that
    every layout computes the same); with no classes, a plain group norm."""

    def __init__(self, channels: int, groups: int, num_classes: int) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, affine=num_classes == 0)
        self.class_gain = nn.Embedding(num_classes, channels) if num_classes else None
        self.class_shift = nn.Embedding(num_classes, channels) if num_classes else None

    def forward(self, h_BCHW: torch.Tensor, label_B: torch.Tensor) -> torch.Tensor:
        h_BCHW = self.norm(h_BCHW)
        if self.class_gain is None:
            return h_BCHW
        return h_BCHW * self.class_gain(label_B)[:, :, None, None] + self.class_shift(label_B)[:, :, None, None]


class Generator(nn.Module):
    """z -> 4x4 -> [upsample x2, conv, (class-conditional) group norm, ReLU] per level -> conv -> tanh.

    The class enters through the norms, not the input: with a class embedding added to z instead, the
    conditional shapes run (docs/families.md) drew one image per class whatever z was (within-class
    diversity 0.23, FID 44); with the class in the norms, 1.38 and FID 4.5."""

    def __init__(self, cfg: GANConfig) -> None:
        super().__init__()
        self.cfg = cfg
        width = cfg.channels * 2**cfg.levels
        self.project = nn.Linear(cfg.latent_dim, width * 16)
        self.ups = nn.ModuleList()
        for level in range(cfg.levels):
            c_in, c_out = width // 2**level, width // 2 ** (level + 1)
            self.ups.append(
                nn.ModuleDict(
                    {
                        "conv": nn.Conv2d(c_in, c_out, 3, padding=1),
                        "norm": ClassNorm(c_out, min(cfg.groups, c_out), cfg.num_classes),
                    }
                )
            )
        self.out = nn.Conv2d(cfg.channels, cfg.in_channels, 3, padding=1)

    def forward(self, z: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        h = self.project(z).unflatten(1, (-1, 4, 4))
        for up in self.ups:
            h = F.interpolate(h, scale_factor=2, mode="nearest")
            h = F.relu(up["norm"](up["conv"](h), label))
        return torch.tanh(self.out(h))


class Discriminator(nn.Module):
    """[conv 4x4 stride 2, leaky ReLU] per level down to 4x4 -> linear score (+ projection of the class)."""

    def __init__(self, cfg: GANConfig) -> None:
        super().__init__()
        wrap = SpectralNorm if cfg.spectral_norm else (lambda layer: layer)
        channels = [cfg.in_channels] + [cfg.channels * 2**level for level in range(cfg.levels)]
        pairs = zip(channels[:-1], channels[1:], strict=True)
        self.downs = nn.ModuleList(wrap(nn.Conv2d(a, b, 4, stride=2, padding=1)) for a, b in pairs)
        features = channels[-1] * 16
        self.score = wrap(nn.Linear(features, 1))
        self.embed = nn.Embedding(cfg.num_classes, features) if cfg.num_classes else None

    def forward(self, x: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        h = x
        for down in self.downs:
            h = F.leaky_relu(down(h), 0.2)
        h = h.flatten(1)
        out = self.score(h).squeeze(1)
        if self.embed is not None:  # projection discriminator: <embed(y), features>
            out = out + (self.embed(label) * h).sum(1)
        return out


@contextlib.contextmanager
def _gathered_through_backward(module: nn.Module) -> Iterator[None]:
    """Under FSDP2, keep `module`'s gathered weights through an autograd.grad call: FSDP2 frees them when a
    backward leaves the module, but the penalty's graph (create_graph) still holds them for the loss's
    backward, which then finds freed storage. The loss's backward frees them as usual."""
    if not hasattr(module, "set_reshard_after_backward"):  # not FSDP2-sharded
        yield
        return
    module.set_reshard_after_backward(False)
    try:
        yield
    finally:
        module.set_reshard_after_backward(True)


class GAN(nn.Module):
    def __init__(self, cfg: GANConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.generator = Generator(cfg)
        self.discriminator = Discriminator(cfg)

    def forward(
        self, image: torch.Tensor, label: torch.Tensor, z: torch.Tensor, mix: torch.Tensor, phase: str = "generator"
    ) -> torch.Tensor:
        """The loss of `phase` (mean over the batch), or the generated images for phase="sample"."""
        if phase == "sample":
            return self.generator(z, label)
        if phase == "generator":
            fake_score = self.discriminator(self.generator(z, label), label)
            if self.cfg.loss == "nonsaturating":
                return F.softplus(-fake_score).mean()
            return -fake_score.mean()  # hinge and WGAN: raise the critic's score of the fakes
        if phase != "discriminator":
            raise ValueError(f"GAN.forward: unknown phase {phase!r}; known: {PHASES + ('sample',)}")
        with torch.no_grad():
            fake = self.generator(z, label)
        return self.discriminator_loss(image, fake, label, mix)

    def discriminator_loss(
        self, real: torch.Tensor, fake: torch.Tensor, label: torch.Tensor, mix: torch.Tensor
    ) -> torch.Tensor:
        n = real.shape[0]
        if self.cfg.loss != "wgan-gp":
            # One call for real and fake: under DDP a module runs once per forward.
            scores = self.discriminator(torch.cat([real, fake]), torch.cat([label, label]))
            real_score, fake_score = scores[:n], scores[n:]
            if self.cfg.loss == "nonsaturating":
                return (F.softplus(-real_score) + F.softplus(fake_score)).mean()
            return (F.relu(1 - real_score) + F.relu(1 + fake_score)).mean()
        # WGAN-GP: the critic's gradient norm at points between real and fake pulled to 1. The gradient is
        # taken with create_graph, so the loss's backward differentiates through it (double backward).
        between = (mix.view(-1, 1, 1, 1) * real + (1 - mix.view(-1, 1, 1, 1)) * fake).requires_grad_(True)
        scores = self.discriminator(torch.cat([real, fake, between]), torch.cat([label, label, label]))
        with _gathered_through_backward(self.discriminator):
            (grad,) = torch.autograd.grad(scores[2 * n :].sum(), between, create_graph=True)
        penalty = (grad.flatten(1).norm(dim=1) - 1).square()
        return (scores[n : 2 * n] - scores[:n] + self.cfg.gp_weight * penalty).mean()

    def init_tensor(self, name: str, tensor: torch.Tensor, generator: torch.Generator) -> None:
        """DCGAN's init: weights N(0, 0.02), biases 0, norm gains 1 (per class too), per-class shifts 0;
        spectral norm's u a random unit vector."""
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "u":
            tensor.copy_(F.normalize(torch.randn(tensor.shape, generator=generator, device=tensor.device), dim=0))
        elif leaf == "bias":
            tensor.zero_()
        elif name.endswith("class_gain.weight"):  # the group norm's identity to start, for every class
            tensor.fill_(1.0)
        elif name.endswith("class_shift.weight"):
            tensor.zero_()
        elif ".norm." in name:
            tensor.fill_(1.0)
        elif leaf == "weight":
            tensor.normal_(0.0, 0.02, generator=generator)
        else:
            raise KeyError(f"GAN.init_tensor does not know how to initialize {name!r}")
