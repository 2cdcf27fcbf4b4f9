"""Expert-parallel index logic on the CPU, against hand-worked expectations (no process group needed).

Legend: T tokens, K top-k, E experts, P ranks, L experts per rank, R routed rows (T*K), S received rows.
"""

from __future__ import annotations

import pytest
import torch

from leanmoe.experts.plan import combine
from leanmoe.parallel.expert_parallel import plan_dispatch, received_expert_ids


def test_plan_sorts_rows_by_expert_and_counts_per_rank():
    # T=3, K=2, E=4 over P=2 ranks (L=2): rank 0 owns experts 0-1, rank 1 owns experts 2-3.
    topk_ids_TK = torch.tensor([[3, 0], [1, 2], [0, 1]])
    plan = plan_dispatch(topk_ids_TK, num_experts=4, ep_size=2)
    # Routed rows r = t*K + k hold experts [3, 0, 1, 2, 0, 1]; a stable sort by expert gives
    # expert 0: rows 1, 4; expert 1: rows 2, 5; expert 2: row 3; expert 3: row 0.
    assert plan.sorted_rows_R.tolist() == [1, 4, 2, 5, 3, 0]
    assert plan.send_counts_PL.tolist() == [[2, 2], [1, 1]]
    # Tokens of the sorted rows (what the all-to-all sends, in order): rank 0 gets tokens 0, 2, 1, 2.
    assert (plan.sorted_rows_R // 2).tolist() == [0, 2, 1, 2, 1, 0]
    # inverse_R undoes the sort: sorted position of rows 0..5.
    assert plan.inverse_R().tolist() == [5, 0, 2, 4, 1, 3]


def test_plan_keeps_token_order_within_an_expert():
    # Every row on expert 2 (rank 1 of P=2, E=4): stability keeps token order 0, 1, 2, 3.
    plan = plan_dispatch(torch.tensor([[2], [2], [2], [2]]), num_experts=4, ep_size=2)
    assert plan.sorted_rows_R.tolist() == [0, 1, 2, 3]
    assert plan.send_counts_PL.tolist() == [[0, 0], [4, 0]]


def test_plan_with_no_tokens():
    # A rank with no tokens sends nothing, but still takes part with all-zero counts.
    plan = plan_dispatch(torch.empty(0, 2, dtype=torch.int64), num_experts=8, ep_size=4)
    assert plan.sorted_rows_R.tolist() == []
    assert plan.send_counts_PL.tolist() == [[0, 0]] * 4
    assert plan.inverse_R().tolist() == []


def test_plan_four_ranks_int32_ids():
    # E=8 over P=4 (L=2); int32 ids as some routers give. Experts per row: [7, 2, 5, 2, 0, 6].
    topk_ids_TK = torch.tensor([[7, 2], [5, 2], [0, 6]], dtype=torch.int32)
    plan = plan_dispatch(topk_ids_TK, num_experts=8, ep_size=4)
    # expert 0: row 4; expert 2: rows 1, 3; expert 5: row 2; expert 6: row 5; expert 7: row 0.
    assert plan.sorted_rows_R.tolist() == [4, 1, 3, 2, 5, 0]
    assert plan.send_counts_PL.tolist() == [[1, 0], [2, 0], [0, 1], [1, 1]]


def test_received_expert_ids_follow_source_then_local_expert():
    # P=2 sources, L=3 local experts. Source 0 sent 2 rows to expert 0 and 1 to expert 2; source 1 sent 1 row to
    # expert 1 and 2 to expert 2. Rows arrive source by source, each source's rows sorted by local expert.
    recv_counts_PL = torch.tensor([[2, 0, 1], [0, 1, 2]])
    assert received_expert_ids(recv_counts_PL, 6).tolist() == [0, 0, 2, 1, 2, 2]


def test_received_expert_ids_when_nothing_arrives():
    assert received_expert_ids(torch.zeros(3, 2, dtype=torch.int64), 0).tolist() == []


def test_plan_and_received_ids_round_trip_without_communication():
    # With P=1 (no exchange), what rank 0 receives is what it sent: local ids = sorted global ids.
    gen = torch.Generator().manual_seed(0)
    topk_ids_TK = torch.stack([torch.randperm(6, generator=gen)[:3] for _ in range(11)])
    plan = plan_dispatch(topk_ids_TK, num_experts=6, ep_size=1)
    ids_S = received_expert_ids(plan.send_counts_PL, topk_ids_TK.numel())
    assert ids_S.tolist() == topk_ids_TK.reshape(-1)[plan.sorted_rows_R].tolist()


def test_plan_sends_no_rows_for_masked_tokens():
    # T=4, K=2, E=4 over P=2 (L=2); token 1 is masked. Rows r = t*K + k hold experts [3, 0, 1, 2, 0, 1, 2, 3];
    # rows 2 and 3 (token 1) sort last, in row order, and are in no count.
    topk_ids_TK = torch.tensor([[3, 0], [1, 2], [0, 1], [2, 3]])
    mask_T = torch.tensor([True, False, True, True])
    plan = plan_dispatch(topk_ids_TK, num_experts=4, ep_size=2, token_mask_T=mask_T)
    # expert 0: rows 1, 4; expert 1: row 5; expert 2: row 6; expert 3: rows 0, 7; then masked rows 2, 3.
    assert plan.sorted_rows_R.tolist() == [1, 4, 5, 6, 0, 7, 2, 3]
    assert plan.send_counts_PL.tolist() == [[2, 1], [1, 2]]  # 6 rows sent: K for each of the 3 kept tokens
    assert plan.inverse_R().tolist() == [4, 0, 6, 7, 1, 2, 3, 5]


def test_plan_with_every_token_masked():
    # Nothing is sent, but the rank still takes part with all-zero counts; every row sorts past the (empty) kept part.
    plan = plan_dispatch(torch.tensor([[1, 0], [3, 2]]), num_experts=4, ep_size=2,
                         token_mask_T=torch.zeros(2, dtype=torch.bool))
    assert plan.send_counts_PL.tolist() == [[0, 0], [0, 0]]
    assert sorted(plan.sorted_rows_R.tolist()) == [0, 1, 2, 3]


def test_per_rank_view_counts_and_send_order():
    # T=4, K=2, E=6 over P=3 (L=2); token 2 masked. Rows r = t*K + k hold experts [5, 0, 2, 3, 1, 4, 0, 2].
    topk_ids_TK = torch.tensor([[5, 0], [2, 3], [1, 4], [0, 2]])
    mask_T = torch.tensor([True, True, False, True])
    plan = plan_dispatch(topk_ids_TK, num_experts=6, ep_size=3, token_mask_T=mask_T)
    # Kept rows by expert: e0 rows 1, 6; e2 rows 2, 7; e3 row 3; e5 row 0 (e1, e4 only had token 2's rows 4, 5).
    assert plan.sorted_rows_R.tolist() == [1, 6, 2, 7, 3, 0, 4, 5]
    assert plan.send_counts_PL.tolist() == [[2, 0], [2, 1], [0, 1]]
    assert plan.send_counts_P.tolist() == [2, 3, 1]
    assert plan.num_local_experts == 2
    # The tokens of the 6 kept rows in send order: rank 0 gets tokens 0, 3; rank 1 gets 1, 3, 1; rank 2 gets 0.
    assert plan.send_tokens(6).tolist() == [0, 3, 1, 3, 1, 0]
    assert plan.send_tokens(0).tolist() == []
    # The view is the plan of the local backends, not a second sort.
    assert torch.equal(plan.send_counts_PL.reshape(-1), plan.plan.counts_E)
    assert torch.equal(plan.inverse_R(), plan.plan.inverse_R())


def test_per_rank_view_of_one_rank_is_the_whole_plan():
    plan = plan_dispatch(torch.tensor([[3, 0], [1, 2], [0, 1]]), num_experts=4, ep_size=1)
    assert plan.send_counts_PL.tolist() == [[2, 2, 1, 1]]
    assert plan.send_counts_P.tolist() == [6]
    assert plan.send_tokens(6).tolist() == [0, 2, 1, 2, 1, 0]


def test_plan_rejects_ep_size_that_does_not_divide_experts():
    with pytest.raises(ValueError, match=r"ep_size: expected a positive int that divides num_experts=6, got 4"):
        plan_dispatch(torch.zeros(2, 1, dtype=torch.int64), num_experts=6, ep_size=4)


def test_combine_of_received_rows_by_hand():
    # What the EP combine does on the source rank, with P=1: rows come back in send order, the masked rows are
    # zero rows appended, and combine undoes the sort. T=3, K=2, E=2; token 1 masked.
    # Rows hold experts [1, 0, 0, 1, 1, 0]: kept rows sorted e0: 1, 5; e1: 0, 4; masked rows 2, 3 last.
    plan = plan_dispatch(torch.tensor([[1, 0], [0, 1], [1, 0]]), num_experts=2, ep_size=1,
                         token_mask_T=torch.tensor([True, False, True]))
    assert plan.sorted_rows_R.tolist() == [1, 5, 0, 4, 2, 3]
    # Expert output of each sent row (D=1): row r computed 10 * (r + 1).
    y_RD = torch.tensor([[20.0], [60.0], [10.0], [50.0], [0.0], [0.0]])
    weights_TK = torch.tensor([[0.5, 0.25], [0.0, 0.0], [1.0, 2.0]])
    # Token 0: 0.5*10 + 0.25*20; token 1: 0; token 2: 1*50 + 2*60.
    assert combine(y_RD, plan.plan, weights_TK).tolist() == [[10.0], [0.0], [170.0]]
