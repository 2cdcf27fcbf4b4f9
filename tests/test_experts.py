"""Every backend against the reference loop: forward and every gradient, all activations, layouts, edge cases."""

from __future__ import annotations

import pytest
import torch

import leanmoe
from leanmoe.experts.reference import reference_moe_experts
from tests.helpers import TOLERANCES, assert_close, assert_deterministic, make_problem

ACTIVATIONS = ["swiglu", "geglu", "geglu_exact", "clamped_swiglu", "relu2", "gelu", "gelu_exact", "silu"]
GATED = {"swiglu", "geglu", "geglu_exact", "clamped_swiglu"}
# Every (activation, layout) pair that exists: non-gated activations have no gate/up layout.
ACT_LAYOUTS = [(a, "concatenated") for a in ACTIVATIONS] + [(a, "interleaved") for a in sorted(GATED)]


def cpu_backends() -> list[str]:
    # The Triton interpreter is exercised in its own test file at smaller sizes.
    return [b for b in leanmoe.available_backends() if b not in ("reference", "triton")]


def run(problem, backend, save_percent=0, dy=None):
    """Forward and gradients of every differentiable input for one backend; fresh leaf copies each time."""
    leaves = {name: (t.detach().clone().requires_grad_(True) if t is not None else None)
              for name, t in (("x", problem.x_TD), ("w", problem.topk_weights_TK), ("gu", problem.gate_up_proj),
                              ("down", problem.down_proj), ("gub", problem.gate_up_bias),
                              ("db", problem.down_bias))}
    y = leanmoe.moe_experts(leaves["x"], problem.topk_ids_TK, leaves["w"], leaves["gu"], leaves["down"],
                            leaves["gub"], leaves["db"], backend=backend, save_percent=save_percent,
                            **problem.kwargs())
    if dy is None:
        dy = torch.randn_like(y)
    inputs = [t for t in leaves.values() if t is not None]
    grads = torch.autograd.grad(y, inputs, dy, allow_unused=True)
    names = [n for n, t in leaves.items() if t is not None]
    return y, dict(zip(names, grads, strict=True)), dy


def check_against_reference(problem, backend, dtype, save_percent=0):
    ref_y, ref_grads, dy = run(problem, "reference")
    out_y, out_grads, _ = run(problem, backend, save_percent, dy)
    tol = TOLERANCES[dtype]
    assert_close(out_y, ref_y, tol=tol, name=f"{backend} y")
    for name, ref_g in ref_grads.items():
        assert ref_g is not None, name
        assert_close(out_grads[name], ref_g, tol=tol, name=f"{backend} d{name}")


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("activation,layout", ACT_LAYOUTS)
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_backend_matches_reference_fp32(backend, activation, layout, bias):
    problem = make_problem(37, 32, 24, 7, 3, activation=activation, layout=layout, bias=bias)
    check_against_reference(problem, backend, torch.float32)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize(
    "T,E,K,routing",
    [
        (64, 8, 2, "uniform"),
        (64, 8, 2, "skewed"),
        (50, 16, 2, "few_experts"),  # 14 of 16 experts get no tokens
        (40, 6, 2, "one_expert"),  # every token's first choice is expert 0
        (33, 5, 1, "uniform"),  # K = 1
        (21, 6, 6, "uniform"),  # K = E: every expert sees every token
        (29, 13, 4, "uniform"),  # prime E
        (1, 7, 3, "uniform"),  # T = 1
        (3, 64, 8, "uniform"),  # T far smaller than E: most experts empty
    ],
    ids=lambda v: str(v),
)
def test_backend_edge_cases(backend, T, E, K, routing):
    problem = make_problem(T, 16, 8, E, K, routing=routing, bias=True)
    check_against_reference(problem, backend, torch.float32)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("save_percent", [0, 37.5, 100])
def test_save_percent_does_not_change_results(backend, save_percent):
    problem = make_problem(45, 32, 16, 6, 2, bias=True)
    check_against_reference(problem, backend, torch.float32, save_percent)


@pytest.mark.parametrize("backend", ["reference", *cpu_backends()])
def test_zero_tokens(backend):
    # T = 0: empty output, and every gradient exists and is zero.
    problem = make_problem(0, 16, 8, 4, 2, bias=True)
    y, grads, _ = run(problem, backend)
    assert y.shape == (0, 16)
    for name, g in grads.items():
        assert g is not None and not g.isnan().any() and g.abs().sum() == 0, name


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_close_to_fp32_reference(backend, dtype):
    problem = make_problem(48, 64, 32, 8, 2, bias=True, dtype=dtype)
    ref_y, ref_grads, dy = run(problem, "reference")
    out_y, out_grads, _ = run(problem, backend, dy=dy)
    # Low-precision reference and backend both sit within rounding of the fp32 truth.
    p32 = make_problem(48, 64, 32, 8, 2, bias=True)
    for field in ("x_TD", "topk_weights_TK", "gate_up_proj", "down_proj", "gate_up_bias", "down_bias"):
        setattr(p32, field, getattr(problem, field).detach().float())
    p32.topk_ids_TK = problem.topk_ids_TK
    true_y, true_grads, _ = run(p32, "reference", dy=dy.float())
    assert_close(out_y, true_y, tol=TOLERANCES[dtype], name="y")
    for name in true_grads:
        assert_close(out_grads[name], true_grads[name], tol=TOLERANCES[dtype], name=f"d{name}")


@pytest.mark.parametrize("backend", cpu_backends())
def test_non_contiguous_inputs(backend):
    problem = make_problem(30, 24, 16, 5, 2, bias=True)
    ref_y, _, _ = run(problem, "reference")
    x_strided = torch.randn(30, 48)[:, ::2]
    x_strided.copy_(problem.x_TD.detach())
    ids_t = problem.topk_ids_TK.t().contiguous().t()
    w_t = problem.topk_weights_TK.detach().t().contiguous().t()
    gate_up_t = problem.gate_up_proj.detach().transpose(1, 2).contiguous().transpose(1, 2)
    assert not x_strided.is_contiguous() and not gate_up_t.is_contiguous() and not ids_t.is_contiguous()
    y = leanmoe.moe_experts(x_strided, ids_t, w_t, gate_up_t, problem.down_proj.detach(),
                            problem.gate_up_bias.detach(), problem.down_bias.detach(), backend=backend,
                            **problem.kwargs())
    assert_close(y, ref_y, tol=TOLERANCES[torch.float32], name="y")


@pytest.mark.parametrize("backend", cpu_backends())
def test_deterministic(backend):
    problem = make_problem(64, 32, 16, 8, 4, bias=True)
    assert_deterministic(problem, backend, torch.randn(64, 32))


@pytest.mark.parametrize("activation,layout", ACT_LAYOUTS)
def test_reference_gradcheck_float64(activation, layout):
    if activation == "clamped_swiglu":
        # Small limit so some pre-activations land on each side of the clamps (gradcheck needs no kinks nearby:
        # the random values make hitting one exactly a measure-zero event).
        act = leanmoe.Activation(name="clamped_swiglu", alpha=1.702, limit=0.5)
    else:
        act = activation
    p = make_problem(7, 6, 4, 3, 2, activation=act, layout=layout, bias=True, dtype=torch.float64)

    def f(x, w, gu, down, gub, db):
        return reference_moe_experts(x, p.topk_ids_TK, w, gu, down, gub, db, activation=p.activation,
                                     gate_up_layout=layout)

    assert torch.autograd.gradcheck(f, tuple(p.inputs()))


def test_reference_matches_hand_computed_token():
    # One token, two experts, by hand: y = w0 * down0 silu(g0) u0 + w1 * down1 silu(g1) u1.
    p = make_problem(1, 4, 2, 3, 2, requires_grad=False)
    ids = torch.tensor([[2, 0]])
    w = torch.tensor([[0.25, 0.75]])
    y = reference_moe_experts(p.x_TD, ids, w, p.gate_up_proj, p.down_proj, None, None, activation=p.activation,
                              gate_up_layout="concatenated")
    expected = torch.zeros(4)
    for e, we in ((2, 0.25), (0, 0.75)):
        gu = p.gate_up_proj[e] @ p.x_TD[0]
        h = torch.nn.functional.silu(gu[:2]) * gu[2:]
        expected += we * (p.down_proj[e] @ h)
    assert_close(y[0], expected, tol=1e-6)
