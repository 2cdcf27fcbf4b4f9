"""``leanmoe bench --lora RANK``: the expert layer with LoRA adapters on frozen base weights, against the same layer
without adapters.

Legend: T tokens, D model dim, I expert hidden dim, N gate/up rows (2I gated, I otherwise), E experts, K top-k,
r LoRA rank.

For each case (preset, T, routing) of the plan, in one process:
1. the problem of :func:`leanmoe.bench.harness.make_case` with the base expert weights frozen (``requires_grad``
   False); x and the routing weights still require grad;
2. an ``ExpertLoRA(rank=r, alpha=2r, targets=("gate_up", "down"))`` whose A is drawn as ``reset_parameters`` draws it
   and whose B is small and random (not zero), both from the seed, so the adapter changes the output and every LoRA
   gradient is non-trivial (:func:`make_lora`);
3. the baseline row: the same layer without adapters on leanmoe's fastest backend (triton on CUDA, auto's pick
   elsewhere), checked against the reference, then timed;
4. one row per LoRA backend (triton and grouped_mm on CUDA; on the CPU auto's pick and the reference), checked against
   the reference loop with the adapter in fp32 on the upcast inputs (the output; for fwdbwd also the gradients of x,
   the routing weights and the four LoRA factors), then timed; a row over tolerance is FAILED and not timed. Each
   carries ``baseline_ms``, ``lora_ratio`` (its time over the baseline's) and ``act_mem_ratio`` (its activation
   memory over the baseline's).
Activation memory is the peak extra memory minus the weight-gradient bytes: the LoRA factors' gradients for a LoRA
row, nothing for the baseline (its base is frozen). TFLOP/s is left out: the frozen base runs fewer GEMMs backward
than the protocol's FLOP count assumes.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import torch

from leanmoe.bench.harness import (
    BenchPlan,
    Case,
    Progress,
    _base_row,
    _ieee_fp32,
    _relative,
    _squared_norms,
    make_case,
    peak_extra_bytes,
    record_check,
    time_ms,
    unsupported_reason,
)
from leanmoe.experts import moe_experts, select_backend
from leanmoe.lora import LORA_BACKENDS, TARGETS, ExpertLoRA, select_lora_backend

#: B's entries are drawn from N(0, (B_STD_SQRT_RANK / sqrt(r))^2): the adapter's term is then ~10% of the base
#: GEMM's at unit-scale inputs, whatever the rank.
B_STD_SQRT_RANK = 0.1


def make_lora(case: Case, rank: int, *, seed: int = 0) -> ExpertLoRA:
    """The adapter of ``case``'s experts: rank ``rank``, alpha ``2 * rank``, both targets, in x's dtype and device; A
    uniform in ``+-1/sqrt(in)`` (``reset_parameters``'s law), B ~ N(0, (0.1/sqrt(rank))^2), both from ``seed``."""
    p, x_TD = case.preset, case.x_TD
    lora = ExpertLoRA(num_experts=p.num_experts, dim=p.dim, hidden_dim=p.hidden_dim, rank=rank, alpha=2 * rank,
                      gated=p.gated, targets=TARGETS, dtype=x_TD.dtype, device=x_TD.device)
    gen = torch.Generator(device=x_TD.device).manual_seed(seed + 2)  # not the inputs' or the mask's stream
    with torch.no_grad():
        for target in lora.targets:
            A, B = lora.adapted(target)
            bound = 1 / math.sqrt(A.shape[-1])
            A.copy_(torch.rand(A.shape, generator=gen, device=A.device, dtype=A.dtype).mul_(2 * bound).sub_(bound))
            B.copy_(torch.randn(B.shape, generator=gen, device=B.device, dtype=B.dtype)
                    .mul_(B_STD_SQRT_RANK / math.sqrt(rank)))
    return lora


def _leaves(case: Case, lora: ExpertLoRA | None) -> dict[str, torch.Tensor]:
    """Every tensor that gets a gradient, by name: x, the routing weights and (with ``lora``) its factors."""
    leaves = {"x": case.x_TD, "topk_weights": case.topk_weights_TK}
    if lora is not None:
        leaves.update(dict(lora.named_parameters()))
    return leaves


def _call(case: Case, backend: str, lora: ExpertLoRA | None, save_percent: float) -> torch.Tensor:
    # Ids come from the routing generator, so they are in range: no host-syncing id check while timing.
    return moe_experts(*case.args(), **case.kwargs(), backend=backend, save_percent=save_percent, check_ids=False,
                       lora=lora)


def _clear(leaves: dict[str, torch.Tensor]) -> None:
    for t in leaves.values():
        t.grad = None


def _step(case: Case, backend: str, lora: ExpertLoRA | None, mode: str, save_percent: float
          ) -> Callable[[], torch.Tensor]:
    """The timed work of one mode: the forward under ``no_grad``, or the forward and ``y.backward(dy)``."""
    if mode == "fwd":
        def fwd() -> torch.Tensor:
            with torch.no_grad():
                return _call(case, backend, lora, save_percent)
        return fwd

    def fwdbwd() -> torch.Tensor:
        y_TD = _call(case, backend, lora, save_percent)
        y_TD.backward(case.dy_TD)
        return y_TD
    return fwdbwd


def run_lora_once(case: Case, backend: str, lora: ExpertLoRA | None, mode: str, save_percent: float
                  ) -> dict[str, torch.Tensor]:
    """``{"out": y}``, and for ``fwdbwd`` ``grad_<leaf>`` of every leaf (zeros where the backend left one unset, so a
    missing gradient fails the check)."""
    leaves = _leaves(case, lora)
    _clear(leaves)
    outs = {"out": _step(case, backend, lora, mode, save_percent)().detach()}
    if mode == "fwdbwd":
        for name, t in leaves.items():
            outs[f"grad_{name}"] = t.grad if t.grad is not None else torch.zeros_like(t)
    _clear(leaves)
    return outs


def lora_reference_errors(case: Case, lora: ExpertLoRA | None, outs: dict[str, torch.Tensor]) -> dict[str, float]:
    """Relative error ``||out - ref||/ ||ref||`` of each tensor in ``outs`` against the reference backend (the plain
    loop, with ``lora`` when given) in fp32 on the upcast inputs, base weights frozen. Unlike the chunked reference of
    the harness it holds fp32 copies of all experts at once (~6 GB at mixtral-8x7b size): no base-weight gradient is
    kept, so that fits any GPU that runs the preset."""
    with_grads = "grad_x" in outs
    x_TD = case.x_TD.detach().float().requires_grad_(with_grads)
    weights_TK = case.topk_weights_TK.detach().float().requires_grad_(with_grads)
    params = {name: t.detach().float() for name, t in case.params().items()}
    ref_lora = None
    if lora is not None:
        ref_lora = copy.deepcopy(lora).float()
        ref_lora.requires_grad_(with_grads)
    with _ieee_fp32(x_TD.device), torch.set_grad_enabled(with_grads):
        y_TD = moe_experts(x_TD, case.topk_ids_TK, weights_TK, params["gate_up_proj"], params["down_proj"],
                           params.get("gate_up_bias"), params.get("down_bias"), activation=case.preset.activation,
                           gate_up_layout=case.preset.gate_up_layout, backend="reference", check_ids=False,
                           lora=ref_lora, **case.mask_kwargs)
        if with_grads:
            y_TD.backward(case.dy_TD.float())
    refs = {"out": y_TD.detach()}
    if with_grads:
        assert x_TD.grad is not None and weights_TK.grad is not None  # leaves of this backward
        refs.update(grad_x=x_TD.grad, grad_topk_weights=weights_TK.grad)
        for name, p in (ref_lora.named_parameters() if ref_lora is not None else ()):
            refs[f"grad_{name}"] = p.grad if p.grad is not None else torch.zeros_like(p)
    errors = {}
    for name, ref in refs.items():
        if tuple(outs[name].shape) != tuple(ref.shape):
            raise ValueError(f"{name} has shape {list(outs[name].shape)}, expected {list(ref.shape)}")
        errors[name] = _relative(*_squared_norms(outs[name], ref))
    return errors


def _measure(plan: BenchPlan, case: Case, backend: str, lora: ExpertLoRA | None, mode: str, row: dict) -> None:
    """Check, then (unless ``plan.check_only``) time and measure memory; fills ``row``."""
    outs = run_lora_once(case, backend, lora, mode, plan.save_percent)
    errors = lora_reference_errors(case, lora, outs)
    del outs
    if not record_check(row, errors, plan.tolerance) or plan.check_only:
        return
    leaves = _leaves(case, lora)
    fn = _step(case, backend, lora, mode, plan.save_percent)
    row["ms"] = time_ms(fn, plan.device, grad_to_none=list(leaves.values()) if mode == "fwdbwd" else None)
    _clear(leaves)
    peak = peak_extra_bytes(fn, plan.device)
    _clear(leaves)
    if peak is not None:
        row["peak_mem_mb"] = peak / 2**20
        if mode == "fwdbwd":
            grad_bytes = sum(p.numel() * p.element_size() for p in lora.parameters()) if lora is not None else 0
            row["act_mem_mb"] = (peak - grad_bytes) / 2**20


def baseline_backend(case: Case, mode: str, save_percent: float) -> str:
    """leanmoe's fastest backend for the call without adapters: triton where it runs (CUDA), else auto's pick."""
    call = case.describe(mode, save_percent)
    if case.x_TD.device.type == "cuda" and unsupported_reason("triton", call) is None:
        return "triton"
    return select_backend("auto", call)[0].name


def lora_backends(plan: BenchPlan, case: Case, mode: str) -> tuple[list[str], dict[str, str]]:
    """``plan.backends`` with ``auto`` resolved for the call with adapters (duplicates dropped), and the reason of
    each one that cannot run it."""
    call = case.describe(mode, plan.save_percent)
    names, reasons = [], {}
    for name in plan.backends:
        try:
            names.append(select_lora_backend(name, call))
        except ValueError as exc:
            names.append(name)
            reasons[name] = str(exc)
    return list(dict.fromkeys(names)), reasons


def run_lora_plan(plan: BenchPlan, progress: Progress | None = None, *,
                  on_row: Callable[[list[dict]], None] | None = None) -> list[dict]:
    """Runs ``plan`` with adapters of rank ``plan.lora_rank``: per (preset, T, routing, mode), the baseline row
    (``lora_rank`` 0: no adapters), then one row per LoRA backend of ``plan.backends`` (``auto`` resolved)."""
    assert plan.lora_rank is not None and plan.lora_rank >= 1
    progress = progress or Progress()
    cases = [(preset, T, routing) for preset in plan.presets for T in plan.token_counts(preset)
             for routing in plan.routings]
    # auto usually resolves to a backend also named (grouped_mm), which then runs once.
    per_mode = 1 + len({b for b in plan.backends if b != "auto"} or {"auto"})
    progress.start(len(cases) * per_mode * len(plan.modes))
    rows: list[dict] = []

    def run_row(case: Case, backend: str, lora: ExpertLoRA | None, mode: str, reason: str | None) -> dict:
        description = (f"{case.preset.label} T={case.num_tokens} {case.routing} {mode} {backend} "
                       + (f"LoRA r={plan.lora_rank}" if lora is not None else "no LoRA"))
        progress.step(description)
        row = _base_row(plan, case, backend, mode)
        row.update(lora_rank=plan.lora_rank if lora is not None else 0, lora_alpha=lora.alpha if lora else None,
                   tflops=None)
        if reason is not None:
            row.update(status="unsupported", reason=reason)
        else:
            try:
                _measure(plan, case, backend, lora, mode, row)
            except Exception as exc:  # reported as FAILED in the table, and in the exit code
                _clear(_leaves(case, lora))
                row.update(status="FAILED", reason=f"{type(exc).__name__}: {exc}", ms=None)
        rows.append(row)
        progress.done(description, "ok" if row["status"] == "ok" and row["ms"] is None else
                      f"ok {row['ms']:.3f} ms" if row["status"] == "ok" else f"{row['status']}: {row['reason']}")
        if on_row is not None:
            on_row(rows)
        return row

    try:
        for preset, T, routing in cases:
            case = make_case(preset, routing, T, dtype=plan.dtype, device=plan.device, seed=plan.seed,
                             mask_fraction=plan.mask_fraction)
            for t in case.params().values():
                t.requires_grad_(False)  # the base is frozen: only x, the routing weights and the adapter learn
            lora = make_lora(case, plan.lora_rank, seed=plan.seed)
            for mode in plan.modes:
                base = run_row(case, baseline_backend(case, mode, plan.save_percent), None, mode, None)
                names, reasons = lora_backends(plan, case, mode)
                for name in names:
                    row = run_row(case, name, lora, mode, reasons.get(name))
                    row["baseline_backend"] = base["backend"]
                    row["baseline_ms"] = base["ms"]
                    if base["ms"] and row["ms"]:
                        row["lora_ratio"] = row["ms"] / base["ms"]
                    if base["act_mem_mb"] and row["act_mem_mb"] is not None:
                        row["act_mem_ratio"] = row["act_mem_mb"] / base["act_mem_mb"]
                if on_row is not None:
                    on_row(rows)
            del case, lora  # freed before the next case is built
            if plan.device.type == "cuda":
                torch.cuda.empty_cache()
    finally:
        progress.close()
    return rows


__all__ = ["LORA_BACKENDS", "baseline_backend", "lora_backends", "lora_reference_errors", "make_lora",
           "run_lora_once", "run_lora_plan"]
