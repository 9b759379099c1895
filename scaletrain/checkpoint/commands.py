"""The checkpoint commands of the `scaletrain` CLI.

scaletrain ckpt info DIR                                   a checkpoint, a checkpoints folder or a run folder
scaletrain export CKPT --format safetensors [--out FILE] [--weights model|ema]
scaletrain export CKPT --format hf [--out DIR] [--weights model|ema]
scaletrain import hf HF_DIR --out DIR                      then train with --checkpoint.load_path DIR/step-00000000
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from scaletrain.checkpoint.export import export_hf, export_safetensors, import_hf, trainer_state, verified_manifest
from scaletrain.checkpoint.format import MANIFEST, PARTIAL_SUFFIX, CheckpointError, read_manifest, step_of
from scaletrain.checkpoint.safe_io import read_metadata
from scaletrain.registry import get_recipe, known_recipes


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _human(num: float, units: tuple[str, ...] = ("B", "KB", "MB", "GB", "TB")) -> str:
    for unit in units:
        if num < 1000 or unit == units[-1]:
            return f"{num:.1f} {unit}" if unit != "B" else f"{int(num)} B"
        num /= 1000
    return str(num)


def describe(folder: Path) -> dict[str, str]:
    """What `ckpt info` prints about one checkpoint folder (never raises for a damaged one)."""
    info: dict[str, str] = {"path": str(folder)}
    if folder.name.endswith(PARTIAL_SUFFIX):
        info["status"] = "incomplete (a save in progress or interrupted; never loaded)"
    else:
        try:
            verified_manifest(folder)
            info["status"] = "complete (manifest, sizes and SHA-256 verified)"
        except CheckpointError as exc:
            info["status"] = f"DAMAGED: {exc}"
    try:
        manifest = read_manifest(folder)
    except CheckpointError:
        manifest = {}
    step = manifest.get("step", step_of(folder) if not folder.name.endswith(PARTIAL_SUFFIX) else None)
    info["step"] = str(step)
    info["layout"] = str(manifest.get("layout", "?"))
    info["world size"] = str(manifest.get("world_size", "?"))
    try:
        stored = read_metadata(folder).state_dict_metadata
        params = sum(_numel(m.size) for k, m in stored.items() if k.startswith("model.") and hasattr(m, "size"))
        info["parameters"] = f"{params:,}"
        info["sections"] = ", ".join(sorted({k.split(".", 1)[0] for k in stored}))
    except CheckpointError:
        info["parameters"] = "? (no readable DCP metadata)"
    info["size"] = _human(_size(folder))
    try:
        state = trainer_state(folder)
        info["recipe"] = str(state.get("recipe"))
        consumed = (state.get("data") or {}).get("consumed_samples")
        if consumed is not None:
            info["consumed samples"] = f"{consumed:,}"
        if state.get("recipe") in known_recipes() and get_recipe(state["recipe"]).step.phases is not None:
            info["networks"] = _per_network(read_metadata(folder).state_dict_metadata)
    except (CheckpointError, ValueError):
        pass
    info["format version"] = str(manifest.get("format_version", "?"))
    return info


def _per_network(stored: dict) -> str:
    """Parameters of each child of the root, for recipes that train several networks (a GAN's two)."""
    counts: dict[str, int] = {}
    for key, meta in stored.items():
        if key.startswith("model.") and hasattr(meta, "size"):
            network = key.split(".")[1]
            counts[network] = counts.get(network, 0) + _numel(meta.size)
    return ", ".join(f"{name} {n:,}" for name, n in sorted(counts.items()))


def _numel(size: tuple[int, ...]) -> int:
    n = 1
    for d in size:
        n *= d
    return n


def _folders(path: Path) -> list[Path]:
    if (path / MANIFEST).is_file() or step_of(path) is not None or path.name.endswith(PARTIAL_SUFFIX):
        return [path]
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    found = [c for c in root.iterdir() if c.is_dir() and (step_of(c) is not None or c.name.endswith(PARTIAL_SUFFIX))]
    return sorted(found)


def cmd_ckpt(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] != "info":
        print("usage: scaletrain ckpt info DIR", file=sys.stderr)
        return 2
    path = Path(argv[1])
    if not path.is_dir():
        raise ValueError(f"{path}: no such folder")
    folders = _folders(path)
    if not folders:
        print(f"{path}: no checkpoints")
        return 1
    for i, folder in enumerate(folders):
        if i:
            print()
        for key, value in describe(folder).items():
            print(f"{key + ':':<17} {value}")
    return 0


def cmd_export(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="scaletrain export", description="Export a checkpoint's weights.")
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--format", choices=("safetensors", "hf"), required=True)
    parser.add_argument("--out", type=Path, default=None, help="output file (safetensors) or folder (hf)")
    parser.add_argument("--weights", choices=("model", "ema"), default="model", help="which weights to export")
    args = parser.parse_args(argv)
    if not args.checkpoint.is_dir():
        raise ValueError(f"{args.checkpoint}: no such checkpoint folder")
    if args.format == "safetensors":
        out = export_safetensors(
            args.checkpoint, args.out or args.checkpoint / f"{args.weights}.safetensors", args.weights
        )
    else:
        out = export_hf(args.checkpoint, args.out or args.checkpoint / "hf", args.weights)
    print(f"exported {args.weights} weights of {args.checkpoint} to {out}")
    return 0


def cmd_import(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="scaletrain import", description="Import weights as a checkpoint.")
    parser.add_argument("kind", choices=("hf",))
    parser.add_argument("source", type=Path, help="a Hugging Face model folder (config.json + safetensors)")
    parser.add_argument("--out", type=Path, required=True, help="folder to write step-00000000/ into")
    args = parser.parse_args(argv)
    folder, model = import_hf(args.source, args.out)
    print(f"wrote {folder}")
    print("continue pretraining with:")
    print(
        f"  scaletrain train CONFIG --checkpoint.load_path {folder} "
        + " ".join(f"--model.{k} {v}" for k, v in model.items())
    )
    return 0
