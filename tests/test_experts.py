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
    # The Triton backends (interpreter on the CPU) are exercised in their own test files at smaller sizes.
    return [b for b in leanmoe.available_backends() if b != "reference" and not b.startswith("triton")]


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


def routing_weight_grad_scale(problem, dy_TD):
    """``max_tk sum_d |dy_td * out_tkd|``, with ``out_tk`` the unweighted output of token t's k-th expert.

    A routing-weight gradient is one D-long dot product ``<dy_t, out_tk>``: its rounding error scales with the sum
    of the terms' magnitudes, not with the result, which can cancel to near 0 (with T*K = 1, ``max|ref|`` is that
    one cancelled value and a correct backend fails a relative check by chance)."""
    T, K = problem.topk_ids_TK.shape
    if T == 0:
        return 0.0
    ones_T1 = torch.ones(T, 1, dtype=problem.x_TD.dtype)
    scale = 0.0
    for k in range(K):
        out_TD = reference_moe_experts(problem.x_TD.detach(), problem.topk_ids_TK[:, k:k + 1], ones_T1,
                                       *(t.detach() if t is not None else None for t in problem.args()[3:]),
                                       activation=problem.activation, gate_up_layout=problem.gate_up_layout)
        scale = max(scale, (dy_TD.double().abs() * out_TD.double().abs()).sum(-1).max().item())
    return scale


def check_against_reference(problem, backend, dtype, save_percent=0):
    ref_y, ref_grads, dy = run(problem, "reference")
    out_y, out_grads, _ = run(problem, backend, save_percent, dy)
    tol = TOLERANCES[dtype]
    assert_close(out_y, ref_y, tol=tol, name=f"{backend} y")
    for name, ref_g in ref_grads.items():
        assert ref_g is not None, name
        if name == "w" and ref_g.numel() < 16:
            # Few routing weights: max|ref| may be one cancelled dot product; compare on the terms' scale.
            err = (out_grads[name].double() - ref_g.double()).abs().max().item() if ref_g.numel() else 0.0
            assert not out_grads[name].isnan().any(), f"{backend} dw has NaN"
            assert err <= tol * routing_weight_grad_scale(problem, dy), f"{backend} dw: max abs err {err:.3e}"
            continue
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


# --- token masks -------------------------------------------------------------------------------------------------

def run_masked(problem, backend, token_mask, dy=None, save_percent=0):
    """Like :func:`run`, calling the backend object itself with ``token_mask`` (the contract every backend
    implements), with the masked tokens' x rows and routing weights poisoned with NaN: none may leak."""
    from leanmoe.experts.registry import get_backend

    keep = token_mask[:, None]
    x = torch.where(keep, problem.x_TD.detach(), float("nan")).requires_grad_(True)
    w = torch.where(keep, problem.topk_weights_TK.detach(), float("nan")).requires_grad_(True)
    leaves = {"x": x, "w": w, "gu": problem.gate_up_proj.detach().clone().requires_grad_(True),
              "down": problem.down_proj.detach().clone().requires_grad_(True)}
    for name, t in (("gub", problem.gate_up_bias), ("db", problem.down_bias)):
        if t is not None:
            leaves[name] = t.detach().clone().requires_grad_(True)
    weights = leanmoe.ExpertWeights(gate_up_proj=leaves["gu"], down_proj=leaves["down"],
                                    gate_up_bias=leaves.get("gub"), down_bias=leaves.get("db"),
                                    activation=problem.activation, gate_up_layout=problem.gate_up_layout)
    y = get_backend(backend)(leaves["x"], problem.topk_ids_TK, leaves["w"], weights, save_percent=save_percent,
                             token_mask=token_mask)
    if dy is None:
        dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, list(leaves.values()), dy)
    return y, dict(zip(leaves, grads, strict=True)), dy


def kept_only(problem, token_mask):
    """The problem restricted to the kept tokens: the ground truth a masked call must reproduce."""
    import dataclasses

    return dataclasses.replace(problem, x_TD=problem.x_TD.detach()[token_mask],
                               topk_ids_TK=problem.topk_ids_TK[token_mask],
                               topk_weights_TK=problem.topk_weights_TK.detach()[token_mask])


def check_masked(problem, backend, token_mask, dtype=torch.float32, save_percent=0):
    ref_y, ref_grads, dy = run_masked(problem, "reference", token_mask)
    out_y, out_grads, _ = run_masked(problem, backend, token_mask, dy, save_percent)
    masked = ~token_mask
    # Exact zeros for masked tokens, whatever their (NaN) inputs held.
    for name, t in (("y", out_y), ("dx", out_grads["x"]), ("dweights", out_grads["w"])):
        assert torch.equal(t[masked], torch.zeros_like(t[masked])), f"{backend}: {name} of masked tokens not 0"
    tol = TOLERANCES[dtype]
    assert_close(out_y, ref_y, tol=tol, name=f"{backend} y")
    for name, ref_g in ref_grads.items():
        assert_close(out_grads[name], ref_g, tol=tol, name=f"{backend} d{name}")
    # Expert weights get nothing from masked tokens: their gradients equal those of the kept tokens alone.
    kept = kept_only(problem, token_mask)
    _, kept_grads, _ = run(kept, backend, save_percent, dy[token_mask])
    for name in ("gu", "down", "gub", "db"):
        if name in out_grads:
            assert_close(out_grads[name], kept_grads[name], tol=tol, name=f"{backend} d{name} vs kept tokens only")


def test_reference_mask_skips_tokens():
    # The ground truth itself: masked rows are exact zeros, kept rows equal the kept-only problem's output.
    p = make_problem(23, 16, 8, 5, 2, bias=True, seed=0)
    mask = torch.rand(23, generator=torch.Generator().manual_seed(1)) < 0.5
    y, grads, dy = run_masked(p, "reference", mask)
    assert torch.equal(y[~mask], torch.zeros_like(y[~mask]))
    assert torch.equal(grads["x"][~mask], torch.zeros_like(grads["x"][~mask]))
    ref_kept, ref_kept_grads, _ = run(kept_only(p, mask), "reference", dy=dy[mask])
    assert_close(y[mask], ref_kept, tol=TOLERANCES[torch.float32], name="y")
    assert_close(grads["x"][mask], ref_kept_grads["x"], tol=TOLERANCES[torch.float32], name="dx")


MASK_CASES = [
    # (T, E, K, routing, mask kind)
    (40, 8, 2, "uniform", "random"),
    (40, 8, 2, "uniform", "all_kept"),  # a mask that keeps everything equals no mask
    (24, 8, 2, "uniform", "all_masked"),  # every row past offsets_E[-1] = 0: no GEMM work at all
    (37, 7, 3, "skewed", "random"),  # prime E
    (30, 6, 2, "one_expert", "random"),  # every kept token on expert 0
    (21, 6, 6, "uniform", "random"),  # K = E
    (33, 5, 1, "uniform", "random"),  # K = 1
    (50, 16, 2, "few_experts", "random"),  # 14 of 16 experts empty
    (9, 4, 2, "uniform", "last_kept"),  # only the last token kept: masked rows precede it in token order
    (1, 4, 2, "uniform", "all_masked"),  # T = 1, masked
]


def _mask(kind, T, seed):
    if kind == "all_kept":
        return torch.ones(T, dtype=torch.bool)
    if kind == "all_masked":
        return torch.zeros(T, dtype=torch.bool)
    if kind == "last_kept":
        return torch.arange(T) == T - 1
    return torch.rand(T, generator=torch.Generator().manual_seed(seed)) < 0.6


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("T,E,K,routing,kind", MASK_CASES, ids=lambda v: str(v))
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_masked_tokens_match_reference(backend, T, E, K, routing, kind, bias):
    problem = make_problem(T, 16, 8, E, K, routing=routing, bias=bias, seed=T * 100 + E)
    check_masked(problem, backend, _mask(kind, T, seed=T))


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("activation,layout", ACT_LAYOUTS)
@pytest.mark.parametrize("save_percent", [0, 100])
def test_masked_tokens_every_activation(backend, activation, layout, save_percent):
    problem = make_problem(29, 16, 8, 5, 2, activation=activation, layout=layout, bias=True, seed=7)
    check_masked(problem, backend, _mask("random", 29, seed=3), save_percent=save_percent)


@pytest.mark.parametrize("backend", ["reference", *cpu_backends()])
def test_masked_zero_tokens(backend):
    problem = make_problem(0, 16, 8, 4, 2, bias=True)
    y, grads, _ = run_masked(problem, backend, torch.zeros(0, dtype=torch.bool))
    assert y.shape == (0, 16)
    for name, g in grads.items():
        assert g is not None and g.abs().sum() == 0, name


# --- meta tensors ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["reference", *cpu_backends()])
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
def test_meta_inputs_give_a_meta_output(backend, masked):
    from leanmoe.experts.registry import get_backend

    p = make_problem(12, 16, 8, 4, 2, bias=True, device="meta", requires_grad=False)
    mask = torch.ones(12, dtype=torch.bool, device="meta") if masked else None
    weights = leanmoe.ExpertWeights(gate_up_proj=p.gate_up_proj, down_proj=p.down_proj, gate_up_bias=p.gate_up_bias,
                                    down_bias=p.down_bias, **p.kwargs())
    y = get_backend(backend)(p.x_TD, p.topk_ids_TK, p.topk_weights_TK, weights, save_percent=0, token_mask=mask)
    assert y.device.type == "meta" and y.shape == (12, 16) and y.dtype == torch.float32
    y = leanmoe.moe_experts(*p.args(), **p.kwargs(), backend=backend)
    assert y.device.type == "meta" and y.shape == (12, 16)


# --- grouped_mm specifics ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("save_percent", [0, 100])
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
def test_grouped_mm_row_chunks(monkeypatch, save_percent, masked):
    # A chunk budget of a few rows: the chunked activation, routing-weight gradient and bias adds run over many
    # chunks, the last one partial (R = 74 is no multiple of the 3-row chunk).
    from leanmoe.experts import grouped_mm

    monkeypatch.setattr(grouped_mm, "ROW_CHUNK_BYTES", 3 * 4 * 16)
    assert len(grouped_mm._row_chunks(74, 16)) == 25
    problem = make_problem(37, 16, 8, 5, 2, bias=True, seed=11)
    if masked:
        check_masked(problem, "grouped_mm", _mask("random", 37, seed=5), save_percent=save_percent)
    else:
        check_against_reference(problem, "grouped_mm", torch.float32, save_percent)


@pytest.mark.parametrize("grad_mode", ["no_grad", "inference_mode", "no_input_requires_grad"])
def test_grouped_mm_inference_keeps_nothing(monkeypatch, grad_mode):
    # save_percent=100 keeps gate_up_RN for backward only when a backward can follow.
    from leanmoe.experts import grouped_mm

    kept = []

    def spy_on(fn):
        def spy(*args):
            out = fn(*args)
            kept.append(out[1].shape[0])
            return out
        return spy

    # Without grad, in eager, the backend runs the op's body directly (leanmoe.experts.eager): spy on both.
    for name in ("grouped_mm_experts_fwd", "_grouped_mm_experts_fwd"):
        monkeypatch.setattr(grouped_mm, name, spy_on(getattr(grouped_mm, name)))
    p = make_problem(20, 16, 8, 4, 2, requires_grad=grad_mode != "no_input_requires_grad")
    ctx = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode}.get(grad_mode, torch.enable_grad)
    with ctx():
        y = leanmoe.moe_experts(*p.args(), **p.kwargs(), backend="grouped_mm", save_percent=100)
    assert y.grad_fn is None and kept == [0]
    # The same call with grad keeps the R = 40 rows, so the spy sees what it should.
    p = make_problem(20, 16, 8, 4, 2)
    leanmoe.moe_experts(*p.args(), **p.kwargs(), backend="grouped_mm", save_percent=100)
    assert kept == [0, 40]


@pytest.mark.parametrize("save_percent", [0, 100])
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
def test_grouped_mm_makes_no_large_fp32_temporary(monkeypatch, save_percent, masked):
    # bf16 inputs: every fp32 tensor the forward and backward ops create fits the row-chunk budget, far below one
    # [R, I] buffer (R = 128, I = 32: 4096 elements), and no chunk is the whole problem.
    from torch.utils._python_dispatch import TorchDispatchMode

    from leanmoe.experts import grouped_mm

    budget = 4 * 16 * 64  # 16 rows of N = 64
    monkeypatch.setattr(grouped_mm, "ROW_CHUNK_BYTES", budget)
    fp32_numels = []

    class RecordFp32(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor) and t.dtype == torch.float32:
                    fp32_numels.append((t.numel(), str(func)))
            return out

    p = make_problem(64, 16, 32, 4, 2, bias=True, dtype=torch.bfloat16, seed=3)
    mask = _mask("random", 64, seed=4) if masked else None
    # The ops' Python bodies, called under the mode so that it sees each aten op inside them.
    fwd, bwd = grouped_mm.grouped_mm_experts_fwd._init_fn, grouped_mm.grouped_mm_experts_bwd._init_fn
    args = [t.detach() for t in p.args()[:5]] + [p.gate_up_bias.detach(), p.down_bias.detach(), mask]
    with RecordFp32():
        y, saved = fwd(*args, "swiglu", 1.702, 7.0, "concatenated", save_percent > 0)
        bwd(torch.randn_like(y), *args, saved, "swiglu", 1.702, 7.0, "concatenated")
    assert fp32_numels, "the mode saw no fp32 tensor: it did not see the ops"
    largest = max(fp32_numels)
    assert largest[0] * 4 <= budget, f"an fp32 temporary of {largest[0]} elements ({largest[1]})"


def _plain_grouped_mm_path(x_TD, topk_ids_TK, topk_weights_TK, gate_up_proj, down_proj):
    """The plain permute -> grouped GEMM -> SwiGLU -> grouped GEMM -> weighted combine path, differentiated by
    autograd: the memory bar grouped_mm must meet."""
    from leanmoe.experts.plan import plan_experts

    T, K = topk_ids_TK.shape
    plan = plan_experts(topk_ids_TK, gate_up_proj.shape[0])
    gate_up_RN = torch._grouped_mm(x_TD[plan.sorted_tokens_R], gate_up_proj.transpose(-2, -1), offs=plan.offsets_E)
    g_RI, u_RI = gate_up_RN.chunk(2, dim=-1)
    out_RD = torch._grouped_mm(torch.nn.functional.silu(g_RI) * u_RI, down_proj.transpose(-2, -1),
                               offs=plan.offsets_E)
    out_TKD = out_RD[plan.inverse_R()].view(T, K, -1)
    return torch.bmm(topk_weights_TK.unsqueeze(1).to(x_TD.dtype), out_TKD).squeeze(1)


@pytest.mark.gpu
def test_grouped_mm_activation_memory_no_higher_than_the_plain_path():
    # Peak memory of one fwd+bwd above the inputs and parameters, bf16, save_percent 0: grouped_mm keeps nothing
    # and recomputes, so its peak must not exceed the plain autograd path's (it was 5x higher before).
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("torch._grouped_mm needs compute capability >= 9.0")
    p = make_problem(8192, 1024, 2048, 8, 2, dtype=torch.bfloat16, device="cuda", seed=0)
    dy = torch.randn(8192, 1024, dtype=torch.bfloat16, device="cuda")

    def peak(fn):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        y = fn()
        grads = torch.autograd.grad(y, p.inputs(), dy)
        torch.cuda.synchronize()
        del y, grads
        return torch.cuda.max_memory_allocated() - base

    def plain_fn():
        return _plain_grouped_mm_path(*p.args()[:5])

    def ours_fn():
        return leanmoe.moe_experts(*p.args(), **p.kwargs(), backend="grouped_mm")

    # One step of each first, so that one-time allocations (cuBLAS workspaces, the allocator's first blocks: they
    # land in whichever path runs first in a process) are in neither measurement; then the peaks of steady steps.
    peak(plain_fn), peak(ours_fn)
    plain, ours = peak(plain_fn), peak(ours_fn)
    # 1 MiB of slack: the caching allocator rounds blocks, and the two paths allocate in different orders (an H200
    # read 496 MiB for both, grouped_mm's a fraction of a MiB above).
    assert ours <= plain + 2**20, f"grouped_mm peak {ours / 2**20:.1f} MiB > plain path {plain / 2**20:.1f} MiB"
    ref_y = _plain_grouped_mm_path(*p.args()[:5])
    assert_close(leanmoe.moe_experts(*p.args(), **p.kwargs(), backend="grouped_mm"), ref_y,
                 tol=TOLERANCES[torch.bfloat16], name="y")
