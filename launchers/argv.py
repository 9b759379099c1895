"""Split a launcher command line into launcher flags and the trainer's config overrides.

Config overrides always have a dot (`--train.steps 3`, `--parallel.dp_shard=-1`) and
launcher flags never do (`--nodes 2`), so the split needs no `--` separator and an
override's value may start with '-' (`--parallel.dp_shard -1`).

    split_overrides(["cfg.yaml", "--nodes", "2", "--train.steps", "3"])
    -> (["cfg.yaml", "--nodes", "2"], ["--train.steps", "3"])
"""

from __future__ import annotations


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
