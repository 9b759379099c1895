"""`scaletrain plan CONFIG --gpus N`: the layout search and its step-time model.

The time model is checked against the formulas written out by hand for one layout; the search for what it
must do with its candidates: keep the trainer's reason for an invalid one, rank those that fit by tokens/s
per GPU, put those over the memory limit after them, and fail (exit 1) naming the smallest when none fits.
"""

from __future__ import annotations

import csv
import re

import pytest
from st_common import TINY

from scaletrain import cli
from scaletrain.config import load_config
from scaletrain.plan.step_time import GPUS, ModelFacts, step_time
from scaletrain.validate import validate_config

SMALL = ["--tp", "1,2", "--pp", "1", "--ac", "none,full", "--gpus-per-node", "2"]


def _plan(capsys, *args: str) -> tuple[int, str, str]:
    code = cli.main(["plan", TINY, *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_fsdp_time_is_the_gathers_and_the_scatter_at_the_links_bandwidth():
    """FSDP2 over 8 ranks of one node, bf16, no accumulation, resharded after forward: two bf16 all-gathers
    and one fp32 reduce-scatter of the parameters, 7/8 of each over NVLink; compute = FLOPs / (peak x eff)."""
    cfg = load_config(TINY, ["--parallel.dp_shard", "8", "--train.dtype", "bf16", "--train.global_batch_size", "16"])
    dims = validate_config(cfg, 8)
    facts = ModelFacts(flops_per_sample=6e9, parameters=1e9, trunk_elements_per_sample=0, blocks=0)
    t = step_time(cfg, dims, GPUS["h100"], 8, 0.5, facts)
    assert t.compute_s == pytest.approx(6e9 * 2 / (989.5e12 * 0.5))
    assert t.fsdp_s == pytest.approx((2 * 2e9 + 4e9) * 7 / 8 / 450e9)
    assert (t.replicate_s, t.tp_s, t.bubble) == (0, 0, 0)
    assert t.step_s == pytest.approx(t.compute_s + max(0.0, t.fsdp_s - t.compute_s))


def test_pipeline_bubble_and_tensor_parallel_traffic():
    """1F1B over 2 stages with 2 microbatches idles 1/3 of the time; TP moves 8 gathers/scatters of the trunk
    activation per block, (tp-1)/tp each."""
    cfg = load_config(TINY, ["--parallel.pp", "2", "--parallel.tp", "2", "--parallel.dp_shard", "1",
                             "--train.global_batch_size", "4", "--train.dtype", "bf16"])  # fmt: skip
    dims = validate_config(cfg, 4)
    facts = ModelFacts(flops_per_sample=1e9, parameters=1e6, trunk_elements_per_sample=1000, blocks=4)
    t = step_time(cfg, dims, GPUS["a100"], 8, 1.0, facts)
    assert t.bubble == pytest.approx(1 / 3)
    assert t.tp_s == pytest.approx(8 * (4 / 2) * (1000 * 2 * 4) * (1 / 2) / 300e9)
    assert t.step_s == pytest.approx((t.compute_s + t.tp_s) * 1.5)


def test_search_ranks_the_layouts_that_fit_and_keeps_why_the_others_do_not(capsys, tmp_path):
    table = tmp_path / "plan.csv"
    pictures = tmp_path / "png"
    code, out, _ = _plan(capsys, "--gpus", "4", *SMALL, "--csv", str(table), "--png", str(pictures),
                         "--train.global_batch_size", "2")  # fmt: skip
    assert code == 0, out
    for name in ("memory.png", "step_time.png"):
        assert (pictures / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = list(csv.DictReader(table.open()))
    assert {r["layout"] for r in rows} == {"fsdp4 ac=none", "fsdp4 ac=full", "hsdp2x2 ac=none", "hsdp2x2 ac=full",
                                          "tp2 fsdp2 ac=none", "tp2 fsdp2 ac=full"}  # fmt: skip
    # A global batch of 2 cannot split over 4 data-parallel ranks: the trainer's own message.
    for row in rows:
        if row["layout"].startswith(("fsdp4", "hsdp2x2")):
            assert "train.global_batch_size: 2 is not divisible by the data-parallel degree 4" in row["rejected"]
    fits = [r for r in rows if not r["rejected"]]
    assert [r["layout"] for r in fits] and all(r["layout"].startswith("tp2") for r in fits)
    speeds = [float(r["tokens/s/GPU"].replace(",", "")) for r in fits]
    assert speeds == sorted(speeds, reverse=True)
    assert rows[: len(fits)] == fits  # the ones that fit come first
    assert "layouts fit" in out and "tp2 fsdp2" in out


def test_no_layout_under_the_limit_fails_naming_the_smallest(capsys):
    code, out, _ = _plan(capsys, "--gpus", "2", *SMALL, "--memory-limit-gb", "0.001")
    assert code == 1
    assert re.search(r"no layout fits 0\.001 GiB; the smallest needs [\d.e-]+ GiB \(.*ac=full\)", out), out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--gpus", "4", "--gpu", "tpu9"], r"--gpu: 'tpu9' is not in the table; use one of \['a100', 'h100', 'h200'\]"),
        (["--gpus", "3", "--tp", "2", "--pp", "2"], r"--gpus: no tp x pp of the given degrees divides 3 GPUs"),
        (["--gpus", "4", "--ac", "some"], r"--ac: \['some'\] not allowed"),
        (["--gpus", "4", "--efficiency", "1.5"], r"--efficiency: 1.5 is not allowed"),
        (["--gpus", "0"], r"--gpus / --gpus-per-node: 0 / 8 are not allowed"),
    ],
)
def test_bad_search_input_is_refused_before_any_simulation(args, message, capsys):
    code, _, err = _plan(capsys, *args)
    assert code == 2 and re.search(message, err), err
