"""Training engines: who owns parameters, gradients and optimizer state while the trainer's loop runs.

The trainer talks to one small interface (`Engine`, in base.py); each engine lives in one file here and
imports its library only inside that file, so `native` runs with nothing but torch installed.

  scaletrain train CONFIG                                               # native: FSDP2/DDP/TP/PP/CP
  torchrun --nproc-per-node 2 -m scaletrain.train CONFIG --engine.name deepspeed --engine.deepspeed.zero_stage 3
"""

from __future__ import annotations

import importlib

from scaletrain.engines.base import Engine, EngineSpec

# name -> module defining SPEC (an EngineSpec). Imported on first use only.
_MODULES = {
    "native": "scaletrain.engines.native",
    "deepspeed": "scaletrain.engines.deepspeed_engine",
    "fairscale": "scaletrain.engines.fairscale_engine",
    "megatron": "scaletrain.engines.megatron_engine",
}


def get_engine(name: str) -> EngineSpec:
    if name not in _MODULES:
        raise ValueError(f"engine.name: unknown engine {name!r}; known: {sorted(_MODULES)}")
    return importlib.import_module(_MODULES[name]).SPEC


__all__ = ["Engine", "EngineSpec", "get_engine"]
