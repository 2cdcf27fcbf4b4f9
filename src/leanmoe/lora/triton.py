"""LoRA on the ``triton`` backend: the adapters' low-rank terms fused into the Triton GEMMs, the split backward.

Legend: T tokens, D model dim, I expert hidden dim, N gate/up rows (2I gated, I otherwise), E experts, K top-k,
R routed rows (T*K) in expert-sorted order, P the LoRA rank zero-padded to a multiple of 8 (16-byte rows for
``torch._grouped_mm``; the padding contributes exact zeros and its gradient is dropped by the padding's backward).

With ``s = alpha / rank``, expert e computes ``gate_up = x W_gu^T + (s x A_gu^T) B_gu^T (+ b1)``, ``h = act(gate_up)``,
``out = h W_d^T + (s h A_d^T) B_d^T (+ b2)``, ``y_t = sum_k w_tk out_tk`` (:mod:`leanmoe.lora.compute`).

Forward (``leanmoe::triton_lora_fwd``):
1. the triton backend's plan (sorted rows, int32 offsets, no host sync);
2. ``xlow_RP = s x[sorted_tokens] A_gu^T`` in one pass over the rows, x's rows gathered in the loads
   (:func:`low_rank_rows_path`; token-major or gathered GEMMs past rank 128: :func:`token_major_low_rank`);
3. the gate/up Triton kernel with ``xlow_RP @ B_gu[e]^T`` as its accumulators' start (activation in the epilogue);
4. ``hlow_RP = s h A_d^T`` the same way (``torch._grouped_mm`` past rank 128), then the down projection and
   combine kernels with ``hlow_RP @ B_d[e]^T`` as the accumulator's start.
Kept for backward: the caller's tensors, the plan and the two ``[R, P]`` low-rank blocks (``R * 2P`` elements: 4 MiB
for Qwen3-30B-A3B at T=16384, rank 16). Nothing else: backward recomputes the pre-activations with the same kernel.

Backward (``leanmoe::triton_lora_bwd``), the split engine of :mod:`leanmoe.experts.triton` with the adapters:
the pre-activations recomputed bitwise as in forward; ``W_d^T dy`` as ``torch._grouped_mm`` on the gathered dy
rows, and ``B_d^T dy`` with ``d B_d`` from one more pass over them
(:func:`leanmoe.experts.triton.factor_grads`); ``s (B_d^T dy) A_d`` added to dh in place (no ``[R, I]``
temporary); the activation backward row by row; ``dxlow = s dgate_up B_gu`` with ``d B_gu`` from one pass over
the dgate_up rows; ``d A_d`` as a grouped GEMM and ``d A_gu`` token-major or
gathered (as in forward); dx by the grouped GEMM kernel with ``dxlow A_gu`` as its start. Frozen base weights (and
an x without grad) cost no kernel.
LoRA dropout in training is not fused here: such calls go to the grouped_mm or reference backend.
"""

# torch.library.custom_op infers each op's schema from the annotations: keep ``Optional[Tensor]``, which every
# supported torch version parses, rather than ``Tensor | None``.
# ruff: noqa: UP045
from __future__ import annotations

from typing import Optional

import torch

from leanmoe.activations import Activation
from leanmoe.experts.plan import ExpertPlan, plan_experts, sorted_experts_from_offsets, valid_rows
from leanmoe.experts.triton import (
    grouped_projection_grads,
    grouped_weight_grad,
    kernel_act,
    routing_weight_grad,
    split_gate_up_bwd,
)
from leanmoe.kernels.policy import LOW_RANK_ROWS_MAX, combine_chunked, env_choice

Tensor = torch.Tensor


def _low_rank(a_RX: Tensor, A_EPX: Tensor, offsets_E: Tensor, s: float) -> Tensor:
    """``s a_RX A[e]^T`` for the sorted rows, ``[R, P]`` (rows past ``offsets_E[-1]`` unwritten)."""
    return torch._grouped_mm(a_RX, A_EPX.transpose(1, 2), offs=offsets_E).mul_(s)


#: :func:`token_major_low_rank` holds while ``E * P <= TOKEN_MAJOR_MAX_PER_K * K``.
TOKEN_MAJOR_MAX_PER_K = 512
#: ``LEANMOE_LORA_LOW_RANK``: how forward computes the adapters' low-rank inputs ``s x A_gu^T`` and ``s h A_d^T``.
LOW_RANK_PATHS = ("auto", "rows", "token_major", "gathered")


def low_rank_rows_path(P: int) -> bool:
    """Whether forward's ``s x A_gu^T`` and ``s h A_d^T`` run on :func:`~leanmoe.kernels.moe_fwd.low_rank_rows`
    (one pass over the expert-sorted rows, x's rows gathered in the loads) rather than
    :func:`token_major_low_rank`'s GEMMs (``torch._grouped_mm`` for ``h A_d^T``).

    ``auto`` (the default) takes ``rows`` for every padded rank P up to
    :data:`~leanmoe.kernels.policy.LOW_RANK_ROWS_MAX`. Measured in one
    process on an H200 (rank 16, base frozen, ``benchmarks/lora_ab.py``): the LoRA step 8.548 -> 8.263 ms on
    qwen3-30b-a3b (the frozen step 7.763), 55.36 -> 54.94 ms on mixtral-8x7b (52.80); in isolation qwen3's
    ``x A_gu^T`` 265 -> 85 us and Mixtral's ``h A_d^T`` 414 -> 220 us, qwen3's ``h A_d^T`` 94 -> 104 us.
    ``LEANMOE_LORA_LOW_RANK=token_major`` / ``gathered`` choose the GEMMs, for measurements.
    """
    path = env_choice("LEANMOE_LORA_LOW_RANK", LOW_RANK_PATHS, "auto")
    if path == "rows" and P > LOW_RANK_ROWS_MAX:
        raise ValueError(f"LEANMOE_LORA_LOW_RANK: 'rows' takes a padded rank of at most {LOW_RANK_ROWS_MAX}, "
                         f"got {P}; use 'auto', 'token_major' or 'gathered'")
    return path in ("auto", "rows") and P <= LOW_RANK_ROWS_MAX


def token_major_low_rank(E: int, P: int, K: int) -> bool:
    """Whether the gate/up adapter's ``x A_gu^T`` (forward) and ``d A_gu`` (backward) run token-major.

    Token-major: ``x_TD @ [A_gu[0]; ...; A_gu[E-1]]^T`` for every token and expert (``[T, E*P]``, one dense GEMM),
    of which each sorted row takes its expert's P columns; backward, the rows' ``d(x A^T)`` scattered into a
    ``[T, E*P]`` zero matrix, times ``x_TD``. Gathered: ``x[sorted_tokens]`` (a transient ``[R, D]`` copy) and
    grouped GEMMs. Token-major does E/K times the useful FLOPs but never writes or reads ``[R, D]``: on an H200
    (~700 TFLOP/s dense, ~3.5 TB/s) the dense GEMM's ``2 T D E P`` FLOPs cost less than the gather's ``3 R D`` bf16
    passes while ``E P`` stays below about 600 K; the bound here keeps a margin. Forward takes this rule only when
    :func:`low_rank_rows_path` does not hold; backward's ``LEANMOE_LORA_A_GRADS=torch`` path always.
    ``LEANMOE_LORA_LOW_RANK`` (``token_major`` / ``gathered``) overrides the rule, for measurements.
    """
    path = env_choice("LEANMOE_LORA_LOW_RANK", LOW_RANK_PATHS, "auto")
    if path in ("token_major", "gathered"):
        return path == "token_major"
    return E * P <= TOKEN_MAJOR_MAX_PER_K * K


def _x_low_rank(x_TD: Tensor, A_EPD: Tensor, plan: ExpertPlan, s: float, K: int) -> Tensor:
    """``xlow_RP = s x[sorted_tokens] A_gu[e]^T``, ``[R, P]`` (rows past ``offsets_E[-1]`` mean nothing)."""
    E, P, D = A_EPD.shape
    R = plan.sorted_tokens_R.numel()
    if R == 0:
        return x_TD.new_empty(0, P)
    if low_rank_rows_path(P):
        from leanmoe.kernels.moe_fwd import low_rank_rows  # here: importing kernels imports triton

        return low_rank_rows(x_TD, A_EPD, plan.offsets_E, a_rows_R=plan.sorted_tokens_R, scale=s)
    if token_major_low_rank(E, P, K):
        xa_TQ = x_TD @ A_EPD.reshape(E * P, D).t()  # [T, E*P]
        slots_R = plan.sorted_tokens_R * E + plan.sorted_experts_R
        return xa_TQ.view(-1, P).index_select(0, slots_R).mul_(s)
    x_RD = x_TD.index_select(0, plan.sorted_tokens_R)  # transient: freed on return
    return _low_rank(x_RD, A_EPD, plan.offsets_E, s)


def _h_low_rank(h_RI: Tensor, A_EPI: Tensor, offsets_E: Tensor, s: float) -> Tensor:
    """``hlow_RP = s h A_d[e]^T`` for the sorted rows, ``[R, P]`` (rows past ``offsets_E[-1]`` mean nothing)."""
    if low_rank_rows_path(A_EPI.shape[1]):
        from leanmoe.kernels.moe_fwd import low_rank_rows

        return low_rank_rows(h_RI, A_EPI, offsets_E, scale=s)
    return _low_rank(h_RI, A_EPI, offsets_E, s)


#: ``LEANMOE_LORA_A_GRADS``: how backward computes ``d A_gu`` and ``d A_d`` (for measurements).
A_GRADS_PATHS = ("torch", "triton")


def a_grads_path() -> str:
    """``triton`` (default): ``d A_d`` and ``d A_gu`` from :func:`~leanmoe.kernels.moe_bwd.expert_weight_grad` with
    rank-wide output tiles, ``d A_gu`` gathering x's rows in its loads (no ``[T, E*P]`` product, no ``[R, D]``
    copy); ``torch``: ``d A_d`` a ``torch._grouped_mm`` over the ``w h`` rows, ``d A_gu`` token-major or on a
    gathered copy of x (:func:`token_major_low_rank`). Measured in one process on an H200 (rank 16, base frozen,
    ``benchmarks/lora_ab.py``): qwen3's step 8.939 -> 8.727 ms, Mixtral's 56.11 -> 55.37 ms."""
    return env_choice("LEANMOE_LORA_A_GRADS", A_GRADS_PATHS, "triton")


def _factor_A_grad(a: Tensor, low_RP: Tensor, offsets_E: Tensor, A_EPX: Tensor,
                   a_rows_R: Optional[Tensor] = None) -> Tensor:
    """``d A[e] = sum_r low_r a_r^T`` over the expert's sorted rows (``a_r`` = ``a[a_rows_R[r]]``, or ``a[r]``),
    ``[E, P, X]``, by the weight-gradient kernel writing the transposed view."""
    from leanmoe.kernels.moe_bwd import expert_weight_grad  # here: importing kernels imports triton

    dA_EPX = torch.empty(A_EPX.shape, device=A_EPX.device, dtype=A_EPX.dtype)
    expert_weight_grad(a, low_RP, offsets_E, dA_EPX.transpose(1, 2), a_rows_R=a_rows_R)
    return dA_EPX


def _down_A_grad(dylow_RP: Tensor, hw_RI: Tensor, offsets_E: Tensor, A_EPI: Tensor, s: float) -> Tensor:
    """``d A_d[e] = s sum_r dylow_r (w_r h_r)^T`` over the expert's sorted rows, ``[E, P, I]``."""
    if a_grads_path() == "triton":
        return _factor_A_grad(hw_RI, dylow_RP, offsets_E, A_EPI).mul_(s)
    return grouped_weight_grad(dylow_RP, hw_RI, offsets_E, A_EPI).mul_(s)


def _gate_up_A_grad(dxlow_RP: Tensor, x_TD: Tensor, sorted_tokens_R: Tensor, offsets_E: Tensor, A_EPD: Tensor,
                    token_mask: Optional[Tensor], K: int, x_RD: Optional[Tensor]) -> Tensor:
    """``d A_gu[e] = sum_r dxlow_r x_r^T`` over the expert's sorted rows, ``[E, P, D]`` (``dxlow_RP`` with the
    scale folded in); ``x_RD``, the gathered rows, when the caller has them."""
    E, P, D = A_EPD.shape
    R = sorted_tokens_R.numel()
    if x_RD is None and a_grads_path() == "triton":
        # Only the kept rows of each expert are read: masked tokens' rows (and their x) never are.
        return _factor_A_grad(x_TD, dxlow_RP, offsets_E, A_EPD, a_rows_R=sorted_tokens_R)
    if x_RD is not None or not token_major_low_rank(E, P, K):
        x_RD = x_TD.index_select(0, sorted_tokens_R) if x_RD is None else x_RD
        return grouped_weight_grad(dxlow_RP, x_RD, offsets_E, A_EPD)
    T = x_TD.shape[0]
    if token_mask is not None:
        # Only a mask leaves rows past the kept ones (their values unwritten): zero them, and the masked tokens'
        # x rows (NaN padding must not reach the product).
        dxlow_RP = torch.where(valid_rows(offsets_E, R)[:, None], dxlow_RP, 0)
        x_TD = x_TD.masked_fill(~token_mask[:, None], 0)
    slots_R = sorted_tokens_R * E + sorted_experts_from_offsets(offsets_E, R)
    # (token, expert) pairs are distinct for distinct top-k ids; a repeated id adds its rows.
    g_TQ = torch.zeros(T * E, P, device=x_TD.device, dtype=dxlow_RP.dtype).index_add_(0, slots_R, dxlow_RP)
    return (g_TQ.view(T, E * P).t() @ x_TD).view(E, P, D)


@torch.library.custom_op("leanmoe::triton_lora_fwd", mutates_args=())
def triton_lora_fwd(
    x_TD: Tensor, topk_ids_TK: Tensor, topk_weights_TK: Tensor, gate_up_proj: Tensor, down_proj: Tensor,
    gate_up_bias: Optional[Tensor], down_bias: Optional[Tensor], gu_A: Optional[Tensor], gu_B: Optional[Tensor],
    d_A: Optional[Tensor], d_B: Optional[Tensor], scale: float, activation: str, alpha: float, limit: float,
    gate_up_layout: str, token_mask: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns ``(y_TD, sorted_rows_R, sorted_tokens_R, offsets_E, scale_R, xlow_RP, hlow_RP)``; all but ``y_TD``
    are kept for backward (an absent target's block is ``[0, P]``). Factors: ``gu_A [E, P, D]``, ``gu_B [E, N, P]``,
    ``d_A [E, P, I]``, ``d_B [E, D, P]``, in x's dtype; a target is adapted when both its factors are given."""
    from leanmoe.kernels.moe_fwd import gate_up_fwd

    T, D = x_TD.shape
    K = topk_ids_TK.shape[1]
    E = gate_up_proj.shape[0]
    R = T * K
    plan = plan_experts(topk_ids_TK, E, token_mask)
    tok, offs = plan.sorted_tokens_R, plan.offsets_E
    scale_R = topk_weights_TK.reshape(-1).index_select(0, plan.sorted_rows_R).float()
    xlow_RP = x_TD.new_empty(0, gu_A.shape[1] if gu_A is not None else 0)
    if gu_A is not None:
        xlow_RP = _x_low_rank(x_TD, gu_A, plan, scale, K)
    h_RI, _ = gate_up_fwd(x_TD, tok, offs, gate_up_proj, gate_up_bias, n_saved=0,
                          lora_in_RP=xlow_RP if gu_A is not None else None, lora_B=gu_B,
                          **kernel_act(activation, alpha, limit, gate_up_layout))
    hlow_RP = x_TD.new_empty(0, d_A.shape[1] if d_A is not None else 0)
    if d_A is not None and R:
        hlow_RP = _h_low_rank(h_RI, d_A, offs, scale)
    y_TD = torch.empty(T, D, device=x_TD.device, dtype=x_TD.dtype)
    if R:
        combine_chunked(h_RI, down_proj, down_bias, scale_R, plan.sorted_rows_R, offs, T, K, y_TD, token_mask,
                        lora_in_RP=hlow_RP if d_A is not None else None, lora_B_EDP=d_B)
    return y_TD, plan.sorted_rows_R, tok, offs, scale_R, xlow_RP, hlow_RP


@triton_lora_fwd.register_fake
def _(x_TD, topk_ids_TK, topk_weights_TK, gate_up_proj, down_proj, gate_up_bias, down_bias, gu_A, gu_B, d_A, d_B,
      scale, activation, alpha, limit, gate_up_layout, token_mask=None):
    T, D = x_TD.shape
    R = T * topk_ids_TK.shape[1]
    E = gate_up_proj.shape[0]
    index = dict(device=x_TD.device, dtype=torch.int64)
    return (x_TD.new_empty(T, D), torch.empty(R, **index), torch.empty(R, **index),
            torch.empty(E, device=x_TD.device, dtype=torch.int32),
            torch.empty(R, device=x_TD.device, dtype=torch.float32),
            x_TD.new_empty(R if gu_A is not None else 0, gu_A.shape[1] if gu_A is not None else 0),
            x_TD.new_empty(R if d_A is not None else 0, d_A.shape[1] if d_A is not None else 0))


@torch.library.custom_op("leanmoe::triton_lora_bwd", mutates_args=())
def triton_lora_bwd(
    dy_TD: Tensor, x_TD: Tensor, topk_ids_TK: Tensor, topk_weights_TK: Tensor, gate_up_proj: Tensor,
    down_proj: Tensor, gate_up_bias: Optional[Tensor], down_bias: Optional[Tensor], gu_A: Optional[Tensor],
    gu_B: Optional[Tensor], d_A: Optional[Tensor], d_B: Optional[Tensor], sorted_rows_R: Tensor,
    sorted_tokens_R: Tensor, offsets_E: Tensor, scale_R: Tensor, xlow_RP: Tensor, hlow_RP: Tensor, scale: float,
    activation: str, alpha: float, limit: float, gate_up_layout: str, token_mask: Optional[Tensor] = None,
    need_dx: bool = True, need_dgate_up: bool = True, need_ddown: bool = True,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns ``(dx, dweights, dgate_up_proj, ddown_proj, dgate_up_bias, ddown_bias, dgu_A, dgu_B, dd_A, dd_B)``;
    a gradient not asked for (``need_*``: frozen base weights, an x without grad), a missing bias's and an absent
    target's are empty tensors, and no kernel runs for them."""
    T, D = x_TD.shape
    K = topk_ids_TK.shape[1]
    R = T * K
    tok, offs = sorted_tokens_R, offsets_E
    empty = x_TD.new_empty(0)
    if R == 0:  # nothing routed: zero gradients of the right shapes
        def zeros(t: Optional[Tensor], need: bool = True) -> Tensor:
            return torch.zeros_like(t) if t is not None and need else x_TD.new_empty(0)
        return (torch.zeros_like(x_TD) if need_dx else empty.clone(), torch.zeros_like(topk_weights_TK),
                zeros(gate_up_proj, need_dgate_up), zeros(down_proj, need_ddown), zeros(gate_up_bias, need_dgate_up),
                zeros(down_bias, need_ddown), zeros(gu_A), zeros(gu_B), zeros(d_A), zeros(d_B))

    # The split engine's gate/up backward with both adapters' terms: the pre-activations recomputed as forward
    # computed them, W_down^T dy + s A_d^T B_d^T dy, and <that, h> as the routing-weight gradient.
    down_lora = None
    if d_A is not None and d_B is not None:
        # d B_d[e] = sum_r (w_r dy_r) hlow_r^T (with dy B_d, from one pass over the dy rows); then
        # d A_d[e] = s sum_r (B_d^T dy_r)(w_r h_r)^T.
        hlow_w_RP = (hlow_RP.float() * scale_R[:, None]).to(hlow_RP.dtype)
        down_lora = (d_A, d_B, scale, hlow_w_RP)
    dgate_up_RN, hw_RI, dweights_R, dy_RD, down_low, gate_up_low = split_gate_up_bwd(
        x_TD, dy_TD, tok, offs, scale_R, gate_up_proj, gate_up_bias, down_proj, x_TD.new_empty(0, 0),
        kernel_act(activation, alpha, limit, gate_up_layout), keep_dy=True,
        gate_up_lora=(xlow_RP, gu_B, scale) if gu_A is not None and gu_B is not None else None, down_lora=down_lora)
    assert dy_RD is not None
    dweights_TK = routing_weight_grad(dweights_R, dy_TD, down_bias, topk_ids_TK, topk_weights_TK, sorted_rows_R,
                                      tok, offs, token_mask)

    ddown_proj = ddown_bias = dgate_up_proj = dgate_up_bias = None
    dd_A = dd_B = dgu_A = dgu_B = dxlow_RP = None
    if need_ddown:
        ddown_proj, ddown_bias = grouped_projection_grads(dy_RD, hw_RI, offs, down_proj, down_bias,
                                                          bias_scale_R=scale_R)
    if down_low is not None and d_A is not None:
        dylow_RP, dd_B = down_low
        dd_A = _down_A_grad(dylow_RP, hw_RI, offs, d_A, scale)
        del dylow_RP
    del dy_RD, hw_RI, down_low

    if gate_up_low is not None:
        dxlow_RP, dgu_B = gate_up_low
    x_RD: Optional[Tensor] = None
    if need_dgate_up:
        x_RD = x_TD.index_select(0, tok)  # transient: freed before dx
        dgate_up_proj, dgate_up_bias = grouped_projection_grads(dgate_up_RN, x_RD, offs, gate_up_proj, gate_up_bias)
    if dxlow_RP is not None and gu_A is not None:
        dgu_A = _gate_up_A_grad(dxlow_RP, x_TD, tok, offs, gu_A, token_mask, K, x_RD)
    del x_RD

    dx_TD = torch.empty(T, D, device=x_TD.device, dtype=x_TD.dtype) if need_dx else empty.clone()
    if need_dx:
        combine_chunked(dgate_up_RN, gate_up_proj.transpose(1, 2), None, None, sorted_rows_R, offs, T, K, dx_TD,
                        token_mask, lora_in_RP=dxlow_RP,
                        lora_B_EDP=gu_A.transpose(1, 2) if dxlow_RP is not None and gu_A is not None else None)

    def given(t: Optional[Tensor]) -> Tensor:  # a custom op's outputs may not alias each other
        return t if t is not None else x_TD.new_empty(0)

    return (dx_TD, dweights_TK, given(dgate_up_proj), given(ddown_proj), given(dgate_up_bias), given(ddown_bias),
            given(dgu_A), given(dgu_B), given(dd_A), given(dd_B))


@triton_lora_bwd.register_fake
def _(dy_TD, x_TD, topk_ids_TK, topk_weights_TK, gate_up_proj, down_proj, gate_up_bias, down_bias, gu_A, gu_B, d_A,
      d_B, sorted_rows_R, sorted_tokens_R, offsets_E, scale_R, xlow_RP, hlow_RP, scale, activation, alpha, limit,
      gate_up_layout, token_mask=None, need_dx=True, need_dgate_up=True, need_ddown=True):
    def like(t, need=True):
        return x_TD.new_empty(t.shape if t is not None and need else (0,))

    return (like(x_TD, need_dx), topk_weights_TK.new_empty(topk_weights_TK.shape), like(gate_up_proj, need_dgate_up),
            like(down_proj, need_ddown), like(gate_up_bias, need_dgate_up), like(down_bias, need_ddown), like(gu_A),
            like(gu_B), like(d_A), like(d_B))


def _setup_context(ctx, inputs, output):
    (x_TD, topk_ids_TK, topk_weights_TK, gate_up_proj, down_proj, gate_up_bias, down_bias, gu_A, gu_B, d_A, d_B,
     scale, activation, alpha, limit, gate_up_layout, token_mask) = inputs
    _y, sorted_rows_R, sorted_tokens_R, offsets_E, scale_R, xlow_RP, hlow_RP = output
    ctx.save_for_backward(x_TD, topk_ids_TK, topk_weights_TK, gate_up_proj, down_proj, gate_up_bias, down_bias,
                          gu_A, gu_B, d_A, d_B, sorted_rows_R, sorted_tokens_R, offsets_E, scale_R, xlow_RP, hlow_RP,
                          token_mask)
    ctx.options = (scale, activation, alpha, limit, gate_up_layout)


def _backward(ctx, dy_TD, *_unused_grads):
    *saved, token_mask = ctx.saved_tensors
    needs = ctx.needs_input_grad
    need_dx, need_dgate_up, need_ddown = needs[0], needs[3] or needs[5], needs[4] or needs[6]
    grads = triton_lora_bwd(dy_TD, *saved, *ctx.options, token_mask=token_mask, need_dx=need_dx,
                            need_dgate_up=need_dgate_up, need_ddown=need_ddown)
    dx, dweights, dgate_up_proj, ddown_proj, dgate_up_bias, ddown_bias, dgu_A, dgu_B, dd_A, dd_B = grads

    def opt(g: Tensor, need: bool) -> Optional[Tensor]:
        return g if need and g.numel() else None

    return (dx if need_dx else None, None, dweights, opt(dgate_up_proj, needs[3]), opt(ddown_proj, needs[4]),
            opt(dgate_up_bias, needs[5]), opt(ddown_bias, needs[6]), opt(dgu_A, needs[7]), opt(dgu_B, needs[8]),
            opt(dd_A, needs[9]), opt(dd_B, needs[10]), None, None, None, None, None, None)


triton_lora_fwd.register_autograd(_backward, setup_context=_setup_context)


def triton_lora_experts(x_TD, topk_ids_TK, topk_weights_TK, gate_up_proj, down_proj, gate_up_bias, down_bias, *,
                        activation: Activation, gate_up_layout: str, lora, token_mask=None) -> Tensor:
    """The LoRA expert compute on the Triton kernels (the module docstring gives the steps). ``[T, D]``."""
    from leanmoe.lora.compute import _padded_factors

    (gu_A, gu_B), (d_A, d_B) = (_padded_factors(f, x_TD.dtype) if f is not None else (None, None)
                                for f in (lora.factors("gate_up"), lora.factors("down")))
    return triton_lora_fwd(x_TD, topk_ids_TK, topk_weights_TK, gate_up_proj, down_proj, gate_up_bias, down_bias,
                           gu_A, gu_B, d_A, d_B, float(lora.scale), activation.name, float(activation.alpha),
                           float(activation.limit), gate_up_layout, token_mask)[0]


__all__ = ["triton_lora_experts"]
