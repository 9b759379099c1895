"""Build, check and run a torchrun command for scaletrain, on one node or many.

Runbook (from the repo root):
  # one node, 2 processes (standalone rendezvous on a free local port)
  scaletrain launch torchrun scaletrain/recipes/gpt/configs/tiny.yaml --nproc-per-node 2 --train.steps 5
  # 2 nodes x 8 GPUs, c10d rendezvous: run the same line on every node
  scaletrain launch torchrun scaletrain/recipes/gpt/configs/tiny.yaml --nnodes 2 --nproc-per-node 8 \
      --rdzv-endpoint node001:29500 --rdzv-id myrun --max-restarts 3
  # 2 nodes, static ranks: --node-rank 0 on node001, --node-rank 1 on node002
  scaletrain launch torchrun scaletrain/recipes/gpt/configs/tiny.yaml --nnodes 2 --nproc-per-node 8 \
      --node-rank 0 --rdzv-endpoint node001:29500
  # print the command without running it
  scaletrain launch torchrun scaletrain/recipes/gpt/configs/tiny.yaml --nproc-per-node 4 --dry-run

Order of work: split launcher flags from `--section.field` overrides -> check counts,
endpoint and the config for nnodes x nproc ranks (nothing starts if any check fails) ->
build the `python -m torch.distributed.run ... -m scaletrain.train CONFIG OVERRIDES` command
-> run it and return its exit code.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import subprocess
import sys
from dataclasses import dataclass, field

from scaletrain.launchers import SOURCE_ROOT
from scaletrain.launchers.argv import run_launcher
from scaletrain.launchers.checks import (
    LaunchError,
    check_launch,
    is_local_address,
    load_checked_config,
    local_address_towards,
    parse_endpoint,
    plan_lines,
    require,
)

TRAIN_MODULE = "scaletrain.train"


@dataclass
class TorchrunLaunch:
    config: str
    overrides: list[str] = field(default_factory=list)
    nnodes: int = 1
    nproc_per_node: int = 1
    node_rank: int | None = None
    rdzv_endpoint: str | None = None
    rdzv_id: str = "scaletrain"
    max_restarts: int = 0
    local_addr: str | None = None

    def check(self) -> None:
        """Every check that can run before a process starts; raises LaunchError."""
        require(self.max_restarts >= 0, f"--max-restarts: {self.max_restarts} is not allowed; use >= 0")
        if self.rdzv_endpoint is not None:
            parse_endpoint(self.rdzv_endpoint)
        require(
            self.nnodes < 2 or self.rdzv_endpoint is not None,
            f"--nnodes {self.nnodes} needs --rdzv-endpoint HOST:PORT (an address of the first node, "
            "reachable from every node) so the nodes can find each other",
        )
        if self.node_rank is not None:
            require(
                0 <= self.node_rank < max(self.nnodes, 1),
                f"--node-rank: {self.node_rank} is outside 0..{self.nnodes - 1} for --nnodes {self.nnodes}",
            )
        require(bool(self.rdzv_id.strip()), "--rdzv-id must not be empty")
        check_launch(self.config, self.overrides, self.nnodes, self.nproc_per_node)


def _torch_would_host(host: str) -> bool:
    # torch's own guess (hostname / loopback / the hostname's addresses); private API, so guarded.
    try:
        from torch.distributed.elastic.rendezvous.utils import _matches_machine_hostname
    except ImportError:
        return False
    return bool(_matches_machine_hostname(host))


def rendezvous_flags(launch: TorchrunLaunch) -> list[str]:
    if launch.rdzv_endpoint is None:
        # One node: a c10d store on a free local port, so two runs on one machine never collide.
        return ["--standalone"]
    host, port = parse_endpoint(launch.rdzv_endpoint)
    if launch.node_rank is not None:
        # Static rendezvous: ranks fixed by --node-rank, node 0 hosts the store at host:port.
        return ["--node-rank", str(launch.node_rank), "--master-addr", host, "--master-port", str(port)]
    endpoint = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    flags = ["--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", launch.rdzv_id]
    if is_local_address(host) and not _torch_would_host(host):
        # torch decides who hosts the c10d store by comparing the endpoint with this machine's
        # *hostname*; an address of a second interface (InfiniBand, a namespace's veth) fails that
        # comparison on every node and nobody hosts. We own the address, so we host.
        flags += ["--rdzv-conf", "is_host=1"]
    # Node 0's agent publishes this address as MASTER_ADDR for the workers' process group; the
    # default (the hostname) can resolve to 127.0.0.1, unreachable from other nodes.
    try:
        local_addr = launch.local_addr or local_address_towards(host, port)
    except OSError as exc:
        raise LaunchError(f"--rdzv-endpoint: cannot reach {host!r} from this node ({exc}); check the name") from exc
    return flags + ["--local-addr", local_addr]


def build_command(launch: TorchrunLaunch, python: str | None = None) -> list[str]:
    """The full command line; does not check the config (call `launch.check()` first)."""
    return [
        python or sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        str(launch.nnodes),
        "--nproc-per-node",
        str(launch.nproc_per_node),
        *rendezvous_flags(launch),
        "--max-restarts",
        str(launch.max_restarts),
        "-m",
        TRAIN_MODULE,
        str(launch.config),
        *launch.overrides,
    ]


def extra_env(launch: TorchrunLaunch) -> dict[str, str]:
    """Variables torchrun itself needs for this launch (printed with the command)."""
    if launch.nnodes > 1 and launch.max_restarts > 0 and launch.node_rank is None:
        # torchrun keeps one TCPStore for every restart and the dead group's keys stay in it; on
        # one node scaletrain.distributed namespaces them per restart, but across nodes the
        # restart counts can disagree, so ask torchrun for a fresh store per rendezvous round.
        return {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    return {}


def child_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment with this checkout first on PYTHONPATH, so workers train the code we checked."""
    env = dict(os.environ if base is None else base)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SOURCE_ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def run_command(cmd: list[str], env: dict[str, str] | None = None) -> int:
    """Run `cmd`, passing SIGTERM/SIGINT on to it (torchrun then stops its workers); its exit code."""
    proc = subprocess.Popen(cmd, env=child_env(env))

    def forward(signum: int, _frame: object) -> None:
        proc.send_signal(signum)

    previous = {}
    try:
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, forward)
    except ValueError:
        pass  # not the main thread: no handlers, the child still gets the terminal's signals
    try:
        return proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML config file")
    parser.add_argument("--nnodes", "--nodes", dest="nnodes", type=int, default=1, help="number of nodes")
    parser.add_argument("--nproc-per-node", type=int, default=1, help="processes (GPUs) per node")
    parser.add_argument("--node-rank", type=int, default=None, help="static rendezvous: this node's rank")
    parser.add_argument("--rdzv-endpoint", default=None, help="HOST:PORT on the first node (c10d or static)")
    parser.add_argument("--rdzv-id", default="scaletrain", help="c10d rendezvous id, the same on every node")
    parser.add_argument("--max-restarts", type=int, default=0, help="worker group restarts before failing")
    parser.add_argument("--local-addr", default=None, help="this node's address as others reach it")
    parser.add_argument(
        "--dry-run", action="store_true", help="check and print the command and the predicted memory; do not run it"
    )
    parser.add_argument("--memory-limit-gb", type=float, default=None, help="with --dry-run: warn above this per rank")


def from_args(ns: argparse.Namespace, overrides: list[str]) -> TorchrunLaunch:
    return TorchrunLaunch(
        config=ns.config,
        overrides=overrides,
        nnodes=ns.nnodes,
        nproc_per_node=ns.nproc_per_node,
        node_rank=ns.node_rank,
        rdzv_endpoint=ns.rdzv_endpoint,
        rdzv_id=ns.rdzv_id,
        max_restarts=ns.max_restarts,
        local_addr=ns.local_addr,
    )


def run_args(ns: argparse.Namespace, overrides: list[str]) -> int:
    launch = from_args(ns, overrides)
    launch.check()
    cmd = build_command(launch)
    env = extra_env(launch)
    shown = [f"{k}={v}" for k, v in env.items()] + cmd
    print(f"scaletrain launch: {shlex.join(shown)}", file=sys.stderr, flush=True)
    if ns.dry_run:
        cfg = load_checked_config(launch.config, launch.overrides)
        for line in plan_lines(cfg, launch.nnodes * launch.nproc_per_node, ns.memory_limit_gb):
            print(f"scaletrain launch: {line}", file=sys.stderr, flush=True)
        return 0
    return run_command(cmd, {**os.environ, **env})


def main(argv: list[str] | None = None) -> int:
    return run_launcher("scaletrain launch torchrun", add_arguments, run_args, argv)


if __name__ == "__main__":
    raise SystemExit(main())
