"""Expert LoRA: every LoRA backend against the plain per-expert loop, forward and every gradient; adapters on
leanmoe.MoE layers; merge/unmerge; masks, dropout, errors; torch.compile.

Legend: T tokens, D model dim, I expert hidden dim, N gate/up rows, E experts, K top-k, r rank.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import leanmoe
import leanmoe.lora
from leanmoe.activations import ACTIVATIONS, resolve_activation
from leanmoe.lora.compute import select_lora_backend
from tests.helpers import TOLERANCES, assert_close, make_problem

pytestmark = pytest.mark.usefixtures("one_thread")

FAST_BACKENDS = ["grouped_mm", "triton"]  # the LoRA backends other than the reference
TARGET_SETS = [("gate_up", "down"), ("gate_up",), ("down",)]


def make_lora(p, *, rank=8, alpha=None, targets=("gate_up", "down"), seed=0, dropout=0.0) -> leanmoe.ExpertLoRA:
    """An adapter for problem ``p`` with random A *and* B (a fresh B is zero, which would hide a wrong B path)."""
    E, _, D = p.gate_up_proj.shape
    lora = leanmoe.ExpertLoRA(num_experts=E, dim=D, hidden_dim=p.down_proj.shape[2], rank=rank,
                              alpha=alpha if alpha is not None else 2 * rank, gated=p.activation.gated,
                              targets=targets, dropout=dropout, dtype=p.x_TD.dtype)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for q in lora.parameters():
            # Scaled so the adapter moves the output by about as much as the base weights do.
            q.copy_(torch.randn(q.shape, generator=gen) * q.shape[-1] ** -0.5)
    return lora


def run(p, lora, backend, dy, *, token_mask=None):
    """``(y, grads)``: the output and the gradient of every differentiable input and adapter tensor (None where
    one does not require grad)."""
    y = leanmoe.moe_experts(*p.args(), **p.kwargs(), backend=backend, lora=lora, token_mask=token_mask)
    tensors = p.inputs() + list(lora.parameters())
    needs = [t for t in tensors if t.requires_grad]
    grads = iter(torch.autograd.grad(y, needs, dy, allow_unused=True))
    return y, [next(grads) if t.requires_grad else None for t in tensors]


def check_against_reference(p, lora, backend, *, token_mask=None, seed=0):
    tol = TOLERANCES[p.x_TD.dtype]
    dy = torch.randn(p.x_TD.shape, generator=torch.Generator().manual_seed(seed + 7)).to(p.x_TD.dtype)
    ref_y, ref_grads = run(p, lora, "reference", dy, token_mask=token_mask)
    out_y, out_grads = run(p, lora, backend, dy, token_mask=token_mask)
    assert_close(out_y, ref_y, tol=tol, name="y")
    names = ["dx", "dweights", "dgate_up_proj", "ddown_proj", "dgate_up_bias", "ddown_bias"][:len(p.inputs())]
    names += [f"d{n}" for n, _ in lora.named_parameters()]
    for name, out, ref in zip(names, out_grads, ref_grads, strict=True):
        assert (out is None) == (ref is None), name
        if ref is not None:
            assert_close(out, ref, tol=tol, name=name)
    return ref_y, ref_grads


# --- the reference itself ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("targets", TARGET_SETS, ids="+".join)
def test_reference_equals_the_merged_weights_on_the_plain_reference(targets):
    # The LoRA math, checked independently of the LoRA loop: W + s B A through the plain backend.
    p = make_problem(19, 16, 8, 5, 2, bias=True, seed=1)
    lora = make_lora(p, rank=3, targets=targets)
    y = leanmoe.moe_experts(*p.args(), **p.kwargs(), backend="reference", lora=lora)
    gate_up = p.gate_up_proj + (lora.delta("gate_up") if "gate_up" in targets else 0)
    down = p.down_proj + (lora.delta("down") if "down" in targets else 0)
    ref = leanmoe.moe_experts(p.x_TD, p.topk_ids_TK, p.topk_weights_TK, gate_up, down, p.gate_up_bias, p.down_bias,
                              **p.kwargs(), backend="reference")
    assert_close(y, ref, tol=TOLERANCES[torch.float32])
    assert (y - leanmoe.moe_experts(*p.args(), **p.kwargs(), backend="reference")).abs().max() > 1e-2


def test_fresh_adapter_changes_nothing():
    p = make_problem(11, 16, 8, 4, 2, seed=2)
    lora = leanmoe.ExpertLoRA(num_experts=4, dim=16, hidden_dim=8, rank=4)
    base = leanmoe.moe_experts(*p.args(), **p.kwargs(), backend="reference")
    assert torch.equal(leanmoe.moe_experts(*p.args(), **p.kwargs(), backend="reference", lora=lora), base)
    for backend in FAST_BACKENDS:
        assert_close(leanmoe.moe_experts(*p.args(), **p.kwargs(), backend=backend, lora=lora), base,
                     tol=TOLERANCES[torch.float32])


# --- every backend against the reference -------------------------------------------------------------------------


_ACT_LAYOUTS = [(a, layout) for a in ACTIVATIONS
                for layout in (("concatenated", "interleaved") if resolve_activation(a).gated else ("concatenated",))]


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("activation,layout", _ACT_LAYOUTS, ids=[f"{a}-{lay}" for a, lay in _ACT_LAYOUTS])
def test_activations_layouts_biases(backend, activation, layout):
    p = make_problem(23, 16, 8, 5, 2, activation=activation, layout=layout, bias=True, seed=3)
    check_against_reference(p, make_lora(p, rank=8), backend)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("rank", [1, 8, 64])
@pytest.mark.parametrize("targets", TARGET_SETS, ids="+".join)
def test_ranks_and_targets(backend, rank, targets):
    # rank 1 and 64 are not multiples of the internal padding of 8 / larger than D: both must still be exact.
    p = make_problem(17, 16, 8, 4, 2, seed=4)
    check_against_reference(p, make_lora(p, rank=rank, targets=targets), backend)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("case", [
    dict(T=16, E=6, K=2, routing="few_experts"),  # experts 2..5 get no rows
    dict(T=16, E=6, K=1, routing="one_expert"),   # every token on expert 0
    dict(T=12, E=4, K=1),                         # K = 1
    dict(T=9, E=4, K=4),                          # K = E: every token on every expert
    dict(T=21, E=7, K=3),                         # prime E
    dict(T=1, E=5, K=2),                          # a single token
    dict(T=0, E=5, K=2),                          # no tokens at all
], ids=lambda c: f"T{c['T']}-E{c['E']}-K{c['K']}-{c.get('routing', 'uniform')}")
def test_moe_edge_cases(backend, case):
    p = make_problem(case["T"], 16, 8, case["E"], case["K"], routing=case.get("routing", "uniform"), bias=True,
                     seed=5)
    check_against_reference(p, make_lora(p, rank=4), backend)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_trainable_base_weights_get_their_gradients(backend):
    # make_problem's base weights require grad: the comparison above covers them; here they are frozen instead.
    p = make_problem(15, 16, 8, 4, 2, bias=True, seed=6)
    for t in (p.gate_up_proj, p.down_proj, p.gate_up_bias, p.down_bias):
        t.requires_grad_(False)
    _, grads = check_against_reference(p, make_lora(p), backend)
    assert grads[2:6] == [None] * 4 and all(g is not None for g in grads[6:])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(dtype):
    p = make_problem(20, 16, 8, 4, 2, dtype=dtype, seed=7)
    check_against_reference(p, make_lora(p, rank=8), "grouped_mm")


# --- frozen base, no_grad, masks, dropout ------------------------------------------------------------------------


class _GroupedMMShapes(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten._grouped_mm.default:
            self.shapes.append(tuple(out.shape))
        return out


def test_frozen_base_computes_no_base_weight_gradient():
    E, D, I = 4, 32, 16  # base gradients would be [E, 2I, D] = [E, 32, 32] or [E, D, I] = [E, 32, 16]
    p = make_problem(20, D, I, E, 2, seed=8)
    for t in (p.gate_up_proj, p.down_proj):
        t.requires_grad_(False)
    lora = make_lora(p, rank=8)
    y = leanmoe.moe_experts(*p.args(), **p.kwargs(), backend="grouped_mm", lora=lora)
    with _GroupedMMShapes() as mode:
        y.sum().backward()
    base = {(E, 2 * I, D), (E, D, 2 * I), (E, D, I), (E, I, D)}
    assert mode.shapes and not base & set(mode.shapes), mode.shapes
    assert {(E, 8, D), (E, 2 * I, 8), (E, 8, I), (E, D, 8)} <= set(mode.shapes)  # the four LoRA gradients


def test_grouped_mm_keeps_no_hidden_rows_for_backward():
    # The fast path recomputes gate_up [R, N] and h [R, I] in backward; it keeps the [R, P] low-rank rows only.
    T, K, D, I = 20, 2, 32, 16
    p = make_problem(T, D, I, 4, K, seed=8)
    lora = make_lora(p, rank=8)
    shapes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(tuple(t.shape)) or t, lambda t: t):
        leanmoe.moe_experts(*p.args(), **p.kwargs(), backend="grouped_mm", lora=lora)
    assert (T * K, 8) in shapes
    assert not {(T * K, 2 * I), (T * K, I), (T * K, D)} & set(shapes), shapes


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_bitwise_deterministic(backend):
    p = make_problem(40, 16, 8, 5, 3, bias=True, seed=16)
    lora = make_lora(p)
    dy = torch.randn(40, 16)
    (y1, g1), (y2, g2) = run(p, lora, backend, dy), run(p, lora, backend, dy)
    assert torch.equal(y1, y2) and all(torch.equal(a, b) for a, b in zip(g1, g2, strict=True))


@pytest.mark.parametrize("backend", ["reference", *FAST_BACKENDS])
def test_no_grad_keeps_nothing(backend):
    p = make_problem(10, 16, 8, 4, 2, seed=9)
    lora = make_lora(p)
    packed = []
    with torch.no_grad(), torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t, lambda t: t):
        y = leanmoe.moe_experts(*p.args(), **p.kwargs(), backend=backend, lora=lora)
    assert y.grad_fn is None and not packed


@pytest.mark.parametrize("backend", ["reference", *FAST_BACKENDS])
def test_token_mask(backend):
    p = make_problem(14, 16, 8, 5, 2, bias=True, seed=10)
    lora = make_lora(p)
    mask = torch.rand(14, generator=torch.Generator().manual_seed(1)) > 0.4
    mask[0] = False
    with torch.no_grad():
        p.x_TD[~mask] = float("nan")  # masked rows must take part in nothing
    dy = torch.randn(14, 16)
    y, grads = run(p, lora, backend, dy, token_mask=mask)
    assert torch.equal(y[~mask], torch.zeros_like(y[~mask]))
    assert torch.equal(grads[0][~mask], torch.zeros_like(grads[0][~mask]))
    assert torch.equal(grads[1][~mask], torch.zeros_like(grads[1][~mask]))
    assert not any(g.isnan().any() for g in grads)
    # The kept tokens alone give the same output and weight gradients.
    kept = make_problem(14, 16, 8, 5, 2, bias=True, seed=10)
    kept.x_TD, kept.topk_ids_TK = kept.x_TD.detach()[mask].requires_grad_(), kept.topk_ids_TK[mask]
    kept.topk_weights_TK = kept.topk_weights_TK.detach()[mask].requires_grad_()
    ref_y, ref_grads = run(kept, lora, "reference", dy[mask])
    assert_close(y[mask], ref_y, tol=TOLERANCES[torch.float32], name="y")
    for g, r in zip(grads[2:], ref_grads[2:], strict=True):
        assert_close(g, r, tol=TOLERANCES[torch.float32])
    if backend != "reference":
        check_against_reference(p, lora, backend, token_mask=mask)


@pytest.mark.parametrize("low_rank, factor_grads, a_grads", [
    ("token_major", "fused", "torch"), ("gathered", "fused", "torch"), ("token_major", "grouped_mm", "torch"),
    ("token_major", "fused", "triton"), ("rows", "fused", "triton"), ("rows", "grouped_mm", "torch")])
@pytest.mark.parametrize("case", [
    dict(T=14, E=5, K=2, masked=True),  # masked tokens' x rows NaN, rows past the kept ones in every [R, P] block
    dict(T=12, E=4, K=1, routing="one_expert"),  # experts with no rows
    dict(T=9, E=4, K=4),  # K = E
    dict(T=21, E=7, K=3),  # prime E
    dict(T=0, E=5, K=2),
], ids=lambda c: f"T{c['T']}-E{c['E']}-K{c['K']}{'-masked' if c.get('masked') else ''}")
def test_triton_low_rank_paths_with_frozen_base(low_rank, factor_grads, a_grads, case, monkeypatch):
    """Every way of the adapters' low-rank inputs and the gate/up A gradient on the triton backend (one pass over the
    rows, token-major and gathered: :func:`leanmoe.lora.triton.low_rank_rows_path`,
    :func:`leanmoe.lora.triton.token_major_low_rank`), both ways of the B factors' terms (one pass over the
    gradient rows, or two grouped GEMMs: :func:`leanmoe.experts.triton.factor_grads`) and of the A factors' gradients
    (:func:`leanmoe.lora.triton.a_grads_path`), base weights frozen so no x rows are gathered for them."""
    monkeypatch.setenv("LEANMOE_LORA_LOW_RANK", low_rank)
    monkeypatch.setenv("LEANMOE_LORA_FACTOR_GRADS", factor_grads)
    monkeypatch.setenv("LEANMOE_LORA_A_GRADS", a_grads)
    p = make_problem(case["T"], 16, 8, case["E"], case["K"], routing=case.get("routing", "uniform"), bias=True,
                     seed=12)
    for w in (p.gate_up_proj, p.down_proj, p.gate_up_bias, p.down_bias):
        w.requires_grad_(False)
    mask = None
    if case.get("masked"):
        mask = torch.rand(case["T"], generator=torch.Generator().manual_seed(3)) > 0.4
        with torch.no_grad():
            p.x_TD[~mask] = float("nan")
    lora = make_lora(p, rank=5)
    _, grads = run(p, lora, "triton", torch.randn(p.x_TD.shape), token_mask=mask)
    assert not any(g is not None and g.isnan().any() for g in grads)
    check_against_reference(p, lora, "triton", token_mask=mask)


def test_factor_grads_path_is_checked(monkeypatch):
    from leanmoe.experts.triton import factor_grads

    monkeypatch.setenv("LEANMOE_LORA_FACTOR_GRADS", "atomic")
    a = torch.zeros(4, 8)
    with pytest.raises(ValueError, match="LEANMOE_LORA_FACTOR_GRADS.*'atomic'"):
        factor_grads(a, torch.zeros(2, 8, 4), torch.zeros(4, 4), torch.tensor([2, 4], dtype=torch.int32), 1.0)


def test_a_grads_path_is_checked(monkeypatch):
    from leanmoe.lora.triton import a_grads_path

    monkeypatch.delenv("LEANMOE_LORA_A_GRADS", raising=False)
    assert a_grads_path() == "triton"
    monkeypatch.setenv("LEANMOE_LORA_A_GRADS", "cutlass")
    with pytest.raises(ValueError, match="LEANMOE_LORA_A_GRADS.*'cutlass'"):
        a_grads_path()


def test_low_rank_rows_rule(monkeypatch):
    from leanmoe.kernels.policy import LOW_RANK_ROWS_MAX
    from leanmoe.lora.triton import low_rank_rows_path

    monkeypatch.delenv("LEANMOE_LORA_LOW_RANK", raising=False)
    assert low_rank_rows_path(16) and low_rank_rows_path(LOW_RANK_ROWS_MAX)
    assert not low_rank_rows_path(LOW_RANK_ROWS_MAX + 8)  # past one tile: the GEMMs
    monkeypatch.setenv("LEANMOE_LORA_LOW_RANK", "token_major")
    assert not low_rank_rows_path(16)
    monkeypatch.setenv("LEANMOE_LORA_LOW_RANK", "rows")
    assert low_rank_rows_path(16)
    with pytest.raises(ValueError, match="LEANMOE_LORA_LOW_RANK.*at most 128.*got 136"):
        low_rank_rows_path(LOW_RANK_ROWS_MAX + 8)
    monkeypatch.setenv("LEANMOE_LORA_LOW_RANK", "dense")
    with pytest.raises(ValueError, match="LEANMOE_LORA_LOW_RANK.*'dense'"):
        low_rank_rows_path(16)


@pytest.mark.parametrize("low_rank", ["auto", "token_major"])
def test_triton_rank_past_one_tile(low_rank, monkeypatch):
    """A rank past :data:`leanmoe.kernels.policy.LOW_RANK_ROWS_MAX`: ``auto`` leaves the rows path for the
    GEMMs, and the result still matches the reference."""
    monkeypatch.setenv("LEANMOE_LORA_LOW_RANK", low_rank)
    p = make_problem(11, 16, 8, 3, 2, bias=False, seed=13)
    check_against_reference(p, make_lora(p, rank=131), "triton")


def test_token_major_rule(monkeypatch):
    from leanmoe.lora.triton import TOKEN_MAJOR_MAX_PER_K, token_major_low_rank

    monkeypatch.delenv("LEANMOE_LORA_LOW_RANK", raising=False)
    assert token_major_low_rank(128, 16, 8)  # Qwen3-30B-A3B at rank 16: 2048 columns per token
    assert not token_major_low_rank(128, 64, 8)  # rank 64: 8192 columns, more than the gather costs
    assert token_major_low_rank(8, TOKEN_MAJOR_MAX_PER_K // 4, 2)
    assert not token_major_low_rank(8, TOKEN_MAJOR_MAX_PER_K // 4 + 8, 2)
    monkeypatch.setenv("LEANMOE_LORA_LOW_RANK", "rows")  # forward's choice: backward's torch path keeps the rule
    assert token_major_low_rank(128, 16, 8)
    monkeypatch.setenv("LEANMOE_LORA_LOW_RANK", "gathered")
    assert not token_major_low_rank(8, 16, 2)
    monkeypatch.setenv("LEANMOE_LORA_LOW_RANK", "dense")
    with pytest.raises(ValueError, match="LEANMOE_LORA_LOW_RANK.*'dense'"):
        token_major_low_rank(8, 16, 2)


@pytest.mark.parametrize("backend", ["reference", *FAST_BACKENDS])
def test_dropout_in_training_only(backend):
    p = make_problem(16, 16, 8, 4, 2, seed=11)
    lora = make_lora(p, dropout=0.5)
    base = leanmoe.moe_experts(*p.args(), **p.kwargs(), backend="reference")
    nodrop = leanmoe.moe_experts(*p.args(), **p.kwargs(), backend=backend, lora=make_lora(p))
    lora.eval()
    assert_close(leanmoe.moe_experts(*p.args(), **p.kwargs(), backend=backend, lora=lora), nodrop, tol=2e-5)
    lora.train()
    if backend == "triton":  # dropout is not fused there: named, it refuses; auto passes it over
        with pytest.raises(ValueError, match="does not fuse LoRA dropout"):
            leanmoe.moe_experts(*p.args(), **p.kwargs(), backend=backend, lora=lora)
        return
    dropped = leanmoe.moe_experts(*p.args(), **p.kwargs(), backend=backend, lora=lora)
    assert (dropped - nodrop).abs().max() > 1e-3
    lora.dropout = 1.0  # everything dropped: the base output exactly as without the adapter
    assert_close(leanmoe.moe_experts(*p.args(), **p.kwargs(), backend=backend, lora=lora), base, tol=2e-5)


# --- the module, backend selection and errors --------------------------------------------------------------------


def test_expert_lora_parameters():
    lora = leanmoe.ExpertLoRA(num_experts=3, dim=16, hidden_dim=8, rank=4, alpha=8)
    shapes = {n: tuple(q.shape) for n, q in lora.named_parameters()}
    assert shapes == {"gate_up_A": (3, 4, 16), "gate_up_B": (3, 16, 4), "down_A": (3, 4, 8), "down_B": (3, 16, 4)}
    assert lora.scale == 2 and not lora.gate_up_B.any() and lora.gate_up_A.abs().max() <= 16 ** -0.5
    down_only = leanmoe.ExpertLoRA(num_experts=3, dim=16, hidden_dim=8, rank=4, gated=False, targets=("down",))
    assert down_only.gate_up_A is None and set(down_only.state_dict()) == {"down_A", "down_B"}
    up_only = leanmoe.ExpertLoRA(num_experts=3, dim=16, hidden_dim=8, rank=4, gated=False, targets=("gate_up",))
    assert tuple(up_only.gate_up_B.shape) == (3, 8, 4)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(rank=0), ValueError, "rank must be >= 1, got 0"),
    (dict(rank=2.0), TypeError, "rank must be an int"),
    (dict(num_experts="3"), TypeError, "num_experts must be an int"),
    (dict(targets=("gate",)), ValueError, "targets must be a non-empty tuple"),
    (dict(targets="down"), TypeError, "targets must be a tuple"),
    (dict(targets=()), ValueError, "targets must be a non-empty tuple"),
    (dict(dropout=1.5), ValueError, "dropout must be a float in"),
    (dict(alpha=float("nan")), TypeError, "alpha must be a finite"),
    (dict(gated=1), TypeError, "gated must be a bool"),
])
def test_expert_lora_validation(kwargs, error, match):
    with pytest.raises(error, match=match):
        leanmoe.ExpertLoRA(**{"num_experts": 3, "dim": 16, "hidden_dim": 8, **kwargs})


def test_call_errors_and_backend_choice():
    p = make_problem(8, 16, 8, 4, 2, seed=12)
    lora = make_lora(p)
    with pytest.raises(ValueError, match="backend 'triton_decode' cannot run a call with lora"):
        leanmoe.moe_experts(*p.args(), **p.kwargs(), backend="triton_decode", lora=lora)
    with pytest.raises(ValueError, match="unknown backend"):
        leanmoe.moe_experts(*p.args(), **p.kwargs(), backend="nope", lora=lora)
    with pytest.raises(TypeError, match="lora must be a leanmoe.ExpertLoRA"):
        leanmoe.moe_experts(*p.args(), **p.kwargs(), lora=object())
    wrong = leanmoe.ExpertLoRA(num_experts=5, dim=16, hidden_dim=8)
    with pytest.raises(ValueError, match=r"does not fit the experts: expected \(4, 16, 8, True\)"):
        leanmoe.moe_experts(*p.args(), **p.kwargs(), lora=wrong)
    call = leanmoe.describe_call(*p.args(), **p.kwargs())
    assert select_lora_backend("auto", call) == "grouped_mm"
    odd = make_problem(8, 12, 6, 4, 2)  # D = 12 fp32 rows are not 16-byte aligned: grouped_mm cannot run
    assert select_lora_backend("auto", leanmoe.describe_call(*odd.args(), **odd.kwargs())) == "reference"
    with pytest.raises(ValueError, match="backend 'grouped_mm' cannot run this call"):
        leanmoe.moe_experts(*odd.args(), **odd.kwargs(), backend="grouped_mm", lora=make_lora(odd))


@pytest.mark.parametrize("backend", ["auto", "reference", *FAST_BACKENDS])
def test_meta_tensors_give_a_meta_output(backend):
    p = make_problem(8, 16, 8, 4, 2, device="meta")
    lora = leanmoe.ExpertLoRA(num_experts=4, dim=16, hidden_dim=8, rank=4, device="meta")
    y = leanmoe.moe_experts(*p.args(), **p.kwargs(), backend=backend, lora=lora)
    assert y.is_meta and tuple(y.shape) == (8, 16)


def test_adapter_in_another_dtype_than_the_base():
    # fp32 adapters over bf16 experts: the factors are cast in the call, their gradients come back in fp32.
    p = make_problem(12, 16, 8, 4, 2, dtype=torch.bfloat16, seed=13)
    lora = make_lora(make_problem(12, 16, 8, 4, 2, seed=13))
    y = leanmoe.moe_experts(*p.args(), **p.kwargs(), backend="grouped_mm", lora=lora)
    y.float().sum().backward()
    assert y.dtype == torch.bfloat16 and lora.down_B.grad.dtype == torch.float32


# --- leanmoe.MoE layers: add, merge, unmerge ---------------------------------------------------------------------


def _layer(backend="grouped_mm", bias=True):
    torch.manual_seed(0)
    cfg = leanmoe.MoEConfig(dim=16, hidden_dim=8, num_experts=4, top_k=2, bias=bias, backend=backend,
                            num_shared_experts=1)
    return leanmoe.MoE(cfg)


def test_add_expert_lora_on_moe_layers():
    model = torch.nn.Sequential(_layer(), _layer())
    x = torch.randn(2, 5, 16)
    before = model(x)
    assert leanmoe.lora.add_expert_lora(model, rank=4, alpha=8) is model
    assert torch.equal(model(x), before)  # B = 0
    trainable = {n for n, q in model.named_parameters() if q.requires_grad}
    assert {n for n in trainable if ".experts." in n} == {f"{i}.experts.lora.{t}" for i in (0, 1)
                                                          for t in ("gate_up_A", "gate_up_B", "down_A", "down_B")}
    assert "0.experts.lora.down_B" in model.state_dict()
    with pytest.raises(ValueError, match="already has a LoRA adapter"):
        leanmoe.lora.add_expert_lora(model)
    with pytest.raises(ValueError, match="has no experts module"):
        leanmoe.lora.add_expert_lora(torch.nn.Linear(2, 2))
    on_decode = _layer()
    on_decode.experts.backend = "triton_decode"
    with pytest.raises(ValueError, match="runs on backend 'triton_decode', which takes no LoRA adapters"):
        leanmoe.lora.add_expert_lora(on_decode)
    # A few optimizer steps reach the adapters only.
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-2)
    frozen = model[0].experts.gate_up_proj.clone()
    for _ in range(2):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    assert torch.equal(model[0].experts.gate_up_proj, frozen) and model[0].experts.lora.gate_up_B.abs().max() > 0


@pytest.mark.parametrize("targets", TARGET_SETS, ids="+".join)
def test_merge_unmerge_round_trip(targets):
    model = _layer()
    leanmoe.lora.add_expert_lora(model, rank=4, alpha=8, targets=targets)
    with torch.no_grad():
        for q in model.experts.lora.parameters():
            q.normal_(std=0.3)
    x = torch.randn(9, 16)
    adapted = model(x)
    base_weights = [t.clone() for t in (model.experts.gate_up_proj, model.experts.down_proj)]
    leanmoe.lora.merge_expert_lora(model)
    assert model.experts.lora.merged
    assert_close(model(x), adapted, tol=TOLERANCES[torch.float32], name="merged")  # not added twice
    leanmoe.lora.merge_expert_lora(model)  # a second merge changes nothing
    assert_close(model(x), adapted, tol=TOLERANCES[torch.float32], name="merged twice")
    changed = [not torch.equal(w, b) for w, b in zip((model.experts.gate_up_proj, model.experts.down_proj),
                                                      base_weights, strict=True)]
    assert changed == [t in targets for t in ("gate_up", "down")]
    leanmoe.lora.unmerge_expert_lora(model)
    assert not model.experts.lora.merged
    for w, b in zip((model.experts.gate_up_proj, model.experts.down_proj), base_weights, strict=True):
        assert_close(w, b, tol=2e-6)  # fp32 round-off of W + d - d
    assert_close(model(x), adapted, tol=TOLERANCES[torch.float32], name="unmerged")


# --- torch.compile -----------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.no_poison
@pytest.mark.parametrize("backend,dtype", [
    ("grouped_mm", torch.bfloat16), ("reference", torch.float32), ("auto", torch.float32),
    # The triton path's two custom ops trace as their fakes; on the CPU the kernels run in the interpreter.
    pytest.param("triton", torch.float32, marks=pytest.mark.skipif(
        torch.cuda.is_available(), reason="the interpreter runs on CPU-only machines"))])
def test_lora_compiles_fullgraph(backend, dtype):
    # torch._grouped_mm traces in bfloat16 only (auto takes the reference loop in float32); the reference loop
    # needs dynamic output shapes captured.
    torch._dynamo.reset()
    p = make_problem(24, 16, 8, 5, 2, bias=True, dtype=dtype, seed=14)
    lora = make_lora(p, rank=4)
    dy = torch.randn(24, 16).to(dtype)
    eager_y, eager_grads = run(p, lora, backend, dy)

    def f(x, ids, w, gu, down, gub, db):
        return leanmoe.moe_experts(x, ids, w, gu, down, gub, db, **p.kwargs(), backend=backend, check_ids=False,
                                   lora=lora)

    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=(dtype == torch.float32)):
        y = torch.compile(f, fullgraph=True)(*p.args())
        grads = torch.autograd.grad(y, p.inputs() + list(lora.parameters()), dy)
    assert_close(y, eager_y, tol=TOLERANCES[dtype], name="y")
    for g, r in zip(grads, eager_grads, strict=True):
        assert_close(g, r, tol=TOLERANCES[dtype])


# --- GPU ---------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("targets", TARGET_SETS, ids="+".join)
def test_gpu_bf16_matches_the_fp32_reference(targets, backend):
    # CUDA's torch._grouped_mm takes bfloat16 only; the ground truth is the fp32 loop on the same values. auto takes
    # the triton backend for a bf16 LoRA call on Hopper.
    p = make_problem(300, 128, 64, 8, 2, bias=True, dtype=torch.bfloat16, device="cuda", seed=15)
    lora = make_lora(p, rank=16, targets=targets).cuda()
    ref_p = make_problem(300, 128, 64, 8, 2, bias=True, device="cuda", seed=15)
    ref_lora = make_lora(ref_p, rank=16, targets=targets).cuda()
    dy = torch.randn(300, 128, device="cuda")
    out_y, out_grads = run(p, lora, backend, dy.bfloat16())
    ref_y, ref_grads = run(ref_p, ref_lora, "reference", dy)
    assert_close(out_y, ref_y, tol=TOLERANCES[torch.bfloat16], name="y")
    for out, ref in zip(out_grads, ref_grads, strict=True):
        assert_close(out, ref, tol=TOLERANCES[torch.bfloat16])
    # auto measures the two LoRA paths against each other on a shape bucket's first call (leanmoe.experts.autoselect).
    from leanmoe.experts import autoselect

    call = dataclasses.replace(leanmoe.describe_call(*p.args(), **p.kwargs()), has_lora=True)
    assert [b.name for b in autoselect.candidates(call)] == ["triton", "grouped_mm"]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_gpu_activation_memory_with_frozen_base_is_close_to_no_lora(backend):
    # The memory target: activation memory with rank-16 adapters on both targets <= 1.2x that of the
    # same backend on frozen base weights without adapters (qwen3-30b-a3b layer shapes, 4096 tokens).
    T, D, I, E, K = 4096, 2048, 768, 128, 8
    p = make_problem(T, D, I, E, K, dtype=torch.bfloat16, device="cuda", seed=17, requires_grad=False)
    p.x_TD.requires_grad_(True)
    p.topk_weights_TK.requires_grad_(True)
    lora = leanmoe.ExpertLoRA(num_experts=E, dim=D, hidden_dim=I, rank=16, dtype=torch.bfloat16, device="cuda")

    def kept_bytes(**kw):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        y = leanmoe.moe_experts(*p.args(), **p.kwargs(), backend=backend, **kw)
        torch.cuda.synchronize()
        kept = torch.cuda.memory_allocated() - before - y.numel() * y.element_size()
        y.sum().backward()
        return max(kept, 1)

    # One call of each first: a library's one-time allocations on its first call in this process (a GEMM
    # workspace, say) are not activations, and which call comes first in a worker depends on the test order.
    kept_bytes(lora=lora)
    kept_bytes()
    # Without adapters the frozen-base grouped_mm keeps nothing of its own (the plan is recomputed in backward), the
    # triton backend its routing plan; the adapters add the two [R, r] bf16 low-rank row blocks.
    assert kept_bytes(lora=lora) <= 1.2 * kept_bytes() + 2 * T * K * 16 * 2
