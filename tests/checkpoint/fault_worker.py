"""torchrun entry point for the checkpoint tests: `scaletrain.train` plus injected faults.

It trains exactly like `torchrun -m scaletrain.train`, with two test-only additions driven
by environment variables (nothing here is imported by scaletrain itself):

  ST_FAULTS  JSON list of faults, each fired once (a marker file records that it fired, so
             a torchrun restart does not fire it again):
               {"rank": R, "step": S, "where": W, "action": A, "marker": PATH}
             where: "step"    before rank R starts optimizer step S
                    "save"    on rank R, after it wrote its shards of checkpoint S
                    "publish" on rank 0, after the manifest of checkpoint S, before the rename
                    "renamed" on rank 0, right after checkpoint S was renamed (published)
             action: "kill" (SIGKILL itself), "term_parent" (SIGTERM to torchrun),
                     "usr1" (SIGUSR1 to itself), "hang" (block forever in injected_hang)
  ST_RECORD  folder: each rank appends {"step", "ids"} — the sample ids that the loader
             handed it for that step — to rank-<R>.jsonl.
  ST_STARTS  file: each worker process appends {"rank", "restart"} (torchrun's
             TORCHELASTIC_RESTART_COUNT) when it starts, so a test can count the restarts.
  ST_RNG     folder: right after resuming, each rank writes its RNG states (the checkpoint's
             rng/ format) to rank-<R>.json.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from pathlib import Path

import torch.distributed.checkpoint as dcp

import scaletrain.checkpoint.store as store
from scaletrain.data import ShardedLoader
from scaletrain.distributed import run_as_worker
from scaletrain.train import Trainer, main

RANK = int(os.environ.get("RANK", "0"))
FAULTS = [f for f in json.loads(os.environ.get("ST_FAULTS", "[]")) if f["rank"] == RANK]
state = {"step": 0}  # the trainer's step (a fallback for "renamed")


def injected_hang() -> None:
    threading.Event().wait()


def fire(where: str, step: int) -> None:
    for fault in FAULTS:
        if fault["where"] != where or fault["step"] != step:
            continue
        marker = Path(fault["marker"])
        if marker.exists():
            continue
        marker.write_text(json.dumps(fault))
        print(f"fault_worker: rank {RANK}: {fault['action']} at {where} {step}", file=sys.stderr, flush=True)
        action = fault["action"]
        if action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif action == "term_parent":
            os.kill(os.getppid(), signal.SIGTERM)
        elif action == "usr1":
            os.kill(os.getpid(), signal.SIGUSR1)
        elif action == "hang":
            injected_hang()


def _patch() -> None:
    train_step = Trainer.train_step

    def faulty_train_step(self: Trainer) -> dict[str, float]:
        fire("step", self.step + 1)
        metrics = train_step(self)
        state["step"] = self.step
        return metrics

    Trainer.train_step = faulty_train_step

    write_data = dcp.FileSystemWriter.write_data

    def faulty_write_data(self, plan, planner):  # noqa: ANN001, ANN202 - DCP's signature
        future = write_data(self, plan, planner)
        future.wait()
        # The step from the folder being written (step-N.partial), not the trainer's: an async
        # write runs in a background thread while training has already moved on.
        fire("save", int(Path(self.path).name.split(".")[0].split("-")[1]))
        return future

    dcp.FileSystemWriter.write_data = faulty_write_data

    write_manifest = store.write_manifest

    def faulty_write_manifest(folder: Path, manifest: dict) -> None:
        write_manifest(folder, manifest)
        fire("publish", manifest["step"])

    store.write_manifest = faulty_write_manifest

    fsync_dir = store._fsync_dir

    def faulty_fsync_dir(path: Path) -> None:
        fsync_dir(path)
        # The step just renamed is the newest published one (an async save is published at the
        # next save, when the trainer's step is already further).
        published = store.checkpoint_dirs(path)
        fire("renamed", published[-1][0] if published else state["step"])

    store._fsync_dir = faulty_fsync_dir

    rng_dump = os.environ.get("ST_RNG")
    if rng_dump:
        maybe_resume = Trainer.maybe_resume

        def dumping_maybe_resume(self: Trainer) -> str | None:
            notes = maybe_resume(self)
            Path(rng_dump).mkdir(parents=True, exist_ok=True)
            (Path(rng_dump) / f"rank-{RANK}.json").write_text(json.dumps(store.rng_state()))
            return notes

        Trainer.maybe_resume = dumping_maybe_resume

    record = os.environ.get("ST_RECORD")
    if record:
        next_step = ShardedLoader.next_step
        out = Path(record) / f"rank-{RANK}.jsonl"
        out.parent.mkdir(parents=True, exist_ok=True)

        def recording_next_step(self: ShardedLoader) -> list:
            step = self.consumed_samples // self.global_batch_size + 1
            batches = next_step(self)
            ids = [int(i) for b in batches for i in b["sample_ids"]]
            with open(out, "a") as f:
                f.write(json.dumps({"step": step, "ids": ids}) + "\n")
            return batches

        ShardedLoader.next_step = recording_next_step


def _record_start() -> None:
    starts = os.environ.get("ST_STARTS")
    if starts:
        with open(starts, "a") as f:
            f.write(
                json.dumps({"rank": RANK, "restart": int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))}) + "\n"
            )


if __name__ == "__main__":
    _record_start()
    _patch()
    # Leave as `torchrun -m scaletrain.train` does, without interpreter finalization (a gloo
    # teardown abort there would count as one more failure, i.e. one more restart).
    run_as_worker(lambda: main(sys.argv[1:]))
