"""Reshard matrix: a checkpoint saved under one layout resumes under another.

Each case copies the step-5 checkpoint of an uninterrupted 10-step run (layout A) into a
new run folder and resumes it under layout B to step 10. The losses of steps 6-10 must
match run A's within RESHARD_RTOL: the state is the same, only the reduction order of the
layout differs (observed differences are ~1e-7 relative, the layout-parity level of
tests/core/test_parity.py). For data-parallel degree changes the sample ids each step
consumed (recorded by fault_worker.py from what the loader handed each rank) must equal
run A's for all ten steps: no sample skipped or repeated.

RNG states: with the same world size every rank gets its saved states back; with another
world size every rank's generators are re-seeded from (job.seed, step) and rank 0 says so
(scaletrain/checkpoint/store.py::restore_rng). Each case checks the states right after resuming.
"""

from __future__ import annotations

import json

import pytest
from ckpt_harness import BASE, LAYOUTS, TINY, copy_checkpoint, metrics, recorded_ids, torchrun

from scaletrain.checkpoint.store import resume_seed, rng_state, seed_rng, set_rng_state
from scaletrain.config import load_config

RESHARD_RTOL = 1e-5

SLOW = pytest.mark.slow  # two pairs run with -m slow, to keep the normal suite near 5 minutes on 2 cores
PAIRS = [
    pytest.param("fsdp4", "single", marks=SLOW, id="fsdp4-to-single"),  # FSDP2 on 4 ranks -> 1 process
    pytest.param("tp2xdp2", "single", id="tp2xdp2-to-single"),  # TP2 x FSDP2 -> 1 process
    pytest.param("fsdp2", "fsdp4", id="fsdp2-to-fsdp4"),  # dp 2 -> 4
    pytest.param("fsdp4", "fsdp2", id="fsdp4-to-fsdp2"),  # dp 4 -> 2
    pytest.param("ddp2", "tp2", marks=SLOW, id="ddp2-to-tp2"),  # DDP -> tensor parallel (same world size)
    pytest.param("tp2xdp2", "pp2", id="tp2xdp2-to-pp2"),  # TP2 x FSDP2 on 4 ranks -> 2 pipeline stages
    # Mixture of experts: experts split over ep ranks (and FSDP-sharded over the rest) -> other splits.
    pytest.param("moe_ep2", "moe_single", id="moe-ep2-to-single"),
    pytest.param("moe_ep2_fsdp4", "moe_fsdp2", id="moe-ep2xfsdp4-to-fsdp2"),
    pytest.param("moe_ep2", "moe_ep4", marks=SLOW, id="moe-ep2-to-ep4"),
]
DP_CHANGES = {("fsdp2", "fsdp4"), ("fsdp4", "fsdp2")}


def _reseeded_state(step: int) -> dict:
    """Every rank's RNG states after a resume at `step` under another world size."""
    mine = rng_state()
    try:
        seed_rng(resume_seed(load_config(TINY, BASE).job.seed, step))
        return rng_state()
    finally:
        set_rng_state(mine)


@pytest.mark.parametrize(("source", "target"), PAIRS)
def test_resume_under_another_layout(source, target, straight, tmp_path):
    ref_dir, ref_name, ref_ids = straight(source)
    ckpt = copy_checkpoint(ref_dir / ref_name, 5, tmp_path / "run")
    done = torchrun(target, tmp_path, "run", record=tmp_path / "ids", rng=tmp_path / "rng")
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

    saved_world, world = LAYOUTS[source][0], LAYOUTS[target][0]
    got = {r: json.loads((tmp_path / "rng" / f"rank-{r}.json").read_text()) for r in range(world)}
    notice = f"RNG states not restored (saved on {saved_world} ranks, now {world})"
    if saved_world == world:  # each rank continues its own saved streams
        assert got == {r: json.loads((ckpt / "rng" / f"rank-{r:05d}.json").read_text()) for r in range(world)}
        assert notice.split(" (")[0] not in done.stdout
    else:
        assert got == dict.fromkeys(range(world), _reseeded_state(5))
        assert f"{notice}: every rank's torch/CUDA/Python/NumPy generators re-seeded from (job.seed" in done.stdout
