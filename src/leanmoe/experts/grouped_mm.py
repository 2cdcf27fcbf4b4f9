"""The ``torch._grouped_mm`` backend: sort routed rows by expert, two grouped GEMMs, a deterministic combine.

Legend: T tokens, D model dim, I expert hidden dim, N gate/up rows (2I gated, I otherwise), E experts, K top-k,
R routed rows (T*K), C rows of one chunk.

The compute is two opaque ``torch.library`` custom ops (``leanmoe::grouped_mm_experts_fwd`` / ``_bwd``) with fake
implementations, so ``torch.compile(fullgraph=True)`` traces them in every dtype they run eagerly (Inductor never
sees ``torch._grouped_mm``, whose compiled kernel takes bfloat16 only), and meta inputs give meta outputs.

Forward:
1. plan: stable sort of the routed rows by expert, int32 offsets, masked tokens' rows last and in no expert's count
   (:func:`leanmoe.experts.plan.plan_experts`; no host sync);
2. gather ``x_RD`` in expert order; ``gate_up_RN = x_RD @ gate_up_proj[e].T`` as one grouped GEMM (weights passed
   as transposed views, never copied); bias added after the GEMM; activation to ``h_RI``;
3. ``out_RD = h_RI @ down_proj[e].T`` (+ bias);
4. combine: rows back to ``[T, K, D]`` order by a gather, then ``y_T = w_T1K @ out_TKD`` (a batched GEMM, so each
   output element is one fp32-accumulated dot product: deterministic, no atomics); masked tokens' rows set to 0.

Rows past ``offsets_E[-1]`` (masked tokens) are never read by a GEMM, and the GEMMs leave them unwritten: whatever
they hold reaches only masked tokens' output and gradient rows, which are overwritten with exact zeros.

Saved for backward: nothing but the caller's tensors at ``save_percent == 0`` (backward re-plans and recomputes the
first GEMM); ``gate_up_RN`` at any ``save_percent > 0``. Under ``no_grad`` (or when nothing requires grad) nothing.

Backward uses ``<dy_t, W_down h> = <W_down^T dy_t, h>``, so the unweighted expert output is never kept. Its largest
live buffers are ``gate_up_RN``, ``dh_RI`` and ``dy_RD``: the routing-weight gradient, the activation and its
derivative run in row chunks of at most ``ROW_CHUNK_BYTES`` of fp32 temporaries, writing the activation into
``dh_RI``'s storage and (when recomputed) the pre-activation gradient into ``gate_up_RN``'s. Weight gradients are
2-D x 2-D grouped GEMMs (one output per expert, no atomics), and so are the bias gradients (against a ones matrix).
"""

# torch.library.custom_op infers each op's schema from the annotations: keep ``Optional[Tensor]``, which every
# supported torch version parses, rather than ``Tensor | None``.
# ruff: noqa: UP045
from __future__ import annotations

from typing import Optional

import torch

from leanmoe.activations import Activation, activation_backward, apply_activation
from leanmoe.experts.eager import op_or_body
from leanmoe.experts.plan import ExpertPlan, combine_routed, plan_experts, sum_per_token
from leanmoe.experts.registry import ExpertsBackend, ExpertsCall, cuda_capability, same_dtype_reason
from leanmoe.experts.weights import ExpertWeights, check_token_mask

Tensor = torch.Tensor

#: Bound on the fp32 temporaries of one row chunk (activation, its derivative, routing-weight gradient, bias adds).
ROW_CHUNK_BYTES = 64 * 2**20


def _row_chunks(R: int, row_elems: int) -> list[slice]:
    """Row ranges whose ``[C, row_elems]`` fp32 buffer fits ``ROW_CHUNK_BYTES``; shape-only, so no host sync."""
    rows = max(1, ROW_CHUNK_BYTES // (4 * max(row_elems, 1)))
    return [slice(r, min(r + rows, R)) for r in range(0, R, rows)]


def _add_expert_bias_(rows_RX: Tensor, bias_EX: Tensor, sorted_experts_R: Tensor) -> None:
    """``rows_RX[r] += bias_EX[sorted_experts_R[r]]`` in place, in row chunks (no ``[R, X]`` gathered copy)."""
    for c in _row_chunks(rows_RX.shape[0], rows_RX.shape[1]):
        rows_RX[c] += bias_EX.index_select(0, sorted_experts_R[c])


def _gate_up(x_TD: Tensor, gate_up_proj: Tensor, gate_up_bias: Optional[Tensor], plan: ExpertPlan) -> Tensor:
    x_RD = x_TD.index_select(0, plan.sorted_tokens_R)
    gate_up_RN = torch._grouped_mm(x_RD, gate_up_proj.transpose(-2, -1), offs=plan.offsets_E)
    del x_RD
    if gate_up_bias is not None:
        _add_expert_bias_(gate_up_RN, gate_up_bias, plan.sorted_experts_R)
    return gate_up_RN


def _segment_sum(rows_RX: Tensor, plan: ExpertPlan) -> Tensor:
    """Per-expert sums of consecutive sorted rows, ``[E, X]``.

    A 2-D x 2-D grouped GEMM against a ones matrix: deterministic (index_add would use atomics on CUDA), free of
    host syncs, and accumulated in fp32 inside the GEMM (thousands of bf16 rows summed in bf16 lose several
    percent). The ones matrix is 8 wide so that its rows stay 16-byte aligned.
    """
    ones_R8 = torch.ones(rows_RX.shape[0], 8, dtype=rows_RX.dtype, device=rows_RX.device)
    return torch._grouped_mm(ones_R8.t(), rows_RX, offs=plan.offsets_E)[:, 0]


def _activation(name: str, alpha: float, limit: float) -> Activation:
    return Activation(name=name, alpha=alpha, limit=limit)  # type: ignore[arg-type]


def _grouped_mm_experts_fwd(
    x_TD: Tensor, topk_ids_TK: Tensor, topk_weights_TK: Tensor, gate_up_proj: Tensor, down_proj: Tensor,
    gate_up_bias: Optional[Tensor], down_bias: Optional[Tensor], token_mask_T: Optional[Tensor], activation: str,
    alpha: float, limit: float, gate_up_layout: str, save_gate_up: bool,
) -> tuple[Tensor, Tensor]:
    """Returns ``(y_TD, gate_up_RN)``; ``gate_up_RN`` (kept for backward) is ``[0, N]`` unless ``save_gate_up``."""
    T, K = topk_ids_TK.shape
    D = x_TD.shape[1]
    act = _activation(activation, alpha, limit)
    plan = plan_experts(topk_ids_TK, gate_up_proj.shape[0], token_mask_T)
    gate_up_RN = _gate_up(x_TD, gate_up_proj, gate_up_bias, plan)
    R, N = gate_up_RN.shape
    I = down_proj.shape[2]
    h_RI = torch.empty(R, I, dtype=x_TD.dtype, device=x_TD.device)
    for c in _row_chunks(R, N):
        h_RI[c] = apply_activation(gate_up_RN[c], act, gate_up_layout)
    if not save_gate_up:
        del gate_up_RN
        gate_up_RN = x_TD.new_empty(0, N)
    out_RD = torch._grouped_mm(h_RI, down_proj.transpose(-2, -1), offs=plan.offsets_E)
    del h_RI
    if down_bias is not None:
        _add_expert_bias_(out_RD, down_bias, plan.sorted_experts_R)
    # Rebound before the GEMM, so the sorted rows are freed first (the peak holds one [R, D] buffer, not two).
    out_TKD = plan.unsort_rows(out_RD).view(T, K, D)
    del out_RD
    y_TD = combine_routed(out_TKD, topk_weights_TK)
    if token_mask_T is not None:
        # Masked tokens' rows of out_TKD were never written: exact zeros, whatever x or the weights hold.
        y_TD.masked_fill_(~token_mask_T[:, None], 0)
    return y_TD, gate_up_RN


grouped_mm_experts_fwd = torch.library.custom_op("leanmoe::grouped_mm_experts_fwd",
                                                 mutates_args=())(_grouped_mm_experts_fwd)


@grouped_mm_experts_fwd.register_fake
def _(x_TD, topk_ids_TK, topk_weights_TK, gate_up_proj, down_proj, gate_up_bias, down_bias, token_mask_T, activation,
      alpha, limit, gate_up_layout, save_gate_up):
    T, D = x_TD.shape
    R = T * topk_ids_TK.shape[1] if save_gate_up else 0
    return x_TD.new_empty(T, D), x_TD.new_empty(R, gate_up_proj.shape[1])


@torch.library.custom_op("leanmoe::grouped_mm_experts_bwd", mutates_args=())
def grouped_mm_experts_bwd(
    dy_TD: Tensor, x_TD: Tensor, topk_ids_TK: Tensor, topk_weights_TK: Tensor, gate_up_proj: Tensor,
    down_proj: Tensor, gate_up_bias: Optional[Tensor], down_bias: Optional[Tensor], token_mask_T: Optional[Tensor],
    saved_gate_up_RN: Tensor, activation: str, alpha: float, limit: float, gate_up_layout: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns ``(dx, dweights, dgate_up_proj, ddown_proj, dgate_up_bias, ddown_bias)``; a missing bias's gradient
    is an empty tensor. ``saved_gate_up_RN`` is the forward's ``gate_up_RN`` (``[0, N]``: recompute it)."""
    T, K = topk_ids_TK.shape
    D = x_TD.shape[1]
    act = _activation(activation, alpha, limit)
    plan = plan_experts(topk_ids_TK, gate_up_proj.shape[0], token_mask_T)
    dy_TD = dy_TD.contiguous()
    recomputed = saved_gate_up_RN.shape[0] == 0 and T * K > 0
    gate_up_RN = _gate_up(x_TD, gate_up_proj, gate_up_bias, plan) if recomputed else saved_gate_up_RN
    R, N = gate_up_RN.shape

    dy_RD = dy_TD.index_select(0, plan.sorted_tokens_R)
    weights_R = topk_weights_TK.reshape(-1).index_select(0, plan.sorted_rows_R)
    # W_down^T dy: the routing-weight gradient is <W_down^T dy, h>, and dh = w * W_down^T dy.
    dh_RI = torch._grouped_mm(dy_RD, down_proj, offs=plan.offsets_E)
    # A recomputed gate_up_RN is this op's own buffer and takes its gradient in place; a saved one is the forward's.
    dgate_up_RN = gate_up_RN if recomputed else torch.empty_like(gate_up_RN)
    dweights_R = torch.empty(R, dtype=torch.float32, device=x_TD.device)
    for c in _row_chunks(R, max(N, D)):
        g_CN, dh_unweighted_CI = gate_up_RN[c], dh_RI[c]
        h_CI = apply_activation(g_CN, act, gate_up_layout)
        dweights_C = torch.linalg.vecdot(dh_unweighted_CI.float(), h_CI.float())
        if down_bias is not None:
            bias_CD = down_bias.index_select(0, plan.sorted_experts_R[c])
            dweights_C += torch.linalg.vecdot(dy_RD[c].float(), bias_CD.float())
        dweights_R[c] = dweights_C
        dh_CI = dh_unweighted_CI * weights_R[c, None].to(dh_RI.dtype)
        activation_backward(g_CN, dh_CI, act, gate_up_layout, out=dgate_up_RN[c])
        # dh's rows of this chunk are consumed: the buffer now holds h, for d down_proj.
        dh_RI[c] = h_CI
    del gate_up_RN
    h_RI = dh_RI
    del dh_RI
    # Each routed row appears once in sorted_rows_R: a plain scatter, no accumulation.
    dweights_TK = plan.unsort_R(dweights_R).view(T, K)
    del dweights_R

    dy_RD *= weights_R[:, None].to(dy_RD.dtype)  # this op's own gather: scaled in place
    ddown_proj = torch._grouped_mm(dy_RD.t(), h_RI, offs=plan.offsets_E)
    ddown_bias = _segment_sum(dy_RD, plan) if down_bias is not None else None
    del dy_RD, h_RI

    x_RD = x_TD.index_select(0, plan.sorted_tokens_R)
    dgate_up_proj = torch._grouped_mm(dgate_up_RN.t(), x_RD, offs=plan.offsets_E)
    del x_RD
    dgate_up_bias = _segment_sum(dgate_up_RN, plan) if gate_up_bias is not None else None
    dx_RD = torch._grouped_mm(dgate_up_RN, gate_up_proj, offs=plan.offsets_E)
    del dgate_up_RN
    dx_TD = sum_per_token(dx_RD, plan, T, K)
    del dx_RD

    if token_mask_T is not None:
        # Masked tokens' rows were never read or written by a GEMM: exact zeros, whatever those rows held.
        dx_TD.masked_fill_(~token_mask_T[:, None], 0)
        dweights_TK.masked_fill_(~token_mask_T[:, None], 0)
    # Experts with no rows get exact zeros (the grouped GEMM need not write their output); in place, since a copy
    # would double the largest buffers of the backward.
    empty_E = plan.counts_E == 0
    dgate_up_proj.masked_fill_(empty_E[:, None, None], 0)
    ddown_proj.masked_fill_(empty_E[:, None, None], 0)
    # Distinct empty tensors for missing biases: a custom op's outputs may not alias each other.
    dgate_up_bias = dgate_up_bias.masked_fill(empty_E[:, None], 0) if dgate_up_bias is not None \
        else x_TD.new_empty(0)
    ddown_bias = ddown_bias.masked_fill(empty_E[:, None], 0) if ddown_bias is not None else x_TD.new_empty(0)
    return (dx_TD, dweights_TK.to(topk_weights_TK.dtype), dgate_up_proj, ddown_proj, dgate_up_bias, ddown_bias)


@grouped_mm_experts_bwd.register_fake
def _(dy_TD, x_TD, topk_ids_TK, topk_weights_TK, gate_up_proj, down_proj, gate_up_bias, down_bias, token_mask_T,
      saved_gate_up_RN, activation, alpha, limit, gate_up_layout):
    E, N, D = gate_up_proj.shape
    return (x_TD.new_empty(x_TD.shape), topk_weights_TK.new_empty(topk_weights_TK.shape),
            gate_up_proj.new_empty(gate_up_proj.shape), down_proj.new_empty(down_proj.shape),
            gate_up_proj.new_empty((E, N) if gate_up_bias is not None else (0,)),
            down_proj.new_empty((E, D) if down_bias is not None else (0,)))


def _setup_context(ctx, inputs, output):
    (x_TD, topk_ids_TK, topk_weights_TK, gate_up_proj, down_proj, gate_up_bias, down_bias, token_mask_T, activation,
     alpha, limit, gate_up_layout, _save_gate_up) = inputs
    ctx.save_for_backward(x_TD, topk_ids_TK, topk_weights_TK, gate_up_proj, down_proj, gate_up_bias, down_bias,
                          token_mask_T, output[1])
    ctx.options = (activation, alpha, limit, gate_up_layout)
    ctx.has_bias = (gate_up_bias is not None, down_bias is not None)


def _backward(ctx, dy_TD, _dgate_up_RN):
    dx, dweights, dgate_up_proj, ddown_proj, dgate_up_bias, ddown_bias = grouped_mm_experts_bwd(
        dy_TD, *ctx.saved_tensors, *ctx.options)
    has_gate_up_bias, has_down_bias = ctx.has_bias
    return (dx, None, dweights, dgate_up_proj, ddown_proj, dgate_up_bias if has_gate_up_bias else None,
            ddown_bias if has_down_bias else None, None, None, None, None, None, None)


grouped_mm_experts_fwd.register_autograd(_backward, setup_context=_setup_context)


def grouped_mm_moe_experts(x_TD: Tensor, topk_ids_TK: Tensor, topk_weights_TK: Tensor, gate_up_proj: Tensor,
                           down_proj: Tensor, gate_up_bias: Optional[Tensor] = None,
                           down_bias: Optional[Tensor] = None, *, activation: Activation, gate_up_layout: str,
                           save_percent: float = 0, token_mask: Optional[Tensor] = None) -> Tensor:
    """The grouped-GEMM expert compute; same contract as :func:`leanmoe.moe_experts` (validated inputs).

    ``token_mask``: optional ``[T]`` bool on x's device, True = keep; masked tokens take no rows, their output and
    gradient rows are exact zeros.
    """
    if token_mask is not None:
        check_token_mask(token_mask, (topk_ids_TK.shape[0],), topk_ids_TK.device, device_of="topk_ids")
    if x_TD.shape[0] == 0:
        # Nothing routed: an empty output that still connects every input to autograd (zero gradients).
        zero = (gate_up_proj.sum() + down_proj.sum() + topk_weights_TK.sum()) * 0
        if gate_up_bias is not None:
            zero = zero + gate_up_bias.sum() * 0
        if down_bias is not None:
            zero = zero + down_bias.sum() * 0
        return x_TD * zero.to(x_TD.dtype)
    requires_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x_TD, topk_weights_TK, gate_up_proj, down_proj, gate_up_bias,
                                                    down_bias))
    # Inference keeps nothing for backward, whatever save_percent says.
    save_gate_up = requires_grad and save_percent > 0
    args = (x_TD.contiguous(), topk_ids_TK, topk_weights_TK, gate_up_proj, down_proj, gate_up_bias, down_bias,
            token_mask)
    # Without autograd, in eager: the op's body without the dispatcher (leanmoe.experts.eager).
    fwd = grouped_mm_experts_fwd if requires_grad else op_or_body(grouped_mm_experts_fwd, _grouped_mm_experts_fwd,
                                                                   *args)
    return fwd(*args, activation.name, float(activation.alpha), float(activation.limit), gate_up_layout,
               save_gate_up)[0]


class GroupedMMBackend(ExpertsBackend):
    """``torch._grouped_mm`` on CPU (float32, float16, bfloat16; eager and under ``torch.compile``) and on CUDA
    (bfloat16, compute capability 9.0+), weights in x's dtype. Rows must be 16-byte aligned: D and I multiples of
    16 / itemsize. Takes LoRA adapters (:func:`leanmoe.lora.compute.grouped_mm_lora_experts`)."""

    name = "grouped_mm"
    priority = 10
    takes_lora = True

    def unsupported_reason(self, call: ExpertsCall) -> str | None:
        if not hasattr(torch, "_grouped_mm"):
            return f"torch {torch.__version__} has no torch._grouped_mm"
        if call.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            return f"dtype {call.dtype} (needs float32, float16 or bfloat16)"
        reason = same_dtype_reason(call)
        if reason is not None:
            return reason
        itemsize = torch.finfo(call.dtype).bits // 8
        if (call.dim * itemsize) % 16 or (call.hidden_dim * itemsize) % 16:
            return (f"torch._grouped_mm needs 16-byte rows: D and I multiples of {16 // itemsize} for {call.dtype}, "
                    f"got D={call.dim}, I={call.hidden_dim}")
        if call.device.type == "cuda":
            if call.dtype != torch.bfloat16:
                return f"on CUDA torch._grouped_mm needs bfloat16, got {call.dtype}"
            major, _ = cuda_capability(call.device.index)
            if major < 9:
                return f"on CUDA torch._grouped_mm needs compute capability >= 9.0, got {major}.x"
        elif call.device.type not in ("cpu", "meta"):
            return f"device {call.device.type} is not supported"
        if call.has_lora and call.dtype != torch.bfloat16 and torch.compiler.is_compiling():
            # The LoRA path calls torch._grouped_mm itself, and its fake (tracing) kernel accepts bfloat16 only.
            return f"under torch.compile the LoRA path's torch._grouped_mm needs bfloat16, got {call.dtype}"
        return None

    def __call__(self, x_TD, topk_ids_TK, topk_weights_TK, weights: ExpertWeights, *, save_percent,
                 token_mask=None):
        if weights.active_lora is not None:
            from leanmoe.lora import compute  # here: leanmoe.lora imports the experts package

            return compute.run_lora(compute.grouped_mm_lora_experts, x_TD, topk_ids_TK, topk_weights_TK, weights,
                                    token_mask)
        return grouped_mm_moe_experts(x_TD, topk_ids_TK, topk_weights_TK, weights.gate_up_proj, weights.down_proj,
                                      weights.gate_up_bias, weights.down_bias, activation=weights.activation,
                                      gate_up_layout=weights.gate_up_layout, save_percent=save_percent,
                                      token_mask=token_mask)
