"""scaletrain.kernels: fused Triton kernels, each beside a plain-torch reference it is tested against.

A leaf package (imports only torch and, optionally, triton). Public functions dispatch to Triton when it
can run on the given tensors (CUDA, or CPU under ``TRITON_INTERPRET=1``) and otherwise to the references
in ``scaletrain.kernels.reference``; ``TRITON_AVAILABLE`` says whether Triton imported at all. Each kernel is also
registered as a ``torch.library`` op in the ``scaletrain_kernels`` namespace with autograd, so it works
under torch.compile, and (all but group_norm, whose recipes are data parallel only) with a DTensor sharding
rule (``scaletrain.kernels.sharding``), so it runs on DTensor inputs shard by shard (e.g. the sequence-parallel norms
under tensor parallel).

Kernels: attention (flash, GQA, causal, sliding window, lse), rms_norm, layer_norm (+ layer_norm_modulate,
DiT's adaLN), group_norm (+ a fused SiLU: ``group_norm(..., silu=True)``, the U-Net's / VAE's norm -> SiLU),
apply_rope, swiglu,
fused_linear_cross_entropy (and vocab_parallel_linear_cross_entropy, its tensor-parallel form). See each
module's docstring for layouts and algorithms; ``scaletrain.kernels.bench`` benchmarks them.

Note: the functions ``attention``, ``rms_norm``, ``layer_norm``, ``group_norm`` and ``swiglu`` shadow their
submodules as package attributes; reach the modules with ``from scaletrain.kernels.attention import attention_fwd``
or importlib.
"""

from . import sharding
from ._triton import INTERPRET, TRITON_AVAILABLE
from .attention import attention
from .fused_linear_ce import fused_linear_cross_entropy, vocab_parallel_linear_cross_entropy
from .group_norm import group_norm
from .layer_norm import layer_norm, layer_norm_modulate
from .rms_norm import rms_norm
from .rope import apply_rope, apply_rope_
from .swiglu import swiglu

# After the op modules: the rules name the registered ops.
sharding.register()

__all__ = [
    "INTERPRET",
    "TRITON_AVAILABLE",
    "apply_rope",
    "apply_rope_",
    "attention",
    "fused_linear_cross_entropy",
    "group_norm",
    "layer_norm",
    "layer_norm_modulate",
    "rms_norm",
    "swiglu",
    "vocab_parallel_linear_cross_entropy",
]
