"""Routing metadata shared by the fast backends: routed rows sorted by expert, without host syncs.

Legend: T tokens, K top-k, R routed rows (T*K), E experts.

A routed row r is the flat index ``t * K + k`` of ``topk_ids_TK``. Sorting the rows by expert (stable, so rows of
one expert stay in token order and the result is deterministic) gives:
- ``sorted_rows_R``: the routed row at each sorted position;
- ``sorted_tokens_R``: its token, ``sorted_rows_R // K``;
- ``sorted_experts_R``: its expert, non-decreasing;
- ``counts_E`` / ``offsets_E``: rows per expert and their int32 inclusive cumulative sum (``torch._grouped_mm``'s
  ``offs``: expert e owns sorted positions ``[offsets_E[e-1], offsets_E[e])``).

With a token mask, the rows of masked tokens sort with key E, after every kept row, in row order. They are in no
expert's count, so ``offsets_E[-1]`` (``ExpertPlan.num_kept``, a device tensor: no sync) is the number of kept rows
and sorted positions ``[offsets_E[-1], R)`` are masked rows that no GEMM may read (``ExpertPlan.valid_R()`` says
which positions are valid). At masked positions ``sorted_experts_R`` holds E-1, so indexing by it stays in range and
the column stays non-decreasing; the values there mean nothing.

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
        """Sorted position of each routed row (the inverse permutation of ``sorted_rows_R``; masked rows included)."""
        R = self.sorted_rows_R.numel()
        positions_R = torch.arange(R, device=self.sorted_rows_R.device)
        return torch.empty_like(self.sorted_rows_R).scatter_(0, self.sorted_rows_R, positions_R)

    @property
    def num_kept(self) -> torch.Tensor:
        """``[1]`` int32 device tensor: the number of kept (unmasked) rows, ``offsets_E[-1]``; 0 when E is 0."""
        if self.offsets_E.numel() == 0:
            return torch.zeros(1, dtype=torch.int32, device=self.offsets_E.device)
        return self.offsets_E[-1:]

    def valid_R(self) -> torch.Tensor:
        """``[R]`` bool: True at the sorted positions of kept rows (the first ``offsets_E[-1]``), False after."""
        R = self.sorted_rows_R.numel()
        return torch.arange(R, device=self.sorted_rows_R.device) < self.num_kept


def check_token_mask(token_mask_T: torch.Tensor, topk_ids_TK: torch.Tensor) -> None:
    """Raises ``TypeError`` (not a tensor, not bool) or ``ValueError`` (shape other than ``[T]``, device other than
    the ids') for a token mask; reads no data, so it costs no sync and traces under torch.compile."""
    if not isinstance(token_mask_T, torch.Tensor):
        raise TypeError(f"token_mask: expected a bool tensor of shape [T] or None, got {type(token_mask_T).__name__}")
    if token_mask_T.dtype != torch.bool:
        raise TypeError(f"token_mask: expected dtype torch.bool, got {token_mask_T.dtype}")
    T = topk_ids_TK.shape[0]
    if token_mask_T.shape != (T,):
        raise ValueError(f"token_mask: expected shape [{T}] (one flag per token), got {list(token_mask_T.shape)}")
    if token_mask_T.device != topk_ids_TK.device:
        raise ValueError(f"token_mask: expected device {topk_ids_TK.device} (that of topk_ids), "
                         f"got {token_mask_T.device}")


def plan_experts(topk_ids_TK: torch.Tensor, num_experts: int, token_mask_T: torch.Tensor | None = None) -> ExpertPlan:
    """Sorts the routed rows of ``topk_ids_TK`` (``[T, K]`` integer) by expert; ``token_mask_T`` (``[T]`` bool,
    True = keep, or None for all) sends the rows of masked tokens past every kept row and out of ``counts_E``."""
    T, K = topk_ids_TK.shape
    E = num_experts
    ids_R = topk_ids_TK.reshape(-1)
    if token_mask_T is None:
        key_R = ids_R
    else:
        check_token_mask(token_mask_T, topk_ids_TK)
        # One [T, K] tensor of keys (E for a masked token's rows): R long, like the ids, not an expanded copy.
        key_R = torch.where(token_mask_T[:, None], topk_ids_TK, E).reshape(-1)
    sorted_keys_R, sorted_rows_R = torch.sort(key_R, stable=True)
    # scatter_add of int64 ones counts rows per key with a fixed output size, so no host sync (bincount syncs); the
    # extra bin E collects the masked rows and is dropped.
    ones_R = torch.ones((), dtype=torch.int64, device=ids_R.device).expand(ids_R.numel())
    counts_E = torch.zeros(E + 1, dtype=torch.int64, device=ids_R.device).scatter_add_(0, key_R.long(), ones_R)[:E]
    offsets_E = torch.cumsum(counts_E, 0).to(torch.int32)
    sorted_experts_R = sorted_keys_R if token_mask_T is None else sorted_keys_R.clamp_max(max(E - 1, 0))
    return ExpertPlan(
        sorted_rows_R=sorted_rows_R,
        sorted_tokens_R=torch.div(sorted_rows_R, K, rounding_mode="floor"),
        sorted_experts_R=sorted_experts_R,
        counts_E=counts_E,
        offsets_E=offsets_E,
    )
