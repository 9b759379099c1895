"""GPT recipe <-> megatron-core's GPTModel: the config translation and the weight mapping, both ways.

megatron-core is imported only by `build_megatron_gpt`; the translation and the mapping are plain dicts and
tensors, so they are usable (and tested) without it.

The model is megatron's local layer spec (megatron's own ColumnParallel/RowParallel linears and torch norms,
no Transformer Engine), with one change: the core attention is torch's scaled_dot_product_attention
(`SDPACoreAttention`) instead of megatron's DotProductAttention, which allocates its scores in megatron's
global memory buffer on `torch.cuda.current_device()` (megatron/core/utils.py, GlobalMemoryBuffer.get_tensor)
and so cannot run without CUDA; SDPA is also the fused kernel on GPUs.

Weights (one tensor-parallel rank; Megatron's names on the right):
  tok_embeddings / pos_embeddings        embedding.word_embeddings / embedding.position_embeddings
  attention_norm / ffn_norm / norm       input_layernorm / pre_mlp_layernorm / decoder.final_layernorm
  wq, wk, wv                             self_attention.linear_qkv: per kv group g, its H/K query heads, then
                                         k_g, then v_g (each head E rows)
  wo                                     self_attention.linear_proj
  q_norm / k_norm                        self_attention.q_layernorm / k_layernorm
  w1 (+ w3 for SwiGLU)                   mlp.linear_fc1 (gate rows first: Megatron's GLU splits fc1's output
                                         in two and gates with the first half)
  w2                                     mlp.linear_fc2
  output                                 output_layer (absent with tied embeddings)
"""

from __future__ import annotations

import itertools
from typing import Any

import torch
import torch.nn.functional as F

from scaletrain.recipes.gpt.model import GPTConfig


def megatron_refusals(cfg: GPTConfig, tp: int = 1) -> list[str]:
    """What of the GPT config the megatron mapping does not express with `tp` tensor-parallel ranks (empty:
    everything maps)."""
    problems = []
    # megatron splits these evenly (megatron.core.utils.divide asserts it); core's GPTModel does not pad the
    # vocabulary as Megatron-LM's training script does (make_vocab_size_divisible_by).
    for field, value in (("vocab_size", cfg.vocab_size), ("ffn_hidden", cfg.hidden_dim), ("n_heads", cfg.n_heads),
                         ("n_kv_heads", cfg.kv_heads)):  # fmt: skip
        if value % tp:
            problems.append(f"model.{field}: {value} does not split over parallel.tp={tp} (megatron splits it evenly)")
    if cfg.moe.enabled:
        problems.append("model.moe: mixture-of-experts blocks are not mapped to megatron's MoE layer yet")
    if cfg.sliding_window:
        problems.append("model.sliding_window: megatron's local attention spec has no sliding window")
    if cfg.norm == "layernorm" and not cfg.bias:
        problems.append("model.bias: megatron's LayerNorm always has a bias; use model.bias=true with layernorm")
    return problems


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """The GPT recipe's GELU MLP: GPT-2's tanh approximation."""
    return F.gelu(x, approximate="tanh")


def transformer_config_kwargs(cfg: GPTConfig) -> dict[str, Any]:
    """TransformerConfig's arguments for this model (no parallel sizes: the engine adds those)."""
    return {
        "num_layers": cfg.n_layers,
        "hidden_size": cfg.dim,
        "num_attention_heads": cfg.n_heads,
        "num_query_groups": cfg.kv_heads,
        "kv_channels": cfg.head_size,
        "ffn_hidden_size": cfg.hidden_dim,
        "normalization": "RMSNorm" if cfg.norm == "rmsnorm" else "LayerNorm",
        "layernorm_epsilon": cfg.norm_eps,
        "gated_linear_unit": cfg.mlp == "swiglu",
        "activation_func": gelu_tanh if cfg.mlp == "gelu" else F.silu,
        "add_bias_linear": cfg.bias,
        "add_qkv_bias": cfg.bias,
        "qk_layernorm": cfg.qk_norm,
        "init_method_std": cfg.init_std,
        "hidden_dropout": 0.0,
        "attention_dropout": 0.0,
        # The fused kernels need CUDA (or apex); the unfused paths are the same math.
        "bias_activation_fusion": False,
        "bias_dropout_fusion": False,
        "masked_softmax_fusion": False,
        "apply_rope_fusion": False,
        "persist_layer_norm": False,
        "gradient_accumulation_fusion": False,
    }


def gpt_model_kwargs(cfg: GPTConfig) -> dict[str, Any]:
    """GPTModel's arguments besides the config and the layer spec."""
    return {
        "vocab_size": cfg.vocab_size,
        "max_sequence_length": cfg.max_seq_len,
        "position_embedding_type": "rope" if cfg.pos == "rope" else "learned_absolute",
        "rotary_base": int(cfg.rope_theta),
        "share_embeddings_and_output_weights": cfg.tie_embeddings,
    }


def megatron_arguments(cfg: GPTConfig) -> dict[str, Any]:
    """What megatron's TransformerConfig and GPTModel get, by class."""
    return {"TransformerConfig": transformer_config_kwargs(cfg), "GPTModel": gpt_model_kwargs(cfg)}


def _qkv_groups(cfg: GPTConfig) -> tuple[int, int, int]:
    """(kv groups K, query heads per group H/K, head width E)."""
    return cfg.kv_heads, cfg.n_heads // cfg.kv_heads, cfg.head_size


def _fuse_qkv(cfg: GPTConfig, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    K, per_group, E = _qkv_groups(cfg)
    q_g = q.reshape(K, per_group * E, *q.shape[1:])
    k_g, v_g = (t.reshape(K, E, *t.shape[1:]) for t in (k, v))
    return torch.cat([q_g, k_g, v_g], dim=1).reshape(-1, *q.shape[1:])


def _split_qkv(cfg: GPTConfig, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    K, per_group, E = _qkv_groups(cfg)
    groups = qkv.reshape(K, (per_group + 2) * E, *qkv.shape[1:])
    q, k, v = groups.split([per_group * E, E, E], dim=1)
    return (t.reshape(-1, *qkv.shape[1:]).contiguous() for t in (q, k, v))


# Per block: ours -> megatron's, for the tensors that map one to one.
_BLOCK = {
    "attention_norm": "input_layernorm",
    "ffn_norm": "pre_mlp_layernorm",
    "attention.wo": "self_attention.linear_proj",
    "attention.q_norm": "self_attention.q_layernorm",
    "attention.k_norm": "self_attention.k_layernorm",
    "feed_forward.w2": "mlp.linear_fc2",
}
_TOP = {
    "tok_embeddings.weight": "embedding.word_embeddings.weight",
    "pos_embeddings.weight": "embedding.position_embeddings.weight",
    "norm.weight": "decoder.final_layernorm.weight",
    "norm.bias": "decoder.final_layernorm.bias",
    "output.weight": "output_layer.weight",
}


def _one_to_one(cfg: GPTConfig) -> list[tuple[str, str]]:
    """(ours, megatron's) for every tensor that maps unchanged (those a model has: biases, norms, head)."""
    pairs = list(_TOP.items())
    for i in range(cfg.n_layers):
        for (mine, megatron), leaf in itertools.product(_BLOCK.items(), ("weight", "bias")):
            pairs.append((f"layers.{i}.{mine}.{leaf}", f"decoder.layers.{i}.{megatron}.{leaf}"))
    return pairs


def to_megatron(cfg: GPTConfig, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """scaletrain's full state dict -> megatron GPTModel's (tensor-parallel size 1)."""
    out = {theirs: sd[ours] for ours, theirs in _one_to_one(cfg) if ours in sd}
    for i, leaf in itertools.product(range(cfg.n_layers), ("weight", "bias")):
        ours, theirs = f"layers.{i}.", f"decoder.layers.{i}."
        if f"{ours}attention.wq.{leaf}" in sd:
            qkv = (sd[f"{ours}attention.{w}.{leaf}"] for w in ("wq", "wk", "wv"))
            out[f"{theirs}self_attention.linear_qkv.{leaf}"] = _fuse_qkv(cfg, *qkv)
        fc1 = [sd[f"{ours}feed_forward.{w}.{leaf}"] for w in ("w1", "w3") if f"{ours}feed_forward.{w}.{leaf}" in sd]
        if fc1:
            out[f"{theirs}mlp.linear_fc1.{leaf}"] = torch.cat(fc1)
    return out


def from_megatron(cfg: GPTConfig, msd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """megatron GPTModel's state dict (tensor-parallel size 1) -> scaletrain's; the inverse of to_megatron."""
    out = {ours: msd[theirs] for ours, theirs in _one_to_one(cfg) if theirs in msd}
    for i, leaf in itertools.product(range(cfg.n_layers), ("weight", "bias")):
        ours, theirs = f"layers.{i}.", f"decoder.layers.{i}."
        if f"{theirs}self_attention.linear_qkv.{leaf}" in msd:
            qkv = _split_qkv(cfg, msd[f"{theirs}self_attention.linear_qkv.{leaf}"])
            out.update({f"{ours}attention.{w}.{leaf}": t for w, t in zip(("wq", "wk", "wv"), qkv, strict=True)})
        if f"{theirs}mlp.linear_fc1.{leaf}" in msd:
            fc1 = msd[f"{theirs}mlp.linear_fc1.{leaf}"]
            parts = ("w1", "w3") if cfg.mlp == "swiglu" else ("w1",)  # SwiGLU: gate rows, then up rows
            for w, t in zip(parts, fc1.chunk(len(parts)), strict=True):
                out[f"{ours}feed_forward.{w}.{leaf}"] = t.contiguous()
    return out


def build_megatron_gpt(cfg: GPTConfig, **parallel: Any) -> torch.nn.Module:
    """megatron-core's GPTModel for this config on the CPU (`use_cpu_initialization`), with SDPA core
    attention; parallel: TransformerConfig's parallel sizes (tensor_model_parallel_size, ...). Needs
    megatron's parallel_state initialized."""
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.module import MegatronModule
    from megatron.core.transformer.transformer_config import TransformerConfig

    class SDPACoreAttention(MegatronModule):
        """Megatron's core-attention interface over torch's SDPA: [s, b, heads, E] in, [s, b, heads * E] out."""

        def __init__(self, config: TransformerConfig, *args: Any, **kwargs: Any) -> None:
            super().__init__(config=config)

        def forward(self, query, key, value, attention_mask, **kwargs):  # noqa: ANN001, ANN003, ANN201, ARG002
            q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, E]
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=k.shape[1] != q.shape[1])
            return out.permute(2, 0, 1, 3).flatten(2)

    class HostRotaryEmbedding(RotaryEmbedding):
        """RotaryEmbedding.get_emb moves its frequencies to torch.cuda.current_device() on first use
        (megatron/core/models/common/embeddings/rotary_pos_embedding.py); this keeps them where they are."""

        def get_emb(self, max_seq_len: int, offset: int = 0) -> torch.Tensor:
            freqs = self.get_freqs_non_repeated(max_seq_len, offset)
            return torch.cat((freqs, freqs), dim=-1)[:, None, None, :]

    config = TransformerConfig(**transformer_config_kwargs(cfg), use_cpu_initialization=True, **parallel)
    spec = get_gpt_layer_local_spec(normalization=config.normalization, qk_layernorm=cfg.qk_norm)
    spec.submodules.self_attention.submodules.core_attention = SDPACoreAttention
    model = GPTModel(config, spec, **gpt_model_kwargs(cfg))
    if model.position_embedding_type == "rope" and not torch.cuda.is_available():
        model.rotary_pos_emb.__class__ = HostRotaryEmbedding
    return model
