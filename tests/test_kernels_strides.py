"""The Triton backend on strided operands, under the interpreter (each launcher alone on strided operands, and
the launchers' input checks: tests/test_kernels.py).

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
