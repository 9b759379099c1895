"""Save, publish, find and load sharded checkpoints (torch.distributed.checkpoint).

Save (collective; every rank calls it at the same step):
  1. rank 0 creates `step-N.partial/` (a read-only root fails here, on every rank, naming it);
  2. each rank writes its RNG state to `rng/rank-XXXXX.json`, rank 0 writes trainer.json;
  3. DCP writes each rank's shards — synchronously, or (checkpoint.async_mode=async) from a
     CPU copy made on the training thread, by a long-lived writer thread over a separate gloo
     group so its collectives never interleave with training's (see `AsyncWriter`);
  4. publish, once every rank's write has finished (at once for sync; at the next save or at
     `finish()` for async): ranks hash the files between them, rank 0 writes the manifest
     and renames the folder to `step-N/`, then prunes to the newest `checkpoint.keep`.
A crash anywhere before the rename leaves a `.partial` folder that is never loaded.

Load: the newest published folder is verified first (manifest, format version, sizes and
SHA-256s, split across ranks); with checkpoint.fallback a damaged one is skipped for the
previous one. Tensor names and global shapes are compared with the checkpoint's metadata
before any tensor is read, so a different model shape fails with the mismatched keys.
Model and optimizer go through DCP's state-dict API, which stores full (unsharded) names
and shapes: any layout loads what any other saved.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import random
import shutil
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from scaletrain.checkpoint.format import (
    FORMAT_VERSION,
    PARTIAL_SUFFIX,
    TRAINER_STATE,
    CheckpointError,
    CheckpointMismatchError,
    check_file,
    checkpoint_dirs,
    file_entry,
    list_files,
    partial_dirs,
    read_manifest,
    step_dir,
    write_manifest,
)
from scaletrain.checkpoint.safe_io import SafeFileSystemReader, SafeLoadPlanner, read_metadata

RNG_DIR = "rng"
# Optimizer state keyed by parameter name, hyperparameters included ("param_groups.<name>.lr"):
# every rank saves and finds exactly its own parameters' entries, which pipeline stages need
# (a nested state dict keeps one rank's param groups) and resharding relies on.
OPTIMIZER_STATE_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)


def flat_optimizer_entries(name: str, state: dict[str, Any], settings: dict[str, Any]) -> dict[str, Any]:
    """One parameter's optimizer state and group hyperparameters in that flattened layout, for engines that
    keep the state outside a torch optimizer DCP can read (DeepSpeed's and fairscale's partitions)."""
    return {
        **{f"state.{name}.{key}": value for key, value in state.items()},
        **{f"param_groups.{name}.{key}": value for key, value in settings.items()},
    }


def flat_param_state(flat: dict[str, Any], name: str, keys: tuple[str, ...]) -> dict[str, Any]:
    """The inverse for one parameter: its `keys` (e.g. exp_avg) from a flattened optimizer state dict."""
    return {key: flat[f"state.{name}.{key}"] for key in keys}


@contextlib.contextmanager
def one_thread_for_new_threads() -> Iterator[None]:
    """Run checkpoint work with torch's intra-op threads at 1, so threads that first use torch inside it
    (gloo's workers running the checkpoint's object collectives, the async writer) start with one thread.

    A thread's intra-op count is fixed by its first torch op, and with GNU OpenMP every thread that runs a
    large torch op keeps an OpenMP team of its own; once libgomp manages more threads than there are cores,
    it stops spinning between parallel regions. Object collectives copy large buffers on gloo's worker
    threads, and after the first save every training step ran 20-35% slower (tiny GPT on 2 cores: voluntary
    context switches per step went from ~10 to ~1,200). The checkpoint work itself is I/O and copies, which
    one thread does at the same speed. Every collective `Checkpointer` method runs under it; it is only for
    work that has finished when the block ends, as a thread whose first torch op came later would take the
    restored count.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


# -- small collective helpers ------------------------------------------------------------------
def _world() -> tuple[int, int]:
    return dist.get_rank(), dist.get_world_size()


def _raise_if_any(error: str | None) -> None:
    """Collective: every rank raises the first rank's error, so no rank is left in a barrier."""
    errors: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    first = next((e for e in errors if e), None)
    if first:
        raise CheckpointError(first)


def _rank0_value(value: Any) -> Any:
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# -- RNG states (JSON, one file per rank) ----------------------------------------------------
def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode()


def _unb64(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)


def rng_state() -> dict[str, Any]:
    """This process's torch, CUDA, Python and NumPy RNG states as plain JSON values."""
    version, internal, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state(legacy=True)
    return {
        "torch": _b64(torch.get_rng_state()),
        "cuda": _b64(torch.cuda.get_rng_state()) if torch.cuda.is_available() else None,
        "python": [version, list(internal), gauss],
        "numpy": [np_name, np_keys.tolist(), int(np_pos), int(np_has_gauss), float(np_gauss)],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(_unb64(state["torch"]))
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state(_unb64(state["cuda"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, gauss_np = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss_np))


def resume_seed(seed: int, step: int) -> int:
    """The seed of every rank's generators when a resume cannot restore the saved states.

    The same on every rank, as a fresh run's `torch.manual_seed(job.seed)` is: code may rely
    on ranks drawing the same numbers (tensor-parallel ranks must drop the same elements of a
    replicated activation), and there is no rank-to-rank mapping of old streams onto a new
    world size anyway. Hashed with the step so the resumed run does not replay step 0's draws.
    """
    digest = hashlib.sha256(f"scaletrain-rng/{seed}/{step}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1  # 63 bits: within torch.manual_seed's range


def seed_rng(seed: int) -> None:
    """Seed torch (CPU and every CUDA device), Python's and NumPy's global generators."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


def restore_rng(folder: Path, saved_world_size: int | None, seed: int, step: int) -> str | None:
    """This rank's generators from `folder` when the world size is unchanged (a bitwise resume);
    otherwise re-seeded from `resume_seed(seed, step)`. Returns a one-line notice in that case."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    rng_file = folder / RNG_DIR / f"rank-{rank:05d}.json"
    if saved_world_size == world and rng_file.is_file():
        set_rng_state(json.loads(rng_file.read_text()))
        return None
    seed_rng(resume_seed(seed, step))
    why = f"saved on {saved_world_size} ranks, now {world}" if saved_world_size != world else f"no {rng_file.name}"
    return (
        f"RNG states not restored ({why}): every rank's torch/CUDA/Python/NumPy generators re-seeded "
        f"from (job.seed {seed}, step {step})"
    )


# -- state dicts --------------------------------------------------------------------------------
class CheckpointState(Protocol):
    """The model (and optimizer) state a checkpoint stores, under full parameter names and global shapes
    whatever the layout or engine, so that any layout and engine loads what any other saved.

    state_dict() -> {"model": {...}} plus {"optimizer": {...}} when the optimizer is included; the load
    path hands the same structure back to load_state_dict() after DCP filled its tensors in place."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class ModuleState:
    """torch modules and optimizers in any native layout (FSDP2, DDP, TP, pipeline stages), through DCP's
    state-dict API; `optimizer=None` for weights only."""

    model: nn.Module
    optimizer: torch.optim.Optimizer | None = None

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"model": get_model_state_dict(self.model)}
        if self.optimizer is not None:
            state["optimizer"] = get_optimizer_state_dict(self.model, self.optimizer, options=OPTIMIZER_STATE_OPTIONS)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        set_model_state_dict(self.model, state["model"])
        if self.optimizer is not None:
            set_optimizer_state_dict(self.model, self.optimizer, state["optimizer"], options=OPTIMIZER_STATE_OPTIONS)


def _state(train_state: CheckpointState, extra_tensors: dict[str, dict[str, Any]] | None) -> dict:
    return {**train_state.state_dict(), **(extra_tensors or {})}


def _tensor_leaves(tree: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """Flattened `a.b.c` names of the tensors in a nested dict, as DCP names them."""
    if isinstance(tree, torch.Tensor):
        return {prefix: tree}
    if isinstance(tree, dict):
        out: dict[str, torch.Tensor] = {}
        for key, value in tree.items():
            out.update(_tensor_leaves(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {}


def _shape(t: torch.Tensor) -> list[int]:
    return list(t.shape)  # a DTensor's .shape is the global one, as the metadata stores


def check_shapes(folder: Path, state: dict[str, Any]) -> None:
    """Raise naming every key whose global shape differs (or that is missing) in the checkpoint."""
    stored = read_metadata(folder).state_dict_metadata
    wanted = _tensor_leaves(state)
    mismatched, missing = [], []
    for key, tensor in wanted.items():
        meta = stored.get(key)
        if meta is None or not hasattr(meta, "size"):
            missing.append(key)
        elif list(meta.size) != _shape(tensor):
            mismatched.append(f"{key}: checkpoint {list(meta.size)} vs model {_shape(tensor)}")
    sections = {k.split(".", 1)[0] for k in wanted}
    # Under pipeline parallel each rank holds only its stages: a key is unexpected only when
    # no rank wants it.
    wanted_anywhere = set(wanted)
    if dist.is_initialized() and dist.get_world_size() > 1:
        everyone: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, sorted(wanted))
        wanted_anywhere = {k for keys in everyone for k in keys}
    unexpected = [k for k in stored if k.split(".", 1)[0] in sections - {"optimizer"} and k not in wanted_anywhere]
    if "optimizer" in sections and not any(k.startswith("optimizer.") for k in stored):
        raise CheckpointError(
            f"{folder}: holds no optimizer state (e.g. imported weights); load it with "
            "checkpoint.load_path instead of resuming from it"
        )
    if mismatched or missing or unexpected:
        parts = []
        if mismatched:
            parts.append("shape mismatch: " + "; ".join(mismatched[:12]) + (" ..." if len(mismatched) > 12 else ""))
        if missing:
            parts.append(f"missing in the checkpoint: {missing[:12]}" + (" ..." if len(missing) > 12 else ""))
        if unexpected:
            parts.append(f"not in the model: {unexpected[:12]}" + (" ..." if len(unexpected) > 12 else ""))
        raise CheckpointMismatchError(
            f"{folder / '.metadata'}: the checkpoint does not fit this model ({len(mismatched)} mismatched, "
            f"{len(missing)} missing, {len(unexpected)} unexpected) — " + " | ".join(parts)
        )


# -- saving -------------------------------------------------------------------------------------
class AsyncWriter:
    """The thread that writes async checkpoints, and the gloo group its collectives use.

    Built so a save in flight cannot touch training: the state is copied on the training thread before the
    write starts (the writer never reads a tensor the optimizer is updating), and the writer thread and the
    group's worker threads run torch ops with one intra-op thread. The threads are made once and reused;
    their thread count is fixed by their first torch op, which `__init__` runs while the training thread
    waits with torch's count at 1 (`one_thread_for_new_threads`). With `dcp.async_save`'s fresh thread per
    save, those threads kept OpenMP teams as large as the training thread's: 6 -> 11 OS threads after the
    first async save of the tiny GPT, voluntary context switches per step 30 -> 980 on 2 cores, as the
    oversubscribed OpenMP runtime stopped spinning between the training thread's parallel regions. Now the
    save adds 4 threads with no team, and the training thread makes no voluntary switch.
    """

    # More concurrent collectives than gloo has worker threads (2 by default), so each worker takes one.
    _PRIMING_COLLECTIVES = 8

    def __init__(self) -> None:
        self.group = dist.new_group(backend="gloo")  # collective: every rank builds its writer at once
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="scaletrain-checkpoint")
        with one_thread_for_new_threads():
            self._thread.submit(self._prime).result()

    def _prime(self) -> None:
        torch.zeros(64).add_(1)  # this thread's first torch op fixes its intra-op count at 1
        inputs = [torch.ones(64) for _ in range(self._PRIMING_COLLECTIVES)]
        outputs = [[torch.empty(64) for _ in range(dist.get_world_size())] for _ in inputs]
        # all_gather copies into its outputs on the worker that runs it: that is the workers' first torch op
        works = [dist.all_gather(o, i, group=self.group, async_op=True) for o, i in zip(outputs, inputs, strict=True)]
        for work in works:
            work.wait()

    def save(self, state: dict[str, Any], writer: dcp.FileSystemWriter) -> Future:
        """Copy `state` to CPU memory now, write the copy in the background; the future ends with the write."""
        staged = writer.stage(state)  # DCP's own copy (FileSystemWriter is a blocking stager)
        return self._thread.submit(dcp.save, staged, storage_writer=writer, process_group=self.group)

    def close(self) -> None:
        self._thread.shutdown(wait=True)
        dist.destroy_process_group(self.group)


@dataclass
class _Pending:
    """A save whose shards may still be in flight; published by `Checkpointer.finish`."""

    step: int
    partial: Path
    final: Path
    upload: Future | None
    manifest_extra: dict[str, Any]


class Checkpointer:
    """One run's checkpoints: save (sync or async), publish, prune, find and load.

    Every method except the constructor is collective: all ranks call it in the same order.
    """

    def __init__(
        self,
        root: Path,
        *,
        keep: int,
        async_mode: str = "none",
        fallback: bool = False,
        verify: str = "checksum",
    ) -> None:
        if async_mode not in ("none", "async"):
            raise ValueError(f"checkpoint.async_mode: {async_mode!r} is not one of 'none', 'async'")
        self.root = Path(root)
        self.keep = keep
        self.async_mode = async_mode
        self.fallback = fallback
        self.verify_checksums = verify == "checksum"
        self._pending: _Pending | None = None
        self._async_writer: AsyncWriter | None = None

    # ---- save
    @one_thread_for_new_threads()
    def check_writable(self) -> None:
        """Fail at startup, not after hours of training, if the root cannot be written."""
        error = None
        if dist.get_rank() == 0:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
                probe = self.root / f".write-test-{os.getpid()}"
                probe.write_text("")
                probe.unlink()
            except OSError as exc:
                error = f"{self.root}: checkpoint folder is not writable ({exc.strerror or exc}); fix its permissions"
                error += " or point job.run_dir somewhere writable"
        _raise_if_any(error)

    @one_thread_for_new_threads()
    def save(
        self,
        step: int,
        train_state: CheckpointState,
        trainer_state: dict[str, Any],
        *,
        layout: str,
        extra_tensors: dict[str, dict[str, Any]] | None = None,
    ) -> Path:
        """Write checkpoint `step`; returns its final folder (published now, or by `finish` when async)."""
        self.finish()  # the previous async save must be published before a new one starts
        rank, world = _world()
        final = step_dir(self.root, step)
        partial = final.with_name(final.name + PARTIAL_SUFFIX)
        error = None
        if rank == 0:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
                shutil.rmtree(partial, ignore_errors=True)
                (partial / RNG_DIR).mkdir(parents=True)
            except OSError as exc:
                error = f"{partial}: cannot create the checkpoint folder ({exc.strerror or exc})"
        _raise_if_any(error)
        (partial / RNG_DIR / f"rank-{rank:05d}.json").write_text(json.dumps(rng_state()))
        if rank == 0:
            (partial / TRAINER_STATE).write_text(json.dumps(trainer_state))
        state = _state(train_state, extra_tensors)
        writer = dcp.FileSystemWriter(str(partial))
        extra = {"layout": layout, "world_size": world, "step": step}
        if self.async_mode == "async":
            if self._async_writer is None:  # collective, once: every rank reaches its first save at one step
                self._async_writer = AsyncWriter()
            self._pending = _Pending(step, partial, final, self._async_writer.save(state, writer), extra)
        else:
            dcp.save(state, storage_writer=writer)
            self._pending = _Pending(step, partial, final, None, extra)
            self.finish()
        return final

    @one_thread_for_new_threads()
    def finish(self) -> Path | None:
        """Wait for an in-flight save and publish it. Returns the published folder, if any."""
        pending, self._pending = self._pending, None
        if pending is None:
            return None
        error = None
        if pending.upload is not None:
            try:
                pending.upload.result()
            except Exception as exc:  # noqa: BLE001 - reported on every rank below
                error = f"{pending.partial}: async checkpoint write failed on rank {dist.get_rank()}: {exc!r}"
        _raise_if_any(error)
        self._publish(pending)
        return pending.final

    @one_thread_for_new_threads()
    def close(self) -> None:
        """Publish a save in flight and stop the async writer (collective)."""
        self.finish()
        if self._async_writer is not None:
            self._async_writer.close()
            self._async_writer = None

    def _publish(self, pending: _Pending) -> None:
        rank, world = _world()
        names = _rank0_value(list_files(pending.partial) if rank == 0 else None)
        # Hashing is the slow part for big checkpoints: each rank hashes every world-th file.
        mine = {name: file_entry(pending.partial, name) for name in names[rank::world]}
        gathered: list[dict[str, Any] | None] = [None] * world
        dist.all_gather_object(gathered, mine)
        if rank == 0:
            files = {name: entry for part in gathered for name, entry in (part or {}).items()}
            trainer_state = json.loads((pending.partial / TRAINER_STATE).read_text())
            manifest = {
                "format_version": FORMAT_VERSION,
                **pending.manifest_extra,
                "num_params": trainer_state.get("num_params"),
                "created_unix": time.time(),
                "files": dict(sorted(files.items())),
            }
            write_manifest(pending.partial, manifest)
            if pending.final.exists():  # re-saving a step (e.g. after a fallback): swap it out
                stale = pending.final.with_name(pending.final.name + ".replaced")
                shutil.rmtree(stale, ignore_errors=True)
                os.replace(pending.final, stale)
                os.replace(pending.partial, pending.final)
                shutil.rmtree(stale, ignore_errors=True)
            else:
                os.replace(pending.partial, pending.final)
            _fsync_dir(self.root)
            self._prune()
        dist.barrier()

    def _prune(self) -> None:
        for _, old in checkpoint_dirs(self.root)[: -self.keep] if self.keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
        pending = self._pending.partial if self._pending else None
        for stale in partial_dirs(self.root):
            if stale != pending:
                shutil.rmtree(stale, ignore_errors=True)

    # ---- find and load
    @one_thread_for_new_threads()
    def verify(self, folder: Path) -> str | None:
        """Collective: None if `folder` is a complete, intact checkpoint, else the problem."""
        rank, world = _world()
        try:
            files = read_manifest(folder)["files"]
        except CheckpointError as exc:
            return str(exc)
        problems = [check_file(folder, name, files[name], self.verify_checksums) for name in sorted(files)[rank::world]]
        gathered: list[str | None] = [None] * world
        dist.all_gather_object(gathered, next((p for p in problems if p), None))
        return next((p for p in gathered if p), None)

    @one_thread_for_new_threads()
    def find_resumable(self) -> tuple[Path | None, list[str]]:
        """Collective: the newest intact checkpoint under the root, and notes on any skipped."""
        notes: list[str] = []
        for _, folder in reversed(_rank0_value(checkpoint_dirs(self.root) if dist.get_rank() == 0 else None)):
            problem = self.verify(folder)
            if problem is None:
                return folder, notes
            if not self.fallback:
                raise CheckpointError(
                    f"newest checkpoint is damaged: {problem}. Set checkpoint.fallback=true to resume from the "
                    "previous complete checkpoint instead, or delete the damaged folder."
                )
            notes.append(f"checkpoint.fallback: skipping damaged checkpoint {folder}: {problem}")
        return None, notes

    @one_thread_for_new_threads()
    def load(
        self,
        folder: Path,
        train_state: CheckpointState,
        extra_tensors: dict[str, dict[str, Any]] | None = None,
        *,
        verified: bool = False,
        rng_seed: int | None = None,
    ) -> tuple[dict[str, Any], list[str]]:
        """Load `folder` into train_state (+ extra tensors in place); returns (trainer state, notes).

        `rng_seed` (resuming): also restore the RNG states, see `load_checkpoint`."""
        if not verified:
            problem = self.verify(folder)
            if problem:
                raise CheckpointError(problem)
        notes: list[str] = []
        trainer_state = load_checkpoint(folder, train_state, extra_tensors, notes=notes, rng_seed=rng_seed)
        return trainer_state, notes


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_checkpoint(
    folder: Path,
    train_state: CheckpointState,
    extra_tensors: dict[str, dict[str, Any]] | None = None,
    *,
    notes: list[str] | None = None,
    rng_seed: int | None = None,
) -> dict[str, Any]:
    """Load train_state (model, and optimizer if it has one; `extra_tensors` in place) from a published checkpoint.

    Checks the manifest, format version and file sizes (the Checkpointer also checks
    SHA-256s), then names and shapes against the metadata, then reads. Returns the trainer
    state from trainer.json; appends to `notes` what is worth printing.

    RNG states are touched only when resuming (`rng_seed` = the run's job.seed): restored per
    rank if the world size is unchanged, else re-seeded from (rng_seed, step) with a note.
    Loading weights only (checkpoint.load_path, sampling, export) leaves them alone.
    """
    folder = Path(folder)
    manifest = read_manifest(folder)
    for name, entry in manifest["files"].items():
        problem = check_file(folder, name, entry, checksum=False)
        if problem:
            raise CheckpointError(problem)
    state = _state(train_state, extra_tensors)
    check_shapes(folder, state)
    try:
        with one_thread_for_new_threads():
            dcp.load(state, storage_reader=SafeFileSystemReader(str(folder)), planner=SafeLoadPlanner())
    except CheckpointException as exc:
        # DCP wraps each rank's (exception, traceback); the first rank's exception is the cause.
        causes = [str(pair[0]) for pair in exc.failures.values()] or [str(exc)]
        raise CheckpointError(f"{folder}: reading the checkpoint failed: {causes[0]}") from exc
    train_state.load_state_dict({k: v for k, v in state.items() if k in ("model", "optimizer")})
    notes = notes if notes is not None else []
    try:
        trainer_state = json.loads((folder / TRAINER_STATE).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{folder / TRAINER_STATE}: unreadable ({exc})") from exc
    if rng_seed is not None:
        notice = restore_rng(folder, manifest.get("world_size"), rng_seed, int(trainer_state.get("step", 0)))
        if notice:
            notes.append(notice)
    return trainer_state
