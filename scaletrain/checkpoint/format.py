"""On-disk format of a scaletrain checkpoint: folder names, the manifest, and validation.

A run's checkpoint root holds one folder per saved step:

  step-00000100/            complete: DCP shards + .metadata + trainer.json + rng/ + manifest.json
  step-00000200.partial/    a save in progress, or killed mid-way: never loaded, removed later

manifest.json is written last, just before the folder is renamed from `.partial` to its
final name (an atomic rename on POSIX), so a folder with the final name and a manifest is
complete. The manifest lists every other file with its size and SHA-256, which is how a
truncated or bit-flipped shard is caught before any tensor is read.

Format versions: 1 = sizes only (scaletrain 0.1); 2 = sizes + SHA-256, RNG states, the
resolved config in trainer.json; 3 = as 2, with the optimizer state flattened per parameter
name (2 stored the param groups of one rank, which other pipeline stages cannot map onto
their own parameters). This code reads and writes 3.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

FORMAT_VERSION = 3
READABLE_VERSIONS = (3,)
MANIFEST = "manifest.json"
TRAINER_STATE = "trainer.json"
PARTIAL_SUFFIX = ".partial"
_STEP_DIR = re.compile(r"^step-(\d{8})$")
_CHUNK = 1 << 22


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the file and the fix."""


class CheckpointMismatchError(CheckpointError):
    """An intact checkpoint whose tensors do not fit the model being trained (another shape or model)."""


def step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:08d}"


def step_of(folder: Path) -> int | None:
    match = _STEP_DIR.match(folder.name)
    return int(match.group(1)) if match else None


def checkpoint_dirs(root: Path) -> list[tuple[int, Path]]:
    """(step, path) of every published step folder under `root` (complete or damaged), oldest first."""
    if not root.is_dir():
        return []
    found = [(step_of(child), child) for child in root.iterdir() if child.is_dir()]
    return sorted((step, child) for step, child in found if step is not None)


def partial_dirs(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return sorted(c for c in root.iterdir() if c.is_dir() and c.name.endswith(PARTIAL_SUFFIX))


def complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, path) of every published checkpoint with a manifest, oldest first (no file checks)."""
    return [(step, path) for step, path in checkpoint_dirs(root) if (path / MANIFEST).is_file()]


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def list_files(folder: Path) -> list[str]:
    """Every file of a checkpoint folder except the manifest, as sorted relative paths."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def file_entry(folder: Path, name: str) -> dict[str, Any]:
    path = folder / name
    return {"size": path.stat().st_size, "sha256": sha256_file(path)}


def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    """Write manifest.json durably: temp file, fsync, rename (the rename of the folder follows)."""
    tmp = folder / (MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, folder / MANIFEST)


def read_manifest(folder: Path) -> dict[str, Any]:
    """The manifest of a published checkpoint, with its format version checked."""
    path = folder / MANIFEST
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such checkpoint folder")
    if not path.is_file():
        if not any(folder.iterdir()):
            raise CheckpointError(f"{folder}: the checkpoint folder is empty (no {MANIFEST}, no shards)")
        raise CheckpointError(
            f"{path}: missing — {folder} is not a complete scaletrain checkpoint (a save was interrupted "
            "or the manifest was deleted)"
        )
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from exc
    version = manifest.get("format_version") if isinstance(manifest, dict) else None
    if version not in READABLE_VERSIONS:
        raise CheckpointError(
            f"{path}: checkpoint format version {version!r} is not supported; this scaletrain reads "
            f"versions {list(READABLE_VERSIONS)} — use the scaletrain release that wrote it, or export it "
            "to safetensors there"
        )
    return manifest


def check_file(folder: Path, name: str, entry: Any, checksum: bool) -> str | None:
    """None if file `name` matches its manifest entry, else the problem (naming the file)."""
    path = folder / name
    # Format 1 stored only the size.
    expected = entry if isinstance(entry, dict) else {"size": entry}
    if not path.is_file():
        return f"{path}: missing (listed in {folder / MANIFEST})"
    size = path.stat().st_size
    if size != expected["size"]:
        return f"{path}: truncated or overwritten — {size} bytes, the manifest says {expected['size']}"
    if checksum and "sha256" in expected and sha256_file(path) != expected["sha256"]:
        return f"{path}: corrupted — its SHA-256 does not match the manifest"
    return None
