"""The reference expert compute: a plain loop over experts. Never optimised; it is the ground truth.

Legend: T tokens, D model dim, I expert hidden dim, N gate/up rows (2I gated, I otherwise), E experts, K top-k.

For each expert e:
1. find the (token, slot) pairs routed to e (``torch.where``, a data-dependent shape);
2. gather those tokens, run ``gate_up_proj[e]`` (+ bias), the activation, ``down_proj[e]`` (+ bias);
3. scale by the routing weights and ``index_add`` into an output of at least fp32.

Weights in another float dtype than x are cast to x's dtype expert by expert (a copy of one expert at a time), so
the loop computes what a call with weights cast beforehand computes. With ``weights.lora`` the backend runs
:func:`leanmoe.lora.compute.reference_lora_experts`, the same loop with the adapters.

Masked tokens (``token_mask`` False) are skipped in step 1: they take no compute, their output rows stay exactly 0
and their gradients are exactly 0, whatever their x rows hold. On meta tensors the loop (whose ``torch.where`` reads
the ids) is skipped for an output of the right shape.

Autograd differentiates it as written. Under ``torch.compile(fullgraph=True)`` it needs
``torch._dynamo.config.capture_dynamic_output_shape_ops = True`` because of step 1.
"""

from __future__ import annotations

import torch

from leanmoe.activations import Activation, apply_activation
from leanmoe.experts.registry import ExpertsBackend, ExpertsCall
from leanmoe.experts.weights import ExpertWeights


def reference_moe_experts(
    x_TD: torch.Tensor,
    topk_ids_TK: torch.Tensor,
    topk_weights_TK: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    gate_up_bias: torch.Tensor | None,
    down_bias: torch.Tensor | None,
    *,
    activation: Activation,
    gate_up_layout: str,
    token_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``[T, D]`` in x's dtype; ``token_mask`` is an optional ``[T]`` bool (True = keep). Weights and biases in
    any float dtype (cast to x's, one expert at a time)."""
    T, D = x_TD.shape
    if x_TD.device.type == "meta":
        return x_TD.new_empty(T, D)
    acc_dtype = torch.promote_types(x_TD.dtype, torch.float32)
    y_TD = x_TD.new_zeros(T, D, dtype=acc_dtype)
    for e in range(gate_up_proj.shape[0]):
        if token_mask is None:
            token_idx, slot_idx = torch.where(topk_ids_TK == e)
        else:
            token_idx, slot_idx = torch.where((topk_ids_TK == e) & token_mask[:, None])
        x_eD = x_TD.index_select(0, token_idx)
        # .to is a no-op (no copy) for weights already in x's dtype.
        gate_up_eN = x_eD @ gate_up_proj[e].to(x_TD.dtype).t()
        if gate_up_bias is not None:
            gate_up_eN = gate_up_eN + gate_up_bias[e].to(x_TD.dtype)
        h_eI = apply_activation(gate_up_eN, activation, gate_up_layout)
        out_eD = h_eI @ down_proj[e].to(x_TD.dtype).t()
        if down_bias is not None:
            out_eD = out_eD + down_bias[e].to(x_TD.dtype)
        weight_e = topk_weights_TK[token_idx, slot_idx].to(acc_dtype)
        y_TD = y_TD.index_add(0, token_idx, out_eD.to(acc_dtype) * weight_e[:, None])
    return y_TD.to(x_TD.dtype)


class ReferenceBackend(ExpertsBackend):
    """The plain loop: every float dtype, every device, LoRA adapters; no per-expert scales."""

    name = "reference"
    priority = 0
    takes_lora = True

    def unsupported_reason(self, call: ExpertsCall) -> str | None:
        for what, dtype in (("weight", call.weight_dtype), ("bias", call.bias_dtype)):
            if dtype is not None and not dtype.is_floating_point:
                return f"the reference loop takes floating-point weights, got {what} dtype {dtype}"
        return None

    def __call__(self, x_TD, topk_ids_TK, topk_weights_TK, weights: ExpertWeights, *, save_percent,
                 token_mask=None):
        if weights.active_lora is not None:
            from leanmoe.lora import compute  # here: leanmoe.lora imports the experts package

            return compute.run_lora(compute.reference_lora_experts, x_TD, topk_ids_TK, topk_weights_TK, weights,
                                    token_mask)
        return reference_moe_experts(x_TD, topk_ids_TK, topk_weights_TK, weights.gate_up_proj, weights.down_proj,
                                     weights.gate_up_bias, weights.down_bias, activation=weights.activation,
                                     gate_up_layout=weights.gate_up_layout, token_mask=token_mask)
