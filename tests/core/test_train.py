"""The train loop end to end in one process: outputs, reproducibility, the golden loss
curve, NaN detection, resume, the CLI's model summary and the benchmark."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from st_common import FAST, REPO, TINY

from scaletrain.bench import bench
from scaletrain.cli import main as cli_main
from scaletrain.config import load_config
from scaletrain.train import NonFiniteLossError, run

# Regenerated only by scripts/update_golden.py, for a change meant to move the numbers.
GOLDEN = REPO / "tests" / "assets" / "golden_gpt_tiny_20steps.json"
# The golden curve is CPU fp32 from one seed. Across CPUs (vector widths, BLAS kernels) sums
# round differently; 1e-4 relative over 20 steps absorbs that and still catches any real
# change to the model, data order, init or optimizer (those move step-1 loss by >1e-3).
GOLDEN_RTOL = 1e-4


def _train(tmp_path: Path, *overrides: str, name: str = "t"):
    cfg = load_config(TINY, [*overrides, "--job.run_dir", str(tmp_path), "--job.name", name])
    return run(cfg)


def test_run_writes_metrics_tensorboard_and_checkpoint(tmp_path):
    history = _train(tmp_path, *FAST)
    run_dir = tmp_path / "t"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    for key in ("loss", "grad_norm", "lr", "throughput", "mem_gib"):
        assert all(isinstance(r[key], float) for r in rows), key
    assert any((run_dir / "tb").rglob("events.out.tfevents.*"))
    assert (run_dir / "checkpoints" / "step-00000005" / "manifest.json").is_file()
    assert [h["loss"] for h in history] == [r["loss"] for r in rows]


def test_same_config_is_bitwise_reproducible(tmp_path):
    a = _train(tmp_path, *FAST, "--checkpoint.enable", "false", name="a")
    b = _train(tmp_path, *FAST, "--checkpoint.enable", "false", name="b")
    assert [(h["loss"], h["grad_norm"]) for h in a] == [(h["loss"], h["grad_norm"]) for h in b]


def test_golden_loss_curve(tmp_path):
    history = _train(tmp_path, "--train.steps", "20", "--checkpoint.enable", "false", "--metrics.tensorboard", "false")
    losses = [h["loss"] for h in history]
    golden = json.loads(GOLDEN.read_text())["loss"]
    assert len(losses) == len(golden) == 20
    for step, (got, want) in enumerate(zip(losses, golden, strict=True), start=1):
        assert math.isclose(got, want, rel_tol=GOLDEN_RTOL), f"step {step}: loss {got} vs golden {want}"
    assert losses[-1] < losses[0] - 1.0  # it learns


def test_nan_loss_stops_with_the_step(tmp_path, monkeypatch):
    import torch.nn.functional as F

    real_cross_entropy, calls = F.cross_entropy, []

    def poisoned(*args, **kwargs):  # the third optimizer step's loss becomes NaN
        loss = real_cross_entropy(*args, **kwargs)
        if loss.device.type == "meta":  # FLOP counting, not training
            return loss
        calls.append(1)
        return loss * float("nan") if len(calls) == 3 else loss

    monkeypatch.setattr(F, "cross_entropy", poisoned)
    with pytest.raises(NonFiniteLossError, match="loss is nan at step 3"):
        _train(tmp_path, *FAST, "--checkpoint.enable", "false")


def test_resume_continues_exactly(tmp_path):
    common = [*FAST, "--train.steps", "6", "--checkpoint.interval", "3", "--metrics.tensorboard", "false"]
    straight = _train(tmp_path, *common, name="straight")
    first = _train(tmp_path, *common, "--train.steps", "3", name="resumed")
    # The second invocation of the same command picks up the step-3 checkpoint.
    second = _train(tmp_path, *common, name="resumed")
    assert [h["step"] for h in second] == [4, 5, 6]
    assert [h["loss"] for h in first + second] == [h["loss"] for h in straight]


def test_config_show_counts_70b_on_cpu(capsys):
    assert cli_main(["config", "show", str(REPO / "scaletrain/recipes/gpt/configs/llama-70b.yaml")]) == 0
    out = capsys.readouterr().out
    m = load_config(str(REPO / "scaletrain/recipes/gpt/configs/llama-70b.yaml"), []).model
    kv = m.kv_heads * m.head_size
    per_layer = m.dim * m.dim * 2 + 2 * m.dim * kv + 3 * m.dim * m.hidden_dim + 2 * m.dim
    expected = 2 * m.vocab_size * m.dim + m.n_layers * per_layer + m.dim
    assert f"parameters: {expected:,}" in out
    assert expected == 70_553_706_496  # Llama-3-70B's published size
    assert "train_flops_per_token" in out


def test_bench_reports_ratio_against_plain_loop(tmp_path):
    cfg = load_config(TINY, [*FAST, "--job.run_dir", str(tmp_path)])
    result = bench(cfg, steps=2, warmup=1, rounds=1)
    assert result.scaletrain_rate > 0 and result.baseline_rate > 0
    assert set(result.baselines) == {"plain loop, scaletrain's model", "independent plain llama", "transformers llama"}
    assert all(rate > 0 for rate, _ in result.baselines.values())
    assert "scaletrain / loop" in result.report() and "transformers llama" in result.report()
    assert result.after_save is not None and result.after_save[0] > 0  # checkpointing on: steps after a save
    assert "scaletrain after a save" in result.report()
    saved = tmp_path / "gpt-tiny" / "checkpoints"
    assert not saved.exists() or not any(saved.iterdir())  # the bench's save went to a temporary folder


def test_parity_command_passes_for_equal_layouts_and_fails_for_different_models(capsys):
    common = [*FAST, "--train.steps", "3"]
    assert cli_main(["parity", TINY, "--a", "", "--b", "--parallel.dp_shard 2", *common]) == 0
    assert "PASS" in capsys.readouterr().out
    # A different model is not a layout: the harness must notice.
    assert cli_main(["parity", TINY, "--a", "", "--b", "--model.init_std 0.05", *common]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_compiled_blocks_match_eager(tmp_path):
    eager = _train(tmp_path, *FAST, "--train.steps", "3", "--checkpoint.enable", "false", name="eager")
    compiled = _train(
        tmp_path, *FAST, "--train.steps", "3", "--checkpoint.enable", "false", "--train.compile", "true", name="comp"
    )
    for a, b in zip(eager, compiled, strict=True):
        assert math.isclose(a["loss"], b["loss"], rel_tol=1e-4), (a, b)


def test_independent_bench_baselines_have_the_models_shape():
    """A fair comparison: the hand-written Llama and transformers' model hold exactly scaletrain's parameters."""
    from scaletrain.recipes.gpt.bench_baselines import bench_baselines
    from scaletrain.registry import get_recipe

    cfg = load_config(TINY, ["--model.n_kv_heads", "2"])
    ours = sum(p.numel() for p in get_recipe("gpt").model.build(cfg.model).parameters())
    for name, build in bench_baselines(cfg).items():
        assert sum(p.numel() for p in build().parameters()) == ours, name
