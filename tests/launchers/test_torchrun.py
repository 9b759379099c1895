"""torchrun launches: one node with 2 processes, and two "nodes" in separate network namespaces."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from contextlib import contextmanager

import pytest
from launch_common import REPO, TINY_CONFIG, TINY_RUN, logged_steps, subprocess_env


def test_one_node_two_processes(tmp_path):
    cmd = [sys.executable, "-m", "scaletrain.launchers.cli", "torchrun", TINY_CONFIG, "--nproc-per-node", "2",
           *TINY_RUN, "--job.run_dir", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "--nproc-per-node 2" in proc.stderr  # the launched command is printed
    assert logged_steps(tmp_path) == [1, 2, 3]
    assert "dp_shard=2" in proc.stdout + proc.stderr  # 2 ranks really formed one data-parallel group


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


@contextmanager
def two_hosts():
    """Namespaces h1 (10.77.0.1/24) and h2 (10.77.0.2/24) joined by a veth pair; removed on exit.

    Traffic only ever goes between these two addresses (and loopback inside each namespace).
    """
    tag = uuid.uuid4().hex[:6]
    hosts = [f"st{tag}a", f"st{tag}b"]
    links = [f"st{tag}0", f"st{tag}1"]  # interface names are limited to 15 characters
    try:
        for host in hosts:
            _ip("netns", "add", host)
        _ip("link", "add", links[0], "type", "veth", "peer", "name", links[1])
        for index, (host, link) in enumerate(zip(hosts, links, strict=True)):
            _ip("link", "set", link, "netns", host)
            _ip("-n", host, "addr", "add", f"10.77.0.{index + 1}/24", "dev", link)
            _ip("-n", host, "link", "set", link, "up")
            _ip("-n", host, "link", "set", "lo", "up")
        yield list(zip(hosts, links, strict=True))
    finally:
        # Deleting a namespace deletes the veth end inside it, and with it the pair.
        for host in hosts:
            subprocess.run(["ip", "netns", "del", host], capture_output=True, timeout=30)


def _can_make_namespaces() -> str | None:
    if shutil.which("ip") is None:
        return "the `ip` tool (iproute2) is not installed"
    if os.geteuid() != 0:
        return "network namespaces need root"
    probe = f"stprobe{uuid.uuid4().hex[:6]}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None if made.returncode == 0 else f"cannot create network namespaces: {made.stderr.strip()}"


def test_two_nodes_over_network_namespaces(tmp_path):
    reason = _can_make_namespaces()
    if reason:
        pytest.skip(reason)
    with two_hosts() as hosts:
        procs = []
        for host, link in hosts:
            cmd = ["ip", "netns", "exec", host, sys.executable, "-m", "scaletrain.launchers.cli", "torchrun",
                   TINY_CONFIG,
                   "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-endpoint", "10.77.0.1:29500",
                   "--rdzv-id", "netns-test", *TINY_RUN, "--job.run_dir", str(tmp_path)]
            # gloo picks its interface from the hostname, which resolves to 127.0.0.1 here:
            # point it at the namespace's veth so ranks talk across the "network".
            env = subprocess_env(GLOO_SOCKET_IFNAME=link)
            procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                          text=True))
        outputs = []
        try:
            for proc in procs:
                outputs.append(proc.communicate(timeout=400)[0])
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        for proc, output in zip(procs, outputs, strict=True):
            assert proc.returncode == 0, output[-3000:]
    assert "--rdzv-conf is_host=1" in outputs[0]  # the first namespace hosts the rendezvous store
    assert "--local-addr 10.77.0.2" in outputs[1]
    assert logged_steps(tmp_path) == [1, 2, 3]
