"""fairscale as the engine: OSS (ZeRO-1) under DDP and OSS + ShardedDDP (ZeRO-2) train the tiny GPT like one
native process (2 ranks, gloo, fp32, 5 steps; losses within 1e-5 relative, observed equal to the printed
digits), with and without gradient accumulation."""

from __future__ import annotations

import pytest
from st_common import FAST, TINY

from scaletrain.config import load_config
from scaletrain.parity import compare, run_layout
from scaletrain.validate import validate_config

pytest.importorskip("fairscale")

FP32_LOSS_RTOL = 1e-5
FP32_GNORM_RTOL = 1e-4
FAIRSCALE = ["--engine.name", "fairscale", "--parallel.dp_shard", "2"]
MODES = {
    "oss_ddp": ["--engine.fairscale.mode", "oss"],
    "sharded_ddp": ["--engine.fairscale.mode", "sharded_ddp"],
    # Accumulation goes through no_sync(); ShardedDDP's reduce buckets once kept stale gradients here.
    "sharded_ddp_grad_accum": ["--engine.fairscale.mode", "sharded_ddp", "--train.micro_batch_size", "2"],
}


@pytest.fixture(scope="module")
def native_baseline(tmp_path_factory):
    return run_layout(TINY, FAST, tmp_path_factory.mktemp("base"), "single", nproc=1)


@pytest.mark.parametrize("mode", list(MODES))
def test_fairscale_matches_native_single_process(mode, native_baseline, tmp_path):
    report = compare(native_baseline, run_layout(TINY, FAST + FAIRSCALE + MODES[mode], tmp_path, mode, nproc=2))
    assert len(report.steps) == 5
    assert report.max_loss_rel_diff <= FP32_LOSS_RTOL, report.table()
    assert report.max_grad_norm_rel_diff <= FP32_GNORM_RTOL, report.table()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["--parallel.pp", "2", "--parallel.dp_shard", "1"],
            r"parallel\.pp: 2 is not available with engine",
        ),
        (
            ["--parallel.tp", "2", "--parallel.dp_shard", "1"],
            r"parallel\.tp: 2 is not available with engine",
        ),
        (["--train.dtype", "fp16", "--train.loss_scaler", "dynamic"], r"train\.dtype: fp16 with engine\.name=fair"),
        (["--engine.fairscale.mode", "fsdp"], r"engine\.fairscale\.mode: 'fsdp' is not allowed"),
    ],
    ids=["pp", "tp", "fp16", "fsdp"],
)
def test_bad_fairscale_configs_fail_before_any_process_starts(overrides, message):
    with pytest.raises(ValueError, match=message):
        validate_config(load_config(TINY, ["--engine.name", "fairscale", *overrides]), 2)
