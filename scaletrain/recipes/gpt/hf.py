"""GPT recipe <-> Hugging Face: Llama / Mistral / Qwen3 (RoPE/RMSNorm/SwiGLU; Qwen3 adds per-head q/k norms),
GPT-2 (learned positions/LayerNorm/GELU), and the mixtures of experts Mixtral and Qwen3-MoE.

The model's tensors map one to one. Llama: our RoPE is the rotate-half convention HF Llama
uses, so q/k need no permutation; grouped-query attention maps to num_key_value_heads.
GPT-2: HF keeps q, k and v in one `c_attn` and stores linear weights transposed (its
Conv1D is [in, out]). Tied embeddings (`output` is None here) map to tie_word_embeddings
with no lm_head tensor. MoE: our stacked expert weights ([E, in, out], x @ w) become HF's per-expert
Linear weights ([out, in]) in the layout the published checkpoints use (experts.{e}.w1/w3/w2 for Mixtral,
experts.{e}.gate_proj/up_proj/down_proj for Qwen3-MoE), which every transformers release loads; the router
is the `gate` Linear. Both route with softmax scores and renormalized top-k weights, as model.moe can.
`transformers` is not needed to export or import — only to load the result.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from scaletrain.config.schema import JobConfig
from scaletrain.data.tokenizer import load_tokenizer, save_hf_tokenizer
from scaletrain.recipes.gpt.model import GPTConfig
from scaletrain.recipes.gpt.moe import MoEConfig

_LLAMA_LAYER = {
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attention.wq": "self_attn.q_proj",
    "attention.wk": "self_attn.k_proj",
    "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj",
    "feed_forward.w1": "mlp.gate_proj",
    "feed_forward.w3": "mlp.up_proj",
    "feed_forward.w2": "mlp.down_proj",
    "attention.q_norm.weight": "self_attn.q_norm.weight",  # Qwen3
    "attention.k_norm.weight": "self_attn.k_norm.weight",
}


def _moe_architecture(cfg: GPTConfig) -> str:
    """'mixtral' or 'qwen3_moe' (with q/k norms), or a ValueError naming what neither expresses."""
    moe = cfg.moe
    unsupported = [
        (moe.num_shared_experts > 0, f"model.moe.num_shared_experts: {moe.num_shared_experts} (no shared experts)"),
        (moe.score != "softmax", f"model.moe.score: {moe.score} (both route with softmax)"),
        (moe.groups > 0, "model.moe.groups: grouped routing (neither has it)"),
        (moe.bias_update_rate > 0, "model.moe.bias_update_rate: the routing biases (neither has them)"),
        (moe.every != 1, f"model.moe.every: {moe.every} (every block after first_dense must be MoE)"),
        (moe.capacity_factor > 0, "model.moe.capacity_factor: dropping (both are dropless)"),
        (cfg.bias, "model.bias: linear biases"),
    ]
    if cfg.qk_norm:
        unsupported.append((cfg.sliding_window > 0, "model.sliding_window: Qwen3-MoE uses full attention"))
    else:
        unsupported += [
            (moe.first_dense > 0, f"model.moe.first_dense: {moe.first_dense} (Mixtral's blocks are all MoE)"),
            (not moe.norm_topk, "model.moe.norm_topk: false (Mixtral renormalizes the top-k weights)"),
        ]
    problems = [message for bad, message in unsupported if bad]
    if problems:
        target = "Qwen3-MoE" if cfg.qk_norm else "Mixtral (or, with model.qk_norm, Qwen3-MoE)"
        raise ValueError(
            f"Hugging Face export as {target} cannot express: {'; '.join(problems)}; export with --format "
            "safetensors instead"
        )
    return "qwen3_moe" if cfg.qk_norm else "mixtral"


def hf_architecture(cfg: GPTConfig) -> str:
    """'llama', 'mistral' (Llama with a sliding window), 'qwen3' (Llama with q/k norms), 'mixtral', 'qwen3_moe'
    or 'gpt2', or a ValueError naming the fields that fit none."""
    llama_like = cfg.pos == "rope" and cfg.norm == "rmsnorm" and cfg.mlp == "swiglu"
    if cfg.moe.enabled and llama_like:
        return _moe_architecture(cfg)
    if llama_like and cfg.qk_norm:
        if cfg.sliding_window:
            raise ValueError("model.sliding_window: Qwen3 export needs full attention (sliding_window=0)")
        return "qwen3"
    if llama_like:
        return "mistral" if cfg.sliding_window else "llama"
    if cfg.pos == "learned" and cfg.norm == "layernorm" and cfg.mlp == "gelu":
        if cfg.kv_heads != cfg.n_heads:
            raise ValueError("model.n_kv_heads: GPT-2 has no grouped-query attention; export needs n_kv_heads=n_heads")
        if cfg.sliding_window:
            raise ValueError("model.sliding_window: GPT-2 has no sliding window; export needs sliding_window=0")
        return "gpt2"
    if cfg.qk_norm:
        raise ValueError("model.qk_norm: GPT-2 has no q/k norms; export needs qk_norm=false")
    raise ValueError(
        f"model: pos={cfg.pos}, norm={cfg.norm}, mlp={cfg.mlp} is neither Llama (rope, rmsnorm, swiglu) "
        "nor GPT-2 (learned, layernorm, gelu); export it with --format safetensors instead"
    )


# -- export ----------------------------------------------------------------------------------
_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
}


def _llama_config(cfg: GPTConfig, arch: str) -> dict[str, Any]:
    """Llama's config.json fields, and what Mistral (a sliding window; transformers' Llama has none),
    Qwen3 (q/k norms), Mixtral and Qwen3-MoE (experts) add to the same tensor layout."""
    extra: dict[str, Any] = {}
    moe = cfg.moe
    if arch in ("mistral", "mixtral"):
        extra["sliding_window"] = cfg.sliding_window or None
    if arch in ("qwen3", "qwen3_moe"):
        extra.update(use_sliding_window=False, sliding_window=None)
    if arch == "mixtral":
        extra.update(
            intermediate_size=moe.expert_hidden or cfg.hidden_dim, num_local_experts=moe.num_experts,
            num_experts_per_tok=moe.top_k, router_aux_loss_coef=moe.aux_loss_coef, output_router_logits=False,
        )  # fmt: skip
    if arch == "qwen3_moe":
        extra.update(
            moe_intermediate_size=moe.expert_hidden or cfg.hidden_dim, num_experts=moe.num_experts,
            num_experts_per_tok=moe.top_k, norm_topk_prob=moe.norm_topk, decoder_sparse_step=1,
            mlp_only_layers=list(range(moe.first_dense)), router_aux_loss_coef=moe.aux_loss_coef,
            output_router_logits=False,
        )  # fmt: skip
    return {
        "architectures": [_ARCHITECTURES[arch]],
        "model_type": arch,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.hidden_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_size,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "attention_bias": cfg.bias,
        "mlp_bias": cfg.bias,
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std,
        "torch_dtype": "float32",
        **extra,
    }


def _expert_names(arch: str) -> tuple[str, dict[str, str]]:
    """(the MoE block's HF prefix, our stacked weight -> HF per-expert Linear name)."""
    if arch == "mixtral":
        return "block_sparse_moe", {"w1": "w1", "w3": "w3", "w2": "w2"}
    return "mlp", {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}


def _llama_tensors(cfg: GPTConfig, sd: dict[str, torch.Tensor], arch: str) -> dict[str, torch.Tensor]:
    out = {"model.embed_tokens.weight": sd["tok_embeddings.weight"], "model.norm.weight": sd["norm.weight"]}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = sd["output.weight"]
    prefix, expert_names = _expert_names(arch)
    for i in range(cfg.n_layers):
        for ours, theirs in _LLAMA_LAYER.items():
            for leaf in ("", ".weight", ".bias"):
                key = f"layers.{i}.{ours}{leaf}"
                if key in sd and (leaf or ours.endswith(".weight")):
                    out[f"model.layers.{i}.{theirs}{leaf}"] = sd[key]
        if not cfg.moe.is_moe_block(i):
            continue
        ffn, hf = f"layers.{i}.feed_forward.", f"model.layers.{i}.{prefix}."
        out[hf + "gate.weight"] = sd[ffn + "router.weight"]
        for ours, theirs in expert_names.items():
            for e, weight in enumerate(sd[f"{ffn}experts.{ours}"]):  # [in, out] -> Linear's [out, in]
                out[f"{hf}experts.{e}.{theirs}.weight"] = weight.t()
    return out


def _gpt2_config(cfg: GPTConfig) -> dict[str, Any]:
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.max_seq_len,
        "n_embd": cfg.dim,
        "n_layer": cfg.n_layers,
        "n_head": cfg.n_heads,
        "n_inner": cfg.hidden_dim,
        "activation_function": "gelu_new",  # tanh-approximated GELU, as our MLP uses
        "layer_norm_epsilon": cfg.norm_eps,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "scale_attn_weights": True,
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std,
        "torch_dtype": "float32",
    }


def _gpt2_tensors(cfg: GPTConfig, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    def bias(key: str, size: int) -> torch.Tensor:
        # GPT-2 always has biases; a bias-free model exports exact zeros.
        return sd.get(key, torch.zeros(size, dtype=sd["tok_embeddings.weight"].dtype))

    D = cfg.dim
    out = {
        "transformer.wte.weight": sd["tok_embeddings.weight"],
        "transformer.wpe.weight": sd["pos_embeddings.weight"],
        "transformer.ln_f.weight": sd["norm.weight"],
        "transformer.ln_f.bias": bias("norm.bias", D),
    }
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = sd["output.weight"]
    for i in range(cfg.n_layers):
        p, h = f"layers.{i}.", f"transformer.h.{i}."
        qkv = [sd[f"{p}attention.{w}.weight"] for w in ("wq", "wk", "wv")]
        out[h + "attn.c_attn.weight"] = torch.cat(qkv, dim=0).t()  # Conv1D stores [in, out]
        out[h + "attn.c_attn.bias"] = torch.cat([bias(f"{p}attention.{w}.bias", D) for w in ("wq", "wk", "wv")])
        out[h + "attn.c_proj.weight"] = sd[p + "attention.wo.weight"].t()
        out[h + "attn.c_proj.bias"] = bias(p + "attention.wo.bias", D)
        out[h + "mlp.c_fc.weight"] = sd[p + "feed_forward.w1.weight"].t()
        out[h + "mlp.c_fc.bias"] = bias(p + "feed_forward.w1.bias", cfg.hidden_dim)
        out[h + "mlp.c_proj.weight"] = sd[p + "feed_forward.w2.weight"].t()
        out[h + "mlp.c_proj.bias"] = bias(p + "feed_forward.w2.bias", D)
        for ours, theirs in (("attention_norm", "ln_1"), ("ffn_norm", "ln_2")):
            out[h + theirs + ".weight"] = sd[f"{p}{ours}.weight"]
            out[h + theirs + ".bias"] = bias(f"{p}{ours}.bias", D)
    return out


def export_hf(job: JobConfig, state_dict: dict[str, torch.Tensor], out_dir: Path) -> None:
    """Write a Hugging Face model folder for `transformers`: config.json + model.safetensors, and the
    tokenizer the run trained with (AutoTokenizer loads it) unless the weights were imported."""
    cfg = job.model
    arch = hf_architecture(cfg)
    config, tensors = (
        (_gpt2_config(cfg), _gpt2_tensors(cfg, state_dict))
        if arch == "gpt2"
        else (_llama_config(cfg, arch), _llama_tensors(cfg, state_dict, arch))
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    if job.data is not None:
        tokenizer = load_tokenizer(job.data.tokenizer)
        save_hf_tokenizer(tokenizer, out_dir, cfg.max_seq_len)
        # Ids that exist in this vocabulary (transformers' defaults, e.g. GPT-2's 50256, may not); the data
        # pipeline separates documents with eos only, so it serves as bos too.
        config.update(bos_token_id=tokenizer.eos_id, eos_token_id=tokenizer.eos_id)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out_dir / "model.safetensors"), {"format": "pt"})


# -- import ----------------------------------------------------------------------------------
def _read_tensors(hf_dir: Path) -> dict[str, torch.Tensor]:
    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():  # sharded: the index names the file of each tensor
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (hf_dir / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise ValueError(f"{hf_dir}: no model.safetensors (or index); only safetensors weights are imported")
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        tensors.update(load_file(str(hf_dir / name)))
    return tensors


def _moe_import(config: dict[str, Any], model_type: str) -> dict[str, Any]:
    """model.moe from a Mixtral or Qwen3-MoE config.json."""
    if model_type == "mixtral":
        return {
            "num_experts": config["num_local_experts"], "top_k": config["num_experts_per_tok"],
            "expert_hidden": config["intermediate_size"], "norm_topk": True,
            "aux_loss_coef": config.get("router_aux_loss_coef", 0.01),
        }  # fmt: skip
    step, dense = config.get("decoder_sparse_step", 1), sorted(config.get("mlp_only_layers") or [])
    if step != 1 or dense != list(range(len(dense))):
        raise ValueError(
            f"config.json: decoder_sparse_step={step}, mlp_only_layers={dense}; the GPT recipe expresses MoE "
            "blocks as 'all after the first K dense ones' (decoder_sparse_step=1, mlp_only_layers=[0..K-1])"
        )
    return {
        # transformers 5 writes Qwen3-MoE's num_experts under Mixtral's name.
        "num_experts": config["num_experts"] if "num_experts" in config else config["num_local_experts"],
        "top_k": config["num_experts_per_tok"], "expert_hidden": config["moe_intermediate_size"],
        "first_dense": len(dense),
        "norm_topk": bool(config.get("norm_topk_prob", True)),
        "aux_loss_coef": config.get("router_aux_loss_coef", 0.001),
    }  # fmt: skip


def _experts_import(t: dict[str, torch.Tensor], hf: str, num_experts: int, arch: str) -> dict[str, torch.Tensor]:
    """Our stacked [E, in, out] expert weights from HF's per-expert Linears (the layout transformers 5 also
    saves, converting its fused in-memory experts back)."""
    _, names = _expert_names(arch)
    return {
        ours: torch.stack([t[f"{hf}experts.{e}.{theirs}.weight"].t() for e in range(num_experts)]).contiguous()
        for ours, theirs in names.items()
    }


def _llama_import(config: dict[str, Any], t: dict[str, torch.Tensor]) -> tuple[dict[str, Any], dict]:
    """Llama, Mistral, Qwen3, Mixtral and Qwen3-MoE: one tensor layout, with q/k norms or experts added."""
    model_type = config["model_type"]
    if config.get("rope_scaling") or (config.get("rope_parameters") or {}).get("rope_type", "default") != "default":
        raise ValueError("config.json: RoPE scaling is not supported by the GPT recipe")
    if model_type in ("qwen3", "qwen3_moe") and config.get("use_sliding_window"):
        raise ValueError("config.json: use_sliding_window (Qwen's per-layer windows) is not supported here")
    dim, heads = config["hidden_size"], config["num_attention_heads"]
    head_dim = config.get("head_dim") or dim // heads
    theta = config.get("rope_theta") or (config.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    bias = bool(config.get("attention_bias", False))
    tied = bool(config.get("tie_word_embeddings", False))
    window = config.get("sliding_window") or 0 if model_type in ("mistral", "mixtral") else 0
    model = {
        "vocab_size": config["vocab_size"], "dim": dim, "n_layers": config["num_hidden_layers"], "n_heads": heads,
        "n_kv_heads": config.get("num_key_value_heads", heads), "ffn_hidden": config["intermediate_size"],
        "head_dim": 0 if head_dim == dim // heads and dim % heads == 0 else head_dim,
        "qk_norm": model_type in ("qwen3", "qwen3_moe"),
        "norm": "rmsnorm", "norm_eps": config.get("rms_norm_eps", 1e-6), "pos": "rope", "rope_theta": theta,
        "max_seq_len": config.get("max_position_embeddings", 2048), "mlp": "swiglu", "bias": bias,
        "tie_embeddings": tied, "sliding_window": window,
    }  # fmt: skip
    moe_cfg = MoEConfig()
    if model_type in ("mixtral", "qwen3_moe"):
        model["moe"] = _moe_import(config, model_type)
        moe_cfg = MoEConfig(**model["moe"])
    sd = {"tok_embeddings.weight": t["model.embed_tokens.weight"], "norm.weight": t["model.norm.weight"]}
    if not tied:
        sd["output.weight"] = t["lm_head.weight"]
    prefix, _ = _expert_names(model_type)
    for i in range(model["n_layers"]):
        moe_block = moe_cfg.is_moe_block(i)
        for ours, theirs in _LLAMA_LAYER.items():
            qk_norm = ours in ("attention.q_norm.weight", "attention.k_norm.weight")
            if (ours.startswith("feed_forward.") and moe_block) or (qk_norm and not model["qk_norm"]):
                continue
            leaves = ("",) if ours.endswith(".weight") else (".weight", ".bias") if bias else (".weight",)
            for leaf in leaves:
                sd[f"layers.{i}.{ours}{leaf}"] = t[f"model.layers.{i}.{theirs}{leaf}"]
        if moe_block:
            ffn, hf = f"layers.{i}.feed_forward.", f"model.layers.{i}.{prefix}."
            sd[ffn + "router.weight"] = t[hf + "gate.weight"]
            for name, stacked in _experts_import(t, hf, moe_cfg.num_experts, model_type).items():
                sd[f"{ffn}experts.{name}"] = stacked
            sd[ffn + "expert_bias"] = torch.zeros(moe_cfg.num_experts)  # no routing biases in these models
    return model, sd


def _gpt2_import(config: dict[str, Any], t: dict[str, torch.Tensor]) -> tuple[dict[str, Any], dict]:
    if config.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ValueError(f"config.json: activation {config['activation_function']!r}; the GPT recipe uses tanh GELU")
    dim = config["n_embd"]
    tied = bool(config.get("tie_word_embeddings", True))
    model = {
        "vocab_size": config["vocab_size"], "dim": dim, "n_layers": config["n_layer"], "n_heads": config["n_head"],
        "n_kv_heads": 0, "ffn_hidden": config.get("n_inner") or 4 * dim, "norm": "layernorm",
        "norm_eps": config.get("layer_norm_epsilon", 1e-5), "pos": "learned", "max_seq_len": config["n_positions"],
        "mlp": "gelu", "bias": True, "tie_embeddings": tied,
    }  # fmt: skip
    sd = {
        "tok_embeddings.weight": t["transformer.wte.weight"],
        "pos_embeddings.weight": t["transformer.wpe.weight"],
        "norm.weight": t["transformer.ln_f.weight"],
        "norm.bias": t["transformer.ln_f.bias"],
    }
    if not tied:
        sd["output.weight"] = t["lm_head.weight"]
    for i in range(model["n_layers"]):
        p, h = f"layers.{i}.", f"transformer.h.{i}."
        q, k, v = t[h + "attn.c_attn.weight"].t().split(dim, dim=0)
        qb, kb, vb = t[h + "attn.c_attn.bias"].split(dim)
        for w, weight, b in (("wq", q, qb), ("wk", k, kb), ("wv", v, vb)):
            sd[f"{p}attention.{w}.weight"], sd[f"{p}attention.{w}.bias"] = weight.contiguous(), b.contiguous()
        sd[p + "attention.wo.weight"] = t[h + "attn.c_proj.weight"].t().contiguous()
        sd[p + "attention.wo.bias"] = t[h + "attn.c_proj.bias"]
        sd[p + "feed_forward.w1.weight"] = t[h + "mlp.c_fc.weight"].t().contiguous()
        sd[p + "feed_forward.w1.bias"] = t[h + "mlp.c_fc.bias"]
        sd[p + "feed_forward.w2.weight"] = t[h + "mlp.c_proj.weight"].t().contiguous()
        sd[p + "feed_forward.w2.bias"] = t[h + "mlp.c_proj.bias"]
        for ours, theirs in (("attention_norm", "ln_1"), ("ffn_norm", "ln_2")):
            sd[f"{p}{ours}.weight"], sd[f"{p}{ours}.bias"] = t[h + theirs + ".weight"], t[h + theirs + ".bias"]
    return model, sd


def import_hf(hf_dir: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(model config overrides, state dict in this recipe's names) from a Hugging Face folder."""
    config = json.loads((hf_dir / "config.json").read_text())
    tensors = _read_tensors(hf_dir)
    model_type = config.get("model_type")
    try:
        model, sd = (_gpt2_import if model_type == "gpt2" else _llama_import)(config, tensors)
    except KeyError as exc:
        raise ValueError(f"{hf_dir}: tensor or config key {exc} missing for a {model_type} model") from exc
    defaults = asdict(GPTConfig())
    return {k: v for k, v in model.items() if k in defaults}, sd


HF_MODEL_TYPES = ("llama", "mistral", "qwen3", "mixtral", "qwen3_moe", "gpt2")
