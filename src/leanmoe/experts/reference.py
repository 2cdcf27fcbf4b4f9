"""The reference expert compute: a plain loop over experts. Never optimised; it is the ground truth.

Legend: T tokens, D model dim, I expert hidden dim, N gate/up rows (2I gated, I otherwise), E experts, K top-k.

For each expert e:
1. find the (token, slot) pairs routed to e (``torch.where``, a data-dependent shape);
2. gather those tokens, run ``gate_up_proj[e]`` (+ bias), the activation, ``down_proj[e]`` (+ bias);
3. scale by the routing weights and ``index_add`` into an output of at least fp32.

Masked tokens (``token_mask`` False) are skipped in step 1: they take no compute, their output rows stay exactly 0
and their gradients are exactly 0, whatever their x rows hold. On meta tensors the loop (whose ``torch.where`` reads
the ids) is skipped for an output of the right shape.

Autograd differentiates it as written. Under ``torch.compile(fullgraph=True)`` it needs
``torch._dynamo.config.capture_dynamic_output_shape_ops = True`` because of step 1.
"""

from __future__ import annotations

import torch

from leanmoe.activations import Activation, apply_activation
from leanmoe.experts.registry import ExpertsBackend, register_backend


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
    """``[T, D]`` in x's dtype; ``token_mask`` is an optional ``[T]`` bool (True = keep)."""
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
        gate_up_eN = x_eD @ gate_up_proj[e].t()
        if gate_up_bias is not None:
            gate_up_eN = gate_up_eN + gate_up_bias[e]
        h_eI = apply_activation(gate_up_eN, activation, gate_up_layout)
        out_eD = h_eI @ down_proj[e].t()
        if down_bias is not None:
            out_eD = out_eD + down_bias[e]
        weight_e = topk_weights_TK[token_idx, slot_idx].to(acc_dtype)
        y_TD = y_TD.index_add(0, token_idx, out_eD.to(acc_dtype) * weight_e[:, None])
    return y_TD.to(x_TD.dtype)


class ReferenceBackend(ExpertsBackend):
    name = "reference"
    priority = 0

    def __call__(self, x_TD, topk_ids_TK, topk_weights_TK, gate_up_proj, down_proj, gate_up_bias, down_bias, *,
                 activation, gate_up_layout, save_percent, token_mask=None):
        return reference_moe_experts(x_TD, topk_ids_TK, topk_weights_TK, gate_up_proj, down_proj, gate_up_bias,
                                     down_bias, activation=activation, gate_up_layout=gate_up_layout,
                                     token_mask=token_mask)


register_backend(ReferenceBackend())
