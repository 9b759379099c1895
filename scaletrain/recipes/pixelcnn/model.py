"""Gated PixelCNN (van den Oord et al. 2016, "Conditional Image Generation with PixelCNN Decoders").

An autoregressive image model: p(x) = prod over sub-pixels in raster order (row, column, then channel) of
p(x_i | x_<i). Causality comes from the shapes of the convolutions, not from a mask over a square kernel:

  vertical stack    kernel (k//2 + 1) x k, padded on top: row r sees rows <= r (every column in reach).
                    It reaches the horizontal stack only shifted down one row (rows < r), so it may see
                    the whole of row r itself, future pixels included.
  horizontal stack  kernel 1 x (k//2 + 1), padded on the left: pixel (r, c) sees columns <= c of row r.
                    The one tap on the current pixel is masked over colour channels (below).

Together they see every pixel above and to the left, including the ones up and to the right that a stack of
masked k x k convolutions never reaches (its "blind spot").

Channels within a pixel (`softmax` output, as in PixelCNN): every feature map is split into one group per
colour channel (R, G, B), and the current-pixel tap connects input group g to output group g' only if
g < g' (mask A, the first layer: R's prediction never sees R) or g <= g' (mask B, every later layer).
The 256-way (2^n_bits-way) logits of channel c are computed from group c, so they see R..c-1 of the current
pixel and nothing after. The `logistic_mixture` output (Salimans et al. 2017, PixelCNN++) instead predicts
the whole pixel from one group (mask A hides all of the current pixel): a mixture of discretized logistics
shared by the channels, with G's mean linear in R and B's in R and G.

Each gated layer: y = tanh(W_f * x + V_f e) * sigmoid(W_g * x + V_g e), e the learned class embedding,
with a residual connection around the horizontal stack (the first layer, mask A, has none).

Loss: bits per dimension of the images quantized to n_bits, -log2 p(x) / (C*H*W); the uniform
distribution scores n_bits. The network's input is the quantized image rescaled to [-1, 1].

Shape legend: B batch, C image channels, H/W height/width, K = 2^n_bits levels, M mixture components.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from scaletrain.config.schema import opt


@dataclass
class PixelCNNConfig:
    image_size: int = opt(16, "Image side (small: sampling takes one forward pass per sub-pixel).")
    in_channels: int = opt(3, "Image channels (3 for the shapes data set; 1 for a grayscale folder).")
    n_bits: int = opt(4, "Bits per colour value the images are quantized to (1..8); the uniform baseline.")
    hidden: int = opt(48, "Feature maps per stack; split into one group per colour channel for softmax.")
    n_layers: int = opt(6, "Gated layers (the first with mask A and kernel first_kernel_size).")
    kernel_size: int = opt(3, "Kernel size k of the gated layers after the first (odd).")
    first_kernel_size: int = opt(7, "Kernel size of the first gated layer (odd).")
    num_classes: int = opt(6, "Classes for conditioning (a learned embedding in every gate); 0 = unconditional.")
    output: Literal["softmax", "logistic_mixture"] = opt(
        "softmax",
        "softmax = a 2^n_bits-way softmax per sub-pixel, channels autoregressive within a pixel (PixelCNN); "
        "logistic_mixture = a discretized logistic mixture per pixel (PixelCNN++).",
    )
    n_mixtures: int = opt(5, "Mixture components for output=logistic_mixture.")
    temperature: float = opt(1.0, "Sampling temperature of the eval grid (softmax logits / T; logistic scales * T).")
    eval_grid: int = opt(12, "Images the evaluation samples for its grid (one forward pass per sub-pixel).")


def channel_groups(cfg: PixelCNNConfig) -> int:
    """Colour groups the features split into: one per channel for softmax, one in all for the mixture."""
    return cfg.in_channels if cfg.output == "softmax" else 1


def group_of(n: int, groups: int) -> list[int]:
    """Group of each of n feature maps: contiguous, near-equal blocks. (Plain ints: the model is built on the
    meta device, and masks are computed from these at init.)"""
    return [i * groups // n for i in range(n)]


def at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    """The likelihood in fp32 under bf16 training; float64 stays float64 (the tests' exact sums)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def down_shift(x_BCHW: torch.Tensor) -> torch.Tensor:
    """Row r gets row r - 1 (zeros in row 0): the vertical stack's view reduced to rows strictly above."""
    return F.pad(x_BCHW, (0, 0, 1, 0))[:, :, :-1]


class CausalConv2d(nn.Module):
    """A convolution padded on the sides it may see (F.pad order: left, right, top, bottom). With a mask
    type, its bottom-right tap (the current pixel) connects input group g to output group g' only where
    g < g' (A) or g <= g' (B); every other tap is a pixel already generated and connects all channels."""

    def __init__(self, in_channels: int, out_channels: int, kernel: tuple[int, int],
                 padding: tuple[int, int, int, int] = (0, 0, 0, 0), mask_type: Literal["A", "B"] | None = None,
                 in_groups: list[int] | None = None, out_groups: list[int] | None = None) -> None:  # fmt: skip
        super().__init__()
        self.padding, self.mask_type = padding, mask_type
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, *kernel))
        self.bias = nn.Parameter(torch.empty(out_channels))
        if mask_type is not None:
            assert in_groups is not None and out_groups is not None
            self.in_groups, self.out_groups = in_groups, out_groups
            # Derived from the config: not persistent, so checkpoints do not carry it.
            self.register_buffer("mask", torch.empty(self.weight.shape, dtype=torch.bool), persistent=False)

    def mask_values(self) -> torch.Tensor:
        mask = torch.ones(self.weight.shape, dtype=torch.bool)
        in_groups, out_groups = torch.tensor(self.in_groups), torch.tensor(self.out_groups)
        earlier = in_groups[None, :] < out_groups[:, None]
        same = in_groups[None, :] == out_groups[:, None]
        mask[:, :, -1, -1] = earlier | same if self.mask_type == "B" else earlier
        return mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight * self.mask if self.mask_type is not None else self.weight
        return F.conv2d(F.pad(x, self.padding), weight, self.bias)


def gate(x: torch.Tensor) -> torch.Tensor:
    """tanh(first half) * sigmoid(second half) over channels; both halves carry the same groups."""
    a, b = x.chunk(2, dim=1)
    return torch.tanh(a) * torch.sigmoid(b)


class GatedLayer(nn.Module):
    """One layer of both stacks (the paper's Figure 2): (v, h, label) -> (v, h)."""

    def __init__(self, cfg: PixelCNNConfig, first: bool) -> None:
        super().__init__()
        k = cfg.first_kernel_size if first else cfg.kernel_size
        p, groups = cfg.hidden, channel_groups(cfg)
        c_in = cfg.in_channels if first else p
        in_groups = group_of(c_in, groups)
        features = group_of(p, groups)
        gates = features * 2  # the two halves of the gate's input
        self.residual = not first
        self.vertical = CausalConv2d(c_in, 2 * p, (k // 2 + 1, k), (k // 2, k // 2, k // 2, 0))
        self.horizontal = CausalConv2d(c_in, 2 * p, (1, k // 2 + 1), (k // 2, 0, 0, 0), "A" if first else "B",
                                       in_groups, gates)  # fmt: skip
        self.vertical_to_horizontal = nn.Conv2d(2 * p, 2 * p, 1)  # rows above: no channel mask needed
        self.horizontal_out = CausalConv2d(p, p, (1, 1), mask_type="B", in_groups=features, out_groups=features)
        self.class_embedding = nn.Embedding(cfg.num_classes, 2 * p) if cfg.num_classes else None

    def forward(self, v: torch.Tensor, h: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        v_pre = self.vertical(v)
        h_pre = self.horizontal(h) + self.vertical_to_horizontal(down_shift(v_pre))
        if self.class_embedding is not None:
            bias = self.class_embedding(label)[:, :, None, None]
            v_pre, h_pre = v_pre + bias, h_pre + bias
        h_out = self.horizontal_out(gate(h_pre))
        return gate(v_pre), h + h_out if self.residual else h_out


def head_channels(cfg: PixelCNNConfig) -> int:
    """Softmax: K logits per channel. Mixture, per component: a logit, C means, C log-scales and one
    coefficient per channel pair (G on R; B on R and G)."""
    C, M = cfg.in_channels, cfg.n_mixtures
    if cfg.output == "softmax":
        return C * 2**cfg.n_bits
    return M * (1 + 2 * C + C * (C - 1) // 2)


def quantize(image: torch.Tensor, n_bits: int) -> torch.Tensor:
    """Images in [-1, 1] -> integer levels 0..K-1 (as floats)."""
    levels = 2**n_bits
    return torch.floor((image + 1) / 2 * levels).clamp(0, levels - 1)


def levels_to_image(levels: torch.Tensor, n_bits: int) -> torch.Tensor:
    """Levels -> [-1, 1], 0 -> -1 and K-1 -> 1: the network's input, and what samples look like.
    quantize(levels_to_image(k)) == k."""
    return levels * (2 / (2**n_bits - 1)) - 1


def split_mixture(raw: torch.Tensor, cfg: PixelCNNConfig) -> tuple[torch.Tensor, ...]:
    """Head output -> (logits B,M,H,W; means B,C,M,H,W; log-scales B,C,M,H,W; coefficients B,P,M,H,W)."""
    B, _, H, W = raw.shape
    C, M = cfg.in_channels, cfg.n_mixtures
    logits, means, log_scales, coeffs = raw.split([M, C * M, C * M, C * (C - 1) // 2 * M], dim=1)

    def per_channel(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(B, -1, M, H, W)

    return logits, per_channel(means), per_channel(log_scales).clamp(min=-7.0), torch.tanh(per_channel(coeffs))


def adjusted_mean(means: torch.Tensor, coeffs: torch.Tensor, x: torch.Tensor, c: int) -> torch.Tensor:
    """Channel c's component means, moved linearly by the channels before it: mu_c + sum_j a_cj x_j.
    means (B,C,M,H,W), coeffs (B,P,M,H,W) in pair order (1,0), (2,0), (2,1), ...; x (B,C,H,W)."""
    mean = means[:, c]
    for j in range(c):
        mean = mean + coeffs[:, c * (c - 1) // 2 + j] * x[:, j, None]
    return mean


class PixelCNN(nn.Module):
    def __init__(self, cfg: PixelCNNConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.layers = nn.ModuleList([GatedLayer(cfg, first=index == 0) for index in range(cfg.n_layers)])
        p, groups = cfg.hidden, channel_groups(cfg)
        features = group_of(p, groups)
        out = head_channels(cfg)
        # softmax: channel c's K logits read group c; the mixture: one group
        out_groups = [o // 2**cfg.n_bits if cfg.output == "softmax" else 0 for o in range(out)]
        self.head_hidden = CausalConv2d(p, p, (1, 1), mask_type="B", in_groups=features, out_groups=features)
        self.head_out = CausalConv2d(p, out, (1, 1), mask_type="B", in_groups=features, out_groups=out_groups)

    def head(self, x_BCHW: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """Network input in [-1, 1] -> the output head (B, head_channels, H, W)."""
        v = h = x_BCHW
        for layer in self.layers:
            v, h = layer(v, h, label)
        return self.head_out(F.relu(self.head_hidden(F.relu(h))))

    def subpixel_outputs(self, x_BCHW: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """What the model predicts for each sub-pixel, (B, C, F, H, W): softmax logits (F = K), or the
        mixture's logits, adjusted means and log-scales (F = 3M). Sub-pixel (c, r, w) may depend on the input
        before it in raster-then-channel order only (the causality test differentiates this)."""
        raw = at_least_fp32(self.head(x_BCHW, label))
        B, _, H, W = raw.shape
        C = self.cfg.in_channels
        if self.cfg.output == "softmax":
            return raw.view(B, C, -1, H, W)
        logits, means, log_scales, coeffs = split_mixture(raw, self.cfg)
        x = at_least_fp32(x_BCHW)
        per_channel = [torch.cat([logits, adjusted_mean(means, coeffs, x, c), log_scales[:, c]], dim=1)
                       for c in range(C)]  # fmt: skip
        return torch.stack(per_channel, dim=1)

    def discretized_logistic_log_prob(
        self, x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor
    ) -> torch.Tensor:
        """log P(level) of a logistic(mean, exp(log_scale)) over the bin [x - d, x + d], d = 1/(K-1), with the
        lowest and highest bins open to -inf and +inf (Salimans et al. 2017). Computed as
        log(sigmoid(a) - sigmoid(b)) = logsigmoid(a) + log(1 - exp(logsigmoid(b) - logsigmoid(a))), mirrored
        when the bin lies above the mean, so neither tail loses precision."""
        half = 1.0 / (2**self.cfg.n_bits - 1)
        inv_scale = torch.exp(-log_scale)
        upper, lower = (x - mean + half) * inv_scale, (x - mean - half) * inv_scale
        above = (upper + lower) > 0  # the bin's centre is above the mean: use 1 - cdf, i.e. the mirror
        a, b = torch.where(above, -lower, upper), torch.where(above, -upper, lower)
        log_a, log_b = F.logsigmoid(a), F.logsigmoid(b)
        middle = log_a + torch.log(-torch.expm1((log_b - log_a).clamp(max=-1e-12)))
        lowest, highest = x < -1 + half, x > 1 - half
        return torch.where(lowest, F.logsigmoid(upper), torch.where(highest, F.logsigmoid(-lower), middle))

    def bits_per_dim(self, levels: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """Per sample: -log2 p(levels) / (C*H*W)."""
        x = levels_to_image(levels, self.cfg.n_bits)
        dims = levels[0].numel()
        if self.cfg.output == "softmax":
            logits = self.subpixel_outputs(x, label)  # (B, C, K, H, W)
            nll = F.cross_entropy(logits.transpose(1, 2), levels.long(), reduction="none").flatten(1).sum(1)
            return nll / (dims * math.log(2))
        logits, means, log_scales, coeffs = split_mixture(at_least_fp32(self.head(x, label)), self.cfg)
        x = at_least_fp32(x)
        log_prob = F.log_softmax(logits, dim=1)  # (B, M, H, W): the component, shared by the pixel's channels
        for c in range(self.cfg.in_channels):
            mean = adjusted_mean(means, coeffs, x, c)
            log_prob = log_prob + self.discretized_logistic_log_prob(x[:, c, None], mean, log_scales[:, c])
        nll = -torch.logsumexp(log_prob, dim=1).flatten(1).sum(1)
        return nll / (dims * math.log(2))

    def forward(self, image: torch.Tensor, label: torch.Tensor, mode: str = "loss") -> torch.Tensor:
        """mode loss: mean bits/dim of the quantized images; bits: per sample; head: the raw output head on the
        quantized image (what sampling reads)."""
        levels = quantize(image, self.cfg.n_bits)
        if mode == "head":
            return self.head(levels_to_image(levels, self.cfg.n_bits), label)
        bits = self.bits_per_dim(levels, label)
        return bits if mode == "bits" else bits.mean()

    def init_tensor(self, name: str, tensor: torch.Tensor, generator: torch.Generator) -> None:
        """Convolutions: torch's default bounds (uniform +-1/sqrt(fan_in)), the last one zero so training
        starts from the uniform distribution (softmax: exactly n_bits bits/dim); masks from the config;
        class embeddings N(0, 1) like nn.Embedding."""
        module_name, leaf = name.rsplit(".", 1)
        module = self.get_submodule(module_name)
        if leaf == "mask":
            tensor.copy_(module.mask_values())
        elif module_name == "head_out":
            tensor.zero_()
        elif isinstance(module, nn.Embedding):
            tensor.normal_(0.0, 1.0, generator=generator)
        elif isinstance(module, (CausalConv2d, nn.Conv2d)):
            bound = 1.0 / math.sqrt(module.weight[0].numel())
            tensor.uniform_(-bound, bound, generator=generator)
        else:
            raise KeyError(f"PixelCNN.init_tensor does not know how to initialize {name!r}")
