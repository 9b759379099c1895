"""Reading DCP checkpoints without executing code from them.

torch.distributed.checkpoint stores tensors with `torch.save` (and reads them back with
`weights_only=True`, which is safe), but it unpickles its `.metadata` file with plain
`pickle.load` and non-tensor values (optimizer hyper-parameters) with
`torch.load(weights_only=False)`. Either would run whatever a crafted checkpoint asks.
Here the metadata goes through an unpickler that only builds DCP's own metadata classes,
and non-tensor values through `torch.load(weights_only=True)` (numbers, strings, tuples,
lists, dicts, tensors).
"""

from __future__ import annotations

import io
import pathlib
import pickle
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from scaletrain.checkpoint.format import CheckpointError

_DCP_METADATA_MODULE = "torch.distributed.checkpoint.metadata"
_ALLOWED = {
    ("torch", "Size"): torch.Size,
    ("torch.serialization", "_get_layout"): torch.serialization._get_layout,
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"): None,  # resolved lazily below
    ("pathlib", "PosixPath"): pathlib.PosixPath,
    ("pathlib", "PurePosixPath"): pathlib.PurePosixPath,
    ("pathlib", "WindowsPath"): pathlib.WindowsPath,
    ("pathlib", "PureWindowsPath"): pathlib.PureWindowsPath,
}
METADATA_FILE = ".metadata"


class _MetadataUnpickler(pickle.Unpickler):
    """Builds only DCP metadata objects, torch.Size, dtypes and paths; refuses anything else."""

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if module == _DCP_METADATA_MODULE and not name.startswith("__"):
            import torch.distributed.checkpoint.metadata as md

            value = getattr(md, name, None)
            if isinstance(value, type):
                return value
        if (module, name) in _ALLOWED:
            if name == "_StorageInfo":
                from torch.distributed.checkpoint.filesystem import _StorageInfo

                return _StorageInfo
            return _ALLOWED[(module, name)]
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from checkpoint metadata")


def read_metadata(folder: Path) -> Metadata:
    """DCP's metadata of `folder` (tensor names, global shapes, dtypes), read safely."""
    path = folder / METADATA_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: missing — not a DCP checkpoint")
    try:
        with open(path, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except (pickle.UnpicklingError, EOFError, AttributeError, ValueError, TypeError) as exc:
        raise CheckpointError(f"{path}: unreadable DCP metadata ({exc})") from exc
    if not isinstance(metadata, Metadata):
        raise CheckpointError(f"{path}: holds a {type(metadata).__name__}, not DCP metadata")
    return metadata


class SafeFileSystemReader(dcp.FileSystemReader):
    """FileSystemReader whose metadata read refuses arbitrary pickled objects."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if kwargs.get("rank") is not None:  # per-rank metadata (no-collectives saves): not used here
            raise CheckpointError("per-rank DCP metadata is not supported")
        metadata = read_metadata(Path(self.path))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(dcp.DefaultLoadPlanner):
    """DefaultLoadPlanner that reads non-tensor values with weights_only=True."""

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        try:
            obj = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as exc:
            # torch's message is a page long; its "Unsupported global: ..." line is the point.
            lines = [line for line in str(exc).splitlines() if "Unsupported global" in line]
            reason = lines[0].split("Unsupported global:")[1].split(" was not")[0].strip() if lines else str(exc)
            raise CheckpointError(
                f"checkpoint value {read_item.dest_index.fqn!r} is not plain data; "
                f"refusing to unpickle it (it asks for {reason})"
            ) from exc
        # Hand the parent a re-serialization of the vetted value: it keeps DCP's own logic
        # for putting values back into nested state dicts, and these bytes are ours.
        buffer = io.BytesIO()
        torch.save(obj, buffer)
        buffer.seek(0)
        super().load_bytes(read_item, buffer)
