"""DiT: a transformer denoiser on image patches with adaLN-Zero conditioning (Peebles & Xie 2023).

A plain nn.Module with no parallel code (scaletrain/recipes/diffusion/parallelize.py adds that). Built on
the meta device; `init_tensor` fills every parameter and buffer by name, so the weights do
not depend on the layout (see scaletrain/parallel/init.py).

Conditioning: c = MLP(sinusoidal(t)) + class_embedding(y). Each block regresses from c a
shift, scale and gate for its attention and MLP branches ("adaLN"); the regressors start at
zero ("-Zero"), so every block starts as the identity and the model starts by predicting 0.
Patchify is a reshape plus a Linear (equal to a stride-p conv, and plain to tensor-parallel).

Shape legend: B batch, C channels, H/W image height/width, p patch side, N tokens
(H/p * W/p), D width, E head dim, F MLP hidden width.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from scaletrain import ops
from scaletrain.recipes.diffusion.config import DiTConfig


def timestep_features(t_B: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features of (possibly fractional) timesteps, [B, dim], as in the Transformer."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t_B.device) / half)
    angles = t_B.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


def sincos_pos_embed(dim: int, grid: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position table [grid*grid, dim]: half the channels encode rows, half columns."""
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    coords = torch.arange(grid, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")

    def encode(pos: torch.Tensor) -> torch.Tensor:
        angles = pos.reshape(-1, 1) * omega[None]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    table = torch.cat([encode(rows), encode(cols)], dim=1)
    return F.pad(table, (0, dim - table.shape[1]))  # dim not divisible by 4: zero tail


class TimestepEmbedder(nn.Module):
    def __init__(self, dim: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.fc1 = nn.Linear(freq_dim, dim)
        self.fc2 = nn.Linear(dim, dim)

    def forward(self, t_B: torch.Tensor) -> torch.Tensor:
        features = timestep_features(t_B, self.freq_dim).to(self.fc1.weight.dtype)
        return self.fc2(F.silu(self.fc1(features)))


class Attention(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.head_dim = cfg.dim // cfg.n_heads
        # Every token attends to every token (no mask), by model.attention (scaletrain.ops).
        self.attention_fn = ops.attention_fn(cfg.attention, causal=False)
        # Separate q/k/v projections: each can be split column-wise by tensor parallel
        # without interleaving (a fused qkv would need a permuted layout).
        self.wq = nn.Linear(cfg.dim, cfg.dim)
        self.wk = nn.Linear(cfg.dim, cfg.dim)
        self.wv = nn.Linear(cfg.dim, cfg.dim)
        self.wo = nn.Linear(cfg.dim, cfg.dim)

    def forward(self, x_BND: torch.Tensor) -> torch.Tensor:
        B, N, _ = x_BND.shape
        # -1 heads: under tensor parallel each rank holds n_heads / tp of them.
        q, k, v = (w(x_BND).view(B, N, -1, self.head_dim).transpose(1, 2) for w in (self.wq, self.wk, self.wv))
        out = self.attention_fn(q, k, v)
        return self.wo(out.transpose(1, 2).reshape(B, N, -1))


class MLP(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.dim, cfg.hidden_dim)
        self.fc2 = nn.Linear(cfg.hidden_dim, cfg.dim)

    def forward(self, x_BND: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x_BND), approximate="tanh"))


def modulate(x_BND: torch.Tensor, shift_BD: torch.Tensor, scale_BD: torch.Tensor) -> torch.Tensor:
    """adaLN's modulation of normalized tokens (what AdaLayerNorm computes after its LayerNorm)."""
    return x_BND * (1 + scale_BD[:, None]) + shift_BD[:, None]


class AdaLayerNorm(nn.Module):
    """modulate(LayerNorm(x), shift, scale): a LayerNorm without affine parameters (adaLN supplies the scale and
    shift) followed by the modulation, through ops.layer_norm_modulate. Unfused that is F.layer_norm and then
    `modulate`, exactly what nn.LayerNorm(elementwise_affine=False) + modulate ran; with model.fused_norm both
    are one Triton kernel (scaletrain/kernels/layer_norm.py). No parameters or buffers, so checkpoints are unchanged."""

    def __init__(self, eps: float = 1e-6, fused: bool = False):
        super().__init__()
        self.eps, self.fused = eps, fused

    def forward(self, x_BND: torch.Tensor, shift_BD: torch.Tensor, scale_BD: torch.Tensor) -> torch.Tensor:
        return ops.layer_norm_modulate(x_BND, shift_BD, scale_BD, self.eps, fused=self.fused)

    def extra_repr(self) -> str:
        return f"eps={self.eps}, fused={self.fused}"


class DiTBlock(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.norm1 = AdaLayerNorm(eps=1e-6, fused=cfg.fused_norm)
        self.attention = Attention(cfg)
        self.norm2 = AdaLayerNorm(eps=1e-6, fused=cfg.fused_norm)
        self.mlp = MLP(cfg)
        self.adaln = nn.Linear(cfg.dim, 6 * cfg.dim)

    def forward(self, x_BND: torch.Tensor, c_BD: torch.Tensor) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaln(F.silu(c_BD)).chunk(6, dim=-1)
        x_BND = x_BND + gate1[:, None] * self.attention(self.norm1(x_BND, shift1, scale1))
        return x_BND + gate2[:, None] * self.mlp(self.norm2(x_BND, shift2, scale2))


class FinalLayer(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.norm = AdaLayerNorm(eps=1e-6, fused=cfg.fused_norm)
        self.adaln = nn.Linear(cfg.dim, 2 * cfg.dim)
        self.linear = nn.Linear(cfg.dim, cfg.patch_size**2 * cfg.in_channels)

    def forward(self, x_BND: torch.Tensor, c_BD: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaln(F.silu(c_BD)).chunk(2, dim=-1)
        return self.linear(self.norm(x_BND, shift, scale))


class DiT(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.cfg = cfg
        p, C = cfg.patch_size, cfg.in_channels
        self.grid = cfg.image_size // p
        self.patch_embed = nn.Linear(p * p * C, cfg.dim)
        self.t_embedder = TimestepEmbedder(cfg.dim)
        # Row num_classes is the null class that classifier-free guidance trains and samples with.
        self.y_embedder = nn.Embedding(cfg.num_classes + 1, cfg.dim) if cfg.num_classes > 0 else None
        # A dict keyed by block index, like the GPT: stages of a pipeline keep their names.
        self.blocks = nn.ModuleDict({str(i): DiTBlock(cfg) for i in range(cfg.depth)})
        self.final = FinalLayer(cfg)
        # Fixed, derived from the config: not persistent, so checkpoints do not carry it.
        self.register_buffer("pos_embed", torch.empty(self.grid * self.grid, cfg.dim), persistent=False)

    def patchify(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x_BCHW.shape
        p = self.cfg.patch_size
        x = x_BCHW.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 3, 5, 1)
        return x.reshape(B, (H // p) * (W // p), p * p * C)  # patch vector order: (row, col, channel)

    def unpatchify(self, x_BNP: torch.Tensor) -> torch.Tensor:
        B = x_BNP.shape[0]
        p, C, g = self.cfg.patch_size, self.cfg.in_channels, self.grid
        x = x_BNP.reshape(B, g, g, p, p, C).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(B, C, g * p, g * p)

    def embed(self, x_BCHW: torch.Tensor, t_B: torch.Tensor, y_B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens h [B, N, D] and the conditioning vector c [B, D] the blocks read."""
        h = self.patch_embed(self.patchify(x_BCHW)) + self.pos_embed.to(x_BCHW.dtype)
        c = self.t_embedder(t_B)
        if self.y_embedder is not None:
            c = c + self.y_embedder(y_B)
        return h, c

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """(x_t, t, y) -> the prediction, shaped like x_t.

        As a pipeline stage (scaletrain/recipes/diffusion/__init__.py's PipelineSpec) a stage without the
        embedders takes the previous stage's (h, c) instead, and a stage without the final
        layer returns (h, c): every block needs the conditioning vector, so it travels with
        the tokens.
        """
        h, c = self.embed(*inputs) if self.patch_embed is not None else inputs
        for block in self.blocks.values():
            h = block(h, c)
        if self.final is None:
            return h, c
        return self.unpatchify(self.final(h, c))

    @torch.no_grad()
    def init_tensor(self, name: str, tensor: torch.Tensor, generator: torch.Generator) -> None:
        """Fill the full value of parameter/buffer `name` (see scaletrain/parallel/init.py)."""
        leaf = name.rsplit(".", 1)[-1]
        if name == "pos_embed":
            tensor.copy_(sincos_pos_embed(self.cfg.dim, self.grid))
        elif name.endswith("adaln.weight") or name.startswith("final.linear."):
            tensor.zero_()  # adaLN-Zero: blocks start as the identity, the output at 0
        elif leaf == "bias":
            tensor.zero_()
        elif name == "y_embedder.weight":
            nn.init.normal_(tensor, std=0.02, generator=generator)
        elif name.startswith("t_embedder."):
            nn.init.normal_(tensor, std=0.02, generator=generator)
        elif leaf == "weight" and tensor.dim() == 2:
            # Xavier-uniform on the full [out, in] matrix (patch_embed treated like the conv
            # it replaces: fan_in = p*p*C).
            fan_out, fan_in = tensor.shape
            bound = math.sqrt(6.0 / (fan_in + fan_out))
            tensor.uniform_(-bound, bound, generator=generator)
        else:
            raise KeyError(f"DiT.init_tensor does not know how to initialize {name!r}")
