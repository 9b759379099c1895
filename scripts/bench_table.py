"""Splice GPU kernel benchmark results into docs/benchmarks.md (the last step of scripts/gpu_bench.sh).

    python3 scripts/bench_table.py docs/benchmarks.md runs/gpu-bench/d64 runs/gpu-bench/d128 \
        --tests runs/gpu-bench/tests/pytest.txt

Each result folder comes from ``python -m scaletrain.kernels.bench --out DIR`` (kernels.md, optional kernels.png and
command.txt). Everything between the ``<!-- gpu-kernels:begin -->`` and ``<!-- gpu-kernels:end -->`` lines
of the document is replaced: per folder, the command, its Markdown report and its plot (copied to
docs/img/kernels-<folder>.png). Needs no GPU, so results fetched from a GPU machine are spliced anywhere.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

BEGIN, END = "<!-- gpu-kernels:begin -->", "<!-- gpu-kernels:end -->"


def section(doc: Path, result_dir: Path) -> str:
    """The Markdown for one result folder; copies its plot next to the document."""
    name = result_dir.name
    lines = [f"### {name}", ""]
    command = result_dir / "command.txt"
    if command.is_file():
        lines += ["```bash", command.read_text().strip(), "```", ""]
    lines.append((result_dir / "kernels.md").read_text().strip())
    png = result_dir / "kernels.png"
    if png.is_file():
        target = doc.parent / "img" / f"kernels-{name}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(png, target)
        lines += ["", f"![{name}: ms per implementation vs sequence length](img/{target.name})"]
    return "\n".join(lines)


def test_summary(path: Path) -> str:
    """The last pytest summary line ("N passed, M skipped in Ts")."""
    summary = [ln.strip("= ").strip() for ln in path.read_text().splitlines() if " in " in ln and "passed" in ln]
    return summary[-1] if summary else "no pytest summary line found in " + path.name


def splice(doc: Path, result_dirs: list[Path], tests: Path | None) -> str:
    text = doc.read_text()
    if text.count(BEGIN) != 1 or text.count(END) != 1 or text.index(BEGIN) > text.index(END):
        raise SystemExit(f"{doc}: needs exactly one {BEGIN} ... {END} block")
    parts = []
    if tests is not None:
        parts.append(f"`pytest tests/kernels` on this GPU (compiled kernels, no interpreter): {test_summary(tests)}")
    parts += [section(doc, d) for d in result_dirs]
    head, rest = text.split(BEGIN)
    _, tail = rest.split(END)
    new = head + BEGIN + "\n" + "\n\n".join(parts) + "\n" + END + tail
    doc.write_text(new)
    return new


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("doc", type=Path)
    p.add_argument("results", type=Path, nargs="*", help="folders written by kernels.bench --out")
    p.add_argument("--tests", type=Path, default=None, help="pytest output of tests/kernels on the GPU")
    a = p.parse_args(argv)
    if not a.results and a.tests is None:
        raise SystemExit("nothing to splice: give result folders and/or --tests")
    splice(a.doc, a.results, a.tests)
    print(f"updated {a.doc}")


if __name__ == "__main__":
    main()
