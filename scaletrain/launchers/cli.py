"""`scaletrain launch {torchrun,slurm,sbatch,ray} CONFIG [launcher flags] [--section.field value ...]`.

Runbook:
  scaletrain launch torchrun scaletrain/recipes/gpt/configs/tiny.yaml --nproc-per-node 2 --train.steps 5
  scaletrain launch torchrun scaletrain/recipes/gpt/configs/tiny.yaml --nodes 2 --nproc-per-node 8 \
      --rdzv-endpoint node001:29500                                  # on every node
  scaletrain launch sbatch   scaletrain/recipes/gpt/configs/llama-8b.yaml --nodes 4 --nproc-per-node 8 --gpus-per-node 8
  scaletrain launch slurm    scaletrain/recipes/gpt/configs/llama-8b.yaml --nodes 4 --nproc-per-node 8 --gpus-per-node 8
  scaletrain launch ray      scaletrain/recipes/gpt/configs/tiny.yaml --nproc-per-node 2

Every launcher checks the config for the world size it will start (nodes x nproc-per-node)
before anything runs or is queued; a failed check prints the reason and returns 2. Flags
with a dot are the trainer's config overrides and pass through untouched.

Exit codes: 0 success; 2 a launch or config error (nothing started); otherwise the run's.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from scaletrain.launchers.argv import split_overrides
from scaletrain.launchers.checks import LaunchError

# Launcher name -> module. The modules import submitit / Ray only when they launch, so every
# subcommand's --help (and torchrun) works without them installed.
LAUNCHERS = {
    "torchrun": ("scaletrain.launchers.torchrun", "torchrun on this node (one node, or one of many)"),
    "slurm": ("scaletrain.launchers.slurm", "submit to Slurm with submitit, one task per rank"),
    "sbatch": ("scaletrain.launchers.sbatch", "render slurm/*.sbatch and submit it: one torchrun per node"),
    "ray": ("scaletrain.launchers.ray_launcher", "Ray Train TorchTrainer on a local or existing Ray cluster"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scaletrain launch",
        description="Start a scaletrain run on many processes; --section.field flags override the config.",
        allow_abbrev=False,
    )
    sub = parser.add_subparsers(dest="launcher", required=True, metavar="{" + ",".join(LAUNCHERS) + "}")
    for name, (module, help_text) in LAUNCHERS.items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text, allow_abbrev=False)
        sub_parser.set_defaults(module=module)
        importlib.import_module(module).add_arguments(sub_parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry for `scaletrain launch ...`; returns the process exit code."""
    flags, overrides = split_overrides(list(sys.argv[1:] if argv is None else argv))
    try:
        ns = build_parser().parse_args(flags)
    except SystemExit as exc:  # --help, or a usage error argparse already printed
        return exc.code if isinstance(exc.code, int) else 2
    try:
        return importlib.import_module(ns.module).run_args(ns, overrides)
    except LaunchError as exc:
        print(f"scaletrain launch: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
