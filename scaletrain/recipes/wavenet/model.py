"""WaveNet (van den Oord et al. 2016, arXiv:1609.03499) and its fast generation (Paine et al. 2016,
"Fast Wavenet Generation Algorithm", arXiv:1611.09482).

The waveform is a sequence of mu-law codes (`model.quantization_levels`, 256 in the paper). Each code goes in
through an embedding (the paper's 1x1 convolution of the one-hot input), shifted right by one sample, so that
the logits at position t see the inputs before t only. Then `cycles` x `layers_per_cycle` residual layers,
dilations 1, 2, 4, ..., 2^(layers_per_cycle-1) in each cycle, each:

    h    = dilated causal conv(x) + V[label]           (global conditioning, added to every gate)
    z    = tanh(h_filter) * sigmoid(h_gate)            (the gated activation)
    x   <- x + W_residual z                            (not in the last layer, whose residual goes nowhere)
    skip = W_skip z

and the head relu -> 1x1 conv -> relu -> 1x1 conv on the sum of the skips gives logits over the codes.
The output at t depends on the inputs t - R .. t - 1 with the receptive field
R = (kernel_size - 1) * cycles * (2^layers_per_cycle - 1) + 1.

Generation is sample by sample. `generate` keeps, per layer, a queue of that layer's last
(kernel_size - 1) * dilation inputs, so each new sample costs one output of each layer;
`generate_naive` recomputes the receptive field every step. Both draw the same uniforms and agree
token for token (tests/wavenet).

Shape legend: B batch, T time (samples), C residual channels, G gate channels, S skip channels,
Q quantization levels.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from scaletrain.config.schema import opt


@dataclass
class WaveNetConfig:
    num_classes: int = opt(12, "Classes of the global conditioning (the notes data's pitch classes: 12); 0 = none.")
    quantization_levels: int = opt(256, "Mu-law codes per sample: the softmax's width (256 = 8 bits, the paper's).")
    kernel_size: int = opt(2, "Taps of each dilated causal convolution.")
    layers_per_cycle: int = opt(8, "Residual layers per cycle, dilations 1, 2, 4, ..., 2^(n-1).")
    cycles: int = opt(2, "Cycles of dilations (the paper stacks several).")
    residual_channels: int = opt(32, "Width of the residual stream (and of the input embedding).")
    gate_channels: int = opt(32, "Width of the gated activation tanh(filter) * sigmoid(gate).")
    skip_channels: int = opt(64, "Width of the skip connections summed into the head.")
    head_channels: int = opt(64, "Width of the head's hidden 1x1 convolution.")
    temperature: float = opt(1.0, "Softmax temperature of the evaluation's generated clips.")


def receptive_field(cfg: WaveNetConfig) -> int:
    """Past samples an output depends on: each layer adds (kernel_size - 1) * dilation, the input shift one."""
    return (cfg.kernel_size - 1) * cfg.cycles * (2**cfg.layers_per_cycle - 1) + 1


class ActivationQueue:
    """One layer's last (kernel_size - 1) * dilation inputs in a ring buffer (Paine et al.'s queue): the inputs
    at t - (k-1)d, ..., t - d that its dilated convolution reads beside the new one. Starts at zero, as the
    causal padding does."""

    def __init__(self, batch: int, channels: int, kernel_size: int, dilation: int, like: torch.Tensor) -> None:
        self.length = (kernel_size - 1) * dilation
        self.buffer = like.new_zeros(batch, channels, self.length)
        self.offsets = torch.arange(kernel_size - 1, 0, -1, device=like.device) * dilation  # oldest first
        self.t = 0

    def taps(self) -> torch.Tensor:
        return self.buffer[:, :, (self.t - self.offsets) % self.length]

    def push(self, x_BC: torch.Tensor) -> None:
        self.buffer[:, :, self.t % self.length] = x_BC  # overwrites the input at t - length
        self.t += 1


def pointwise(conv: nn.Conv1d, x_BC: torch.Tensor) -> torch.Tensor:
    """A 1x1 convolution on one position: its weights as a linear map."""
    return F.linear(x_BC, conv.weight[:, :, 0], conv.bias)


class ResidualLayer(nn.Module):
    """Dilated causal conv, class bias, gated activation, residual and skip 1x1 convs (module doc)."""

    def __init__(self, cfg: WaveNetConfig, dilation: int, last: bool) -> None:
        super().__init__()
        self.dilation, self.kernel_size = dilation, cfg.kernel_size
        self.dilated = nn.Conv1d(cfg.residual_channels, 2 * cfg.gate_channels, cfg.kernel_size, dilation=dilation)
        # V^T h with h the one-hot class: a row per class, added to filter and gate alike.
        self.condition = nn.Embedding(cfg.num_classes, 2 * cfg.gate_channels) if cfg.num_classes else None
        self.skip = nn.Conv1d(cfg.gate_channels, cfg.skip_channels, 1)
        self.residual = None if last else nn.Conv1d(cfg.gate_channels, cfg.residual_channels, 1)

    def _gated(self, h_B2GT: torch.Tensor, label_B: torch.Tensor) -> torch.Tensor:
        if self.condition is not None:
            h_B2GT = h_B2GT + self.condition(label_B)[:, :, None]
        filt, gate = h_B2GT.chunk(2, dim=1)
        return torch.tanh(filt) * torch.sigmoid(gate)

    def forward(self, x_BCT: torch.Tensor, label_B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Every position at once: (next residual stream, skip)."""
        # Padding on the left only: output t reads inputs t - (k-1)d .. t, never a later one.
        h = self.dilated(F.pad(x_BCT, ((self.kernel_size - 1) * self.dilation, 0)))
        z = self._gated(h, label_B)
        x_next = x_BCT if self.residual is None else x_BCT + self.residual(z)
        return x_next, self.skip(z)

    def step(
        self, x_BC: torch.Tensor, label_B: torch.Tensor, queue: ActivationQueue
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One new position from the queue of earlier inputs: the same taps and weights as forward, as matrix
        products (a convolution call per sample costs far more than its arithmetic on a CPU)."""
        window = torch.cat([queue.taps(), x_BC[:, :, None]], dim=2)  # (B, C, k): inputs at t - (k-1)d, ..., t
        queue.push(x_BC)
        h = F.linear(window.flatten(1), self.dilated.weight.flatten(1), self.dilated.bias)
        z = self._gated(h[:, :, None], label_B)[:, :, 0]
        x_next = x_BC if self.residual is None else x_BC + pointwise(self.residual, z)
        return x_next, pointwise(self.skip, z)


class WaveNet(nn.Module):
    def __init__(self, cfg: WaveNetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.receptive_field = receptive_field(cfg)
        self.embed = nn.Embedding(cfg.quantization_levels, cfg.residual_channels)
        n = cfg.cycles * cfg.layers_per_cycle
        self.layers = nn.ModuleList(
            ResidualLayer(cfg, 2 ** (i % cfg.layers_per_cycle), last=i == n - 1) for i in range(n)
        )
        self.head_hidden = nn.Conv1d(cfg.skip_channels, cfg.head_channels, 1)
        self.head_out = nn.Conv1d(cfg.head_channels, cfg.quantization_levels, 1)

    def forward(self, codes_BT: torch.Tensor, label_B: torch.Tensor) -> torch.Tensor:
        """Logits (B, Q, T): position t is the distribution of codes[t] given codes[< t] (teacher forcing)."""
        return self.predict(self.embed(codes_BT).transpose(1, 2), label_B)

    def predict(self, x_BCT: torch.Tensor, label_B: torch.Tensor) -> torch.Tensor:
        """Logits from the embedded inputs; the shift right makes position t see inputs before t only."""
        x = F.pad(x_BCT, (1, 0))[:, :, :-1]
        skips = 0
        for layer in self.layers:
            x, skip = layer(x, label_B)
            skips = skips + skip
        return self.head_out(F.relu(self.head_hidden(F.relu(skips))))

    def head_step(self, skips_BS: torch.Tensor) -> torch.Tensor:
        """The head on one position: logits (B, Q)."""
        return pointwise(self.head_out, F.relu(pointwise(self.head_hidden, F.relu(skips_BS))))

    def init_tensor(self, name: str, tensor: torch.Tensor, generator: torch.Generator) -> None:
        """Convolutions: torch's default U(-1/sqrt(fan_in), 1/sqrt(fan_in)), weights and biases. The input
        embedding: N(0, 1) (nn.Embedding's default). The class rows: as a linear map from the one-hot class
        (fan_in = num_classes), which they are."""
        module_name, _ = name.rsplit(".", 1)
        module = self.get_submodule(module_name)
        if isinstance(module, nn.Conv1d):
            fan_in = module.in_channels * module.kernel_size[0]
            tensor.uniform_(-1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in), generator=generator)
        elif module is self.embed:
            tensor.normal_(0.0, 1.0, generator=generator)
        elif isinstance(module, nn.Embedding):
            bound = 1 / math.sqrt(module.num_embeddings)
            tensor.uniform_(-bound, bound, generator=generator)
        else:
            raise KeyError(f"WaveNet.init_tensor does not know how to initialize {name!r}")


def sample_codes(logits_BQ: torch.Tensor, temperature: float, generator: torch.Generator) -> torch.Tensor:
    """One draw per row from softmax(logits / temperature) by inverting its CDF at a uniform. The uniforms
    come from `generator` on the CPU, one per row and step, so the draws depend on neither the device nor
    the path (fast or naive)."""
    uniform_B1 = torch.rand(logits_BQ.shape[0], 1, generator=generator, dtype=torch.float64)
    cdf_BQ = torch.softmax(logits_BQ.double() / temperature, dim=1).cumsum(dim=1)
    code = torch.searchsorted(cdf_BQ, uniform_B1.to(cdf_BQ.device) * cdf_BQ[:, -1:])
    return code[:, 0].clamp_max(logits_BQ.shape[1] - 1)


@contextlib.contextmanager
def one_cpu_thread(device: torch.device) -> Iterator[None]:
    """Sample-by-sample steps are many tiny ops: on a CPU, intra-op threads only add synchronization
    (measured 11 ms a step with 2 threads on a busy 2-core machine, 3 ms with one)."""
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@torch.no_grad()
def generate(
    model: WaveNet, label_B: torch.Tensor, steps: int, temperature: float, generator: torch.Generator
) -> torch.Tensor:
    """Codes (B, steps), one sample at a time through the layers' activation queues (Paine et al.)."""
    cfg = model.cfg
    B = label_B.shape[0]
    x = model.embed.weight.new_zeros(B, cfg.residual_channels)  # position 0's input: the shift's zero
    queues = [ActivationQueue(B, cfg.residual_channels, cfg.kernel_size, layer.dilation, x) for layer in model.layers]
    codes = []
    with one_cpu_thread(x.device):
        for _ in range(steps):
            h, skips = x, 0
            for layer, queue in zip(model.layers, queues, strict=True):
                h, skip = layer.step(h, label_B, queue)
                skips = skips + skip
            code = sample_codes(model.head_step(skips), temperature, generator)
            codes.append(code)
            x = model.embed(code)
    return torch.stack(codes, dim=1)


@torch.no_grad()
def generate_naive(
    model: WaveNet, label_B: torch.Tensor, steps: int, temperature: float, generator: torch.Generator
) -> torch.Tensor:
    """The reference for `generate`: each step runs the full model over the last receptive_field codes."""
    device = model.embed.weight.device
    codes = torch.zeros(label_B.shape[0], 0, dtype=torch.int64, device=device)
    unseen = torch.zeros(label_B.shape[0], 1, dtype=torch.int64, device=device)  # position t's own input
    with one_cpu_thread(device):
        for t in range(steps):
            window = codes[:, max(0, t - model.receptive_field) :]
            logits = model(torch.cat([window, unseen], dim=1), label_B)[:, :, -1]
            codes = torch.cat([codes, sample_codes(logits, temperature, generator)[:, None]], dim=1)
    return codes
