"""The autoencoder family beside latent diffusion's KL-VAE: beta-VAE, VQ-VAE and the denoising autoencoder,
on the KL-VAE's convolutional encoder and decoder (scaletrain/recipes/diffusion/vae.py).

beta-VAE (Higgins et al. 2017): loss per sample = (||x - x'||^2 / (2 sigma^2) + beta_t * KL) / pixels, with
  beta_t annealed linearly from 0 over kl_anneal_steps optimizer steps (KL annealing, Bowman et al. 2016) and
  free bits (Kingma et al. 2016): each latent dimension's KL counts as at least free_bits nats, so the
  optimizer gains nothing by pushing it to 0 (posterior collapse). Free bits act per sample, so the loss
  does not depend on how the batch is split over ranks.
VQ-VAE (van den Oord et al. 2017): the encoder's vectors snap to their nearest codebook entry (straight-
  through gradient), commitment loss beta ||z_e - sg(e)||^2; the codebook follows exponential moving
  averages of the vectors assigned to it (not gradients), with Laplace smoothing, and codes whose average
  use falls below dead_code_threshold restart by splitting the busiest clusters.
Denoising autoencoder (Vincent et al. 2008): reconstruct the clean image from one with Gaussian noise added.

State that gradients do not train (the codebook, the step count behind beta_t) changes once per optimizer
step, in `after_step`, from counts and sums over the whole global batch (summed over the data-parallel
ranks): every layout computes the same update. The per-step sums are plain attributes, not buffers, since
DDP broadcasts buffers from rank 0 at every forward.

Shape legend: B batch, C image channels, Z latent channels, h/w latent height/width, K codebook size.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from scaletrain.config.schema import opt
from scaletrain.recipes.diffusion.vae import Block, Decoder, Encoder, KLAutoencoder, VAEConfig


@dataclass
class AutoencoderConfig(VAEConfig):
    kind: Literal["beta-vae", "vq-vae", "denoising"] = opt("vq-vae", "Which autoencoder (see the module doc).")
    beta: float = opt(1.0, "beta-VAE: weight of the KL (1 = a plain VAE); VQ-VAE: the commitment weight (0.25).")
    kl_anneal_steps: int = opt(0, "beta-VAE: optimizer steps over which beta rises linearly from 0 (0 = none).")
    free_bits: float = opt(0.0, "beta-VAE: nats each latent dimension's KL counts as at least (0 = off).")
    recon_std: float = opt(0.1, "beta-VAE: sigma of the Gaussian decoder likelihood.")
    codebook_size: int = opt(64, "VQ-VAE: codebook entries K.")
    codebook_decay: float = opt(0.99, "VQ-VAE: decay of the codebook's moving averages.")
    dead_code_threshold: float = opt(
        1.0, "VQ-VAE: restart a code whose moving average of vectors assigned per step falls below this."
    )
    noise_std: float = opt(0.2, "Denoising: std of the Gaussian noise added to the input images (in [-1, 1] units).")


def _is_training_step(module: nn.Module, tensor: torch.Tensor) -> bool:
    """Whether this forward feeds an optimizer step: not evaluation, and not the FLOP count on meta tensors."""
    return module.training and torch.is_grad_enabled() and not tensor.is_meta


class VectorQuantizer(nn.Module):
    """Nearest-codebook quantization with an EMA-updated codebook (see the module doc)."""

    def __init__(self, codes: int, dim: int, decay: float, dead_threshold: float) -> None:
        super().__init__()
        self.decay, self.dead_threshold = decay, dead_threshold
        self.register_buffer("embedding", torch.empty(codes, dim))
        self.register_buffer("cluster_size", torch.empty(codes))
        self.register_buffer("embed_sum", torch.empty(codes, dim))
        self.register_buffer("updates", torch.empty((), dtype=torch.int64))
        self._counts: torch.Tensor | None = None  # this step's assignments, summed over micro-batches
        self._sums: torch.Tensor | None = None

    def forward(self, z_BZhw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(quantized z with straight-through gradient, commitment term ||z_e - sg(e)||^2 per sample)."""
        B, Z, h, w = z_BZhw.shape
        flat = z_BZhw.permute(0, 2, 3, 1).reshape(-1, Z).float()
        distance = flat.square().sum(1, keepdim=True) - 2 * flat @ self.embedding.t() + self.embedding.square().sum(1)
        codes = distance.argmin(1)
        quantized = self.embedding[codes]
        if _is_training_step(self, flat):
            one_hot = F.one_hot(codes, self.embedding.shape[0]).float()
            counts, sums = one_hot.sum(0), one_hot.t() @ flat.detach()
            self._counts = counts if self._counts is None else self._counts + counts
            self._sums = sums if self._sums is None else self._sums + sums
        commitment = (flat - quantized).square().reshape(B, -1).mean(1)
        straight_through = flat + (quantized - flat).detach()
        return straight_through.reshape(B, h, w, Z).permute(0, 3, 1, 2).to(z_BZhw.dtype), commitment

    @torch.no_grad()
    def update(self, group: dist.ProcessGroup | None) -> dict[str, float]:
        """After an optimizer step: the codebook's moving averages from the step's global counts and sums."""
        if self._counts is None:
            return {}
        counts, sums = self._counts, self._sums
        self._counts = self._sums = None
        if group is not None:
            dist.all_reduce(counts, group=group)
            dist.all_reduce(sums, group=group)
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.embed_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        total, k = self.cluster_size.sum(), self.cluster_size.numel()
        smoothed = (self.cluster_size + 1e-5) / (total + k * 1e-5) * total  # Laplace: no division by 0
        self.embedding.copy_(self.embed_sum / smoothed[:, None])
        self.updates.add_(1)
        dead = self.cluster_size < self.dead_threshold
        if dead.any():
            # Split the busiest clusters (as LBG's k-means splitting does): each dead code restarts at the
            # centroid of a used code, in order of use, plus a seeded nudge a tenth of the vectors' spread, so
            # the two share that cluster. From the global sums: the same on every rank, for every layout.
            used = int((counts > 0).sum())
            donors = counts.argsort(descending=True)[torch.arange(int(dead.sum())) % max(1, used)]
            centroids = sums[donors] / counts[donors, None].clamp_min(1)
            mean = sums.sum(0) / counts.sum().clamp_min(1)
            spread = (sums.square().sum() / counts.sum().clamp_min(1) - mean.square().sum()).clamp_min(1e-8).sqrt()
            nudge = torch.randn(centroids.shape, generator=torch.Generator().manual_seed(int(self.updates)))
            fresh = centroids + nudge.to(centroids.device) * 0.1 * spread / math.sqrt(mean.numel())
            self.embedding[dead] = fresh
            self.embed_sum[dead] = fresh
            self.cluster_size[dead] = 1.0
        usage = counts / counts.sum().clamp_min(1)
        entropy = -(usage * usage.clamp_min(1e-12).log()).sum()
        return {
            "codebook_perplexity": entropy.exp().item(),
            "codebook_used": float((counts > 0).float().mean()),
            "codebook_restarted": float(dead.sum()),
        }


class Autoencoder(nn.Module):
    def __init__(self, cfg: AutoencoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)  # 2Z outputs: (mean, log-variance) for the beta-VAE; z is the first Z else
        self.decoder = Decoder(cfg)
        self.quantizer = (
            VectorQuantizer(cfg.codebook_size, cfg.latent_channels, cfg.codebook_decay, cfg.dead_code_threshold)
            if cfg.kind == "vq-vae"
            else None
        )
        self.register_buffer("steps_done", torch.empty((), dtype=torch.int64))  # beta_t's clock
        self._kl_sum: torch.Tensor | None = None  # per latent dimension, summed over this step's samples
        self._samples = 0

    def beta_now(self) -> torch.Tensor:
        """beta_t: a tensor op on the step count (no .item(): FLOPs are counted on the meta device)."""
        anneal = self.cfg.kl_anneal_steps
        if not anneal:
            return torch.full((), self.cfg.beta, device=self.steps_done.device)
        return self.cfg.beta * (self.steps_done.float() / anneal).clamp(max=1.0)

    def forward(self, image: torch.Tensor, noise: torch.Tensor, mode: str = "loss") -> torch.Tensor:
        """mode loss: the mean training loss; reconstruct: the decoded images (mean latent, no noise);
        decode: images from latents `noise` (beta-VAE prior samples)."""
        cfg = self.cfg
        if mode == "decode":
            return self.decoder(noise)
        source = image + cfg.noise_std * noise if cfg.kind == "denoising" and mode == "loss" else image
        mean, logvar = self.encoder(source).chunk(2, dim=1)
        if cfg.kind == "beta-vae":
            logvar = logvar.clamp(-30.0, 20.0)
            z = mean + torch.exp(0.5 * logvar) * noise if mode == "loss" else mean
        elif cfg.kind == "vq-vae":
            z, commitment = self.quantizer(mean)
        else:
            z = mean
        recon = self.decoder(z)
        if mode == "reconstruct":
            return recon
        error = (recon.float() - image.float()).square().flatten(1)
        if cfg.kind == "vq-vae":
            return (error.mean(1) + cfg.beta * commitment).mean()
        if cfg.kind == "denoising":
            return error.mean()
        kl = 0.5 * (mean.float().square() + logvar.float().exp() - 1.0 - logvar.float()).flatten(1)  # [B, dims]
        if _is_training_step(self, kl):
            self._kl_sum = kl.detach().sum(0) if self._kl_sum is None else self._kl_sum + kl.detach().sum(0)
            self._samples += kl.shape[0]
        kl_counted = kl.clamp_min(cfg.free_bits) if cfg.free_bits > 0 else kl
        nll = error.sum(1) / (2 * cfg.recon_std**2)
        return ((nll + self.beta_now() * kl_counted.sum(1)) / error.shape[1]).mean()

    @torch.no_grad()
    def after_step(self, group: dist.ProcessGroup | None) -> dict[str, float]:
        metrics: dict[str, float] = {}
        if self.quantizer is not None:
            metrics.update(self.quantizer.update(group))
        if self._kl_sum is not None:
            kl, samples = self._kl_sum, torch.tensor(float(self._samples), device=self._kl_sum.device)
            self._kl_sum, self._samples = None, 0
            if group is not None:
                dist.all_reduce(kl, group=group)
                dist.all_reduce(samples, group=group)
            per_dim = kl / samples
            metrics.update(kl_per_dim=per_dim.mean().item(), active_dims=float((per_dim > 0.01).float().mean()),
                           beta=float(self.beta_now()))  # fmt: skip
        self.steps_done.add_(1)
        return metrics

    def fsdp_blocks(self) -> list[nn.Module]:
        return [m for m in (*self.encoder.layers, *self.decoder.layers) if isinstance(m, Block)]

    @torch.no_grad()
    def init_tensor(self, name: str, tensor: torch.Tensor, generator: torch.Generator) -> None:
        if name.startswith("quantizer."):
            leaf = name.rsplit(".", 1)[-1]
            if leaf in ("embedding", "embed_sum"):  # the same random codebook for both: sum = embedding x size 1
                codebook = torch.Generator().manual_seed(zlib.crc32(b"codebook"))
                tensor.copy_(torch.randn(tensor.shape, generator=codebook))
            elif leaf == "cluster_size":
                tensor.fill_(1.0)
            else:
                tensor.zero_()
        elif name == "steps_done":
            tensor.zero_()
        else:
            KLAutoencoder.init_tensor(self, name, tensor, generator)  # the KL-VAE's conv init, by name
