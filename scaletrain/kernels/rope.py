"""Rotary position embedding (RoPE) forward + backward in Triton, rotate-half convention.

Layout: q_BTHD [B, T, H, D] and k_BTHD [B, T, Hk, D] (Hk may differ from H), cos_TD2 / sin_TD2
[T', D/2] with T' >= T (rows beyond T are ignored, so a max-length table can be passed).

Convention (GPT-NeoX / Llama "rotate_half"): the pairs are (x[..., i], x[..., i + D/2]) for i < D/2, i.e.
  out[..., :D/2] = x1 * cos - x2 * sin
  out[..., D/2:] = x2 * cos + x1 * sin
which equals x * cat(cos, cos) + rotate_half(x) * cat(sin, sin) with rotate_half(x) = cat(-x2, x1).
It is NOT the interleaved (x[2i], x[2i+1]) convention of the original RoFormer / GPT-J.

Why fused: eager RoPE materializes rotate_half(x), two products and the cos/sin broadcasts; here each
token's heads are rotated in one read/write. The backward is the inverse rotation (sin -> -sin) of the
incoming gradient, so the same kernel serves both directions. cos/sin get no gradient (they are buffers).

``apply_rope_`` is the in-place form (the kernel writes over q and k), what the models use: q and k come
straight from their projections, so nothing else needs the unrotated values.
"""

import torch

from . import reference
from ._triton import kernel_op, launch, tl, triton, use_triton


@triton.jit
def _rope_kernel(X, Y, COS, SIN, T, H, HALF, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, INVERSE: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)  # over B * T
    t = token % T
    heads = tl.arange(0, BLOCK_H)
    cols = tl.arange(0, BLOCK_HALF)
    col_mask = cols < HALF
    cos = tl.load(COS + t * HALF + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    sin = tl.load(SIN + t * HALF + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    if INVERSE:
        sin = -sin
    mask = (heads[:, None] < H) & col_mask[None, :]
    ptr = token * H * 2 * HALF + heads[:, None] * (2 * HALF) + cols[None, :]
    x1 = tl.load(X + ptr, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(X + ptr + HALF, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + ptr, (x1 * cos - x2 * sin).to(Y.dtype.element_ty), mask=mask)
    tl.store(Y + ptr + HALF, (x2 * cos + x1 * sin).to(Y.dtype.element_ty), mask=mask)


def _rotate(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Rotate x [B, T, H, D] (contiguous) into out; out may be x itself: each program reads a token's
    heads whole before it writes them, and no two programs touch the same token."""
    b, t, h, d = x.shape
    x = x.contiguous()
    y = torch.empty_like(x) if out is None else out
    half = d // 2
    launch(_rope_kernel)[(b * t,)](
        x, y, cos, sin, t, h, half, BLOCK_H=triton.next_power_of_2(h), BLOCK_HALF=triton.next_power_of_2(half),
        INVERSE=inverse, num_warps=4,
    )  # fmt: skip
    return y


@kernel_op("rope", fake=lambda q, k, cos, sin, inverse: (torch.empty_like(q), torch.empty_like(k)))
def rope(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q and k by the angles in cos/sin ([T, D/2] contiguous); ``inverse`` rotates backwards."""
    return _rotate(q, cos, sin, inverse), _rotate(k, cos, sin, inverse)


def _setup_context(ctx, inputs, output) -> None:  # noqa: ANN001
    _, _, cos, sin, inverse = inputs
    ctx.save_for_backward(cos, sin)
    ctx.inverse = inverse


def _backward(ctx, dq: torch.Tensor, dk: torch.Tensor):  # noqa: ANN001
    cos, sin = ctx.saved_tensors
    dq, dk = rope(dq, dk, cos, sin, not ctx.inverse)
    return dq, dk, None, None, None


if hasattr(rope, "register_autograd"):
    rope.register_autograd(_backward, setup_context=_setup_context)


@kernel_op("rope_", mutates_args=("x",), fake=lambda x, cos, sin, inverse: None)
def rope_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool) -> None:
    """``rope`` of one contiguous tensor ([B, T, H, D]), written over it."""
    _rotate(x, cos, sin, inverse, out=x)


class _RopeInPlace(torch.autograd.Function):
    # torch.library cannot attach autograd to an op that mutates its inputs, so the in-place form is an
    # autograd.Function around the mutating op; mark_dirty tells autograd that x now holds new values.
    # One tensor per call: autograd cannot rebase more than one modified view per Function.
    @staticmethod
    def forward(ctx, x, cos, sin):  # noqa: ANN001
        rope_(x, cos, sin, False)
        ctx.mark_dirty(x)
        ctx.save_for_backward(cos, sin)
        return x

    @staticmethod
    def backward(ctx, dx):  # noqa: ANN001
        cos, sin = ctx.saved_tensors
        dx = dx.clone(memory_format=torch.contiguous_format)  # the incoming gradient may be shared
        rope_(dx, cos, sin, True)
        return dx, None, None


def _check_rope_shapes(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    b, t, _, d = q.shape
    if k.shape[:2] != (b, t) or k.shape[-1] != d or d % 2:
        raise ValueError(f"q {tuple(q.shape)} / k {tuple(k.shape)} must share B, T and an even D")
    if cos.shape != sin.shape or cos.shape[0] < t or cos.shape[1] != d // 2:
        raise ValueError(f"cos/sin must be [>= {t}, {d // 2}], got {tuple(cos.shape)}/{tuple(sin.shape)}")


def _writable(x: torch.Tensor) -> bool:
    """Whether autograd allows an in-place write to x (and x is contiguous, as the kernel needs).

    Not to a leaf that requires grad (a parameter, a test's input). Nor to a view made inside a custom
    Function (autograd refuses that), e.g. the local tensor a tensor-parallel projection hands out
    (DTensor.to_local). Views record how they were made; torch has no public accessor for it, hence the
    private one, with the out-of-place path if it ever goes away.
    """
    if not x.is_contiguous() or (x.is_leaf and x.requires_grad):
        return False
    if not (x._is_view() and x.requires_grad):
        return True
    try:
        return torch._C._autograd._get_creation_meta(x) == torch._C._autograd.CreationMeta.DEFAULT
    except (AttributeError, RuntimeError):
        return False


def apply_rope_(
    q_BTHD: torch.Tensor, k_BTHD: torch.Tensor, cos_TD2: torch.Tensor, sin_TD2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``apply_rope`` in place: q and k (contiguous) are overwritten with their rotation and returned.

    Saves the two output allocations (q and k are rewritten where the projections put them). Autograd
    works as for any in-place op: q and k must not be leaves that require grad, nor tensors something
    else saved for backward. Falls back to the out-of-place path where Triton cannot run, q/k are not
    contiguous, or autograd forbids writing to them (views made inside a custom Function).
    """
    _check_rope_shapes(q_BTHD, k_BTHD, cos_TD2, sin_TD2)
    t = q_BTHD.shape[1]
    writable = all(_writable(x) for x in (q_BTHD, k_BTHD))
    if not (writable and use_triton(q_BTHD, k_BTHD, cos_TD2, sin_TD2)):
        return apply_rope(q_BTHD, k_BTHD, cos_TD2, sin_TD2)
    cos, sin = cos_TD2[:t].contiguous(), sin_TD2[:t].contiguous()
    return _RopeInPlace.apply(q_BTHD, cos, sin), _RopeInPlace.apply(k_BTHD, cos, sin)


def apply_rope(
    q_BTHD: torch.Tensor, k_BTHD: torch.Tensor, cos_TD2: torch.Tensor, sin_TD2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply rotate-half RoPE to q [B,T,H,D] and k [B,T,Hk,D] with cos/sin [>=T, D/2]; returns (q_rot, k_rot)."""
    _check_rope_shapes(q_BTHD, k_BTHD, cos_TD2, sin_TD2)
    t = q_BTHD.shape[1]
    if use_triton(q_BTHD, k_BTHD, cos_TD2, sin_TD2):
        return rope(q_BTHD, k_BTHD, cos_TD2[:t].contiguous(), sin_TD2[:t].contiguous(), False)
    return reference.apply_rope_reference(q_BTHD, k_BTHD, cos_TD2, sin_TD2)
