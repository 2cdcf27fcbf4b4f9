"""The ``triton_decode`` backend against the reference loop (Triton interpreter on the CPU, fp32 and fp16).

Legend: T tokens, D model dim, I expert hidden dim, E experts, K top-k.

Forward only: every case runs under ``torch.no_grad()``. Shapes are tiny (D=32, I=24) so that the interpreter,
with 16-wide tiles, still sees several column tiles, row tiles and reduction splits.
"""

from __future__ import annotations

import pytest
import torch

import leanmoe
from leanmoe.activations import ACTIVATIONS, resolve_activation
from leanmoe.experts.functional import describe_call
from leanmoe.experts.reference import reference_moe_experts
from leanmoe.experts.registry import get_backend, select_backend
from tests.helpers import TOLERANCES, assert_close, make_problem

pytest.importorskip("triton")
pytestmark = pytest.mark.usefixtures("one_thread")

from leanmoe.kernels import moe_decode  # noqa: E402
from leanmoe.kernels.moe_common import ACTIVATION_CODES  # noqa: E402


def _reference(p, token_mask=None):
    x, ids, w = p.x_TD, p.topk_ids_TK, p.topk_weights_TK
    if token_mask is not None:
        # A masked token contributes nothing: zero its x row (it may hold NaN) and its routing weights.
        x = torch.where(token_mask[:, None], x, 0.0)
        w = torch.where(token_mask[:, None], w, 0.0)
    return reference_moe_experts(x, ids, w, p.gate_up_proj, p.down_proj, p.gate_up_bias, p.down_bias,
                                 activation=p.activation, gate_up_layout=p.gate_up_layout)


def _decode(p, **kw):
    with torch.no_grad():
        return leanmoe.moe_experts(*p.args(), **p.kwargs(), backend="triton_decode", **kw)


def _check(p, tol=None, **kw):
    with torch.no_grad():
        ref = _reference(p, kw.get("token_mask"))
    out = _decode(p, **kw)
    assert out.dtype == p.x_TD.dtype
    assert_close(out, ref, tol=tol or TOLERANCES[p.x_TD.dtype], name="y")
    return out


# Each activation once, the layouts and bias options rotated over them (gated ones get both layouts somewhere).
@pytest.mark.parametrize("i, activation", list(enumerate(ACTIVATIONS)), ids=list(ACTIVATIONS))
def test_activations(i, activation):
    if activation not in ACTIVATION_CODES:
        p = make_problem(3, 32, 24, 5, 2, activation=activation, requires_grad=False, seed=i)
        with pytest.raises(ValueError, match="has no kernel code"):
            _decode(p)
        return
    gated = resolve_activation(activation).gated
    layout = "interleaved" if gated and i % 2 else "concatenated"
    p = make_problem(7, 32, 24, 5, 2, activation=activation, layout=layout, bias=i % 2 == 0, seed=i,
                     requires_grad=False)
    _check(p)


@pytest.mark.parametrize("T", [0, 1, 2, 7])
@pytest.mark.parametrize("layout, bias", [("concatenated", False), ("interleaved", True)])
def test_token_counts(T, layout, bias):
    # T=0: empty output, no launch; T=1, 2: fewer rows than a row tile; 7 rows over 5 experts: some get none.
    p = make_problem(T, 32, 24, 5, 2, layout=layout, bias=bias, seed=T, requires_grad=False)
    out = _check(p)
    assert out.shape == (T, 32)


@pytest.mark.parametrize("dtype, split", [(torch.float32, 1), (torch.float16, 2), (torch.float32, 4)],
                         ids=["fp32-split1", "fp16-split2", "fp32-split4"])
def test_reduction_splits(monkeypatch, dtype, split):
    # Forced splits of D (gate/up) and I (down); split 4 of D=64 gives chunks of one 16-wide BK.
    monkeypatch.setattr(moe_decode, "choose_split", lambda *a, **k: split)
    p = make_problem(4, 64, 32, 4, 2, bias=True, dtype=dtype, seed=split, requires_grad=False)
    _check(p)


@pytest.mark.parametrize("routing", ["few_experts", "one_expert"])
def test_empty_experts(routing):
    # Prime E=7: few_experts leaves experts 2..6 without tokens; one_expert puts every token on expert 0
    # (more rows than one 16-row tile: T=20, K=2, so expert 0 has 20 rows and two row tiles).
    T = 20 if routing == "one_expert" else 6
    p = make_problem(T, 32, 24, 7, 2, routing=routing, bias=True, seed=1, requires_grad=False)
    _check(p)


def test_k_equals_e():
    # Every token on every expert: K=E=3.
    p = make_problem(5, 32, 24, 3, 3, bias=True, seed=2, requires_grad=False)
    _check(p)


def test_k1_strided_inputs():
    # K=1, x a non-contiguous view (every other column of a wider tensor) and the weights a transposed view.
    p = make_problem(6, 32, 24, 4, 1, seed=3, requires_grad=False)
    p.x_TD = torch.randn(6, 64)[:, ::2]
    p.topk_weights_TK = torch.rand(1, 6).t()
    _check(p)


@pytest.mark.parametrize("bias", [False, True])
def test_token_mask(bias):
    p = make_problem(7, 32, 24, 5, 2, bias=bias, seed=4, requires_grad=False)
    mask = torch.tensor([True, False, True, True, False, False, True])
    p.x_TD[~mask] = float("nan")  # masked rows are never read
    out = _check(p, token_mask=mask)
    assert torch.equal(out[~mask], torch.zeros(3, 32)), "masked tokens' rows must be exactly 0"


def test_token_mask_all_masked():
    p = make_problem(3, 32, 24, 5, 2, bias=True, seed=5, requires_grad=False)
    mask = torch.zeros(3, dtype=torch.bool)
    assert torch.equal(_decode(p, token_mask=mask), torch.zeros(3, 32))


def test_deterministic():
    p = make_problem(7, 32, 24, 5, 2, bias=True, seed=6, requires_grad=False)
    assert torch.equal(_decode(p), _decode(p))


def test_refuses_grad():
    p = make_problem(3, 32, 24, 5, 2, seed=7)
    with pytest.raises(ValueError, match="forward only"):
        leanmoe.moe_experts(*p.args(), **p.kwargs(), backend="triton_decode")
    call = describe_call(*p.args(), **p.kwargs())
    assert call.requires_grad
    with torch.no_grad():
        assert not describe_call(*p.args(), **p.kwargs()).requires_grad
        assert torch.isfinite(_decode(p)).all()
    # The backend's own check too, for a caller that skips the registry.
    backend = get_backend("triton_decode")
    with pytest.raises(ValueError, match="forward only"):
        backend(*p.args(), **p.kwargs(), save_percent=0)


def test_auto_never_picks_it_on_cpu_or_for_training():
    p = make_problem(3, 32, 24, 5, 2, seed=8)
    assert "triton_decode" not in select_backend("auto", describe_call(*p.args(), **p.kwargs()))[0].name
    with torch.no_grad():
        backend, why = select_backend("auto", describe_call(*p.args(), **p.kwargs()))
    assert backend.name != "triton_decode"
    assert "triton_decode" in why and "interpreter" in why


def test_meta_tensors():
    p = make_problem(4, 32, 24, 5, 2, bias=True, requires_grad=False, device="meta")
    out = _decode(p)
    assert out.is_meta and out.shape == (4, 32)


@pytest.mark.no_poison
def test_compiles_fullgraph():
    p = make_problem(5, 32, 24, 5, 2, bias=True, seed=9, requires_grad=False)

    @torch.compile(fullgraph=True, backend="eager")
    def run(x, ids, w):
        return leanmoe.moe_experts(x, ids, w, p.gate_up_proj, p.down_proj, p.gate_up_bias, p.down_bias,
                                   **p.kwargs(), backend="triton_decode")

    with torch.no_grad():
        out = run(p.x_TD, p.topk_ids_TK, p.topk_weights_TK)
        assert_close(out, _reference(p), tol=TOLERANCES[torch.float32], name="compiled y")


def test_choose_split():
    # T=1 of qwen3-30b-a3b on 132 SMs: 8 row tiles x 12 column tiles = 96 programs, so split D=2048 eight ways.
    assert moe_decode.choose_split(8, 128, 768, 2048, 132) == 8
    # T=64 (512 rows): up to 160 row tiles x 12 column tiles already fill 132 SMs 4 times over.
    assert moe_decode.choose_split(512, 128, 768, 2048, 132) == 1
    # Chunks stay >= 256: a reduction of 512 splits at most in two.
    assert moe_decode.choose_split(8, 128, 64, 512, 132) == 2
    assert moe_decode.row_tiles_bound(8, 128, 16) == 8
    assert moe_decode.row_tiles_bound(512, 128, 16) == 160


def _fp32_reference(p, token_mask=None):
    q = make_problem(1, 8, 8, 2, 1, device=p.x_TD.device, requires_grad=False)
    for field in ("x_TD", "topk_weights_TK", "gate_up_proj", "down_proj", "gate_up_bias", "down_bias"):
        t = getattr(p, field)
        setattr(q, field, None if t is None else t.float())
    q.topk_ids_TK, q.activation, q.gate_up_layout = p.topk_ids_TK, p.activation, p.gate_up_layout
    return _reference(q, token_mask)


# Real expert shapes at decode sizes: qwen3-30b-a3b, gpt-oss-20b (biases, interleaved clamped SwiGLU) and
# deepseek-v3's D and I with 16 of its 256 experts (its weights would not fit otherwise).
GPU_SHAPES = {"qwen3": (2048, 768, 128, 8, "swiglu", "concatenated", False),
              "gpt-oss": (2880, 2880, 32, 4, "clamped_swiglu", "interleaved", True),
              "deepseek16": (7168, 2048, 16, 8, "swiglu", "concatenated", False)}


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 4, 16, 64, 256])
@pytest.mark.parametrize("shape", list(GPU_SHAPES))
def test_gpu_bf16_matches_fp32_reference(shape, T):
    D, I, E, K, act, layout, bias = GPU_SHAPES[shape]
    p = make_problem(T, D, I, E, K, activation=act, layout=layout, bias=bias, dtype=torch.bfloat16, device="cuda",
                     seed=T, requires_grad=False)
    mask = torch.arange(T, device="cuda") % 5 != 3
    with torch.no_grad():
        for token_mask in (None, mask):
            ref = _fp32_reference(p, token_mask)
            out = _decode(p, token_mask=token_mask)
            assert_close(out.float(), ref, tol=2e-2, name=f"{shape} T={T} bf16")
            assert torch.equal(out, _decode(p, token_mask=token_mask)), "two runs differ"


@pytest.mark.gpu
def test_gpu_no_host_sync():
    p = make_problem(64, 2048, 768, 128, 8, dtype=torch.bfloat16, device="cuda", seed=0, requires_grad=False)
    mask = torch.ones(64, dtype=torch.bool, device="cuda")
    with torch.no_grad():
        _decode(p, check_ids=False, token_mask=mask)  # warm-up: autotuning syncs
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            _decode(p, check_ids=False, token_mask=mask)
        finally:
            torch.cuda.set_sync_debug_mode("default")


def _plan_ids(T: int, K: int, E: int, seed: int, dtype=torch.int64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if T == 0:
        return torch.zeros(0, K, dtype=dtype)
    return torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)]).to(dtype)


PLAN_CASES = [  # (T, K, E, ids): every routing edge of the plan
    (0, 2, 4, "random"), (1, 8, 128, "random"), (2, 1, 3, "random"), (7, 3, 7, "random"),  # T=0, T=1, prime E
    (9, 4, 4, "random"),  # K = E
    (12, 2, 6, "one_expert_pair"),  # every row on two experts, the others empty
    (64, 8, 128, "random"),  # qwen3-30b-a3b at T=64
]
# R = 4096, the most one program sorts (a minute per case in the interpreter: GPU only).
GPU_PLAN_CASES = [*PLAN_CASES, (512, 8, 256, "random")]


def _plan_case_ids(T, K, E, kind, seed):
    if kind == "one_expert_pair":
        return torch.tensor([[0, 5]] * T)
    return _plan_ids(T, K, E, seed)


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("T, K, E, kind", PLAN_CASES, ids=lambda v: str(v))
def test_decode_plan_is_the_plan(T, K, E, kind, masked, device="cpu"):
    """One launch gives exactly plan_experts' plan (stable order, masked rows last, counts and int32 offsets)."""
    from leanmoe.experts.plan import plan_experts

    ids = _plan_case_ids(T, K, E, kind, seed=T + E).to(device)
    mask = (torch.rand(T, generator=torch.Generator().manual_seed(E)) > 0.4).to(device) if masked else None
    for ids_ in (ids, ids.to(torch.int32), ids.t().contiguous().t()):  # int32 ids, strided ids
        got = moe_decode.decode_plan(ids_, E, mask)
        ref = plan_experts(ids_, E, mask)
        for name, g, r in zip(("sorted_rows_R", "sorted_tokens_R", "sorted_experts_R", "counts_E", "offsets_E"),
                              got, (ref.sorted_rows_R, ref.sorted_tokens_R, ref.sorted_experts_R, ref.counts_E,
                                    ref.offsets_E), strict=True):
            assert g.dtype == r.dtype and torch.equal(g, r), f"{name} differs"


def test_decode_plan_rejects_too_many_rows():
    with pytest.raises(ValueError, match="T\\*K <= 4096"):
        moe_decode.decode_plan(torch.zeros(513, 8, dtype=torch.int64), 16)


@pytest.mark.gpu
@pytest.mark.parametrize("T, K, E, kind", GPU_PLAN_CASES, ids=lambda v: str(v))
def test_gpu_decode_plan_is_the_plan(T, K, E, kind):
    for masked in (False, True):
        test_decode_plan_is_the_plan(T, K, E, kind, masked, device="cuda")
