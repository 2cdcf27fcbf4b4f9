"""Routing metadata shared by the fast backends: routed rows sorted by expert, without host syncs.

Legend: T tokens, K top-k, R routed rows (T*K), E experts.

A routed row r is the flat index ``t * K + k`` of ``topk_ids_TK``. Sorting the rows by expert (stable, so rows of
one expert stay in token order and the result is deterministic) gives:
- ``sorted_rows_R``: the routed row at each sorted position;
- ``sorted_tokens_R``: its token, ``sorted_rows_R // K``;
- ``sorted_experts_R``: its expert, non-decreasing;
- ``counts_E`` / ``offsets_E``: rows per expert and their int32 inclusive cumulative sum (``torch._grouped_mm``'s
  ``offs``: expert e owns sorted positions ``[offsets_E[e-1], offsets_E[e])``).
No tensor here is an expanded copy of another; every one is R or E long.
"""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass(frozen=True)
class ExpertPlan:
    sorted_rows_R: torch.Tensor
    sorted_tokens_R: torch.Tensor
    sorted_experts_R: torch.Tensor
    counts_E: torch.Tensor
    offsets_E: torch.Tensor

    def inverse_R(self) -> torch.Tensor:
        """Sorted position of each routed row (the inverse permutation of ``sorted_rows_R``)."""
        R = self.sorted_rows_R.numel()
        positions_R = torch.arange(R, device=self.sorted_rows_R.device)
        return torch.empty_like(self.sorted_rows_R).scatter_(0, self.sorted_rows_R, positions_R)


def plan_experts(topk_ids_TK: torch.Tensor, num_experts: int) -> ExpertPlan:
    K = topk_ids_TK.shape[1]
    ids_R = topk_ids_TK.reshape(-1)
    sorted_experts_R, sorted_rows_R = torch.sort(ids_R, stable=True)
    # scatter_add of int64 ones counts rows per expert with a fixed output size, so no host sync (bincount syncs).
    ones_R = torch.ones((), dtype=torch.int64, device=ids_R.device).expand(ids_R.numel())
    counts_E = torch.zeros(num_experts, dtype=torch.int64, device=ids_R.device).scatter_add_(0, ids_R.long(), ones_R)
    offsets_E = torch.cumsum(counts_E, 0).to(torch.int32)
    return ExpertPlan(
        sorted_rows_R=sorted_rows_R,
        sorted_tokens_R=torch.div(sorted_rows_R, K, rounding_mode="floor"),
        sorted_experts_R=sorted_experts_R,
        counts_E=counts_E,
        offsets_E=offsets_E,
    )
