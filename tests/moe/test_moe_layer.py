"""The MoE layer's pieces against plain references (scaletrain/recipes/gpt/moe.py)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from scaletrain.recipes.gpt.moe import MoE, MoEConfig, expert_counts, grouped_mm, permute, unpermute, update_balancing


def _moe(**overrides) -> MoE:
    cfg = MoEConfig(**{"num_experts": 4, "top_k": 2, **overrides})
    torch.manual_seed(0)
    layer = MoE(dim=8, hidden=16, cfg=cfg, shared_expert=None)
    for tensor in layer.parameters():
        torch.nn.init.normal_(tensor, std=0.3)
    for buffer in layer.buffers():
        buffer.zero_()
    return layer


def test_permute_then_unpermute_gives_every_token_back():
    expert_NK = torch.tensor([[2, 0], [1, 2], [3, 1], [2, 3], [0, 1]])
    x_ND = torch.randn(5, 3)
    order_P, token_P, counts_E = permute(expert_NK, num_experts=4)
    assert counts_E.tolist() == [2, 3, 3, 2]
    # In expert order; within an expert, in token order (the sort is stable).
    assert expert_NK.reshape(-1)[order_P].tolist() == [0, 0, 1, 1, 1, 2, 2, 2, 3, 3]
    assert token_P.tolist() == [0, 4, 1, 2, 4, 0, 1, 3, 2, 3]
    # Weight 1/K each: the weighted sum of identical copies is the token itself.
    back_ND = unpermute(x_ND[token_P], token_P, torch.full((10,), 0.5), num_tokens=5)
    torch.testing.assert_close(back_ND, x_ND)


def test_expert_counts_include_empty_experts():
    assert expert_counts(torch.tensor([3, 3, 0]), 5).tolist() == [1, 0, 0, 2, 0]


@pytest.mark.parametrize("counts", [[3, 0, 4, 1], [0, 0, 8, 0], [2, 2, 2, 2]], ids=["uneven", "one_expert", "even"])
@pytest.mark.parametrize("width", [8, 6], ids=["grouped_mm", "unaligned_fallback"])
def test_grouped_gemm_equals_a_loop_over_experts(counts, width):
    torch.manual_seed(0)
    counts_E = torch.tensor(counts)
    x_PD = torch.randn(int(counts_E.sum()), width, requires_grad=True)
    w_EDF = torch.randn(4, width, width, requires_grad=True)
    y = grouped_mm(x_PD, w_EDF, counts_E)
    ref = torch.cat([chunk @ w_EDF[e] for e, chunk in enumerate(torch.split(x_PD, counts))])
    torch.testing.assert_close(y, ref)
    grads = torch.autograd.grad(y.square().sum(), (x_PD, w_EDF))
    ref_grads = torch.autograd.grad(ref.square().sum(), (x_PD, w_EDF))
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want)


def test_all_experts_with_a_uniform_router_is_the_dense_mixture():
    """top_k = num_experts and a zero router (uniform softmax): the layer is the mean of the experts."""
    layer = _moe(top_k=4, aux_loss_coef=0.0)
    torch.nn.init.zeros_(layer.router.weight)
    x_BTD = torch.randn(2, 3, 8)
    out_BTD, _ = layer(x_BTD)
    e = layer.experts
    experts = [F.silu(x_BTD @ e.w1[i]) * (x_BTD @ e.w3[i]) @ e.w2[i] for i in range(4)]
    torch.testing.assert_close(out_BTD, torch.stack(experts).mean(0))


def test_switch_aux_loss_is_one_at_perfect_balance_and_e_at_collapse():
    layer = _moe(top_k=1, aux_loss_coef=1.0)
    x = torch.randn(1, 8, 8)
    torch.nn.init.zeros_(layer.router.weight)  # uniform scores; top-1 ties go to expert 0: all load there
    _, loss = layer(x)
    # f = (1, 0, 0, 0), P = (1/4, ...): E * sum f P = 4 * 1/4 = 1 ... collapse shows in f, not in P
    assert math.isclose(float(loss.detach()), 1.0, rel_tol=1e-6)
    with torch.no_grad():  # strongly prefer one expert: P -> (1, 0, 0, 0) too
        layer.router.weight.zero_()
        layer.router.weight[0].fill_(10.0)
    _, loss = layer(torch.ones(1, 8, 8))
    assert float(loss.detach()) == pytest.approx(4.0, rel=1e-3)


def test_capacity_factor_drops_exactly_the_counted_pairs():
    layer = _moe(top_k=1, capacity_factor=1.0, aux_loss_coef=0.0)
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[2].fill_(5.0)  # every token prefers expert 2
    x = torch.ones(1, 8, 8) + 0.01 * torch.randn(1, 8, 8)
    out, _ = layer(x)
    capacity = math.ceil(1.0 * 8 * 1 / 4)  # 2 pairs per expert
    assert float(layer.dropped) == 8 - capacity
    assert float(layer.tokens_per_expert.sum()) == capacity
    # The dropped tokens get no expert output (zero: no shared expert here); the kept ones do.
    kept = (out.reshape(8, 8).abs().sum(-1) > 0).tolist()
    assert kept == [True, True] + [False] * 6


def test_aux_loss_free_bias_moves_towards_the_mean_load_and_steers_the_choice():
    layer = _moe(top_k=1, aux_loss_coef=0.0, bias_update_rate=0.5)
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[1].fill_(0.1)  # a slight preference for expert 1
    x = torch.ones(1, 6, 8)
    layer(x)
    assert layer.tokens_per_expert.tolist() == [0, 6, 0, 0]
    metrics = update_balancing([layer], groups=[])
    assert metrics["moe/max_load"] == pytest.approx(4.0) and metrics["moe/min_load"] == 0.0
    assert layer.expert_bias.tolist() == [0.5, -0.5, 0.5, 0.5]  # the loaded expert down, the idle ones up
    assert layer.tokens_per_expert.sum() == 0  # counts reset for the next step
    # The bias changed the choice, not the weights: the routed weight is still the softmax score.
    expert_NK, weight_NK, _ = layer.route(x.reshape(6, 8))
    assert set(expert_NK.flatten().tolist()) != {1}
    scores = layer.router(x.reshape(6, 8)).softmax(-1)
    torch.testing.assert_close(weight_NK, torch.ones_like(weight_NK))  # norm_topk with top-1
    assert scores.argmax(-1).tolist() == [1] * 6


def test_grouped_routing_chooses_only_from_the_best_groups():
    layer = _moe(num_experts=8, top_k=2, groups=4, topk_groups=1, aux_loss_coef=0.0)
    scores = torch.tensor([[0.9, 0.0, 0.5, 0.5, 0.0, 0.0, 0.0, 0.0]])  # group 1 (experts 2, 3) sums highest
    from scaletrain.recipes.gpt.moe import _limit_to_groups

    limited = _limit_to_groups(scores, groups=4, topk_groups=1)
    assert limited.topk(2).indices.sort().values.tolist() == [[2, 3]]
    del layer


def test_recomputation_does_not_count_twice():
    from torch.utils.checkpoint import checkpoint

    layer = _moe(aux_loss_coef=0.0)
    x = torch.randn(1, 5, 8, requires_grad=True)
    out, _ = checkpoint(layer, x, use_reentrant=False)
    out.sum().backward()
    assert float(layer.tokens_per_expert.sum()) == 5 * 2
