"""model.attention=auto: the resolution rule, checked with fake device facts (no GPU needed), and the GPT
recipe resolving it once at build time and installing the concrete implementation on every block."""

from __future__ import annotations

import pytest
import torch
from st_common import TINY

from scaletrain import ops
from scaletrain.config import load_config
from scaletrain.recipes.gpt import attention_choice
from scaletrain.registry import get_recipe
from scaletrain.validate import validate_config

H100 = lambda: (9, 0)  # noqa: E731 - fake torch.cuda.get_device_capability
WITH_TRITON = lambda: True  # noqa: E731
NO_TRITON = lambda: False  # noqa: E731


def _resolve(device_type: str = "cuda", dtype: torch.dtype = torch.bfloat16, head_dim: int = 64, **kw):  # noqa: ANN003, ANN202
    kw.setdefault("capability", H100)
    kw.setdefault("triton_available", WITH_TRITON)
    return ops.resolve_attention("auto", device_type=device_type, dtype=dtype, head_dim=head_dim, **kw)


def test_cpu_picks_sdpa():
    choice = _resolve("cpu", torch.float32)
    assert choice.impl == "sdpa" and "cpu" in choice.reason


@pytest.mark.parametrize(
    "kw, why",
    [
        (dict(triton_available=NO_TRITON), "triton is not installed"),
        (dict(head_dim=96), "head dim 96"),
        (dict(dtype=torch.float32), "float32"),
        (dict(table={}), "sm_90: no measurement"),
        (dict(table={(8, 0): 1024}), "sm_90: no measurement"),  # measured on another card only
        (dict(table={(9, 0): 2048}, seq_len=1024), "only from seq 2048"),
    ],
    ids=["no-triton", "head-dim", "fp32", "unmeasured", "other-card", "too-short"],
)
def test_cuda_falls_back_to_sdpa(kw, why):  # noqa: ANN001
    choice = _resolve(**kw)
    assert choice.impl == "sdpa" and why in choice.reason, choice


@pytest.mark.parametrize("seq_len", [2048, 8192, None])
def test_cuda_picks_triton_where_measured_faster(seq_len):  # noqa: ANN001
    for dtype in (torch.bfloat16, torch.float16):
        choice = _resolve(dtype=dtype, table={(9, 0): 2048}, seq_len=seq_len)
        assert choice.impl == "triton" and "sm_90" in choice.reason, choice


def test_capability_is_only_queried_on_cuda():
    def no_gpu() -> tuple[int, int]:
        raise AssertionError("asked for a CUDA capability on a CPU run")

    assert _resolve("cpu", capability=no_gpu).impl == "sdpa"


def test_explicit_choice_overrides_auto():
    for impl in ("sdpa", "eager", "flex", "triton"):
        choice = ops.resolve_attention(impl, device_type="cpu", dtype=torch.float32, head_dim=24)
        assert choice.impl == impl and choice.describe(impl) == f"{impl} (set)"
    with pytest.raises(ValueError, match="model.attention: unknown implementation 'fastest'"):
        ops.resolve_attention("fastest", device_type="cpu", dtype=torch.float32, head_dim=16)


def test_auto_reads_the_shipped_table(monkeypatch):
    """Without `table=`, auto reads ops.TRITON_ATTENTION_FASTER (filled by a GPU benchmark run): an entry for the
    card turns auto into triton from its length on; without one, sdpa."""
    monkeypatch.setattr(ops, "TRITON_ATTENTION_FASTER", {})
    assert _resolve(seq_len=4096).impl == "sdpa"
    monkeypatch.setattr(ops, "TRITON_ATTENTION_FASTER", {(9, 0): 2048})
    assert _resolve(seq_len=4096).impl == "triton"
    assert _resolve(seq_len=1024).impl == "sdpa"
    assert _resolve(seq_len=4096, capability=lambda: (8, 0)).impl == "sdpa"  # another card


def test_auto_at_call_time_runs_the_resolved_implementation():
    # A model built outside the trainer keeps "auto"; on CPU it must be exactly SDPA.
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 4, 9, 16, generator=g) for _ in range(3))
    k, v = k[:, :2], v[:, :2]  # grouped-query heads
    want = ops.attention(q, k, v, causal=True, impl="sdpa")
    assert torch.equal(ops.attention(q, k, v, causal=True, impl="auto"), want)


def test_gpt_recipe_resolves_once_and_installs_the_choice():
    cfg = load_config(TINY, [])
    assert cfg.model.attention == "auto"  # the recipe default
    dims = validate_config(cfg, 1)
    expected = attention_choice(cfg)
    if not torch.cuda.is_available():
        assert expected.impl == "sdpa"
    recipe = get_recipe("gpt")
    with torch.device("meta"):
        model = recipe.model.build(cfg.model)
    model = recipe.model.parallelize(model, dims, cfg)
    assert {block.attention.attention_fn.keywords["impl"] for block in model.layers.values()} == {expected.impl}
    (note,) = recipe.model.startup_notes(model, cfg, dims)
    assert note.startswith(f"kernels: attention auto -> {expected.impl} (") and "fused: none" in note, note


def test_startup_line_names_explicit_choice_and_fused_kernels():
    cfg = load_config(TINY, ["--model.attention", "eager", "--model.fused_norm", "true"])
    recipe = get_recipe("gpt")
    with torch.device("meta"):
        model = recipe.model.build(cfg.model)
    dims = validate_config(cfg, 1)
    model = recipe.model.parallelize(model, dims, cfg)
    (note,) = recipe.model.startup_notes(model, cfg, dims)
    assert note.startswith("kernels: attention eager (set) | fused: norm ("), note
