"""Property-based fuzz: random shapes, routings and options; every CPU backend matches the reference."""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import leanmoe
from leanmoe.experts import select_backend
from tests.helpers import TOLERANCES, assert_close, make_problem
from tests.test_experts import ACT_LAYOUTS, check_against_reference, check_masked, cpu_backends


@st.composite
def problems(draw):
    E = draw(st.integers(1, 12))
    K = draw(st.integers(1, E))
    T = draw(st.integers(0, 40))
    D = draw(st.sampled_from([4, 8, 12, 16]))
    I = draw(st.sampled_from([2, 4, 8, 12]))
    activation, layout = draw(st.sampled_from(ACT_LAYOUTS))
    routing = draw(st.sampled_from(["uniform", "skewed", "one_expert"]))
    bias = draw(st.booleans())
    seed = draw(st.integers(0, 2**31 - 1))
    save_percent = draw(st.sampled_from([0, 50, 100]))
    # None, or a [T] keep-mask (all kept and all masked included): masked tokens' x rows are poisoned with NaN.
    keep_fraction = draw(st.sampled_from([None, 0.0, 0.5, 1.0]))
    mask = None if keep_fraction is None else \
        torch.rand(T, generator=torch.Generator().manual_seed(seed)) < keep_fraction
    return make_problem(T, D, I, E, K, activation=activation, layout=layout, bias=bias, routing=routing,
                        seed=seed), save_percent, mask


BACKENDS = cpu_backends()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
@given(problems())
def test_backends_match_reference_on_random_problems(case):
    problem, save_percent, mask = case
    call = leanmoe.describe_call(*problem.args(), **problem.kwargs())
    for backend in BACKENDS:
        try:
            select_backend(backend, call)
        except ValueError as err:
            # A backend may refuse a shape (grouped_mm needs 16-byte rows), but only with a stated reason.
            assert "cannot run this call: " in str(err)
            continue
        # T = 0 included: the empty output and every (zero) gradient are compared, not only the shape.
        if mask is None:
            check_against_reference(problem, backend, torch.float32, save_percent)
        else:
            check_masked(problem, backend, mask, save_percent=save_percent)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(T=st.integers(1, 30), E=st.integers(2, 16), data=st.data())
def test_router_picks_distinct_valid_experts(T, E, data):
    K = data.draw(st.integers(1, E))
    cfg = leanmoe.MoEConfig(dim=8, hidden_dim=4, num_experts=E, top_k=K,
                            score_func=data.draw(st.sampled_from(["softmax", "sigmoid"])))
    out = leanmoe.TopKRouter(cfg)(torch.randn(T, 8))
    ids = out.topk_ids_TK
    assert ids.min() >= 0 and ids.max() < E
    assert all(len(set(row)) == K for row in ids.tolist())
    if cfg.norm_topk_prob:
        assert_close(out.topk_weights_TK.sum(-1), torch.ones(T), tol=TOLERANCES[torch.float32])
