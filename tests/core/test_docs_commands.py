"""Every `scaletrain` and `torchrun` command shown in README.md and docs/*.md is checked the way it would run.

An example once failed as written (`train.warmup_steps: 20 must be in [0, train.steps=5]`). Here each
documented command goes through the checks its command makes before any process starts, for the world size
it asks for: `train` / `torchrun ... -m scaletrain.train` / `bench` -> the trainer's config validation;
`launch X` -> that launcher's own checks (sbatch renders its script); `parity` -> both layouts;
`config`, `recipes` and `--help` run as written. Data that an earlier documented command produces (a
latent cache) may be missing. Commands that read a checkpoint or need a GPU or a cluster are listed in
NOT_CHECKED with the reason, so a new kind of command cannot slip through unchecked. The default README run
itself is CI's first command, and the tests elsewhere run these layouts for real.
"""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

import pytest
from st_common import REPO

from scaletrain import cli
from scaletrain.bench_engines import engine_overrides
from scaletrain.config import MissingDataError, load_config
from scaletrain.launchers import ray_launcher, sbatch, slurm, torchrun
from scaletrain.launchers.argv import split_overrides
from scaletrain.launchers.checks import check_launch
from scaletrain.parallel.dims import implied_world_size
from scaletrain.parity import check_layout
from scaletrain.parity import split_overrides as split_quoted
from scaletrain.plan.command import SEARCH_OPTIONS
from scaletrain.validate import validate_config

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
TINY = "scaletrain/recipes/gpt/configs/tiny.yaml"

# Command prefixes that are not checked here, and why (each must still appear in the docs).
NOT_CHECKED = {
    "scaletrain sample": "reads a checkpoint a documented run writes (tests/diffusion/test_errors_and_sample.py)",
    "scaletrain ckpt": "reads a run folder (tests/checkpoint/test_export_hf.py)",
    "scaletrain export": "reads a checkpoint (tests/checkpoint/test_export_hf.py)",
    "scaletrain import": "reads a Hugging Face folder (tests/checkpoint/test_export_hf.py)",
    "scaletrain bench kernels": "a GPU benchmark (tests/kernels/test_bench.py runs its CPU path)",
    "scaletrain train examples/gru_recipe": "needs the example package installed first, as the docs do "
    "(tests/core/test_external_recipe.py installs and trains it)",
    "torchrun --nproc-per-node 2 -m scaletrain.recipes.diffusion.latents": "reads a VAE checkpoint "
    "(tests/diffusion/test_latent.py)",
}


def _commands(path: Path) -> list[tuple[str, list[str]]]:
    """(line, argv) of each command in the file's shell code blocks; continuations joined, comments and
    `$VAR`s defined earlier in the file resolved, `ip netns exec NS`, `env` and `NAME=value` prefixes dropped."""
    found, block, fenced, in_block, variables = [], [], False, False, {}
    for line in path.read_text().splitlines():
        fence = re.match(r"\s*```(\w*)", line)
        if fence:
            if in_block:
                found += _block_commands("\n".join(block), variables)
            # Every fence opens or closes a block; only shell blocks hold commands (a closing fence never does).
            fenced = not fenced
            in_block, block = fenced and fence.group(1) in ("", "bash", "sh"), []
        elif in_block:
            block.append(line)
    return found


def _block_commands(text: str, variables: dict[str, str]) -> list[tuple[str, list[str]]]:
    found = []
    for line in re.sub(r"\\\n\s*", " ", text).splitlines():
        assignment = re.fullmatch(r"\s*([A-Z_]+)=(.*)", line)
        if assignment:
            variables[assignment.group(1)] = " ".join(shlex.split(assignment.group(2)))
            continue
        for name, value in variables.items():
            line = line.replace(f"${name}", value)
        try:
            argv = shlex.split(line, comments=True)
        except ValueError:
            continue  # prose or output shown in a code block
        if argv and argv[-1] == "&":  # started in the background
            argv = argv[:-1]
        if argv[:3] == ["ip", "netns", "exec"]:
            argv = argv[4:]
        while argv and (argv[0] == "env" or re.fullmatch(r"[A-Z_]+=\S*", argv[0])):
            argv = argv[1:]
        if argv[:3] in (["python3", "-m", "scaletrain.train"], ["python", "-m", "scaletrain.train"]):
            argv = ["scaletrain", "train", *argv[3:]]
        shown_output = len(argv) > 1 and argv[1].endswith(":")  # e.g. "scaletrain launch: error: ..."
        if argv and argv[0] in ("scaletrain", "torchrun") and "{" not in line and not shown_output:
            found.append((line.strip(), [TINY if a == "CONFIG" else a for a in argv]))
    return found


def _all() -> list[tuple[str, list[str]]]:
    return [(f"{path.name}: {line}", argv) for path in DOCS for line, argv in _commands(path)]


def _validate(config: str, overrides: list[str], world_size: int) -> None:
    try:
        validate_config(load_config(REPO / config, overrides), world_size)
    except MissingDataError:
        pass  # data a previous documented command builds (e.g. the latent cache)


def _torchrun(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--nproc-per-node", type=int, default=1)
    parser.add_argument("--nnodes", type=int, default=1)
    parser.add_argument("--max-restarts", type=int, default=0)
    parser.add_argument("--standalone", action="store_true")
    parser.add_argument("-m", dest="module")
    options, rest = parser.parse_known_args(argv)
    world = options.nproc_per_node * options.nnodes
    if options.module == "scaletrain.train":
        _validate(rest[0], rest[1:], world)
    elif options.module == "scaletrain.cli" and rest[0] == "bench":
        _, overrides = cli._take_options(rest[2:], BENCH_OPTIONS)
        _validate(rest[1], overrides, world)
    else:
        raise AssertionError(f"no check for torchrun -m {options.module}")


BENCH_OPTIONS = {"bench-steps": int, "bench-warmup": int, "bench-rounds": int, "engines": str, "nproc": int, "out": str}
LAUNCHERS = {"torchrun": torchrun, "sbatch": sbatch, "slurm": slurm, "ray": ray_launcher}


def _launch(name: str, argv: list[str]) -> None:
    flags, overrides = split_overrides(argv)
    parser = argparse.ArgumentParser(allow_abbrev=False)
    LAUNCHERS[name].add_arguments(parser)
    options = parser.parse_args(flags)
    if name == "sbatch":
        sbatch.build_script(options, overrides)  # every check, and the script renders
    elif name == "slurm":
        slurm.SlurmLaunch(options.config, overrides, options.nodes, options.nproc_per_node,
                          options.gpus_per_node, options.cpus_per_task).check()  # fmt: skip
    else:
        nodes = options.nnodes if name == "torchrun" else options.nodes
        check_launch(options.config, overrides, nodes, options.nproc_per_node)


def check(argv: list[str], capsys) -> None:  # noqa: ANN001
    if argv[0] == "torchrun":
        return _torchrun(argv[1:])
    command, rest = argv[1], argv[2:]
    if command in ("config", "recipes") or "--help" in rest:
        assert cli.main(argv[1:]) == 0, capsys.readouterr().err
    elif command == "train":
        _validate(rest[0], rest[1:], 1)
    elif command == "bench":
        options, overrides = cli._take_options(rest[1:], BENCH_OPTIONS)
        if "engines" in options:  # each engine's config, for --nproc ranks, as bench_engines checks them
            nproc = int(options.get("nproc", 2))
            for entry in str(options["engines"]).split(","):
                _validate(rest[0], overrides + engine_overrides(entry, nproc), nproc)
        else:
            _validate(rest[0], overrides, 1)
    elif command == "parity":
        options, common = cli._take_options(rest, {"a": str, "b": str, "rtol": float})
        for layout in (options.get("a", ""), options.get("b", "")):
            check_layout(str(REPO / common[0]), common[1:] + split_quoted(str(layout)))
    elif command == "launch":
        _launch(rest[0], rest[1:])
    elif command == "plan":  # the trainer's validation for the layout's world size (the plan itself: test_cli)
        options, overrides = cli._take_options(rest[1:], SEARCH_OPTIONS)
        cfg = load_config(REPO / rest[0], overrides)
        if "gpus" not in options:  # a search validates each of its layouts itself
            _validate(rest[0], overrides, int(options.get("world-size") or implied_world_size(vars(cfg.parallel))))
    else:
        raise AssertionError(f"no check for `scaletrain {command}`")


@pytest.mark.parametrize(("where", "argv"), _all(), ids=[where for where, _ in _all()])
def test_documented_command(where, argv, capsys, monkeypatch):
    if any(" ".join(argv).startswith(prefix) for prefix in NOT_CHECKED):
        pytest.skip(next(why for prefix, why in NOT_CHECKED.items() if " ".join(argv).startswith(prefix)))
    monkeypatch.chdir(REPO)  # the docs' paths are relative to the repository root
    check(argv, capsys)


def test_the_docs_show_commands_and_every_unchecked_kind_still_appears():
    commands = [" ".join(argv) for _, argv in _all()]
    assert len(commands) > 40
    for prefix in NOT_CHECKED:
        assert any(c.startswith(prefix) for c in commands), f"{prefix!r} is no longer documented: drop it"
