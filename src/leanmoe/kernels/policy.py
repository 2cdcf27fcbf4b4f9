"""Launch policy of the MoE kernels: how many pre-activation rows forward keeps, how the down projection (and
dX) is split into column chunks so that its transient buffer stays bounded, and which engine runs the backward.

Legend: T tokens, D model dim (the output columns of the chunked GEMM), E experts, K top-k, R routed rows (T*K),
C the columns of one chunk.

This module imports no triton at import time (the ``triton`` backend's module imports it on machines without
triton too); :func:`combine_chunked` imports the launchers when it runs.
"""

from __future__ import annotations

import math
import os

import torch

#: Bound on the transient ``[R, D_chunk]`` buffer of the combine (forward output and dx), in bytes.
COMBINE_CHUNK_BYTES = 256 * 2**20

#: Chunks are multiples of this many columns (whole column tiles of every config).
CHUNK_COLUMNS = 128

#: The widest LoRA factor (padded rank) :func:`leanmoe.kernels.moe_fwd.low_rank_rows` takes: one tile holds it.
LOW_RANK_ROWS_MAX = 128


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
                    K: int, y_TD: torch.Tensor, token_mask_T: torch.Tensor | None, *,
                    lora_in_RP: torch.Tensor | None = None, lora_B_EDP: torch.Tensor | None = None) -> torch.Tensor:
    """``y_TD[t] = sum_k out[t*K + k]`` with ``out[sorted_rows_R[r]] = scale_R[r] * (a_RX[r] @ b_EDX[e].T +
    bias_ED[e])`` for the kept rows r of expert e; returns ``y_TD``, written in place.

    ``a_RX`` ``[R, X]`` in expert-sorted order; ``b_EDX`` ``[E, D, X]`` (any strides); ``bias_ED`` ``[E, D]`` or
    None; ``scale_R`` fp32 ``[R]`` or None; ``sorted_rows_R`` int64 (sorted position -> token-slot row);
    ``offsets_E`` int32 inclusive ends. Runs :func:`~leanmoe.kernels.moe_fwd.grouped_gemm` then
    :func:`~leanmoe.kernels.moe_fwd.combine` per range of :func:`d_chunks`, so only one ``[R, C]`` buffer is alive
    at a time. Masked tokens' rows of ``out`` are never written, and their ``y_TD`` rows are zeros. A LoRA term
    ``lora_in_RP [R, r] @ lora_B_EDP[e]^T`` (``[E, D, r]``, any strides) joins ``out`` before the bias and scale.
    """
    from leanmoe.kernels.moe_fwd import combine, grouped_gemm

    R, D = T * K, y_TD.shape[1]
    for c0, c1 in d_chunks(R, D, a_RX.element_size()):
        out_RC = torch.empty(R, c1 - c0, device=a_RX.device, dtype=a_RX.dtype)
        grouped_gemm(a_RX, b_EDX[:, c0:c1], offsets_E, sorted_rows_R, out_RC,
                     bias_EN=bias_ED[:, c0:c1] if bias_ED is not None else None, scale_R=scale_R,
                     lora_in_RP=lora_in_RP, lora_B=lora_B_EDP[:, c0:c1] if lora_B_EDP is not None else None)
        combine(out_RC, y_TD[:, c0:c1], K, token_mask_T)
        del out_RC
    return y_TD


#: Engines of the triton backend's backward (:func:`backward_engine`).
BACKWARD_ENGINES = ("auto", "fused", "split")
_engine_override: str | None = None


def set_backward_engine(engine: str | None) -> None:
    """Choose the backward engine for this process from now on (``None``: back to ``LEANMOE_TRITON_BACKWARD``,
    default ``"auto"``); for A/B measurements and tests in one process. See :func:`backward_engine`."""
    global _engine_override
    if engine is not None and engine not in BACKWARD_ENGINES:
        raise ValueError(f"engine: expected one of {BACKWARD_ENGINES} or None, got {engine!r}")
    _engine_override = engine


def grouped_mm_unsupported(device: torch.device, dtype: torch.dtype, D: int, I: int,
                           capability: tuple[int, int] | None = None) -> str | None:
    """Why ``torch._grouped_mm`` cannot run GEMMs of these rows (None when it can): on CUDA, bfloat16 on compute
    capability 9.0 or newer (``capability``, the CUDA device's, given by the caller); rows 16-byte aligned (D and I
    multiples of 16 bytes). The rule of the split engine and of the triton backend's LoRA path."""
    if not hasattr(torch, "_grouped_mm"):
        return f"torch {torch.__version__} has no torch._grouped_mm"
    if device.type == "cuda":
        if dtype != torch.bfloat16:
            return f"torch._grouped_mm on CUDA takes bfloat16, got {dtype}"
        if capability is not None and capability < (9, 0):
            return "torch._grouped_mm on CUDA needs compute capability 9.0 or newer"
    per_16_bytes = 16 // (torch.finfo(dtype).bits // 8)
    if D % per_16_bytes or I % per_16_bytes:
        return f"D={D} and I={I} must be multiples of {per_16_bytes} (16-byte aligned rows) for torch._grouped_mm"
    return None


def split_unsupported(x_TD: torch.Tensor, down_proj: torch.Tensor) -> str | None:
    """Why the split engine cannot run these operands (None when it can): :func:`grouped_mm_unsupported` for its
    ``torch._grouped_mm`` GEMMs, and ``down_proj`` ``[E, D, I]`` with a unit stride in one of its last two dims."""
    _, D, I = down_proj.shape
    capability = torch.cuda.get_device_capability(x_TD.device) if x_TD.device.type == "cuda" else None
    why = grouped_mm_unsupported(x_TD.device, x_TD.dtype, D, I, capability)
    if why is None and down_proj.stride(2) != 1 and down_proj.stride(1) != 1:
        why = f"down_proj: expected a unit stride in one of its last two dims, got strides {down_proj.stride()}"
    return why


def env_choice(name: str, choices: tuple[str, ...], default: str) -> str:
    """The value of environment variable ``name`` (``default`` when unset), which must be one of ``choices``:
    ``ValueError`` naming the variable, the value and the choices otherwise. The switches of the kernels' paths
    (``LEANMOE_TRITON_BACKWARD``, ``LEANMOE_TMA``, the LoRA paths) are read through it."""
    value = os.environ.get(name, default)
    if value not in choices:
        raise ValueError(f"{name}: expected one of {choices}, got {value!r}")
    return value


def backward_engine(x_TD: torch.Tensor, down_proj: torch.Tensor) -> str:
    """``"fused"`` or ``"split"``: which engine runs the triton backend's backward for these operands.

    - fused: leanmoe's Triton kernels only (the fused gate/up backward recomputes or loads the pre-activations,
      gathers rows in its loads and keeps ``W_down^T dy`` in registers; per-expert weight-gradient loops).
    - split: the pre-activations from the forward kernel itself (saved, or recomputed bitwise the same), the
      GEMMs ``W_down^T dy``, ``d down_proj`` and ``d gate_up_proj`` as ``torch._grouped_mm`` (CUTLASS) calls on
      gathered ``x`` and ``dy`` rows, the activation backward a row-wise Triton kernel, dx the Triton grouped GEMM
      and combine as in fused. Faster on every preset on an H200 (the CUTLASS weight gradients run at 1.5x the
      Triton loops: docs/KERNEL_NOTES.md), at the price of two transient ``[R, D]`` gathered copies (x and dy, not
      alive together with both of the others: see :mod:`leanmoe.experts.triton`).

    ``set_backward_engine`` (or the environment variable ``LEANMOE_TRITON_BACKWARD``) picks one: ``"auto"`` (the
    default) takes split where :func:`split_unsupported` allows it on a CUDA device, fused elsewhere (the CPU
    interpreter: split runs there too when asked, for tests); ``"split"`` raises ``ValueError`` where it cannot run.
    """
    engine = _engine_override or env_choice("LEANMOE_TRITON_BACKWARD", BACKWARD_ENGINES, "auto")
    if engine == "fused":
        return "fused"
    why = split_unsupported(x_TD, down_proj)
    if engine == "split":
        if why is not None:
            raise ValueError(f"backward engine 'split' cannot run here: {why}")
        return "split"
    return "split" if why is None and x_TD.device.type == "cuda" else "fused"


__all__ = ["BACKWARD_ENGINES", "COMBINE_CHUNK_BYTES", "backward_engine", "combine_chunked", "d_chunks",
           "grouped_mm_unsupported", "saved_rows", "set_backward_engine", "split_unsupported"]
