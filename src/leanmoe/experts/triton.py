"""The ``triton`` backend: fused Triton MoE kernels for forward and backward, registered as ``torch.library`` ops.

Legend: T tokens, D model dim, I expert hidden dim, N gate/up rows (2I gated, I otherwise), E experts, K top-k,
R routed rows (T*K), S saved rows (``R * save_percent / 100``, rounded down).

Forward (``leanmoe::triton_experts_fwd``):
1. plan: stable sort of the routed rows by expert, int32 offsets (:func:`leanmoe.experts.plan.plan_experts`; no
   host sync: the kernels find each tile's expert on the device);
2. ``h_RI = act(x[sorted_tokens] @ gate_up_proj[e].T + b1)``: gather in the GEMM's loads, bias and activation in its
   epilogue (:func:`leanmoe.kernels.moe_fwd.gate_up_fwd`); the pre-activations of the first S sorted rows are kept;
3. ``out = w_r * (h_RI @ down_proj[e].T + b2)`` with the routing weight and bias in the epilogue, rows scattered to
   token-slot order, then ``y_t = sum_k out[t, k]`` (a fixed-order fp32 sum: deterministic, no atomics). Step 3
   runs in column chunks of D so the transient ``[R, D_chunk]`` buffer stays under
   ``leanmoe.kernels.policy.COMBINE_CHUNK_BYTES``.

Backward (``leanmoe::triton_experts_bwd``):
1. one fused kernel per (row tile, hidden-column tile): ``W_down^T dy`` for the tile, the pre-activations (loaded
   if saved, else recomputed from x), the activation derivative times the routing weight, ``h`` and the partial
   routing-weight gradient ``<W_down^T dy, h>`` (never the unweighted expert output);
2. ``d down_proj[e] = dy^T (w h)`` (the fused kernel stores ``w h``) and ``d gate_up_proj[e] = dgate_up^T x`` as
   per-expert reductions (one program per output tile and expert, no atomics); bias gradients as per-expert
   row sums in a small kernel beside them;
3. ``dx`` through the grouped GEMM ``dgate_up @ gate_up_proj[e]`` and the same fixed-order combine (in D chunks).
Steps 1-2 are the ``fused`` engine. The ``split`` engine (``leanmoe.kernels.policy.backward_engine``: the default on
CUDA in bf16 at compute capability 9.0+, where it measured faster on every preset) takes the pre-activations from
the forward kernel itself (saved, or recomputed by it: the same sums), computes ``W_down^T dy`` and both weight
gradients as ``torch._grouped_mm`` calls on gathered dy and x rows, and the activation backward row by row
(``activation_bwd_rows``); step 3 is the same.

``save_percent`` (what stays alive between forward and backward, besides the caller's x, ids, weights and
parameters, and the R-long routing metadata: sorted rows, sorted tokens, fp32 sorted weights, E offsets):
- 0: nothing else; backward recomputes the gate/up GEMM (one extra ``2*R*N*D`` FLOPs).
- 100: the gate/up pre-activations ``[R, N]`` in x's dtype; backward skips the recompute (the fastest backward).
- in between: the pre-activations of the first S rows in expert-sorted order; row tiles wholly inside them skip the
  recompute, the rest recompute. Memory and the recompute cost both scale linearly.

When no backward can run (grad mode off, ``inference_mode``, or no input requiring grad) the forward keeps nothing,
whatever ``save_percent`` says: it runs as ``save_percent=0``.

Token masks (``token_mask``, bool ``[T]``, True = keep): the plan sorts a masked token's rows past every kept row and
out of ``offsets_E``, so no GEMM or weight-gradient kernel touches them; the combine writes zeros for masked tokens
without reading their (never written) rows. Their output, ``dx`` and routing-weight gradient rows are exact zeros,
even where their x or dy rows hold NaN. No host sync: the kept-row count stays on the device.

Transient memory (freed before the op returns): forward ``h_RI`` plus one ``[R, D_chunk]`` chunk; backward
``dgate_up_RN``, ``hw_RI`` (until ``d down_proj``), then one ``[R, D_chunk]`` chunk for dx; the split engine adds the
gathered ``dy_RD`` (until ``d down_proj``) and then ``x_RD`` (until ``d gate_up_proj``), never both at once.
"""

# torch.library.custom_op infers each op's schema from the annotations: keep ``Optional[Tensor]``, which every
# supported torch version parses, rather than ``Tensor | None``.
# ruff: noqa: UP045
from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, Optional

import torch

from leanmoe.activations import GATED_ACTIVATIONS, Activation
from leanmoe.experts.eager import op_or_body
from leanmoe.experts.plan import plan_experts, valid_rows
from leanmoe.experts.registry import ExpertsBackend, ExpertsCall, cuda_capability, same_dtype_reason
from leanmoe.experts.weights import ExpertWeights
from leanmoe.kernels.policy import (  # triton-free: importable without triton
    backward_engine,
    combine_chunked,
    env_choice,
    grouped_mm_unsupported,
    saved_rows,
)

Tensor = torch.Tensor

def kernel_act(activation: str, alpha: float, limit: float, gate_up_layout: str) -> dict:
    """The activation arguments of the Triton launchers (``act_code``, ``gated``, ``interleaved``, ``alpha``,
    ``limit``) for an op's activation name, parameters and gate/up layout."""
    from leanmoe.kernels.moe_common import ACTIVATION_CODES

    return dict(act_code=ACTIVATION_CODES[activation], gated=activation in GATED_ACTIVATIONS,
                interleaved=gate_up_layout == "interleaved", alpha=alpha, limit=limit)


def _triton_experts_fwd(
    x_TD: Tensor, topk_ids_TK: Tensor, topk_weights_TK: Tensor, gate_up_proj: Tensor, down_proj: Tensor,
    gate_up_bias: Optional[Tensor], down_bias: Optional[Tensor], activation: str, alpha: float, limit: float,
    gate_up_layout: str, save_percent: float, token_mask: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns ``(y_TD, sorted_rows_R, sorted_tokens_R, offsets_E, scale_R, saved_SN)``; all but ``y_TD`` are kept
    for backward. ``token_mask`` (bool ``[T]``, True = keep): masked tokens take no rows of the GEMMs (they sort
    past ``offsets_E[-1]``) and get zero output."""
    from leanmoe.kernels.moe_fwd import gate_up_fwd

    T, D = x_TD.shape
    K = topk_ids_TK.shape[1]
    E = gate_up_proj.shape[0]
    R = T * K
    plan = plan_experts(topk_ids_TK, E, token_mask)
    scale_R = topk_weights_TK.reshape(-1).index_select(0, plan.sorted_rows_R).float()
    h_RI, saved_SN = gate_up_fwd(x_TD, plan.sorted_tokens_R, plan.offsets_E, gate_up_proj, gate_up_bias,
                                 n_saved=saved_rows(R, save_percent),
                                 **kernel_act(activation, alpha, limit, gate_up_layout))
    y_TD = torch.empty(T, D, device=x_TD.device, dtype=x_TD.dtype)
    if R:
        combine_chunked(h_RI, down_proj, down_bias, scale_R, plan.sorted_rows_R, plan.offsets_E, T, K, y_TD,
                         token_mask)
    return y_TD, plan.sorted_rows_R, plan.sorted_tokens_R, plan.offsets_E, scale_R, saved_SN


triton_experts_fwd = torch.library.custom_op("leanmoe::triton_experts_fwd", mutates_args=())(_triton_experts_fwd)


@triton_experts_fwd.register_fake
def _(x_TD, topk_ids_TK, topk_weights_TK, gate_up_proj, down_proj, gate_up_bias, down_bias, activation, alpha,
      limit, gate_up_layout, save_percent, token_mask=None):
    T, D = x_TD.shape
    R = T * topk_ids_TK.shape[1]
    E, N, _ = gate_up_proj.shape
    index = dict(device=x_TD.device, dtype=torch.int64)
    return (x_TD.new_empty(T, D), torch.empty(R, **index), torch.empty(R, **index),
            torch.empty(E, device=x_TD.device, dtype=torch.int32),
            torch.empty(R, device=x_TD.device, dtype=torch.float32),
            x_TD.new_empty(saved_rows(R, save_percent), N))


def split_gate_up_bwd(x_TD: Tensor, dy_TD: Tensor, sorted_tokens_R: Tensor, offsets_E: Tensor, scale_R: Tensor,
                      gate_up_proj: Tensor, gate_up_bias: Optional[Tensor], down_proj: Tensor, saved_SN: Tensor,
                      act: dict, *, keep_dy: bool, gate_up_lora: Optional[tuple[Tensor, Tensor, float]] = None,
                      down_lora: Optional[tuple[Tensor, Tensor, float, Tensor]] = None
                      ) -> tuple[Tensor, Tensor, Tensor, Optional[Tensor], Optional[tuple[Tensor, Tensor]],
                                 Optional[tuple[Tensor, Tensor]]]:
    """The split engine's gate/up backward: ``(dgate_up_RN, hw_RI, dweights_R, dy_RD, down_low, gate_up_low)``;
    ``dy_RD``, the gathered dy rows, only with ``keep_dy`` (for ``d down_proj`` and the down adapter). The
    adapters' terms that read the ``[R, D]`` dy rows or the ``[R, N]`` dgate_up rows, each pair from one pass
    over them (:func:`factor_grads`):
    ``down_low = (dy B_d [R, P], d B_d [E, D, P])`` with ``down_lora = (A_d, B_d, s, w h A_d^T s [R, P])``;
    ``gate_up_low = (s dgate_up B_gu [R, P], d B_gu [E, N, P])`` with ``gate_up_lora = (s x A_gu^T, B_gu, s)``.

    The pre-activations are the saved ones when every row was saved, else the forward kernel recomputes all of
    them (bitwise the forward's sums: the same kernel and tuning key), with the gate/up adapter's term
    ``gate_up_lora = (s x A_gu^T [R, P], B_gu, s)``. ``W_down^T dy`` is a ``torch._grouped_mm`` on the gathered dy
    rows; with ``down_lora``, ``s A_d^T (B_d^T dy)`` is added to it in place
    (:func:`~leanmoe.kernels.moe_bwd.lora_rows_add_`). The activation backward runs row by row in place (dgate_up
    over the recomputed pre-activations for the concatenated layout, ``w h`` over ``W_down^T dy``); its
    routing-weight gradient ``<W_down^T dy, h>`` lacks the down-bias term (:func:`routing_weight_grad`).
    """
    from leanmoe.kernels.moe_bwd import activation_bwd_rows, lora_rows_add_
    from leanmoe.kernels.moe_fwd import gate_up_fwd

    R = sorted_tokens_R.numel()
    I = down_proj.shape[2]
    recomputed = saved_SN.shape[0] < R
    if recomputed:
        lora_in_RP, lora_B = gate_up_lora[:2] if gate_up_lora is not None else (None, None)
        _, pre_RN = gate_up_fwd(x_TD, sorted_tokens_R, offsets_E, gate_up_proj, gate_up_bias, n_saved=R,
                                store_h=False, lora_in_RP=lora_in_RP, lora_B=lora_B, **act)
    else:
        pre_RN = saved_SN
    dy_RD = dy_TD.index_select(0, sorted_tokens_R)
    dh_RI = torch._grouped_mm(dy_RD, down_proj, offs=offsets_E) if R else dy_RD.new_empty(0, I)
    down_low = gate_up_low = None
    if down_lora is not None and R:
        d_A, d_B, s, hlow_w_RP = down_lora
        down_low = factor_grads(dy_RD, d_B, hlow_w_RP, offsets_E, 1.0)  # (B_d^T dy [R, P], d B_d)
        # s (B_d^T dy) A_d added to dh in place: no [R, I] temporary. (Inside the row kernel, the MMA with one
        # expert's factor per tile made that kernel 3x slower on an H200.)
        lora_rows_add_(dh_RI, down_low[0], d_A, offsets_E, s)
    in_place = recomputed and not act["interleaved"]
    dgate_up_RN, hw_RI, dweights_R = activation_bwd_rows(pre_RN, dh_RI, scale_R, offsets_E, **act,
                                                         dgate_up_RN=pre_RN if in_place else None)
    if gate_up_lora is not None and R:
        xlow_RP, gu_B, s = gate_up_lora
        gate_up_low = factor_grads(dgate_up_RN, gu_B, xlow_RP, offsets_E, s)  # (d(s x A_gu^T), d B_gu)
    return dgate_up_RN, hw_RI, dweights_R, dy_RD if keep_dy else None, down_low, gate_up_low


#: ``LEANMOE_LORA_FACTOR_GRADS``: ``fused`` (default) or ``grouped_mm`` (two grouped GEMMs, for measurements).
FACTOR_GRADS_PATHS = ("fused", "grouped_mm")


def factor_grads(a_RX: Tensor, B_EXP: Tensor, low_RP: Tensor, offsets_E: Tensor, s: float) -> tuple[Tensor, Tensor]:
    """A LoRA factor's two backward terms that read the expert-sorted gradient rows ``a_RX`` (dy rows for the
    down adapter, dgate_up rows for the gate/up adapter): ``(s a B[e] [R, P], d B [E, X, P] = a^T low)``.

    By default one pass over ``a_RX`` for both (:func:`leanmoe.kernels.moe_bwd.low_rank_pair`); with
    ``LEANMOE_LORA_FACTOR_GRADS=grouped_mm`` two ``torch._grouped_mm`` calls, each streaming ``a_RX``.
    """
    if env_choice("LEANMOE_LORA_FACTOR_GRADS", FACTOR_GRADS_PATHS, "fused") == "fused":
        from leanmoe.kernels.moe_bwd import low_rank_pair  # here: importing kernels imports triton

        return low_rank_pair(a_RX, B_EXP, low_RP, offsets_E, scale=s)
    low = torch._grouped_mm(a_RX, B_EXP, offs=offsets_E)
    if s != 1.0:
        low.mul_(s)
    return low, grouped_weight_grad(a_RX, low_RP, offsets_E, B_EXP)


def routing_weight_grad(dweights_R: Tensor, dy_TD: Tensor, down_bias: Optional[Tensor], topk_ids_TK: Tensor,
                        topk_weights_TK: Tensor, sorted_rows_R: Tensor, sorted_tokens_R: Tensor, offsets_E: Tensor,
                        token_mask: Optional[Tensor]) -> Tensor:
    """``[T, K]`` routing-weight gradient in the weights' dtype from the sorted rows' ``<W_down^T dy, h>``
    (``dweights_R``, fp32) plus the down bias's ``<dy_t, b_down[e]>`` (a small ``[T, E]`` GEMM; 0 for masked rows,
    past ``offsets_E[-1]``, whatever their dy holds)."""
    T, K = topk_weights_TK.shape
    R = T * K
    if down_bias is not None and R:
        bias_dot_TE = dy_TD.float() @ down_bias.float().t()
        sorted_experts_R = topk_ids_TK.reshape(-1).index_select(0, sorted_rows_R).long()
        bias_term_R = bias_dot_TE[sorted_tokens_R, sorted_experts_R]
        if token_mask is not None:
            bias_term_R = torch.where(valid_rows(offsets_E, R), bias_term_R, 0.0)
        dweights_R = dweights_R + bias_term_R
    # Each routed row appears once in sorted_rows_R: a plain scatter, no accumulation.
    dweights_TK = torch.zeros(R, device=dy_TD.device, dtype=torch.float32).scatter_(0, sorted_rows_R, dweights_R)
    return dweights_TK.view(T, K).to(topk_weights_TK.dtype)


def grouped_projection_grads(a_RM: Tensor, b_RN: Tensor, offsets_E: Tensor, weight_EMN: Tensor,
                             bias_EM: Optional[Tensor], *, bias_scale_R: Optional[Tensor] = None
                             ) -> tuple[Tensor, Optional[Tensor]]:
    """A projection's weight gradient ``a^T b`` per expert (:func:`grouped_weight_grad`) and, with a bias, its
    gradient ``sum_r scale_r a_r`` per expert (``bias_scale_R`` fp32, default ones), from expert-sorted rows."""
    from leanmoe.kernels.moe_bwd import expert_bias_grad

    dweight = grouped_weight_grad(a_RM, b_RN, offsets_E, weight_EMN)
    dbias = None
    if bias_EM is not None:
        dbias = expert_bias_grad(a_RM, offsets_E, torch.empty(bias_EM.shape, device=a_RM.device,
                                                              dtype=weight_EMN.dtype), scale_R=bias_scale_R)
    return dweight, dbias


def grouped_weight_grad(a_RM: Tensor, b_RN: Tensor, offsets_E: Tensor, like_EMN: Tensor) -> Tensor:
    """``out[e] = a_RM[rows of e]^T b_RN[rows of e]``, ``[E, M, N]`` contiguous, zeros for experts without rows."""
    from leanmoe.kernels.moe_bwd import zero_empty_experts_

    if a_RM.shape[0] == 0:
        return torch.zeros(like_EMN.shape, device=like_EMN.device, dtype=like_EMN.dtype)
    return zero_empty_experts_(torch._grouped_mm(a_RM.t(), b_RN, offs=offsets_E), offsets_E)


@torch.library.custom_op("leanmoe::triton_experts_bwd", mutates_args=())
def triton_experts_bwd(
    dy_TD: Tensor, x_TD: Tensor, topk_ids_TK: Tensor, topk_weights_TK: Tensor, gate_up_proj: Tensor,
    down_proj: Tensor, gate_up_bias: Optional[Tensor], down_bias: Optional[Tensor], sorted_rows_R: Tensor,
    sorted_tokens_R: Tensor, offsets_E: Tensor, scale_R: Tensor, saved_SN: Tensor, activation: str, alpha: float,
    limit: float, gate_up_layout: str, token_mask: Optional[Tensor] = None, need_dx: bool = True,
    need_dgate_up: bool = True, need_ddown: bool = True,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns ``(dx, dweights, dgate_up_proj, ddown_proj, dgate_up_bias, ddown_bias)``; a missing bias's gradient,
    and a gradient not asked for (``need_dx``; ``need_dgate_up`` for gate_up_proj and its bias, ``need_ddown`` for
    down_proj and its bias: frozen expert weights), is an empty tensor, and no kernel runs for it.
    Masked tokens (``token_mask`` False) get zero ``dx`` and ``dweights`` rows and add nothing to the weight
    gradients: their rows lie past ``offsets_E[-1]``, where no kernel reads."""
    from leanmoe.kernels.moe_bwd import expert_weight_grad, gate_up_bwd

    T, D = x_TD.shape
    K = topk_ids_TK.shape[1]
    E, N, _ = gate_up_proj.shape
    R = T * K
    act = kernel_act(activation, alpha, limit, gate_up_layout)
    split = backward_engine(x_TD, down_proj) == "split"
    dy_RD: Optional[Tensor] = None
    if split:
        dgate_up_RN, hw_RI, dweights_R, dy_RD, _, _ = split_gate_up_bwd(
            x_TD, dy_TD, sorted_tokens_R, offsets_E, scale_R, gate_up_proj, gate_up_bias, down_proj, saved_SN,
            act, keep_dy=need_ddown)
    else:
        dgate_up_RN, hw_RI, dweights_R = gate_up_bwd(
            x_TD, dy_TD, sorted_tokens_R, offsets_E, scale_R, gate_up_proj, gate_up_bias, down_proj, saved_SN, **act)
    dweights_TK = routing_weight_grad(dweights_R, dy_TD, down_bias, topk_ids_TK, topk_weights_TK, sorted_rows_R,
                                      sorted_tokens_R, offsets_E, token_mask)

    ddown_proj = ddown_bias = dgate_up_proj = dgate_up_bias = None
    if need_ddown:
        if split:
            assert dy_RD is not None
            ddown_proj, ddown_bias = grouped_projection_grads(dy_RD, hw_RI, offsets_E, down_proj, down_bias,
                                                              bias_scale_R=scale_R)
        else:
            ddown_proj = torch.empty_like(down_proj, memory_format=torch.contiguous_format)
            ddown_bias = torch.empty(E, D, device=x_TD.device, dtype=down_proj.dtype) \
                if down_bias is not None else None
            expert_weight_grad(dy_TD, hw_RI, offsets_E, ddown_proj, a_rows_R=sorted_tokens_R, dbias_EM=ddown_bias,
                               bias_scale_R=scale_R)
    del hw_RI, dy_RD
    if need_dgate_up:
        if split:
            x_RD = x_TD.index_select(0, sorted_tokens_R)  # transient: freed before dx
            dgate_up_proj, dgate_up_bias = grouped_projection_grads(dgate_up_RN, x_RD, offsets_E, gate_up_proj,
                                                                    gate_up_bias)
            del x_RD
        else:
            dgate_up_bias = torch.empty(E, N, device=x_TD.device, dtype=gate_up_proj.dtype) \
                if gate_up_bias is not None else None
            dgate_up_proj = torch.empty_like(gate_up_proj, memory_format=torch.contiguous_format)
            expert_weight_grad(dgate_up_RN, x_TD, offsets_E, dgate_up_proj, b_rows_R=sorted_tokens_R,
                               dbias_EM=dgate_up_bias)

    dx_TD = torch.empty(T, D, device=x_TD.device, dtype=x_TD.dtype) if need_dx else x_TD.new_empty(0)
    if R and need_dx:
        # dx_r = dgate_up_r @ gate_up_proj[e]: the grouped GEMM with b[e, d, n] = gate_up_proj[e, n, d].
        combine_chunked(dgate_up_RN, gate_up_proj.transpose(1, 2), None, None, sorted_rows_R, offsets_E, T, K,
                         dx_TD, token_mask)
    # Distinct empty tensors for missing biases: a custom op's outputs may not alias each other.
    def given(t: Optional[Tensor]) -> Tensor:
        return t if t is not None else x_TD.new_empty(0)

    return dx_TD, dweights_TK, given(dgate_up_proj), given(ddown_proj), given(dgate_up_bias), given(ddown_bias)


@triton_experts_bwd.register_fake
def _(dy_TD, x_TD, topk_ids_TK, topk_weights_TK, gate_up_proj, down_proj, gate_up_bias, down_bias, sorted_rows_R,
      sorted_tokens_R, offsets_E, scale_R, saved_SN, activation, alpha, limit, gate_up_layout, token_mask=None,
      need_dx=True, need_dgate_up=True, need_ddown=True):
    E, N, D = gate_up_proj.shape
    return (x_TD.new_empty(x_TD.shape if need_dx else (0,)), topk_weights_TK.new_empty(topk_weights_TK.shape),
            x_TD.new_empty(gate_up_proj.shape if need_dgate_up else (0,)),
            x_TD.new_empty(down_proj.shape if need_ddown else (0,)),
            x_TD.new_empty((E, N) if gate_up_bias is not None and need_dgate_up else (0,)),
            x_TD.new_empty((E, D) if down_bias is not None and need_ddown else (0,)))


def _setup_context(ctx, inputs, output):
    (x_TD, topk_ids_TK, topk_weights_TK, gate_up_proj, down_proj, gate_up_bias, down_bias, activation, alpha, limit,
     gate_up_layout, _save_percent, token_mask) = inputs
    _y, sorted_rows_R, sorted_tokens_R, offsets_E, scale_R, saved_SN = output
    ctx.save_for_backward(x_TD, topk_ids_TK, topk_weights_TK, gate_up_proj, down_proj, gate_up_bias, down_bias,
                          sorted_rows_R, sorted_tokens_R, offsets_E, scale_R, saved_SN, token_mask)
    ctx.options = (activation, alpha, limit, gate_up_layout)
    ctx.has_bias = (gate_up_bias is not None, down_bias is not None)


def _backward(ctx, dy_TD, *_unused_grads):
    *saved, token_mask = ctx.saved_tensors
    # Inputs: x, ids, weights, gate_up_proj, down_proj, gate_up_bias, down_bias, ... Frozen expert weights (and an x
    # that needs no gradient) cost no kernel time: their gradients are not computed at all.
    needs = ctx.needs_input_grad
    need_dx, need_dgate_up, need_ddown = needs[0], needs[3] or needs[5], needs[4] or needs[6]
    dx, dweights, dgate_up_proj, ddown_proj, dgate_up_bias, ddown_bias = triton_experts_bwd(
        dy_TD, *saved, *ctx.options, token_mask=token_mask, need_dx=need_dx, need_dgate_up=need_dgate_up,
        need_ddown=need_ddown)
    has_gate_up_bias, has_down_bias = ctx.has_bias
    return (dx if need_dx else None, None, dweights, dgate_up_proj if need_dgate_up else None,
            ddown_proj if need_ddown else None, dgate_up_bias if has_gate_up_bias and need_dgate_up else None,
            ddown_bias if has_down_bias and need_ddown else None, None, None, None, None, None, None)


triton_experts_fwd.register_autograd(_backward, setup_context=_setup_context)


def triton_moe_experts(x_TD: Tensor, topk_ids_TK: Tensor, topk_weights_TK: Tensor, gate_up_proj: Tensor,
                       down_proj: Tensor, gate_up_bias: Optional[Tensor] = None, down_bias: Optional[Tensor] = None,
                       *, activation: Activation, gate_up_layout: str, save_percent: float = 0,
                       token_mask: Optional[Tensor] = None) -> Tensor:
    """The fused Triton expert compute; same contract as :func:`leanmoe.moe_experts` (validated inputs)."""
    fwd: Callable[..., Any] = triton_experts_fwd
    if not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (
            x_TD, topk_weights_TK, gate_up_proj, down_proj, gate_up_bias, down_bias))):
        save_percent = 0  # no backward can run: keep no pre-activations, whatever save_percent asks
        # and no autograd is needed: in eager, the op's body without the dispatcher (leanmoe.experts.eager)
        fwd = op_or_body(triton_experts_fwd, _triton_experts_fwd, x_TD, topk_ids_TK, topk_weights_TK, gate_up_proj,
                         down_proj, gate_up_bias, down_bias, token_mask)
    return fwd(x_TD, topk_ids_TK, topk_weights_TK, gate_up_proj, down_proj, gate_up_bias, down_bias,
               activation.name, float(activation.alpha), float(activation.limit), gate_up_layout,
               float(save_percent), token_mask)[0]


def lora_call_reason(call: ExpertsCall) -> str | None:
    """Why the triton backend cannot run ``call`` with LoRA adapters (None when it can): the adapter path runs the
    split backward engine and ``torch._grouped_mm`` low-rank GEMMs, so it needs what they need
    (:func:`leanmoe.kernels.policy.grouped_mm_unsupported`), and it does not fuse dropout in training."""
    if call.device.type == "meta":
        return None
    capability = cuda_capability(call.device.index) if call.device.type == "cuda" else None
    why = grouped_mm_unsupported(call.device, call.dtype, call.dim, call.hidden_dim, capability)
    if why is not None:
        return f"its LoRA path needs torch._grouped_mm: {why}"
    if call.has_lora_dropout:
        return "it does not fuse LoRA dropout in training (grouped_mm and the reference do)"
    return None


def triton_call_reason(call: ExpertsCall) -> str | None:
    """The dtype and device rules of leanmoe's Triton kernels (this backend and ``triton_decode``): None when they
    can run ``call``, else why."""
    if call.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"dtype {call.dtype} (needs bfloat16, float16 or float32)"
    reason = same_dtype_reason(call)
    if reason is not None:
        return reason
    if call.device.type == "meta":
        return None  # the ops' fake implementations give the output's shape without reading data
    if call.device.type == "cuda":
        major, minor = cuda_capability(call.device.index)
        if major < 8:
            return f"needs a CUDA GPU of compute capability >= 8.0, got {major}.{minor}"
        return None
    if call.device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET", "0") != "1":
            return "on CPU tensors it runs only in the Triton interpreter (set TRITON_INTERPRET=1 before " \
                   "importing triton); use a CUDA GPU"
        if call.dtype == torch.bfloat16:
            return "the Triton interpreter does not support bfloat16 (use float32 or float16 on the CPU)"
        return None
    return f"device {call.device.type} is not supported (needs a CUDA GPU)"


class TritonBackend(ExpertsBackend):
    """Fused Triton kernels: CUDA GPUs of compute capability >= 8.0 in bfloat16, float16 or float32 (tuned for
    Hopper, bf16). On CPU tensors they run only in the Triton interpreter (``TRITON_INTERPRET=1``, float32/float16),
    for tests; ``auto`` never picks that."""

    name = "triton"
    priority = 20
    requires = ("triton",)
    extra = "triton"
    takes_lora = True

    def unsupported_reason(self, call: ExpertsCall) -> str | None:
        reason = triton_call_reason(call)
        if reason is None and call.has_lora:
            reason = lora_call_reason(call)
        return reason

    def auto_unsupported_reason(self, call: ExpertsCall) -> str | None:
        # On CUDA, auto takes triton for every call it runs: in the H100 all-preset run of 2026-11-23
        # (docs/BENCHMARKS.md) it was as fast as or faster than grouped_mm in every row, forward (1.02-1.58x) and
        # fwd+bwd (1.11-1.89x), with 2-8x less activation memory.
        reason = self.unsupported_reason(call)
        if reason is None and call.device.type == "cpu":
            reason = "auto never picks the Triton interpreter (CPU tensors); name backend='triton' to use it"
        elif reason is None and call.device.type != "cuda":
            reason = f"auto picks it for CUDA tensors only, got {call.device.type}"
        return reason

    def __call__(self, x_TD, topk_ids_TK, topk_weights_TK, weights: ExpertWeights, *, save_percent,
                 token_mask=None):
        if weights.active_lora is not None:
            from leanmoe.lora import compute, triton  # here: leanmoe.lora imports the experts package

            return compute.run_lora(triton.triton_lora_experts, x_TD, topk_ids_TK, topk_weights_TK, weights,
                                    token_mask)
        return triton_moe_experts(x_TD, topk_ids_TK, topk_weights_TK, weights.gate_up_proj, weights.down_proj,
                                  weights.gate_up_bias, weights.down_bias, activation=weights.activation,
                                  gate_up_layout=weights.gate_up_layout, save_percent=save_percent,
                                  token_mask=token_mask)
