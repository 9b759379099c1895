"""The `scaletrain` command. New knobs become config fields, not flags.

  scaletrain train CONFIG [--section.field VALUE ...]      train (torchrun -m scaletrain.train for many ranks)
  scaletrain config show CONFIG [overrides]                 resolved config + parameter and FLOP counts
  scaletrain config help [--recipe NAME]                    every field with its help text and default
  scaletrain recipes                                        registered model families
  scaletrain parity CONFIG --a "OVERRIDES" --b "OVERRIDES"  per-step loss / grad-norm differences of two layouts
  scaletrain bench CONFIG [--bench-steps N] [overrides]     tokens/s vs a plain PyTorch loop, same run
  scaletrain bench kernels [--seq 128,256 ...]              fused kernels vs PyTorch alternatives
  scaletrain sample CHECKPOINT [...]                        the checkpoint's recipe samples from it
  scaletrain ckpt info DIR                                  step, layout, parameters, size, complete or not
  scaletrain plan CONFIG [--memory-limit-gb G] [overrides]  per-rank memory of the layout, predicted without a GPU
  scaletrain export CHECKPOINT --format {safetensors,hf}    consolidated weights (HF: transformers loads them)
  scaletrain import hf HF_DIR --out DIR                     HF weights -> a checkpoint for --checkpoint.load_path
  scaletrain <plugin> ...                                   commands other packages register (e.g. launch)

Plugins register under the `scaletrain.commands` entry-point group as `name = module:main`
(main(argv) -> int), which is how `scaletrain launch` arrives from scaletrain.launchers
without the core importing it.
"""

from __future__ import annotations

import argparse
import json
import sys
from importlib.metadata import entry_points
from pathlib import Path

import yaml

from scaletrain.checkpoint.commands import cmd_ckpt, cmd_export, cmd_import
from scaletrain.checkpoint.format import CheckpointError
from scaletrain.command_options import split_config as _split_config
from scaletrain.command_options import take_options as _take_options
from scaletrain.config import MissingDataError, config_to_dict, field_help, load_config
from scaletrain.config.schema import JobConfig
from scaletrain.engines import get_engine
from scaletrain.parallel.dims import ParallelDims, implied_world_size
from scaletrain.plan.command import USAGE as PLAN_USAGE
from scaletrain.plan.command import cmd_plan
from scaletrain.plan.summary import model_summary
from scaletrain.registry import get_recipe, known_recipes
from scaletrain.validate import validate_config


def cmd_train(argv: list[str]) -> int:
    from scaletrain.train import main as train_main

    train_main(argv)
    return 0


def cmd_config(argv: list[str]) -> int:
    if not argv or argv[0] not in ("show", "help"):
        print("usage: scaletrain config {show CONFIG [overrides] | help [--recipe NAME]}", file=sys.stderr)
        return 2
    if argv[0] == "help":
        options, _ = _take_options(argv[1:], {"recipe": str})
        recipe = get_recipe(str(options.get("recipe", "gpt")))
        rows = field_help(JobConfig)
        rows += field_help(recipe.model.config, "model.") + field_help(recipe.data.config, "data.")
        for name, text, default in sorted(rows):
            if name in ("model", "data"):
                continue
            print(f"--{name:<38} {text} [default: {default}]")
        return 0
    options, rest = _take_options(argv[1:], {"world-size": int})
    path, overrides = _split_config(rest)
    cfg = load_config(path, overrides)
    # Every check the trainer makes; without --world-size, for the processes the degrees name (dp_shard=-1 -> 1).
    world_size = int(options.get("world-size", implied_world_size(cfg.parallel.degrees)))
    checked = f"# checked for a world size of {world_size}"
    dims = None
    try:
        dims = validate_config(cfg, world_size)
    except MissingDataError as exc:  # data on another machine: recipes check it last, so all else passed
        checked += f", all but the data, which is not on this machine: {exc}"
    print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False).rstrip())
    print(checked)
    engine = get_engine(cfg.engine.name)
    if engine.show is not None and dims is not None:
        for line in engine.show(cfg, dims):  # e.g. the DeepSpeed JSON the run will use
            print(f"# {line}")
    summary = model_summary(cfg)
    print("# model")
    for key, value in summary.items():
        print(f"#   {key}: {value:,.0f}" if value >= 1e3 else f"#   {key}: {value:.4g}")
    if dims is not None and cfg.engine.name == "native":
        for line in model_state_lines(cfg, dims):
            print(f"# {line}")
    return 0


def model_state_lines(cfg: JobConfig, dims: ParallelDims) -> list[str]:
    """Each pipeline rank's model state (scaletrain/plan), from the layout's real shards."""
    from dataclasses import asdict

    from scaletrain.plan.memory import model_state_bytes
    from scaletrain.plan.shards import rank_shards

    lines = ["model state per rank (parameters, gradients, optimizer, EMA, buffers; activations: scaletrain plan)"]
    for pp_rank in range(dims.pp):
        state = model_state_bytes(rank_shards(cfg, dims, pp_rank), cfg, dims)
        parts = ", ".join(f"{name} {n / 2**30:.3g}" for name, n in asdict(state).items() if n)
        where = f"pp rank {pp_rank}" if dims.pp > 1 else "every rank"
        lines.append(f"  {where}: {state.total / 2**30:.3g} GiB ({parts})")
    return lines


def cmd_recipes(argv: list[str]) -> int:
    for name in known_recipes():
        print(name)
    return 0


def cmd_parity(argv: list[str]) -> int:
    from scaletrain.parity import parity, split_overrides

    options, rest = _take_options(argv, {"a": str, "b": str, "rtol": float})
    path, common = _split_config(rest)
    report = parity(
        path, split_overrides(str(options.get("a", ""))), split_overrides(str(options.get("b", ""))), common
    )
    print(report.table())
    rtol = float(options.get("rtol", 1e-5))
    ok = report.max_loss_rel_diff <= rtol
    print(f"{'PASS' if ok else 'FAIL'}: max loss relative difference {report.max_loss_rel_diff:.2e} (rtol {rtol:g})")
    return 0 if ok else 1


def cmd_bench(argv: list[str]) -> int:
    if argv and argv[0] == "kernels":
        return _bench_kernels(argv[1:])
    from scaletrain.bench import bench, bench_pipeline
    from scaletrain.distributed import world_size_from_env

    options, rest = _take_options(
        argv,
        {"bench-steps": int, "bench-warmup": int, "bench-rounds": int, "engines": str, "nproc": int, "out": str},
    )
    path, overrides = _split_config(rest)
    if "engines" in options:
        from scaletrain.bench_engines import bench_engines, table

        nproc = int(options.get("nproc", 2))
        out = Path(str(options.get("out", "runs/bench-engines")))
        engines = [e for e in str(options["engines"]).split(",") if e]
        rows, unit = bench_engines(path, engines, nproc, overrides, out, warmup=int(options.get("bench-warmup", 2)))
        print(table(rows, unit))
        print(f"written: {out / 'engines.csv'}, {out / 'engines.md'}, {out / 'engines.png'}")
        return 0
    cfg = load_config(path, overrides)
    if world_size_from_env() > 1:
        result = bench_pipeline(
            cfg, steps=int(options.get("bench-steps", 5)), warmup=int(options.get("bench-warmup", 2))
        )
        if dist_rank() == 0:
            print(result.report())
        return 0
    result = bench(
        cfg,
        steps=int(options.get("bench-steps", 10)),
        warmup=int(options.get("bench-warmup", 3)),
        rounds=int(options.get("bench-rounds", 3)),
    )
    print(result.report())
    return 0


def dist_rank() -> int:
    import os

    return int(os.environ.get("RANK", "0"))


def _bench_kernels(argv: list[str]) -> int:
    from scaletrain.kernels import bench as kernel_bench

    return int(kernel_bench.main(argv) or 0)


def cmd_sample(argv: list[str]) -> int:
    if not argv:
        print("usage: scaletrain sample CHECKPOINT_DIR [recipe options]", file=sys.stderr)
        return 2
    trainer_json = Path(argv[0]) / "trainer.json"
    if not trainer_json.is_file():
        raise ValueError(f"{argv[0]}: not a complete scaletrain checkpoint (no trainer.json)")
    recipe = get_recipe(json.loads(trainer_json.read_text())["recipe"])
    if recipe.evaluation.sample is None:
        raise ValueError(f"recipe {recipe.name!r} has no sampler")
    recipe.evaluation.sample(argv)
    return 0


# `scaletrain COMMAND --help` for the commands that parse their own arguments (export and import use argparse).
USAGE = {
    "train": """usage: scaletrain train CONFIG [--section.field VALUE ...]
Train CONFIG (a YAML file) with dotted overrides; resumes from the run folder's newest checkpoint.
Every field, with its help and default: scaletrain config help [--recipe NAME].
Many processes: torchrun --nproc-per-node N -m scaletrain.train CONFIG [overrides], or scaletrain launch.""",
    "config": """usage: scaletrain config show CONFIG [--world-size N] [--section.field VALUE ...]
       scaletrain config help [--recipe NAME]
show: the resolved config, checked as the trainer checks it, with parameter and FLOP counts.
help: every field with its help text and default.""",
    "recipes": """usage: scaletrain recipes
List the registered model families (bundled and from installed packages).""",
    "parity": """usage: scaletrain parity CONFIG --a "OVERRIDES" --b "OVERRIDES" [--rtol R] [--section.field VALUE ...]
Train CONFIG under two layouts (torchrun, as many processes as each needs) and print the per-step loss and
grad-norm differences; exit 0 when the losses agree within --rtol (default 1e-5). Both layouts are checked
before anything starts. Shared overrides go after the options.""",
    "bench": """usage: scaletrain bench CONFIG [--bench-steps N] [--bench-warmup N] [--bench-rounds N] [overrides]
       scaletrain bench CONFIG --engines native,deepspeed:zero2,... [--nproc N] [--out DIR] [overrides]
       scaletrain bench kernels [--help]
Throughput of CONFIG's training step against plain PyTorch baselines measured in the same run (ratios,
median of rounds), and MFU where the device has a peak-FLOPs entry. With --engines: the same model, data and
world size under each engine (ENGINE or ENGINE:PRESET), tokens/s, peak memory and ratio to native, written as
CSV, Markdown and PNG.""",
    "sample": """usage: scaletrain sample CHECKPOINT [recipe options]
Sample from a checkpoint with its recipe's sampler; scaletrain sample CHECKPOINT --help lists its options.""",
    "ckpt": """usage: scaletrain ckpt info DIR
Step, layout, parameters, size and integrity of a checkpoint, a checkpoints folder or a run folder.""",
    "plan": PLAN_USAGE,
}


def _wants_help(command: str, argv: list[str]) -> bool:
    """True when `--help` is for the command itself rather than a sub-tool that prints its own."""
    if not any(a in ("-h", "--help") for a in argv) or command not in USAGE:
        return False
    if command == "bench" and argv[:1] == ["kernels"]:
        return False  # the kernel benchmark's argparse help
    return not (command == "sample" and argv and not argv[0].startswith("-"))  # the recipe sampler's


COMMANDS = {
    "train": cmd_train,
    "config": cmd_config,
    "recipes": cmd_recipes,
    "parity": cmd_parity,
    "bench": cmd_bench,
    "sample": cmd_sample,
    "ckpt": cmd_ckpt,
    "export": cmd_export,
    "import": cmd_import,
    "plan": cmd_plan,
}


# What bad input raises: config and argument errors (ValueError), unusable checkpoints, paths that are not there.
USER_ERRORS = (ValueError, CheckpointError, FileNotFoundError, NotADirectoryError, IsADirectoryError)


def _plugins() -> dict[str, object]:
    return {ep.name: ep for ep in entry_points(group="scaletrain.commands")}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    plugins = _plugins()
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    command, rest = argv[0], argv[1:]
    if _wants_help(command, rest):
        print(USAGE[command])
        return 0
    try:
        if command in COMMANDS:
            return COMMANDS[command](rest)
        if command in plugins:
            return int(plugins[command].load()(rest) or 0)
    except USER_ERRORS as exc:
        # A user error is one line naming the field or path; anything else is a bug and keeps its traceback.
        print(f"scaletrain {command}: error: {exc}", file=sys.stderr)
        return 2
    parser = argparse.ArgumentParser(prog="scaletrain")
    parser.error(f"unknown command {command!r}; choose from {sorted(COMMANDS) + sorted(plugins)}")
    return 2


if __name__ == "__main__":
    from scaletrain.distributed import run_as_worker

    run_as_worker(main)  # under torchrun (e.g. `-m scaletrain.cli bench --parallel.pp 2`)
