"""Split a launcher command line into launcher flags and the trainer's config overrides.

Config overrides always have a dot (`--train.steps 3`, `--parallel.dp_shard=-1`) and
launcher flags never do (`--nodes 2`), so the split needs no `--` separator and an
override's value may start with '-' (`--parallel.dp_shard -1`).

    split_overrides(["cfg.yaml", "--nodes", "2", "--train.steps", "3"])
    -> (["cfg.yaml", "--nodes", "2"], ["--train.steps", "3"])
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable


def is_override(token: str) -> bool:
    return token.startswith("--") and "." in token.split("=", 1)[0]


def split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    launcher: list[str] = []
    overrides: list[str] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        if is_override(token):
            overrides.append(token)
            if "=" not in token and i + 1 < len(argv):
                overrides.append(argv[i + 1])
                i += 1
        else:
            launcher.append(token)
        i += 1
    return launcher, overrides


def run_launcher(
    prog: str,
    add_arguments: Callable[[argparse.ArgumentParser], None],
    run_args: Callable[[argparse.Namespace, list[str]], int],
    argv: list[str] | None,
) -> int:
    """A launcher module's `main`: parse its flags, pass overrides through, report LaunchError as exit 2."""
    from scaletrain.launchers.checks import LaunchError

    flags, overrides = split_overrides(list(sys.argv[1:] if argv is None else argv))
    parser = argparse.ArgumentParser(prog=prog, allow_abbrev=False)
    add_arguments(parser)
    try:
        return run_args(parser.parse_args(flags), overrides)
    except LaunchError as exc:
        print(f"scaletrain launch: error: {exc}", file=sys.stderr)
        return 2
