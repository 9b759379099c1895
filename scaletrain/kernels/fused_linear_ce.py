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
import torch.distributed as dist

from ._triton import INTERPRET, kernel_op, launch, tl, triton, use_triton


@triton.jit
def _row_logsumexp(base, V, BLOCK_V: tl.constexpr):
    """Online logsumexp of one row of V logits, read in BLOCK_V slices."""
    cols0 = tl.arange(0, BLOCK_V)
    m = tl.max(tl.full([BLOCK_V], float("-inf"), dtype=tl.float32), 0)
    s = tl.sum(tl.zeros([BLOCK_V], dtype=tl.float32), 0)
    for start in range(0, V, BLOCK_V):
        cols = start + cols0
        x = tl.load(base + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, 0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), 0)
        m = m_new
    return m + tl.log(s)


@triton.jit
def _row_grad_(base, V, lse, z_loss, target_col, scale, BLOCK_V: tl.constexpr):
    """Overwrite one row of logits with scale * d(CE + z lse^2)/dlogits = scale * (softmax (1 + 2 z lse) - onehot).

    target_col is the target's column in this row (outside [0, V) when another vocabulary shard holds it).
    """
    cols0 = tl.arange(0, BLOCK_V)
    p_scale = 1.0 + 2.0 * z_loss * lse
    for start in range(0, V, BLOCK_V):
        cols = start + cols0
        x = tl.load(base + cols, mask=cols < V, other=0.0).to(tl.float32)
        grad = tl.exp(x - lse) * p_scale - tl.where(cols == target_col, 1.0, 0.0)
        tl.store(base + cols, (grad * scale).to(base.dtype.element_ty), mask=cols < V)


@triton.jit
def _ce_chunk_kernel(
    LOGITS, TARGETS, LOSS, INV_N, V, ignore_index, z_loss, BLOCK_V: tl.constexpr, COMPUTE_GRAD: tl.constexpr
):
    row = tl.program_id(0).to(tl.int64)
    base = LOGITS + row * V
    target = tl.load(TARGETS + row)
    valid = target != ignore_index
    safe_target = tl.where(valid, target, 0)
    target_logit = tl.load(base + safe_target).to(tl.float32)  # read before the gradient overwrites the row
    lse = _row_logsumexp(base, V, BLOCK_V)
    loss = lse - target_logit + z_loss * lse * lse
    tl.store(LOSS + row, tl.where(valid, loss, 0.0))
    if COMPUTE_GRAD:
        scale = tl.where(valid, tl.load(INV_N), 0.0)
        _row_grad_(base, V, lse, z_loss, safe_target, scale, BLOCK_V)


# Vocabulary-parallel pair (tensor parallel: each rank holds logits for the columns
# [vocab_start, vocab_start + V) of the full vocabulary). The rows' global logsumexp needs every shard, so
# the fused kernel splits in two around one all-gather: statistics of the local shard, then the gradient.


@triton.jit
def _ce_shard_stats_kernel(LOGITS, TARGETS, LSE, TARGET_LOGIT, V, vocab_start, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = LOGITS + row * V
    local = tl.load(TARGETS + row) - vocab_start  # ignored rows get a value here too; the caller masks them
    in_shard = (local >= 0) & (local < V)
    x_t = tl.load(base + tl.where(in_shard, local, 0)).to(tl.float32)
    tl.store(TARGET_LOGIT + row, tl.where(in_shard, x_t, 0.0))
    tl.store(LSE + row, _row_logsumexp(base, V, BLOCK_V))


@triton.jit
def _ce_shard_grad_kernel(LOGITS, TARGETS, LSE, INV_N, V, vocab_start, ignore_index, z_loss, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    target = tl.load(TARGETS + row)
    scale = tl.where(target != ignore_index, tl.load(INV_N), 0.0)
    _row_grad_(LOGITS + row * V, V, tl.load(LSE + row), z_loss, target - vocab_start, scale, BLOCK_V)


def _ce_chunk_fake(logits, targets, inv_n, ignore_index: int, z_loss: float, compute_grad: bool):  # noqa: ANN001
    return logits.new_empty(logits.shape[0], dtype=torch.float32)


@kernel_op("cross_entropy_chunk_", mutates_args=("logits",), fake=_ce_chunk_fake)
def cross_entropy_chunk_(
    logits: torch.Tensor, targets: torch.Tensor, inv_n: torch.Tensor, ignore_index: int, z_loss: float,
    compute_grad: bool,
) -> torch.Tensor:  # fmt: skip
    """Per-row loss [c] fp32 for a contiguous logits chunk [c, V]; overwrites logits with dloss/dlogits."""
    c, v = logits.shape
    block = _block_v(v)
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


def _block_v(v: int) -> int:
    return min(triton.next_power_of_2(v), 64 if INTERPRET else 8192)


def _shard_stats_fake(logits, targets, vocab_start: int):  # noqa: ANN001
    rows = logits.shape[0]
    return logits.new_empty(rows, dtype=torch.float32), logits.new_empty(rows, dtype=torch.float32)


@kernel_op("cross_entropy_shard_stats", fake=_shard_stats_fake)
def cross_entropy_shard_stats(
    logits: torch.Tensor, targets: torch.Tensor, vocab_start: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """For a vocabulary shard's logits [c, V]: (logsumexp over the shard, target logit or 0 if not here), fp32."""
    c, v = logits.shape
    block = _block_v(v)
    lse = torch.empty(c, device=logits.device, dtype=torch.float32)
    target_logit = torch.empty_like(lse)
    launch(_ce_shard_stats_kernel)[(c,)](
        logits, targets, lse, target_logit, v, vocab_start, BLOCK_V=block, num_warps=8 if block >= 4096 else 4
    )
    return lse, target_logit


@kernel_op("cross_entropy_shard_grad_", mutates_args=("logits",))
def cross_entropy_shard_grad_(
    logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor, inv_n: torch.Tensor, vocab_start: int,
    ignore_index: int, z_loss: float,
) -> None:  # fmt: skip
    """Overwrites a vocabulary shard's logits [c, V] with d(mean loss)/dlogits, given the global lse [c]."""
    c, v = logits.shape
    block = _block_v(v)
    launch(_ce_shard_grad_kernel)[(c,)](
        logits, targets, lse, inv_n, v, vocab_start, ignore_index, z_loss, BLOCK_V=block,
        num_warps=8 if block >= 4096 else 4,
    )  # fmt: skip


def _shard_stats_torch(logits: torch.Tensor, targets: torch.Tensor, vocab_start: int) -> tuple[torch.Tensor, ...]:
    local = targets - vocab_start
    in_shard = (local >= 0) & (local < logits.shape[1])
    x_t = logits.gather(1, torch.where(in_shard, local, 0)[:, None])[:, 0].float()
    return torch.logsumexp(logits.float(), dim=-1), torch.where(in_shard, x_t, 0.0)


def _shard_grad_torch_(
    logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor, inv_n: torch.Tensor, vocab_start: int,
    ignore_index: int, z_loss: float,
) -> None:  # fmt: skip
    local = targets - vocab_start
    in_shard = (local >= 0) & (local < logits.shape[1])
    grad = torch.exp(logits.float() - lse[:, None]) * (1.0 + 2.0 * z_loss * lse)[:, None]
    grad.scatter_add_(1, torch.where(in_shard, local, 0)[:, None], -in_shard.float()[:, None])
    logits.copy_(grad * (inv_n * (targets != ignore_index))[:, None])


def _chunk_logits(hidden_c: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return hidden_c @ weight.T


def default_chunk_size(n: int, d: int, v: int) -> int:
    """Rows per chunk so that a logits chunk is about as large as the hidden states (>= 64 rows)."""
    rows = max(64, triton.next_power_of_2(max(1, (n * d) // max(v, 1))))
    return min(n, rows) if n > 0 else 1


class _ChunkGrads:
    """The gradients both chunk loops compute during the forward, and the backward's scaling of them."""

    def __init__(self, hidden: torch.Tensor, weight: torch.Tensor, want_dh: bool, want_dw: bool):
        self.grad_h = torch.empty_like(hidden) if want_dh else None
        # fp32 accumulator: summing many bf16 chunk products in bf16 would lose precision.
        self.grad_w = torch.zeros(weight.shape, device=weight.device, dtype=torch.float32) if want_dw else None
        self.weight = weight

    @property
    def wanted(self) -> bool:
        return self.grad_h is not None or self.grad_w is not None

    def add_chunk(self, dlogits: torch.Tensor, h_c: torch.Tensor, start: int) -> None:
        """dlogits [c, V] (the chunk's logits overwritten with their gradient) for rows start..start+c."""
        if self.grad_h is not None:
            self.grad_h[start : start + h_c.shape[0]] = dlogits @ self.weight
        if self.grad_w is not None:
            if self.grad_w.dtype == dlogits.dtype:
                self.grad_w.addmm_(dlogits.T, h_c)
            else:
                self.grad_w += (dlogits.T @ h_c).float()

    def save(self, ctx) -> None:  # noqa: ANN001
        ctx.save_for_backward(*(g for g in (self.grad_h, self.grad_w) if g is not None))
        ctx.want, ctx.weight_dtype = (self.grad_h is not None, self.grad_w is not None), self.weight.dtype

    @staticmethod
    def scaled(ctx, grad_loss: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The stored d(loss)/d(hidden, weight), times the incoming gradient of the loss."""
        saved = iter(ctx.saved_tensors)
        want_dh, want_dw = ctx.want
        grad_h = grad_w = None
        if want_dh:
            stored_h = next(saved)
            grad_h = stored_h * grad_loss.to(stored_h.dtype)
        if want_dw:
            grad_w = (next(saved) * grad_loss).to(ctx.weight_dtype)
        return grad_h, grad_w


def _inv_valid(targets: torch.Tensor, ignore_index: int) -> torch.Tensor:
    # 1 / n_valid kept on device (no host sync); the kernels read it to scale gradients.
    return (1.0 / (targets != ignore_index).sum().clamp(min=1).float()).reshape(1)


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index, z_loss, chunk_size):  # noqa: ANN001
        grads = _ChunkGrads(hidden, weight, *ctx.needs_input_grad[:2])
        chunk_step = cross_entropy_chunk_ if use_triton(hidden, weight, targets) else _ce_chunk_torch
        inv_n = _inv_valid(targets, ignore_index)
        loss_sum = torch.zeros((), device=hidden.device, dtype=torch.float32)
        for start in range(0, hidden.shape[0], chunk_size):
            h_c = hidden[start : start + chunk_size]
            logits = _chunk_logits(h_c, weight)
            t_c = targets[start : start + chunk_size]
            loss_sum += chunk_step(logits, t_c, inv_n, ignore_index, z_loss, grads.wanted).sum()
            grads.add_chunk(logits, h_c, start)
        grads.save(ctx)
        return loss_sum * inv_n[0]

    @staticmethod
    def backward(ctx, grad_loss):  # noqa: ANN001
        return *_ChunkGrads.scaled(ctx, grad_loss), None, None, None, None


# torch 2.13 renamed all_gather_into_tensor (deprecated there) to all_gather_single; 2.11 has only the old name.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class _VocabParallelLinearCrossEntropy(torch.autograd.Function):
    """The same chunk loop over one vocabulary shard per rank of `group` (tensor parallel's output head)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, group, vocab_start, ignore_index, z_loss, chunk_size, reduce_dh):  # noqa: ANN001
        grads = _ChunkGrads(hidden, weight, *ctx.needs_input_grad[:2])
        on_triton = use_triton(hidden, weight, targets)
        shard_stats = cross_entropy_shard_stats if on_triton else _shard_stats_torch
        shard_grad_ = cross_entropy_shard_grad_ if on_triton else _shard_grad_torch_
        world = dist.get_world_size(group)
        valid = targets != ignore_index
        inv_n = _inv_valid(targets, ignore_index)
        loss_sum = torch.zeros((), device=hidden.device, dtype=torch.float32)
        for start in range(0, hidden.shape[0], chunk_size):
            h_c, t_c = hidden[start : start + chunk_size], targets[start : start + chunk_size]
            logits = _chunk_logits(h_c, weight)
            # One all-gather per chunk of 2 floats per row: every rank's (shard lse, target logit or 0).
            # Combining them in rank order on every rank keeps the loss bitwise equal across the group.
            local = torch.stack(shard_stats(logits, t_c, vocab_start))
            gathered = local.new_empty(world * 2, local.shape[1])  # ranks stacked on dim 0 (as gloo wants)
            _all_gather_single(gathered, local, group=group)
            gathered = gathered.view(world, 2, -1)
            lse = torch.logsumexp(gathered[:, 0], dim=0)
            target_logit = gathered[:, 1].sum(0)
            loss_sum += ((lse - target_logit + z_loss * lse * lse) * valid[start : start + chunk_size]).sum()
            if grads.wanted:
                shard_grad_(logits, t_c, lse, inv_n, vocab_start, ignore_index, z_loss)
                grads.add_chunk(logits, h_c, start)
        grads.save(ctx)
        ctx.group, ctx.reduce_dh = group, reduce_dh
        return loss_sum * inv_n[0]

    @staticmethod
    def backward(ctx, grad_loss):  # noqa: ANN001
        grad_h, grad_w = _ChunkGrads.scaled(ctx, grad_loss)
        if grad_h is not None and ctx.reduce_dh:  # each shard contributed its part of dloss/dhidden
            dist.all_reduce(grad_h, group=ctx.group)
        return grad_h, grad_w, None, None, None, None, None, None, None


def vocab_parallel_linear_cross_entropy(
    hidden_ND: torch.Tensor,
    weight_shard_VD: torch.Tensor,
    targets_N: torch.Tensor,
    group: dist.ProcessGroup,
    *,
    vocab_start: int,
    ignore_index: int = -100,
    z_loss: float = 0.0,
    chunk_size: int | None = None,
    reduce_hidden_grad: bool = True,
) -> torch.Tensor:
    """``fused_linear_cross_entropy`` with the output weight split over the vocabulary across `group`.

    Every rank passes the same hidden [N, D] and targets [N] (global vocabulary ids) and its own rows
    [vocab_start, vocab_start + V_shard) of the weight; every rank gets the same loss. Memory per rank is
    one [chunk, V_shard] buffer. The weight gradient is the rank's own shard. The hidden gradient is the
    sum of every shard's part: summed here by an all-reduce, or, with ``reduce_hidden_grad=False``, left
    as this rank's partial sum for a caller that reduces it itself (e.g. a DTensor with a Partial gradient
    placement, which becomes a reduce-scatter under sequence parallel).
    """
    _check_shapes(hidden_ND, weight_shard_VD, targets_N)
    n, d = hidden_ND.shape
    chunk = _chunk_rows(n, d, weight_shard_VD.shape[0], chunk_size)
    return _VocabParallelLinearCrossEntropy.apply(
        hidden_ND, weight_shard_VD, targets_N.contiguous(), group, int(vocab_start), int(ignore_index),
        float(z_loss), chunk, bool(reduce_hidden_grad),
    )  # fmt: skip


def _check_shapes(hidden_ND: torch.Tensor, weight_VD: torch.Tensor, targets_N: torch.Tensor) -> None:
    if hidden_ND.dim() != 2 or weight_VD.dim() != 2 or hidden_ND.shape[1] != weight_VD.shape[1]:
        raise ValueError(f"expected hidden [N, D], weight [V, D]; got {tuple(hidden_ND.shape)}, "
                         f"{tuple(weight_VD.shape)}")  # fmt: skip
    if targets_N.shape != hidden_ND.shape[:1]:
        raise ValueError(f"targets must be [{hidden_ND.shape[0]}], got {tuple(targets_N.shape)}")


def _chunk_rows(n: int, d: int, v: int, chunk_size: int | None) -> int:
    chunk = default_chunk_size(n, d, v) if chunk_size is None else int(chunk_size)
    if chunk < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk}")
    return chunk


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
    _check_shapes(hidden_ND, weight_VD, targets_N)
    n, d = hidden_ND.shape
    chunk = _chunk_rows(n, d, weight_VD.shape[0], chunk_size)
    return _FusedLinearCrossEntropy.apply(
        hidden_ND, weight_VD, targets_N.contiguous(), int(ignore_index), float(z_loss), chunk
    )
