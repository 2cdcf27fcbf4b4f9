"""The ``torch._grouped_mm`` backend: sort routed rows by expert, two grouped GEMMs, a deterministic combine.

Legend: T tokens, D model dim, I expert hidden dim, N gate/up rows (2I gated, I otherwise), E experts, K top-k,
R routed rows (T*K).

Forward:
1. plan: stable sort of the routed rows by expert, int32 offsets (no host sync);
2. gather ``x_RD`` in expert order; ``gate_up_RN = x_RD @ gate_up_proj[e].T`` as one grouped GEMM (weights passed
   as transposed views, never copied); bias added after the GEMM; activation to ``h_RI``;
3. ``out_RD = h_RI @ down_proj[e].T`` (+ bias);
4. combine: rows back to ``[T, K, D]`` order by a gather, then ``y_T = w_T1K @ out_TKD`` (a batched GEMM, so each
   output element is one fp32-accumulated dot product: deterministic, no atomics).

Saved for backward: the routing plan (R-long index vectors), and ``gate_up_RN`` only when ``save_percent > 0``
(otherwise the first GEMM is recomputed in backward). ``x``, ids and weights are the caller's tensors.

Backward uses ``<dy_t, W_down h> = <W_down^T dy_t, h>``, so the unweighted expert output is never kept; weight
gradients are 2-D x 2-D grouped GEMMs (one output per expert, no atomics), and so are the bias gradients (against a
ones matrix).
"""

from __future__ import annotations

import torch

from leanmoe.activations import Activation, activation_backward, apply_activation
from leanmoe.experts.plan import ExpertPlan, plan_experts
from leanmoe.experts.registry import ExpertsBackend, ExpertsCall, cuda_capability, register_backend


def _gate_up(x_RD, gate_up_proj, gate_up_bias, plan: ExpertPlan) -> torch.Tensor:
    gate_up_RN = torch._grouped_mm(x_RD, gate_up_proj.transpose(-2, -1), offs=plan.offsets_E)
    if gate_up_bias is not None:
        gate_up_RN = gate_up_RN + gate_up_bias.index_select(0, plan.sorted_experts_R)
    return gate_up_RN


def _segment_sum(rows_RX: torch.Tensor, plan: ExpertPlan) -> torch.Tensor:
    """Per-expert sums of consecutive sorted rows, ``[E, X]``.

    A 2-D x 2-D grouped GEMM against a ones matrix: deterministic (index_add would use atomics on CUDA), free of
    host syncs, and accumulated in fp32 inside the GEMM (thousands of bf16 rows summed in bf16 lose several
    percent). The ones matrix is 8 wide so that its rows stay 16-byte aligned.
    """
    ones_R8 = torch.ones(rows_RX.shape[0], 8, dtype=rows_RX.dtype, device=rows_RX.device)
    return torch._grouped_mm(ones_R8.t(), rows_RX, offs=plan.offsets_E)[:, 0]


class _GroupedMMExperts(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TD, topk_ids_TK, topk_weights_TK, gate_up_proj, down_proj, gate_up_bias, down_bias,
                activation: Activation, gate_up_layout: str, save_gate_up: bool):
        T, K = topk_ids_TK.shape
        D = x_TD.shape[1]
        plan = plan_experts(topk_ids_TK, gate_up_proj.shape[0])
        x_RD = x_TD.index_select(0, plan.sorted_tokens_R)
        gate_up_RN = _gate_up(x_RD, gate_up_proj, gate_up_bias, plan)
        del x_RD
        h_RI = apply_activation(gate_up_RN, activation, gate_up_layout)
        out_RD = torch._grouped_mm(h_RI, down_proj.transpose(-2, -1), offs=plan.offsets_E)
        del h_RI
        if down_bias is not None:
            out_RD = out_RD + down_bias.index_select(0, plan.sorted_experts_R)
        out_TKD = out_RD.index_select(0, plan.inverse_R()).view(T, K, D)
        del out_RD
        weights_T1K = topk_weights_TK.to(x_TD.dtype).unsqueeze(1)
        y_TD = torch.bmm(weights_T1K, out_TKD).squeeze(1)

        ctx.activation, ctx.gate_up_layout, ctx.save_gate_up = activation, gate_up_layout, save_gate_up
        ctx.has_gate_up_bias, ctx.has_down_bias = gate_up_bias is not None, down_bias is not None
        saved_gate_up = gate_up_RN if save_gate_up else None
        ctx.save_for_backward(x_TD, topk_weights_TK, gate_up_proj, down_proj, gate_up_bias, down_bias,
                              plan.sorted_rows_R, plan.sorted_tokens_R, plan.sorted_experts_R, plan.counts_E,
                              plan.offsets_E, saved_gate_up)
        return y_TD

    @staticmethod
    def backward(ctx, dy_TD):
        (x_TD, topk_weights_TK, gate_up_proj, down_proj, gate_up_bias, down_bias, sorted_rows_R, sorted_tokens_R,
         sorted_experts_R, counts_E, offsets_E, gate_up_RN) = ctx.saved_tensors
        plan = ExpertPlan(sorted_rows_R, sorted_tokens_R, sorted_experts_R, counts_E, offsets_E)
        T, K = topk_weights_TK.shape
        D = x_TD.shape[1]
        dy_TD = dy_TD.contiguous()

        x_RD = x_TD.index_select(0, sorted_tokens_R)
        if gate_up_RN is None:
            gate_up_RN = _gate_up(x_RD, gate_up_proj, gate_up_bias, plan)
        h_RI = apply_activation(gate_up_RN, ctx.activation, ctx.gate_up_layout)

        dy_RD = dy_TD.index_select(0, sorted_tokens_R)
        weights_R = topk_weights_TK.reshape(-1).index_select(0, sorted_rows_R)
        # W_down^T dy, shared by the routing-weight gradient and dh.
        dh_unweighted_RI = torch._grouped_mm(dy_RD, down_proj, offs=offsets_E)
        dweights_R = (dh_unweighted_RI.float() * h_RI.float()).sum(-1)
        if down_bias is not None:
            dweights_R = dweights_R + (dy_RD.float() * down_bias.index_select(0, sorted_experts_R).float()).sum(-1)
        dweights_TK = torch.empty_like(dweights_R).scatter_(0, sorted_rows_R, dweights_R).view(T, K)

        dy_weighted_RD = (dy_RD * weights_R[:, None].to(dy_RD.dtype))
        del dy_RD
        ddown_proj = torch._grouped_mm(dy_weighted_RD.t(), h_RI, offs=offsets_E)
        ddown_bias = _segment_sum(dy_weighted_RD, plan) if ctx.has_down_bias else None
        del dy_weighted_RD, h_RI

        dh_RI = dh_unweighted_RI * weights_R[:, None].to(dh_unweighted_RI.dtype)
        del dh_unweighted_RI
        dgate_up_RN = activation_backward(gate_up_RN, dh_RI, ctx.activation, ctx.gate_up_layout)
        del dh_RI, gate_up_RN
        dgate_up_proj = torch._grouped_mm(dgate_up_RN.t(), x_RD, offs=offsets_E)
        dgate_up_bias = _segment_sum(dgate_up_RN, plan) if ctx.has_gate_up_bias else None
        del x_RD
        dx_RD = torch._grouped_mm(dgate_up_RN, gate_up_proj, offs=offsets_E)
        del dgate_up_RN
        dx_TD = dx_RD.index_select(0, plan.inverse_R()).view(T, K, D).sum(1)

        # Experts with no rows get exact zeros (the grouped GEMM need not write their output).
        empty_E = counts_E == 0
        # In place: the gradients are fresh tensors, and a copy would double the largest buffers of the backward.
        dgate_up_proj.masked_fill_(empty_E[:, None, None], 0)
        ddown_proj.masked_fill_(empty_E[:, None, None], 0)
        if dgate_up_bias is not None:
            dgate_up_bias = dgate_up_bias.masked_fill(empty_E[:, None], 0)
        if ddown_bias is not None:
            ddown_bias = ddown_bias.masked_fill(empty_E[:, None], 0)
        return (dx_TD, None, dweights_TK.to(topk_weights_TK.dtype), dgate_up_proj, ddown_proj,
                dgate_up_bias, ddown_bias, None, None, None)


def grouped_mm_moe_experts(x_TD, topk_ids_TK, topk_weights_TK, gate_up_proj, down_proj, gate_up_bias=None,
                           down_bias=None, *, activation: Activation, gate_up_layout: str, save_percent: float = 0):
    if x_TD.shape[0] == 0:
        # Nothing routed: an empty output that still connects every input to autograd (zero gradients).
        zero = (gate_up_proj.sum() + down_proj.sum() + topk_weights_TK.sum()) * 0
        if gate_up_bias is not None:
            zero = zero + gate_up_bias.sum() * 0
        if down_bias is not None:
            zero = zero + down_bias.sum() * 0
        return x_TD * zero.to(x_TD.dtype)
    x_TD = x_TD.contiguous()
    return _GroupedMMExperts.apply(x_TD, topk_ids_TK, topk_weights_TK, gate_up_proj, down_proj, gate_up_bias,
                                   down_bias, activation, gate_up_layout, save_percent > 0)


class GroupedMMBackend(ExpertsBackend):
    """``torch._grouped_mm`` on CPU (float32, float16, bfloat16; bfloat16 only under ``torch.compile``) and on CUDA
    (bfloat16, compute capability 9.0+). Rows must be 16-byte aligned: D and I multiples of 16 / itemsize."""

    name = "grouped_mm"
    priority = 10

    def unsupported_reason(self, call: ExpertsCall) -> str | None:
        if not hasattr(torch, "_grouped_mm"):
            return f"torch {torch.__version__} has no torch._grouped_mm"
        if call.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            return f"dtype {call.dtype} (needs float32, float16 or bfloat16)"
        if call.dtype != torch.bfloat16 and torch.compiler.is_compiling():
            # torch._grouped_mm's fake (tracing) kernel accepts bfloat16 only, even where eager takes more.
            return f"under torch.compile torch._grouped_mm needs bfloat16, got {call.dtype}"
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
        elif call.device.type != "cpu":
            return f"device {call.device.type} is not supported"
        return None

    def __call__(self, x_TD, topk_ids_TK, topk_weights_TK, gate_up_proj, down_proj, gate_up_bias, down_bias, *,
                 activation, gate_up_layout, save_percent):
        return grouped_mm_moe_experts(x_TD, topk_ids_TK, topk_weights_TK, gate_up_proj, down_proj, gate_up_bias,
                                      down_bias, activation=activation, gate_up_layout=gate_up_layout,
                                      save_percent=save_percent)


register_backend(GroupedMMBackend())
