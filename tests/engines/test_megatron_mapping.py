"""The GPT recipe's megatron-core translation (scaletrain/recipes/gpt/megatron.py), on the CPU.

For Llama-style (GQA), Qwen3-style (q/k norms, wide heads) and GPT-2-style (learned positions, LayerNorm,
tanh GELU, biases, tied embeddings) models: scaletrain's initialized weights, mapped to megatron's names, load
into megatron-core's GPTModel with nothing missing or left over; both models give the same logits (fp32,
1e-5) and the same gradients for every weight, mapped back (1e-5 of each gradient's norm); and megatron ->
scaletrain returns exactly the tensors it was given. The worker is this file run under torchrun (megatron
needs its parallel_state)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("megatron.core")

STYLES = {
    "llama-gqa": {"n_kv_heads": 2},
    "qwen3": {"n_kv_heads": 2, "qk_norm": True, "head_dim": 64},
    "gpt2-tied": {"norm": "layernorm", "pos": "learned", "mlp": "gelu", "bias": True, "tie_embeddings": True},
}


def _worker() -> None:
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state

    from scaletrain.parallel import init_model
    from scaletrain.recipes.gpt.megatron import build_megatron_gpt, from_megatron, to_megatron
    from scaletrain.recipes.gpt.model import GPT, GPTConfig

    dist.init_process_group("gloo")
    parallel_state.initialize_model_parallel(1, 1)
    for style, fields in STYLES.items():
        cfg = GPTConfig(vocab_size=96, dim=128, n_layers=2, n_heads=4, max_seq_len=32, **fields)
        ours = init_model(GPT(cfg), "cpu", seed=7)
        theirs = build_megatron_gpt(cfg)
        mapped = to_megatron(cfg, ours.state_dict())
        result = theirs.load_state_dict(mapped, strict=False)
        assert not result.unexpected_keys, (style, result.unexpected_keys)
        assert all(k.endswith("_extra_state") for k in result.missing_keys), (style, result.missing_keys)

        tokens = torch.randint(0, cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
        probe = torch.randn(2, 24, cfg.vocab_size, generator=torch.Generator().manual_seed(1))
        ours_logits = ours(tokens)
        theirs_logits = theirs(tokens, torch.arange(24).expand(2, 24), attention_mask=None)
        torch.testing.assert_close(theirs_logits, ours_logits, rtol=1e-5, atol=1e-5, msg=style)
        (ours_logits * probe).sum().backward()
        (theirs_logits * probe).sum().backward()
        grads = {n: p.grad for n, p in theirs.named_parameters()}
        mapped_back = from_megatron(cfg, grads)
        for name, param in ours.named_parameters():
            if name.endswith("attention.wk.bias"):  # zero in exact arithmetic: softmax ignores what it adds
                assert max(float(param.grad.norm()), float(mapped_back[name].norm())) < 1e-5, (style, name)
                continue
            # Relative to the gradient's norm: the same sums in another order.
            error = float((mapped_back[name] - param.grad).norm() / param.grad.norm())
            assert error < 1e-5, (style, name, error)

        megatron_state = {k: v for k, v in theirs.state_dict().items() if not k.endswith("_extra_state")}
        back = from_megatron(cfg, megatron_state)
        assert sorted(back) == sorted(n for n, _ in ours.named_parameters()), style
        assert all(torch.equal(back[k], ours.state_dict()[k]) for k in back), style
        print(f"MEGATRON-OK {style}", flush=True)
    dist.destroy_process_group()


def test_megatron_gpt_matches_scaletrains_logits_gradients_and_maps_back():
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1", __file__]
    done = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    assert done.stdout.count("MEGATRON-OK") == len(STYLES), done.stdout


if __name__ == "__main__":
    _worker()
