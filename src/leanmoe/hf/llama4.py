"""Llama 4 text (``model_type="llama4_text"``, and the text model inside ``"llama4"``): top-1 sigmoid router,
the input scaled by the routing score *before* the experts, a shared expert, weights in ``[E, D, 2I]`` layout.

Legend: T tokens, D model dim, I expert hidden dim, E experts, K top-k, R routed rows (T*K).

transformers' ``Llama4TextMoe.forward`` runs every expert on every token (``[E*T, D]`` rows, non-chosen ones
scaled to zero), so the experts module has no ``(x, ids, weights)`` seam. Patched:
1. the router (``Llama4Router``, untouched) gives ``router_scores [T, E]`` (``sigmoid`` of the top-k logits,
   zero elsewhere) and the logits; the chosen experts are ``topk(logits, router.top_k)``, the very call the router
   makes, and their scores are gathered from ``router_scores`` (so gradients flow through the router as before);
2. each routed row is its token scaled by its score, ``x_RD = s_r * x_t`` (Llama 4 scales inputs, not outputs);
3. ``experts(x_RD, ids_R1, ones_R1)`` (the leanmoe experts-module protocol, unit output weights) and a sum over
   the K rows of each token;
4. plus the shared expert, as transformers wrote it; returns ``(out, router_logits)`` like the original.
For K = 1 this is exactly the original arithmetic minus the zero rows. The experts' weights are read as
``transpose(-2, -1)`` views: ``gate_up_proj [E, D, 2I]`` -> ``[E, 2I, D]`` (gate rows first), ``down_proj
[E, I, D]`` -> ``[E, D, I]``. Top-k lives in ``block.router.top_k``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from leanmoe.experts.weights import ExpertWeights
from leanmoe.hf.adapter import Family, default_activation, parameters_reason, patch_record, run_experts

_MODULE = "transformers.models.llama4.modeling_llama4"


def _expert_weights(self: Any) -> ExpertWeights:
    return ExpertWeights(gate_up_proj=self.gate_up_proj.transpose(-2, -1),
                         down_proj=self.down_proj.transpose(-2, -1), activation=default_activation(self),
                         gate_up_layout="concatenated")


def _experts_forward(self: Any, x_TD: torch.Tensor, topk_ids_TK: torch.Tensor,
                     topk_weights_TK: torch.Tensor) -> torch.Tensor:
    record = patch_record(self)
    assert record is not None  # this forward is installed with its record
    return run_experts(_expert_weights(self), x_TD, topk_ids_TK, topk_weights_TK, backend=record.backend,
                       save_percent=record.save_percent, lora=self._modules.get("lora"))


def _moe_forward(self: Any, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x_TD = hidden_states.reshape(-1, self.hidden_dim)
    router_scores_TE, router_logits_TE = self.router(x_TD)
    T, D = x_TD.shape
    K = self.router.top_k
    topk_ids_TK = torch.topk(router_logits_TE, K, dim=1).indices
    scores_TK = router_scores_TE.gather(1, topk_ids_TK)
    x_RD = (x_TD.unsqueeze(1) * scores_TK.unsqueeze(-1)).reshape(T * K, D)
    ones_R1 = torch.ones(T * K, 1, dtype=x_RD.dtype, device=x_RD.device)
    routed_TD = self.experts(x_RD, topk_ids_TK.reshape(T * K, 1), ones_R1).view(T, K, D).sum(1)
    out_TD = self.shared_expert(x_TD)
    out_TD.add_(routed_TD)
    return out_TD, router_logits_TE


def _check(experts: nn.Module) -> str | None:
    reason = parameters_reason(experts)
    if reason is not None:
        return reason
    try:
        default_activation(experts)
    except ValueError as e:
        return str(e)
    return None


FAMILY = Family(
    name="llama4",
    model_types=("llama4_text", "llama4"),
    module=_MODULE,
    block_class="Llama4TextMoe",
    experts_class="Llama4TextExperts",
    router_attr="router",
    experts_methods={"forward": _experts_forward, "expert_weights": _expert_weights},
    block_methods={"forward": _moe_forward},
    check=_check,
)
