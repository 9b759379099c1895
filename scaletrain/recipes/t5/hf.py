"""T5 recipe <-> Hugging Face T5ForConditionalGeneration (config.json + model.safetensors).

The tensors map one to one (NAMES below); the stacks' relative-bias tables go to block 0's self-attention,
where HF keeps them. Tied embeddings are HF's tie_word_embeddings=true, which also scales the decoder
output by d_model^-0.5 (as this model does); untied ones write lm_head.weight and tie_word_embeddings=false
(no scaling: T5 v1.1). The config carries pad, eos and decoder-start (= pad) ids of the recipe's vocabulary
(data.py); the tokenizer is not exported, since HF's T5 tokenizers know neither its pad nor its sentinels.
`transformers` is not needed to export or import, only to load the result.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from scaletrain.config.schema import JobConfig
from scaletrain.recipes.t5.model import T5Config

# Ours -> HF, inside block i of a stack; HF numbers a block's sub-layers 0 (self), 1 (cross: decoder), then FF.
_ATTENTION = {"q": "q", "k": "k", "v": "v", "o": "o"}
_MLP = ("wi", "wi_0", "wi_1", "wo")


def _block_names(decoder: bool) -> dict[str, str]:
    ff = 2 if decoder else 1
    names = {"attention_norm.weight": "layer.0.layer_norm.weight", "ffn_norm.weight": f"layer.{ff}.layer_norm.weight"}
    names.update({f"attention.{a}.weight": f"layer.0.SelfAttention.{b}.weight" for a, b in _ATTENTION.items()})
    names.update({f"feed_forward.{w}.weight": f"layer.{ff}.DenseReluDense.{w}.weight" for w in _MLP})
    if decoder:
        names["cross_attention_norm.weight"] = "layer.1.layer_norm.weight"
        names.update(
            {f"cross_attention.{a}.weight": f"layer.1.EncDecAttention.{b}.weight" for a, b in _ATTENTION.items()}
        )
    return names


def hf_name(name: str) -> str:
    """Our parameter name -> HF's; KeyError for a name HF has no place for."""
    if name in ("shared.weight", "lm_head.weight"):
        return name
    stack, rest = name.split(".", 1)
    if rest == "relative_bias.weight":
        return f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
    if rest == "final_norm.weight":
        return f"{stack}.final_layer_norm.weight"
    match = re.fullmatch(r"layers\.(\d+)\.(.+)", rest)
    if match is None or match.group(2) not in _block_names(stack == "decoder"):
        raise KeyError(f"no Hugging Face T5 name for {name!r}")
    return f"{stack}.block.{match.group(1)}.{_block_names(stack == 'decoder')[match.group(2)]}"


def hf_config(cfg: T5Config, eos_id: int | None) -> dict[str, Any]:
    config = {
        "architectures": ["T5ForConditionalGeneration"], "model_type": "t5", "is_encoder_decoder": True,
        "vocab_size": cfg.vocab_size, "d_model": cfg.dim, "d_kv": cfg.head_dim, "d_ff": cfg.ffn_hidden,
        "num_layers": cfg.n_layers, "num_decoder_layers": cfg.decoder_layers, "num_heads": cfg.n_heads,
        "relative_attention_num_buckets": cfg.num_buckets, "relative_attention_max_distance": cfg.max_distance,
        "dropout_rate": 0.0, "layer_norm_epsilon": cfg.norm_eps, "feed_forward_proj": cfg.mlp,
        "tie_word_embeddings": cfg.tie_embeddings, "pad_token_id": cfg.pad_id, "decoder_start_token_id": cfg.pad_id,
    }  # fmt: skip
    if eos_id is not None:
        config["eos_token_id"] = eos_id
    return config


def export_hf(job: JobConfig, state_dict: dict[str, torch.Tensor], out_dir: Path) -> None:
    cfg = job.model
    tensors = {hf_name(name): value for name, value in state_dict.items()}
    eos_id = None
    if job.data is not None:
        from scaletrain.recipes.t5.data import vocab_for

        eos_id = vocab_for(job).eos
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(hf_config(cfg, eos_id), indent=2))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out_dir / "model.safetensors"), {"format": "pt"})


def import_hf(hf_dir: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A T5ForConditionalGeneration folder (one model.safetensors) -> (model overrides, our tensors)."""
    config = json.loads((hf_dir / "config.json").read_text())
    if config.get("feed_forward_proj", "relu") not in ("relu", "gated-gelu"):
        raise ValueError(f"config.json: feed_forward_proj={config['feed_forward_proj']!r}; the T5 recipe has "
                         "relu and gated-gelu")  # fmt: skip
    if not (hf_dir / "model.safetensors").is_file():
        raise ValueError(f"{hf_dir}: no model.safetensors; only single-file safetensors weights are imported")
    hf_tensors = load_file(str(hf_dir / "model.safetensors"))
    # transformers 5 writes tie_word_embeddings=true always and keeps the scaling choice in scale_decoder_outputs.
    scaled = config.get("scale_decoder_outputs", config.get("tie_word_embeddings", True))
    head = hf_tensors.get("lm_head.weight")
    untied = head is not None and not torch.equal(head, hf_tensors["shared.weight"])
    if scaled == untied:
        raise ValueError("config.json: a tied head without the d_model^-0.5 scaling, or an untied one with it, is "
                         "not a T5 the recipe expresses")  # fmt: skip
    model = {
        "vocab_size": config["vocab_size"], "dim": config["d_model"], "head_dim": config["d_kv"],
        "ffn_hidden": config["d_ff"], "n_layers": config["num_layers"],
        "n_decoder_layers": config.get("num_decoder_layers") or config["num_layers"], "n_heads": config["num_heads"],
        "num_buckets": config.get("relative_attention_num_buckets", 32),
        "max_distance": config.get("relative_attention_max_distance", 128),
        "norm_eps": config.get("layer_norm_epsilon", 1e-6), "mlp": config.get("feed_forward_proj", "relu"),
        "tie_embeddings": not untied, "pad_id": config.get("pad_token_id", 0),
    }  # fmt: skip
    with torch.device("meta"):
        from scaletrain.recipes.t5.model import T5

        names = [n for n, _ in T5(T5Config(**model)).named_parameters()]
    return model, {name: hf_tensors[hf_name(name)] for name in names}
