"""Reshard matrix: a checkpoint saved under one layout resumes under another.

Each case copies the step-5 checkpoint of an uninterrupted 10-step run (layout A) into a
new run folder and resumes it under layout B to step 10. The losses of steps 6-10 must
match run A's within RESHARD_RTOL: the state is the same, only the reduction order of the
layout differs (observed differences are ~1e-7 relative, the layout-parity level of
tests/core/test_parity.py). For data-parallel degree changes the sample ids each step
consumed (recorded by fault_worker.py from what the loader handed each rank) must equal
run A's for all ten steps: no sample skipped or repeated.
"""

from __future__ import annotations

import pytest
from ckpt_harness import copy_checkpoint, metrics, recorded_ids, torchrun

RESHARD_RTOL = 1e-5

SLOW = pytest.mark.slow  # two pairs run with -m slow, to keep the normal suite near 5 minutes on 2 cores
PAIRS = [
    pytest.param("fsdp4", "single", marks=SLOW, id="fsdp4-to-single"),  # FSDP2 on 4 ranks -> 1 process
    pytest.param("tp2xdp2", "single", id="tp2xdp2-to-single"),  # TP2 x FSDP2 -> 1 process
    pytest.param("fsdp2", "fsdp4", id="fsdp2-to-fsdp4"),  # dp 2 -> 4
    pytest.param("fsdp4", "fsdp2", id="fsdp4-to-fsdp2"),  # dp 4 -> 2
    pytest.param("ddp2", "tp2", marks=SLOW, id="ddp2-to-tp2"),  # DDP -> tensor parallel
]
DP_CHANGES = {("fsdp2", "fsdp4"), ("fsdp4", "fsdp2")}


@pytest.mark.parametrize(("source", "target"), PAIRS)
def test_resume_under_another_layout(source, target, straight, tmp_path):
    ref_dir, ref_name, ref_ids = straight(source)
    copy_checkpoint(ref_dir / ref_name, 5, tmp_path / "run")
    torchrun(target, tmp_path, "run", record=tmp_path / "ids")
    resumed, reference = metrics(tmp_path, "run"), metrics(ref_dir, ref_name)
    assert sorted(resumed) == [6, 7, 8, 9, 10], "should resume at step 6"
    rel = {s: abs(resumed[s]["loss"] - reference[s]["loss"]) / reference[s]["loss"] for s in resumed}
    print(f"{source} -> {target}: next-step loss rel diff {rel[6]:.2e}, max over steps 6-10 {max(rel.values()):.2e}")
    assert rel[6] <= RESHARD_RTOL, rel
    assert max(rel.values()) <= RESHARD_RTOL, rel
    if (source, target) in DP_CHANGES:
        straight_ids = recorded_ids(ref_ids)
        resumed_ids = {**{s: straight_ids[s] for s in range(1, 6)}, **recorded_ids(tmp_path / "ids")}
        assert sorted(resumed_ids) == list(range(1, 11))
        assert resumed_ids == straight_ids  # same samples in the same steps
        everything = [i for s in sorted(resumed_ids) for i in resumed_ids[s]]
        assert len(everything) == len(set(everything)) == 10 * 8  # no repeats, none missing
