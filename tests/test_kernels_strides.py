"""The Triton kernels on strided operands and the launchers' input checks, under the interpreter.

Legend: T tokens, D model dim, I expert hidden dim, N gate/up rows, E experts, K top-k, R routed rows (T*K),
S the column stride of a transposed view.

The kernels take x, dy and the weights with any strides. A transposed view of a ``[D, T]`` tensor has column stride
T, so ``d * stride`` passes 2^31 elements at large T: the kernels compute every such offset in int64 (with int32
offsets the process dies of SIGSEGV, in the interpreter as on a GPU).
"""

from __future__ import annotations

import pytest
import torch

from leanmoe import moe_experts
from tests.helpers import TOLERANCES, assert_close, make_problem

pytest.importorskip("triton")

from leanmoe.kernels.moe_common import ACTIVATION_CODES  # noqa: E402

SWIGLU = ACTIVATION_CODES["swiglu"]

# test_triton_gpu.py imports wide_buffer_problem from here: skip the tests, not the module.
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter tests run on CPU-only machines; "
                                "GPUs run test_triton_gpu.py")

GRAD_NAMES = ["dx", "dweights", "dgate_up_proj", "ddown_proj", "dgate_up_bias", "ddown_bias"]


def compare(problem, dy_TD, *, tol):
    """Triton against the reference with the given ``dy_TD``: y and every gradient."""
    ref_y = moe_experts(*problem.args(), **problem.kwargs(), backend="reference")
    out_y = moe_experts(*problem.args(), **problem.kwargs(), backend="triton")
    assert_close(out_y, ref_y, tol=tol, name="y")
    ref_grads = torch.autograd.grad(ref_y, problem.inputs(), dy_TD)
    out_grads = torch.autograd.grad(out_y, problem.inputs(), dy_TD)
    for name, out_g, ref_g in zip(GRAD_NAMES, out_grads, ref_grads, strict=False):
        assert_close(out_g, ref_g, tol=tol, name=name)


def transposed(t: torch.Tensor) -> torch.Tensor:
    """The same values with the last two dimensions' strides swapped (column stride = number of rows)."""
    return t.detach().transpose(-1, -2).contiguous().transpose(-1, -2)


STRIDED = {
    # id: how x, dy and the weights are laid out
    "x_transposed": dict(x="transposed"),  # x[t, d] at t + d*T: row stride 1, column stride T
    "x_column_slice": dict(x="slice"),  # a column window of a wider tensor: storage offset, row stride > D
    "dy_transposed": dict(dy="transposed"),
    "dy_expanded": dict(dy="expanded"),  # stride 0 in both dimensions, as autograd passes the gradient of y.sum()
    "weights_transposed": dict(weights="transposed"),  # [E, D, N] storage (Hugging Face's layout) seen as [E, N, D]
    "all": dict(x="transposed", dy="transposed", weights="transposed"),
}


# Every layout in float32; float16 (whose tiles load differently) for all of them at once.
STRIDED_PARAMS = [pytest.param(c, torch.float32, id=f"fp32-{c}") for c in STRIDED] + \
    [pytest.param("all", torch.float16, id="fp16-all")]


@pytest.mark.parametrize("case,dtype", STRIDED_PARAMS)
def test_strided_operands(case, dtype):
    layout = STRIDED[case]
    # T21-E5-K2, D40 I24: no size a multiple of a tile; the masks and the strides both matter.
    problem = make_problem(21, 40, 24, 5, 2, bias=True, dtype=dtype)
    if layout.get("x") == "transposed":
        problem.x_TD = transposed(problem.x_TD).requires_grad_()
        assert problem.x_TD.stride() == (1, 21)
    elif layout.get("x") == "slice":
        wide = torch.randn(21, 3 * 40, dtype=dtype)
        problem.x_TD = wide[:, 40:80].detach().requires_grad_()
        assert problem.x_TD.storage_offset() == 40
    if layout.get("weights") == "transposed":
        problem.gate_up_proj = transposed(problem.gate_up_proj).requires_grad_()
        problem.down_proj = transposed(problem.down_proj).requires_grad_()
    dy = torch.randn(21, 40, dtype=dtype)
    if layout.get("dy") == "transposed":
        dy = transposed(dy)
    elif layout.get("dy") == "expanded":
        dy = torch.ones((), dtype=dtype).expand(21, 40)
    compare(problem, dy, tol=TOLERANCES[dtype])


def wide_buffer_problem(T, D, I, E, K, *, dtype, device="cpu"):
    """A problem whose x, dy and both weights are transposed views into one ``[D, S]`` buffer of more than 2^31
    elements, so that the offsets of their last columns, ``(D-1) * S``, pass 2^31. Returns ``(problem, dy_TD, S)``.

    The buffer comes from ``torch.empty_strided``, which conftest does not poison: on the CPU untouched pages are
    never committed, and only the columns written here and read by the kernels are touched (a few MB resident).
    """
    S = 2**31 // (D - 1) + 64
    assert (D - 1) * S > 2**31
    problem = make_problem(T, D, I, E, K, bias=True, dtype=dtype, device=device)
    N = problem.gate_up_proj.shape[1]
    big_DS = torch.empty_strided((D, S), (S, 1), dtype=dtype, device=device)
    start = 0

    def place(value_XD: torch.Tensor) -> torch.Tensor:
        """A copy of ``value_XD`` ([X, D]) in the next X columns of the buffer: a [X, D] view of strides (1, S)."""
        nonlocal start
        view_XD = big_DS[:, start:start + value_XD.shape[0]].t()
        start += value_XD.shape[0]
        return view_XD.copy_(value_XD)

    problem.x_TD = place(problem.x_TD.detach()).requires_grad_()
    dy_TD = place(torch.randn(T, D, dtype=dtype, device=device))
    problem.gate_up_proj = place(problem.gate_up_proj.detach().reshape(E * N, D)).view(E, N, D).requires_grad_()
    problem.down_proj = place(problem.down_proj.detach().transpose(1, 2).reshape(E * I, D)).view(
        E, I, D).transpose(1, 2).requires_grad_()
    assert problem.x_TD.stride() == dy_TD.stride() == (1, S)
    assert problem.gate_up_proj.stride() == (N, 1, S) and problem.down_proj.stride() == (I, S, 1)
    return problem, dy_TD, S


@pytest.mark.slow
def test_column_offsets_past_2_31(monkeypatch):
    # float16 in a 4 GiB buffer, of which the kernels touch a few columns; crashed (SIGSEGV) with int32 offsets.
    from leanmoe.kernels import moe_bwd

    problem, dy_TD, S = wide_buffer_problem(20, 16, 16, 3, 2, dtype=torch.float16)
    # The backward must see dy as it is (stride S), not a contiguous copy, or the test proves nothing for dy.
    seen = []
    gate_up_bwd = moe_bwd.gate_up_bwd

    def spy(x_TD, dy_TD, *args, **kwargs):
        seen.append((x_TD.stride(), dy_TD.stride()))
        return gate_up_bwd(x_TD, dy_TD, *args, **kwargs)

    monkeypatch.setattr(moe_bwd, "gate_up_bwd", spy)
    compare(problem, dy_TD, tol=TOLERANCES[torch.float16])
    assert seen == [((1, S), (1, S))]


def _launch_inputs(E=3, R=8, D=16, N=32, dtype=torch.float32):
    return dict(x_TD=torch.randn(4, D, dtype=dtype), sorted_tokens_R=torch.arange(R) % 4,
                offsets_E=torch.tensor([3, 5, R], dtype=torch.int32), gate_up_proj=torch.randn(E, N, D, dtype=dtype))


BAD_LAUNCHES = {
    # id: (changes to the gate_up_fwd inputs, expected message)
    "x_float64": (dict(x_TD=torch.randn(4, 16, dtype=torch.float64)), r"x_TD: expected dtype .* got torch.float64"),
    "x_3d": (dict(x_TD=torch.randn(1, 4, 16)), r"x_TD: expected shape \[\*, \*\], got \[1, 4, 16\]"),
    "weights_other_dtype": (dict(gate_up_proj=torch.randn(3, 32, 16, dtype=torch.float16)),
                            r"gate_up_proj: expected dtype torch.float32, got torch.float16"),
    "weights_other_D": (dict(gate_up_proj=torch.randn(3, 32, 8)), r"gate_up_proj: expected shape \[\*, \*, 16\]"),
    "offsets_int64": (dict(offsets_E=torch.tensor([3, 5, 8])), r"offsets_E: expected dtype torch.int32, got "
                                                               r"torch.int64"),
    "offsets_too_short": (dict(offsets_E=torch.tensor([8], dtype=torch.int32)),
                          r"offsets_E: expected shape \[3\], got \[1\]"),
    "tokens_float": (dict(sorted_tokens_R=torch.zeros(8)), r"sorted_tokens_R: expected dtype torch.int64 or "
                                                           r"torch.int32, got torch.float32"),
}


@pytest.mark.parametrize("case", list(BAD_LAUNCHES), ids=list(BAD_LAUNCHES))
def test_gate_up_fwd_rejects_bad_inputs(case):
    from leanmoe.kernels.moe_fwd import gate_up_fwd

    changes, message = BAD_LAUNCHES[case]
    inputs = {**_launch_inputs(), **changes}
    with pytest.raises(ValueError, match=message):
        gate_up_fwd(inputs["x_TD"], inputs["sorted_tokens_R"], inputs["offsets_E"], inputs["gate_up_proj"], None,
                    act_code=SWIGLU, gated=True, interleaved=False, alpha=1.0, limit=1.0, n_saved=0)


def test_launchers_reject_bad_arguments():
    from leanmoe.kernels.moe_bwd import expert_weight_grad
    from leanmoe.kernels.moe_fwd import combine, gate_up_fwd, grouped_gemm

    i = _launch_inputs()
    with pytest.raises(ValueError, match=r"act_code: expected one of .* got 99"):
        gate_up_fwd(i["x_TD"], i["sorted_tokens_R"], i["offsets_E"], i["gate_up_proj"], None, act_code=99,
                    gated=True, interleaved=False, alpha=1.0, limit=1.0, n_saved=0)
    with pytest.raises(ValueError, match=r"n_saved: expected a row count in \[0, R=8\], got 9"):
        gate_up_fwd(i["x_TD"], i["sorted_tokens_R"], i["offsets_E"], i["gate_up_proj"], None, act_code=SWIGLU,
                    gated=True, interleaved=False, alpha=1.0, limit=1.0, n_saved=9)
    a_RK, b_ENK = torch.randn(8, 16), torch.randn(3, 32, 16)
    with pytest.raises(ValueError, match=r"scale_R: expected dtype torch.float32, got torch.float16"):
        grouped_gemm(a_RK, b_ENK, i["offsets_E"], torch.arange(8), torch.empty(8, 32),
                     scale_R=torch.ones(8, dtype=torch.float16))
    with pytest.raises(ValueError, match=r"out: expected shape \[\*, 32\], got \[8, 16\]"):
        grouped_gemm(a_RK, b_ENK, i["offsets_E"], torch.arange(8), torch.empty(8, 16))
    with pytest.raises(ValueError, match=r"out_RC: expected shape \[8, 16\], got \[6, 16\]"):
        combine(torch.randn(6, 16), torch.empty(4, 16), 2)
    with pytest.raises(ValueError, match=r"b: expected shape \[\*, 32\], got \[8, 16\]"):
        expert_weight_grad(torch.randn(8, 16), torch.randn(8, 16), i["offsets_E"], torch.empty(3, 16, 32))
