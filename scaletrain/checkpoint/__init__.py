"""Checkpoints: sharded save/load across layouts, async save, auto-resume, safety checks, export.

  format.py    folder names, manifest (sizes + SHA-256), format versions, validation
  safe_io.py   reading DCP checkpoints without unpickling arbitrary objects
  store.py     Checkpointer: save (sync/async) -> publish atomically -> prune; find + load
  faults.py    preemption signals (SIGTERM/SIGUSR1) and the step watchdog
  export.py    consolidated safetensors, Hugging Face export/import through recipe hooks
  commands.py  `scaletrain ckpt info`, `scaletrain export`, `scaletrain import`

See docs/checkpoints.md for the user's view.
"""

from scaletrain.checkpoint.format import FORMAT_VERSION, CheckpointError, CheckpointMismatchError, complete_checkpoints
from scaletrain.checkpoint.store import Checkpointer, CheckpointState, ModuleState, load_checkpoint, seed_rng

__all__ = [
    "FORMAT_VERSION",
    "CheckpointError",
    "CheckpointMismatchError",
    "CheckpointState",
    "Checkpointer",
    "ModuleState",
    "complete_checkpoints",
    "load_checkpoint",
    "seed_rng",
]
