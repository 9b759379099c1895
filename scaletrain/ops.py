"""Switchable compute ops every recipe uses: attention, RMSNorm, LayerNorm (+ adaLN modulate), GroupNorm (+ SiLU),
RoPE, SwiGLU and linear + cross-entropy.

Each op has a plain PyTorch path (the default) and a fused path from the ``scaletrain.kernels`` package (Triton
kernels with autograd, registered as torch custom ops). Recipes call these instead of writing the math
themselves, so one config switch (``model.attention``, ``model.fused_norm``, ``model.fused_rope``,
``model.fused_swiglu``, ``train.fused_cross_entropy``) changes every model family the same way.

Import direction: the core may import ``scaletrain.kernels`` (a leaf package), never the reverse. It is imported
lazily, on the first fused call, so ``import scaletrain`` works where Triton is missing or broken. Where
Triton cannot run on the given tensors (CPU without ``TRITON_INTERPRET=1``, or no Triton at all) the
``scaletrain.kernels`` functions fall back to their plain-torch references, so a fused flag never makes a run fail;
``fused_backend()`` says which one will run.

Layouts (shape legend: B batch, T query length, S key length, H query heads, K kv heads, E head dim,
N rows, D width, C channels, V vocabulary):
  attention            q [B, H, T, E], k/v [B, K, S, E] with K dividing H (grouped-query)  -> [B, H, T, E]
  rms_norm             x [..., D], weight [D]                                           -> like x
  layer_norm           x [..., D], weight / bias [D] or None                            -> like x
  layer_norm_modulate  x [B, ..., D], shift / scale [B, D] (DiT's adaLN)                -> like x:
                       layer_norm(x) * (1 + scale) + shift, shift / scale broadcast over the middle dims
  group_norm           x [B, C, *spatial], weight / bias [C] or None, groups divide C   -> like x
                       silu=True: silu(group_norm(x)) (the diffusion U-Net's / VAE's norm -> SiLU)
  rope                 q [B, T, H, E], k [B, T, K, E], cos/sin [T, E] in the rotate-half layout with both
                       halves equal (cat(freqs, freqs), as Hugging Face Llama stores them) -> (q, k)
  swiglu               gate, up [..., F]                                                -> silu(gate) * up
  linear_cross_entropy hidden [N, D], weight [V, D], targets [N]                        -> fp32 scalar mean
                       (fused under tensor parallel: weight a DTensor sharded over V, hidden [..., D])
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, get_args

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from types import ModuleType

AttentionImpl = Literal["auto", "sdpa", "eager", "flex", "triton"]
ATTENTION_IMPLS: tuple[str, ...] = get_args(AttentionImpl)


@functools.cache
def _kernels() -> ModuleType:
    try:
        from scaletrain import kernels
    except Exception as error:  # noqa: BLE001 - report any import failure with the fix
        raise RuntimeError(
            f"the fused kernels could not be imported ({error!r}); turn off model.attention=triton, "
            "model.fused_norm, model.fused_rope, model.fused_swiglu and train.fused_cross_entropy"
        ) from error
    return kernels


def fused_backend(*tensors: torch.Tensor) -> str:
    """Which fused path runs on these tensors: "triton", "triton-interpret" or "torch-fallback"."""
    k = _kernels()
    from scaletrain.kernels._triton import use_triton

    if not use_triton(*tensors):
        return "torch-fallback"
    return "triton-interpret" if k.INTERPRET else "triton"


# -- attention ------------------------------------------------------------------------------------------


# Masks are bottom-right aligned (query i sits at key position i + S - T), as in SDPA with T == S, flash
# attention and the Triton kernel. A sliding window of W keeps, for each query, the W keys ending at its
# own position (key_pos > query_pos - W; Mistral's sliding_window). window = 0 means no window.


@functools.lru_cache(maxsize=32)
def _dense_mask(t: int, s: int, causal: bool, window: int, device: torch.device) -> torch.Tensor:
    """[T, S] bool, True where the query attends to the key (cached per shape)."""
    q_pos = torch.arange(t, device=device)[:, None] + (s - t)
    k_pos = torch.arange(s, device=device)[None, :]
    allowed = k_pos <= q_pos if causal else torch.ones(t, s, dtype=torch.bool, device=device)
    return allowed & (k_pos > q_pos - window) if window else allowed


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, window: int = 0) -> torch.Tensor:
    group = q.shape[1] // k.shape[1]
    if window:  # an explicit mask: SDPA then uses its memory-efficient (or math) kernel, not flash
        mask = _dense_mask(q.shape[2], k.shape[2], causal, window, q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=group > 1)
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=group > 1)


def _eager(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, window: int = 0) -> torch.Tensor:
    """Attention in plain ops: the readable reference the other implementations are checked against."""
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    if causal or window:
        mask = _dense_mask(q.shape[2], k.shape[2], causal, window, q.device)
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(dim=-1) @ v


def flex_available() -> bool:
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


@functools.lru_cache(maxsize=32)
def _flex_block_mask(t: int, s: int, causal: bool, window: int, device: torch.device):  # noqa: ANN202 - BlockMask
    from torch.nn.attention.flex_attention import create_block_mask

    offset = s - t

    def mask_mod(b, h, q_idx, kv_idx):  # noqa: ANN001, ANN202 - flex mask_mod signature
        q_pos = q_idx + offset
        allowed = kv_idx <= q_pos if causal else kv_idx >= 0
        return allowed & (kv_idx > q_pos - window) if window else allowed

    return create_block_mask(mask_mod, B=None, H=None, Q_LEN=t, KV_LEN=s, device=device)


def _flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, window: int = 0) -> torch.Tensor:
    if not flex_available():
        raise RuntimeError(
            f"model.attention: 'flex' needs torch.nn.attention.flex_attention, which torch {torch.__version__} "
            "does not have; use 'sdpa'"
        )
    from torch.nn.attention.flex_attention import flex_attention

    if q.device.type == "cpu" and torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        raise RuntimeError(
            "model.attention: 'flex' cannot train on the CPU (FlexAttention has no CPU backward); use 'sdpa' "
            "or 'triton' there, or run forward-only under torch.no_grad()"
        )
    if q.device.type == "cpu":  # flex rejects CPU inputs that require grad even under no_grad
        q, k, v = q.detach(), k.detach(), v.detach()
    masked = causal or window
    block_mask = _flex_block_mask(q.shape[2], k.shape[2], causal, window, q.device) if masked else None
    return flex_attention(q, k, v, block_mask=block_mask, enable_gqa=q.shape[1] != k.shape[1])


def _triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, window: int = 0) -> torch.Tensor:
    return _kernels().attention(q, k, v, causal=causal, window=window or None)


_ATTENTION = {"sdpa": _sdpa, "eager": _eager, "flex": _flex, "triton": _triton}

# -- model.attention = auto -------------------------------------------------------------------------------
# `auto` picks between the two implementations that can be fastest for a plain causal mask: torch SDPA
# (which itself picks flash / memory-efficient / cuDNN kernels) and the Triton flash-attention kernel.
# eager materializes the scores and flex needs torch.compile to be fast, so neither is a candidate. The
# choice is a fixed rule of the device, dtype, head dim and sequence length, not a timing taken at start-up:
# every rank must make the same choice (no collective exists yet at validation time) and a rerun must
# train the same way.
#
# Cards on which scripts/gpu_bench.sh measured the Triton kernel faster than every SDPA backend
# (fwd+bwd, causal, 16-bit), keyed by CUDA compute capability, with the shortest sequence length from which
# it wins at every measured length. Empty until a GPU run shows a win: until then SDPA's hand-written
# CUDA kernels (flash-attention 2, cuDNN) are the better bet on every card, and `auto` picks sdpa.
# The bench prints the entry to add here for the card it ran on.
TRITON_ATTENTION_FASTER: dict[tuple[int, int], int] = {}


@dataclass(frozen=True)
class AttentionChoice:
    """What model.attention resolved to, and why (printed at start-up)."""

    impl: str
    reason: str

    def describe(self, requested: str) -> str:
        return f"{requested} -> {self.impl} ({self.reason})" if requested == "auto" else f"{self.impl} (set)"


def _triton_importable() -> bool:
    try:
        return bool(_kernels().TRITON_AVAILABLE)
    except RuntimeError:
        return False


def resolve_attention(
    requested: str,
    *,
    device_type: str,
    dtype: torch.dtype,
    head_dim: int,
    seq_len: int | None = None,
    capability: Callable[[], tuple[int, int]] | None = None,
    triton_available: Callable[[], bool] | None = None,
    table: dict[tuple[int, int], int] | None = None,
) -> AttentionChoice:
    """Resolve model.attention; anything but "auto" is returned as set.

    `capability` (default torch.cuda.get_device_capability), `triton_available` and `table` (default
    TRITON_ATTENTION_FASTER) are parameters so the rule can be tested without a GPU. `seq_len` None means
    "any length": the table's length threshold is then not checked.
    """
    if requested not in ATTENTION_IMPLS:
        raise ValueError(f"model.attention: unknown implementation {requested!r}; choose from {ATTENTION_IMPLS}")
    if requested != "auto":
        return AttentionChoice(requested, "set by model.attention")
    if device_type != "cuda":
        return AttentionChoice("sdpa", f"{device_type}: Triton kernels only run interpreted off CUDA")
    if not (triton_available or _triton_importable)():
        return AttentionChoice("sdpa", "triton is not installed")
    if not triton_attention_supports(head_dim):
        return AttentionChoice("sdpa", f"head dim {head_dim} is not one the Triton kernel supports")
    if dtype not in (torch.bfloat16, torch.float16):
        return AttentionChoice("sdpa", f"{str(dtype).removeprefix('torch.')}: the Triton kernel is tuned for bf16/fp16")
    major, minor = (capability or torch.cuda.get_device_capability)()
    min_len = (TRITON_ATTENTION_FASTER if table is None else table).get((major, minor))
    if min_len is None:
        return AttentionChoice("sdpa", f"sm_{major}{minor}: no measurement shows the Triton kernel faster than SDPA")
    if seq_len is not None and seq_len < min_len:
        return AttentionChoice("sdpa", f"sm_{major}{minor}: the Triton kernel is faster only from seq {min_len}")
    return AttentionChoice("triton", f"sm_{major}{minor}: the Triton kernel measured faster than SDPA")


@functools.lru_cache(maxsize=64)
def _auto_impl(device_type: str, dtype: torch.dtype, head_dim: int, seq_len: int) -> str:
    return resolve_attention("auto", device_type=device_type, dtype=dtype, head_dim=head_dim, seq_len=seq_len).impl


def _auto(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, window: int = 0) -> torch.Tensor:
    # Models built outside the trainer keep "auto" and resolve per input kind (cached); the GPT recipe
    # resolves once at build time instead and installs the concrete implementation.
    impl = _auto_impl(q.device.type, q.dtype, q.shape[-1], q.shape[2])
    return _ATTENTION[impl](q, k, v, causal, window)


_ATTENTION["auto"] = _auto


def attention(
    q_BHTE: torch.Tensor,
    k_BKSE: torch.Tensor,
    v_BKSE: torch.Tensor,
    *,
    causal: bool = True,
    impl: str = "sdpa",
    window: int = 0,
) -> torch.Tensor:
    """Scaled dot-product attention (scale 1/sqrt(E)) with grouped-query heads, by implementation:

    auto    sdpa or triton, whichever is faster for these inputs (see resolve_attention)
    sdpa    torch's scaled_dot_product_attention (picks flash / efficient / cuDNN / math by itself;
            with a window it gets an explicit [T, S] mask, so not flash)
    eager   plain matmul + softmax (materializes [T, S]; the reference)
    flex    torch.nn.attention.flex_attention with a BlockMask (cached per shape); compile the
            caller for speed — uncompiled it runs flex's slow reference path
    triton  kernels.attention: the flash-attention Triton kernel (head dim a power of two in [16, 128]);
            with a window it skips the key blocks outside it

    ``window`` > 0: each query sees only the ``window`` keys ending at its own position (sliding window).
    """
    try:
        fn = _ATTENTION[impl]
    except KeyError:
        raise ValueError(f"model.attention: unknown implementation {impl!r}; choose from {ATTENTION_IMPLS}") from None
    if window < 0:
        raise ValueError(f"attention window must be >= 0 (0 = none), got {window}")
    return fn(q_BHTE, k_BKSE, v_BKSE, causal, window)


def attention_fn(impl: str, causal: bool = True, window: int = 0):  # noqa: ANN201 - callable (q, k, v) -> out
    """A (q, k, v) -> out callable for modules that hold their attention as a swappable function."""
    if impl not in _ATTENTION:
        raise ValueError(f"model.attention: unknown implementation {impl!r}; choose from {ATTENTION_IMPLS}")
    return functools.partial(attention, causal=causal, impl=impl, window=window)


def triton_attention_supports(head_dim: int) -> bool:
    """Head dims the Triton attention kernel compiles for."""
    return 16 <= head_dim <= 128 and head_dim & (head_dim - 1) == 0


# -- elementwise / norm -----------------------------------------------------------------------------------


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float, fused: bool = False) -> torch.Tensor:
    """RMSNorm over the last dim. Unfused is ``F.rms_norm`` (what nn.RMSNorm runs); fused needs a weight."""
    if fused:
        if weight is None:
            raise ValueError("the fused rms_norm needs a weight (elementwise affine)")
        return _kernels().rms_norm(x, weight, eps)
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


def layer_norm(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float, fused: bool = False
) -> torch.Tensor:
    """LayerNorm over the last dim, weight / bias optional. Unfused is ``F.layer_norm`` (what nn.LayerNorm runs)."""
    if fused:
        return _kernels().layer_norm(x, weight, bias, eps)
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def layer_norm_modulate(
    x: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    eps: float,
    fused: bool = False,
    *,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """adaLN (DiT): ``layer_norm(x) * (1 + scale) + shift``, shift / scale [B, D] broadcast over the middle dims
    of x [B, ..., D]. Fused: one kernel (``kernels.layer_norm_modulate``); unfused: F.layer_norm, then the formula."""
    if fused:
        return _kernels().layer_norm_modulate(x, shift, scale, eps, weight, bias)
    view = (x.shape[0],) + (1,) * (x.dim() - 2) + (x.shape[-1],)
    y = F.layer_norm(x, (x.shape[-1],), weight, bias, eps)
    return y * (1 + scale.view(view)) + shift.view(view)


def group_norm(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    fused: bool = False,
    silu: bool = False,
) -> torch.Tensor:
    """GroupNorm of x [B, C, *spatial], weight / bias [C] optional, then SiLU when ``silu``. Unfused is
    ``F.group_norm`` (what nn.GroupNorm runs), then ``F.silu``; fused: one kernel (``kernels.group_norm``)."""
    if fused:
        return _kernels().group_norm(x, num_groups, weight, bias, eps, silu=silu)
    y = F.group_norm(x, num_groups, weight, bias, eps)
    return F.silu(y) if silu else y


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _rope_one(x_BTHE: torch.Tensor, cos_TE: torch.Tensor, sin_TE: torch.Tensor) -> torch.Tensor:
    cos = cos_TE[None, :, None, :].to(x_BTHE.dtype)
    sin = sin_TE[None, :, None, :].to(x_BTHE.dtype)
    return x_BTHE * cos + _rotate_half(x_BTHE) * sin


def rope(
    q_BTHE: torch.Tensor, k_BTKE: torch.Tensor, cos_TE: torch.Tensor, sin_TE: torch.Tensor, fused: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate-half RoPE of q and k; cos/sin [T, E] hold each angle twice (cat(freqs, freqs)).

    The fused kernel takes the [T, E/2] half, so the first half of cos/sin is what it uses. It rotates q
    and k in place (the caller's q and k are fresh projections nothing else holds), except on DTensors
    (the sharding rule covers the out-of-place op) and under torch.compile, where inductor plans buffer
    reuse itself.
    """
    if fused:
        half = q_BTHE.shape[-1] // 2
        cos = cos_TE[:, :half].to(torch.float32)
        sin = sin_TE[:, :half].to(torch.float32)
        if _is_dtensor(q_BTHE) or torch.compiler.is_compiling():
            return _kernels().apply_rope(q_BTHE, k_BTKE, cos, sin)
        return _kernels().apply_rope_(q_BTHE, k_BTKE, cos, sin)
    return _rope_one(q_BTHE, cos_TE, sin_TE), _rope_one(k_BTKE, cos_TE, sin_TE)


def swiglu(gate: torch.Tensor, up: torch.Tensor, fused: bool = False) -> torch.Tensor:
    """silu(gate) * up."""
    if fused:
        return _kernels().swiglu(gate, up)
    return F.silu(gate) * up


def linear_cross_entropy(
    hidden_ND: torch.Tensor,
    weight_VD: torch.Tensor,
    targets_N: torch.Tensor,
    fused: bool = False,
    *,
    ignore_index: int = -100,
    z_loss: float = 0.0,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Mean cross-entropy of ``hidden @ weight.T`` against targets (+ z_loss * logsumexp^2), fp32 scalar.

    hidden may have leading dims ([..., D]) matched by targets ([...]); they are flattened.
    Fused: ``kernels.fused_linear_cross_entropy`` processes rows in chunks and never holds the [N, V]
    logits (memory ∝ chunk_size * V). Unfused: full logits, softmax in fp32.

    Under tensor parallel (fused only) the weight is a DTensor sharded over the vocabulary and the hidden
    states a DTensor of any placement (e.g. sequence-sharded): see ``_vocab_parallel_linear_cross_entropy``.
    """
    if fused and _is_dtensor(weight_VD):
        return _vocab_parallel_linear_cross_entropy(
            hidden_ND, weight_VD, targets_N, ignore_index=ignore_index, z_loss=z_loss, chunk_size=chunk_size
        )
    hidden_ND, targets_N = hidden_ND.flatten(0, -2), targets_N.flatten()  # [B, T, D] / [B, T] are welcome
    if fused:
        return _kernels().fused_linear_cross_entropy(
            hidden_ND, weight_VD, targets_N, ignore_index=ignore_index, z_loss=z_loss, chunk_size=chunk_size
        )
    logits = F.linear(hidden_ND, weight_VD).float()
    loss = F.cross_entropy(logits, targets_N, ignore_index=ignore_index)
    if z_loss:
        valid = targets_N != ignore_index
        lse = torch.logsumexp(logits, dim=-1)
        loss = loss + z_loss * (lse.square() * valid).sum() / valid.sum().clamp(min=1)
    return loss


def _is_dtensor(t: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _vocab_parallel_linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, **kwargs: float | int | None
) -> torch.Tensor:
    """Fused linear + cross-entropy with the output weight a DTensor Shard(0) over a 1-D (tensor-parallel) mesh.

    Each rank runs the chunk loop over its vocabulary rows (``kernels.vocab_parallel_linear_cross_entropy``)
    on the full hidden states, all-gathered here. The hidden gradient each rank computes is a partial sum
    over its vocabulary shard; handing it back with a Partial gradient placement lets DTensor reduce it in
    the backward of that all-gather — a reduce-scatter when the hidden states were sequence-sharded, the
    same traffic as loss parallel and no [N, V] logits on any rank.
    """
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

    mesh = weight.device_mesh
    if mesh.ndim != 1 or tuple(weight.placements) != (Shard(0),):
        raise ValueError(
            "train.fused_cross_entropy under tensor parallel needs the output weight sharded over the vocabulary "
            f"on one mesh dim (placements (Shard(0),)); got {tuple(weight.placements)} on a {mesh.ndim}-D mesh"
        )
    vocab, tp = weight.shape[0], mesh.size()
    if vocab % tp:
        raise ValueError(f"model.vocab_size: {vocab} is not divisible by parallel.tp={tp} (vocabulary-sharded head)")
    if isinstance(hidden, DTensor):
        hidden = hidden.redistribute(mesh, [Replicate()]).to_local(grad_placements=[Partial()])
        reduce_hidden_grad = False
    else:  # a plain, replicated tensor: the kernel all-reduces its gradient itself
        reduce_hidden_grad = True
    if isinstance(targets, DTensor):
        targets = targets.full_tensor()
    return _kernels().vocab_parallel_linear_cross_entropy(
        hidden.flatten(0, -2),
        weight.to_local(),
        targets.flatten(),
        mesh.get_group(),
        vocab_start=mesh.get_local_rank() * (vocab // tp),
        reduce_hidden_grad=reduce_hidden_grad,
        **kwargs,
    )
