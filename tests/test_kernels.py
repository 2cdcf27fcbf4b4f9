"""Each kernel launcher alone against its torch reference (:mod:`leanmoe.kernels.reference`), and the launchers'
input checks. Under the interpreter on the CPU (float32, float16), compiled on a GPU where there is one.

Legend: T tokens, D model dim, I expert hidden dim, N gate/up rows (2I gated), E experts, K top-k, R routed rows
(T*K) in expert-sorted order, C columns.

The routings are built by hand (no plan), so each edge is the one named: empty experts, one expert with every row,
fewer rows than a tile, masked tokens whose rows sort past ``offsets_E[-1]``. Masked tokens' x and dy rows hold NaN,
and ``torch.empty`` is NaN-poisoned by conftest: a launcher that reads a row past ``offsets_E[-1]`` gets NaN in its
output, one that forgets a row leaves NaN, and one that writes a row it should not is caught by the NaN checks.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from leanmoe.activations import GATED_ACTIVATIONS
from tests.helpers import TOLERANCES, assert_close

pytest.importorskip("triton")

from leanmoe.kernels import reference  # noqa: E402
from leanmoe.kernels.moe_bwd import (  # noqa: E402
    activation_bwd_rows,
    expert_bias_grad,
    expert_weight_grad,
    gate_up_bwd,
    lora_rows_add_,
    low_rank_pair,
)
from leanmoe.kernels.moe_common import ACTIVATION_CODES  # noqa: E402
from leanmoe.kernels.moe_fwd import (  # noqa: E402
    combine,
    gate_up_fwd,
    grouped_gemm,
    low_rank_rows,
    tma_weight_desc,
)
from leanmoe.kernels.policy import saved_rows  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
D, I = 40, 24  # no multiple of a tile: every column mask matters
SWIGLU = ACTIVATION_CODES["swiglu"]


@dataclasses.dataclass
class Routing:
    T: int
    K: int
    keep_T: torch.Tensor  # bool [T]
    sorted_rows_R: torch.Tensor  # int64 [R]: sorted position -> token-slot row; masked tokens' rows last
    sorted_tokens_R: torch.Tensor  # int64 [R]
    offsets_E: torch.Tensor  # int32 [E], inclusive ends; offsets_E[-1] = kept rows

    @property
    def kept(self) -> int:
        return int(self.offsets_E[-1]) if self.offsets_E.numel() else 0

    @property
    def R(self) -> int:
        return self.sorted_rows_R.numel()


def make_routing(T: int, K: int, counts_E: list[int], n_masked: int = 0) -> Routing:
    """Rows of kept tokens in random order, split among experts by ``counts_E``; then the masked tokens' rows."""
    keep_T = torch.ones(T, dtype=torch.bool)
    keep_T[torch.randperm(T)[:n_masked]] = False
    rows_TK = torch.arange(T * K).view(T, K)
    kept_rows, masked_rows = rows_TK[keep_T].flatten(), rows_TK[~keep_T].flatten()
    assert sum(counts_E) == kept_rows.numel(), "counts_E must cover the kept rows"
    sorted_rows_R = torch.cat([kept_rows[torch.randperm(kept_rows.numel())], masked_rows])
    offsets_E = torch.tensor(counts_E).cumsum(0).to(torch.int32)
    return Routing(T, K, keep_T.to(DEVICE), sorted_rows_R.to(DEVICE), (sorted_rows_R // K).to(DEVICE),
                   offsets_E.to(DEVICE))


ROUTINGS = {
    # id: (T, K, counts_E, masked tokens)
    "E4-empty_expert": (10, 2, [5, 0, 9, 6], 0),  # expert 1 has no rows
    "E3-one_expert_all_rows": (40, 2, [0, 80, 0], 0),  # 80 rows: one expert spans two 64-row tiles
    "E5-fewer_rows_than_tile": (3, 2, [1, 2, 0, 2, 1], 0),  # R = 6, far below a tile
    "E7-masked_tail": (12, 2, [4, 0, 7, 3, 0, 0, 0], 5),  # 10 masked rows past offsets_E[-1], prime E
    "E3-all_masked": (4, 2, [0, 0, 0], 4),  # no kept row: every program exits
    "E2-no_rows": (0, 2, [0, 0], 0),  # T = 0: the launchers return before launching
}

# Every routing in float32 with contiguous operands; float16 and strided operands on the edges that cost most.
_MORE_CASES = [("E7-masked_tail", torch.float16, False), ("E3-one_expert_all_rows", torch.float16, False),
               ("E7-masked_tail", torch.float32, True), ("E4-empty_expert", torch.float16, True)]
CASES = [pytest.param(r, torch.float32, False, id=f"fp32-{r}") for r in ROUTINGS] + [
    pytest.param(r, dtype, strided, id=f"{str(dtype)[-7:].replace('float', 'fp')}-{r}{'-strided' if strided else ''}")
    for r, dtype, strided in _MORE_CASES]


def transposed(t: torch.Tensor) -> torch.Tensor:
    """The same values with the last two dimensions' strides swapped."""
    return t.transpose(-1, -2).contiguous().transpose(-1, -2)


def rand(*shape, dtype, scale=1.0, strided=False) -> torch.Tensor:
    t = (torch.randn(*shape) * scale).to(dtype=dtype, device=DEVICE)
    return transposed(t) if strided else t


def operands(case: str, dtype: torch.dtype, strided: bool, *, gated: bool = True):
    """A routing, x (masked rows NaN) and the gate/up and down weights (transposed views when ``strided``)."""
    T, K, counts_E, n_masked = ROUTINGS[case]
    routing = make_routing(T, K, counts_E, n_masked)
    E, N = len(counts_E), 2 * I if gated else I
    x_TD = rand(T, D, dtype=dtype, strided=strided)
    x_TD[~routing.keep_T] = float("nan")
    gate_up_proj = rand(E, N, D, dtype=dtype, scale=D ** -0.5, strided=strided)
    down_proj = rand(E, D, I, dtype=dtype, scale=I ** -0.5, strided=strided)
    gate_up_bias = rand(E, N, dtype=dtype, scale=0.1)
    return routing, x_TD, gate_up_proj, down_proj, gate_up_bias


def assert_rows(out: torch.Tensor, ref: torch.Tensor, written: torch.Tensor, *, tol: float, name: str) -> None:
    """``out`` matches ``ref`` on the ``written`` rows (bool mask or row count) and is untouched (NaN) elsewhere."""
    if isinstance(written, int):
        written = torch.arange(out.shape[0], device=out.device) < written
    assert_close(out[written], ref[written], tol=tol, name=name)
    assert out[~written].isnan().all(), f"{name}: the launcher wrote rows it must leave alone"


@pytest.fixture(params=["0", "1"], ids=["pointer_w", "tma_w"])
def tma(request, monkeypatch):
    """Both ways of the gate/up forward's weight loads (``LEANMOE_TMA``: ``1`` takes TMA wherever the weights
    allow it, the interpreter included; on a GPU without TMA it keeps the pointer loads)."""
    monkeypatch.setenv("LEANMOE_TMA", request.param)
    return request.param == "1"


def expects_tma(gate_up_proj: torch.Tensor, tma: bool, *, interleaved: bool = False) -> bool:
    on_gpu_with_tma = DEVICE != "cuda" or torch.cuda.get_device_capability()[0] >= 9
    return tma and on_gpu_with_tma and gate_up_proj.is_contiguous() and not interleaved


@pytest.mark.parametrize("case,dtype,strided", CASES)
def test_gate_up_fwd(case, dtype, strided, tma):
    routing, x_TD, gate_up_proj, _, gate_up_bias = operands(case, dtype, strided)
    desc = tma_weight_desc(gate_up_proj, gated=True, interleaved=False)
    assert (desc is not None) == expects_tma(gate_up_proj, tma), "the TMA rule chose the other path"
    n_saved = saved_rows(routing.R, 50)  # half: in the masked case the saved range passes offsets_E[-1]
    kwargs = dict(act_code=SWIGLU, gated=True, interleaved=False, alpha=1.702, limit=7.0, n_saved=n_saved)
    args = (x_TD, routing.sorted_tokens_R, routing.offsets_E, gate_up_proj, gate_up_bias)
    out_h, out_saved = gate_up_fwd(*args, **kwargs)
    ref_h, ref_saved = reference.gate_up_fwd_reference(*args, **kwargs)
    assert (out_h.dtype, out_saved.shape) == (dtype, (n_saved, 2 * I))
    tol = TOLERANCES[dtype]
    assert_rows(out_h, ref_h, routing.kept, tol=tol, name="h_RI")
    assert_rows(out_saved, ref_saved, routing.kept, tol=tol, name="saved_SN")


def test_tma_weight_loads_give_the_pointer_loads_bits(monkeypatch):
    """Both weight-load paths sum in the same order: the same bits (forward and the recomputing backward rely on
    it), with bias, saved rows and a LoRA term."""
    routing, x_TD, gate_up_proj, _, gate_up_bias = operands("E3-one_expert_all_rows", torch.float16, False)
    kwargs = dict(act_code=SWIGLU, gated=True, interleaved=False, alpha=1.0, limit=7.0, n_saved=routing.R,
                  lora_in_RP=rand(routing.R, 8, dtype=torch.float16), lora_B=rand(3, 2 * I, 8, dtype=torch.float16))
    args = (x_TD, routing.sorted_tokens_R, routing.offsets_E, gate_up_proj, gate_up_bias)
    outs = {}
    for mode in ("0", "1"):
        monkeypatch.setenv("LEANMOE_TMA", mode)
        outs[mode] = gate_up_fwd(*args, **kwargs)
    for a, b in zip(outs["0"], outs["1"], strict=True):
        assert torch.equal(a[: routing.kept], b[: routing.kept])


def test_tma_rule(monkeypatch):
    w = rand(3, 2 * I, D, dtype=torch.float32)
    monkeypatch.setenv("LEANMOE_TMA", "auto")
    assert (tma_weight_desc(w, gated=True, interleaved=False) is not None) == (
        DEVICE == "cuda" and torch.cuda.get_device_capability()[0] >= 9)  # auto: never under the interpreter
    monkeypatch.setenv("LEANMOE_TMA", "1")
    assert tma_weight_desc(w, gated=True, interleaved=True) is None  # gate and up rows alternate
    assert tma_weight_desc(transposed(w), gated=True, interleaved=False) is None  # not contiguous
    assert tma_weight_desc(rand(3, 2 * I, 36, dtype=torch.float16), gated=True, interleaved=False) is None  # 72 B rows
    monkeypatch.setenv("LEANMOE_TMA", "0")
    assert tma_weight_desc(w, gated=True, interleaved=False) is None
    monkeypatch.setenv("LEANMOE_TMA", "yes")
    with pytest.raises(ValueError, match="LEANMOE_TMA.*'yes'"):
        tma_weight_desc(w, gated=True, interleaved=False)


GATE_UP_ACTIVATIONS = [(name, interleaved) for name in ACTIVATION_CODES for interleaved in (False, True)
                       if not interleaved or name in GATED_ACTIVATIONS]


@pytest.mark.parametrize("name,interleaved", GATE_UP_ACTIVATIONS,
                         ids=[f"{n}-{'inter' if il else 'concat'}" for n, il in GATE_UP_ACTIVATIONS])
def test_gate_up_fwd_activations(name, interleaved, tma):
    # Every activation code and both layouts, with a clamp limit that N(0, 1)-ish pre-activations hit.
    gated = name in GATED_ACTIVATIONS
    routing, x_TD, gate_up_proj, _, gate_up_bias = operands("E4-empty_expert", torch.float32, False, gated=gated)
    desc = tma_weight_desc(gate_up_proj, gated=gated, interleaved=interleaved)
    assert (desc is not None) == expects_tma(gate_up_proj, tma, interleaved=gated and interleaved)
    kwargs = dict(act_code=ACTIVATION_CODES[name], gated=gated, interleaved=interleaved,
                  alpha=1.702, limit=0.75 if name == "clamped_swiglu" else 7.0, n_saved=routing.R)
    args = (x_TD, routing.sorted_tokens_R, routing.offsets_E, gate_up_proj, gate_up_bias)
    out_h, out_saved = gate_up_fwd(*args, **kwargs)
    ref_h, ref_saved = reference.gate_up_fwd_reference(*args, **kwargs)
    assert_close(out_h, ref_h, tol=TOLERANCES[torch.float32], name="h_RI")
    assert_close(out_saved, ref_saved, tol=TOLERANCES[torch.float32], name="saved_SN")


@pytest.mark.parametrize("bias_and_scale", [False, True], ids=["plain", "bias-scale"])
@pytest.mark.parametrize("case,dtype,strided", CASES)
def test_grouped_gemm(case, dtype, strided, bias_and_scale):
    # As in dx: a = dgate_up (sorted rows), b = gate_up_proj seen as [E, D, N]; rows scattered to token-slot order.
    routing, _, gate_up_proj, _, _ = operands(case, dtype, strided)
    E, N = gate_up_proj.shape[:2]
    a_RN = rand(routing.R, N, dtype=dtype)
    a_RN[routing.kept:] = float("nan")  # masked rows: never read
    b_EDN = gate_up_proj.transpose(1, 2)
    kwargs = dict(bias_EN=rand(E, D, dtype=dtype), scale_R=torch.rand(routing.R, device=DEVICE)) \
        if bias_and_scale else {}
    wide = torch.empty(routing.R, 3 * D, dtype=dtype, device=DEVICE)
    out_RD = wide[:, D:2 * D] if strided else torch.empty(routing.R, D, dtype=dtype, device=DEVICE)
    ref_RD = torch.full((routing.R, D), float("nan"), dtype=dtype, device=DEVICE)
    args = (a_RN, b_EDN, routing.offsets_E, routing.sorted_rows_R)
    assert grouped_gemm(*args, out_RD, **kwargs) is out_RD
    reference.grouped_gemm_reference(*args, ref_RD, **kwargs)
    written = torch.zeros(routing.R, dtype=torch.bool, device=DEVICE)
    written[routing.sorted_rows_R[:routing.kept]] = True
    assert_rows(out_RD, ref_RD, written, tol=TOLERANCES[dtype], name="out")
    if strided:
        assert wide[:, :D].isnan().all() and wide[:, 2 * D:].isnan().all(), "wrote outside the column slice"


LORA_CASES = [pytest.param(case, dtype, rank, id=f"{str(dtype)[-7:].replace('float', 'fp')}-{case}-r{rank}")
              for case, dtype, rank in [("E4-empty_expert", torch.float32, 1), ("E7-masked_tail", torch.float32, 8),
                                        ("E3-one_expert_all_rows", torch.float32, 24),
                                        ("E5-fewer_rows_than_tile", torch.float16, 8),
                                        ("E7-masked_tail", torch.float16, 16), ("E2-no_rows", torch.float32, 4)]]


@pytest.mark.parametrize("interleaved", [False, True], ids=["concat", "inter"])
@pytest.mark.parametrize("case,dtype,rank", LORA_CASES)
def test_gate_up_fwd_lora_term(case, dtype, rank, interleaved):
    # pre = x W^T + lo B^T + b: ranks below the MMA's 16 (masked), and one past it (24 -> a 32-wide block); B as a
    # transposed view (any strides); the saved copy and the store-h-less recompute hold the same pre-activations.
    routing, x_TD, gate_up_proj, _, gate_up_bias = operands(case, dtype, False)
    E, N = gate_up_proj.shape[:2]
    lo_RP = rand(routing.R, rank, dtype=dtype, scale=0.5)
    lo_RP[routing.kept:] = float("nan")  # masked rows: never read
    lora_B = rand(E, N, rank, dtype=dtype, scale=rank ** -0.5, strided=True)
    kwargs = dict(act_code=SWIGLU, gated=True, interleaved=interleaved, alpha=1.702, limit=7.0,
                  n_saved=routing.R, lora_in_RP=lo_RP, lora_B=lora_B)
    args = (x_TD, routing.sorted_tokens_R, routing.offsets_E, gate_up_proj, gate_up_bias)
    out_h, out_saved = gate_up_fwd(*args, **kwargs)
    ref_h, ref_saved = reference.gate_up_fwd_reference(*args, **kwargs)
    tol = TOLERANCES[dtype]
    assert_rows(out_h, ref_h, routing.kept, tol=tol, name="h_RI")
    assert_rows(out_saved, ref_saved, routing.kept, tol=tol, name="saved_SN")
    h_none, again = gate_up_fwd(*args, **kwargs, store_h=False)
    assert h_none.shape == (0, I) and torch.equal(again[:routing.kept], out_saved[:routing.kept])


@pytest.mark.parametrize("case,dtype,rank", LORA_CASES)
def test_grouped_gemm_lora_term(case, dtype, rank):
    routing, _, _, down_proj, _ = operands(case, dtype, False)
    E = down_proj.shape[0]
    h_RI = rand(routing.R, I, dtype=dtype)
    lo_RP = rand(routing.R, rank, dtype=dtype, scale=0.5)
    h_RI[routing.kept:] = float("nan")
    lo_RP[routing.kept:] = float("nan")
    kwargs = dict(bias_EN=rand(E, D, dtype=dtype), scale_R=torch.rand(routing.R, device=DEVICE), lora_in_RP=lo_RP,
                  lora_B=rand(E, rank, D, dtype=dtype, scale=rank ** -0.5).transpose(1, 2))  # [E, D, r] view
    args = (h_RI, down_proj, routing.offsets_E, routing.sorted_rows_R)
    out_RD = grouped_gemm(*args, torch.empty(routing.R, D, dtype=dtype, device=DEVICE), **kwargs)
    ref_RD = reference.grouped_gemm_reference(*args, torch.full((routing.R, D), float("nan"), dtype=dtype,
                                                                device=DEVICE), **kwargs)
    written = torch.zeros(routing.R, dtype=torch.bool, device=DEVICE)
    written[routing.sorted_rows_R[:routing.kept]] = True
    assert_rows(out_RD, ref_RD, written, tol=TOLERANCES[dtype], name="out")


def test_lora_term_rejects():
    routing, x_TD, gate_up_proj, down_proj, _ = operands("E4-empty_expert", torch.float32, False)
    E, N = gate_up_proj.shape[:2]
    args = (x_TD, routing.sorted_tokens_R, routing.offsets_E, gate_up_proj, None)
    kwargs = dict(act_code=SWIGLU, gated=True, interleaved=False, alpha=1.702, limit=7.0, n_saved=0)
    lo = rand(routing.R, 8, dtype=torch.float32)
    with pytest.raises(ValueError, match="both"):
        gate_up_fwd(*args, **kwargs, lora_in_RP=lo)
    with pytest.raises(ValueError, match="lora_B"):
        gate_up_fwd(*args, **kwargs, lora_in_RP=lo, lora_B=rand(E, N, 4, dtype=torch.float32))
    with pytest.raises(ValueError, match="lora_in_RP"):
        gate_up_fwd(*args, **kwargs, lora_in_RP=lo.half(), lora_B=rand(E, N, 8, dtype=torch.float32))


@pytest.mark.parametrize("masked", [False, True], ids=["no_mask", "mask"])
@pytest.mark.parametrize("case,dtype,strided", CASES)
def test_combine(case, dtype, strided, masked):
    routing, *_ = operands(case, dtype, strided)
    C = 200  # more than one column block
    out_RC = rand(routing.R, C, dtype=dtype)
    out_RC.view(routing.T, routing.K, C)[~routing.keep_T] = float("nan")  # masked tokens' rows, never written
    keep_T = routing.keep_T if masked else None
    if not masked and not routing.keep_T.all():
        out_RC = out_RC.nan_to_num(0.0)  # without a mask every row is read: give the masked ones values
    y_TC = torch.empty(routing.T, 2 * C, dtype=dtype, device=DEVICE)[:, ::2] if strided else \
        torch.empty(routing.T, C, dtype=dtype, device=DEVICE)
    ref_TC = reference.combine_reference(out_RC, torch.empty(routing.T, C, dtype=dtype, device=DEVICE),
                                         routing.K, keep_T)
    assert combine(out_RC, y_TC, routing.K, keep_T) is y_TC
    assert_close(y_TC, ref_TC, tol=TOLERANCES[dtype], name="y")
    if masked:
        assert (y_TC[~routing.keep_T] == 0).all(), "masked tokens' rows are not exact zeros"


@pytest.mark.parametrize("case,dtype,strided", CASES)
def test_gate_up_bwd(case, dtype, strided):
    routing, x_TD, gate_up_proj, down_proj, gate_up_bias = operands(case, dtype, strided)
    dy_TD = rand(routing.T, D, dtype=dtype, strided=strided)
    dy_TD[~routing.keep_T] = float("nan")
    scale_R = torch.rand(routing.R, device=DEVICE)
    kwargs = dict(act_code=SWIGLU, gated=True, interleaved=False, alpha=1.702, limit=7.0)
    # Half the rows saved: tiles inside the saved range load, the others recompute.
    _, saved_SN = gate_up_fwd(x_TD, routing.sorted_tokens_R, routing.offsets_E, gate_up_proj, gate_up_bias,
                              n_saved=saved_rows(routing.R, 50), **kwargs)
    args = (x_TD, dy_TD, routing.sorted_tokens_R, routing.offsets_E, scale_R, gate_up_proj, gate_up_bias, down_proj,
            saved_SN)
    assert_activation_grads(gate_up_bwd(*args, **kwargs), reference.gate_up_bwd_reference(*args, **kwargs),
                            routing.kept, dtype)


def assert_activation_grads(out, ref, kept: int, dtype: torch.dtype) -> None:
    """``(dgate_up_RN, hw_RI, dweights_R)`` of a gate/up backward launcher against its reference on the kept rows;
    the rows past them untouched, and their fp32 routing-weight gradient exactly zero."""
    tol = TOLERANCES[dtype]
    assert_rows(out[0], ref[0], kept, tol=tol, name="dgate_up_RN")
    assert_rows(out[1], ref[1], kept, tol=tol, name="hw_RI")
    assert out[2].dtype == torch.float32
    assert_close(out[2], ref[2], tol=tol, name="dweights_R")
    assert (out[2][kept:] == 0).all(), "masked rows' routing-weight gradient is not exact zero"


@pytest.mark.parametrize("name,interleaved,n_saved", [
    ("clamped_swiglu", True, 0), ("clamped_swiglu", True, 100), ("geglu_exact", False, 100), ("relu2", False, 0),
    ("gelu", False, 100)])
def test_gate_up_bwd_activations(name, interleaved, n_saved):
    gated = name in GATED_ACTIVATIONS
    routing, x_TD, gate_up_proj, down_proj, gate_up_bias = operands("E3-one_expert_all_rows", torch.float32, False,
                                                                    gated=gated)
    dy_TD = rand(routing.T, D, dtype=torch.float32)
    scale_R = torch.rand(routing.R, device=DEVICE)
    kwargs = dict(act_code=ACTIVATION_CODES[name], gated=gated, interleaved=interleaved, alpha=1.702,
                  limit=0.75 if name == "clamped_swiglu" else 7.0)
    _, saved_SN = gate_up_fwd(x_TD, routing.sorted_tokens_R, routing.offsets_E, gate_up_proj, gate_up_bias,
                              n_saved=saved_rows(routing.R, n_saved), **kwargs)
    args = (x_TD, dy_TD, routing.sorted_tokens_R, routing.offsets_E, scale_R, gate_up_proj, gate_up_bias, down_proj,
            saved_SN)
    for field, out_t, ref_t in zip(["dgate_up_RN", "hw_RI", "dweights_R"], gate_up_bwd(*args, **kwargs),
                                   reference.gate_up_bwd_reference(*args, **kwargs), strict=True):
        assert_close(out_t, ref_t, tol=TOLERANCES[torch.float32], name=field)


def _rows_inputs(case, dtype, gated=True, hidden=I):
    """Pre-activations ``[gate | up]`` and ``dh`` of a routing's sorted rows, NaN past the kept rows."""
    T, K, counts_E, n_masked = ROUTINGS[case]
    routing = make_routing(T, K, counts_E, n_masked)
    N = 2 * hidden if gated else hidden
    pre_RN = rand(routing.R, N, dtype=dtype)
    dh_RI = rand(routing.R, hidden, dtype=dtype)
    pre_RN[routing.kept:] = float("nan")
    dh_RI[routing.kept:] = float("nan")
    return routing, pre_RN, dh_RI, torch.rand(routing.R, device=DEVICE)


@pytest.mark.parametrize("in_place", [False, True], ids=["new", "in_place"])
@pytest.mark.parametrize("case,dtype,_strided", CASES)
def test_activation_bwd_rows(case, dtype, _strided, in_place):
    routing, pre_RN, dh_RI, scale_R = _rows_inputs(case, dtype)
    kwargs = dict(act_code=SWIGLU, gated=True, interleaved=False, alpha=1.702, limit=7.0)
    ref = reference.activation_bwd_rows_reference(pre_RN.clone(), dh_RI.clone(), scale_R, routing.offsets_E,
                                                  **kwargs)
    out = activation_bwd_rows(pre_RN, dh_RI, scale_R, routing.offsets_E, **kwargs,
                              dgate_up_RN=pre_RN if in_place else None)
    assert (out[0] is pre_RN) == in_place and out[1] is dh_RI
    assert_activation_grads(out, ref, routing.kept, dtype)


@pytest.mark.parametrize("name,interleaved", GATE_UP_ACTIVATIONS,
                         ids=[f"{n}-{'inter' if il else 'concat'}" for n, il in GATE_UP_ACTIVATIONS])
def test_activation_bwd_rows_activations(name, interleaved):
    gated = name in GATED_ACTIVATIONS
    # 72 hidden columns: three column blocks of the interpreter's row kernel, the last one partial.
    routing, pre_RN, dh_RI, scale_R = _rows_inputs("E3-one_expert_all_rows", torch.float32, gated, hidden=72)
    kwargs = dict(act_code=ACTIVATION_CODES[name], gated=gated, interleaved=interleaved, alpha=1.702,
                  limit=0.75 if name == "clamped_swiglu" else 7.0)
    ref = reference.activation_bwd_rows_reference(pre_RN.clone(), dh_RI.clone(), scale_R, routing.offsets_E,
                                                  **kwargs)
    for field, out_t, ref_t in zip(["dgate_up_RN", "hw_RI", "dweights_R"],
                                   activation_bwd_rows(pre_RN, dh_RI, scale_R, routing.offsets_E, **kwargs), ref,
                                   strict=True):
        assert_close(out_t, ref_t, tol=TOLERANCES[torch.float32], name=field)


@pytest.mark.parametrize("rank", [1, 8, 24])
@pytest.mark.parametrize("case,dtype,strided", CASES)
def test_lora_rows_add(case, dtype, strided, rank):
    """``out[r] += s lo[r] @ la[e]`` in place on the kept rows (the down adapter's dh term), rows past them
    untouched."""
    T, K, counts_E, n_masked = ROUTINGS[case]
    routing = make_routing(T, K, counts_E, n_masked)
    E, N = routing.offsets_E.numel(), 40  # 40 columns: two column tiles of the interpreter's kernel, one partial
    out_RN = rand(routing.R, N, dtype=dtype)
    out_RN[routing.kept:] = float("nan")
    lo_RP = rand(routing.R, rank, dtype=dtype)
    la_EPN = rand(E, rank, N, dtype=dtype, strided=strided)
    ref = reference.lora_rows_add_reference(out_RN.clone(), lo_RP, la_EPN, routing.offsets_E, 0.5)
    out = lora_rows_add_(out_RN, lo_RP, la_EPN, routing.offsets_E, 0.5)
    assert out is out_RN
    assert_rows(out, ref, routing.kept, tol=TOLERANCES[dtype], name="out_RN")


@pytest.mark.parametrize("rank", [1, 8, 24])
@pytest.mark.parametrize("case,dtype,strided", CASES)
def test_low_rank_pair(case, dtype, strided, rank):
    """``s a[r] @ w[e]`` for the kept rows and ``d w[e] = a^T b`` over them (a LoRA factor's two terms in one
    pass); masked rows hold NaN in ``a`` and ``b``, so a read past ``offsets_E[-1]`` poisons the gradient."""
    T, K, counts_E, n_masked = ROUTINGS[case]
    routing = make_routing(T, K, counts_E, n_masked)
    E, X = routing.offsets_E.numel(), 40  # 40 columns: three chunks of the interpreter's kernel, one partial
    a_RX = rand(routing.R, X, dtype=dtype)
    b_RP = rand(routing.R, rank, dtype=dtype)
    a_RX[routing.kept:] = float("nan")
    b_RP[routing.kept:] = float("nan")
    w_EXP = rand(E, X, rank, dtype=dtype, strided=strided)
    ref_low, ref_dw = reference.low_rank_pair_reference(a_RX, w_EXP, b_RP, routing.offsets_E, scale=0.5)
    low, dw = low_rank_pair(a_RX, w_EXP, b_RP, routing.offsets_E, scale=0.5)
    assert low.shape == (routing.R, rank) and low.dtype == dtype and dw.shape == w_EXP.shape and dw.is_contiguous()
    assert_close(low[:routing.kept], ref_low[:routing.kept], tol=TOLERANCES[dtype], name="low_RP")
    assert_close(dw, ref_dw, tol=TOLERANCES[dtype], name="dw_EXP")
    empty = torch.tensor(counts_E, device=DEVICE) == 0
    assert (dw[empty] == 0).all(), "an expert without rows must get an exact zero gradient"


@pytest.mark.parametrize("gathered", [True, False], ids=["x_rows", "sorted_rows"])
@pytest.mark.parametrize("rank", [1, 8, 24])
@pytest.mark.parametrize("case,dtype,strided", CASES)
def test_low_rank_rows(case, dtype, strided, rank, gathered):
    """``s a[rows[r]] @ A[e]^T`` for the kept rows: the gate/up adapter's ``s x A^T`` (x's rows gathered, masked
    tokens' rows NaN) and the down adapter's ``s h A^T`` (rows in expert order, NaN past the kept ones)."""
    T, K, counts_E, n_masked = ROUTINGS[case]
    routing = make_routing(T, K, counts_E, n_masked)
    E, X = routing.offsets_E.numel(), 72  # 72 columns: the interpreter's 32-wide steps end in a partial one
    if gathered:
        a = rand(T, X, dtype=dtype, strided=strided)
        a[~routing.keep_T] = float("nan")
        kwargs = dict(a_rows_R=routing.sorted_tokens_R)
    else:
        a = rand(routing.R, X, dtype=dtype, strided=strided)
        a[routing.kept:] = float("nan")
        kwargs = {}
    w_EPX = rand(E, rank, X, dtype=dtype, strided=strided)
    out = low_rank_rows(a, w_EPX, routing.offsets_E, scale=0.5, **kwargs)
    ref = reference.low_rank_rows_reference(a, w_EPX, routing.offsets_E, scale=0.5, **kwargs)
    assert out.shape == (routing.R, rank) and out.dtype == dtype
    assert_close(out[:routing.kept], ref[:routing.kept], tol=TOLERANCES[dtype], name="out_RP")


def test_low_rank_rows_rejects():
    routing = make_routing(*ROUTINGS["E4-empty_expert"][:3], 0)
    E = routing.offsets_E.numel()
    a = rand(routing.R, 8, dtype=torch.float32)
    with pytest.raises(ValueError, match="w_EPX"):
        low_rank_rows(a, rand(E, 4, 9, dtype=torch.float32), routing.offsets_E)
    with pytest.raises(ValueError, match="w_EPX"):
        low_rank_rows(a, rand(E, 4, 8, dtype=torch.float16), routing.offsets_E)
    with pytest.raises(ValueError, match="at most 128"):
        low_rank_rows(a, rand(E, 130, 8, dtype=torch.float32), routing.offsets_E)
    with pytest.raises(ValueError, match="offsets_E"):
        low_rank_rows(a, rand(E, 4, 8, dtype=torch.float32), routing.offsets_E.long())
    with pytest.raises(ValueError, match="a_rows_R"):
        low_rank_rows(a, rand(E, 4, 8, dtype=torch.float32), routing.offsets_E,
                      a_rows_R=routing.sorted_tokens_R.float())


def test_low_rank_pair_rejects():
    routing = make_routing(*ROUTINGS["E4-empty_expert"][:3], 0)
    E = routing.offsets_E.numel()
    a_RX, b_RP = rand(routing.R, 8, dtype=torch.float32), rand(routing.R, 4, dtype=torch.float32)
    with pytest.raises(ValueError, match="w_EXP"):
        low_rank_pair(a_RX, rand(E, 8, 5, dtype=torch.float32), b_RP, routing.offsets_E)
    with pytest.raises(ValueError, match="b_RP"):
        low_rank_pair(a_RX, rand(E, 8, 4, dtype=torch.float32), b_RP.half(), routing.offsets_E)
    with pytest.raises(ValueError, match="a_RX"):
        low_rank_pair(transposed(a_RX), rand(E, 8, 4, dtype=torch.float32), b_RP, routing.offsets_E)
    with pytest.raises(ValueError, match="offsets_E"):
        low_rank_pair(a_RX, rand(E, 8, 4, dtype=torch.float32), b_RP, routing.offsets_E.long())


def test_lora_rows_add_rejects():
    routing = make_routing(*ROUTINGS["E4-empty_expert"][:3], 0)
    out_RN = rand(routing.R, 8, dtype=torch.float32)
    lo_RP = rand(routing.R, 4, dtype=torch.float32)
    with pytest.raises(ValueError, match="la_EPN"):
        lora_rows_add_(out_RN, lo_RP, rand(routing.offsets_E.numel(), 5, 8, dtype=torch.float32), routing.offsets_E,
                       1.0)
    with pytest.raises(ValueError, match="lo_RP"):
        lora_rows_add_(out_RN, lo_RP.half(), rand(routing.offsets_E.numel(), 4, 8, dtype=torch.float32),
                       routing.offsets_E, 1.0)
    with pytest.raises(ValueError, match="out_RN"):
        lora_rows_add_(transposed(out_RN), lo_RP, rand(routing.offsets_E.numel(), 4, 8, dtype=torch.float32),
                       routing.offsets_E, 1.0)


def test_activation_bwd_rows_rejects():
    routing, pre_RN, dh_RI, scale_R = _rows_inputs("E4-empty_expert", torch.float32)
    kwargs = dict(act_code=SWIGLU, gated=True, alpha=1.702, limit=7.0)
    with pytest.raises(ValueError, match="interleaved"):
        activation_bwd_rows(pre_RN, dh_RI, scale_R, routing.offsets_E, interleaved=True, dgate_up_RN=pre_RN,
                            **kwargs)
    with pytest.raises(ValueError, match="dh_RI"):
        activation_bwd_rows(pre_RN, dh_RI[:, :-1], scale_R, routing.offsets_E, interleaved=False, **kwargs)
    with pytest.raises(ValueError, match="pre_RN"):
        activation_bwd_rows(pre_RN[:, :-1], dh_RI, scale_R, routing.offsets_E, interleaved=False, **kwargs)
    with pytest.raises(ValueError, match="scale_R"):
        activation_bwd_rows(pre_RN, dh_RI, scale_R.double(), routing.offsets_E, interleaved=False, **kwargs)


@pytest.mark.parametrize("scaled", [False, True])
@pytest.mark.parametrize("case,dtype,_strided", CASES)
def test_expert_bias_grad(case, dtype, _strided, scaled):
    T, K, counts_E, n_masked = ROUTINGS[case]
    routing = make_routing(T, K, counts_E, n_masked)
    E = routing.offsets_E.numel()
    a_RM = rand(routing.R, D, dtype=dtype)
    a_RM[routing.kept:] = float("nan")
    scale_R = torch.rand(routing.R, device=DEVICE) if scaled else None
    out = expert_bias_grad(a_RM, routing.offsets_E, torch.empty(E, D, dtype=dtype, device=DEVICE), scale_R=scale_R)
    ref = torch.zeros(E, D, dtype=dtype, device=DEVICE)
    reference.expert_weight_grad_reference(a_RM, a_RM[:, :1], routing.offsets_E, torch.empty(E, D, 1, dtype=dtype,
                                           device=DEVICE), dbias_EM=ref, bias_scale_R=scale_R)
    assert_close(out, ref, tol=TOLERANCES[dtype], name="dbias_EM")


@pytest.mark.parametrize("use", ["d_down_proj", "d_gate_up_proj", "d_lora_A"])
@pytest.mark.parametrize("case,dtype,strided", CASES)
def test_expert_weight_grad(case, dtype, strided, use):
    routing, x_TD, gate_up_proj, down_proj, _ = operands(case, dtype, strided)
    E = routing.offsets_E.numel()
    if use == "d_down_proj":
        # out[e] = dy[tokens]^T hw (a gathered), dbias[e] = sum of w_r dy[token_r].
        dy_TD = rand(routing.T, D, dtype=dtype, strided=strided)
        dy_TD[~routing.keep_T] = float("nan")
        b_RX = rand(routing.R, I, dtype=dtype)
        b_RX[routing.kept:] = float("nan")
        a, b, M, X = dy_TD, b_RX, D, I
        kwargs = dict(a_rows_R=routing.sorted_tokens_R, bias_scale_R=torch.rand(routing.R, device=DEVICE))
    elif use == "d_lora_A":
        # The gate/up adapter's d A^T: x[tokens]^T dxlow (a gathered, rank-wide output tiles), into a transposed
        # view of [E, P, D].
        x_TD = x_TD.clone()
        x_TD[~routing.keep_T] = float("nan")
        b_RP = rand(routing.R, 16, dtype=dtype)
        b_RP[routing.kept:] = float("nan")
        a, b, M, X = x_TD, b_RP, D, 16
        kwargs = dict(a_rows_R=routing.sorted_tokens_R)
    else:
        # out[e] = dgate_up^T x[tokens] (b gathered), dbias[e] = sum of dgate_up rows.
        a_RN = rand(routing.R, 2 * I, dtype=dtype)
        a_RN[routing.kept:] = float("nan")
        a, b, M, X = a_RN, x_TD, 2 * I, D
        kwargs = dict(b_rows_R=routing.sorted_tokens_R)
    outs = []
    for fn in (expert_weight_grad, reference.expert_weight_grad_reference):
        out_EMX = torch.empty(E, M, X, dtype=dtype, device=DEVICE)
        if use == "d_lora_A":
            out_EMX = torch.empty(E, X, M, dtype=dtype, device=DEVICE).transpose(1, 2)
        dbias_EM = torch.empty(E, M, dtype=dtype, device=DEVICE)
        assert fn(a, b, routing.offsets_E, out_EMX, dbias_EM=dbias_EM, **kwargs) is out_EMX
        outs.append((out_EMX, dbias_EM))
    (out_w, out_b), (ref_w, ref_b) = outs
    tol = TOLERANCES[dtype]
    assert_close(out_w, ref_w, tol=tol, name="out_EMN")
    assert_close(out_b, ref_b, tol=tol, name="dbias_EM")
    empty_E = torch.diff(routing.offsets_E, prepend=routing.offsets_E.new_zeros(1)) == 0
    assert (out_w[empty_E] == 0).all() and (out_b[empty_E] == 0).all(), "experts with no rows must get zeros"


# The launchers' checks: ValueError naming the field, the bad value and the expected one.


def _fwd_inputs(E=3, R=8, dtype=torch.float32):
    return dict(x_TD=torch.randn(4, 16, dtype=dtype), sorted_tokens_R=torch.arange(R) % 4,
                offsets_E=torch.tensor([3, 5, R], dtype=torch.int32), gate_up_proj=torch.randn(E, 32, 16, dtype=dtype))


BAD_GATE_UP_FWD = {
    # id: (changes to the gate_up_fwd inputs, expected message)
    "x_float64": (dict(x_TD=torch.randn(4, 16, dtype=torch.float64)), r"x_TD: expected dtype .* got torch.float64"),
    "x_3d": (dict(x_TD=torch.randn(1, 4, 16)), r"x_TD: expected shape \[\*, \*\], got \[1, 4, 16\]"),
    "weights_other_dtype": (dict(gate_up_proj=torch.randn(3, 32, 16, dtype=torch.float16)),
                            r"gate_up_proj: expected dtype torch.float32, got torch.float16"),
    "weights_other_D": (dict(gate_up_proj=torch.randn(3, 32, 8)), r"gate_up_proj: expected shape \[\*, \*, 16\]"),
    "weights_odd_N": (dict(gate_up_proj=torch.randn(3, 31, 16)), r"gate_up_proj: a gated activation needs an even "
                                                                 r"number of gate/up rows, got N=31"),
    "offsets_int64": (dict(offsets_E=torch.tensor([3, 5, 8])), r"offsets_E: expected dtype torch.int32, got "
                                                               r"torch.int64"),
    "offsets_too_short": (dict(offsets_E=torch.tensor([8], dtype=torch.int32)),
                          r"offsets_E: expected shape \[3\], got \[1\]"),
    "tokens_float": (dict(sorted_tokens_R=torch.zeros(8)), r"sorted_tokens_R: expected dtype torch.int64 or "
                                                           r"torch.int32, got torch.float32"),
    "bias_wrong_shape": (dict(gate_up_bias=torch.randn(3, 16)), r"gate_up_bias: expected shape \[3, 32\], got "
                                                                r"\[3, 16\]"),
    "act_code": (dict(act_code=99), r"act_code: expected one of .* got 99"),
    "n_saved": (dict(n_saved=9), r"n_saved: expected a row count in \[0, R=8\], got 9"),
}


@pytest.mark.parametrize("case", list(BAD_GATE_UP_FWD), ids=list(BAD_GATE_UP_FWD))
def test_gate_up_fwd_rejects(case):
    changes, message = BAD_GATE_UP_FWD[case]
    i = {**_fwd_inputs(), "gate_up_bias": None, "act_code": SWIGLU, "n_saved": 0, **changes}
    with pytest.raises(ValueError, match=message):
        gate_up_fwd(i["x_TD"], i["sorted_tokens_R"], i["offsets_E"], i["gate_up_proj"], i["gate_up_bias"],
                    act_code=i["act_code"], gated=True, interleaved=False, alpha=1.0, limit=1.0, n_saved=i["n_saved"])


def _bwd_inputs(**changes):
    i = _fwd_inputs()
    i.update(dy_TD=torch.randn(4, 16), scale_R=torch.ones(8), down_proj=torch.randn(3, 16, 16),
             saved_SN=torch.empty(0, 32))
    i.update(changes)
    return i


BAD_GATE_UP_BWD = {
    "dy_other_shape": (dict(dy_TD=torch.randn(4, 8)), r"dy_TD: expected shape \[4, 16\], got \[4, 8\]"),
    "down_other_I": (dict(down_proj=torch.randn(3, 16, 8)), r"down_proj: expected shape \[3, 16, 16\], got "
                                                            r"\[3, 16, 8\]"),
    "scale_float16": (dict(scale_R=torch.ones(8, dtype=torch.float16)), r"scale_R: expected dtype torch.float32"),
    "saved_too_many": (dict(saved_SN=torch.empty(9, 32)), r"saved_SN: expected at most R=8 saved rows, got 9"),
    "saved_other_N": (dict(saved_SN=torch.empty(2, 16)), r"saved_SN: expected shape \[\*, 32\], got \[2, 16\]"),
}


@pytest.mark.parametrize("case", list(BAD_GATE_UP_BWD), ids=list(BAD_GATE_UP_BWD))
def test_gate_up_bwd_rejects(case):
    changes, message = BAD_GATE_UP_BWD[case]
    i = _bwd_inputs(**changes)
    with pytest.raises(ValueError, match=message):
        gate_up_bwd(i["x_TD"], i["dy_TD"], i["sorted_tokens_R"], i["offsets_E"], i["scale_R"], i["gate_up_proj"],
                    None, i["down_proj"], i["saved_SN"], act_code=SWIGLU, gated=True, interleaved=False, alpha=1.0,
                    limit=1.0)


def test_grouped_gemm_combine_and_weight_grad_reject():
    offsets_E = torch.tensor([3, 5, 8], dtype=torch.int32)
    a_RK, b_ENK = torch.randn(8, 16), torch.randn(3, 32, 16)
    with pytest.raises(ValueError, match=r"scale_R: expected dtype torch.float32, got torch.float16"):
        grouped_gemm(a_RK, b_ENK, offsets_E, torch.arange(8), torch.empty(8, 32),
                     scale_R=torch.ones(8, dtype=torch.float16))
    with pytest.raises(ValueError, match=r"out: expected shape \[\*, 32\], got \[8, 16\]"):
        grouped_gemm(a_RK, b_ENK, offsets_E, torch.arange(8), torch.empty(8, 16))
    with pytest.raises(ValueError, match=r"bias_EN: expected shape \[3, 32\], got \[32\]"):
        grouped_gemm(a_RK, b_ENK, offsets_E, torch.arange(8), torch.empty(8, 32), bias_EN=torch.randn(32))
    with pytest.raises(ValueError, match=r"out_rows_R: expected shape \[8\], got \[7\]"):
        grouped_gemm(a_RK, b_ENK, offsets_E, torch.arange(7), torch.empty(8, 32))
    with pytest.raises(ValueError, match=r"out_RC: expected shape \[8, 16\], got \[6, 16\]"):
        combine(torch.randn(6, 16), torch.empty(4, 16), 2)
    with pytest.raises(ValueError, match=r"out_RC: expected unit column stride, got strides \(1, 8\)"):
        combine(torch.randn(16, 8).t(), torch.empty(4, 16), 2)
    with pytest.raises(ValueError, match=r"token_mask_T: expected dtype torch.bool, got torch.int64"):
        combine(torch.randn(8, 16), torch.empty(4, 16), 2, torch.ones(4, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"b: expected shape \[\*, 32\], got \[8, 16\]"):
        expert_weight_grad(torch.randn(8, 16), torch.randn(8, 16), offsets_E, torch.empty(3, 16, 32))
    with pytest.raises(ValueError, match=r"offsets_E: expected dtype torch.int32, got torch.int64"):
        expert_weight_grad(torch.randn(8, 16), torch.randn(8, 32), offsets_E.long(), torch.empty(3, 16, 32))
    with pytest.raises(ValueError, match=r"dbias_EM: expected shape \[3, 16\], got \[3, 32\]"):
        expert_weight_grad(torch.randn(8, 16), torch.randn(8, 32), offsets_E, torch.empty(3, 16, 32),
                           dbias_EM=torch.empty(3, 32))


def test_zero_empty_experts():
    # Only the experts without rows are zeroed; the others keep their values (NaN here) untouched.
    from leanmoe.kernels.moe_bwd import zero_empty_experts_

    routing = make_routing(10, 2, [5, 0, 9, 0, 6, 0, 0], 0)
    out = torch.full((7, 3, 1500), float("nan"), device=DEVICE)  # 4500 elements: several blocks per expert
    assert zero_empty_experts_(out, routing.offsets_E) is out
    empty = torch.tensor([False, True, False, True, False, True, True], device=DEVICE)
    assert (out[empty] == 0).all() and out[~empty].isnan().all()
    with pytest.raises(ValueError, match="contiguous expert slices"):
        zero_empty_experts_(out.transpose(1, 2), routing.offsets_E)
