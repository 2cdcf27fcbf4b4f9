"""leanmoe beside the MoE expert layers a user would pick instead, in one process (docs/BENCHMARK_PROTOCOL.md).

    PYTHONPATH=src python benchmarks/peers.py [--preset all] [--mode fwd fwdbwd] [--tokens T ...] [--impl ...]
        [--json FILE] [--markdown FILE] [--plot PNG]
    PYTHONPATH=src python benchmarks/peers.py --from-json A.json B.json --json ALL.json --markdown ALL.md
    PYTHONPATH=src python benchmarks/peers.py --small      # tiny shapes (the default on the CPU)

Legend: T tokens, D model dim, I expert hidden dim, N gate/up rows (2I gated, I otherwise), E experts, K top-k,
R routed rows (T*K).

The implementations (``--impl``):
- ``leanmoe-triton-s0`` / ``leanmoe-triton-s100``: leanmoe's Triton backend at save_percent 0 and 100;
- ``leanmoe-grouped_mm``: leanmoe's ``torch._grouped_mm`` backend (save_percent 0);
- ``torchtitan-style``: written here, in plain autograd, as torchtitan's MoE does it: argsort permute, one
  ``torch._grouped_mm`` for gate/up, the activation, one for down, weighted scatter-add;
- ``moe-ops`` (PyPI): its counting-sort ``permute``, ``grouped_gemm`` (TMA on Hopper) and ``unpermute``, with the
  activation (and the biases of a preset that has them) in PyTorch between them;
- ``liger-kernel`` (PyPI): ``LigerFusedMoEFunction`` (fused gather + gate/up GEMM + SwiGLU, down GEMM, weighted
  gather-sum), with its own autotuning on unless ``LIGER_FUSED_MOE_AUTOTUNE=0`` is set;
- ``transformers-batched_mm`` (PyPI ``transformers``): transformers' own ``batched_mm`` experts function (the one a
  model gets with ``experts_implementation="batched_mm"``), called on the case's weights, with the preset's
  activation as the module's gate. It gathers a ``[R, N, D]`` and a ``[R, D, I]`` copy of the expert weights, so
  it is skipped, saying so, where those copies would not fit (every training size; decode sizes fit).

Per preset (one case from :func:`leanmoe.bench.harness.make_case`: seeded routing, bf16 on CUDA, fp32 on the CPU):
1. the dense bf16 8192³ matmul rate is measured (CUDA);
2. for each mode and implementation: a row that says why when it cannot run (package not installed, needs CUDA,
   a form it does not compute); else
3. the first call, timed with its compiling and tuning (``first_call_s``: users pay it once per shape);
4. the check: output (``fwd``) or output and every gradient (``fwdbwd``) against leanmoe's fp32 reference on the
   same upcast inputs, at leanmoe's bench tolerance; over it the row is ``FAILED`` and not timed;
5. time (``triton.testing.do_bench`` median on CUDA), TFLOP/s and its fraction of the dense rate, and memory: peak
   extra memory of one call, and for ``fwdbwd`` that minus the weight-gradient bytes (``activation_mb``; for ``fwd``,
   where no weight gradient exists, the peak itself).
The JSON (``--json``, rewritten after every row, so a run cut short keeps what finished) is leanmoe bench's
``{"env": ..., "rows": [...]}``; each row carries preset, mode, impl, ms, tflops, dense_tflops, activation_mb and
check_ok (None where nothing ran) beside the status, reason, versions and first-call time.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import importlib.util
import os
import sys
import time
from collections.abc import Callable

import torch

from leanmoe.activations import apply_activation
from leanmoe.bench import env as bench_env
from leanmoe.bench.harness import (
    MIB,
    TOLERANCES,
    Case,
    copy_gbps,
    dense_matmul_tflops,
    make_case,
    peak_extra_bytes,
    record_check,
    reference_errors,
    time_row,
    unsupported,
    unsupported_reason,
)
from leanmoe.bench.presets import MODES, PRESETS, ROUTINGS, Preset, cpu_scaled, flops
from leanmoe.bench.report import env_lines, load_json, tabulate, write_json
from leanmoe.experts import ExpertsCall

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

#: (impl id, PyPI distribution) of the peers that come from PyPI.
PEER_PACKAGES = {"moe-ops": "moe-ops", "liger-kernel": "liger-kernel", "transformers-batched_mm": "transformers"}

# ------------------------------------------------------------------------------------------ torchtitan-style path


def torchtitan_style_experts(x_TD: torch.Tensor, topk_ids_TK: torch.Tensor, topk_weights_TK: torch.Tensor,
                             gate_up_proj: torch.Tensor, down_proj: torch.Tensor,
                             gate_up_bias: torch.Tensor | None, down_bias: torch.Tensor | None, *, activation,
                             gate_up_layout: str) -> torch.Tensor:
    """The plain ``torch._grouped_mm`` path (torchtitan's ``MoE.forward`` with its grouped-mm experts), autograd
    through every op. Shapes as :func:`leanmoe.moe_experts`: ``x_TD [T, D]``, ids/weights ``[T, K]``,
    ``gate_up_proj [E, N, D]``, ``down_proj [E, D, I]``, biases ``[E, N]`` / ``[E, D]``; returns ``[T, D]``.

    1. stable argsort of the flat ids; tokens per expert by ``histc`` (no host sync), int32 cumulative offsets;
    2. gather the routed rows (an expanded index, never a repeated one);
    3. ``torch._grouped_mm`` gate/up (weights as transposed views), activation, ``torch._grouped_mm`` down;
    4. scale by the routing weights in fp32, then scatter-add into a zero ``[T, D]`` in x's dtype.
    """
    T, K = topk_ids_TK.shape
    D = x_TD.shape[1]
    E = gate_up_proj.shape[0]
    ids_R = topk_ids_TK.reshape(-1)
    order_R = torch.argsort(ids_R, stable=True)
    tokens_per_expert_E = torch.histc(ids_R.float(), bins=E, min=0, max=E)
    offsets_E = torch.cumsum(tokens_per_expert_E, dim=0, dtype=torch.int32)
    weights_R = topk_weights_TK.reshape(-1)[order_R]
    tokens_RD = (order_R // K).unsqueeze(1).expand(-1, D)
    x_RD = torch.gather(x_TD, 0, tokens_RD)
    gate_up_RN = torch._grouped_mm(x_RD, gate_up_proj.transpose(-2, -1), offs=offsets_E)
    if gate_up_bias is not None or down_bias is not None:
        experts_R = ids_R[order_R]
    if gate_up_bias is not None:
        gate_up_RN = gate_up_RN + gate_up_bias[experts_R]
    h_RI = apply_activation(gate_up_RN, activation, gate_up_layout)
    out_RD = torch._grouped_mm(h_RI, down_proj.transpose(-2, -1), offs=offsets_E)
    if down_bias is not None:
        out_RD = out_RD + down_bias[experts_R]
    out_RD = (out_RD.float() * weights_R.float().unsqueeze(1)).to(x_TD.dtype)
    return torch.zeros_like(x_TD).scatter_add(0, tokens_RD, out_RD)


# ------------------------------------------------------------------------------------------------------ peers


def _moe_ops_experts(case: Case) -> Callable[[], torch.Tensor]:
    import moe_ops

    p = case.preset
    T, K = case.topk_ids_TK.shape
    E = p.num_experts
    ids_TK = case.topk_ids_TK.to(torch.int32)  # its permute's documented input; a router can emit int32 directly

    def call() -> torch.Tensor:
        x_RD, row_id_map_R, offsets_E1 = moe_ops.permute(case.x_TD, ids_TK, 0, E)
        gate_up_RN = moe_ops.grouped_gemm(x_RD, case.gate_up_proj, offsets_E1, trans_b=True)
        experts_R = None
        if p.bias:
            # Its rows are in expert order: row r belongs to the first expert whose end offset exceeds r.
            rows_R = torch.arange(x_RD.shape[0], device=x_RD.device, dtype=torch.int32)
            experts_R = torch.searchsorted(offsets_E1[1:], rows_R, right=True)
            gate_up_RN = gate_up_RN + case.gate_up_bias[experts_R]
        h_RI = apply_activation(gate_up_RN, p.activation, p.gate_up_layout)
        out_RD = moe_ops.grouped_gemm(h_RI, case.down_proj, offsets_E1, trans_b=True)
        if experts_R is not None:
            out_RD = out_RD + case.down_bias[experts_R]
        return moe_ops.unpermute(out_RD, row_id_map_R, case.topk_weights_TK, T, K)

    return call


def _liger_experts(case: Case) -> Callable[[], torch.Tensor]:
    from liger_kernel.ops.fused_moe import LigerFusedMoEFunction

    ids_TK = case.topk_ids_TK.to(torch.int32)  # its documented input

    def call() -> torch.Tensor:
        return LigerFusedMoEFunction.apply(case.x_TD, case.gate_up_proj, case.down_proj, ids_TK, case.topk_weights_TK)

    return call


class _HFExperts(torch.nn.Module):
    """What transformers' experts functions read of their module (``transformers.integrations.moe``): the weights
    in its layout (``[E, N, D]`` and ``[E, D, I]``, not transposed: leanmoe's), the flags and the gate."""

    def __init__(self, case: Case) -> None:
        super().__init__()
        p = case.preset
        self.num_experts = p.num_experts
        self.has_gate, self.has_bias, self.is_transposed = p.gated, p.bias, False
        self.has_post_expert_norm, self._is_expert_parallel = False, False
        self.gate_up_proj, self.down_proj = case.gate_up_proj, case.down_proj
        self.up_proj = case.gate_up_proj  # the name it reads for a non-gated preset
        self.gate_up_proj_bias = self.up_proj_bias = case.gate_up_bias
        self.down_proj_bias = case.down_bias
        self._activation, self._layout = p.activation, p.gate_up_layout

    def _apply_gate(self, gate_up_RN: torch.Tensor) -> torch.Tensor:
        return apply_activation(gate_up_RN, self._activation, self._layout)

    def act_fn(self, up_RI: torch.Tensor) -> torch.Tensor:
        return apply_activation(up_RI, self._activation, self._layout)


def _batched_mm_experts(case: Case) -> Callable[[], torch.Tensor]:
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    forward = ALL_EXPERTS_FUNCTIONS["batched_mm"]
    module = _HFExperts(case)

    def call() -> torch.Tensor:
        return forward(module, case.x_TD, case.topk_ids_TK, case.topk_weights_TK)

    return call


def batched_mm_bytes(case: Case) -> int:
    """Bytes of the weight copies transformers' ``batched_mm`` gathers: ``[R, N, D]`` for gate/up, then
    ``[R, D, I]`` for down (the first is still alive when the second is made)."""
    p = case.preset
    N = 2 * p.hidden_dim if p.gated else p.hidden_dim
    return case.topk_ids_TK.numel() * (N + p.hidden_dim) * p.dim * case.gate_up_proj.element_size()


def free_bytes(device: torch.device) -> int | None:
    """Free memory of a CUDA device (None elsewhere: nothing to compare with)."""
    return torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None


def _batched_mm_reason(case: Case, mode: str) -> tuple[str, str] | None:
    need = batched_mm_bytes(case) * (3 if mode == "fwdbwd" else 1)  # backward adds the copies' gradients
    free = free_bytes(case.x_TD.device)
    if free is not None and need > 0.8 * free:
        return "skipped", (f"batched_mm gathers {need / 2**30:.1f} GiB of expert-weight copies for "
                           f"{case.topk_ids_TK.numel()} routed rows; {free / 2**30:.1f} GiB free")
    return None


def _describe(case: Case, mode: str) -> ExpertsCall:
    return case.describe(mode, 0)


def _torchtitan_reason(case: Case, mode: str) -> tuple[str, str] | None:
    # torch._grouped_mm's own limits are what leanmoe's grouped_mm backend checks (dtype, alignment, capability).
    reason = unsupported_reason("grouped_mm", _describe(case, mode))
    return None if reason is None else ("unsupported", f"torch._grouped_mm: {reason}")


def _moe_ops_reason(case: Case, mode: str) -> tuple[str, str] | None:
    E = case.preset.num_experts
    if E & (E - 1):
        return "unsupported", f"its permute's histogram needs a power-of-two expert count, got E={E}"
    return None


def _liger_reason(case: Case, mode: str) -> tuple[str, str] | None:
    p = case.preset
    missing = []
    if p.activation.name != "swiglu":
        missing.append(f"activation {p.activation.name!r}")
    if p.gate_up_layout != "concatenated":
        missing.append(f"{p.gate_up_layout} gate/up rows")
    if p.bias:
        missing.append("biases")
    if missing:
        return "unsupported", ("LigerFusedMoEFunction computes SwiGLU on concatenated gate/up rows without biases; "
                               f"this preset needs {', '.join(missing)}")
    return None


@dataclasses.dataclass(frozen=True, kw_only=True)
class Impl:
    """One implementation in the comparison."""

    name: str
    #: The PyPI distribution it comes from (None: leanmoe or written here).
    package: str | None = None
    #: Importable module of that package.
    module: str | None = None
    #: Runs only on CUDA (Triton kernels with no CPU path; not run in the interpreter).
    needs_cuda: bool = False
    #: leanmoe backend and save_percent (leanmoe rows only).
    backend: str | None = None
    save_percent: float = 0
    #: The triton backend's backward engine to force (``leanmoe.kernels.policy.set_backward_engine``; None: auto).
    backward_engine: str | None = None
    #: Why a CUDA graph cannot capture its call (None: it can); its ``--cuda-graphs`` rows are then skipped.
    not_capturable: str | None = None
    #: For the others: a builder of the call on a case, and why it cannot run a case (None: it can).
    build: Callable[[Case], Callable[[], torch.Tensor]] | None = None
    reason: Callable[[Case, str], tuple[str, str] | None] | None = None

    @property
    def is_leanmoe(self) -> bool:
        return self.backend is not None

    def version(self) -> str | None:
        dist = self.package or ("leanmoe" if self.is_leanmoe else None)
        if dist is None:
            return f"torch {torch.__version__}"
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            import leanmoe

            return leanmoe.__version__ if self.is_leanmoe else None

    @property
    def label(self) -> str:
        version = self.version() if self.package else None
        return f"{self.name} {version}" if version else self.name


def default_impls(*, cuda_graphs: bool) -> list[str]:
    """The implementations run when ``--impl`` is not given: all of :data:`IMPLS`, the decode backend (forward
    only, small T) and ``auto`` only when the forward is timed as a server runs it (``--cuda-graphs``)."""
    return [n for n in IMPLS if cuda_graphs or IMPLS[n].backend not in ("triton_decode", "auto")]


IMPLS: dict[str, Impl] = {impl.name: impl for impl in (
    Impl(name="leanmoe-triton-s0", backend="triton", save_percent=0),
    Impl(name="leanmoe-triton-s100", backend="triton", save_percent=100),
    # The same call with the all-Triton backward forced: an engine A/B in one process.
    Impl(name="leanmoe-triton-s0-fused", backend="triton", save_percent=0, backward_engine="fused"),
    Impl(name="leanmoe-grouped_mm", backend="grouped_mm", save_percent=0),
    Impl(name="leanmoe-triton_decode", backend="triton_decode", save_percent=0),
    Impl(name="leanmoe-auto", backend="auto", save_percent=0),
    Impl(name="torchtitan-style", reason=_torchtitan_reason,
         build=lambda case: lambda: torchtitan_style_experts(
             case.x_TD, case.topk_ids_TK, case.topk_weights_TK, case.gate_up_proj, case.down_proj,
             case.gate_up_bias, case.down_bias, activation=case.preset.activation,
             gate_up_layout=case.preset.gate_up_layout)),
    Impl(name="moe-ops", package="moe-ops", module="moe_ops", needs_cuda=True, reason=_moe_ops_reason,
         build=_moe_ops_experts),
    Impl(name="liger-kernel", package="liger-kernel", module="liger_kernel", needs_cuda=True, reason=_liger_reason,
         build=_liger_experts,
         not_capturable="LigerFusedMoEFunction reads its tile count to the host in every call (an .item() in "
                        "liger_kernel/ops/fused_moe.py), which CUDA-graph capture forbids; time it without "
                        "--cuda-graphs"),
    Impl(name="transformers-batched_mm", package="transformers", module="transformers", reason=_batched_mm_reason,
         build=_batched_mm_experts),
)}

LEANMOE_BASELINE = "leanmoe-triton-s0"
#: The forward's baseline where it ran: what a served model gets (``auto`` picks by measurement, here among triton,
#: triton_decode and grouped_mm). A forward keeps nothing whatever save_percent says, so s0 stands for s100 too.
LEANMOE_FWD_BASELINE = "leanmoe-auto"


def why_not(impl: Impl, case: Case, mode: str, *, named: bool, cuda_graphs: bool = False
            ) -> tuple[str, str] | None:
    """``(status, reason)`` when ``impl`` is not to run ``case`` in ``mode``, else None."""
    if impl.is_leanmoe:
        if impl.backward_engine is not None and mode == "fwd":
            return "skipped", "the backward engine changes no forward: see the row without it"
        return unsupported(case, impl.backend, mode, impl.save_percent, named=named)
    if impl.module is not None and importlib.util.find_spec(impl.module) is None:
        return "not installed", f"pip install {impl.package}"
    if impl.needs_cuda and case.x_TD.device.type != "cuda":
        return "skipped", "needs CUDA (Triton kernels with no CPU path; not run in the Triton interpreter)"
    reason = impl.reason(case, mode) if impl.reason is not None else None
    if reason is None and cuda_graphs and mode == "fwd" and impl.not_capturable:
        return "skipped", impl.not_capturable
    return reason


# ---------------------------------------------------------------------------------------------- measuring


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step(case: Case, call: Callable[[], torch.Tensor], mode: str) -> Callable[[], None]:
    """The timed work: the forward under ``no_grad`` (``fwd``), or the forward and ``y.backward(dy)``."""
    if mode == "fwd":
        def fwd() -> None:
            with torch.no_grad():
                call()
        return fwd

    def fwdbwd() -> None:
        call().backward(case.dy_TD)
    return fwdbwd


def run_once(case: Case, call: Callable[[], torch.Tensor], mode: str) -> dict[str, torch.Tensor]:
    """Like :func:`leanmoe.bench.harness.run_once` for any call: ``out`` and, for ``fwdbwd``, ``grad_<leaf>``
    (zeros for a gradient left unset, so it fails the check)."""
    case.clear_grads()
    if mode == "fwd":
        with torch.no_grad():
            return {"out": call()}
    y_TD = call()
    y_TD.backward(case.dy_TD)
    outs = {"out": y_TD.detach()}
    for name, t in case.leaves().items():
        outs[f"grad_{name}"] = t.grad if t.grad is not None else torch.zeros_like(t)
    case.clear_grads()
    return outs


def planned_row(preset: Preset, tokens: int, routing: str, mode: str, impl: Impl, dtype: torch.dtype,
                device: torch.device, dense_tflops: float | None) -> dict:
    """A row before it runs: status ``not run`` until :func:`measure` or a skip fills it, so a run stopped early
    (a time limit) still lists what it did not reach."""
    return {
        "preset": preset.name, "label": preset.label, "tokens": tokens, "routing": routing, "mode": mode,
        "impl": impl.name, "backend": impl.label, "version": impl.version(),
        "dtype": str(dtype).removeprefix("torch."), "device": device.type,
        "status": "not run", "reason": NOT_REACHED, "check_ok": None, "max_error": None, "errors": None,
        "tolerance": TOLERANCES[dtype], "first_call_s": None, "ms": None, "tflops": None,
        "dense_tflops": dense_tflops, "frac_dense": None, "peak_mem_mb": None, "activation_mb": None,
        "act_mem_mb": None, "vs_leanmoe": None,
    }


NOT_REACHED = "not reached: the run stopped before this row (its time limit?)"


def base_row(case: Case, impl: Impl, mode: str, dense_tflops: float | None) -> dict:
    row = planned_row(case.preset, case.num_tokens, case.routing, mode, impl, case.x_TD.dtype, case.x_TD.device,
                      dense_tflops)
    row.update(status=None, reason=None)
    return row


def measure(case: Case, impl: Impl, mode: str, row: dict, *, check_only: bool = False,
            cuda_graphs: bool = False) -> None:
    """First call, check, then time and memory (see the module docstring); fills ``row``."""
    from leanmoe.kernels.policy import set_backward_engine

    set_backward_engine(impl.backward_engine)
    try:
        _measure(case, impl, mode, row, check_only=check_only, cuda_graphs=cuda_graphs)
    finally:
        set_backward_engine(None)


def _measure(case: Case, impl: Impl, mode: str, row: dict, *, check_only: bool, cuda_graphs: bool) -> None:
    device = case.x_TD.device
    if impl.is_leanmoe:
        def call() -> torch.Tensor:
            return case.call(impl.backend, impl.save_percent)
    else:
        call = impl.build(case)
    fn = step(case, call, mode)
    leaves = list(case.leaves().values())

    case.clear_grads()
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    row["first_call_s"] = time.perf_counter() - t0
    case.clear_grads()

    outs = run_once(case, call, mode)
    errors = reference_errors(case, outs)
    del outs
    if not record_check(row, errors, row["tolerance"]) or check_only:
        return
    ms = time_row(row, fn, device, cuda_graphs=cuda_graphs and mode == "fwd",
                  grad_to_none=leaves if mode == "fwdbwd" else None)
    if ms is None:
        return
    tflops = flops(case.preset, case.num_tokens, mode) / (ms * 1e-3) / 1e12
    dense = row["dense_tflops"]
    row.update(ms=ms, tflops=tflops, frac_dense=tflops / dense if dense else None)
    if mode == "fwd":  # the decode figure: touched expert weights read per forward
        row.update(weight_bytes=case.touched_weight_bytes(), gbps=case.touched_weight_bytes() / (ms * 1e-3) / 1e9)
    case.clear_grads()
    peak = peak_extra_bytes(fn, device)
    case.clear_grads()
    if peak is not None:
        act = peak - case.weight_grad_bytes() if mode == "fwdbwd" else peak
        row.update(peak_mem_mb=peak / MIB, activation_mb=act / MIB, act_mem_mb=act / MIB)


def run_case(case: Case, impls: list[Impl], modes: list[str], *, named: frozenset[str],
             dense_tflops: float | None, check_only: bool = False, cuda_graphs: bool = False,
             on_row: Callable[[dict], None] | None = None) -> list[dict]:
    """Every (mode, impl) of one case; one row each, never dropped."""
    rows = []
    for mode in modes:
        for impl in impls:
            row = base_row(case, impl, mode, dense_tflops)
            try:
                skip = why_not(impl, case, mode, named=impl.name in named, cuda_graphs=cuda_graphs)
                if skip is not None:
                    row.update(status=skip[0], reason=skip[1])
                else:
                    measure(case, impl, mode, row, check_only=check_only, cuda_graphs=cuda_graphs)
            except Exception as exc:  # a peer that breaks is a row with its reason, and the run goes on
                row.update(status="FAILED", check_ok=False, ms=None, tflops=None, frac_dense=None,
                           reason=f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300])
            finally:
                case.clear_grads()
                if case.x_TD.device.type == "cuda":
                    torch.cuda.empty_cache()
            rows.append(row)
            if on_row is not None:
                on_row(row)
    add_ratios(rows)
    return rows


def baseline(group: list[dict]) -> dict | None:
    """The leanmoe row of one (preset, tokens, routing, mode) group that the others are measured against:
    :data:`LEANMOE_FWD_BASELINE` for a forward where it ran, else :data:`LEANMOE_BASELINE` (None: neither ran)."""
    timed = {r["impl"]: r for r in group if r["ms"]}
    if group and group[0]["mode"] == "fwd" and LEANMOE_FWD_BASELINE in timed:
        return timed[LEANMOE_FWD_BASELINE]
    return timed.get(LEANMOE_BASELINE)


def _groups(rows: list[dict]) -> dict[tuple, list[dict]]:
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(_key(r), []).append(r)
    return groups


def add_ratios(rows: list[dict]) -> None:
    """``vs_leanmoe``: the leanmoe baseline's time (:func:`baseline`) over the row's, per (preset, tokens, routing,
    mode); > 1 means the row is faster than leanmoe."""
    for group in _groups(rows).values():
        base = baseline(group)
        for r in group:
            r["vs_leanmoe"] = base["ms"] / r["ms"] if base and r["ms"] else None


def _key(row: dict) -> tuple:
    return row["label"], row["tokens"], row["routing"], row["mode"]


# ------------------------------------------------------------------------------------------------- reports


def _fmt(fmt: str) -> Callable[[object], str]:
    return lambda v: "" if v is None else format(v, fmt)


def _pct(v: object) -> str:
    return "" if v is None else f"{100 * v:.0f}%"


def _rate(v: object) -> str:
    # Three significant digits for CPU-sized rates, one decimal for GPU-sized ones.
    return "" if v is None else f"{v:.1f}" if v >= 10 else f"{v:.3g}"


COLUMNS = [
    ("preset", "label", str),
    ("T", "tokens", str),
    ("mode", "mode", str),
    ("impl", "backend", str),
    ("status", "status", str),
    ("ms", "ms", _fmt(".3f")),
    ("TFLOP/s", "tflops", _rate),
    ("% dense", "frac_dense", _pct),
    ("dense TFLOP/s", "dense_tflops", _fmt(".0f")),
    ("GB/s", "gbps", _fmt(".0f")),
    ("% copy", "frac_copy", _pct),
    ("act MiB", "activation_mb", _fmt(".0f")),
    ("peak MiB", "peak_mem_mb", _fmt(".0f")),
    ("first call s", "first_call_s", _fmt(".2f")),
    ("leanmoe ÷ it", "vs_leanmoe", _fmt(".2f")),
    ("max rel err", "max_error", _fmt(".1e")),
]


def summary(rows: list[dict]) -> list[dict]:
    """Per (preset, tokens, routing, mode): the leanmoe baseline (:func:`baseline`) against the fastest peer that
    passed its check. ``ratio`` is the peer's time over leanmoe's (> 1: leanmoe wins), as the issues give it."""
    out = []
    for key, group in _groups(rows).items():
        lean = baseline(group)
        peers = [r for r in group if not r["impl"].startswith("leanmoe") and r["ms"]]
        best = min(peers, key=lambda r: r["ms"]) if peers else None
        out.append({
            "label": key[0], "tokens": key[1], "mode": key[3], "leanmoe": lean["impl"] if lean else None,
            "leanmoe_ms": lean["ms"] if lean else None, "leanmoe_frac": lean["frac_dense"] if lean else None,
            "leanmoe_copy": lean.get("frac_copy") if lean else None,
            "peer": best["backend"] if best else None, "peer_ms": best["ms"] if best else None,
            "peer_frac": best["frac_dense"] if best else None, "peer_copy": best.get("frac_copy") if best else None,
            "ratio": best["ms"] / lean["ms"] if best and lean else None,
        })
    return out


SUMMARY_COLUMNS = [
    ("preset", "label", str),
    ("T", "tokens", str),
    ("mode", "mode", str),
    ("leanmoe", "leanmoe", str),
    ("leanmoe ms", "leanmoe_ms", _fmt(".3f")),
    ("% dense", "leanmoe_frac", _pct),
    ("% copy", "leanmoe_copy", _pct),
    ("fastest peer", "peer", str),
    ("peer ms", "peer_ms", _fmt(".3f")),
    ("peer % dense", "peer_frac", _pct),
    ("peer % copy", "peer_copy", _pct),
    ("peer ÷ leanmoe", "ratio", _fmt(".2f")),
]

UNITS = ("MiB = 2²⁰ bytes. act MiB: fwdbwd, peak extra memory of one call minus the weight-gradient bytes; fwd, the "
         "peak extra memory itself. TFLOP/s counts 6·T·K·D·I per forward (gated; 4·T·K·D·I non-gated), three times "
         "that for fwdbwd; % dense is its ratio to the dense bf16 8192³ matmul measured in the same process. GB/s "
         "(forward): the touched experts' weight bytes over the time; % copy its ratio to the device-to-device copy "
         "rate measured in the same process (--cuda-graphs runs). first "
         "call s: the first call with its compiling and autotuning (not in ms); rows run in table order, so a first "
         "call finds the kernels that an earlier row of the same process compiled or tuned. leanmoe ÷ it > 1: the row "
         "is faster than the leanmoe baseline (triton at save_percent 0; for a forward, auto where it ran). "
         "max rel err: the largest ‖out − ref‖ / ‖ref‖ over the "
         "output and every gradient, against the fp32 reference.")


def _md_table(rows: list[dict], columns) -> list[str]:
    headers, cells, notes = tabulate(rows, columns)
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    out += ["| " + " | ".join(c.replace("|", "\\|") for c in line) + " |" for line in cells]
    out.append("")
    if notes:
        out += [f"{note}  " for note in notes] + [""]
    return out


def markdown(rows: list[dict], env: dict) -> str:
    """The report: heading, environment, command, the full table, the leanmoe-vs-fastest-peer summary, units."""
    out = [f"## leanmoe and its peers ({env['date']})", ""]
    # Each row names its save_percent (leanmoe-triton-s0/-s100); the environment's default would mislead.
    out += [f"- {line.replace('save_percent 0, ', '')}" for line in env_lines(env) if not line.startswith("command: ")]
    out += ["", "Command:", "", "```bash", env["command"], "```", ""]
    out += _md_table(rows, COLUMNS)
    out += ["leanmoe (triton at save_percent 0; for a forward, auto where it ran) against the fastest peer that "
            "passed its check:", ""]
    out += _md_table(summary(rows), SUMMARY_COLUMNS)
    out.append(UNITS)
    return "\n".join(out) + "\n"


def collect_env(device: torch.device, argv: list[str], dtype: torch.dtype) -> dict:
    env = bench_env.collect_env(device, argv, program=("python", "benchmarks/peers.py"))
    env.update(dtype=str(dtype).removeprefix("torch."), tolerance=TOLERANCES[dtype], dense_tflops=None, notes=[],
               timer="triton.testing.do_bench median" if device.type == "cuda" else "median of perf_counter timings")
    versions = {name: Impl.version(IMPLS[name]) for name in PEER_PACKAGES}
    env["peers"] = versions
    env["notes"].append("peers: " + ", ".join(f"{n} {v or 'not installed'}" for n, v in versions.items()))
    if os.environ.get("LIGER_FUSED_MOE_AUTOTUNE", "1").lower() in ("0", "false", "no"):
        env["notes"].append("LIGER_FUSED_MOE_AUTOTUNE=0: liger-kernel ran untuned (one config per kernel)")
    if device.type == "cpu":
        env["notes"].append("CPU run: memory is measured on CUDA only; peers that need CUDA are skipped.")
    return env


# ----------------------------------------------------------------------------------------------------- main


def save_json(path: str, rows: list[dict], env: dict) -> None:
    """:func:`leanmoe.bench.report.write_json`, then a rename: a run killed mid-write keeps its previous file."""
    write_json(path + ".tmp", rows, env)
    os.replace(path + ".tmp", path)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="benchmarks/peers.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", nargs="+", metavar="P", default=["all"],
                        help=f"presets (default all): {', '.join(PRESETS)}")
    parser.add_argument("--tokens", type=int, nargs="+", metavar="T",
                        help="tokens per call, one case each (default: the preset's train T)")
    parser.add_argument("--mode", nargs="+", choices=MODES, default=list(MODES), help="default: fwd fwdbwd")
    parser.add_argument("--impl", nargs="+", choices=list(IMPLS), metavar="I",
                        help=f"implementations (default all): {', '.join(IMPLS)}")
    parser.add_argument("--routing", choices=ROUTINGS, default="uniform")
    parser.add_argument("--small", action="store_true",
                        help="the presets' forms at tiny dims (leanmoe's CPU-scaled presets; the default on the CPU)")
    parser.add_argument("--device", choices=("cuda", "cpu"), help="default: cuda when available")
    parser.add_argument("--dtype", choices=tuple(DTYPES), help="default: bf16 on cuda, fp32 on cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="time the forward as CUDA-graph replays (the decode figure: no host launch overhead)")
    parser.add_argument("--check-only", action="store_true", help="check every implementation, time none")
    parser.add_argument("--json", metavar="FILE", help="write the rows and the environment as JSON")
    parser.add_argument("--markdown", metavar="FILE", help="write the report as Markdown")
    parser.add_argument("--plot", metavar="PNG", help="write a chart of TFLOP/s and memory per implementation")
    parser.add_argument("--from-json", nargs="+", metavar="FILE",
                        help="measure nothing: report the rows of earlier --json files, merged")
    return parser


def resolve_presets(parser: argparse.ArgumentParser, names: list[str], small: bool) -> list[Preset]:
    names = list(dict.fromkeys(n for name in names for n in (PRESETS if name == "all" else [name])))
    unknown = [n for n in names if n not in PRESETS]
    if unknown:
        parser.error(f"unknown preset(s) {', '.join(map(repr, unknown))}; expected any of: {', '.join(PRESETS)}")
    return [cpu_scaled(PRESETS[n]) if small else PRESETS[n] for n in names]


def report(args: argparse.Namespace, rows: list[dict], env: dict) -> int:
    text = markdown(rows, env)
    print(text)
    if args.json:
        save_json(args.json, rows, env)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text)
    if args.plot and rows:
        if importlib.util.find_spec("matplotlib") is None:
            print("--plot skipped: matplotlib is not installed", file=sys.stderr)
        else:
            from leanmoe.bench.plot import write_plot

            write_plot(args.plot, [r for r in rows if r["status"] is not None], env)
    failed = [r for r in rows if r["status"] == "FAILED" and r["impl"].startswith("leanmoe")]
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.from_json:
        rows, env = load_json(args.from_json)[:2]
        add_ratios(rows)
        return report(args, rows, env)
    bad_tokens = [t for t in args.tokens or () if t < 1]
    if bad_tokens:
        parser.error(f"--tokens: every T must be >= 1, got {bad_tokens}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch.cuda.is_available() is False")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.cuda_graphs and device.type != "cuda":
        parser.error(f"--cuda-graphs needs a CUDA device, got {device.type}")
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    presets = resolve_presets(parser, args.preset, args.small or device.type == "cpu")
    impls = [IMPLS[n] for n in dict.fromkeys(args.impl or default_impls(cuda_graphs=args.cuda_graphs))]
    env = collect_env(device, argv, dtype)
    if device.type == "cuda" and not args.check_only:
        print("measuring the dense bf16 matmul rate ...", file=sys.stderr, flush=True)
        env["dense_tflops"] = dense_matmul_tflops(device)
        if args.cuda_graphs:
            env["copy_gbps"] = copy_gbps(device)  # the decode reference: gbps / copy_gbps is the bandwidth fraction
            env["timer"] += " of CUDA-graph replays (forward)"
        torch.cuda.empty_cache()

    modes = list(dict.fromkeys(args.mode))
    cases = [(preset, tokens) for preset in presets for tokens in dict.fromkeys(args.tokens or [preset.train_tokens])]
    rows = [planned_row(preset, tokens, args.routing, mode, impl, dtype, device, env["dense_tflops"])
            for preset, tokens in cases for mode in modes for impl in impls]
    done = 0

    def on_row(row: dict) -> None:
        nonlocal done
        if row.get("gbps") and env.get("copy_gbps"):
            # The decode target's unit, under both names the reports use.
            row["frac_copy"] = row["bandwidth_fraction"] = row["gbps"] / env["copy_gbps"]
        rows[done] = row
        done += 1
        result = (f"{row['ms']:.3f} ms, first call {row['first_call_s']:.1f} s" if row["ms"]
                  else f"{row['status']}: {row['reason']}" if row["reason"] else row["status"])
        print(f"  {row['label']} T={row['tokens']} {row['mode']} {row['impl']}: {result}", file=sys.stderr,
              flush=True)
        if args.json:
            add_ratios(rows)
            save_json(args.json, rows, env)

    if args.json:
        save_json(args.json, rows, env)
    for preset, tokens in cases:
        case = make_case(preset, args.routing, tokens, dtype=dtype, device=device, seed=args.seed)
        run_case(case, impls, modes, named=frozenset(args.impl or ()), dense_tflops=env["dense_tflops"],
                 check_only=args.check_only, cuda_graphs=args.cuda_graphs, on_row=on_row)
        del case
        if device.type == "cuda":
            torch.cuda.empty_cache()
    add_ratios(rows)
    return report(args, rows, env)


if __name__ == "__main__":
    raise SystemExit(main())
