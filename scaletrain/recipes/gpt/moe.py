"""Mixture-of-experts feed-forward for the GPT recipe: router, dropless token choice, grouped expert GEMMs.

Per MoE block, for N tokens of width D and E experts of hidden width F, each token picks its top-k experts:

  router:   scores_NE = softmax or sigmoid(x_ND @ W_router); the top-k by score (+ the balancing bias when
            auxiliary-loss-free balancing is on: the bias steers the choice only, never the weights); the
            weights are the chosen scores, renormalized to sum to 1 when moe.norm_topk.
  dispatch: the N*k (token, expert) pairs are sorted by expert (a stable sort, so the order is a pure
            function of the routing), the tokens gathered into that order, and each expert's run of rows
            goes through its SwiGLU as one grouped GEMM (torch._grouped_mm where the device and dtype
            take it; one matmul per expert otherwise), then scattered back, weighted, and summed per token.
  shared:   moe.num_shared_experts dense SwiGLUs every token also goes through (DeepSeek).

Balancing: the Switch/GShard auxiliary loss (E * sum_e f_e * P_e: f = the fraction of routed pairs, P = the
mean score), counted per sequence by default (moe.aux_loss_scope; a sequence split by context parallel is
counted whole, its pair counts summed over the cp ranks), the router z-loss (mean logsumexp^2), and
DeepSeek-V3's auxiliary-loss-free bias, updated after each optimizer step from the tokens each expert
received on all data-parallel ranks (`update_balancing`). The losses are returned beside the logits
(GPT.forward), so the recipe's loss adds them and they scale with gradient accumulation like the rest of it.
A capacity factor > 0 caps each expert at ceil(factor * N * k / E) pairs per micro-batch; the pairs over it
are dropped (counted).

Expert parallel (scaletrain/parallel/expert_parallel.py) splits the experts over the ep ranks: the sorted
rows go to their expert's rank and back between the sort and the scatter; routing, counting and balancing
stay on the rank that owns the tokens, so they do not depend on ep.

Shape legend: N tokens, D model dim, E experts, F expert hidden width, K top-k, P = N*K routed pairs,
Q rows received from the ep ranks.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from scaletrain.config.schema import opt
from scaletrain.parallel.expert_parallel import combine, dispatch, local_weight
from scaletrain.parallel.pipeline import inferring_shapes


@dataclass
class MoEConfig:
    num_experts: int = opt(0, "Routed experts per MoE block; 0 = a dense model.")
    top_k: int = opt(2, "Experts each token is routed to.")
    num_shared_experts: int = opt(0, "Experts every token also goes through (DeepSeek's shared experts).")
    expert_hidden: int = opt(0, "Hidden width of each expert's SwiGLU; 0 = the dense MLP's width.")
    every: int = opt(1, "Every N-th block is MoE (1 = all), counted after the first_dense blocks.")
    first_dense: int = opt(0, "The first K blocks keep a dense MLP (DeepSeek-V3: 3).")
    score: Literal["softmax", "sigmoid"] = opt(
        "softmax", "Router score function (Mixtral: softmax; DeepSeek-V3: sigmoid)."
    )
    norm_topk: bool = opt(True, "Renormalize the chosen experts' weights to sum to 1.")
    groups: int = opt(0, "Grouped (node-limited) routing: experts split into this many groups; 0 = off.")
    topk_groups: int = opt(0, "With groups: tokens choose experts from this many groups (best by top-2 score sum).")
    aux_loss_coef: float = opt(0.01, "Switch/GShard load-balancing loss coefficient; 0 = off.")
    aux_loss_scope: Literal["sequence", "micro_batch"] = opt(
        "sequence",
        "Over which tokens the load-balancing loss counts the load: each sequence (DeepSeek-V3's sequence-wise "
        "loss; the same under every data-parallel layout and accumulation) or each rank's micro-batch (Switch; "
        "then the loss depends on how the batch is split).",
    )
    z_loss_coef: float = opt(0.0, "Router z-loss coefficient (mean logsumexp(logits)^2); 0 = off.")
    bias_update_rate: float = opt(
        0.0,
        "Auxiliary-loss-free balancing (DeepSeek-V3): after each step each expert's routing bias moves by this "
        "much towards the mean load (sign of mean - own load); 0 = off.",
    )
    capacity_factor: float = opt(
        0.0, "Cap each expert at ceil(factor * tokens * top_k / experts) per micro-batch; 0 = dropless."
    )

    @property
    def enabled(self) -> bool:
        return self.num_experts > 0

    def is_moe_block(self, index: int) -> bool:
        return self.enabled and index >= self.first_dense and (index - self.first_dense) % self.every == 0


# -- dispatch -------------------------------------------------------------------------------------------


def permute(expert_PK: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Order the routed pairs by expert. expert_NK: each token's chosen experts.

    Returns (order_P, token_P, counts_E): pair indices in expert order (stable), the token of each ordered
    pair, and how many pairs each expert received (zeros included)."""
    flat_P = expert_PK.reshape(-1)
    order_P = torch.argsort(flat_P, stable=True)
    token_P = order_P // expert_PK.shape[-1]
    return order_P, token_P, expert_counts(flat_P, num_experts)


def expert_counts(expert_P: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Pairs per expert along the last dim, zeros included: [..., P] expert ids -> [..., E] counts (bincount,
    but batched, and shaped without reading the data, so meta-safe)."""
    counts = torch.zeros(*expert_P.shape[:-1], num_experts, dtype=torch.long, device=expert_P.device)
    return counts.scatter_add_(-1, expert_P, torch.ones_like(expert_P))


def unpermute(y_PD: torch.Tensor, token_P: torch.Tensor, weight_P: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Sum each token's weighted expert outputs back into token order: out_ND."""
    out_ND = y_PD.new_zeros(num_tokens, y_PD.shape[-1])
    return out_ND.index_add_(0, token_P, y_PD * weight_P.unsqueeze(-1).to(y_PD.dtype))


@functools.cache
def _grouped_mm_works(device_type: str, dtype: torch.dtype) -> bool:
    """Whether torch._grouped_mm runs for this device and dtype (it needs bf16 on some GPUs and builds)."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    try:
        x = torch.zeros(4, 16, device=device_type, dtype=dtype)
        w = torch.zeros(2, 16, 16, device=device_type, dtype=dtype)
        torch._grouped_mm(x, w, offs=torch.tensor([2, 4], device=device_type, dtype=torch.int32))
        return True
    except (RuntimeError, NotImplementedError):
        return False


def grouped_mm(x_PD: torch.Tensor, w_EDF: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
    """Rows of x in expert order times their expert's matrix: [P, D] x [E, D, F] -> [P, F]."""
    if x_PD.device.type == "meta":
        # FLOP counting on meta: every pair through one expert-sized matmul counts the active FLOPs exactly.
        return x_PD @ w_EDF[0]
    # torch._grouped_mm also needs 16-byte aligned row strides (e.g. a width of 4 fp32 or 8 bf16 values).
    aligned = all(t.shape[-1] * t.element_size() % 16 == 0 for t in (x_PD, w_EDF))
    if aligned and _grouped_mm_works(x_PD.device.type, x_PD.dtype):
        offsets = torch.cumsum(counts_E, 0, dtype=torch.int32)
        return torch._grouped_mm(x_PD, w_EDF, offs=offsets)
    chunks = torch.split(x_PD, counts_E.tolist())
    return torch.cat([chunk @ w_EDF[e] for e, chunk in enumerate(chunks)])


# -- modules --------------------------------------------------------------------------------------------


class GroupedExperts(nn.Module):
    """E SwiGLU experts with stacked weights, so FSDP2 shards (and later expert parallel splits) them on dim 0."""

    def __init__(self, num_experts: int, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(num_experts, dim, hidden))  # gate
        self.w3 = nn.Parameter(torch.empty(num_experts, dim, hidden))  # up
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, dim))  # down

    def forward(self, x_PD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """x_PD: rows in expert order; counts_E: rows per expert this rank holds (all E, or E/ep under ep)."""
        w1, w2, w3 = (local_weight(w) for w in (self.w1, self.w2, self.w3))
        gate_PF = grouped_mm(x_PD, w1, counts_E)
        up_PF = grouped_mm(x_PD, w3, counts_E)
        return grouped_mm(F.silu(gate_PF) * up_PF, w2, counts_E)


class MoE(nn.Module):
    def __init__(self, dim: int, hidden: int, cfg: MoEConfig, shared_expert: nn.Module | None):
        super().__init__()
        self.cfg = cfg
        self.router = nn.Linear(dim, cfg.num_experts, bias=False)
        self.experts = GroupedExperts(cfg.num_experts, dim, cfg.expert_hidden or hidden)
        self.shared = shared_expert
        # The auxiliary-loss-free routing bias (changed by update_balancing, not by gradients), and the pairs
        # each expert received since the last optimizer step; both identical on every data-parallel rank
        # once update_balancing has summed the counts.
        self.register_buffer("expert_bias", torch.empty(cfg.num_experts))
        self.register_buffer("tokens_per_expert", torch.empty(cfg.num_experts), persistent=False)
        self.register_buffer("dropped", torch.empty(()), persistent=False)
        # The balancing losses (with their coefficients) summed over this step's forwards, and how many: the
        # logged moe/balancing_loss.
        self.register_buffer("balancing_sum", torch.empty(()), persistent=False)
        self.register_buffer("forwards", torch.empty(()), persistent=False)
        # Pairs per expert since the last evaluation, summed over the ranks: the eval's load heatmap.
        self.register_buffer("load_since_eval", torch.empty(cfg.num_experts), persistent=False)
        # Set by the recipe's parallelize: under context and tensor (sequence) parallel the ranks holding the
        # rest of each sequence; under expert parallel the ranks the experts are split over.
        self.cp_group: torch.distributed.ProcessGroup | None = None
        self.tp_group: torch.distributed.ProcessGroup | None = None
        self.ep_group: torch.distributed.ProcessGroup | None = None

    def route(self, x_ND: torch.Tensor, seq_len: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(expert_NK, weight_NK, losses): each token's experts and weights, and the balancing losses.
        seq_len: tokens per (local part of a) sequence, for the sequence-wise loss; 0 = all N as one."""
        cfg = self.cfg
        logits_NE = self.router(x_ND).float()
        scores_NE = logits_NE.softmax(-1) if cfg.score == "softmax" else logits_NE.sigmoid()
        choice_NE = scores_NE.detach() + self.expert_bias if cfg.bias_update_rate > 0 else scores_NE.detach()
        if cfg.groups:
            choice_NE = _limit_to_groups(choice_NE, cfg.groups, cfg.topk_groups)
        expert_NK = choice_NE.topk(cfg.top_k, dim=-1).indices
        weight_NK = scores_NE.gather(-1, expert_NK)
        if cfg.norm_topk:
            weight_NK = weight_NK / weight_NK.sum(-1, keepdim=True).clamp_min(1e-20)
        losses = logits_NE.new_zeros(())
        if cfg.aux_loss_coef > 0:
            losses = losses + cfg.aux_loss_coef * self._balance_loss(expert_NK, scores_NE, seq_len)
        if cfg.z_loss_coef > 0:
            losses = losses + cfg.z_loss_coef * torch.logsumexp(logits_NE, -1).square().mean()
        if self.tp_group is not None:
            # Each tp rank routed a 1/tp slice of every sequence, and the loss is replicated over tp: the
            # losses of the whole sequences are the mean of the slices' (the balancing loss's load fractions
            # were summed over the slices already).
            losses = _mean_over_replicas(losses, self.tp_group)
        return expert_NK, weight_NK, losses

    def _balance_loss(self, expert_NK: torch.Tensor, scores_NE: torch.Tensor, seq_len: int) -> torch.Tensor:
        """E * sum_e f_e * P_e, per group of tokens (sequences, or the whole micro-batch), averaged over groups."""
        E, K = self.cfg.num_experts, self.cfg.top_k
        group = seq_len if self.cfg.aux_loss_scope == "sequence" and seq_len else expert_NK.shape[0]
        counts_SE = expert_counts(expert_NK.view(-1, group * K), E).float()
        tokens = group
        for ranks in (self.cp_group, self.tp_group):
            if ranks is not None and self.cfg.aux_loss_scope == "sequence":
                # The sequence's other parts are on these ranks: count the whole sequence. Each rank keeps its
                # own tokens' mean score; averaging the loss over the ranks makes it the whole sequence's
                # (over cp: the data-parallel gradient average does; over tp: route does).
                torch.distributed.all_reduce(counts_SE, group=ranks)
                tokens *= torch.distributed.get_world_size(ranks)
        fraction_SE = counts_SE / (tokens * K)
        mean_score_SE = scores_NE.view(-1, group, E).mean(1)
        return E * (fraction_SE * mean_score_SE).sum(-1).mean()

    def forward(self, x_BTD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (output [B, T, D], balancing losses scalar)."""
        B, T, D = x_BTD.shape
        x_ND = x_BTD.reshape(-1, D)
        expert_NK, weight_NK, losses = self.route(x_ND, seq_len=T)
        order_P, token_P, counts_E = permute(expert_NK, self.cfg.num_experts)
        weight_P = weight_NK.reshape(-1)[order_P]
        if self.cfg.capacity_factor > 0 and x_ND.device.type != "meta":
            token_P, weight_P, counts_E = self._drop_over_capacity(token_P, weight_P, counts_E, x_ND.shape[0])
        if _counting(x_ND):
            with torch.no_grad():
                self.tokens_per_expert += counts_E.to(self.tokens_per_expert.dtype)
                self.balancing_sum += losses.detach().to(self.balancing_sum.dtype)
                self.forwards += 1
        if self.ep_group is not None:
            x_QD, local_counts, route = dispatch(x_ND[token_P], counts_E, self.ep_group)
            y_PD = combine(self.experts(x_QD, local_counts), route)
        else:
            y_PD = self.experts(x_ND[token_P], counts_E)
        out_ND = unpermute(y_PD, token_P, weight_P, x_ND.shape[0])
        if self.shared is not None:
            out_ND = out_ND + self.shared(x_ND)
        return out_ND.reshape(B, T, D), losses

    def _drop_over_capacity(
        self, token_P: torch.Tensor, weight_P: torch.Tensor, counts_E: torch.Tensor, num_tokens: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keep each expert's first `capacity` pairs (in token order, as the stable sort left them)."""
        cfg = self.cfg
        capacity = math.ceil(cfg.capacity_factor * num_tokens * cfg.top_k / cfg.num_experts)
        starts_E = torch.cumsum(counts_E, 0) - counts_E
        expert_P = torch.repeat_interleave(torch.arange(cfg.num_experts, device=counts_E.device), counts_E)
        keep_P = (torch.arange(token_P.numel(), device=token_P.device) - starts_E[expert_P]) < capacity
        kept_E = counts_E.clamp(max=capacity)
        if _counting(token_P):
            with torch.no_grad():
                self.dropped += (counts_E - kept_E).sum().to(self.dropped.dtype)
        return token_P[keep_P], weight_P[keep_P], kept_E


def _mean_over_replicas(x: torch.Tensor, group: torch.distributed.ProcessGroup) -> torch.Tensor:
    """The mean of x over the group's ranks as the value, and x / ranks as what backward sees.

    For a loss replicated over tensor-parallel ranks whose terms each rank computed from its own tokens:
    DTensor sums the replicated weights' gradients over the ranks, so each rank back-propagates its 1/ranks
    share, while every rank reports (and adds to its logged loss) the same whole value."""
    share = x / torch.distributed.get_world_size(group)
    total = share.detach().clone()
    torch.distributed.all_reduce(total, group=group)
    return share + (total - share.detach())


def _counting(x: torch.Tensor) -> bool:
    """Whether this forward's expert loads count: only in training (not under no_grad, as in evaluation),
    not on meta (FLOP counting), not when activation checkpointing re-runs it inside backward (counted
    already), not in a pipeline stage's shape inference."""
    recomputing = torch._C._current_graph_task_id() != -1
    training = torch.is_grad_enabled() and x.device.type != "meta"
    return training and not recomputing and not inferring_shapes()


def _limit_to_groups(choice_NE: torch.Tensor, groups: int, topk_groups: int) -> torch.Tensor:
    """Node-limited routing (DeepSeek-V3): keep the experts of each token's best `topk_groups` groups, ranked
    by the sum of their two best scores; the others can no longer be chosen."""
    N, E = choice_NE.shape
    grouped_NGX = choice_NE.view(N, groups, E // groups)
    group_score_NG = grouped_NGX.topk(min(2, E // groups), dim=-1).values.sum(-1)
    keep_NG = torch.zeros_like(group_score_NG, dtype=torch.bool)
    keep_NG.scatter_(1, group_score_NG.topk(topk_groups, dim=-1).indices, True)
    return grouped_NGX.masked_fill(~keep_NG.unsqueeze(-1), float("-inf")).view(N, E)


def relative_load(counts_LE: torch.Tensor) -> torch.Tensor:
    """Each expert's pairs over its block's mean (1 = even): [blocks, experts] -> the same shape."""
    return counts_LE / counts_LE.mean(-1, keepdim=True).clamp_min(1e-9)


# update_balancing's per-stage statistics: combined over pipeline stages by max, or by sum.
_STAGE_MAX = ("max_load", "neg_min_load", "bias_spread")
_STAGE_SUM = ("dropped", "balancing_loss", "tokens_per_expert", "bias_l1", "layers")


@torch.no_grad()
def update_balancing(
    moe_layers: list[MoE],
    groups: list[torch.distributed.ProcessGroup],
    stage_group: torch.distributed.ProcessGroup | None = None,
) -> dict[str, float]:
    """After an optimizer step: sum each layer's expert counts over the ranks that routed other tokens (the
    groups: data-parallel, tensor-parallel), move the routing biases (when auxiliary-loss-free balancing is
    on), reset the counts; returns load metrics. stage_group: under pipeline parallel the other stages,
    which hold the other layers (and maybe none), so the metrics cover the whole model on every rank.

    Metrics: moe/max_load and moe/min_load, the busiest and idlest expert's pairs over its block's mean (1 =
    even; the max is the imbalance ratio); moe/tokens_per_expert, that mean (pairs per expert per block,
    averaged over the blocks); moe/dropped; moe/balancing_loss, the balancing terms the loss added; with
    bias balancing, moe/bias_l1 (sum of |bias|) and moe/bias_spread, the largest difference of a bias
    between ranks (0: every rank routes alike)."""
    stats = dict.fromkeys(_STAGE_SUM, 0.0) | dict.fromkeys(_STAGE_MAX, -math.inf)
    if moe_layers:
        counts_LE = torch.stack([m.tokens_per_expert for m in moe_layers])
        # Per layer: [dropped pairs, summed balancing losses, forwards].
        sums_L3 = torch.stack([torch.stack([m.dropped, m.balancing_sum, m.forwards]) for m in moe_layers])
        if groups:
            both = torch.cat([counts_LE.flatten(), sums_L3.flatten()])
            for group in groups:
                torch.distributed.all_reduce(both, group=group)
            counts_LE, sums_L3 = both[: counts_LE.numel()].view_as(counts_LE), both[counts_LE.numel() :].view(-1, 3)
        for layer, counts_E in zip(moe_layers, counts_LE, strict=True):
            rate = layer.cfg.bias_update_rate
            if rate > 0:
                layer.expert_bias += rate * torch.sign(counts_E.mean() - counts_E)
            layer.load_since_eval += counts_E
            for counter in (layer.tokens_per_expert, layer.dropped, layer.balancing_sum, layer.forwards):
                counter.zero_()
        load_LE = relative_load(counts_LE)
        stats.update(
            max_load=float(load_LE.max()),
            neg_min_load=float(-load_LE.min()),
            dropped=float(sums_L3[:, 0].sum()),
            # Each layer's balancing loss averaged over the forwards (micro-batches, ranks), summed over layers.
            balancing_loss=float((sums_L3[:, 1] / sums_L3[:, 2].clamp_min(1)).sum()),
            tokens_per_expert=float(counts_LE.mean(-1).sum()),
            layers=float(len(moe_layers)),
        )
        if any(layer.cfg.bias_update_rate > 0 for layer in moe_layers):
            biases = torch.cat([layer.expert_bias for layer in moe_layers])
            stats["bias_l1"], stats["bias_spread"] = float(biases.abs().sum()), 0.0
            if groups:  # the largest and the negated smallest value of each bias over the ranks
                extremes = torch.cat([biases, -biases])
                for group in groups:
                    torch.distributed.all_reduce(extremes, op=torch.distributed.ReduceOp.MAX, group=group)
                stats["bias_spread"] = float((extremes[: biases.numel()] + extremes[biases.numel() :]).max())
    if stage_group is not None:
        maxima = torch.tensor([stats[k] for k in _STAGE_MAX], dtype=torch.float64)
        sums = torch.tensor([stats[k] for k in _STAGE_SUM], dtype=torch.float64)
        torch.distributed.all_reduce(maxima, op=torch.distributed.ReduceOp.MAX, group=stage_group)
        torch.distributed.all_reduce(sums, group=stage_group)
        stats = dict(zip(_STAGE_MAX, maxima.tolist(), strict=True)) | dict(zip(_STAGE_SUM, sums.tolist(), strict=True))
    if stats["layers"] == 0:  # no MoE layer anywhere
        return {}
    metrics = {
        "moe/max_load": stats["max_load"],
        "moe/min_load": -stats["neg_min_load"],
        "moe/tokens_per_expert": stats["tokens_per_expert"] / stats["layers"],
        "moe/dropped": stats["dropped"],
        "moe/balancing_loss": stats["balancing_loss"],
    }
    if stats["bias_spread"] > -math.inf:
        metrics |= {"moe/bias_l1": stats["bias_l1"], "moe/bias_spread": stats["bias_spread"]}
    return metrics


def load_heatmap(rows: dict[int, torch.Tensor], cell: int = 12) -> torch.Tensor:
    """Blocks x experts image (HWC uint8) of each expert's load over its block's mean: white = the mean,
    red up to 2x and more, blue down to 0. rows: block index -> pairs per expert."""
    blocks = sorted(rows)
    counts_LE = torch.stack([rows[b].float().cpu() for b in blocks])
    load_LE = relative_load(counts_LE).clamp(0, 2)
    over, under = (load_LE - 1).clamp_min(0), (1 - load_LE).clamp_min(0)  # each in [0, 1]
    # white (1, 1, 1) -> red (1, 0, 0) above the mean; white -> blue (0, 0, 1) below it.
    rgb_LE3 = torch.stack([1 - under, 1 - over - under, 1 - over], dim=-1)
    image = rgb_LE3.repeat_interleave(cell, 0).repeat_interleave(cell, 1)
    return (image * 255).round().to(torch.uint8)


def active_parameters(model: nn.Module, cfg: object) -> int:
    """Parameters one token uses: all, less the experts it is not routed to (num_experts - top_k per block)."""
    total = sum(p.numel() for p in model.parameters())
    for layer in (m for m in model.modules() if isinstance(m, MoE)):
        per_expert = sum(w[0].numel() for w in (layer.experts.w1, layer.experts.w2, layer.experts.w3))
        total -= (layer.cfg.num_experts - layer.cfg.top_k) * per_expert
    return total
