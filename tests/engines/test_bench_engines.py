"""`scaletrain bench --engines`: one invocation runs each engine on the same model, data and ranks, and writes
the table as CSV, Markdown and PNG."""

from __future__ import annotations

import csv
import re

import pytest
from st_common import TINY

from scaletrain import cli
from scaletrain.bench_engines import bench_engines

pytest.importorskip("deepspeed")
pytest.importorskip("fairscale")

SMALL = ["--model.n_layers", "1", "--data.seq_len", "32", "--train.global_batch_size", "4"]


def test_bench_engines_writes_one_row_per_engine(tmp_path):
    steps = ["--train.steps", "4", "--train.warmup_steps", "1"]
    entries = ["native", "deepspeed:zero1", "fairscale:oss"]
    rows, unit = bench_engines(TINY, entries, 2, SMALL + steps, tmp_path, warmup=1)
    assert unit == "tokens"
    assert [r.entry for r in rows] == entries
    assert all(r.rate > 0 and r.peak_mem_gib > 0 and r.model_state_gib > 0 for r in rows)
    # The engines compute the same thing: the last loss agrees (what makes the rates comparable).
    assert max(abs(r.final_loss - rows[0].final_loss) for r in rows) <= 1e-5 * rows[0].final_loss
    with open(tmp_path / "engines.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["engine"] for r in table] == entries and float(table[0]["ratio_to_native"]) == 1.0
    assert "| deepspeed:zero1 |" in (tmp_path / "engines.md").read_text()
    assert (tmp_path / "engines.png").stat().st_size > 1000


@pytest.mark.parametrize(
    ("engines", "message"),
    [
        ("native,deepspeed:zero9", r"engine 'deepspeed' has no preset 'zero9'; known: \['zero0'"),
        ("native,megatrn", r"engine\.name: unknown engine 'megatrn'"),
        ("", r"--engines: name at least one engine"),
    ],
)
def test_bad_engine_lists_fail_before_any_run(engines, message, tmp_path, capsys):
    assert cli.main(["bench", TINY, "--engines", engines, "--out", str(tmp_path)]) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not list(tmp_path.iterdir())  # nothing ran
