"""TopKRouter against hand-worked examples: scores, ties, groups, bias, scaling, masks, losses, balancing."""

from __future__ import annotations

import math

import pytest
import torch

import leanmoe
from tests.helpers import assert_close


def router_with_logits(logits_TE: torch.Tensor, **cfg) -> tuple[leanmoe.TopKRouter, torch.Tensor]:
    """A router whose weight is the identity, so x = logits gives exactly those logits."""
    T, E = logits_TE.shape
    config = leanmoe.MoEConfig(dim=E, hidden_dim=4, num_experts=E, **cfg)
    router = leanmoe.TopKRouter(config)
    with torch.no_grad():
        router.weight.copy_(torch.eye(E))
    return router, logits_TE.clone()


def test_softmax_topk_renormalised():
    router, x = router_with_logits(torch.tensor([[1.0, 3.0, 2.0, 0.0]]), top_k=2)
    out = router(x)
    assert out.topk_ids_TK.tolist() == [[1, 2]]
    p = torch.softmax(x, -1)[0]
    expected = torch.stack([p[1], p[2]]) / (p[1] + p[2])
    assert_close(out.topk_weights_TK[0], expected, tol=1e-6)


def test_softmax_without_renormalisation_and_route_scale():
    router, x = router_with_logits(torch.tensor([[1.0, 3.0, 2.0, 0.0]]), top_k=2, norm_topk_prob=False,
                                   route_scale=2.5)
    p = torch.softmax(x, -1)[0]
    assert_close(router(x).topk_weights_TK[0], 2.5 * torch.stack([p[1], p[2]]), tol=1e-6)


def test_sigmoid_scores():
    router, x = router_with_logits(torch.tensor([[0.5, -1.0, 2.0]]), top_k=1, score_func="sigmoid",
                                   norm_topk_prob=False)
    out = router(x)
    assert out.topk_ids_TK.tolist() == [[2]]
    assert out.topk_weights_TK.item() == pytest.approx(1 / (1 + math.exp(-2.0)), rel=1e-6)


def test_ties_break_toward_lower_index():
    # Every score equal: the first K experts win, in order, every time.
    router, x = router_with_logits(torch.zeros(5, 8), top_k=3)
    assert router(x).topk_ids_TK.tolist() == [[0, 1, 2]] * 5
    router, x = router_with_logits(torch.tensor([[0.0, 2.0, 1.0, 2.0, 1.0]]), top_k=3)
    assert router(x).topk_ids_TK.tolist() == [[1, 3, 2]]


def test_grouped_topk_keeps_best_groups():
    # 8 experts in 4 groups of 2; a group scores the sum of its top-2: groups 0..3 -> 0.2, 1.1, 1.6, 0.85.
    # topk_group=2 keeps groups 2 and 1, so expert 7 (0.8, second best overall) is dropped with its group:
    # plain top-3 would be [4, 7, 5], node-limited top-3 is [4, 5, 2].
    scores = torch.tensor([[0.1, 0.1, 0.6, 0.5, 0.9, 0.7, 0.05, 0.8]])
    logits = torch.log(scores / (1 - scores))  # sigmoid(logits) = scores
    router, x = router_with_logits(logits, top_k=3, score_func="sigmoid")
    assert router(x).topk_ids_TK.tolist() == [[4, 7, 5]]
    router, x = router_with_logits(logits, top_k=3, score_func="sigmoid", n_group=4, topk_group=2)
    assert router(x).topk_ids_TK.tolist() == [[4, 5, 2]]


def test_balance_bias_selects_but_does_not_weigh():
    router, x = router_with_logits(torch.tensor([[2.0, 1.0, 0.0]]), top_k=1, score_func="sigmoid",
                                   norm_topk_prob=False, balance_bias=True)
    router.expert_bias.copy_(torch.tensor([0.0, 0.0, 5.0]))
    out = router(x)
    assert out.topk_ids_TK.tolist() == [[2]]
    assert out.topk_weights_TK.item() == pytest.approx(0.5)  # sigmoid(0): the unbiased score


def test_token_mask_zeroes_weights_counts_and_losses():
    router, x = router_with_logits(torch.randn(6, 4), top_k=2, aux_loss_coef=1.0)
    mask = torch.tensor([True, False, True, True, False, True])
    out = router(x, mask)
    assert (out.topk_weights_TK[~mask] == 0).all()
    assert out.tokens_per_expert_E.sum().item() == 2 * int(mask.sum())
    kept, _ = router_with_logits(x[mask], top_k=2, aux_loss_coef=1.0)
    assert_close(out.aux_loss, kept(x[mask]).aux_loss, tol=1e-6)


def test_tokens_per_expert_counts():
    router, x = router_with_logits(torch.tensor([[3.0, 2.0, 0.0, 1.0], [0.0, 3.0, 2.0, 1.0]]), top_k=2)
    assert router(x).tokens_per_expert_E.tolist() == [1, 2, 1, 0]


def test_aux_and_z_loss_by_hand():
    logits = torch.tensor([[2.0, 0.0, 1.0], [0.0, 1.0, 3.0]])
    router, x = router_with_logits(logits, top_k=1, aux_loss_coef=0.1)
    p = torch.softmax(logits, -1)
    f = torch.tensor([0.5, 0.0, 0.5])  # token 0 -> expert 0, token 1 -> expert 2
    expected = 0.1 * 3 * (f * p.mean(0)).sum()
    assert_close(router(x).aux_loss, expected, tol=1e-6)
    router, x = router_with_logits(logits, top_k=1, z_loss_coef=0.01)
    assert_close(router(x).aux_loss, 0.01 * torch.logsumexp(logits, -1).square().mean(), tol=1e-6)


def test_router_runs_in_fp32_for_bf16_inputs():
    router, x = router_with_logits(torch.randn(4, 6), top_k=2)
    router = router.to(torch.bfloat16)
    out = router(x.bfloat16())
    assert out.logits_TE.dtype == torch.float32 and out.topk_weights_TK.dtype == torch.float32


def test_router_bias_is_added_to_logits():
    config = leanmoe.MoEConfig(dim=3, hidden_dim=4, num_experts=3, top_k=1, router_bias=True)
    router = leanmoe.TopKRouter(config)
    with torch.no_grad():
        router.weight.zero_()
        router.bias.copy_(torch.tensor([0.0, 1.0, 0.5]))
    assert router(torch.randn(2, 3)).topk_ids_TK.tolist() == [[1], [1]]


def test_balance_bias_update_moves_toward_underloaded_experts():
    router, x = router_with_logits(torch.tensor([[3.0, 2.0, 1.0, 0.0]] * 4), top_k=1, balance_bias=True,
                                   balance_bias_rate=0.1)
    router.train()
    router(x)  # all load on expert 0
    assert router.update_balance_bias()
    assert_close(router.expert_bias, torch.tensor([-0.1, 0.1, 0.1, 0.1]), tol=1e-6)
    assert router.expert_load.sum() == 0
    router.eval()
    router(x)
    assert router.expert_load.sum() == 0  # eval forwards do not accumulate
    assert not router.update_balance_bias()  # and never update
    assert_close(router.expert_bias, torch.tensor([-0.1, 0.1, 0.1, 0.1]), tol=1e-6)


def test_update_balance_biases_over_a_model():
    cfg = leanmoe.MoEConfig(dim=8, hidden_dim=4, num_experts=4, top_k=2, balance_bias=True)
    model = torch.nn.Sequential(leanmoe.MoE(cfg), leanmoe.MoE(cfg))
    model(torch.randn(5, 8))
    assert leanmoe.update_balance_biases(model) == 2
