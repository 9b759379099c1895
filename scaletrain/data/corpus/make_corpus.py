"""Regenerate the bundled corpus (`stdlib_corpus.txt`) from this interpreter's standard library.

Run once by a maintainer: `python scaletrain/data/corpus/make_corpus.py`. The output is checked
in, so training results never depend on which Python version a user happens to have; this
script only documents (and can reproduce, on the recorded Python version) where the text came
from. The sources are PSF-licensed; see LICENSE-PSF.txt next to this file.

The module list is fixed and ordered by hand: pure-Python modules that are large, stable and
mostly prose-like code (docstrings + code), chosen so the total lands around 500 KB. Each file
is included verbatim apart from normalising line endings to "\n" and dropping bytes that are
not valid UTF-8 (none are, in practice), separated by a one-line header naming it.
"""

from __future__ import annotations

import argparse
import platform
import sysconfig
from pathlib import Path

# Order matters: it is the order of the text in the corpus.
MODULES: tuple[str, ...] = (
    "textwrap.py",
    "string.py",
    "shlex.py",
    "heapq.py",
    "bisect.py",
    "fractions.py",
    "functools.py",
    "difflib.py",
    "calendar.py",
    "contextlib.py",
    "abc.py",
    "copy.py",
    "keyword.py",
    "operator.py",
    "random.py",
    "statistics.py",
    "json/__init__.py",
    "json/decoder.py",
    "json/encoder.py",
    "json/scanner.py",
    "csv.py",
    "pprint.py",
    "dataclasses.py",
)

CORPUS_NAME = "stdlib_corpus.txt"


def build_corpus(stdlib_dir: Path) -> str:
    """Concatenate MODULES from `stdlib_dir` with a header line before each file."""
    version = platform.python_version()
    parts = [f"# scaletrain bundled corpus: Python {version} standard library sources (PSF licence)\n"]
    for rel in MODULES:
        raw = (stdlib_dir / rel).read_bytes()
        text = raw.decode("utf-8", errors="ignore").replace("\r\n", "\n").replace("\r", "\n")
        if not text.endswith("\n"):
            text += "\n"
        parts.append(f"\n# ===== Lib/{rel} =====\n\n{text}")
    return "".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).with_name(CORPUS_NAME)), help="Output .txt path.")
    parser.add_argument("--stdlib", default=sysconfig.get_paths()["stdlib"], help="Standard library folder.")
    args = parser.parse_args()
    text = build_corpus(Path(args.stdlib))
    # newline="" keeps "\n" on every platform, so the bytes are the same everywhere.
    Path(args.out).write_text(text, encoding="utf-8", newline="")
    print(f"wrote {args.out}: {len(text.encode('utf-8'))} bytes from {len(MODULES)} modules")


if __name__ == "__main__":
    main()
