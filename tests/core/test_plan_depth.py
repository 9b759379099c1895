"""The planner sizes a deep model from two shallow copies (scaletrain/plan/ranks.py): what it carries to the full
depth must equal simulating the whole model, per pipeline rank, for the layouts whose memory scales with
depth in different ways (FSDP's gathered block, full checkpointing's recompute, 1F1B's in-flight
microbatches, uneven pipeline splits); and models it cannot scale from copies are simulated whole."""

from __future__ import annotations

import re
from dataclasses import asdict

import pytest
from st_common import TINY

from scaletrain import cli
from scaletrain.config import load_config
from scaletrain.plan.ranks import plan_memory, shallow_depths
from scaletrain.validate import validate_config

DEEP = ["--model.n_layers", "17", "--train.global_batch_size", "8"]


@pytest.mark.parametrize(
    ("layout", "world"),
    [
        (["--parallel.dp_shard", "2", "--activation_checkpoint.mode", "none"], 2),
        (["--parallel.dp_shard", "2", "--parallel.tp", "2", "--activation_checkpoint.mode", "full",
          "--train.dtype", "bf16"], 4),
        (["--parallel.pp", "2", "--parallel.dp_shard", "1", "--activation_checkpoint.mode", "selective"], 2),
    ],
    ids=["fsdp2", "tp2-fsdp2-full-bf16", "pp2-1f1b-uneven"],
)  # fmt: skip
def test_copies_carried_to_full_depth_equal_the_whole_model(layout, world):
    cfg = load_config(TINY, [*DEEP, *layout])
    dims = validate_config(cfg, world)
    assert shallow_depths(cfg, dims) is not None, "17 blocks must be sized from copies"
    carried, whole = plan_memory(cfg, dims), plan_memory(cfg, dims, exact=True)
    for c, w in zip(carried, whole, strict=True):
        for name, value in asdict(w.state).items():
            assert asdict(c.state)[name] == pytest.approx(value, rel=0.01, abs=1024), (c.pp_rank, name)
        assert c.activations == pytest.approx(w.activations, rel=0.02), c.pp_rank


def test_models_that_do_not_scale_from_copies_are_simulated_whole():
    def depths(*overrides: str) -> tuple[int, int] | None:
        cfg = load_config(TINY, [*DEEP, *overrides])
        return shallow_depths(cfg, validate_config(cfg, 2))

    assert depths("--parallel.dp_shard", "2") == (3, 4)
    assert depths("--parallel.pp", "2", "--parallel.dp_shard", "1") == (6, 8)
    assert depths("--parallel.pp", "2", "--parallel.dp_shard", "1", "--parallel.pp_layer_boundaries", "5") is None
    assert depths("--parallel.dp_shard", "2", "--model.n_layers", "7") is None  # barely deeper than the copies
    moe = ["--model.moe.num_experts", "4", "--model.moe.top_k", "2"]
    assert depths("--parallel.dp_shard", "2", *moe) == (3, 4)
    assert depths("--parallel.dp_shard", "2", *moe, "--model.moe.first_dense", "1") is None  # unlike blocks


def test_exact_flag_and_the_note(capsys):
    assert cli.main(["plan", TINY, *DEEP, "--parallel.dp_shard", "2"]) == 0
    assert "sized from copies 3 and 4 blocks deep" in capsys.readouterr().out
    assert cli.main(["plan", TINY, *DEEP, "--parallel.dp_shard", "2", "--exact"]) == 0
    assert "sized from copies" not in capsys.readouterr().out


def test_calibrate_trains_the_layout_and_prints_predicted_beside_measured(capsys):
    """--calibrate runs the layout under torchrun and reads the trainer's meters: the memory lines must agree
    within the parity tests' tolerances (model state 10 %, activations 15 %), and the step time and the
    efficiency it implies are printed."""
    code = cli.main(["plan", TINY, "--calibrate", "--steps", "5", "--parallel.dp_shard", "2"])
    out = capsys.readouterr().out
    assert code == 0, out
    line = re.compile(r"^\s*(model state|activations) \(MiB\).*?([\d.]+)$", re.M)
    ratios = {m.group(1): float(m.group(2)) for m in line.finditer(out)}
    assert set(ratios) == {"model state", "activations"}, out
    assert abs(ratios["model state"] - 1) <= 0.10 and abs(ratios["activations"] - 1) <= 0.15, out
    assert re.search(r"step time \(s\)\s+[\d.]+\s+[\d.]+\s+[\d.]+", out), out
    assert re.search(r"# efficiency here: [\d.]+ of the peak", out), out


def test_calibrate_refuses_too_few_steps(capsys):
    assert cli.main(["plan", TINY, "--calibrate", "--steps", "3", "--parallel.dp_shard", "2"]) == 2
    assert "--steps: 3 is not allowed; use > 3" in capsys.readouterr().err
