"""GPT recipe <-> Hugging Face: Llama (RoPE/RMSNorm/SwiGLU) and GPT-2 (learned positions/LayerNorm/GELU).

The model's tensors map one to one. Llama: our RoPE is the rotate-half convention HF Llama
uses, so q/k need no permutation; grouped-query attention maps to num_key_value_heads.
GPT-2: HF keeps q, k and v in one `c_attn` and stores linear weights transposed (its
Conv1D is [in, out]). Tied embeddings (`output` is None here) map to tie_word_embeddings
with no lm_head tensor. `transformers` is not needed to export or import — only to load
the result.
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
}


def hf_architecture(cfg: GPTConfig) -> str:
    """'llama', 'mistral' (Llama with a sliding window) or 'gpt2', or a ValueError naming the fields that fit none."""
    if cfg.moe.enabled:
        raise ValueError(
            "model.moe.num_experts: Hugging Face export of MoE models is not written yet; export it with "
            "--format safetensors instead"
        )
    if cfg.pos == "rope" and cfg.norm == "rmsnorm" and cfg.mlp == "swiglu":
        return "mistral" if cfg.sliding_window else "llama"
    if cfg.pos == "learned" and cfg.norm == "layernorm" and cfg.mlp == "gelu":
        if cfg.kv_heads != cfg.n_heads:
            raise ValueError("model.n_kv_heads: GPT-2 has no grouped-query attention; export needs n_kv_heads=n_heads")
        if cfg.sliding_window:
            raise ValueError("model.sliding_window: GPT-2 has no sliding window; export needs sliding_window=0")
        return "gpt2"
    raise ValueError(
        f"model: pos={cfg.pos}, norm={cfg.norm}, mlp={cfg.mlp} is neither Llama (rope, rmsnorm, swiglu) "
        "nor GPT-2 (learned, layernorm, gelu); export it with --format safetensors instead"
    )


# -- export ----------------------------------------------------------------------------------
def _llama_config(cfg: GPTConfig) -> dict[str, Any]:
    # Mistral is Llama's layout (same tensor names) plus a sliding window; transformers' Llama has none.
    mistral = {"sliding_window": cfg.sliding_window} if cfg.sliding_window else {}
    return {
        "architectures": ["MistralForCausalLM" if mistral else "LlamaForCausalLM"],
        "model_type": "mistral" if mistral else "llama",
        **mistral,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.hidden_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim,
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
    }


def _llama_tensors(cfg: GPTConfig, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {"model.embed_tokens.weight": sd["tok_embeddings.weight"], "model.norm.weight": sd["norm.weight"]}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = sd["output.weight"]
    for i in range(cfg.n_layers):
        for ours, theirs in _LLAMA_LAYER.items():
            for leaf in ("", ".weight", ".bias"):
                key = f"layers.{i}.{ours}{leaf}"
                if key in sd and (leaf or ours.endswith(".weight")):
                    out[f"model.layers.{i}.{theirs}{leaf}"] = sd[key]
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
        (_llama_config(cfg), _llama_tensors(cfg, state_dict))
        if arch in ("llama", "mistral")
        else (_gpt2_config(cfg), _gpt2_tensors(cfg, state_dict))
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


def _llama_import(config: dict[str, Any], t: dict[str, torch.Tensor]) -> tuple[dict[str, Any], dict]:
    if config.get("rope_scaling") or (config.get("rope_parameters") or {}).get("rope_type", "default") != "default":
        raise ValueError("config.json: RoPE scaling is not supported by the GPT recipe")
    dim, heads = config["hidden_size"], config["num_attention_heads"]
    if config.get("head_dim", dim // heads) != dim // heads:
        raise ValueError(f"config.json: head_dim {config['head_dim']} != hidden_size / num_attention_heads")
    theta = config.get("rope_theta") or (config.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    bias = bool(config.get("attention_bias", False))
    tied = bool(config.get("tie_word_embeddings", False))
    model = {
        "vocab_size": config["vocab_size"], "dim": dim, "n_layers": config["num_hidden_layers"], "n_heads": heads,
        "n_kv_heads": config.get("num_key_value_heads", heads), "ffn_hidden": config["intermediate_size"],
        "norm": "rmsnorm", "norm_eps": config.get("rms_norm_eps", 1e-6), "pos": "rope", "rope_theta": theta,
        "max_seq_len": config.get("max_position_embeddings", 2048), "mlp": "swiglu", "bias": bias,
        "tie_embeddings": tied, "sliding_window": config.get("sliding_window") or 0,
    }  # fmt: skip
    sd = {"tok_embeddings.weight": t["model.embed_tokens.weight"], "norm.weight": t["model.norm.weight"]}
    if not tied:
        sd["output.weight"] = t["lm_head.weight"]
    for i in range(model["n_layers"]):
        for ours, theirs in _LLAMA_LAYER.items():
            leaves = ("",) if ours.endswith(".weight") else (".weight", ".bias") if bias else (".weight",)
            for leaf in leaves:
                sd[f"layers.{i}.{ours}{leaf}"] = t[f"model.layers.{i}.{theirs}{leaf}"]
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
        model, sd = (_llama_import if model_type in ("llama", "mistral") else _gpt2_import)(config, tensors)
    except KeyError as exc:
        raise ValueError(f"{hf_dir}: tensor or config key {exc} missing for a {model_type} model") from exc
    defaults = asdict(GPTConfig())
    return {k: v for k, v in model.items() if k in defaults}, sd


HF_MODEL_TYPES = ("llama", "mistral", "gpt2")
