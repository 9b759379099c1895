"""Fault tolerance under torchrun: preemption signals, worker kills with elastic restarts, hangs.

Faults are injected by tests/checkpoint/fault_worker.py at chosen points (a step, the
middle of a save, between the manifest and the rename, right after the rename). Every
recovered run must reproduce the uninterrupted run's losses bitwise (CPU fp32, gloo).
"""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from ckpt_harness import metrics, torchrun

from scaletrain.checkpoint.format import complete_checkpoints


def _assert_same_losses(run_dir, name, reference) -> None:
    got, want = metrics(run_dir, name), metrics(*reference[:2])
    assert sorted(got) == sorted(want), (sorted(got), sorted(want))
    for step in want:
        assert got[step]["loss"] == want[step]["loss"], f"step {step}: {got[step]['loss']} vs {want[step]['loss']}"


def test_sigterm_to_torchrun_saves_a_final_checkpoint_and_rerun_continues(straight, tmp_path):
    fault = {"rank": 0, "step": 4, "where": "step", "action": "term_parent", "marker": str(tmp_path / "fired")}
    first = torchrun("fsdp2", tmp_path, "run", faults=[fault], check=False)
    out = first.stdout + first.stderr
    assert "SIGTERM: stopped at step" in out, out[-3000:]
    stopped = int(out.split("SIGTERM: stopped at step ")[1].split()[0])
    assert 4 <= stopped < 10
    assert [s for s, _ in complete_checkpoints(tmp_path / "run" / "checkpoints")][-1] == stopped
    torchrun("fsdp2", tmp_path, "run")
    _assert_same_losses(tmp_path, "run", straight("fsdp2"))


@pytest.mark.slow
def test_sigusr1_on_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    fault = {"rank": 1, "step": 3, "where": "step", "action": "usr1", "marker": str(tmp_path / "fired")}
    done = torchrun("fsdp2", tmp_path, "run", faults=[fault])  # a clean exit (0) on every rank
    assert "SIGUSR1: stopped at step 3 after a final checkpoint" in done.stdout + done.stderr
    assert sorted(metrics(tmp_path, "run")) == [1, 2, 3]
    assert [s for s, _ in complete_checkpoints(tmp_path / "run" / "checkpoints")] == [3]


def test_watchdog_turns_a_hang_into_an_error_with_the_stuck_stack(tmp_path):
    fault = {"rank": 1, "step": 3, "where": "step", "action": "hang", "marker": str(tmp_path / "fired")}
    start = time.monotonic()
    done = torchrun(
        "fsdp2", tmp_path, "run", "--parallel.step_timeout_s", "3", faults=[fault], check=False, timeout=300
    )
    elapsed = time.monotonic() - start
    assert done.returncode != 0
    err = done.stderr
    assert "scaletrain watchdog: rank 1" in err and "stuck in step 3" in err, err[-4000:]
    assert "injected_hang" in err  # the stuck rank's Python stack points at the culprit
    assert elapsed < 240  # far below the 10-minute collective timeout it replaces, with room for a loaded machine


def test_async_save_is_published_only_when_complete_and_resume_is_exact(straight, tmp_path):
    common = ["--checkpoint.async_mode", "async", "--checkpoint.interval", "1"]
    kill = [{"rank": 0, "step": 7, "where": "step", "action": "kill", "marker": str(tmp_path / "fired")}]
    first = torchrun("fsdp2", tmp_path, "run", *common, faults=kill, check=False)
    assert first.returncode != 0
    ckpts = tmp_path / "run" / "checkpoints"
    # Step 6's save was still pending (published only at the next save or at exit): never visible.
    assert [s for s, _ in complete_checkpoints(ckpts)] == [4, 5]
    assert (ckpts / "step-00000006.partial").is_dir() and not (ckpts / "step-00000006").exists()
    torchrun("fsdp2", tmp_path, "run", *common)
    _assert_same_losses(tmp_path, "run", straight("fsdp2"))
    assert not list(ckpts.glob("*.partial"))


WHERE = ["save", "step", "publish", "renamed"]


def _fault_plan(count: int, seed: int) -> list[dict]:
    """`count` faults cycling through the kinds, and every other cycle with async saves (so a small
    count still covers both); step and rank random."""
    rng = random.Random(seed)
    plan = []
    for i in range(count):
        where = WHERE[i % len(WHERE)]
        step = rng.randint(2, 10) if where == "step" else rng.choice([2, 4, 6, 8, 10])
        rank = 0 if where in ("publish", "renamed") else rng.randint(0, 1)  # rank 0 publishes
        use_async = (i // len(WHERE)) % 2 == 1
        plan.append({"rank": rank, "step": step, "where": where, "action": "kill", "async": use_async})
    return plan


def _kill_and_recover(fault: dict, straight, tmp_path) -> None:
    """One SIGKILL under `torchrun --max-restarts 4`: exactly one restart, then the run finishes
    from the newest complete checkpoint with the uninterrupted run's losses, bit for bit."""
    fault = {**fault, "marker": str(tmp_path / "fired")}
    extra = ["--checkpoint.interval", "2", "--checkpoint.async_mode", "async" if fault["async"] else "none"]
    # A short collective timeout: should a restarted group ever fail to connect again, the test
    # fails in a minute instead of ten.
    extra += ["--parallel.timeout_s", "60"]
    starts = tmp_path / "starts.jsonl"
    start = time.monotonic()
    done = torchrun(
        "fsdp2", tmp_path, "run", *extra, faults=[fault], starts=starts, restarts=4, timeout=400, check=False
    )
    restarts = max(json.loads(line)["restart"] for line in starts.read_text().splitlines())
    report = os.environ.get("ST_FAULT_REPORT")
    if report:  # one line per fault, for the counts in docs/checkpoints.md
        row = {**fault, "rc": done.returncode, "restarts": restarts, "seconds": round(time.monotonic() - start, 1)}
        row["refused"] = (done.stdout + done.stderr).count("Connection refused")
        with open(report, "a") as f:
            f.write(json.dumps({k: v for k, v in row.items() if k != "marker"}) + "\n")
    assert done.returncode == 0, f"{fault}: not recovered\n{done.stderr[-4000:]}"
    assert (tmp_path / "fired").exists(), f"{fault} never fired"
    assert restarts == 1, f"{fault}: {restarts} restarts for one kill\n{done.stderr[-4000:]}"
    _assert_same_losses(tmp_path, "run", straight("fsdp2"))
    assert [s for s, _ in complete_checkpoints(tmp_path / "run" / "checkpoints")][-1] == 10


# In the default suite since the restart reconnect flake was fixed (see the tests at the end of
# this file): one kill in the middle of an async save, one between manifest and rename.
CI_FAULTS = [
    {"rank": 1, "step": 4, "where": "save", "action": "kill", "async": True},
    {"rank": 0, "step": 6, "where": "publish", "action": "kill", "async": False},
]


@pytest.mark.parametrize(
    "fault", CI_FAULTS, ids=lambda f: f"{f['where']}-{f['step']}-rank{f['rank']}-async{f['async']}"
)
def test_sigkill_with_torchrun_restarts_resumes_exactly(fault, straight, tmp_path):
    _kill_and_recover(fault, straight, tmp_path)


SLOW_COUNT = int(os.environ.get("ST_FAULT_COUNT", "20"))


@pytest.mark.slow
@pytest.mark.parametrize(
    "fault", _fault_plan(SLOW_COUNT, seed=int(os.environ.get("ST_FAULT_SEED", "1"))), ids=lambda f: str(f)
)
def test_fault_injection_loop(fault, straight, tmp_path):
    """ST_FAULT_COUNT kills (default 20) at random points, sync and async saves; ST_FAULT_REPORT=FILE
    appends one JSON line per kill (restarts, refused connects, seconds)."""
    _kill_and_recover(fault, straight, tmp_path)


@pytest.mark.parametrize("where", ["save", "publish"])
def test_kill_during_save_keeps_the_last_good_checkpoint_and_rerun_resumes(where, straight, tmp_path):
    """SIGKILL in the middle of a save (or between manifest and rename): the half-written step
    never becomes visible, the previous checkpoint stays loadable, and rerunning continues bitwise."""
    rank = 0 if where == "publish" else 1  # rank 0 publishes
    fault = {"rank": rank, "step": 8, "where": where, "action": "kill", "marker": str(tmp_path / "fired")}
    extra = ["--checkpoint.interval", "2"]
    first = torchrun("fsdp2", tmp_path, "run", *extra, faults=[fault], check=False)
    assert first.returncode != 0 and (tmp_path / "fired").exists()
    assert [s for s, _ in complete_checkpoints(tmp_path / "run" / "checkpoints")][-1] == 6
    torchrun("fsdp2", tmp_path, "run", *extra)
    _assert_same_losses(tmp_path, "run", straight("fsdp2"))
    assert [s for s, _ in complete_checkpoints(tmp_path / "run" / "checkpoints")][-1] == 10


# -- the restart reconnect flake, root-caused --------------------------------------------------
# torchrun keeps one TCPStore for every restart and the dead group's gloo addresses stay in it;
# a restarted rank that read them connected to the killed process ("Connection refused").
# restart_worker.py makes the losing order deterministic (the restarted rank 0 joins late).
RESTART_WORKER = str(Path(__file__).with_name("restart_worker.py"))


def _restart_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ST_RESTART_MARKER": str(tmp_path / "killed"), **extra}
    if "TORCH_DISABLE_SHARE_RDZV_TCP_STORE" not in extra:
        env.pop("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", None)  # torch's default: one store shared across restarts
    return env


def _assert_restarted_group_connected(out: str) -> None:
    assert "restarted rank 0 all_reduce 2" in out and "restarted rank 1 all_reduce 2" in out, out[-4000:]
    assert "Connection refused" not in out, out[-4000:]


def test_restarted_group_connects_despite_the_dead_groups_keys(tmp_path):
    """One node: init_distributed namespaces the shared store's keys by torchrun's restart count."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "--max-restarts=1"]
    done = subprocess.run(
        [*cmd, RESTART_WORKER], env=_restart_env(tmp_path), capture_output=True, text=True, timeout=120
    )
    out = done.stdout + done.stderr
    # The premise: the restarted group finds the first group's keys still in the store.
    assert "restarted rank 1 store keys before joining: ['" in out, out[-3000:]
    assert done.returncode == 0, out[-4000:]
    _assert_restarted_group_connected(out)


@pytest.mark.slow
def test_two_agents_restart_with_the_launchers_environment(tmp_path):
    """Two torchrun agents (c10d, as on two nodes): restart counts differ between agents, so no
    prefix can be agreed on; the launcher's TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 gives every
    rendezvous round a fresh store instead."""
    from scaletrain.launchers.torchrun import TorchrunLaunch, extra_env

    env = extra_env(TorchrunLaunch("unused.yaml", nnodes=2, nproc_per_node=1, rdzv_endpoint="x:1", max_restarts=1))
    assert env == {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    with socket.socket() as probe:  # a free port for the rendezvous (closed again before torchrun binds it)
        probe.bind(("127.0.0.1", 0))
        endpoint = f"127.0.0.1:{probe.getsockname()[1]}"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1", "--max-restarts=1"]
    cmd += ["--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}", "--rdzv-id=restart-test", RESTART_WORKER]
    agents = [
        subprocess.Popen(
            cmd, env=_restart_env(tmp_path, **env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for _ in range(2)
    ]
    outs = [agent.communicate(timeout=180)[0] for agent in agents]
    out = "".join(outs)
    assert [agent.returncode for agent in agents] == [0, 0], out[-4000:]
    _assert_restarted_group_connected(out)
