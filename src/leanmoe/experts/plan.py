"""Routing metadata, the one place that sorts and counts routed rows by expert: without host syncs.

Legend: T tokens, K top-k, R routed rows (T*K), E experts, D model dim, X any row width; for expert parallelism
P ranks, L experts per rank (E / P), S rows a rank receives.

A routed row r is the flat index ``t * K + k`` of ``topk_ids_TK``. Its sort key is its expert id, or E for a row
that is in no expert's count (a masked token's row; with ``drop_invalid_ids``, also an id outside ``[0, E)``).
1. counts: :func:`expert_counts` counts the keys per expert with a fixed-size ``scatter_add`` (no host sync;
   ``bincount`` syncs), the extra bin E dropped;
2. plan: :func:`plan_experts` sorts the rows by key (stable, so rows of one expert stay in token order and the
   result is deterministic) into an :class:`ExpertPlan`:
   - ``sorted_rows_R``: the routed row at each sorted position;
   - ``sorted_tokens_R``: its token, ``sorted_rows_R // K``;
   - ``sorted_experts_R``: its expert, non-decreasing;
   - ``counts_E`` / ``offsets_E``: rows per expert and their int32 inclusive cumulative sum (``torch._grouped_mm``'s
     ``offs``: expert e owns sorted positions ``[offsets_E[e-1], offsets_E[e])``);
   (a backward that kept only ``offsets_E`` rebuilds the last two with :func:`sorted_experts_from_offsets` and
   :func:`valid_rows`);
3. back to routed order: :meth:`ExpertPlan.inverse_R` (the inverse permutation), :meth:`ExpertPlan.unsort_rows`,
   :meth:`ExpertPlan.unsort_R`, :func:`sum_per_token` (sum of a token's K rows) and :func:`combine`
   (``y_t = sum_k w_tk * out_tk`` as one batched GEMM: deterministic, no atomics);
4. expert parallelism: :meth:`ExpertPlan.per_rank` views the plan as P ranks of L contiguous experts
   (:class:`RankPlan`: the sort already groups rows by destination rank, so the send order is ``sorted_rows_R``
   and the counts per (rank, local expert) are ``counts_E`` as ``[P, L]``); :func:`received_expert_ids` gives the
   local expert of each row a rank receives.

With a token mask, the rows of masked tokens sort with key E, after every kept row, in row order. They are in no
expert's count, so ``offsets_E[-1]`` (``ExpertPlan.num_kept``, a device tensor: no sync) is the number of kept rows
and sorted positions ``[offsets_E[-1], R)`` are masked rows that no GEMM may read (``ExpertPlan.valid_R()`` says
which positions are valid). At masked positions ``sorted_experts_R`` holds E-1, so indexing by it stays in range and
the column stays non-decreasing; the values there mean nothing.

No tensor here is an expanded copy of another; every one is R, E or P*L long.
"""

from __future__ import annotations

import dataclasses

import torch

from leanmoe.experts.weights import check_token_mask


@dataclasses.dataclass(frozen=True)
class ExpertPlan:
    """Routed rows sorted by expert (see the module docstring). Every tensor is on the ids' device: the first
    three ``[R]`` (``sorted_rows_R``/``sorted_tokens_R`` int64, ``sorted_experts_R`` the ids' dtype), ``counts_E``
    int64 and ``offsets_E`` int32 ``[E]``."""

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

    def unsort_rows(self, rows_RX: torch.Tensor) -> torch.Tensor:
        """``rows_RX`` (``[R, X]`` or ``[R]``, in sorted order) in routed order: row ``t * K + k`` at position
        ``t * K + k``. A gather by :meth:`inverse_R` into a new tensor; masked positions are copied like the rest."""
        return rows_RX.index_select(0, self.inverse_R())

    def unsort_R(self, values_R: torch.Tensor) -> torch.Tensor:
        """``values_R`` (``[R]``, in sorted order) in routed order, as :meth:`unsort_rows` gives it: one scatter,
        no inverse permutation (each routed row appears once in ``sorted_rows_R``, so nothing accumulates)."""
        return torch.empty_like(values_R).scatter_(0, self.sorted_rows_R, values_R)

    @property
    def num_experts(self) -> int:
        return self.counts_E.numel()

    @property
    def num_kept(self) -> torch.Tensor:
        """``[1]`` int32 device tensor: the number of kept (unmasked) rows, ``offsets_E[-1]``; 0 when E is 0."""
        if self.offsets_E.numel() == 0:
            return torch.zeros(1, dtype=torch.int32, device=self.offsets_E.device)
        return self.offsets_E[-1:]

    def valid_R(self) -> torch.Tensor:
        """``[R]`` bool: True at the sorted positions of kept rows (the first ``offsets_E[-1]``), False after."""
        return valid_rows(self.offsets_E, self.sorted_rows_R.numel())

    def per_rank(self, ep_size: int) -> RankPlan:
        """This plan seen by expert parallelism over ``ep_size`` ranks, each holding E / ``ep_size`` contiguous
        experts. Raises ``ValueError`` unless ``ep_size`` is a positive int that divides E."""
        E = self.num_experts
        if isinstance(ep_size, bool) or not isinstance(ep_size, int) or ep_size < 1 or E % ep_size:
            raise ValueError(f"ep_size: expected a positive int that divides num_experts={E}, got {ep_size!r}")
        return RankPlan(plan=self, ep_size=ep_size)


@dataclasses.dataclass(frozen=True)
class RankPlan:
    """An :class:`ExpertPlan` seen by expert parallelism: expert e lives on rank ``e // L`` as local expert
    ``e % L`` (L = E / P experts per rank, split contiguously).

    The sort by global expert already groups the rows by destination rank and, inside a rank, by local expert
    then token, so the send order is ``sorted_rows_R`` and the kept rows for each destination are contiguous; the
    masked rows (sorted positions ``[send_counts_PL.sum(), R)``) are sent nowhere.
    """

    plan: ExpertPlan
    ep_size: int

    @property
    def sorted_rows_R(self) -> torch.Tensor:
        """``[R]`` int64: the routed row at each sorted position, the send order."""
        return self.plan.sorted_rows_R

    @property
    def num_local_experts(self) -> int:
        return self.plan.num_experts // self.ep_size

    @property
    def send_counts_PL(self) -> torch.Tensor:
        """``[P, L]`` int64: kept rows for each (destination rank, local expert); a view of ``counts_E``."""
        return self.plan.counts_E.view(self.ep_size, self.num_local_experts)

    @property
    def send_counts_P(self) -> torch.Tensor:
        """``[P]`` int64: kept rows for each destination rank (the all-to-all's input split sizes, on the device)."""
        return self.send_counts_PL.sum(1)

    def send_tokens(self, num_sent: int) -> torch.Tensor:
        """``[num_sent]`` int64: the token of each of the first ``num_sent`` sorted rows (the kept rows, when
        ``num_sent`` is ``send_counts_PL.sum()`` read on the host), in send order; a view, no copy."""
        return self.plan.sorted_tokens_R[:num_sent]

    def inverse_R(self) -> torch.Tensor:
        """Sorted position of each routed row (:meth:`ExpertPlan.inverse_R`)."""
        return self.plan.inverse_R()


def _keys_R(topk_ids_TK: torch.Tensor, E: int, token_mask_T: torch.Tensor | None, drop_invalid_ids: bool
            ) -> torch.Tensor:
    """``[R]`` sort keys: each row's expert id, E for a row in no count. Without a mask or ``drop_invalid_ids`` it
    is a view of the ids; otherwise one new ``[T, K]`` tensor (R long, like the ids: not an expanded copy)."""
    if token_mask_T is not None:
        check_token_mask(token_mask_T, (topk_ids_TK.shape[0],), topk_ids_TK.device, device_of="topk_ids")
    keep_TK = None
    if drop_invalid_ids:
        keep_TK = (topk_ids_TK >= 0) & (topk_ids_TK < E)
    if token_mask_T is not None:
        keep_TK = token_mask_T[:, None] if keep_TK is None else keep_TK & token_mask_T[:, None]
    if keep_TK is None:
        return topk_ids_TK.reshape(-1)
    return torch.where(keep_TK, topk_ids_TK, E).reshape(-1)


def _count_keys(keys_R: torch.Tensor, E: int) -> torch.Tensor:
    # scatter_add of int64 ones counts rows per key with a fixed output size, so no host sync (bincount syncs); the
    # extra bin E collects the rows in no count and is dropped.
    ones_R = torch.ones((), dtype=torch.int64, device=keys_R.device).expand(keys_R.numel())
    return torch.zeros(E + 1, dtype=torch.int64, device=keys_R.device).scatter_add_(0, keys_R.long(), ones_R)[:E]


def expert_counts(topk_ids_TK: torch.Tensor, num_experts: int, token_mask_T: torch.Tensor | None = None, *,
                  drop_invalid_ids: bool = False) -> torch.Tensor:
    """``[E]`` int64 on the ids' device: routed rows per expert, the rows of masked tokens left out (no sort).

    ``topk_ids_TK`` ``[T, K]`` int32/int64 ids in ``[0, E)``; ``token_mask_T`` ``[T]`` bool (True = keep) or None;
    ``drop_invalid_ids`` also leaves out ids outside ``[0, E)`` (e.g. Hugging Face's expert-parallel sentinel E)
    instead of trusting every id to be in range. Equals :func:`plan_experts`'s ``counts_E``.
    """
    return _count_keys(_keys_R(topk_ids_TK, num_experts, token_mask_T, drop_invalid_ids), num_experts)


def plan_experts(topk_ids_TK: torch.Tensor, num_experts: int, token_mask_T: torch.Tensor | None = None, *,
                 drop_invalid_ids: bool = False) -> ExpertPlan:
    """Sorts the routed rows of ``topk_ids_TK`` (``[T, K]`` integer) by expert; ``token_mask_T`` (``[T]`` bool,
    True = keep, or None for all) sends the rows of masked tokens past every kept row and out of ``counts_E``;
    ``drop_invalid_ids`` does the same for rows whose id is outside ``[0, E)``."""
    T, K = topk_ids_TK.shape
    E = num_experts
    key_R = _keys_R(topk_ids_TK, E, token_mask_T, drop_invalid_ids)
    sorted_keys_R, sorted_rows_R = torch.sort(key_R, stable=True)
    counts_E = _count_keys(key_R, E)
    offsets_E = torch.cumsum(counts_E, 0).to(torch.int32)
    all_kept = token_mask_T is None and not drop_invalid_ids
    sorted_experts_R = sorted_keys_R if all_kept else sorted_keys_R.clamp_max(max(E - 1, 0))
    return ExpertPlan(
        sorted_rows_R=sorted_rows_R,
        sorted_tokens_R=torch.div(sorted_rows_R, K, rounding_mode="floor"),
        sorted_experts_R=sorted_experts_R,
        counts_E=counts_E,
        offsets_E=offsets_E,
    )


def valid_rows(offsets_E: torch.Tensor, num_rows: int) -> torch.Tensor:
    """``[R]`` bool (R = ``num_rows``): True at the sorted positions of kept rows, the first ``offsets_E[-1]``
    (:meth:`ExpertPlan.valid_R` from the offsets alone, for a backward that kept only them; no host sync)."""
    positions_R = torch.arange(num_rows, device=offsets_E.device)
    if offsets_E.numel() == 0:
        return torch.zeros(num_rows, dtype=torch.bool, device=offsets_E.device)
    return positions_R < offsets_E[-1:]


def sorted_experts_from_offsets(offsets_E: torch.Tensor, num_rows: int) -> torch.Tensor:
    """``[R]`` int64: :attr:`ExpertPlan.sorted_experts_R` from the offsets alone (E-1 past the kept rows, so
    indexing by it stays in range; no host sync)."""
    positions_R = torch.arange(num_rows, device=offsets_E.device, dtype=offsets_E.dtype)
    return torch.searchsorted(offsets_E, positions_R, right=True).clamp_max_(max(offsets_E.numel() - 1, 0))


def received_expert_ids(recv_counts_PL: torch.Tensor, num_received: int) -> torch.Tensor:
    """Local expert id of each row a rank receives in expert-parallel dispatch, ``[S]`` int64.

    ``recv_counts_PL`` ``[P, L]``: rows from each source rank for each local expert. Rows arrive grouped by source
    rank, and within one source by local expert (that rank's :class:`RankPlan` send order), so the ids are
    ``0..L-1`` repeated P times, each repeated by its count. ``num_received`` (S, already on the host) spares
    ``repeat_interleave`` a sync.
    """
    P, L = recv_counts_PL.shape
    local_ids_PL = torch.arange(L, device=recv_counts_PL.device).repeat(P)
    return torch.repeat_interleave(local_ids_PL, recv_counts_PL.reshape(-1), output_size=num_received)


def sum_per_token(rows_RX: torch.Tensor, plan: ExpertPlan, num_tokens: int, top_k: int) -> torch.Tensor:
    """``[T, X]``: for each token, the sum of its K rows of ``rows_RX`` (``[R, X]``, in sorted order), e.g. the
    input gradient from the rows' gradients. Gathers into routed order, then sums over K: deterministic."""
    X = rows_RX.shape[1]
    return plan.unsort_rows(rows_RX).view(num_tokens, top_k, X).sum(1)


def combine_routed(out_TKD: torch.Tensor, topk_weights_TK: torch.Tensor) -> torch.Tensor:
    """``y_TD[t] = sum_k topk_weights_TK[t, k] * out_TKD[t, k]`` as one batched GEMM (deterministic, no atomics),
    the weights cast to ``out_TKD``'s dtype first. ``out_TKD`` ``[T, K, D]`` in routed order; ``y_TD`` ``[T, D]``.

    For a caller that frees the sorted rows before the GEMM (``out_RD = plan.unsort_rows(out_RD)``, then this);
    :func:`combine` does both steps.
    """
    return torch.bmm(topk_weights_TK.to(out_TKD.dtype).unsqueeze(1), out_TKD).squeeze(1)


def combine(out_RD: torch.Tensor, plan: ExpertPlan, topk_weights_TK: torch.Tensor) -> torch.Tensor:
    """The weighted combine: ``y_TD[t] = sum_k w_tk * out[t*K + k]``, ``out_RD`` ``[R, D]`` in ``plan``'s sorted
    order (every position, masked ones included), ``topk_weights_TK`` ``[T, K]`` (cast to ``out_RD``'s dtype);
    returns ``[T, D]`` in ``out_RD``'s dtype. The caller's ``out_RD`` stays alive during the GEMM; see
    :func:`combine_routed` for a caller that needs it freed first."""
    T, K = topk_weights_TK.shape
    return combine_routed(plan.unsort_rows(out_RD).view(T, K, out_RD.shape[1]), topk_weights_TK)
