"""Export and import: consolidated safetensors, and Hugging Face folders that `transformers` loads.

A few training steps make a real checkpoint (one process); its weights are exported, loaded
with `transformers` (Llama with grouped-query attention, untied and tied; Mistral = Llama with a
sliding window; GPT-2 style; Qwen3 with q/k norms and decoupled head width; the mixtures of experts
Mixtral and Qwen3-MoE), and
the logits compared with scaletrain's model in fp32 (atol/rtol 1e-5). Importing the HF folder
back must give exactly the exported state.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from ckpt_harness import TINY
from safetensors.torch import load_file

from scaletrain.checkpoint.export import consolidated_tensors
from scaletrain.cli import main as cli_main
from scaletrain.config import load_config
from scaletrain.parallel import init_model
from scaletrain.registry import get_recipe
from scaletrain.train import run

transformers = pytest.importorskip("transformers")

SMALL = ["--model.n_layers", "2", "--data.seq_len", "32", "--train.global_batch_size", "4", "--train.steps", "2"]
SMALL += ["--train.warmup_steps", "1", "--metrics.tensorboard", "false", "--metrics.console", "false"]
STYLES = {
    "llama-gqa": ["--model.n_kv_heads", "2"],
    "llama-gqa-tied-bias": ["--model.n_kv_heads", "2", "--model.tie_embeddings", "true", "--model.bias", "true"],
    # A window shorter than the 32 compared positions: transformers' Mistral must mask like we do.
    "mistral-window": ["--model.n_kv_heads", "2", "--model.sliding_window", "8"],
    "gpt2": ["--model.norm", "layernorm", "--model.pos", "learned", "--model.mlp", "gelu", "--model.bias", "true"]
    + ["--model.n_kv_heads", "0"],
    # Qwen3: per-head q/k norms, heads wider than dim / n_heads (4 x 64 on a 128-wide model).
    "qwen3": ["--model.n_kv_heads", "2", "--model.qk_norm", "true", "--model.head_dim", "64"],
    # Mixture of experts (trained with the balancing loss; dropless, no routing biases).
    "mixtral": ["--model.n_kv_heads", "2", "--model.moe.num_experts", "4", "--model.moe.expert_hidden", "64"],
    "qwen3-moe": ["--model.n_kv_heads", "2", "--model.qk_norm", "true", "--model.head_dim", "64",
                  "--model.moe.num_experts", "4", "--model.moe.expert_hidden", "64", "--model.moe.first_dense", "1",
                  "--model.moe.norm_topk", "false"],
}  # fmt: skip
MODEL_TYPES = {"gpt2": "gpt2", "mistral-window": "mistral", "qwen3": "qwen3", "mixtral": "mixtral"}
MODEL_TYPES["qwen3-moe"] = "qwen3_moe"


def _checkpoint(tmp_path: Path, style: str) -> tuple[Path, object]:
    cfg = load_config(TINY, [*SMALL, *STYLES[style], "--job.run_dir", str(tmp_path), "--job.name", style])
    run(cfg)
    return tmp_path / style / "checkpoints" / "step-00000002", cfg


def _our_logits(cfg, state: dict[str, torch.Tensor], tokens: torch.Tensor) -> torch.Tensor:
    model = get_recipe("gpt").model.build(cfg.model)
    init_model(model, "cpu", seed=123)  # fills the RoPE buffers; the weights are then overwritten
    model.load_state_dict(state, strict=True)
    logits = model.eval()(tokens)
    return logits[0] if isinstance(logits, tuple) else logits  # MoE: (logits, balancing losses)


@pytest.mark.parametrize("style", list(STYLES))
def test_hf_export_matches_logits_and_imports_back(style, tmp_path):
    ckpt, cfg = _checkpoint(tmp_path, style)
    state = consolidated_tensors(ckpt)
    hf_dir = tmp_path / "hf"
    assert cli_main(["export", str(ckpt), "--format", "hf", "--out", str(hf_dir)]) == 0
    config = json.loads((hf_dir / "config.json").read_text())
    assert config["model_type"] == MODEL_TYPES.get(style, "llama")

    hf_model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    tokens = torch.randint(0, cfg.model.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = _our_logits(cfg, state, tokens)
        theirs = hf_model(tokens).logits
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)
    _check_tokenizer_and_files(hf_dir, config, hf_model)

    # Import our folder back, and the folder transformers itself saves (its own layout, e.g. fused experts).
    resaved = tmp_path / "resaved"
    hf_model.save_pretrained(resaved)
    for i, folder in enumerate((hf_dir, resaved)):
        out = tmp_path / f"imported-{i}"
        assert cli_main(["import", "hf", str(folder), "--out", str(out)]) == 0
        back = consolidated_tensors(out / "step-00000000")
        assert sorted(back) == sorted(state), folder
        for key in state:
            assert torch.equal(back[key], state[key]), (folder, key)


def _check_tokenizer_and_files(hf_dir: Path, config: dict, hf_model) -> None:
    """The folder is usable as a whole: its tokenizer (the run's byte tokenizer) loads in AutoTokenizer and
    drives generate(), its special-token ids exist in the vocabulary, and every file is readable by others."""
    assert config["bos_token_id"] == config["eos_token_id"] == 256 < config["vocab_size"]
    tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
    prompt = tokenizer("def main():", return_tensors="pt")
    assert prompt["input_ids"][0].tolist() == list(b"def main():")
    generated = hf_model.generate(**prompt, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    assert 0 < generated.shape[1] - prompt["input_ids"].shape[1] <= 8
    assert isinstance(tokenizer.decode(generated[0]), str)
    umask = os.umask(0)
    os.umask(umask)
    for path in hf_dir.iterdir():
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask, path


def test_imported_checkpoint_continues_pretraining_via_load_path(tmp_path):
    ckpt, _ = _checkpoint(tmp_path, "llama-gqa")
    hf_dir, out = tmp_path / "hf", tmp_path / "imported"
    assert cli_main(["export", str(ckpt), "--format", "hf", "--out", str(hf_dir)]) == 0
    assert cli_main(["import", "hf", str(hf_dir), "--out", str(out)]) == 0
    # Re-exporting imported weights writes no tokenizer: which one they were trained with is not known.
    assert cli_main(["export", str(out / "step-00000000"), "--format", "hf", "--out", str(tmp_path / "again")]) == 0
    assert not (tmp_path / "again" / "tokenizer.json").exists() and (tmp_path / "again" / "config.json").exists()
    cfg = load_config(TINY, [*SMALL, *STYLES["llama-gqa"], "--job.run_dir", str(tmp_path), "--job.name", "cont"])
    cfg.checkpoint.load_path = str(out / "step-00000000")
    history = run(cfg)
    assert history[0]["loss"] < 5.0  # trained weights, not a fresh init (~5.6)


def test_safetensors_export_is_the_consolidated_model(tmp_path):
    ckpt, _ = _checkpoint(tmp_path, "llama-gqa")
    out = tmp_path / "model.safetensors"
    assert cli_main(["export", str(ckpt), "--format", "safetensors", "--out", str(out)]) == 0
    exported, state = load_file(str(out)), consolidated_tensors(ckpt)
    assert sorted(exported) == sorted(state) and "tok_embeddings.weight" in exported
    assert all(torch.equal(exported[k], state[k]) for k in state)


def test_ckpt_info_reports_a_checkpoint(tmp_path, capsys):
    ckpt, cfg = _checkpoint(tmp_path, "llama-gqa")
    assert cli_main(["ckpt", "info", str(ckpt)]) == 0
    out = capsys.readouterr().out
    params = sum(t.numel() for t in consolidated_tensors(ckpt).values())
    for expected in ("step:             2", "layout:           single process", "world size:       1"):
        assert expected in out, out
    assert f"parameters:       {params:,}" in out and "complete" in out
    (ckpt / "trainer.json").write_text("{}")  # damage it: info must say so, not crash
    assert cli_main(["ckpt", "info", str(ckpt.parent)]) == 0
    assert "DAMAGED" in capsys.readouterr().out
