"""Resume parity: 10 steps straight == 5 steps, SIGKILL, then the same command again.

The first invocation is killed (SIGKILL of rank 0, torchrun without restarts) right before
step 6, after the step-5 checkpoint was published; rerunning the same command resumes from
it. CPU fp32 with gloo is deterministic, so losses and grad norms must be bitwise equal, and
every rank's RNG states right after resuming are the ones it saved.
"""

from __future__ import annotations

import json

import pytest
from ckpt_harness import LAYOUTS, metrics, torchrun


# FSDP2 runs in the normal suite; DDP and TP2 x FSDP2 (4 processes) with -m slow, to keep the
# normal suite near 5 minutes on 2 cores.
@pytest.mark.parametrize(
    "layout",
    [
        pytest.param("ddp2", marks=pytest.mark.slow),
        "fsdp2",
        pytest.param("tp2xdp2", marks=pytest.mark.slow),
        "moe_fsdp2",  # the MoE routing biases are restored too
        "moe_ep2",  # experts split over 2 ranks
    ],
)
def test_kill_and_rerun_continues_bitwise(layout, straight, tmp_path):
    ref_dir, ref_name, _ = straight(layout)
    kill = [{"rank": 0, "step": 6, "where": "step", "action": "kill", "marker": str(tmp_path / "fired")}]
    first = torchrun(layout, tmp_path, "run", faults=kill, check=False)
    assert first.returncode != 0, "the first invocation should have been killed"
    ckpts = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert ckpts == ["step-00000005"], ckpts
    done = torchrun(layout, tmp_path, "run", rng=tmp_path / "rng")  # the same command again: auto-resume
    resumed, reference = metrics(tmp_path, "run"), metrics(ref_dir, ref_name)
    assert sorted(resumed) == list(range(1, 11))
    for step in range(1, 11):
        assert resumed[step]["loss"] == reference[step]["loss"], f"step {step}"
        assert resumed[step]["grad_norm"] == reference[step]["grad_norm"], f"step {step}"
    log = (tmp_path / "run" / "metrics.jsonl").read_text()
    assert log.count('"step": 6') == 1  # steps 1-5 were not redone
    # Same world size: each rank continues exactly the RNG streams it saved at step 5.
    nproc = LAYOUTS[layout][0]
    saved = tmp_path / "run" / "checkpoints" / "step-00000005" / "rng"
    for rank in range(nproc):
        got = json.loads((tmp_path / "rng" / f"rank-{rank}.json").read_text())
        assert got == json.loads((saved / f"rank-{rank:05d}.json").read_text()), f"rank {rank}"
    assert "RNG states not restored" not in done.stdout
