"""Checkpoints across engines: a DeepSpeed (fairscale, megatron-core) run resumes bitwise after a kill, and
native, DeepSpeed, fairscale and megatron-core runs continue each other's checkpoints.

Every engine saves in scaletrain's own format (full names, fp32 masters, AdamW moments per parameter;
DeepSpeedState, FairscaleState, MegatronState in scaletrain/engines/; megatron's fused tensors, moments
included, mapped to the recipe's names), so the same files serve all of them. Across engines
the reduction order differs, so the continued losses match the uninterrupted run of the engine that saved
within 1e-5 relative (observed: equal to the printed digits); within one engine they are bitwise equal.
"""

from __future__ import annotations

import pytest
from ckpt_harness import copy_checkpoint, metrics, torchrun

from scaletrain.engines.deepspeed_engine import cpu_has_fp16

pytest.importorskip("deepspeed")
NO_CPU_FP16 = "this CPU's oneDNN has no fp16 (AVX512-FP16 / AMX-FP16), so DeepSpeed's CPU accelerator refuses it"

CROSS_ENGINE_LOSS_RTOL = 1e-5


@pytest.mark.parametrize(
    "layout",
    [
        "ds_zero2",
        pytest.param("ds_zero3", marks=pytest.mark.slow),
        pytest.param("fairscale", marks=pytest.mark.slow),
        pytest.param("megatron2", marks=pytest.mark.slow),
        "megatron_tp2",  # megatron's tp-split tensors gathered on save and split again on load
        # The loss scaler's state is restored. DeepSpeed's CPU accelerator takes fp16 only where oneDNN has it.
        pytest.param("ds_zero2_fp16", marks=pytest.mark.skipif(not cpu_has_fp16(), reason=NO_CPU_FP16)),
    ],
)
def test_engine_kill_and_rerun_continues_bitwise(layout, straight, tmp_path):
    ref_dir, ref_name, _ = straight(layout)
    kill = [{"rank": 0, "step": 6, "where": "step", "action": "kill", "marker": str(tmp_path / "fired")}]
    first = torchrun(layout, tmp_path, "run", faults=kill, check=False)
    assert first.returncode != 0, "the first invocation should have been killed"
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step-00000005"]
    torchrun(layout, tmp_path, "run")  # the same command again: auto-resume
    resumed, reference = metrics(tmp_path, "run"), metrics(ref_dir, ref_name)
    assert sorted(resumed) == list(range(1, 11))
    for step in range(1, 11):
        assert resumed[step]["loss"] == reference[step]["loss"], f"step {step}"
        assert resumed[step]["grad_norm"] == reference[step]["grad_norm"], f"step {step}"


@pytest.mark.skipif(cpu_has_fp16(), reason="this CPU has fp16: the run trains (the kill-and-rerun test above)")
def test_deepspeed_fp16_on_a_cpu_without_it_names_the_field_and_the_way_out(tmp_path):
    """Without the check, DeepSpeed's own "Type fp16 is not supported on your device." is all a user saw."""
    done = torchrun("ds_zero2_fp16", tmp_path, "run", check=False)
    assert done.returncode != 0
    assert "train.dtype: fp16 with engine.name=deepspeed on this CPU" in done.stdout + done.stderr
    assert "Use bf16 or fp32" in done.stdout + done.stderr


@pytest.mark.parametrize(
    ("saved_by", "resumed_by"),
    [
        ("fsdp2", "ds_zero2"),
        ("ds_zero3", "fsdp2"),
        ("ds_zero2", "fairscale"),
        pytest.param("fsdp2", "megatron2", marks=pytest.mark.slow),
        ("megatron2", "fsdp2"),
        ("fsdp2", "megatron_tp2"),
        ("megatron_tp2", "fsdp2"),
    ],
)
def test_a_checkpoint_continues_under_the_other_engine(saved_by, resumed_by, straight, tmp_path):
    ref_dir, ref_name, _ = straight(saved_by)
    copy_checkpoint(ref_dir / ref_name, 5, tmp_path / "run")
    done = torchrun(resumed_by, tmp_path, "run")
    assert "resumed from" in done.stdout + done.stderr
    resumed, reference = metrics(tmp_path, "run"), metrics(ref_dir, ref_name)
    assert sorted(resumed) == list(range(6, 11))  # steps 1-5 came from the checkpoint
    for step in range(6, 11):
        a, b = resumed[step]["loss"], reference[step]["loss"]
        assert abs(a - b) <= CROSS_ENGINE_LOSS_RTOL * abs(b), f"step {step}: {a} vs {b}"
