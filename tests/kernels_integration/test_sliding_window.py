"""Sliding-window attention (model.sliding_window, ops.attention(window=...)).

- Each implementation (sdpa with an explicit mask, flex with a BlockMask, the Triton kernel) equals eager
  with the window, forward and every input gradient, fp32 atol = rtol = 1e-5; eager with the window equals
  the kernels package's independent reference (kernels.reference.attention_reference), so the convention
  (each query sees the `window` keys ending at its own position) is pinned by two codes.
- window = 1 makes every query see only its own key: the output is v itself (so the mask is real).
- A tiny GPT with a window trains with the same losses under sdpa and triton (1e-5 relative), and
  differently from the same model without a window (the window reaches the model).
- Validation: a negative window and a window under context parallel fail before any process group.
Transformers' Mistral checks the exported model's logits (tests/checkpoint/test_export_hf.py).
"""

from __future__ import annotations

import pytest
import torch
from st_common import TINY

from scaletrain import ops
from scaletrain.config import load_config
from scaletrain.kernels.reference import attention_reference
from scaletrain.parity import compare, run_layout
from scaletrain.validate import validate_config

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TOL = 1e-5


def _qkv(t: int = 19) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(2, h, t, 16, generator=g).to(DEVICE) for h in (4, 2, 2)]  # grouped-query: 4 q, 2 kv


def _out_and_grads(impl: str, inputs: list[torch.Tensor], window: int, grad: bool = True) -> list[torch.Tensor]:
    xs = [x.clone().requires_grad_(grad) for x in inputs]
    out = ops.attention(*xs, causal=True, impl=impl, window=window)
    if not grad:
        return [out.detach()]
    out.square().sum().backward()
    return [out.detach(), *(x.grad for x in xs)]


@pytest.mark.parametrize("impl", ["sdpa", "triton", "flex"])
def test_windowed_attention_matches_eager(impl):  # noqa: ANN001
    if impl == "triton" and ops.fused_backend(torch.empty(0, device=DEVICE)) == "torch-fallback":
        pytest.skip("the Triton path cannot run here")
    grad = not (impl == "flex" and DEVICE.type == "cpu")  # FlexAttention has no CPU backward
    got = _out_and_grads(impl, _qkv(), window=5, grad=grad)
    want = _out_and_grads("eager", _qkv(), window=5, grad=grad)
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        torch.testing.assert_close(a, b, atol=TOL, rtol=TOL, msg=lambda m, i=i: f"tensor {i}: {m}")


def test_eager_window_equals_the_kernels_reference():
    q, k, v = _qkv()
    got = ops.attention(q, k, v, causal=True, impl="eager", window=5)
    torch.testing.assert_close(got, attention_reference(q, k, v, causal=True, window=5)[0], atol=TOL, rtol=TOL)
    assert (got - ops.attention(q, k, v, causal=True, impl="eager")).abs().max() > 1e-2, "the window changed nothing"


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_window_of_one_sees_only_itself(impl):  # noqa: ANN001
    q, k, v = _qkv(t=7)
    out = ops.attention(q, k, v, causal=True, impl=impl, window=1)
    torch.testing.assert_close(out, v.repeat_interleave(2, dim=1), atol=TOL, rtol=TOL)


SMALL = [
    "--model.n_layers", "2", "--model.dim", "64", "--data.seq_len", "16", "--train.global_batch_size", "2",
    "--train.steps", "3", "--train.warmup_steps", "1",
]  # fmt: skip


def test_gpt_with_window_trains_alike_under_sdpa_and_triton(tmp_path):  # noqa: ANN001
    if ops.fused_backend(torch.empty(0, device=DEVICE)) == "torch-fallback":
        pytest.skip("the Triton path cannot run here")
    window = ["--model.sliding_window", "4"]
    sdpa = run_layout(TINY, SMALL + window + ["--model.attention", "sdpa"], tmp_path, "sdpa", nproc=1)
    triton = run_layout(TINY, SMALL + window + ["--model.attention", "triton"], tmp_path, "triton", nproc=1)
    report = compare(sdpa, triton)
    assert report.max_loss_rel_diff <= TOL, report.table()
    full = run_layout(TINY, SMALL + ["--model.attention", "sdpa"], tmp_path, "full", nproc=1)
    assert abs(full[-1]["loss"] - sdpa[-1]["loss"]) > 1e-4, "model.sliding_window did not reach the model"


def test_bad_windows_fail_validation():
    with pytest.raises(ValueError, match="model.sliding_window: -1 is not allowed"):
        validate_config(load_config(TINY, ["--model.sliding_window", "-1"]), 1)
    with pytest.raises(ValueError, match=r"model.sliding_window: 8 is not supported with context parallel"):
        validate_config(load_config(TINY, ["--model.sliding_window", "8", "--parallel.cp", "2"]), 2)
