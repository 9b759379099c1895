"""Pipeline and context parallelism: stage splitting, bad input before launch, and parity with
one process for every schedule, both cp methods and 4-process combinations.

Tolerances as in test_parity.py: fp32 loss 1e-5 relative, grad norm 1e-4 relative."""

from __future__ import annotations

import pytest
from st_common import FAST, STEP_MEMORY, TINY, assert_model_state_predicted

from scaletrain.config import load_config
from scaletrain.parallel.context_parallel import load_balanced_positions
from scaletrain.parallel.pipeline import split_layers, stage_ids_for_rank
from scaletrain.parity import compare, run_layout
from scaletrain.validate import validate_config

FP32_LOSS_RTOL = 1e-5
FP32_GNORM_RTOL = 1e-4
# Four layers so interleaved schedules (4 stages on 2 ranks) have a layer per stage.
PIPE = [*FAST, "--model.n_layers", "4"]


def _validate(*overrides: str, world: int):
    validate_config(load_config(TINY, [*FAST, *overrides]), world)


# -- stage split ------------------------------------------------------------------------------
def test_split_counts_embedding_and_head_as_a_layer_each():
    assert split_layers(4, 2) == [[0, 1], [2, 3]]
    assert split_layers(6, 2) == [[0, 1, 2], [3, 4, 5]]
    assert split_layers(5, 2) == [[0, 1, 2], [3, 4]]  # 7 units: embed + 3 layers | 2 layers + head
    assert split_layers(8, 4) == [[0, 1], [2, 3, 4], [5, 6], [7]]  # 10 units: 3, 3, 2, 2
    assert [len(s) for s in split_layers(4, 4)] == [1, 1, 1, 1]


def test_explicit_boundaries():
    assert split_layers(6, 3, [1, 4]) == [[0], [1, 2, 3], [4, 5]]
    with pytest.raises(ValueError, match="pp_layer_boundaries"):
        split_layers(6, 3, [4, 1])


def test_stage_placement_looped_and_v_shaped():
    assert stage_ids_for_rank(1, 2, 2, "interleaved_1f1b") == [1, 3]
    assert stage_ids_for_rank(0, 2, 2, "zbv") == [0, 3]


def test_load_balanced_positions_cover_the_sequence_once():
    cp, local = 4, 8
    allpos = sorted(int(p) for r in range(cp) for p in load_balanced_positions(local, r, cp))
    assert allpos == list(range(cp * local))
    assert load_balanced_positions(8, 0, 4).tolist() == [0, 1, 2, 3, 28, 29, 30, 31]


# -- bad input, before launch --------------------------------------------------------------------
def test_layers_not_splittable():
    with pytest.raises(ValueError, match=r"parallel\.pp: 2 layers cannot be split into 4 pipeline stages"):
        _validate("--parallel.pp", "4", "--parallel.dp_shard", "1", "--checkpoint.enable", "false", world=4)


def test_microbatches_not_multiple_of_pp_for_interleaved():
    with pytest.raises(ValueError, match=r"parallel\.microbatches: interleaved_1f1b needs a multiple of pp=2"):
        _validate(
            "--parallel.pp",
            "2",
            "--parallel.pp_schedule",
            "interleaved_1f1b",
            "--parallel.stages_per_rank",
            "2",
            "--parallel.microbatches",
            "3",
            "--parallel.dp_shard",
            "1",
            "--checkpoint.enable",
            "false",
            world=2,
        )


def test_batch_not_divisible_by_microbatches():
    with pytest.raises(ValueError, match=r"per-rank batch of 8 samples is not divisible into 3"):
        _validate(
            "--parallel.pp",
            "2",
            "--parallel.pp_schedule",
            "gpipe",
            "--parallel.microbatches",
            "3",
            "--parallel.dp_shard",
            "1",
            world=2,
        )


def test_one_f_one_b_needs_enough_microbatches():
    with pytest.raises(ValueError, match=r"1F1B needs at least pp=2 microbatches"):
        _validate("--parallel.pp", "2", "--parallel.microbatches", "1", "--parallel.dp_shard", "1", world=2)


def test_seq_len_not_divisible_for_load_balanced_ring():
    with pytest.raises(ValueError, match=r"data\.seq_len: 60 is not divisible by 2\*cp = 8"):
        _validate("--parallel.cp", "4", "--parallel.dp_shard", "1", "--data.seq_len", "60", world=4)


def test_alltoall_needs_heads_divisible_by_cp():
    with pytest.raises(ValueError, match=r"alltoall needs the heads per tp rank \(4\) divisible by cp=8"):
        _validate("--parallel.cp", "8", "--parallel.dp_shard", "1", "--parallel.cp_method", "alltoall", world=8)


# -- parity ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    return run_layout(TINY, PIPE, tmp_path_factory.mktemp("base"), "single", nproc=1)


LAYOUTS = {
    "pp2_gpipe": ["--parallel.pp", "2", "--parallel.pp_schedule", "gpipe"],
    "pp2_1f1b": ["--parallel.pp", "2", "--parallel.pp_schedule", "1f1b", "--parallel.microbatches", "4"],
    "pp2_interleaved_v2": [
        "--parallel.pp",
        "2",
        "--parallel.pp_schedule",
        "interleaved_1f1b",
        "--parallel.stages_per_rank",
        "2",
        "--parallel.microbatches",
        "4",
        "--checkpoint.enable",
        "false",
    ],
    "pp2_zero_bubble_v2": [
        "--parallel.pp",
        "2",
        "--parallel.pp_schedule",
        "zero_bubble",
        "--parallel.stages_per_rank",
        "2",
        "--parallel.microbatches",
        "4",
        "--checkpoint.enable",
        "false",
    ],
    "pp2_zbv": ["--parallel.pp", "2", "--parallel.pp_schedule", "zbv", "--parallel.stages_per_rank", "2",
                "--parallel.microbatches", "4", "--checkpoint.enable", "false"],
    "pp2_dualpipev": ["--parallel.pp", "2", "--parallel.pp_schedule", "dualpipev", "--parallel.stages_per_rank", "2",
                      "--parallel.microbatches", "4", "--checkpoint.enable", "false"],
    "cp2_ring": ["--parallel.cp", "2"],
    "cp2_alltoall": ["--parallel.cp", "2", "--parallel.cp_method", "alltoall"],
    "pp2xdp2": ["--parallel.pp", "2", "--parallel.dp_shard", "2"],
    "pp2xtp2": ["--parallel.pp", "2", "--parallel.tp", "2"],
    "cp2xtp2": ["--parallel.cp", "2", "--parallel.tp", "2"],
    "cp2xdp2_ring": ["--parallel.cp", "2", "--parallel.dp_shard", "2"],
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_matches_single_process(layout, baseline, tmp_path):
    overrides = LAYOUTS[layout]
    if "--parallel.dp_shard" not in overrides:
        overrides = [*overrides, "--parallel.dp_shard", "1"]
    rows = run_layout(TINY, PIPE + overrides + STEP_MEMORY, tmp_path, layout)
    report = compare(baseline, rows)
    assert report.max_loss_rel_diff <= FP32_LOSS_RTOL, report.table()
    assert report.max_grad_norm_rel_diff <= FP32_GNORM_RTOL, report.table()
    assert_model_state_predicted(TINY, PIPE + overrides, rows, activations=True)


# Ring chunk pairs through the Triton flash-attention kernel (its lse feeds the merge), interpreted on
# CPU (tests/conftest.py sets TRITON_INTERPRET=1 without a GPU): one layer and three steps, against a
# one-process run of that size with torch's attention. At the four-layer, five-step size above it took
# 115 s of a 22-minute suite on 2 cores.
RING_TRITON = [*FAST, "--model.n_layers", "1", "--train.steps", "3", "--train.warmup_steps", "1"]


def test_triton_ring_attention_matches_single_process(tmp_path):
    reference = run_layout(TINY, RING_TRITON, tmp_path / "single", "single", nproc=1)
    ring = ["--parallel.cp", "2", "--model.attention", "triton", "--parallel.dp_shard", "1"]
    report = compare(reference, run_layout(TINY, RING_TRITON + ring, tmp_path, "cp2_ring_triton"))
    assert report.max_loss_rel_diff <= FP32_LOSS_RTOL, report.table()
    assert report.max_grad_norm_rel_diff <= FP32_GNORM_RTOL, report.table()


@pytest.mark.slow
@pytest.mark.parametrize(
    "overrides",
    [
        ["--parallel.pp", "2", "--parallel.tp", "2", "--parallel.dp_shard", "2"],
        ["--parallel.pp", "2", "--parallel.cp", "2", "--parallel.tp", "2", "--parallel.dp_shard", "1"],
    ],
    ids=["pp2xtp2xdp2", "pp2xcp2xtp2"],
)
def test_eight_process_4d_layouts(overrides, baseline, tmp_path):
    """8 processes: slow on 2 cores (run with `pytest -m slow`)."""
    report = compare(baseline, run_layout(TINY, PIPE + overrides, tmp_path, "4d", timeout_s=1500))
    assert report.max_loss_rel_diff <= FP32_LOSS_RTOL, report.table()
    assert report.max_grad_norm_rel_diff <= FP32_GNORM_RTOL, report.table()
