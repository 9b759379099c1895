"""Decoder-only transformer: Llama-style and GPT-2-style blocks from one config.

A plain nn.Module with no parallel code (scaletrain/recipes/gpt/parallelize.py adds that). Built on
the meta device; `init_tensor` fills every parameter and buffer by name, so initialization
does not depend on how the model was sharded (see scaletrain/parallel/init.py).

Shape legend: B batch, T sequence, D model dim, H heads, K kv heads, E head dim, V vocab.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from scaletrain import ops
from scaletrain.config.schema import opt
from scaletrain.recipes.gpt.moe import MoE, MoEConfig


@dataclass
class GPTConfig:
    vocab_size: int = opt(512, "Vocabulary size (>= the tokenizer's).")
    dim: int = opt(128, "Model (residual stream) width D.")
    n_layers: int = opt(4, "Number of transformer blocks.")
    n_heads: int = opt(4, "Attention heads H.")
    n_kv_heads: int = opt(0, "Key/value heads K for grouped-query attention; 0 = n_heads.")
    head_dim: int = opt(
        0, "Width E of each attention head; 0 = dim / n_heads (Qwen3 decouples them: 2048 wide, 32 heads of 128)."
    )
    qk_norm: bool = opt(False, "RMSNorm over each head's queries and keys before RoPE (Qwen3).")
    ffn_hidden: int = opt(0, "MLP hidden width; 0 = 4*D for GELU, 8/3*D rounded up to multiple_of for SwiGLU.")
    ffn_multiplier: float = opt(1.0, "Scales the automatic SwiGLU hidden width (Llama-3 uses 1.3 for 8B, 1.5 for 70B).")
    multiple_of: int = opt(64, "SwiGLU hidden width is rounded up to a multiple of this.")
    norm: Literal["rmsnorm", "layernorm"] = opt("rmsnorm", "Normalization layer.")
    norm_eps: float = opt(1e-5, "Normalization epsilon.")
    pos: Literal["rope", "learned"] = opt("rope", "Position encoding: rotary (Llama) or learned table (GPT-2).")
    rope_theta: float = opt(10000.0, "RoPE base frequency.")
    max_seq_len: int = opt(256, "Longest sequence the model supports (RoPE cache / position table size).")
    mlp: Literal["swiglu", "gelu"] = opt("swiglu", "MLP kind.")
    bias: bool = opt(False, "Biases in linear layers (GPT-2 uses them).")
    tie_embeddings: bool = opt(False, "Share the input embedding and output projection weights.")
    attention: Literal["auto", "sdpa", "eager", "flex", "triton"] = opt(
        "auto",
        "Attention implementation (scaletrain/ops.py): auto = sdpa or triton, whichever is faster on the device "
        "(sdpa on CPU; rule in ops.resolve_attention, printed at start-up), sdpa = torch SDPA (picks its own "
        "backend), eager = plain matmul+softmax, flex = flex_attention with a causal block mask (GPU for "
        "training), triton = the fused flash-attention kernel (head dim a power of two in [16, 128]).",
    )
    sliding_window: int = opt(
        0,
        "Sliding-window attention: each token attends to the last N tokens, itself included (Mistral's "
        "sliding_window); 0 = full causal attention. Every attention implementation supports it.",
    )
    fused_norm: bool = opt(
        False, "The norms (RMSNorm or LayerNorm, by model.norm) through the fused Triton kernel (scaletrain/kernels/)."
    )
    fused_rope: bool = opt(False, "RoPE through the fused Triton kernel (model.pos=rope only).")
    fused_swiglu: bool = opt(False, "SwiGLU activation through the fused Triton kernel (model.mlp=swiglu only).")
    init_std: float = opt(0.02, "Std of the normal init of weights (output projections scaled by 1/sqrt(2L)).")
    moe: MoEConfig = field(
        default_factory=MoEConfig, metadata={"help": "Mixture of experts (scaletrain/recipes/gpt/moe.py)."}
    )

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_size(self) -> int:
        """The resolved head width E (model.head_dim, or dim / n_heads)."""
        return self.head_dim or self.dim // self.n_heads

    @property
    def hidden_dim(self) -> int:
        if self.ffn_hidden:
            return self.ffn_hidden
        if self.mlp == "gelu":
            return 4 * self.dim
        hidden = int(self.ffn_multiplier * int(8 * self.dim / 3))
        return self.multiple_of * math.ceil(hidden / self.multiple_of)


class RMSNorm(nn.Module):
    """nn.RMSNorm's math and state (one parameter, `weight`), optionally through the fused kernel.

    Under tensor parallel the sequence-parallel plan hands the norm DTensors sharded over the sequence;
    the fused kernel runs on them through its DTensor sharding rule (scaletrain/kernels/sharding.py), one sequence
    shard per rank, with the weight gradient a partial sum that DTensor reduces.
    """

    def __init__(self, dim: int, eps: float, fused: bool = False):
        super().__init__()
        self.eps, self.fused = eps, fused
        self.weight = nn.Parameter(torch.empty(dim))

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        return ops.rms_norm(x_BTD, self.weight, self.eps, fused=self.fused)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}, fused={self.fused}"


class LayerNorm(nn.Module):
    """nn.LayerNorm's math and state (`weight`, and `bias` unless bias=False) through ops.layer_norm, so the
    fused kernel can run it (model.fused_norm). Same parameter names as nn.LayerNorm: checkpoints, the HF
    GPT-2 export and init_tensor see no difference. Under tensor parallel the sequence-parallel norms get
    sequence-sharded DTensors; the fused kernel runs on them through its DTensor sharding rule."""

    def __init__(self, dim: int, eps: float, bias: bool = True, fused: bool = False):
        super().__init__()
        self.eps, self.fused = eps, fused
        self.weight = nn.Parameter(torch.empty(dim))
        self.bias = nn.Parameter(torch.empty(dim)) if bias else None

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        return ops.layer_norm(x_BTD, self.weight, self.bias, self.eps, fused=self.fused)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}, bias={self.bias is not None}, fused={self.fused}"


def _norm(cfg: GPTConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.dim, eps=cfg.norm_eps, fused=cfg.fused_norm)
    if cfg.fused_norm:
        return LayerNorm(cfg.dim, eps=cfg.norm_eps, bias=cfg.bias, fused=True)
    return nn.LayerNorm(cfg.dim, eps=cfg.norm_eps, bias=cfg.bias)


def arange_positions(length: int, device: torch.device) -> torch.Tensor:
    return torch.arange(length, device=device)


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.head_dim = cfg.head_size
        self.fused_rope = cfg.fused_rope
        # Causal attention over (q, k, v) in B H T E layout (scaletrain.ops, by model.attention).
        # Parallelize plans may swap in another implementation (context-parallel ring/all-to-all);
        # the math is the same.
        self.attention_fn = ops.attention_fn(cfg.attention, causal=True, window=cfg.sliding_window)
        # Global positions of this module's (full local) sequence; context parallel swaps in
        # its load-balanced positions. Computed here, from the attention input, because under
        # sequence parallel the block input is a sequence shard but the attention input is not.
        self.positions_fn = arange_positions
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_size, bias=cfg.bias)
        self.wk = nn.Linear(cfg.dim, cfg.kv_heads * cfg.head_size, bias=cfg.bias)
        self.wv = nn.Linear(cfg.dim, cfg.kv_heads * cfg.head_size, bias=cfg.bias)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_size, cfg.dim, bias=cfg.bias)
        # Per-head norms (shared by all heads): q/k logits stay bounded whatever the weights grow to.
        self.q_norm = RMSNorm(cfg.head_size, eps=cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_size, eps=cfg.norm_eps) if cfg.qk_norm else None

    def forward(
        self, x_BTD: torch.Tensor, cos_table: torch.Tensor | None, sin_table: torch.Tensor | None
    ) -> torch.Tensor:
        B, T, _ = x_BTD.shape
        # -1 heads: under tensor parallel each rank holds H/tp query and K/tp kv heads.
        q_BTHE = self.wq(x_BTD).view(B, T, -1, self.head_dim)
        k_BTKE = self.wk(x_BTD).view(B, T, -1, self.head_dim)
        v_BTKE = self.wv(x_BTD).view(B, T, -1, self.head_dim)
        if self.q_norm is not None:
            q_BTHE, k_BTKE = self.q_norm(q_BTHE), self.k_norm(k_BTKE)
        if cos_table is not None:
            # Rotate-half convention (pairs are (i, i + E/2)), the layout Hugging Face Llama uses,
            # so exported weights need no permutation.
            pos_T = self.positions_fn(T, x_BTD.device)
            q_BTHE, k_BTKE = ops.rope(q_BTHE, k_BTKE, cos_table[pos_T], sin_table[pos_T], fused=self.fused_rope)
        out_BHTE = self.attention_fn(q_BTHE.transpose(1, 2), k_BTKE.transpose(1, 2), v_BTKE.transpose(1, 2))
        return self.wo(out_BHTE.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    def __init__(self, cfg: GPTConfig, hidden: int = 0):
        super().__init__()
        hidden = hidden or cfg.hidden_dim
        self.swiglu = cfg.mlp == "swiglu"
        self.fused_swiglu = cfg.fused_swiglu
        self.w1 = nn.Linear(cfg.dim, hidden, bias=cfg.bias)
        self.w2 = nn.Linear(hidden, cfg.dim, bias=cfg.bias)
        self.w3 = nn.Linear(cfg.dim, hidden, bias=cfg.bias) if self.swiglu else None

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        if self.swiglu:
            return self.w2(ops.swiglu(self.w1(x_BTD), self.w3(x_BTD), fused=self.fused_swiglu))
        return self.w2(F.gelu(self.w1(x_BTD), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig, index: int = 0):
        super().__init__()
        self.attention_norm = _norm(cfg)
        self.attention = Attention(cfg)
        self.ffn_norm = _norm(cfg)
        self.feed_forward: nn.Module = FeedForward(cfg)
        if cfg.moe.is_moe_block(index):
            moe = cfg.moe
            shared_hidden = (moe.expert_hidden or cfg.hidden_dim) * moe.num_shared_experts
            shared = FeedForward(cfg, shared_hidden) if moe.num_shared_experts else None
            self.feed_forward = MoE(cfg.dim, cfg.hidden_dim, moe, shared)

    def forward(
        self, x_BTD: torch.Tensor, cos_table: torch.Tensor | None, sin_table: torch.Tensor | None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """-> x [B, T, D]; an MoE block returns (x, its balancing losses)."""
        x_BTD = x_BTD + self.attention(self.attention_norm(x_BTD), cos_table, sin_table)
        if isinstance(self.feed_forward, MoE):
            out_BTD, losses = self.feed_forward(self.ffn_norm(x_BTD))
            return x_BTD + out_BTD, losses
        return x_BTD + self.feed_forward(self.ffn_norm(x_BTD))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.pos_embeddings = nn.Embedding(cfg.max_seq_len, cfg.dim) if cfg.pos == "learned" else None
        # A dict keyed by the layer index: pipeline stages delete layers and the rest keep
        # their names, so checkpoints line up across layouts.
        self.layers = nn.ModuleDict({str(i): Block(cfg, i) for i in range(cfg.n_layers)})
        self.norm = _norm(cfg)
        # Tied embeddings reuse the embedding table in forward instead of sharing a Parameter
        # between two modules: shared Parameters do not survive meta -> to_empty.
        self.output = None if cfg.tie_embeddings else nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        # train.fused_cross_entropy (a training choice, so not in GPTConfig; the recipe sets it):
        # forward(tokens, targets) then returns the mean loss and never materializes the logits.
        self.fused_cross_entropy = False
        if cfg.pos == "rope":
            # Not persistent: derived from the config, so checkpoints do not carry it.
            self.register_buffer("rope_cos", torch.empty(cfg.max_seq_len, cfg.head_size), persistent=False)
            self.register_buffer("rope_sin", torch.empty(cfg.max_seq_len, cfg.head_size), persistent=False)
        else:
            self.rope_cos = self.rope_sin = None

    # Global positions of the local tokens (for the learned position table); context parallel
    # replaces it with the load-balanced positions of this rank's shard.
    positions = staticmethod(arange_positions)

    def forward(
        self, x: torch.Tensor, targets: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """tokens [B, T] -> logits [B, T, V]. Pipeline stages lack some modules: a stage without
        embeddings takes hidden states [B, T, D] as `x`; one without the head returns them.

        With MoE blocks (model.moe.num_experts > 0) the result is (logits, balancing losses summed over the
        blocks), and the recipe's loss adds the latter; a fused loss (below) has them added already.

        With `fused_cross_entropy` and targets [B, T], returns the fp32 mean cross-entropy instead,
        computed chunk by chunk by the fused kernel inside this forward (where FSDP has the output
        weight unsharded; under tensor parallel each rank runs it over its vocabulary shard of the head).
        Otherwise targets are ignored.
        """
        h_BTD = x  # a later pipeline stage: the previous stage's hidden states
        if self.tok_embeddings is not None:
            h_BTD = self.tok_embeddings(x)  # x: tokens [B, T]
            if self.pos_embeddings is not None:
                h_BTD = h_BTD + self.pos_embeddings(self.positions(x.shape[1], x.device))
        balancing = None
        for layer in self.layers.values():
            h_BTD = layer(h_BTD, self.rope_cos, self.rope_sin)
            if isinstance(h_BTD, tuple):  # an MoE block
                h_BTD, losses = h_BTD
                balancing = losses if balancing is None else balancing + losses
        if self.norm is not None:
            h_BTD = self.norm(h_BTD)
        out = self._head(h_BTD, targets)
        if not self.cfg.moe.enabled:
            return out
        if balancing is None:  # a pipeline stage without MoE blocks
            balancing = h_BTD.new_zeros((), dtype=torch.float32)
        if out.ndim == 0:  # the fused loss
            return out + balancing
        return out, balancing

    def _head(self, h_BTD: torch.Tensor, targets: torch.Tensor | None) -> torch.Tensor:
        """Logits, the fused loss, or (a pipeline stage without the head) the hidden states."""
        head_VD = self.output.weight if self.output is not None else None
        if head_VD is None and self.cfg.tie_embeddings and self.tok_embeddings is not None:
            head_VD = self.tok_embeddings.weight
        if self.fused_cross_entropy and targets is not None and head_VD is not None:
            return ops.linear_cross_entropy(h_BTD, head_VD, targets, fused=True)  # targets [B, T]
        if self.output is not None:
            return self.output(h_BTD)
        if self.cfg.tie_embeddings and self.tok_embeddings is not None:
            return F.linear(h_BTD, self.tok_embeddings.weight)
        return h_BTD

    @torch.no_grad()
    def init_tensor(self, name: str, tensor: torch.Tensor, generator: torch.Generator) -> None:
        """Fill the full value of parameter/buffer `name` (see scaletrain/parallel/init.py)."""
        cfg = self.cfg
        leaf = name.rsplit(".", 1)[-1]
        if name in ("rope_cos", "rope_sin"):
            E = cfg.head_size
            inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, E, 2, dtype=torch.float64) / E))
            angles = torch.outer(torch.arange(cfg.max_seq_len, dtype=torch.float64), inv_freq)
            angles = torch.cat((angles, angles), dim=-1)
            tensor.copy_(angles.cos() if name == "rope_cos" else angles.sin())
        elif leaf in ("expert_bias", "tokens_per_expert", "dropped", "balancing_sum", "forwards", "load_since_eval"):
            # MoE balancing state starts at zero
            tensor.zero_()
        elif leaf in ("w1", "w2", "w3"):  # MoE experts' stacked [E, in, out] weights
            std = cfg.init_std / math.sqrt(2 * cfg.n_layers) if leaf == "w2" else cfg.init_std
            nn.init.trunc_normal_(tensor, std=std, a=-3 * std, b=3 * std, generator=generator)
        elif "norm" in name:
            tensor.fill_(1.0 if leaf == "weight" else 0.0)
        elif leaf == "bias":
            tensor.zero_()
        elif name in ("tok_embeddings.weight", "pos_embeddings.weight", "output.weight"):
            nn.init.normal_(tensor, std=cfg.init_std, generator=generator)
        elif leaf == "weight":
            # Residual-branch outputs shrink with depth so the stream's variance stays O(1).
            std = (
                cfg.init_std / math.sqrt(2 * cfg.n_layers)
                if name.endswith(("wo.weight", "w2.weight"))
                else cfg.init_std
            )
            nn.init.trunc_normal_(tensor, std=std, a=-3 * std, b=3 * std, generator=generator)
        else:
            raise KeyError(f"GPT.init_tensor does not know how to initialize {name!r}")
