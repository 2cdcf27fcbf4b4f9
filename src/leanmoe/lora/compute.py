"""The routed expert compute with LoRA adapters: a plain reference loop and a ``torch._grouped_mm`` fast path.

Legend: T tokens, D model dim, I expert hidden dim, N gate/up rows (2I gated, I otherwise), E experts, K top-k,
R routed rows (T*K), r LoRA rank (P: the rank padded to a multiple of 8).

With ``s = alpha / rank`` (see :class:`leanmoe.ExpertLoRA`), expert e computes
``gate_up = x W_gu[e]^T + s (x A_gu[e]^T) B_gu[e]^T (+ b1[e])``, ``h = act(gate_up)``,
``out = h W_d[e]^T + s (h A_d[e]^T) B_d[e]^T (+ b2[e])``, and ``y_t = sum_k w_tk out_{t,k}``.

The fast path (``grouped_mm``), on the grouped_mm backend's routing plan:
1. plan: routed rows sorted by expert (:func:`leanmoe.experts.plan.plan_experts`, masked rows last), no host sync;
2. gather ``x_RD`` in expert order; base GEMM ``x_RD W_gu^T`` and the two low-rank GEMMs ``(x_RD A^T) s B^T`` as
   ``torch._grouped_mm`` calls (weights as transposed views, never copied), bias, activation to ``h_RI``;
3. the same for the down projection;
4. combine: rows back to ``[T, K, D]`` order by a gather, ``y_T = w_T1K @ out_TKD`` (a batched GEMM: deterministic,
   no atomics).
Saved for backward: the caller's tensors, the plan and the two low-rank row blocks ``s x A_gu^T`` and ``s h A_d^T``
(``[R, P]`` each); backward recomputes ``gate_up_RN`` and ``h_RI`` (like the grouped_mm backend at
``save_percent=0``) and computes no gradient for an input that does not require grad, so with frozen base weights no
base-weight GEMM runs. Under ``no_grad`` nothing is kept. With LoRA dropout in training, autograd differentiates the
same steps instead (it keeps the dropout masks and the intermediate rows). The rank is zero-padded to a multiple of
8 inside the call, because ``torch._grouped_mm`` needs 16-byte aligned rows; the padding contributes exact zeros and
its gradient is dropped.

The grouped_mm and reference backends (``takes_lora``) run these on ``weights.lora`` through :func:`run_lora` (and the
triton backend its own path, :mod:`leanmoe.lora.triton`);
``backend="auto"`` reaches them by the registry's normal walk (backends without ``takes_lora`` are passed over).

Rows of masked tokens (contract: past ``offsets_E[-1]``) are never written by a grouped GEMM, so every stage's
output and the gathered ``x_RD`` go through ``where(valid_R, ., 0)``: masked rows are exactly zero forward, and their
gradients are exactly zero backward (no stale memory reaches a bias gradient or dx).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from leanmoe.activations import Activation, activation_backward, apply_activation
from leanmoe.experts.plan import combine, plan_experts, sum_per_token
from leanmoe.experts.registry import ExpertsCall, select_backend, takes_lora_backends
from leanmoe.experts.weights import ExpertWeights
from leanmoe.lora.module import ExpertLoRA

#: The built-in backends that take LoRA adapters (``takes_lora``), best first: ``backend="auto"`` takes the first
#: that supports the call, by the registry's normal walk.
LORA_BACKENDS = tuple(takes_lora_backends())
_RANK_ALIGN = 8


def check_lora(lora: object, weights: ExpertWeights) -> ExpertLoRA:
    """Raises ``TypeError``/``ValueError`` when ``lora`` does not fit ``weights``; reads no data."""
    if not isinstance(lora, ExpertLoRA):
        raise TypeError(f"lora must be a leanmoe.ExpertLoRA or None, got {type(lora).__name__}")
    got = (lora.num_experts, lora.dim, lora.hidden_dim, lora.gated)
    want = (weights.num_experts, weights.dim, weights.hidden_dim, weights.gated)
    if got != want:
        raise ValueError(f"lora (num_experts, dim, hidden_dim, gated) = {got} does not fit the experts: expected "
                         f"{want} (activation {weights.activation.name!r})")
    for name, p in lora.named_parameters(recurse=False):
        if not p.is_floating_point():
            raise TypeError(f"lora.{name} must be floating point, got dtype {p.dtype}")
    return lora


def select_lora_backend(name: str, call: ExpertsCall) -> str:
    """The LoRA-capable backend that ``name`` resolves to for ``call`` (described with or without the adapter). A
    named backend that takes no adapters, or cannot run the call, raises ``ValueError`` with the reason: there is no
    silent fallback."""
    return select_backend(name, dataclasses.replace(call, has_lora=True))[0].name


def lora_moe_experts(call: ExpertsCall, backend: str, x_TD, topk_ids_TK, topk_weights_TK, gate_up_proj, down_proj,
                     gate_up_bias, down_bias, *, lora, token_mask=None) -> torch.Tensor:
    """:func:`leanmoe.moe_experts` with ``lora=`` and the options of ``call`` (kept for callers of the form
    before :class:`leanmoe.ExpertWeights`; ``moe_experts(..., lora=)`` is the entry point)."""
    from leanmoe.experts.functional import moe_experts

    return moe_experts(x_TD, topk_ids_TK, topk_weights_TK, gate_up_proj, down_proj, gate_up_bias, down_bias,
                       activation=call.activation, gate_up_layout=call.gate_up_layout, backend=backend,
                       save_percent=call.save_percent, check_ids=False, token_mask=token_mask, lora=lora)


def run_lora(fn, x_TD, topk_ids_TK, topk_weights_TK, weights: ExpertWeights, token_mask=None) -> torch.Tensor:
    """A LoRA-capable backend's call with ``weights.active_lora``: ``fn`` is :func:`grouped_mm_lora_experts`,
    :func:`reference_lora_experts` or :func:`leanmoe.lora.triton.triton_lora_experts`, given the unpacked weights.
    On meta tensors the output is a meta ``[T, D]`` tensor (shapes only: nothing to read, the backends' meta
    contract)."""
    if x_TD.device.type == "meta":
        return x_TD.new_empty(x_TD.shape)
    return fn(x_TD, topk_ids_TK, topk_weights_TK, weights.gate_up_proj, weights.down_proj, weights.gate_up_bias,
              weights.down_bias, activation=weights.activation, gate_up_layout=weights.gate_up_layout,
              lora=weights.active_lora, token_mask=token_mask)


def _adapter_input(a: torch.Tensor, lora: ExpertLoRA) -> torch.Tensor:
    # LoRA dropout acts on the adapter's input only (the base GEMM sees the undropped rows), in training only.
    if lora.training and lora.dropout > 0:
        return F.dropout(a, p=lora.dropout, training=True)
    return a


# --- the reference: a plain loop over experts --------------------------------------------------------------------


def _adapted_linear(a_eX, weight_EYX, factors, bias_EY, e: int, s: float, lora: ExpertLoRA) -> torch.Tensor:
    """``a W[e]^T + s (a A[e]^T) B[e]^T + b[e]`` for one expert's rows; weights in another float dtype than ``a``
    are cast to its dtype, one expert at a time (as the reference backend does)."""
    dtype = a_eX.dtype
    y_eY = a_eX @ weight_EYX[e].to(dtype).t()
    if factors is not None:
        A, B = (t[e].to(dtype) for t in factors)
        y_eY = y_eY + s * ((_adapter_input(a_eX, lora) @ A.t()) @ B.t())
    if bias_EY is not None:
        y_eY = y_eY + bias_EY[e].to(dtype)
    return y_eY


def reference_lora_experts(x_TD, topk_ids_TK, topk_weights_TK, gate_up_proj, down_proj, gate_up_bias, down_bias, *,
                           activation: Activation, gate_up_layout: str, lora: ExpertLoRA,
                           token_mask=None) -> torch.Tensor:
    """The ground truth: for each expert, its tokens through base + adapter, ``index_add`` into an fp32 output."""
    T, D = x_TD.shape
    acc_dtype = torch.promote_types(x_TD.dtype, torch.float32)
    y_TD = x_TD.new_zeros(T, D, dtype=acc_dtype)
    s = lora.scale
    gate_up, down = lora.factors("gate_up"), lora.factors("down")
    for e in range(gate_up_proj.shape[0]):
        routed_TK = topk_ids_TK == e
        if token_mask is not None:
            routed_TK = routed_TK & token_mask[:, None]  # masked tokens take no rows
        token_idx, slot_idx = torch.where(routed_TK)
        x_eD = x_TD.index_select(0, token_idx)
        gate_up_eN = _adapted_linear(x_eD, gate_up_proj, gate_up, gate_up_bias, e, s, lora)
        h_eI = apply_activation(gate_up_eN, activation, gate_up_layout)
        out_eD = _adapted_linear(h_eI, down_proj, down, down_bias, e, s, lora)
        weight_e = topk_weights_TK[token_idx, slot_idx].to(acc_dtype)
        y_TD = y_TD.index_add(0, token_idx, out_eD.to(acc_dtype) * weight_e[:, None])
    return y_TD.to(x_TD.dtype)


# --- the fast path: torch._grouped_mm on the sorted routing plan ---------------------------------------------------


def _padded_factors(factors, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``A [E, P, in]``, ``B [E, out, P]`` in ``dtype``, the rank zero-padded to a multiple of 8 (16-byte rows)."""
    A, B = factors[0].to(dtype), factors[1].to(dtype)
    pad = -A.shape[1] % _RANK_ALIGN
    if pad:
        A, B = F.pad(A, (0, 0, 0, pad)), F.pad(B, (0, pad))
    return A, B


def _expert_linear(a_RX, weight_EYX, bias_EY, factors, plan, valid_R1, lora: ExpertLoRA) -> torch.Tensor:
    """``a W[e]^T + s (a A[e]^T) B[e]^T + b[e]`` for each sorted row, ``[R, Y]``; masked rows exactly 0."""
    offs = plan.offsets_E
    y_RY = torch._grouped_mm(a_RX, weight_EYX.transpose(-2, -1), offs=offs)
    if factors is not None:
        A_EPX, B_EYP = _padded_factors(factors, a_RX.dtype)
        low_RP = torch._grouped_mm(_adapter_input(a_RX, lora), A_EPX.transpose(-2, -1), offs=offs) * lora.scale
        y_RY = y_RY + torch._grouped_mm(low_RP, B_EYP.transpose(-2, -1), offs=offs)
    if bias_EY is not None:
        y_RY = y_RY + bias_EY.index_select(0, plan.sorted_experts_R)
    if valid_R1 is not None:
        y_RY = torch.where(valid_R1, y_RY, 0)
    return y_RY


def _segment_sum(rows_RX: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
    """Per-expert sums of consecutive sorted rows, ``[E, X]``: a grouped GEMM against ones (deterministic, no host
    sync, fp32 accumulation; 8 wide for 16-byte rows), as the grouped_mm backend sums its bias gradients."""
    ones_R8 = torch.ones(rows_RX.shape[0], 8, dtype=rows_RX.dtype, device=rows_RX.device)
    return torch._grouped_mm(ones_R8.t(), rows_RX, offs=offsets_E)[:, 0]


def _stage_fwd(a_RX, weight_EYX, bias_EY, A_EPX, B_EYP, scale, plan, valid_R1):
    """``(y_RY, low_RP)``: ``y = a W^T + low B^T + b`` with ``low = s a A^T`` (None without the target)."""
    offs = plan.offsets_E
    y_RY = torch._grouped_mm(a_RX, weight_EYX.transpose(-2, -1), offs=offs)
    low_RP = None
    if A_EPX is not None:
        low_RP = torch._grouped_mm(a_RX, A_EPX.transpose(-2, -1), offs=offs) * scale
        y_RY = y_RY + torch._grouped_mm(low_RP, B_EYP.transpose(-2, -1), offs=offs)
    if bias_EY is not None:
        y_RY = y_RY + bias_EY.index_select(0, plan.sorted_experts_R)
    if valid_R1 is not None:
        y_RY = torch.where(valid_R1, y_RY, 0)
    return y_RY, low_RP


def _gathered_x(x_TD, plan, valid_R1):
    x_RD = x_TD.index_select(0, plan.sorted_tokens_R)
    # A masked token's x may hold NaN/inf: its rows take part in nothing.
    return x_RD if valid_R1 is None else torch.where(valid_R1, x_RD, 0)


class _LoRAGroupedMM(torch.autograd.Function):
    """The LoRA fast path with a hand-written backward that keeps only the caller's tensors and the two ``[R, P]``
    low-rank row blocks: the routing plan, ``gate_up_RN`` and ``h_RI`` are recomputed in backward (as the grouped_mm
    backend does at ``save_percent=0``), and gradients of inputs that do not require grad are never computed."""

    @staticmethod
    def forward(ctx, x_TD, topk_ids_TK, topk_weights_TK, gate_up_proj, down_proj, gate_up_bias, down_bias,
                gu_A, gu_B, d_A, d_B, token_mask, activation, gate_up_layout, scale):
        T, K = topk_ids_TK.shape
        plan = plan_experts(topk_ids_TK, gate_up_proj.shape[0], token_mask)
        valid_R1 = None if token_mask is None else plan.valid_R()[:, None]
        x_RD = _gathered_x(x_TD, plan, valid_R1)
        gate_up_RN, xlow_RP = _stage_fwd(x_RD, gate_up_proj, gate_up_bias, gu_A, gu_B, scale, plan, valid_R1)
        del x_RD
        h_RI = apply_activation(gate_up_RN, activation, gate_up_layout)
        del gate_up_RN
        out_RD, hlow_RP = _stage_fwd(h_RI, down_proj, down_bias, d_A, d_B, scale, plan, valid_R1)
        del h_RI
        y_TD = combine(out_RD, plan, topk_weights_TK)
        ctx.activation, ctx.gate_up_layout, ctx.scale = activation, gate_up_layout, scale
        ctx.save_for_backward(x_TD, topk_weights_TK, gate_up_proj, down_proj, gate_up_bias, down_bias, gu_A, gu_B,
                              d_A, d_B, token_mask, xlow_RP, hlow_RP, topk_ids_TK)
        return y_TD

    @staticmethod
    def backward(ctx, dy_TD):
        (x_TD, topk_weights_TK, gate_up_proj, down_proj, gate_up_bias, down_bias, gu_A, gu_B, d_A, d_B, token_mask,
         xlow_RP, hlow_RP, topk_ids_TK) = ctx.saved_tensors
        # The plan is recomputed (a sort of T*K ids), as the grouped_mm backend does, rather than kept: 3 [R] int64.
        plan = plan_experts(topk_ids_TK, gate_up_proj.shape[0], token_mask)
        needs = ctx.needs_input_grad
        s, offs = ctx.scale, plan.offsets_E
        T, K = topk_weights_TK.shape
        valid_R1 = None if token_mask is None else plan.valid_R()[:, None]

        x_RD = _gathered_x(x_TD, plan, valid_R1)
        gate_up_RN, _ = _stage_fwd(x_RD, gate_up_proj, gate_up_bias, None, None, s, plan, None)
        if gu_A is not None:
            gate_up_RN = gate_up_RN + torch._grouped_mm(xlow_RP, gu_B.transpose(-2, -1), offs=offs)
        h_RI = apply_activation(gate_up_RN, ctx.activation, ctx.gate_up_layout)

        dy_RD = dy_TD.contiguous().index_select(0, plan.sorted_tokens_R)
        if valid_R1 is not None:
            dy_RD = torch.where(valid_R1, dy_RD, 0)
        weights_R1 = topk_weights_TK.reshape(-1).index_select(0, plan.sorted_rows_R)[:, None].to(dy_RD.dtype)
        # <dy, W_d h + B_d hlow + b2> = <W_d^T dy, h> + <B_d^T dy, hlow> + <dy, b2>: the routing-weight gradient.
        dh_unweighted_RI = torch._grouped_mm(dy_RD, down_proj, offs=offs)
        dweights_R = (dh_unweighted_RI.float() * h_RI.float()).sum(-1)
        dhlow_RP = None
        if d_A is not None:
            dhlow_RP = torch._grouped_mm(dy_RD, d_B, offs=offs)
            dweights_R = dweights_R + (dhlow_RP.float() * hlow_RP.float()).sum(-1)
        if down_bias is not None:
            dweights_R = dweights_R + (dy_RD.float() * down_bias.index_select(0, plan.sorted_experts_R).float()).sum(-1)
        dy_RD = dy_RD * weights_R1
        ddown_proj = torch._grouped_mm(dy_RD.t(), h_RI, offs=offs) if needs[4] else None
        ddown_bias = _segment_sum(dy_RD, offs) if needs[6] else None
        dh_RI = dh_unweighted_RI * weights_R1
        del dh_unweighted_RI
        dd_A = dd_B = None
        if d_A is not None:
            dd_B = torch._grouped_mm(dy_RD.t(), hlow_RP, offs=offs) if needs[10] else None
            dhlow_RP = dhlow_RP * (weights_R1 * s)  # the gradient of h A_d^T (the scale folded in)
            dd_A = torch._grouped_mm(dhlow_RP.t(), h_RI, offs=offs) if needs[9] else None
            dh_RI = dh_RI + torch._grouped_mm(dhlow_RP, d_A, offs=offs)
        del dy_RD, h_RI

        dgate_up_RN = activation_backward(gate_up_RN, dh_RI, ctx.activation, ctx.gate_up_layout)
        del gate_up_RN, dh_RI
        dgate_up_proj = torch._grouped_mm(dgate_up_RN.t(), x_RD, offs=offs) if needs[3] else None
        dgate_up_bias = _segment_sum(dgate_up_RN, offs) if needs[5] else None
        dgu_A = dgu_B = None
        dx_RD = torch._grouped_mm(dgate_up_RN, gate_up_proj, offs=offs) if needs[0] else None
        if gu_A is not None:
            dgu_B = torch._grouped_mm(dgate_up_RN.t(), xlow_RP, offs=offs) if needs[8] else None
            dxlow_RP = torch._grouped_mm(dgate_up_RN, gu_B, offs=offs) * s  # the gradient of x A_gu^T
            dgu_A = torch._grouped_mm(dxlow_RP.t(), x_RD, offs=offs) if needs[7] else None
            if dx_RD is not None:
                dx_RD = dx_RD + torch._grouped_mm(dxlow_RP, gu_A, offs=offs)
        del x_RD, dgate_up_RN

        dx_TD = None
        if dx_RD is not None:
            if valid_R1 is not None:
                dx_RD = torch.where(valid_R1, dx_RD, 0)  # rows past the last offset are never written
            dx_TD = sum_per_token(dx_RD, plan, T, K)
        if valid_R1 is not None:
            dweights_R = torch.where(valid_R1[:, 0], dweights_R, 0)
        dweights_TK = plan.unsort_R(dweights_R).view(T, K)
        # Experts with no rows get exact zeros (the grouped GEMM need not write their output).
        empty_E = plan.counts_E == 0
        grads = [dgate_up_proj, ddown_proj, dgate_up_bias, ddown_bias, dgu_A, dgu_B, dd_A, dd_B]
        grads = [None if g is None else g.masked_fill(empty_E.view(-1, *[1] * (g.dim() - 1)), 0) for g in grads]
        return (dx_TD, None, dweights_TK.to(topk_weights_TK.dtype), *grads[:4], *grads[4:], None, None, None, None)


def grouped_mm_lora_experts(x_TD, topk_ids_TK, topk_weights_TK, gate_up_proj, down_proj, gate_up_bias, down_bias,
                            *, activation: Activation, gate_up_layout: str, lora: ExpertLoRA,
                            token_mask=None) -> torch.Tensor:
    """The LoRA expert compute on ``torch._grouped_mm`` (the module docstring gives the steps). ``[T, D]``."""
    T, K = topk_ids_TK.shape
    if T == 0:
        # Nothing routed: an empty output that still connects every input to autograd (zero gradients).
        tensors = [gate_up_proj, down_proj, topk_weights_TK, gate_up_bias, down_bias, *lora.parameters()]
        zero = sum(t.sum() * 0 for t in tensors if t is not None)
        return x_TD * zero.to(x_TD.dtype)
    if not (lora.training and lora.dropout > 0):
        (gu_A, gu_B), (d_A, d_B) = (_padded_factors(f, x_TD.dtype) if f is not None else (None, None)
                                    for f in (lora.factors("gate_up"), lora.factors("down")))
        return _LoRAGroupedMM.apply(x_TD, topk_ids_TK, topk_weights_TK, gate_up_proj, down_proj, gate_up_bias,
                                    down_bias, gu_A, gu_B, d_A, d_B, token_mask, activation, gate_up_layout,
                                    lora.scale)
    # With dropout, autograd differentiates the same steps (the dropout masks are its saved state).
    plan = plan_experts(topk_ids_TK, gate_up_proj.shape[0], token_mask)
    valid_R1 = None if token_mask is None else plan.valid_R()[:, None]
    x_RD = _gathered_x(x_TD, plan, valid_R1)
    gate_up_RN = _expert_linear(x_RD, gate_up_proj, gate_up_bias, lora.factors("gate_up"), plan, valid_R1, lora)
    h_RI = apply_activation(gate_up_RN, activation, gate_up_layout)
    out_RD = _expert_linear(h_RI, down_proj, down_bias, lora.factors("down"), plan, valid_R1, lora)
    return combine(out_RD, plan, topk_weights_TK)
