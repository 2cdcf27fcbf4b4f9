"""leanmoe.testing: reproducible builders, one tolerance table per kind of comparison, an assert_close that bites."""

from __future__ import annotations

import pytest
import torch

import leanmoe
from leanmoe import testing
from leanmoe.bench import harness


def test_make_problem_is_reproducible_from_its_seed():
    a = testing.make_problem(9, 16, 8, 5, 2, bias=True, seed=3, keep_fraction=0.5)
    b = testing.make_problem(9, 16, 8, 5, 2, bias=True, seed=3, keep_fraction=0.5)
    c = testing.make_problem(9, 16, 8, 5, 2, bias=True, seed=4, keep_fraction=0.5)
    for t, u in zip(a.args(), b.args(), strict=True):
        assert torch.equal(t, u)
    assert not torch.equal(a.x_TD, c.x_TD)
    assert torch.equal(a.token_mask_T, b.token_mask_T)


def test_make_problem_without_a_seed_follows_torch_default_generator():
    # seed=None reads the (per-test seeded) default generator once: reproducible under the same global seed.
    torch.manual_seed(11)
    a = testing.make_problem(5, 16, 8, 3, 2)
    torch.manual_seed(11)
    b = testing.make_problem(5, 16, 8, 3, 2)
    assert torch.equal(a.x_TD, b.x_TD)


@pytest.mark.parametrize("routing", testing.ROUTINGS)
def test_routings_give_distinct_in_range_ids(routing):
    ids_TK = testing.random_ids(40, 7, 3, routing, seed=1)
    assert ids_TK.shape == (40, 3) and ids_TK.min() >= 0 and ids_TK.max() < 7
    assert all(len(set(row.tolist())) == 3 for row in ids_TK)  # K distinct experts per token
    if routing == "one_expert":
        assert (ids_TK == 0).any(dim=1).all()  # every token picks expert 0
    if routing == "few_experts":
        assert ids_TK.max() < 3  # experts 3..6 get no token


def test_one_tolerance_table_per_comparison():
    assert harness.TOLERANCES is testing.TOLERANCES_VS_FP32_REFERENCE
    from tests import helpers

    assert helpers.TOLERANCES is testing.TOLERANCES_SAME_DTYPE


def test_assert_close_bites():
    ref = torch.randn(64, 32, generator=torch.Generator().manual_seed(0))
    testing.assert_close(ref + 1e-7 * ref, ref, tol=1e-5, name="tiny error")
    with pytest.raises(AssertionError, match="relative RMS err"):
        testing.assert_close(ref * 1.01, ref, tol=1e-3, name="1% error")
    nan = ref.clone()
    nan[3, 4] = float("nan")
    with pytest.raises(AssertionError, match="NaN"):
        testing.assert_close(nan, ref, tol=1.0)


def test_problem_runs_on_the_reference_against_its_expert_weights():
    p = testing.make_problem(12, 16, 8, 5, 2, bias=True, seed=2)
    out = leanmoe.moe_experts(*p.args(), **p.kwargs(), backend="reference")
    from leanmoe.experts.functional import run_experts

    weights = p.expert_weights()
    assert weights.num_experts == 5 and weights.dim == 16 and weights.hidden_dim == 8
    testing.assert_close(run_experts(p.x_TD, p.topk_ids_TK, p.topk_weights_TK, weights, backend="reference"), out,
                         tol=1e-6, name="ExpertWeights path")
