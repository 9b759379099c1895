"""Baselines for `scaletrain bench` that share no code with scaletrain's GPT model.

Each is a module whose forward(batch) returns the mean next-token loss, trained by the bench in a plain
loop. Comparing scaletrain against loops that run *its own* model module would hide a slow model file: these
are written independently (a minimal Llama the way one would write it by hand) or come from transformers
(LlamaForCausalLM / GPT2LMHeadModel of the same shape).

Shape legend: B batch, T sequence, D model dim, H heads, K kv heads, E head dim, V vocab, F MLP width.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from scaletrain.config.schema import JobConfig
from scaletrain.recipes.gpt.hf import _gpt2_config, _llama_config, hf_architecture
from scaletrain.recipes.gpt.model import GPTConfig
from scaletrain.recipes.gpt.moe import MoEConfig


class _Block(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        D, H, K, E = cfg.dim, cfg.n_heads, cfg.kv_heads, cfg.head_size
        self.H, self.K, self.E, self.eps = H, K, E, cfg.norm_eps
        self.attn_norm = nn.Parameter(torch.ones(D))
        self.qkv = nn.Linear(D, (H + 2 * K) * E, bias=False)
        self.proj = nn.Linear(H * E, D, bias=False)
        self.mlp_norm = nn.Parameter(torch.ones(D))
        self.gate_up = nn.Linear(D, 2 * cfg.hidden_dim, bias=False)
        self.down = nn.Linear(cfg.hidden_dim, D, bias=False)

    def forward(self, x_BTD: torch.Tensor, cos_TE: torch.Tensor, sin_TE: torch.Tensor) -> torch.Tensor:
        B, T, _ = x_BTD.shape
        h_BTD = F.rms_norm(x_BTD, (x_BTD.shape[-1],), self.attn_norm, self.eps)
        q, k, v = self.qkv(h_BTD).view(B, T, -1, self.E).split([self.H, self.K, self.K], dim=2)
        q, k = (_rotate(t, cos_TE, sin_TE).transpose(1, 2) for t in (q, k))
        out_BHTE = F.scaled_dot_product_attention(q, k, v.transpose(1, 2), is_causal=True, enable_gqa=True)
        x_BTD = x_BTD + self.proj(out_BHTE.transpose(1, 2).reshape(B, T, -1))
        gate, up = self.gate_up(F.rms_norm(x_BTD, (x_BTD.shape[-1],), self.mlp_norm, self.eps)).chunk(2, dim=-1)
        return x_BTD + self.down(F.silu(gate) * up)


def _rotate(x_BTHE: torch.Tensor, cos_TE: torch.Tensor, sin_TE: torch.Tensor) -> torch.Tensor:
    first, second = x_BTHE.chunk(2, dim=-1)
    rotated = torch.cat((-second, first), dim=-1)
    return x_BTHE * cos_TE[:, None] + rotated * sin_TE[:, None]


class PlainLlama(nn.Module):
    """A Llama written the way a user would, from the config's shapes only; forward(batch) -> mean loss."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.eps = cfg.norm_eps
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.blocks = nn.ModuleList(_Block(cfg) for _ in range(cfg.n_layers))
        self.norm = nn.Parameter(torch.ones(cfg.dim))
        self.head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        inv_freq = cfg.rope_theta ** (-torch.arange(0, cfg.head_size, 2) / cfg.head_size)
        angles = torch.outer(torch.arange(cfg.max_seq_len).float(), inv_freq).repeat(1, 2)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=cfg.init_std)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        tokens_BT = batch["input"]
        T = tokens_BT.shape[1]
        x_BTD = self.embed(tokens_BT)
        for block in self.blocks:
            x_BTD = block(x_BTD, self.cos[:T], self.sin[:T])
        logits_BTV = self.head(F.rms_norm(x_BTD, (x_BTD.shape[-1],), self.norm, self.eps))
        return F.cross_entropy(logits_BTV.flatten(0, 1).float(), batch["target"].flatten())


class TransformersLM(nn.Module):
    """transformers' causal LM of the same shape (built from the config that `scaletrain export` writes)."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        import transformers

        arch = hf_architecture(cfg)
        config = _gpt2_config(cfg) if arch == "gpt2" else _llama_config(cfg, arch)
        config_class = transformers.AutoConfig.for_model(config.pop("model_type"))
        self.model = transformers.AutoModelForCausalLM.from_config(config_class.from_dict(config))

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits_BTV = self.model(input_ids=batch["input"]).logits
        return F.cross_entropy(logits_BTV.flatten(0, 1).float(), batch["target"].flatten())


def dense_of_active_size(model: GPTConfig) -> GPTConfig:
    """The dense model whose blocks hold the weights one token uses in an MoE block: its top-k routed and its
    shared experts as one SwiGLU of their combined width (the router's D x E weights aside). Every block gets
    that width, so it equals the MoE model's active size when its dense blocks have the same width (tiny-moe:
    3 x 128 = 384, the automatic SwiGLU width of a 128-wide model)."""
    moe = model.moe
    width = (moe.expert_hidden or model.hidden_dim) * (moe.top_k + moe.num_shared_experts)
    return dataclasses.replace(model, ffn_hidden=width, moe=MoEConfig())


def bench_baselines(cfg: JobConfig) -> dict[str, Callable[[], nn.Module]]:
    """The independent baselines that fit this config: the hand-written Llama for Llama-style models (for an
    MoE model, the dense one of the same active size: what the experts cost over the weights they use), and
    transformers' model whenever transformers is installed and can express the architecture."""
    model = cfg.model
    baselines: dict[str, Callable[[], nn.Module]] = {}
    llama_style = model.pos == "rope" and model.norm == "rmsnorm" and model.mlp == "swiglu"
    plain = not (model.bias or model.tie_embeddings or model.sliding_window or model.qk_norm or model.head_dim)
    if llama_style and plain and model.moe.enabled:
        dense = dense_of_active_size(model)
        baselines["independent plain llama, dense of the same active size"] = lambda: PlainLlama(dense)
    elif llama_style and plain:
        baselines["independent plain llama"] = lambda: PlainLlama(model)
    try:
        import transformers  # noqa: F401

        hf_architecture(model)
    except (ImportError, ValueError):
        return baselines
    baselines["transformers " + hf_architecture(model)] = lambda: TransformersLM(model)
    return baselines
