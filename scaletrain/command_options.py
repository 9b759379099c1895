"""Parsing a command's own options out of argv, leaving the config overrides (--section.field VALUE)."""

from __future__ import annotations


def split_config(argv: list[str]) -> tuple[str | None, list[str]]:
    if argv and not argv[0].startswith("--"):
        return argv[0], argv[1:]
    return None, argv


def take_options(argv: list[str], names: dict[str, type]) -> tuple[dict[str, object], list[str]]:
    """Pull command options (e.g. --bench-steps) out of argv; the rest are config overrides. An option whose
    type is bool is a flag: present means True, and it takes no value."""
    found, rest, i = {}, [], 0
    while i < len(argv):
        key = argv[i][2:] if argv[i].startswith("--") else None
        if key is not None and "=" in key:
            key, value = key.split("=", 1)
            if key in names:
                found[key] = names[key](value)
                i += 1
                continue
        elif key in names and names[key] is bool:
            found[key] = True
            i += 1
            continue
        elif key in names:
            if i + 1 >= len(argv):
                raise ValueError(f"--{key} needs a value")
            found[key] = names[key](argv[i + 1])
            i += 2
            continue
        rest.append(argv[i])
        i += 1
    return found, rest
