"""Real Slurm: a one-node cluster started by the `slurm_cluster` fixture runs the tiny job.

Needs `apt-get install -y slurm-wlm munge` and root; skips with the reason otherwise.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
from launch_common import TINY_CONFIG, TINY_RUN, logged_losses, logged_steps

from scaletrain.checkpoint import complete_checkpoints
from scaletrain.launchers import cli
from scaletrain.launchers.sbatch import job_fields, wait_for_job

JOB_TIMEOUT_S = 400


def _submitted_job_id(out: str) -> str:
    # "scaletrain launch: submitted slurm job 12 (...)"
    return out.split("submitted slurm job ", 1)[1].split()[0]


def test_sbatch_template_runs_torchrun_per_node(slurm_cluster, tmp_path, capsys):
    code = cli.main(["sbatch", TINY_CONFIG, "--nodes", "1", "--nproc-per-node", "2", "--cpus-per-task", "2",
                     "--gpus-per-node", "0", "--time-min", "5", *TINY_RUN, "--job.run_dir", str(tmp_path)])
    assert code == 0
    job_id = _submitted_job_id(capsys.readouterr().out)
    try:
        exit_code = wait_for_job(job_id, timeout_s=JOB_TIMEOUT_S, poll_s=0.5)
    except TimeoutError:
        subprocess.run(["scancel", job_id], timeout=30)
        raise
    log = (tmp_path / "gpt-tiny" / "slurm" / f"{job_id}.out").read_text()
    assert exit_code == 0, log[-3000:]
    assert f"rendezvous {job_fields(job_id)['BatchHost']}:" in log  # c10d on the first node
    assert logged_steps(tmp_path) == [1, 2, 3]


def test_submitit_runs_one_task_per_rank(slurm_cluster, tmp_path):
    code = cli.main(["slurm", TINY_CONFIG, "--nodes", "1", "--nproc-per-node", "2", "--gpus-per-node", "0",
                     "--time-min", "5", "--wait",
                     *TINY_RUN, "--job.run_dir", str(tmp_path)])
    logs = "\n".join(p.read_text() for p in sorted((tmp_path / "gpt-tiny" / "slurm").glob("*_log.*")))
    assert code == 0, logs[-3000:]
    assert logged_steps(tmp_path) == [1, 2, 3]
    assert "dp_shard=2" in logs  # both Slurm tasks joined one process group


@pytest.mark.slow
def test_requeue_on_usr1_resumes_from_checkpoint(slurm_cluster, tmp_path, capsys):
    """USR1 to the batch shell (what --signal=B:USR1@90 sends) requeues; the rerun resumes and finishes."""
    steps = 400
    run = ["--train.steps", str(steps), "--train.warmup_steps", "1", "--model.n_layers", "1", "--data.seq_len", "32",
           "--train.global_batch_size", "4", "--checkpoint.interval", "20", "--metrics.tensorboard", "false",
           "--job.run_dir", str(tmp_path)]
    code = cli.main(["sbatch", TINY_CONFIG, "--requeue", "--nproc-per-node", "2", "--cpus-per-task", "2",
                     "--gpus-per-node", "0", "--time-min", "5", *run])
    assert code == 0
    job_id = _submitted_job_id(capsys.readouterr().out)
    run_dir = tmp_path / "gpt-tiny"
    try:
        deadline = time.monotonic() + JOB_TIMEOUT_S
        while not complete_checkpoints(run_dir / "checkpoints"):
            assert time.monotonic() < deadline, "no checkpoint appeared"
            assert job_fields(job_id).get("JobState") in ("PENDING", "RUNNING", "CONFIGURING"), job_fields(job_id)
            time.sleep(0.2)
        subprocess.run(["scancel", "--batch", "--signal=USR1", job_id], check=True, timeout=30)
        exit_code = wait_for_job(job_id, timeout_s=JOB_TIMEOUT_S, poll_s=0.5)
    finally:
        subprocess.run(["scancel", job_id], capture_output=True, timeout=30)
    log = Path(run_dir / "slurm" / f"{job_id}.out").read_text()
    assert exit_code == 0, log[-3000:]
    assert int(job_fields(job_id)["Restarts"]) >= 1
    assert "USR1 received, requeueing" in log and "restart 1" in log and "resumed from" in log
    steps_logged = logged_steps(tmp_path)
    assert steps_logged[-1] == steps
    # The second run continued from a checkpoint instead of starting over at step 1.
    assert steps_logged.count(1) == 1 and len(steps_logged) < 2 * steps
    assert all(loss == loss for loss in logged_losses(tmp_path))
