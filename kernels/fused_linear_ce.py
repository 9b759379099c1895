"""Fused linear + cross-entropy: loss = mean CE(hidden @ weight.T, targets) without the [N, V] logits.

Layout: hidden_ND [N, D], weight_VD [V, D], targets_N [N] (int64; ``ignore_index`` rows are skipped).
Returns the fp32 scalar mean over non-ignored rows of  CE + z_loss * lse^2  (lse = logsumexp of the row's
logits; the z-loss of PaLM keeps the softmax normalizer near 1). If every row is ignored the loss is 0.

Why: for LLM vocabularies the logits ([N, V], e.g. 16k tokens x 128k vocab x 4 bytes = 8 GiB) dominate
activation memory. Following the idea popularized by Liger-Kernel, rows are processed in chunks of
``chunk_size`` and the gradients are computed *during the forward* chunk loop:
  logits_c = hidden_c @ weight.T                        (torch matmul, [chunk, V])
  Triton kernel, one program per row: two passes over V (online max/sum -> lse, then
      dlogits = (softmax * (1 + 2 z lse) - onehot(target)) / n_valid written in place over logits_c)
  grad_hidden_c = dlogits_c @ weight;  grad_weight += dlogits_c.T @ hidden_c   (torch matmuls)
so peak extra memory is one [chunk, V] buffer (plus the [V, D] grad accumulator, fp32), never [N, V].
The backward only scales the stored gradients by the incoming scalar grad. Trade-off: the gradient work
is paid even if backward is never called, so under no_grad (or when no input needs grad) it is skipped.

The same chunk loop runs without Triton (CPU without the interpreter, no triton installed) using a
torch implementation of the per-chunk step, so the memory property holds on every backend.
"""

import torch

from ._triton import INTERPRET, kernel_op, launch, tl, triton, use_triton


@triton.jit
def _ce_chunk_kernel(
    LOGITS, TARGETS, LOSS, INV_N, V, ignore_index, z_loss, BLOCK_V: tl.constexpr, COMPUTE_GRAD: tl.constexpr
):
    row = tl.program_id(0).to(tl.int64)
    base = LOGITS + row * V
    target = tl.load(TARGETS + row)
    valid = target != ignore_index
    safe_target = tl.where(valid, target, 0)
    target_logit = tl.load(base + safe_target).to(tl.float32)  # read before pass 2 overwrites the row
    cols0 = tl.arange(0, BLOCK_V)

    # Pass 1: online logsumexp over the vocabulary in BLOCK_V slices.
    m = tl.max(tl.full([BLOCK_V], float("-inf"), dtype=tl.float32), 0)
    s = tl.sum(tl.zeros([BLOCK_V], dtype=tl.float32), 0)
    for start in range(0, V, BLOCK_V):
        cols = start + cols0
        x = tl.load(base + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, 0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), 0)
        m = m_new
    lse = m + tl.log(s)
    loss = lse - target_logit + z_loss * lse * lse
    tl.store(LOSS + row, tl.where(valid, loss, 0.0))

    # Pass 2: d(loss_row / n_valid) / d logits, in place. d(z lse^2)/dx = 2 z lse softmax.
    if COMPUTE_GRAD:
        scale = tl.where(valid, tl.load(INV_N), 0.0)
        p_scale = 1.0 + 2.0 * z_loss * lse
        for start in range(0, V, BLOCK_V):
            cols = start + cols0
            x = tl.load(base + cols, mask=cols < V, other=0.0).to(tl.float32)
            grad = tl.exp(x - lse) * p_scale - tl.where(cols == safe_target, 1.0, 0.0)
            tl.store(base + cols, (grad * scale).to(LOGITS.dtype.element_ty), mask=cols < V)


def _ce_chunk_fake(logits, targets, inv_n, ignore_index: int, z_loss: float, compute_grad: bool):  # noqa: ANN001
    return logits.new_empty(logits.shape[0], dtype=torch.float32)


@kernel_op("cross_entropy_chunk_", mutates_args=("logits",), fake=_ce_chunk_fake)
def cross_entropy_chunk_(
    logits: torch.Tensor, targets: torch.Tensor, inv_n: torch.Tensor, ignore_index: int, z_loss: float,
    compute_grad: bool,
) -> torch.Tensor:  # fmt: skip
    """Per-row loss [c] fp32 for a contiguous logits chunk [c, V]; overwrites logits with dloss/dlogits."""
    c, v = logits.shape
    block = min(triton.next_power_of_2(v), 64 if INTERPRET else 8192)
    loss = torch.empty(c, device=logits.device, dtype=torch.float32)
    launch(_ce_chunk_kernel)[(c,)](
        logits, targets, loss, inv_n, v, ignore_index, z_loss, BLOCK_V=block, COMPUTE_GRAD=compute_grad,
        num_warps=8 if block >= 4096 else 4,
    )  # fmt: skip
    return loss


def _ce_chunk_torch(
    logits: torch.Tensor, targets: torch.Tensor, inv_n: torch.Tensor, ignore_index: int, z_loss: float,
    compute_grad: bool,
) -> torch.Tensor:  # fmt: skip
    """Same contract as ``cross_entropy_chunk_`` in plain torch (fallback when Triton cannot run)."""
    x = logits.float()
    valid = targets != ignore_index
    safe_t = torch.where(valid, targets, 0)
    lse = torch.logsumexp(x, dim=-1)
    loss = (lse - x.gather(1, safe_t[:, None])[:, 0] + z_loss * lse * lse) * valid
    if compute_grad:
        grad = torch.exp(x - lse[:, None]) * (1.0 + 2.0 * z_loss * lse)[:, None]
        grad.scatter_add_(1, safe_t[:, None], -torch.ones_like(lse)[:, None])
        logits.copy_(grad * (inv_n * valid)[:, None])
    return loss


def _chunk_logits(hidden_c: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return hidden_c @ weight.T


def default_chunk_size(n: int, d: int, v: int) -> int:
    """Rows per chunk so that a logits chunk is about as large as the hidden states (>= 64 rows)."""
    rows = max(64, triton.next_power_of_2(max(1, (n * d) // max(v, 1))))
    return min(n, rows) if n > 0 else 1


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index, z_loss, chunk_size):  # noqa: ANN001
        want_dh, want_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        compute_grad = want_dh or want_dw
        n = hidden.shape[0]
        chunk_step = cross_entropy_chunk_ if use_triton(hidden, weight, targets) else _ce_chunk_torch
        # Keep n_valid on device (no host sync); the kernel reads 1/n_valid to scale gradients.
        inv_n = (1.0 / (targets != ignore_index).sum().clamp(min=1).float()).reshape(1)
        grad_h = torch.empty_like(hidden) if want_dh else None
        # fp32 accumulator: summing many bf16 chunk products in bf16 would lose precision.
        grad_w = torch.zeros(weight.shape, device=weight.device, dtype=torch.float32) if want_dw else None
        loss_sum = torch.zeros((), device=hidden.device, dtype=torch.float32)
        for start in range(0, n, chunk_size):
            end = min(start + chunk_size, n)
            h_c = hidden[start:end]
            logits = _chunk_logits(h_c, weight)
            loss_sum += chunk_step(logits, targets[start:end], inv_n, ignore_index, z_loss, compute_grad).sum()
            if want_dh:
                grad_h[start:end] = logits @ weight
            if want_dw:
                if grad_w.dtype == logits.dtype:
                    grad_w.addmm_(logits.T, h_c)
                else:
                    grad_w += (logits.T @ h_c).float()
        ctx.save_for_backward(*(g for g in (grad_h, grad_w) if g is not None))
        ctx.want = (want_dh, want_dw)
        ctx.weight_dtype = weight.dtype
        return loss_sum * inv_n[0]

    @staticmethod
    def backward(ctx, grad_loss):  # noqa: ANN001
        saved = iter(ctx.saved_tensors)
        want_dh, want_dw = ctx.want
        grad_h = grad_w = None
        if want_dh:
            stored_h = next(saved)
            grad_h = stored_h * grad_loss.to(stored_h.dtype)
        if want_dw:
            grad_w = (next(saved) * grad_loss).to(ctx.weight_dtype)
        return grad_h, grad_w, None, None, None, None


def fused_linear_cross_entropy(
    hidden_ND: torch.Tensor,
    weight_VD: torch.Tensor,
    targets_N: torch.Tensor,
    *,
    ignore_index: int = -100,
    z_loss: float = 0.0,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Mean CE (+ z_loss * lse^2) of hidden @ weight.T against targets, chunked over rows; fp32 scalar."""
    if hidden_ND.dim() != 2 or weight_VD.dim() != 2 or hidden_ND.shape[1] != weight_VD.shape[1]:
        raise ValueError(f"expected hidden [N, D], weight [V, D]; got {tuple(hidden_ND.shape)}, "
                         f"{tuple(weight_VD.shape)}")
    if targets_N.shape != hidden_ND.shape[:1]:
        raise ValueError(f"targets must be [{hidden_ND.shape[0]}], got {tuple(targets_N.shape)}")
    n, d = hidden_ND.shape
    chunk = default_chunk_size(n, d, weight_VD.shape[0]) if chunk_size is None else int(chunk_size)
    if chunk < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk}")
    return _FusedLinearCrossEntropy.apply(
        hidden_ND, weight_VD, targets_N.contiguous(), int(ignore_index), float(z_loss), chunk
    )
