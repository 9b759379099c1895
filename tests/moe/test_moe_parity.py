"""MoE layouts train like one process: tiny MoE (4 experts, top-2, a shared expert, the sequence-wise
balancing loss and auxiliary-loss-free biases; Qwen3-style attention), fp32, 5 steps, 2 or 4 ranks: losses
and gradient norms within 1e-5 relative (observed ~1e-7), and the logged loads and balancing loss equal.
Dropless routing makes each token's result independent of the others; the balancing loss counts whole
sequences (summed over the cp and tp ranks holding its parts) and the expert loads are summed over the ranks
before the biases move, so the routing is the same in every layout, with or without expert parallel."""

from __future__ import annotations

import pytest
from st_common import REPO

from scaletrain.parity import compare, run_layout

CONFIG = str(REPO / "scaletrain" / "recipes" / "gpt" / "configs" / "tiny-moe.yaml")
SMALL = [
    "--train.steps", "5", "--train.warmup_steps", "2", "--model.n_layers", "2", "--data.seq_len", "64",
    "--train.global_batch_size", "8", "--model.moe.num_experts", "4", "--model.moe.bias_update_rate", "0.05",
    # Qwen3-style attention (per-head q/k norms, heads wider than dim / n_heads), so every layout runs it too.
    "--model.qk_norm", "true", "--model.head_dim", "64",
]  # fmt: skip
FP32_LOSS_RTOL = 1e-5
LAYOUTS = {
    "fsdp2": ["--parallel.dp_shard", "2"],
    "ddp2_grad_accum": ["--parallel.dp_replicate", "2", "--parallel.dp_shard", "1", "--train.micro_batch_size", "2"],
    "cp2_ring": ["--parallel.cp", "2", "--parallel.dp_shard", "1"],
    "ac_op_fsdp2": ["--activation_checkpoint.mode", "selective", "--parallel.dp_shard", "2"],
    "deepspeed_zero2": ["--engine.name", "deepspeed", "--parallel.dp_shard", "2"],
    # Expert parallel (1 or 2 experts per rank; the collapsed early routing leaves some ranks' experts with
    # no tokens in some steps, the uneven all-to-all case):
    "ep2": ["--parallel.dp_shard", "2", "--parallel.ep", "2"],
    "ep2_ac_accum": [
        "--parallel.dp_shard",
        "2",
        "--parallel.ep",
        "2",
        "--activation_checkpoint.mode",
        "full",
        "--train.micro_batch_size",
        "2",
    ],
    "ep2_dp_shard4": ["--parallel.dp_shard", "4", "--parallel.ep", "2"],  # experts FSDP-sharded over 2 ranks
    "ep2_hsdp": ["--parallel.dp_replicate", "2", "--parallel.dp_shard", "2", "--parallel.ep", "2"],
    "ep4_cp2": ["--parallel.dp_shard", "2", "--parallel.cp", "2", "--parallel.ep", "4"],
    # Tensor parallel: each tp rank routes its slice of the sequence; the shared expert is split Megatron-style.
    "tp2": ["--parallel.tp", "2", "--parallel.dp_shard", "1"],
    "ep2_tp2": ["--parallel.dp_shard", "2", "--parallel.ep", "2", "--parallel.tp", "2"],
    "ep2_cp2_tp2": ["--parallel.dp_shard", "1", "--parallel.cp", "2", "--parallel.ep", "2", "--parallel.tp", "2"],
}
# Pipeline stages cannot add earlier stages' balancing losses to the last stage's loss (refused): bias
# balancing only, against its own one-process run.
NO_AUX = ["--model.moe.aux_loss_coef", "0"]
PIPELINE_LAYOUTS = {
    "pp2": ["--parallel.pp", "2", "--parallel.dp_shard", "1"],
    "pp2_ep2": ["--parallel.pp", "2", "--parallel.dp_shard", "2", "--parallel.ep", "2"],
}
METRICS = ("moe/max_load", "moe/min_load", "moe/tokens_per_expert", "moe/balancing_loss", "moe/bias_l1")


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return run_layout(CONFIG, SMALL, tmp_path_factory.mktemp("single"), "single", nproc=1)


def _check(single: list[dict], rows: list[dict], layout: str) -> None:
    report = compare(single, rows)
    assert report.loss_a[0] != report.loss_a[-1]
    assert report.max_loss_rel_diff <= FP32_LOSS_RTOL, report.table()
    # Adam hides a gradient off by a constant factor from the loss; the norm shows it (an expert gradient
    # divided twice under expert parallel once moved it by 0.1%).
    assert report.max_grad_norm_rel_diff <= FP32_LOSS_RTOL, report.table()
    for ours, theirs in zip(single, rows, strict=True):
        for key in METRICS:
            assert ours[key] == pytest.approx(theirs[key], rel=1e-5), (layout, ours["step"], key)
        # The auxiliary-loss-free biases: the same on every rank (and, by bias_l1 above, as in one process).
        assert theirs["moe/bias_spread"] == 0, (layout, theirs["step"])
    # The biases moved the routing away from collapse: the load was not the same every step.
    assert len({round(r["moe/max_load"], 6) for r in single}) > 1


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_moe_layout_matches_single_process(layout, single, tmp_path):
    rows = run_layout(CONFIG, SMALL + LAYOUTS[layout], tmp_path, layout)  # as many processes as the degrees name
    _check(single, rows, layout)


@pytest.fixture(scope="module")
def single_bias_only(tmp_path_factory):
    return run_layout(CONFIG, SMALL + NO_AUX, tmp_path_factory.mktemp("single_bias_only"), "single", nproc=1)


@pytest.mark.parametrize(
    "layout", ["pp2", pytest.param("pp2_ep2", marks=pytest.mark.slow)]
)  # fmt: skip
def test_moe_pipeline_matches_single_process(layout, single_bias_only, tmp_path):
    rows = run_layout(CONFIG, SMALL + NO_AUX + PIPELINE_LAYOUTS[layout], tmp_path, layout)
    _check(single_bias_only, rows, layout)
