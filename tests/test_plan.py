"""plan_experts: routed rows sorted by expert, with and without a token mask, against hand-worked expectations.

Legend: T tokens, K top-k, R routed rows (T*K), E experts.
"""

from __future__ import annotations

import pytest
import torch

from leanmoe.experts.plan import plan_experts


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
    ([1, 0, 1], TypeError, r"token_mask: expected dtype torch.bool, got torch.int64"),
    ([True, False], ValueError, r"token_mask: expected shape \[3\] .*got \[2\]"),
    ([[True], [False], [True]], ValueError, r"token_mask: expected shape \[3\] .*got \[3, 1\]"),
], ids=["int-mask", "short-mask", "2d-mask"])
def test_plan_rejects_bad_masks(mask, exc, match):
    with pytest.raises(exc, match=match):
        plan_experts(torch.zeros(3, 2, dtype=torch.int64), 4, token_mask_T=torch.tensor(mask))


def test_plan_rejects_non_tensor_mask():
    with pytest.raises(TypeError, match=r"token_mask: expected a bool tensor .* got list"):
        plan_experts(torch.zeros(3, 2, dtype=torch.int64), 4, token_mask_T=[True, True, True])
