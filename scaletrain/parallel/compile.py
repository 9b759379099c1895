"""torch.compile per repeated block.

Compiling each block separately (rather than the whole model) keeps compile time flat in
depth — every block has the same graph, so it is compiled once and reused — and leaves
FSDP's per-block hooks outside the compiled regions. `Module.compile()` compiles in place,
so parameter names (and thus checkpoints) do not change.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn


def apply_compile(blocks: Iterable[nn.Module]) -> None:
    for block in blocks:
        block.compile(fullgraph=False)
