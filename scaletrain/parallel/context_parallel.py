"""Context parallelism: each of `cp` ranks holds a slice of every sequence.

Sharding is load-balanced for causal attention: the sequence is cut into 2*cp chunks and
rank r keeps chunks r and 2*cp-1-r, so every rank has one early (cheap) and one late
(expensive) chunk and the causal work is even.

Two attention methods, both written over plain collectives so they run (and are tested)
on CPU with gloo — torch's own `context_parallel` has no CPU attention path:

* ring: K/V chunks travel around the ring; each rank attends its queries to every K/V
  chunk as it passes and merges the partial results by their log-sum-exp. Chunk pairs that
  the causal mask hides entirely are skipped. The ring shift is an autograd function whose
  backward sends gradients the other way, so the whole thing is differentiable.
* alltoall (Ulysses): one all-to-all turns sequence-sharded heads into head-sharded full
  sequences, ordinary causal attention runs per head group, a second all-to-all turns it back.

Shapes: B batch, H heads (local), K kv heads, T local sequence, S key sequence, E head dim (as in the model files).
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
import torch.distributed as dist
from torch.distributed.nn.functional import all_to_all_single


def _chunk_ids(rank: int, cp: int) -> tuple[int, int]:
    """The two of the sequence's 2*cp equal chunks that `rank` holds: one from each end, so every rank gets
    the same causal work."""
    return rank, 2 * cp - 1 - rank


@lru_cache(maxsize=64)
def _positions_cpu(local_len: int, rank: int, cp: int) -> torch.Tensor:
    chunk = local_len // 2
    first, second = _chunk_ids(rank, cp)
    return torch.cat(
        [torch.arange(first * chunk, (first + 1) * chunk), torch.arange(second * chunk, (second + 1) * chunk)]
    )


def load_balanced_positions(local_len: int, rank: int, cp: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Global positions of the `local_len` tokens that rank `rank` of `cp` holds."""
    return _positions_cpu(local_len, rank, cp).to(device)


def shard_sequence(x: torch.Tensor, rank: int, cp: int, dim: int = 1) -> torch.Tensor:
    """This rank's load-balanced slice of `x` along `dim` (length must divide by 2*cp)."""
    length = x.shape[dim]
    if length % (2 * cp):
        raise ValueError(f"sequence length {length} is not divisible by 2*cp = {2 * cp}")
    index = load_balanced_positions(length // cp, rank, cp, x.device)
    return x.index_select(dim, index)


class _RingShift(torch.autograd.Function):
    """Send to the next rank, receive from the previous; gradients go the other way."""

    @staticmethod
    def _shift(x: torch.Tensor, group: dist.ProcessGroup, step: int) -> torch.Tensor:
        size, rank = dist.get_world_size(group), dist.get_rank(group)
        send_to = dist.get_global_rank(group, (rank + step) % size)
        recv_from = dist.get_global_rank(group, (rank - step) % size)
        x = x.contiguous()  # K/V arrive as transposed views; gloo sends and receives dense buffers
        out = torch.empty_like(x)
        ops = [dist.P2POp(dist.isend, x, send_to, group), dist.P2POp(dist.irecv, out, recv_from, group)]
        for work in dist.batch_isend_irecv(ops):
            work.wait()
        return out

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return _RingShift._shift(x, group, 1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _RingShift._shift(grad, ctx.group, -1), None


def _repeat_kv(x_BKTE: torch.Tensor, heads: int) -> torch.Tensor:
    group = heads // x_BKTE.shape[1]
    return x_BKTE if group == 1 else x_BKTE.repeat_interleave(group, dim=1)


def eager_block_attention(q_BHTE, k_BKSE, v_BKSE, causal: bool):
    """(out, lse) of one query chunk against one K/V chunk, in plain ops. `causal` is only ever
    asked for a chunk against itself (equal, aligned positions), so the mask is the usual triangle."""
    k, v = _repeat_kv(k_BKSE, q_BHTE.shape[1]), _repeat_kv(v_BKSE, q_BHTE.shape[1])
    scores = (q_BHTE @ k.transpose(-2, -1)).float() / math.sqrt(q_BHTE.shape[-1])
    if causal:
        T = scores.shape[-1]
        scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool, device=scores.device).triu(1), float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    return torch.exp(scores - lse[..., None]).to(v.dtype) @ v, lse


def triton_block_attention(q_BHTE, k_BKSE, v_BKSE, causal: bool):
    """The same from the flash-attention kernel, which returns lse (differentiably) and reads
    grouped K/V heads without copying them."""
    from scaletrain import kernels

    return kernels.attention(q_BHTE, k_BKSE, v_BKSE, causal=causal, return_lse=True)


BLOCK_ATTENTION = {"eager": eager_block_attention, "triton": triton_block_attention}


def _merge(out, lse, block_out, block_lse):
    """Combine two softmax-normalized partial results by their log-sum-exp (fp32)."""
    block_out = block_out.float()
    if out is None:
        return block_out, block_lse
    new_lse = torch.logaddexp(lse, block_lse)
    return out * torch.exp(lse - new_lse)[..., None] + block_out * torch.exp(block_lse - new_lse)[..., None], new_lse


def ring_attention(q_BHTE, k_BKTE, v_BKTE, group: dist.ProcessGroup, block_attention=eager_block_attention):
    """Causal attention over the whole (cp-sharded, load-balanced) sequence.

    K/V travel with their own (kv) head count: grouped-query models send H/K times less.
    """
    cp, rank = dist.get_world_size(group), dist.get_rank(group)
    local_len = q_BHTE.shape[2]
    k, v = k_BKTE, v_BKTE
    half = local_len // 2
    q_chunks = (q_BHTE[:, :, :half], q_BHTE[:, :, half:])
    q_chunk_ids = _chunk_ids(rank, cp)
    outs, lses = [None, None], [None, None]
    for step in range(cp):
        src = (rank - step) % cp
        k_chunk_ids = _chunk_ids(src, cp)
        for j in range(2):
            kj, vj = k[:, :, j * half : (j + 1) * half], v[:, :, j * half : (j + 1) * half]
            for i in range(2):
                # Chunks are equal-sized and aligned (plain ints: no device sync): a later chunk is all
                # future, the same chunk a causal triangle, an earlier one all past (no mask).
                if k_chunk_ids[j] > q_chunk_ids[i]:
                    continue
                diagonal = k_chunk_ids[j] == q_chunk_ids[i]
                block_out, block_lse = block_attention(q_chunks[i], kj, vj, diagonal)
                outs[i], lses[i] = _merge(outs[i], lses[i], block_out, block_lse)
        if step < cp - 1:
            k, v = _RingShift.apply(k, group), _RingShift.apply(v, group)
    return torch.cat(outs, dim=2).to(q_BHTE.dtype)


def _seq_to_heads(x_BHTE: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """[B, H, T_local, E] sharded on T -> [B, H/cp, cp*T_local, E] sharded on H (rank-major T)."""
    cp = dist.get_world_size(group)
    B, H, T, E = x_BHTE.shape
    send = x_BHTE.reshape(B, cp, H // cp, T, E).permute(1, 0, 2, 3, 4).contiguous()
    recv = all_to_all_single(torch.empty_like(send), send, group=group)
    return recv.permute(1, 2, 0, 3, 4).reshape(B, H // cp, cp * T, E)


def _heads_to_seq(x_BHTE: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    cp = dist.get_world_size(group)
    B, Hl, TT, E = x_BHTE.shape
    T = TT // cp
    send = x_BHTE.reshape(B, Hl, cp, T, E).permute(2, 0, 1, 3, 4).contiguous()
    recv = all_to_all_single(torch.empty_like(send), send, group=group)
    return recv.permute(1, 0, 2, 3, 4).reshape(B, cp * Hl, T, E)


def alltoall_attention(q_BHTE, k_BKTE, v_BKTE, group: dist.ProcessGroup) -> torch.Tensor:
    cp = dist.get_world_size(group)
    heads, local_len = q_BHTE.shape[1], q_BHTE.shape[2]
    if heads % cp:
        raise ValueError(f"parallel.cp_method=alltoall: {heads} local heads are not divisible by cp={cp}")
    kv_heads = k_BKTE.shape[1]
    if kv_heads % cp:  # too few kv heads to split: give every query head its own copy
        k_BKTE, v_BKTE = _repeat_kv(k_BKTE, heads), _repeat_kv(v_BKTE, heads)
    q, k, v = (_seq_to_heads(t, group) for t in (q_BHTE, k_BKTE, v_BKTE))
    positions = torch.cat([load_balanced_positions(local_len, r, cp, q.device) for r in range(cp)])
    mask = positions[:, None] >= positions[None, :]
    k, v = _repeat_kv(k, q.shape[1]), _repeat_kv(v, q.shape[1])
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return _heads_to_seq(out, group)


def attention_function(method: str, group: dist.ProcessGroup, block_impl: str = "eager"):
    """The attention callable a recipe installs in its attention modules for cp > 1.

    `block_impl` ("eager" or "triton"): how the ring attends one chunk pair; the Triton kernel
    keeps only O(T) state per block instead of the [T, T] scores.
    """
    if method == "ring":
        if block_impl not in BLOCK_ATTENTION:
            raise ValueError(f"ring attention blocks: {block_impl!r} is not one of {sorted(BLOCK_ATTENTION)}")
        block = BLOCK_ATTENTION[block_impl]
        return lambda q, k, v: ring_attention(q, k, v, group, block)
    if method == "alltoall":
        return lambda q, k, v: alltoall_attention(q, k, v, group)
    raise ValueError(f"parallel.cp_method: {method!r} is not allowed; use 'ring' or 'alltoall'")
