"""Plain torch references of the kernel launchers: same arguments, same results, a loop over experts anyone can read.

Legend: T tokens, D model dim, I expert hidden dim, N gate/up rows (2I gated, I otherwise), E experts, K top-k,
R routed rows in expert-sorted order, S saved rows, M and X the columns of a weight-gradient operand.

Each ``<launcher>_reference`` mirrors :mod:`leanmoe.kernels.moe_fwd` / :mod:`leanmoe.kernels.moe_bwd`: fp32 sums,
rounded to the I/O dtype where the kernel rounds (the gate/up pre-activation, then each output). They read no row
past ``offsets_E[-1]`` (masked tokens' rows) and write there what the launcher writes: nothing for outputs it
allocates with ``torch.empty`` (here zeros), zeros for the routing-weight gradient. They sync with the host
(``offsets_E.tolist()``): references for tests, never a hot path.

Imports no triton at import time; the activation codes are looked up in :mod:`leanmoe.kernels.moe_common` on call.
"""

from __future__ import annotations

import torch

from leanmoe.activations import Activation, activation_backward, apply_activation, resolve_activation, split_gate_up


def _expert_rows(offsets_E: torch.Tensor) -> list[tuple[int, int, int]]:
    """``(e, start, end)`` for each expert's sorted rows (``offsets_E`` holds inclusive ends)."""
    ends = offsets_E.tolist()
    return [(e, ends[e - 1] if e else 0, end) for e, end in enumerate(ends)]


def _activation(act_code: int, alpha: float, limit: float) -> Activation:
    from leanmoe.kernels.moe_common import ACTIVATION_CODES

    name = {code: name for name, code in ACTIVATION_CODES.items()}[act_code]
    return resolve_activation(name) if name != "clamped_swiglu" else \
        Activation(name="clamped_swiglu", alpha=alpha, limit=limit)


def _layout(interleaved: bool) -> str:
    return "interleaved" if interleaved else "concatenated"


def _gate_up_preact(x_TD, sorted_tokens_R, offsets_E, gate_up_proj, gate_up_bias, lora_in_RP=None,
                    lora_B=None) -> torch.Tensor:
    """``[R, N]`` pre-activations ``x[token_r] @ gate_up_proj[e].T (+ lora_in_RP[r] @ lora_B[e].T) + b[e]`` (fp32
    sum, rounded to x's dtype); zero rows past ``offsets_E[-1]``."""
    E, N, _ = gate_up_proj.shape
    pre_RN = torch.zeros(sorted_tokens_R.numel(), N, dtype=x_TD.dtype, device=x_TD.device)
    for e, start, end in _expert_rows(offsets_E):
        acc = x_TD[sorted_tokens_R[start:end]].float() @ gate_up_proj[e].float().T
        if lora_in_RP is not None:
            acc += lora_in_RP[start:end].float() @ lora_B[e].float().T
        if gate_up_bias is not None:
            acc += gate_up_bias[e].float()
        pre_RN[start:end] = acc.to(x_TD.dtype)
    return pre_RN


def gate_up_fwd_reference(x_TD, sorted_tokens_R, offsets_E, gate_up_proj, gate_up_bias, *, act_code, gated,
                          interleaved, alpha, limit, n_saved, lora_in_RP=None,
                          lora_B=None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`~leanmoe.kernels.moe_fwd.gate_up_fwd`: ``(h_RI, saved_SN)``, ``h = act(pre)`` and the first
    ``n_saved`` rows of ``pre`` as ``[gate | up]`` whatever the layout. ``gated`` is implied by ``act_code``."""
    activation = _activation(act_code, alpha, limit)
    assert activation.gated == gated, "gated must agree with act_code"
    pre_RN = _gate_up_preact(x_TD, sorted_tokens_R, offsets_E, gate_up_proj, gate_up_bias, lora_in_RP, lora_B)
    h_RI = apply_activation(pre_RN.float(), activation, _layout(interleaved)).to(x_TD.dtype)
    saved_RN = torch.cat(split_gate_up(pre_RN, _layout(interleaved)), dim=-1) if gated else pre_RN
    return h_RI, saved_RN[:n_saved]


def grouped_gemm_reference(a_RK, b_ENK, offsets_E, out_rows_R, out, *, bias_EN=None, scale_R=None, lora_in_RP=None,
                           lora_B=None) -> torch.Tensor:
    """:func:`~leanmoe.kernels.moe_fwd.grouped_gemm`: ``out[out_rows_R[r]] = (a_RK[r] @ b_ENK[e].T (+ lora_in_RP[r]
    @ lora_B[e].T) + bias_EN[e]) * scale_R[r]`` for the rows r of each expert e, written into ``out``; other rows of
    ``out`` are untouched."""
    for e, start, end in _expert_rows(offsets_E):
        acc = a_RK[start:end].float() @ b_ENK[e].float().T
        if lora_in_RP is not None:
            acc += lora_in_RP[start:end].float() @ lora_B[e].float().T
        if bias_EN is not None:
            acc += bias_EN[e].float()
        if scale_R is not None:
            acc *= scale_R[start:end, None]
        out[out_rows_R[start:end]] = acc.to(out.dtype)
    return out


def combine_reference(out_RC, y_TC, K, token_mask_T=None) -> torch.Tensor:
    """:func:`~leanmoe.kernels.moe_fwd.combine`: ``y_TC[t] = sum_k out_RC[t*K + k]`` in fp32, zeros for masked
    tokens (whatever their rows of ``out_RC`` hold), written into ``y_TC``."""
    T, C = y_TC.shape
    y = out_RC.float().view(T, K, C).sum(dim=1)
    if token_mask_T is not None:
        y = torch.where(token_mask_T[:, None], y, 0.0)
    return y_TC.copy_(y)


def gate_up_bwd_reference(x_TD, dy_TD, sorted_tokens_R, offsets_E, scale_R, gate_up_proj, gate_up_bias, down_proj,
                          saved_SN, *, act_code, gated, interleaved, alpha,
                          limit) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`~leanmoe.kernels.moe_bwd.gate_up_bwd`: ``(dgate_up_RN, hw_RI, dweights_R)`` with, for each kept row r
    of expert e, ``dh_r = dy[token_r] @ down_proj[e]``, ``h_r = act(pre_r)``, ``hw_r = w_r h_r``, ``dgate_up_r =
    act'(pre_r) (w_r dh_r)``, ``dweights_r = <dh_r, h_r>`` (the down-bias term left out). ``pre`` is recomputed
    from x: ``saved_SN``, which holds the same values rounded alike, is not read."""
    activation, layout, dtype = _activation(act_code, alpha, limit), _layout(interleaved), x_TD.dtype
    assert activation.gated == gated, "gated must agree with act_code"
    R, I = sorted_tokens_R.numel(), down_proj.shape[2]
    dh_RI = torch.zeros(R, I, dtype=torch.float32, device=x_TD.device)
    for e, start, end in _expert_rows(offsets_E):
        dh_RI[start:end] = dy_TD[sorted_tokens_R[start:end]].float() @ down_proj[e].float()
    pre_RN = _gate_up_preact(x_TD, sorted_tokens_R, offsets_E, gate_up_proj, gate_up_bias)
    h_RI = apply_activation(pre_RN.float(), activation, layout).to(dtype)
    hw_RI = (h_RI.float() * scale_R[:, None]).to(dtype)
    dgate_up_RN = activation_backward(pre_RN, dh_RI * scale_R[:, None], activation, layout)
    dweights_R = (dh_RI * h_RI.float()).sum(dim=-1)
    return dgate_up_RN, hw_RI, dweights_R


def activation_bwd_rows_reference(pre_RN, dh_RI, scale_R, offsets_E, *, act_code, gated, interleaved, alpha, limit,
                                  dgate_up_RN=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`~leanmoe.kernels.moe_bwd.activation_bwd_rows`: for each kept row r (``r < offsets_E[-1]``),
    ``h_r = act(pre_r)`` with ``pre_RN`` as ``[gate | up]``, ``hw_r = w_r h_r``, ``dgate_up_r = act'(pre_r)
    (w_r dh_r)`` in the weights' layout, ``dweights_r = <dh_r, h_r>``; other rows keep their values (dweights 0).
    Writes ``hw`` over ``dh_RI`` and ``dgate_up`` into ``dgate_up_RN`` (or a copy of ``pre_RN``)."""
    activation, dtype = _activation(act_code, alpha, limit), pre_RN.dtype
    assert activation.gated == gated, "gated must agree with act_code"
    R = pre_RN.shape[0]
    kept = int(offsets_E[-1]) if offsets_E.numel() else 0
    pre, dh, w = pre_RN[:kept].float(), dh_RI[:kept].float(), scale_R[:kept, None]
    h = apply_activation(pre, activation, "concatenated").to(dtype).float()
    dgate_up = activation_backward(pre.to(dtype), dh * w, activation, "concatenated").float()
    if interleaved and gated:  # [gate | up] -> gate_0, up_0, gate_1, up_1, ...
        half = dgate_up.shape[1] // 2
        dgate_up = torch.stack([dgate_up[:, :half], dgate_up[:, half:]], dim=-1).flatten(1)
    dgu = dgate_up_RN if dgate_up_RN is not None else pre_RN.clone()
    dgu[:kept] = dgate_up.to(dtype)
    dweights_R = torch.zeros(R, dtype=torch.float32, device=pre_RN.device)
    dweights_R[:kept] = (dh * h).sum(dim=-1)
    dh_RI[:kept] = (h * w).to(dtype)
    return dgu, dh_RI, dweights_R


def lora_rows_add_reference(out_RN, lo_RP, la_EPN, offsets_E, scale) -> torch.Tensor:
    """:func:`~leanmoe.kernels.moe_bwd.lora_rows_add_`: ``out[r] += scale * lo[r] @ la[e]`` (fp32, rounded once)
    for the kept rows of each expert, in place."""
    for e, start, end in _expert_rows(offsets_E):
        out_RN[start:end] = (out_RN[start:end].float()
                             + scale * (lo_RP[start:end].float() @ la_EPN[e].float())).to(out_RN.dtype)
    return out_RN


def low_rank_rows_reference(a, w_EPX, offsets_E, *, a_rows_R=None, scale=1.0) -> torch.Tensor:
    """:func:`~leanmoe.kernels.moe_fwd.low_rank_rows`: ``out[r] = scale * a[a_rows[r]] @ w[e]^T`` for the kept rows
    (zeros after them), fp32 sums rounded once."""
    rows_R = a_rows_R if a_rows_R is not None else torch.arange(a.shape[0], device=a.device)
    out_RP = torch.zeros(rows_R.numel(), w_EPX.shape[1], device=a.device, dtype=a.dtype)
    for e, start, end in _expert_rows(offsets_E):
        out_RP[start:end] = (scale * (a[rows_R[start:end]].float() @ w_EPX[e].float().T)).to(a.dtype)
    return out_RP


def low_rank_pair_reference(a_RX, w_EXP, b_RP, offsets_E, *, scale=1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`~leanmoe.kernels.moe_bwd.low_rank_pair`: ``low[r] = scale * a[r] @ w[e]`` for the kept rows (zeros
    after them) and ``dw[e] = a[rows of e]^T b[rows of e]`` (zeros for experts without rows), fp32 sums."""
    R, rank = b_RP.shape
    low_RP = torch.zeros(R, rank, device=a_RX.device, dtype=a_RX.dtype)
    dw_EXP = torch.zeros(w_EXP.shape, device=w_EXP.device, dtype=w_EXP.dtype)
    for e, start, end in _expert_rows(offsets_E):
        a = a_RX[start:end].float()
        low_RP[start:end] = (scale * (a @ w_EXP[e].float())).to(a_RX.dtype)
        dw_EXP[e] = (a.T @ b_RP[start:end].float()).to(w_EXP.dtype)
    return low_RP, dw_EXP


def expert_weight_grad_reference(a, b, offsets_E, out_EMN, *, a_rows_R=None, b_rows_R=None, dbias_EM=None,
                                 bias_scale_R=None) -> torch.Tensor:
    """:func:`~leanmoe.kernels.moe_bwd.expert_weight_grad` (both its kernels): ``out_EMN[e] = sum_{r of e}
    a[a_rows_R[r]]^T b[b_rows_R[r]]`` and ``dbias_EM[e] = sum_{r of e} bias_scale_R[r] a[a_rows_R[r]]``, fp32 sums,
    zeros for experts with no rows; both written in place."""
    for e, start, end in _expert_rows(offsets_E):
        rows = torch.arange(start, end, device=a.device)
        a_XM = a[a_rows_R[rows] if a_rows_R is not None else rows].float()
        b_XN = b[b_rows_R[rows] if b_rows_R is not None else rows].float()
        out_EMN[e] = (a_XM.T @ b_XN).to(out_EMN.dtype)
        if dbias_EM is not None:
            scale_X = bias_scale_R[rows, None] if bias_scale_R is not None else 1.0
            dbias_EM[e] = (scale_X * a_XM).sum(dim=0).to(dbias_EM.dtype)
    return out_EMN


__all__ = ["activation_bwd_rows_reference", "combine_reference", "expert_weight_grad_reference",
           "gate_up_bwd_reference", "gate_up_fwd_reference", "grouped_gemm_reference", "lora_rows_add_reference",
           "low_rank_pair_reference", "low_rank_rows_reference"]
