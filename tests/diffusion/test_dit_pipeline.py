"""Pipeline parallel DiT: the recipe's PipelineSpec splits the blocks, stages pass (tokens,
conditioning vector) along, and every schedule family gives the one-process losses.

fp32, 4 steps, tolerances as the GPT's pipeline tests (tests/core/test_pipeline_context.py):
loss 1e-5 relative, grad norm 1e-4 relative (measured ~1e-7: only the reduction order differs).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from scaletrain.config import load_config
from scaletrain.parity import compare, run_layout
from scaletrain.validate import validate_config

CONFIG = str(Path(__file__).resolve().parents[2] / "scaletrain/recipes/diffusion/configs/dit-tiny.yaml")
COMMON = ["--model.image_size", "16", "--model.patch_size", "4", "--model.dim", "64", "--model.depth", "4",
          "--model.n_heads", "4", "--train.steps", "4", "--train.warmup_steps", "1", "--train.global_batch_size", "8",
          "--train.ema_decay", "0", "--eval.interval", "0", "--metrics.console", "false",
          "--parallel.dp_shard", "1"]  # fmt: skip
LOSS_RTOL, GNORM_RTOL = 1e-5, 1e-4
V2 = ["--parallel.stages_per_rank", "2", "--parallel.microbatches", "4"]
LAYOUTS = {
    "pp2_1f1b": (["--parallel.pp", "2", "--parallel.pp_schedule", "1f1b", "--parallel.microbatches", "4"], 2),
    "pp2_interleaved_v2": (["--parallel.pp", "2", "--parallel.pp_schedule", "interleaved_1f1b", *V2], 2),
    # V-shaped: rank 0 holds the first and the last stage, so (h, c) goes there and back.
    "pp2_zbv": (["--parallel.pp", "2", "--parallel.pp_schedule", "zbv", *V2], 2),
    "pp2xtp2": (["--parallel.pp", "2", "--parallel.tp", "2"], 4),
}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> list[dict]:
    return run_layout(CONFIG, COMMON, tmp_path_factory.mktemp("ref"), "ref", nproc=1)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_dit_pipeline_matches_one_process(layout, reference, tmp_path):
    overrides, nproc = LAYOUTS[layout]
    report = compare(reference, run_layout(CONFIG, COMMON + overrides, tmp_path, layout, nproc=nproc))
    print(f"{layout}: max rel diff loss {report.max_loss_rel_diff:.1e}, grad norm {report.max_grad_norm_rel_diff:.1e}")
    assert report.loss_a[0] != report.loss_a[-1]  # training moved the loss
    assert report.max_loss_rel_diff <= LOSS_RTOL, report.table()
    assert report.max_grad_norm_rel_diff <= GNORM_RTOL, report.table()


def test_depth_not_splittable_is_named():
    cfg = load_config(CONFIG, [*COMMON, "--model.depth", "2", "--parallel.pp", "4", "--checkpoint.enable", "false"])
    with pytest.raises(ValueError, match=r"parallel\.pp: 2 layers cannot be split into 4 pipeline stages"):
        validate_config(cfg, 4)


def test_evaluation_under_pipeline_is_refused():
    cfg = load_config(CONFIG, [*COMMON, "--parallel.pp", "2", "--eval.interval", "10"])
    with pytest.raises(ValueError, match=r"eval\.interval: .* pipeline parallel"):
        validate_config(cfg, 2)
