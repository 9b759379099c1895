"""constraints.txt: the versions of every dependency the test suite last passed with.

`.ci/run` and the README install with `-c constraints.txt`, so a release upstream cannot turn CI red
overnight; `bash scripts/test_latest.sh` runs the suite against the newest releases instead and, with
`--update`, rewrites the file from the environment it passed in.

  python scripts/constraints.py diff    # how this environment differs from constraints.txt
  python scripts/constraints.py write   # rewrite constraints.txt from this environment
"""

from __future__ import annotations

import re
import sys
from importlib.metadata import distributions
from pathlib import Path

FILE = Path(__file__).resolve().parents[1] / "constraints.txt"

# Not pinned here: scaletrain itself; torch, which the install command pins (torch==2.13.0 for CPU) or the
# user's CUDA build provides; pip, which runs the install; CUDA wheels, which come with a CUDA torch.
UNPINNED = re.compile(r"^(scaletrain|torch|pip|nvidia-.*)$")

HEADER = """\
# Versions the test suite last passed with (python scripts/constraints.py write, after the suite passed).
# Used by .ci/run and the README's commands (pip install ... -c constraints.txt); refresh with
# `bash scripts/test_latest.sh --update`. torch is pinned by the install command, not here.
"""


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def installed() -> dict[str, str]:
    found = {}
    for dist in distributions():
        name = _normalize(dist.metadata["Name"] or "")
        if name and not UNPINNED.match(name):
            found[name] = dist.version
    return dict(sorted(found.items()))


def pinned(path: Path = FILE) -> dict[str, str]:
    found = {}
    if path.exists():
        for line in path.read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                name, version = line.split("==")
                found[_normalize(name)] = version
    return found


def diff(old: dict[str, str], new: dict[str, str]) -> list[str]:
    lines = []
    for name in sorted(old.keys() | new.keys()):
        before, after = old.get(name), new.get(name)
        if before != after:
            lines.append(f"{name}: {before or '(none)'} -> {after or '(none)'}")
    return lines


def main(argv: list[str]) -> int:
    if argv == ["diff"]:
        changes = diff(pinned(), installed())
        print("\n".join(changes) if changes else "this environment matches constraints.txt")
        return 0
    if argv == ["write"]:
        FILE.write_text(HEADER + "".join(f"{name}=={version}\n" for name, version in installed().items()))
        print(f"wrote {FILE} ({len(installed())} packages)")
        return 0
    print(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
