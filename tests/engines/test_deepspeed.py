"""DeepSpeed as the engine: every ZeRO stage trains the tiny GPT like one native process.

Each run is 2 ranks under torchrun (gloo, CPU) from the same layout-independent init and the same global
batches as the 1-process native baseline; scaletrain's AdamW is DeepSpeed's client optimizer, so the
arithmetic is the same and fp32 losses agree to 1e-5 relative (observed: equal to the printed digits);
bf16 runs stay within 5e-3 of the fp32 baseline.
"""

from __future__ import annotations

import json

import pytest
from st_common import FAST, REPO, TINY

from scaletrain.config import load_config
from scaletrain.parity import compare, run_layout
from scaletrain.validate import validate_config

pytest.importorskip("deepspeed")

FP32_LOSS_RTOL = 1e-5
FP32_GNORM_RTOL = 1e-4
LOW_PRECISION_LOSS_RTOL = 5e-3
DS = ["--engine.name", "deepspeed", "--parallel.dp_shard", "2"]
STAGES = {
    "zero0": ["--engine.deepspeed.zero_stage", "0"],
    "zero1": ["--engine.deepspeed.zero_stage", "1"],
    "zero2": ["--engine.deepspeed.zero_stage", "2"],
    "zero2_offload_optimizer": ["--engine.deepspeed.zero_stage", "2", "--engine.deepspeed.offload_optimizer", "cpu"],
    "zero3": ["--engine.deepspeed.zero_stage", "3"],
    "zero3_offload_param": ["--engine.deepspeed.zero_stage", "3", "--engine.deepspeed.offload_param", "cpu"],
    "zero3_offload_both": [
        "--engine.deepspeed.zero_stage", "3",
        "--engine.deepspeed.offload_param", "cpu",
        "--engine.deepspeed.offload_optimizer", "cpu",
    ],  # fmt: skip
    "zero2_grad_accum": ["--engine.deepspeed.zero_stage", "2", "--train.micro_batch_size", "2"],
}


@pytest.fixture(scope="module")
def native_baseline(tmp_path_factory):
    return run_layout(TINY, FAST, tmp_path_factory.mktemp("base"), "single", nproc=1)


@pytest.mark.parametrize("stage", list(STAGES))
def test_deepspeed_stage_matches_native_single_process(stage, native_baseline, tmp_path):
    rows = run_layout(TINY, FAST + DS + STAGES[stage], tmp_path, stage, nproc=2)
    report = compare(native_baseline, rows)
    assert len(report.steps) == 5
    assert report.max_loss_rel_diff <= FP32_LOSS_RTOL, report.table()
    assert report.max_grad_norm_rel_diff <= FP32_GNORM_RTOL, report.table()


def test_deepspeed_bf16_trains_close_to_fp32(native_baseline, tmp_path):
    """DeepSpeed's bf16 mode (bf16 compute copy, fp32 masters in the optimizer) against the fp32 run."""
    bf16 = ["--engine.deepspeed.zero_stage", "2", "--train.dtype", "bf16"]
    report = compare(native_baseline, run_layout(TINY, FAST + DS + bf16, tmp_path, "bf16", nproc=2))
    assert report.max_loss_rel_diff <= LOW_PRECISION_LOSS_RTOL, report.table()
    assert report.max_loss_rel_diff > 0, "bf16 equal to fp32 to the last digit: did bf16 run at all?"


def _cfg(*overrides: str):
    return load_config(TINY, ["--engine.name", "deepspeed", "--checkpoint.enable", "false", *overrides])


def test_deepspeed_json_follows_the_scaletrain_config(tmp_path):
    from scaletrain.engines.deepspeed_engine import deepspeed_config

    cfg = _cfg("--train.micro_batch_size", "2", "--train.dtype", "bf16", "--engine.deepspeed.zero_stage", "3")
    ds = deepspeed_config(cfg, validate_config(cfg, 4))
    assert ds["train_batch_size"] == 16 and ds["train_micro_batch_size_per_gpu"] == 2
    assert ds["gradient_accumulation_steps"] == 2  # 16 = 4 ranks x 2 x 2
    assert ds["bf16"] == {"enabled": True} and ds["zero_optimization"]["stage"] == 3


def test_a_users_ds_config_adds_keys_but_cannot_contradict(tmp_path):
    from scaletrain.engines.deepspeed_engine import deepspeed_config

    mine = tmp_path / "ds_config.json"
    mine.write_text(json.dumps({"zero_optimization": {"stage": 2, "overlap_comm": True}, "wall_clock_breakdown": True}))
    cfg = _cfg("--engine.deepspeed.config", str(mine))
    ds = deepspeed_config(cfg, validate_config(cfg, 2))
    assert ds["zero_optimization"] == {"stage": 2, "overlap_comm": True} and ds["wall_clock_breakdown"] is True

    # Hugging Face Trainer-style "auto" values are filled from the job, as if absent.
    shipped = REPO / "examples" / "deepspeed" / "ds_config.json"
    cfg = _cfg("--engine.deepspeed.config", str(shipped), "--train.micro_batch_size", "4")
    ds = deepspeed_config(cfg, validate_config(cfg, 2))
    assert ds["train_micro_batch_size_per_gpu"] == 4 and ds["gradient_accumulation_steps"] == 2
    assert ds["bf16"] == {"enabled": False} and ds["zero_optimization"]["overlap_comm"] is True

    mine.write_text(json.dumps({"train_batch_size": 32}))
    with pytest.raises(ValueError, match=r"train_batch_size = 32 in .* contradicts train\.global_batch_size"):
        validate_config(_cfg("--engine.deepspeed.config", str(mine)), 2)
    mine.write_text(json.dumps({"bf16": {"enabled": True}}))
    with pytest.raises(ValueError, match=r"bf16\.enabled = True .* contradicts train\.dtype"):
        validate_config(_cfg("--engine.deepspeed.config", str(mine)), 2)
    mine.write_text(json.dumps({"optimizer": {"type": "Adam"}}))
    with pytest.raises(ValueError, match=r"sets 'optimizer'; scaletrain owns the optimizer"):
        validate_config(_cfg("--engine.deepspeed.config", str(mine)), 2)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["--parallel.tp", "2", "--parallel.dp_shard", "1"], r"parallel\.tp: 2 is not available with engine\.name"),
        (["--parallel.pp", "2", "--parallel.dp_shard", "1"], r"parallel\.pp: 2 is not available with engine\.name"),
        (["--engine.deepspeed.zero_stage", "4"], r"engine\.deepspeed\.zero_stage: 4 is not allowed"),
        (["--engine.deepspeed.offload_param", "cpu"], r"offload_param: needs zero_stage 3 \(got 2\)"),
        (["--engine.deepspeed.zero_stage", "0", "--engine.deepspeed.offload_optimizer", "cpu"], r"needs zero_stage 1"),
        (
            ["--engine.deepspeed.offload_optimizer", "nvme", "--engine.deepspeed.nvme_path", "/no/such/disk"],
            r"engine\.deepspeed\.nvme_path: '/no/such/disk' is not an existing folder",
        ),
        (["--engine.deepspeed.config", "/no/such.json"], r"engine\.deepspeed\.config: '/no/such\.json' does not exist"),
    ],
    ids=["tp", "pp", "stage4", "param_offload_stage2", "offload_stage0", "nvme_missing", "json_missing"],
)
def test_bad_deepspeed_configs_fail_before_any_process_starts(overrides, message):
    with pytest.raises(ValueError, match=message):
        validate_config(_cfg(*overrides), 2)


def test_unknown_engine_names_the_closest():
    with pytest.raises(ValueError, match=r"engine\.name: 'deepspeedd' is not allowed \(did you mean 'deepspeed'\?\)"):
        load_config(TINY, ["--engine.name", "deepspeedd"])

