"""Launch policy of the MoE kernels: how many pre-activation rows forward keeps, and how the down projection (and
dX) is split into column chunks so that its transient buffer stays bounded.

Legend: T tokens, D model dim (the output columns of the chunked GEMM), E experts, K top-k, R routed rows (T*K),
C the columns of one chunk.

This module imports no triton at import time (the ``triton`` backend's module imports it on machines without
triton too); :func:`combine_chunked` imports the launchers when it runs.
"""

from __future__ import annotations

import math

import torch

#: Bound on the transient ``[R, D_chunk]`` buffer of the combine (forward output and dx), in bytes.
COMBINE_CHUNK_BYTES = 256 * 2**20

#: Chunks are multiples of this many columns (whole column tiles of every config).
CHUNK_COLUMNS = 128


def saved_rows(num_rows: int, save_percent: float) -> int:
    """Rows whose pre-activations forward keeps: ``floor(R * save_percent / 100)``, ``save_percent`` taken to
    0.01 (so 33.3 keeps 333 of 1000 rows, exactly, without float rounding)."""
    return num_rows * round(save_percent * 100) // 10000


def d_chunks(R: int, D: int, elem_size: int) -> list[tuple[int, int]]:
    """Column ranges ``[c0, c1)`` covering ``[0, D)`` whose ``[R, c1 - c0]`` buffer of ``elem_size``-byte
    elements fits :data:`COMBINE_CHUNK_BYTES`: equal widths, multiples of :data:`CHUNK_COLUMNS` (at least one), the
    last range cut at D. One range ``[(0, D)]`` when the whole buffer fits."""
    n = max(1, math.ceil(R * D * elem_size / COMBINE_CHUNK_BYTES))
    width = min(D, max(CHUNK_COLUMNS, math.ceil(D / n / CHUNK_COLUMNS) * CHUNK_COLUMNS))
    return [(c, min(c + width, D)) for c in range(0, D, width)]


def combine_chunked(a_RX: torch.Tensor, b_EDX: torch.Tensor, bias_ED: torch.Tensor | None,
                    scale_R: torch.Tensor | None, sorted_rows_R: torch.Tensor, offsets_E: torch.Tensor, T: int,
                    K: int, y_TD: torch.Tensor, token_mask_T: torch.Tensor | None) -> torch.Tensor:
    """``y_TD[t] = sum_k out[t*K + k]`` with ``out[sorted_rows_R[r]] = scale_R[r] * (a_RX[r] @ b_EDX[e].T +
    bias_ED[e])`` for the kept rows r of expert e; returns ``y_TD``, written in place.

    ``a_RX`` ``[R, X]`` in expert-sorted order; ``b_EDX`` ``[E, D, X]`` (any strides); ``bias_ED`` ``[E, D]`` or
    None; ``scale_R`` fp32 ``[R]`` or None; ``sorted_rows_R`` int64 (sorted position -> token-slot row);
    ``offsets_E`` int32 inclusive ends. Runs :func:`~leanmoe.kernels.moe_fwd.grouped_gemm` then
    :func:`~leanmoe.kernels.moe_fwd.combine` per range of :func:`d_chunks`, so only one ``[R, C]`` buffer is alive
    at a time. Masked tokens' rows of ``out`` are never written, and their ``y_TD`` rows are zeros.
    """
    from leanmoe.kernels.moe_fwd import combine, grouped_gemm

    R, D = T * K, y_TD.shape[1]
    for c0, c1 in d_chunks(R, D, a_RX.element_size()):
        out_RC = torch.empty(R, c1 - c0, device=a_RX.device, dtype=a_RX.dtype)
        grouped_gemm(a_RX, b_EDX[:, c0:c1], offsets_E, sorted_rows_R, out_RC,
                     bias_EN=bias_ED[:, c0:c1] if bias_ED is not None else None, scale_R=scale_R)
        combine(out_RC, y_TD[:, c0:c1], K, token_mask_T)
        del out_RC
    return y_TD


__all__ = ["COMBINE_CHUNK_BYTES", "combine_chunked", "d_chunks", "saved_rows"]
