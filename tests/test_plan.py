"""plan_experts: routed rows sorted by expert, with and without a token mask, against hand-worked expectations.

Legend: T tokens, K top-k, R routed rows (T*K), E experts.
"""

from __future__ import annotations

import pytest
import torch

from leanmoe.experts.plan import (
    combine,
    combine_routed,
    expert_counts,
    plan_experts,
    sorted_experts_from_offsets,
    sum_per_token,
    valid_rows,
)


def test_plan_without_mask():
    # T=3, K=2, E=4: rows hold experts [3, 0, 1, 2, 0, 1]; stable sort: e0 rows 1, 4; e1 rows 2, 5; e2 3; e3 0.
    plan = plan_experts(torch.tensor([[3, 0], [1, 2], [0, 1]]), 4)
    assert plan.sorted_rows_R.tolist() == [1, 4, 2, 5, 3, 0]
    assert plan.sorted_tokens_R.tolist() == [0, 2, 1, 2, 1, 0]
    assert plan.sorted_experts_R.tolist() == [0, 0, 1, 1, 2, 3]
    assert plan.counts_E.tolist() == [2, 2, 1, 1]
    assert plan.offsets_E.tolist() == [2, 4, 5, 6] and plan.offsets_E.dtype == torch.int32
    assert plan.num_kept.tolist() == [6]
    assert plan.valid_R().all()
    assert plan.inverse_R().tolist() == [5, 0, 2, 4, 1, 3]


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32], ids=["int64", "int32"])
def test_plan_masked_rows_sort_last(dtype):
    # Same ids, token 1 masked: its rows 2 (e1) and 3 (e2) go last, in row order; e2 is left with no rows.
    ids = torch.tensor([[3, 0], [1, 2], [0, 1]], dtype=dtype)
    plan = plan_experts(ids, 4, token_mask_T=torch.tensor([True, False, True]))
    assert plan.sorted_rows_R.tolist() == [1, 4, 5, 0, 2, 3]
    assert plan.sorted_tokens_R.tolist() == [0, 2, 2, 0, 1, 1]
    assert plan.counts_E.tolist() == [2, 1, 0, 1]
    assert plan.offsets_E.tolist() == [2, 3, 3, 4]
    assert plan.num_kept.tolist() == [4]
    assert plan.valid_R().tolist() == [True] * 4 + [False] * 2
    # Masked positions hold E-1 so indexing stays in range; the column stays non-decreasing.
    assert plan.sorted_experts_R.tolist() == [0, 0, 1, 3, 3, 3]
    inv = plan.inverse_R()
    assert sorted(inv.tolist()) == list(range(6))
    assert torch.equal(plan.sorted_rows_R[inv], torch.arange(6))


def test_plan_all_masked():
    plan = plan_experts(torch.tensor([[1, 0], [0, 1]]), 3, token_mask_T=torch.zeros(2, dtype=torch.bool))
    assert plan.counts_E.tolist() == [0, 0, 0]
    assert plan.offsets_E.tolist() == [0, 0, 0]
    assert plan.sorted_rows_R.tolist() == [0, 1, 2, 3]
    assert not plan.valid_R().any()
    assert sorted(plan.inverse_R().tolist()) == [0, 1, 2, 3]


def test_plan_no_tokens_with_mask():
    plan = plan_experts(torch.empty(0, 2, dtype=torch.int64), 5, token_mask_T=torch.empty(0, dtype=torch.bool))
    assert plan.sorted_rows_R.numel() == 0 and plan.counts_E.tolist() == [0] * 5 and plan.num_kept.tolist() == [0]
    assert plan.inverse_R().numel() == 0


@pytest.mark.parametrize("seed", range(4))
def test_plan_random_mask_matches_filtered_sort(seed):
    # The kept prefix equals the plan of the kept rows alone; counts equal a per-expert count of kept rows.
    gen = torch.Generator().manual_seed(seed)
    T, K, E = 37, 3, 7  # prime E, T not a multiple of anything
    ids = torch.rand(T, E, generator=gen).topk(K, dim=-1).indices
    mask = torch.rand(T, generator=gen) < 0.6
    plan = plan_experts(ids, E, token_mask_T=mask)
    kept_rows = torch.arange(T * K).view(T, K)[mask].reshape(-1)
    kept_ids = ids[mask].reshape(-1)
    order = torch.sort(kept_ids, stable=True).indices
    n = int(mask.sum()) * K
    assert plan.num_kept.item() == n
    assert torch.equal(plan.sorted_rows_R[:n], kept_rows[order])
    assert torch.equal(plan.sorted_experts_R[:n], kept_ids[order])
    assert torch.equal(plan.counts_E, torch.bincount(kept_ids, minlength=E))
    masked_rows = torch.arange(T * K).view(T, K)[~mask].reshape(-1)
    assert torch.equal(plan.sorted_rows_R[n:], masked_rows)
    assert torch.equal(plan.sorted_rows_R[plan.inverse_R()], torch.arange(T * K))


@pytest.mark.parametrize(("mask", "exc", "match"), [
    ([1, 0, 1], TypeError, r"token_mask must be a bool tensor \(True = keep\), got dtype torch.int64"),
    ([True, False], ValueError, r"token_mask must have shape \[3\] .*got \[2\]"),
    ([[True], [False], [True]], ValueError, r"token_mask must have shape \[3\] .*got \[3, 1\]"),
], ids=["int-mask", "short-mask", "2d-mask"])
def test_plan_rejects_bad_masks(mask, exc, match):
    with pytest.raises(exc, match=match):
        plan_experts(torch.zeros(3, 2, dtype=torch.int64), 4, token_mask_T=torch.tensor(mask))


def test_plan_rejects_non_tensor_mask():
    with pytest.raises(TypeError, match=r"token_mask must be a bool tensor of shape \[3\] or None, got list"):
        plan_experts(torch.zeros(3, 2, dtype=torch.int64), 4, token_mask_T=[True, True, True])


@pytest.mark.parametrize("T,E,masked", [(13, 7, 5), (9, 4, 0), (6, 3, 6), (0, 5, 0)],
                         ids=["masked", "unmasked", "all_masked", "no_tokens"])
def test_offsets_alone_give_the_plans_experts_and_valid_rows(T, E, masked):
    """What a backward that kept only ``offsets_E`` rebuilds equals the plan's own fields (experts with no rows
    included: expert ids drawn from half the experts)."""
    K = 2
    gen = torch.Generator().manual_seed(T + E)
    ids = torch.stack([torch.randperm(E // 2 + 1, generator=gen)[:K] for _ in range(T)]) if T else \
        torch.empty(0, K, dtype=torch.int64)
    mask = torch.ones(T, dtype=torch.bool)
    mask[:masked] = False
    plan = plan_experts(ids, E, mask if masked else None)
    R = T * K
    assert torch.equal(valid_rows(plan.offsets_E, R), plan.valid_R())
    assert torch.equal(sorted_experts_from_offsets(plan.offsets_E, R), plan.sorted_experts_R.long())


def test_expert_counts_match_the_plan():
    # Rows hold experts [3, 0, 1, 2, 0, 1]; token 1 (rows 2, 3) masked.
    ids = torch.tensor([[3, 0], [1, 2], [0, 1]])
    assert expert_counts(ids, 4).tolist() == [2, 2, 1, 1]
    mask = torch.tensor([True, False, True])
    assert expert_counts(ids, 4, mask).tolist() == [2, 1, 0, 1]
    assert torch.equal(expert_counts(ids, 4, mask), plan_experts(ids, 4, mask).counts_E)
    assert expert_counts(torch.empty(0, 3, dtype=torch.int64), 5).tolist() == [0] * 5


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32], ids=["int64", "int32"])
def test_plan_drops_invalid_ids_like_masked_rows(dtype):
    # E=3; rows hold [2, 3, -1, 0, 1, 0]: rows 1 (id E, Hugging Face's EP sentinel) and 2 (id -1) are in no count
    # and sort last in row order; with token 2 masked, its rows 4 and 5 join them.
    ids = torch.tensor([[2, 3], [-1, 0], [1, 0]], dtype=dtype)
    plan = plan_experts(ids, 3, drop_invalid_ids=True)
    assert plan.sorted_rows_R.tolist() == [3, 5, 4, 0, 1, 2]
    assert plan.sorted_tokens_R.tolist() == [1, 2, 2, 0, 0, 1]
    assert plan.sorted_experts_R.tolist() == [0, 0, 1, 2, 2, 2]  # clamped to E-1 past the kept rows
    assert plan.counts_E.tolist() == [2, 1, 1] and plan.offsets_E.tolist() == [2, 3, 4]
    assert expert_counts(ids, 3, drop_invalid_ids=True).tolist() == [2, 1, 1]
    masked = plan_experts(ids, 3, torch.tensor([True, True, False]), drop_invalid_ids=True)
    assert masked.sorted_rows_R.tolist() == [3, 0, 1, 2, 4, 5]
    assert masked.counts_E.tolist() == [1, 0, 1]
    assert masked.valid_R().tolist() == [True, True, False, False, False, False]


def test_unsort_and_sum_per_token():
    # Sorted order [1, 4, 2, 5, 3, 0] (test_plan_without_mask); row r holds value 10 * r in routed order.
    plan = plan_experts(torch.tensor([[3, 0], [1, 2], [0, 1]]), 4)
    sorted_R = torch.tensor([10.0, 40.0, 20.0, 50.0, 30.0, 0.0])
    assert plan.unsort_R(sorted_R).tolist() == [0.0, 10.0, 20.0, 30.0, 40.0, 50.0]
    assert plan.unsort_rows(sorted_R).tolist() == [0.0, 10.0, 20.0, 30.0, 40.0, 50.0]
    rows_RX = torch.stack([sorted_R, -sorted_R], 1)
    assert plan.unsort_rows(rows_RX)[:, 1].tolist() == [-0.0, -10.0, -20.0, -30.0, -40.0, -50.0]
    # Token t sums rows 2t and 2t+1: 0+10, 20+30, 40+50.
    assert sum_per_token(rows_RX, plan, 3, 2).tolist() == [[10.0, -10.0], [50.0, -50.0], [90.0, -90.0]]
    assert sum_per_token(torch.empty(0, 4), plan_experts(torch.empty(0, 2, dtype=torch.int64), 3), 0, 2).shape \
        == (0, 4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_combine_is_the_weighted_sum_over_k(dtype):
    gen = torch.Generator().manual_seed(0)
    T, K, E, D = 11, 3, 5, 4  # prime E, T not a multiple of K
    ids = torch.rand(T, E, generator=gen).topk(K, dim=-1).indices
    plan = plan_experts(ids, E)
    out_RD = torch.randn(T * K, D, generator=gen).to(dtype)  # sorted order
    weights_TK = torch.rand(T, K, generator=gen)  # fp32, cast to out's dtype like the backends do
    y_TD = combine(out_RD, plan, weights_TK)
    assert y_TD.dtype == dtype and y_TD.shape == (T, D)
    routed_RD = torch.empty_like(out_RD)
    routed_RD[plan.sorted_rows_R] = out_RD
    ref_TD = (weights_TK.to(dtype).float()[:, :, None] * routed_RD.float().view(T, K, D)).sum(1)
    tol = 1e-6 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(y_TD.float(), ref_TD, atol=tol, rtol=tol)
    assert torch.equal(combine_routed(plan.unsort_rows(out_RD).view(T, K, D), weights_TK), y_TD)


def test_combine_with_no_tokens():
    plan = plan_experts(torch.empty(0, 2, dtype=torch.int64), 4)
    assert combine(torch.empty(0, 3), plan, torch.empty(0, 2)).shape == (0, 3)


@pytest.mark.parametrize("ep_size", [0, 3, 2.0, True], ids=["zero", "not-a-divisor", "float", "bool"])
def test_per_rank_rejects_bad_ep_size(ep_size):
    with pytest.raises(ValueError, match=r"ep_size: expected a positive int that divides num_experts=4, got"):
        plan_experts(torch.zeros(2, 1, dtype=torch.int64), 4).per_rank(ep_size)
