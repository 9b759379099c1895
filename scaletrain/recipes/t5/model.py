"""T5 encoder-decoder (Raffel et al. 2020, "Exploring the Limits of Transfer Learning with a Unified
Text-to-Text Transformer"; v1.1 choices selectable: gated-GELU MLP, untied LM head).

The forward numerics are those of Hugging Face's T5ForConditionalGeneration, so an export loads there with
the same logits: RMSNorm without mean or bias (variance in fp32), pre-norm residual blocks, no 1/sqrt(E)
scaling of the attention scores, a bucketed relative position bias (bidirectional in the encoder, causal in
the decoder) added to the self-attention scores of every layer of a stack and none on cross-attention, and
with a tied head the decoder output scaled by D^-0.5 before the shared embedding's transpose.

The relative-bias table lives in each stack (not in its first block, where HF keeps it): the stack computes
the bias once per forward and hands it to every block, which is what T5 does by returning it from layer 0.

A plain nn.Module with no parallel code (parallelize.py adds that), built on the meta device; `init_tensor`
fills every tensor by name. Every entry point goes through `forward(mode=...)`, so FSDP2 and DDP see each
call (greedy and beam decoding included).

Shape legend: B batch, S encoder length, T decoder length, D model dim, H heads, E head dim, V vocab.
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
class T5Config:
    vocab_size: int = opt(384, "Vocabulary size: the tokenizer's, then pad, then the sentinels (data.sentinels).")
    dim: int = opt(128, "Model width D (HF d_model).")
    n_layers: int = opt(2, "Encoder blocks.")
    n_decoder_layers: int = opt(0, "Decoder blocks; 0 = n_layers.")
    n_heads: int = opt(4, "Attention heads H.")
    head_dim: int = opt(32, "Width E of each head (HF d_kv); H*E need not equal D.")
    ffn_hidden: int = opt(256, "MLP hidden width (HF d_ff).")
    mlp: Literal["relu", "gated-gelu"] = opt(
        "gated-gelu", "relu = T5 (wi, ReLU, wo); gated-gelu = T5 v1.1 (gelu_tanh(wi_0 x) * wi_1 x, wo)."
    )
    tie_embeddings: bool = opt(
        False,
        "Tie the LM head to the shared embedding (original T5: the decoder output is scaled by D^-0.5 first); "
        "false = a separate lm_head without the scaling (T5 v1.1).",
    )
    num_buckets: int = opt(32, "Relative position buckets (HF relative_attention_num_buckets).")
    max_distance: int = opt(128, "Distance beyond which relative positions share a bucket.")
    norm_eps: float = opt(1e-6, "RMSNorm epsilon (HF layer_norm_epsilon).")
    pad_id: int = opt(
        257,
        "Padding id (masked out of the encoder's keys; the decoder's start token): the tokenizer's vocabulary "
        "size (data.py puts pad right after the tokenizer's ids; 257 for the byte tokenizer).",
    )

    @property
    def decoder_layers(self) -> int:
        return self.n_decoder_layers or self.n_layers


def relative_position_bucket(relative_ST: torch.Tensor, bidirectional: bool, num_buckets: int, max_distance: int):
    """T5's buckets of (key position - query position): half exact for short distances, half logarithmic up to
    max_distance. Bidirectional splits the buckets by sign; causal keeps only the past (future -> bucket 0)."""
    buckets = torch.zeros_like(relative_ST)
    if bidirectional:
        num_buckets //= 2
        buckets += (relative_ST > 0).long() * num_buckets
        distance = relative_ST.abs()
    else:
        distance = -torch.clamp(relative_ST, max=0)
    max_exact = num_buckets // 2
    # The same float expression as Mesh TensorFlow and HF, so every distance lands in the same bucket.
    log_ratio = torch.log(distance.float() / max_exact) / math.log(max_distance / max_exact)
    large = (max_exact + (log_ratio * (num_buckets - max_exact)).long()).clamp(max=num_buckets - 1)
    return buckets + torch.where(distance < max_exact, distance, large)


class RMSNorm(nn.Module):
    """T5LayerNorm: x / rms(x) * weight, the mean square taken in fp32; no mean, no bias."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        variance = x_BTD.float().pow(2).mean(-1, keepdim=True)
        return self.weight * (x_BTD * torch.rsqrt(variance + self.eps)).to(x_BTD.dtype)


class Attention(nn.Module):
    """Multi-head attention without score scaling; `bias` (position bias and masks, additive) broadcasts
    to [B, H, T, S]. Self-attention when `kv` is None, else cross-attention over `kv`."""

    def __init__(self, cfg: T5Config):
        super().__init__()
        self.head_dim = cfg.head_dim
        inner = cfg.n_heads * cfg.head_dim
        self.q = nn.Linear(cfg.dim, inner, bias=False)
        self.k = nn.Linear(cfg.dim, inner, bias=False)
        self.v = nn.Linear(cfg.dim, inner, bias=False)
        self.o = nn.Linear(inner, cfg.dim, bias=False)

    def forward(self, x_BTD: torch.Tensor, bias: torch.Tensor, kv_BSD: torch.Tensor | None = None) -> torch.Tensor:
        B, T, _ = x_BTD.shape
        kv_BSD = x_BTD if kv_BSD is None else kv_BSD
        # -1 heads: under tensor parallel each rank holds H/tp of them (and the matching bias columns).
        q_BHTE = self.q(x_BTD).view(B, T, -1, self.head_dim).transpose(1, 2)
        k_BHSE = self.k(kv_BSD).view(B, kv_BSD.shape[1], -1, self.head_dim).transpose(1, 2)
        v_BHSE = self.v(kv_BSD).view(B, kv_BSD.shape[1], -1, self.head_dim).transpose(1, 2)
        out_BHTE = F.scaled_dot_product_attention(q_BHTE, k_BHSE, v_BHSE, attn_mask=bias.to(q_BHTE.dtype), scale=1.0)
        return self.o(out_BHTE.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    """relu: wo(relu(wi x)); gated-gelu: wo(gelu_tanh(wi_0 x) * wi_1 x) (HF's gelu_new is the tanh form)."""

    def __init__(self, cfg: T5Config):
        super().__init__()
        self.gated = cfg.mlp == "gated-gelu"
        if self.gated:
            self.wi_0 = nn.Linear(cfg.dim, cfg.ffn_hidden, bias=False)
            self.wi_1 = nn.Linear(cfg.dim, cfg.ffn_hidden, bias=False)
        else:
            self.wi = nn.Linear(cfg.dim, cfg.ffn_hidden, bias=False)
        self.wo = nn.Linear(cfg.ffn_hidden, cfg.dim, bias=False)

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        if self.gated:
            return self.wo(F.gelu(self.wi_0(x_BTD), approximate="tanh") * self.wi_1(x_BTD))
        return self.wo(F.relu(self.wi(x_BTD)))


class EncoderBlock(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)

    def forward(self, x_BSD: torch.Tensor, bias_BHSS: torch.Tensor) -> torch.Tensor:
        x_BSD = x_BSD + self.attention(self.attention_norm(x_BSD), bias_BHSS)
        return x_BSD + self.feed_forward(self.ffn_norm(x_BSD))


class DecoderBlock(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.cross_attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.cross_attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)

    def forward(
        self, x_BTD: torch.Tensor, bias_1HTT: torch.Tensor, memory_BSD: torch.Tensor, memory_mask_B11S: torch.Tensor
    ) -> torch.Tensor:
        x_BTD = x_BTD + self.attention(self.attention_norm(x_BTD), bias_1HTT)
        x_BTD = x_BTD + self.cross_attention(self.cross_attention_norm(x_BTD), memory_mask_B11S, memory_BSD)
        return x_BTD + self.feed_forward(self.ffn_norm(x_BTD))


def _padding_mask(input_BS: torch.Tensor, pad_id: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive [B, 1, 1, S]: 0 on real encoder tokens, the dtype's minimum (as HF) on padding keys."""
    return torch.zeros(input_BS.shape, dtype=dtype, device=input_BS.device).masked_fill(
        input_BS == pad_id, torch.finfo(dtype).min
    )[:, None, None, :]


class Stack(nn.Module):
    """Blocks, their shared relative position bias, the final norm. Blocks are keyed by index (a ModuleDict)."""

    def __init__(self, cfg: T5Config, n_layers: int, decoder: bool):
        super().__init__()
        self.cfg, self.decoder = cfg, decoder
        # [num_buckets, H]: one learned scalar per bucket and head (HF relative_attention_bias).
        self.relative_bias = nn.Embedding(cfg.num_buckets, cfg.n_heads)
        block = DecoderBlock if decoder else EncoderBlock
        self.layers = nn.ModuleDict({str(i): block(cfg) for i in range(n_layers)})
        self.final_norm = RMSNorm(cfg.dim, cfg.norm_eps)

    def position_bias(self, length: int, device: torch.device) -> torch.Tensor:
        """[1, H, T, T] from the buckets of (key - query); under tensor parallel this rank's heads."""
        positions = torch.arange(length, device=device)
        buckets_TT = relative_position_bucket(
            positions[None, :] - positions[:, None], not self.decoder, self.cfg.num_buckets, self.cfg.max_distance
        )
        return self.relative_bias(buckets_TT).permute(2, 0, 1)[None]

    def forward(
        self, h_BTD: torch.Tensor, memory_BSD: torch.Tensor | None = None, memory_mask: torch.Tensor | None = None,
        padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:  # fmt: skip
        T = h_BTD.shape[1]
        bias = self.position_bias(T, h_BTD.device)
        if self.decoder:
            causal_TT = torch.full((T, T), float("-inf"), device=h_BTD.device).triu(1)
            bias = bias + causal_TT
            for layer in self.layers.values():
                h_BTD = layer(h_BTD, bias, memory_BSD, memory_mask)
        else:
            bias = bias + padding_mask
            for layer in self.layers.values():
                h_BTD = layer(h_BTD, bias)
        return self.final_norm(h_BTD)


class T5(nn.Module):
    """forward(input [B, S], decoder_input [B, T]) -> logits [B, T, V] (mode="logits", training).

    mode="encode": input -> encoder output [B, S, D]; mode="decode": (input, decoder_input, memory) -> logits
    of the last decoder position [B, V]; decoding (decoding.py) calls these once per token.
    """

    def __init__(self, cfg: T5Config):
        super().__init__()
        self.cfg = cfg
        self.shared = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.encoder = Stack(cfg, cfg.n_layers, decoder=False)
        self.decoder = Stack(cfg, cfg.decoder_layers, decoder=True)
        # Tied: the head reads self.shared.weight in forward (a shared Parameter would not survive meta -> to_empty).
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.dim, cfg.vocab_size, bias=False)

    def blocks(self) -> list[nn.Module]:
        return [*self.encoder.layers.values(), *self.decoder.layers.values()]

    def encode(self, input_BS: torch.Tensor) -> torch.Tensor:
        h_BSD = self.shared(input_BS)
        return self.encoder(h_BSD, padding_mask=_padding_mask(input_BS, self.cfg.pad_id, h_BSD.dtype))

    def decode(self, h_BTD: torch.Tensor, memory_BSD: torch.Tensor, input_BS: torch.Tensor) -> torch.Tensor:
        """Decoder hidden states from embedded decoder inputs (a tensor: the causality test differentiates it)."""
        return self.decoder(h_BTD, memory_BSD, _padding_mask(input_BS, self.cfg.pad_id, memory_BSD.dtype))

    def head(self, h_BTD: torch.Tensor) -> torch.Tensor:
        if self.lm_head is not None:
            return self.lm_head(h_BTD)
        weight = self.shared.weight
        # Under tensor parallel the table is a DTensor replicated over tp and h_BTD is the same full tensor on
        # every tp rank, so the local copy serves, and its gradient is the replicated gradient.
        weight = weight.to_local() if hasattr(weight, "to_local") else weight
        return F.linear(h_BTD * self.cfg.dim**-0.5, weight)

    def forward(
        self, input_BS: torch.Tensor, decoder_input_BT: torch.Tensor | None = None,
        memory_BSD: torch.Tensor | None = None, mode: Literal["logits", "encode", "decode"] = "logits",
    ) -> torch.Tensor:  # fmt: skip
        if mode == "encode":
            return self.encode(input_BS)
        if memory_BSD is None:
            memory_BSD = self.encode(input_BS)
        h_BTD = self.decode(self.shared(decoder_input_BT), memory_BSD, input_BS)
        if mode == "decode":
            return self.head(h_BTD[:, -1])
        return self.head(h_BTD)

    @torch.no_grad()
    def init_tensor(self, name: str, tensor: torch.Tensor, generator: torch.Generator) -> None:
        """HF T5's init (normal, std from the fan-in: q (D*E)^-1/2, k/v/wi D^-1/2, o (H*E)^-1/2, wo d_ff^-1/2,
        relative bias D^-1/2, shared embedding 1), except the untied head: D^-1/2, not 1, so the first logits
        are O(1) without the tied head's scaling."""
        cfg = self.cfg
        leaf = name.rsplit(".", 2)[-2] if name.endswith(".weight") else name
        stds = {
            "shared": 1.0, "lm_head": cfg.dim**-0.5, "relative_bias": cfg.dim**-0.5,
            "q": (cfg.dim * cfg.head_dim) ** -0.5, "k": cfg.dim**-0.5, "v": cfg.dim**-0.5,
            "o": (cfg.n_heads * cfg.head_dim) ** -0.5,
            "wi": cfg.dim**-0.5, "wi_0": cfg.dim**-0.5, "wi_1": cfg.dim**-0.5, "wo": cfg.ffn_hidden**-0.5,
        }  # fmt: skip
        if leaf.endswith("norm"):
            tensor.fill_(1.0)
        elif leaf in stds:
            nn.init.normal_(tensor, std=stds[leaf], generator=generator)
        else:
            raise KeyError(f"T5.init_tensor does not know how to initialize {name!r}")
