"""Forward MoE kernels: the gather-fused gate/up GEMM with its activation, and the expert-grouped GEMM.

Legend: T tokens, D model dim, I expert hidden dim, N gate/up rows (2I gated, I otherwise), E experts, K top-k,
R routed rows (T*K), sorted by expert (see :mod:`leanmoe.experts.plan`).

1. :func:`gate_up_fwd`: ``h_RI = act(x[sorted_tokens_R] @ gate_up_proj[e].T + b)``. Token rows are gathered inside
   the GEMM's loads (no permuted copy of x); a program owns one row tile of one expert and BN hidden columns, and
   for gated activations it holds the gate and the up accumulator of the same columns, so the activation runs in
   the epilogue. Optionally also stores the pre-activation of the first ``n_saved`` sorted rows (for backward).
2. :func:`grouped_gemm`: ``out[out_rows_R] = (a_R @ b[e].T + bias[e]) * scale_R`` with the result rows scattered
   to token-slot order (so that a combine is a contiguous sum of K rows). The down projection (bias and routing
   weight in the epilogue) and dX in backward both use it.
3. :func:`low_rank_rows`: ``out_RP = scale * a[rows] @ A[e]^T`` for a LoRA factor A ``[E, P, X]`` with P at most
   :data:`~leanmoe.kernels.policy.LOW_RANK_ROWS_MAX`: the adapters' ``s x A_gu^T`` (x's rows gathered in the
   loads) and ``s h A_d^T``.

All accept any T without recompiling: T, R, D, I are runtime values; only block sizes and flags are constexpr.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

try:  # host-side TMA descriptors (Triton 3.3+)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older Triton: the pointer loads only
    TensorDescriptor = None

from leanmoe.kernels.moe_common import (
    INTERPRETER_META,
    IO_DTYPES,
    activation_fwd,
    autotuned,
    check_act_code,
    check_rows,
    check_tensor,
    configs,
    dot_precision,
    e_p2,
    expert_tile,
    gate_up_preact,
    gate_up_tile,
    group_m,
    interpreting,
    launch_grouped,
    lora_addend,
    lora_rank_block,
    offsets_fit_int32,
    rows_bucket,
    source_rows,
    tile_cols,
    tile_coords,
    tile_rows,
)
from leanmoe.kernels.policy import LOW_RANK_ROWS_MAX, env_choice


# T-dependent integers are not specialised (on divisibility by 16 or == 1), so a new token count never recompiles.
@triton.jit(do_not_specialize=["R", "n_saved"])
def gate_up_fwd_kernel(
    # pointers
    x_ptr, sorted_tokens_ptr, offsets_E_ptr, w_ptr, bias_ptr, h_ptr, saved_ptr, lo_ptr, lb_ptr, w_desc,
    # sizes and scalars
    R, D, I, E, n_saved, alpha, limit, rows_key, rank,
    # strides
    stride_xt, stride_xd, stride_we, stride_wn, stride_wd, stride_be, stride_bn, stride_hr, stride_sr,
    stride_lor, stride_lbe, stride_lbn, stride_lbr,
    # meta-parameters
    ACT: tl.constexpr, GATED: tl.constexpr, INTERLEAVED: tl.constexpr, HAS_BIAS: tl.constexpr,
    SAVE: tl.constexpr, STORE_H: tl.constexpr, E_P2: tl.constexpr, DOT_PREC: tl.constexpr, OFFS64: tl.constexpr,
    HAS_LORA: tl.constexpr, RP: tl.constexpr, W_TMA: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = tile_coords(tl.program_id(0), tl.cdiv(R, BM) + E, tl.cdiv(I, BN), GROUP_M)
    expert, row_start, row_end = expert_tile(pid_m, offsets_E_ptr, E, E_P2, BM)
    if expert >= E:
        return
    rows, row_mask = tile_rows(row_start, row_end, BM)
    tokens, cols, col_mask, g_rows, u_rows = gate_up_tile(pid_n, sorted_tokens_ptr, rows, row_mask, I, BN, GATED,
                                                          INTERLEAVED)
    e64 = expert.to(tl.int64)
    rows64 = rows.to(tl.int64)
    acc_g = tl.zeros((BM, BN), dtype=tl.float32)
    acc_u = tl.zeros((BM, BN), dtype=tl.float32)
    if HAS_LORA:
        # (s x A^T) B^T at the gate and up rows is where the accumulators start. Measured on an H200 (Mixtral's
        # tiles): the same MMA after the main loop made the kernel 16% slower; before it, it costs ~1%.
        lb_base = lb_ptr + e64 * stride_lbe
        acc_g = lora_addend(acc_g, lo_ptr, rows64, row_mask, lb_base, g_rows, col_mask, rank, stride_lor,
                            stride_lbn, stride_lbr, DOT_PREC, RP)
        if GATED:
            acc_u = lora_addend(acc_u, lo_ptr, rows64, row_mask, lb_base, u_rows, col_mask, rank, stride_lor,
                                stride_lbn, stride_lbr, DOT_PREC, RP)
    # The tile's first gate and up rows in the [E*N, D] view (W_TMA; concatenated layout or not gated).
    g_row0 = expert * (2 * I if GATED else I) + pid_n * BN
    acc_g, acc_u = gate_up_preact(acc_g, acc_u, x_ptr + tokens[:, None] * stride_xt, row_mask,
                                  w_ptr + e64 * stride_we, bias_ptr + e64 * stride_be, g_rows, u_rows, col_mask, D,
                                  stride_xd, stride_wd, stride_wn, stride_bn, GATED, HAS_BIAS, DOT_PREC, BK, OFFS64,
                                  w_desc, g_row0, g_row0 + I, W_TMA)
    # Round the pre-activation to the I/O dtype, as the reference does and as a saved copy would be.
    g = acc_g.to(h_ptr.dtype.element_ty)
    u = acc_u.to(h_ptr.dtype.element_ty)
    h = activation_fwd(g.to(tl.float32), u.to(tl.float32), alpha, limit, ACT)
    cols64 = cols.to(tl.int64)
    out_mask = row_mask[:, None] & col_mask[None, :]
    if STORE_H:
        tl.store(h_ptr + rows64[:, None] * stride_hr + cols64[None, :], h.to(h_ptr.dtype.element_ty),
                 mask=out_mask)
    if SAVE:
        # The saved copy is private: gate then up (concatenated) whatever the weight layout, so stores coalesce.
        save_mask = out_mask & (rows < n_saved)[:, None]
        s_rows = saved_ptr + rows64[:, None] * stride_sr
        tl.store(s_rows + cols64[None, :], g, mask=save_mask)
        if GATED:
            tl.store(s_rows + (cols64 + I)[None, :], u, mask=save_mask)


@triton.jit(do_not_specialize=["R"])
def grouped_gemm_kernel(
    # pointers
    a_ptr, b_ptr, bias_ptr, scale_ptr, out_ptr, out_rows_ptr, offsets_E_ptr, lo_ptr, lb_ptr,
    # sizes
    R, N, KD, E, rows_key, rank,
    # strides
    stride_ar, stride_ak, stride_be, stride_bn, stride_bk, stride_biase, stride_biasn, stride_or, stride_on,
    stride_lor, stride_lbe, stride_lbn, stride_lbr,
    # meta-parameters
    HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, E_P2: tl.constexpr, DOT_PREC: tl.constexpr,
    OFFS64: tl.constexpr, HAS_LORA: tl.constexpr, RP: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = tile_coords(tl.program_id(0), tl.cdiv(R, BM) + E, tl.cdiv(N, BN), GROUP_M)
    expert, row_start, row_end = expert_tile(pid_m, offsets_E_ptr, E, E_P2, BM)
    if expert >= E:
        return
    rows, row_mask = tile_rows(row_start, row_end, BM)
    rows64 = rows.to(tl.int64)
    cols, col_mask = tile_cols(pid_n, N, BN)
    cols64 = cols.to(tl.int64)
    e64 = expert.to(tl.int64)
    ks = tl.arange(0, BK)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    if HAS_LORA:  # lo lb[e]^T, a LoRA term, starts the accumulator (after the main loop: 20-30% slower on an H200)
        acc = lora_addend(acc, lo_ptr, rows64, row_mask, lb_ptr + e64 * stride_lbe, cols, col_mask, rank,
                          stride_lor, stride_lbn, stride_lbr, DOT_PREC, RP)
    if OFFS64:
        # int64 offsets once per tile (a column stride times a column index can pass 2^31), then BK-column steps.
        ks64 = ks.to(tl.int64)
        a_ptrs = a_ptr + rows64[:, None] * stride_ar + ks64[None, :] * stride_ak
        b_ptrs = b_ptr + e64 * stride_be + ks64[:, None] * stride_bk + cols64[None, :] * stride_bn
        a_step = tl.cast(stride_ak, tl.int64) * BK
        b_step = tl.cast(stride_bk, tl.int64) * BK
        for k0 in range(0, KD, BK):
            k_mask = k0 + ks < KD
            a = tl.load(a_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
            acc = tl.dot(a, b, acc, input_precision=DOT_PREC)
            a_ptrs += a_step
            b_ptrs += b_step
    else:
        # int32 column offsets recomputed each step: the faster loop, when every column offset fits int32.
        a_rows = a_ptr + rows64[:, None] * stride_ar
        b_base = b_ptr + e64 * stride_be
        for k0 in range(0, KD, BK):
            kk = k0 + ks
            k_mask = kk < KD
            a = tl.load(a_rows + kk[None, :] * stride_ak, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            b = tl.load(b_base + kk[:, None] * stride_bk + cols[None, :] * stride_bn,
                        mask=k_mask[:, None] & col_mask[None, :], other=0.0)
            acc = tl.dot(a, b, acc, input_precision=DOT_PREC)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + e64 * stride_biase + cols64 * stride_biasn, mask=col_mask, other=0.0)
        acc += bias.to(tl.float32)[None, :]
    if HAS_SCALE:
        acc *= tl.load(scale_ptr + rows, mask=row_mask, other=0.0)[:, None]
    out_rows = tl.load(out_rows_ptr + rows, mask=row_mask, other=0).to(tl.int64)
    tl.store(out_ptr + out_rows[:, None] * stride_or + cols64[None, :] * stride_on,
             acc.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


@triton.jit(do_not_specialize=["T"])
def combine_kernel(
    # pointers
    out_ptr, y_ptr, keep_ptr,
    # sizes
    T, K, C,
    # strides
    stride_or, stride_yt, stride_yc,
    # meta-parameters
    HAS_MASK: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
):
    """``y[t, c] = sum_k out[t*K + k, c]``: K rows summed in slot order in fp32 (deterministic). With ``HAS_MASK``,
    a token whose ``keep`` byte is 0 gets exact zeros and its rows (never written) are not read."""
    tokens = tl.program_id(0) * BT + tl.arange(0, BT)
    cs = tl.program_id(1) * BC + tl.arange(0, BC)
    t_mask = tokens < T
    mask = t_mask[:, None] & (cs < C)[None, :]
    store_mask = mask
    if HAS_MASK:
        keep = tl.load(keep_ptr + tokens, mask=t_mask, other=0) != 0
        mask = mask & keep[:, None]
    t64 = tokens.to(tl.int64)
    cs64 = cs.to(tl.int64)
    acc = tl.zeros((BT, BC), dtype=tl.float32)
    for k in range(0, K):
        acc += tl.load(out_ptr + (t64 * K + k)[:, None] * stride_or + cs64[None, :], mask=mask,
                       other=0.0).to(tl.float32)
    tl.store(y_ptr + t64[:, None] * stride_yt + cs64[None, :] * stride_yc, acc.to(y_ptr.dtype.element_ty),
             mask=store_mask)


# Hopper-sized tiles, autotuned per (dims, power-of-two bucket of R) on GPUs.
_GATE_UP_CONFIGS = configs([(128, 64, 64, 8, 4), (128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (64, 128, 64, 4, 4)])
_GEMM_CONFIGS = configs([(128, 128, 64, 8, 4), (128, 256, 64, 8, 3), (128, 256, 64, 8, 4), (64, 128, 64, 4, 4)])

_gate_up_fwd_tuned = autotuned(gate_up_fwd_kernel, _GATE_UP_CONFIGS, ["D", "I", "rows_key"])
_grouped_gemm_tuned = autotuned(grouped_gemm_kernel, _GEMM_CONFIGS, ["N", "KD", "rows_key"])


def _set_weight_block(nargs: dict) -> None:
    """Autotuner pre-hook of the TMA configs: the weight descriptor's block is the config's ``[BN, BK]`` tile."""
    nargs["w_desc"].block_shape = [nargs["BN"], nargs["BK"]]


# Measured on an H200 (gate/up forward alone, one process): 128 x 128 tiles with 3-4 stages are the fastest of eight
# configs on qwen3-30b-a3b, olmoe-1b-7b, mixtral-8x7b and deepseek-v3 shapes, 2.5-4% ahead of the pointer loads.
_gate_up_fwd_tma_tuned = autotuned(gate_up_fwd_kernel, configs(
    [(128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (64, 128, 64, 4, 4), (128, 64, 64, 8, 4)],
    pre_hook=_set_weight_block), ["D", "I", "rows_key"])

#: ``LEANMOE_TMA``: whether the gate/up forward reads its weight tiles through a TMA descriptor. ``auto`` (the
#: default): on CUDA GPUs of compute capability 9.0+ (Hopper and later) where the weights allow it; ``1``: wherever
#: they allow it, the CPU interpreter too (tests); ``0``: never.
TMA_MODES = ("auto", "0", "1")


@functools.cache
def _has_tma(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index)[0] >= 9


def tma_weight_desc(gate_up_proj: torch.Tensor, *, gated: bool, interleaved: bool):
    """A TMA descriptor over ``gate_up_proj`` ``[E, N, D]`` viewed as ``[E*N, D]`` for :func:`gate_up_fwd`, or
    None where :data:`TMA_MODES` or the weights rule it out. The weights allow it when they are contiguous with
    16-byte rows and base and each tile's gate (and up) rows are one block of rows: the concatenated gated layout
    or no gate (the interleaved layout keeps the pointer loads). The block shape is set per config at launch."""
    mode = env_choice("LEANMOE_TMA", TMA_MODES, "auto")
    if mode == "0" or TensorDescriptor is None or (gated and interleaved):
        return None
    E, N, D = gate_up_proj.shape
    if (not gate_up_proj.is_contiguous() or (D * gate_up_proj.element_size()) % 16 or gate_up_proj.data_ptr() % 16
            or E * N >= 2**31):
        return None
    if interpreting():
        usable = mode == "1"  # only when asked for (tests)
    else:
        usable = gate_up_proj.device.type == "cuda" and _has_tma(gate_up_proj.device.index or 0)
    if not usable:
        return None
    block = [INTERPRETER_META["BN"], INTERPRETER_META["BK"]]  # the interpreter's tile; tuned configs set their own
    return TensorDescriptor.from_tensor(gate_up_proj.view(E * N, D), block)


@triton.jit(do_not_specialize=["R"])
def low_rank_rows_kernel(
    # pointers
    a_ptr, a_rows_ptr, w_ptr, offsets_E_ptr, out_ptr,
    # sizes and scalars
    R, X, E, rank, scale,
    # strides
    stride_ar, stride_ax, stride_we, stride_wp, stride_wx, stride_or,
    # meta-parameters
    A_GATHER: tl.constexpr, E_P2: tl.constexpr, DOT_PREC: tl.constexpr, RP: tl.constexpr,
    BM: tl.constexpr, BK: tl.constexpr,
):
    """``out[r] = scale * a[a_rows[r]] @ w[e]^T`` for one row tile of one expert: the whole rank in one tile, a
    loop over X (fp32 sums, rounded once)."""
    expert, row_start, row_end = expert_tile(tl.program_id(0), offsets_E_ptr, E, E_P2, BM)
    if expert >= E:
        return
    rows, row_mask = tile_rows(row_start, row_end, BM)
    a_rows = source_rows(a_rows_ptr, rows, row_mask, A_GATHER)
    ps = tl.arange(0, RP)
    p_mask = ps < rank
    ks = tl.arange(0, BK)
    a_base = a_ptr + a_rows[:, None] * stride_ar
    w_base = w_ptr + expert.to(tl.int64) * stride_we + ps[None, :] * stride_wp
    acc = tl.zeros((BM, RP), dtype=tl.float32)
    for k0 in range(0, X, BK):
        k = k0 + ks
        k_mask = k < X
        a = tl.load(a_base + k[None, :] * stride_ax, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_base + k[:, None] * stride_wx, mask=k_mask[:, None] & p_mask[None, :], other=0.0)
        acc = tl.dot(a, w, acc, input_precision=DOT_PREC)
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * stride_or + ps[None, :],
             (acc * scale).to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & p_mask[None, :])


_LOW_RANK_ROWS_CONFIGS = [triton.Config({"BM": bm, "BK": bk}, num_warps=w, num_stages=st)
                          for bm, bk, w, st in ((64, 128, 4, 4), (128, 128, 8, 3), (64, 256, 4, 3), (32, 256, 4, 3),
                                                (128, 64, 4, 4))]
_low_rank_rows_tuned = autotuned(low_rank_rows_kernel, _LOW_RANK_ROWS_CONFIGS, ["X", "RP", "A_GATHER"])


def low_rank_rows(a: torch.Tensor, w_EPX: torch.Tensor, offsets_E: torch.Tensor, *,
                  a_rows_R: torch.Tensor | None = None, scale: float = 1.0) -> torch.Tensor:
    """``out_RP[r] = scale * a[a_rows_R[r]] @ w_EPX[e]^T`` for the sorted rows r of each expert e (``a_rows_R``
    defaults to r itself: ``a`` already in expert order); ``[R, P]`` in a's dtype, R = ``a_rows_R``'s length (or
    a's), rows past ``offsets_E[-1]`` unwritten.

    ``a`` ``[*, X]`` (any strides), ``w_EPX`` ``[E, P, X]`` (any strides,
    P <= :data:`~leanmoe.kernels.policy.LOW_RANK_ROWS_MAX`) in a's dtype; ``offsets_E`` int32 inclusive ends.
    One program per row tile of an expert streams its rows of ``a`` once for all P columns: a LoRA factor's
    low-rank input without a gathered copy of the rows.
    """
    check_tensor("a", a, shape=(None, None), dtypes=IO_DTYPES)
    dev, dtype = a.device, a.dtype
    X = a.shape[1]
    check_tensor("w_EPX", w_EPX, shape=(None, None, X), dtypes=(dtype,), device=dev)
    E, P, _ = w_EPX.shape
    if P > LOW_RANK_ROWS_MAX:
        raise ValueError(f"w_EPX: expected at most {LOW_RANK_ROWS_MAX} rows per expert (the rank), got {P}")
    check_tensor("offsets_E", offsets_E, shape=(E,), dtypes=(torch.int32,), device=dev)
    if a_rows_R is not None:
        check_tensor("a_rows_R", a_rows_R, shape=(None,), dtypes=(torch.int64, torch.int32), device=dev)
    R = a_rows_R.numel() if a_rows_R is not None else a.shape[0]
    check_rows("a_rows_R" if a_rows_R is not None else "a", R)
    out_RP = torch.empty(R, P, device=dev, dtype=dtype)
    if R == 0 or E == 0 or P == 0:
        return out_RP
    args = (a, a_rows_R if a_rows_R is not None else offsets_E, w_EPX, offsets_E, out_RP, R, X, E, P, float(scale),
            a.stride(0), a.stride(1), *w_EPX.stride(), out_RP.stride(0))
    meta = dict(A_GATHER=a_rows_R is not None, E_P2=e_p2(E), DOT_PREC=dot_precision(dtype),
                RP=lora_rank_block(P))
    if _low_rank_rows_tuned is None:
        low_rank_rows_kernel[(triton.cdiv(R, 32) + E,)](*args, **meta, BM=32, BK=32)
    else:
        _low_rank_rows_tuned[lambda m: (triton.cdiv(R, m["BM"]) + E,)](*args, **meta)
    return out_RP


def lora_operands(lora_in_RP: torch.Tensor | None, lora_B: torch.Tensor | None, *, R: int, E: int, out: int,
                  dtype: torch.dtype, device: torch.device) -> tuple[tuple, dict]:
    """Kernel arguments ``(lo, lb, rank, strides...)`` and meta (``HAS_LORA``, ``RP``) for an optional LoRA term
    ``lora_in_RP [R, r] @ lora_B[e]^T`` (``lora_B`` ``[E, out, r]``, any strides); both or neither given."""
    if (lora_in_RP is None) != (lora_B is None):
        raise ValueError("lora_in_RP and lora_B: give both (a LoRA term) or neither")
    if lora_in_RP is None or lora_B is None:
        return (None, None, 0, 0, 0, 0, 0), dict(HAS_LORA=False, RP=16)
    check_tensor("lora_in_RP", lora_in_RP, shape=(R, None), dtypes=(dtype,), device=device)
    rank = lora_in_RP.shape[1]
    check_tensor("lora_B", lora_B, shape=(E, out, rank), dtypes=(dtype,), device=device)
    if lora_in_RP.stride(1) != 1 and rank > 1:
        raise ValueError(f"lora_in_RP: expected unit column stride, got strides {lora_in_RP.stride()}")
    return ((lora_in_RP, lora_B, rank, lora_in_RP.stride(0), *lora_B.stride()),
            dict(HAS_LORA=True, RP=lora_rank_block(rank)))


def gate_up_fwd(x_TD: torch.Tensor, sorted_tokens_R: torch.Tensor, offsets_E: torch.Tensor,
                gate_up_proj: torch.Tensor, gate_up_bias: torch.Tensor | None, *, act_code: int, gated: bool,
                interleaved: bool, alpha: float, limit: float, n_saved: int, store_h: bool = True,
                lora_in_RP: torch.Tensor | None = None, lora_B: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``h_RI`` (sorted rows, x's dtype) and ``saved_SN``, the pre-activations of the first ``n_saved``
    sorted rows (``[n_saved, N]``, gate columns then up columns whatever the layout; empty when 0). With
    ``store_h=False`` only the pre-activations are written (``h_RI`` is empty, ``[0, I]``): the backward's
    recompute, whose sums are bitwise the forward's. ``lora_in_RP`` ``[R, r]`` (``s x[sorted_tokens] A^T``) and
    ``lora_B`` ``[E, N, r]`` add the LoRA term ``lora_in_RP @ lora_B[e]^T`` to the pre-activations.

    ``x_TD`` may be strided; ``gate_up_proj`` is ``[E, N, D]`` with any strides; ``offsets_E`` int32 inclusive.
    """
    check_tensor("x_TD", x_TD, shape=(None, None), dtypes=IO_DTYPES)
    dev, dtype = x_TD.device, x_TD.dtype
    D = x_TD.shape[1]
    check_tensor("gate_up_proj", gate_up_proj, shape=(None, None, D), dtypes=(dtype,), device=dev)
    E, N, _ = gate_up_proj.shape
    if gated and N % 2:
        raise ValueError(f"gate_up_proj: a gated activation needs an even number of gate/up rows, got N={N}")
    I = N // 2 if gated else N
    check_tensor("sorted_tokens_R", sorted_tokens_R, shape=(None,), dtypes=(torch.int64, torch.int32), device=dev)
    R = sorted_tokens_R.numel()
    check_rows("sorted_tokens_R", R)
    check_tensor("offsets_E", offsets_E, shape=(E,), dtypes=(torch.int32,), device=dev)
    if gate_up_bias is not None:
        check_tensor("gate_up_bias", gate_up_bias, shape=(E, N), dtypes=(dtype,), device=dev)
    check_act_code(act_code)
    if not 0 <= n_saved <= R:
        raise ValueError(f"n_saved: expected a row count in [0, R={R}], got {n_saved}")
    h_RI = torch.empty(R if store_h else 0, I, device=x_TD.device, dtype=x_TD.dtype)
    saved_SN = torch.empty(n_saved, N, device=x_TD.device, dtype=x_TD.dtype)
    if R == 0:
        return h_RI, saved_SN
    bias = gate_up_bias if gate_up_bias is not None else gate_up_proj  # never read when HAS_BIAS is False
    (lo, lb, rank, *lora_strides), lora_meta = lora_operands(lora_in_RP, lora_B, R=R, E=E, out=N, dtype=dtype,
                                                              device=dev)
    offs64 = not offsets_fit_int32((x_TD, (1,)), (gate_up_proj, (1, 2)), (bias, (1,)))
    w_desc = None if offs64 else tma_weight_desc(gate_up_proj, gated=gated, interleaved=interleaved)
    args = (x_TD, sorted_tokens_R, offsets_E, gate_up_proj, bias, h_RI, saved_SN,
            lo if lo is not None else x_TD, lb if lb is not None else x_TD,
            w_desc if w_desc is not None else gate_up_proj,  # never read as a descriptor without W_TMA
            R, D, I, E, n_saved, float(alpha), float(limit), rows_bucket(R), rank,
            x_TD.stride(0), x_TD.stride(1), *gate_up_proj.stride(), bias.stride(0), bias.stride(1),
            h_RI.stride(0) if store_h else I, saved_SN.stride(0) if n_saved else N, *lora_strides)
    meta = dict(ACT=act_code, GATED=gated, INTERLEAVED=interleaved, HAS_BIAS=gate_up_bias is not None,
                SAVE=n_saved > 0, STORE_H=store_h, E_P2=e_p2(E), **lora_meta, DOT_PREC=dot_precision(x_TD.dtype),
                OFFS64=offs64, W_TMA=w_desc is not None,
                GROUP_M=group_m(x_TD.device, gate_up_proj[0].numel() * gate_up_proj.element_size()))
    launch_grouped(gate_up_fwd_kernel, _gate_up_fwd_tuned if w_desc is None else _gate_up_fwd_tma_tuned,
                   lambda bn: triton.cdiv(I, bn), R, E, args, meta)
    return h_RI, saved_SN


def grouped_gemm(a_RK: torch.Tensor, b_ENK: torch.Tensor, offsets_E: torch.Tensor, out_rows_R: torch.Tensor,
                 out: torch.Tensor, *, bias_EN: torch.Tensor | None = None, scale_R: torch.Tensor | None = None,
                 lora_in_RP: torch.Tensor | None = None, lora_B: torch.Tensor | None = None) -> torch.Tensor:
    """``out[out_rows_R[r]] = (a_RK[r] @ b_ENK[e].T + lora_in_RP[r] @ lora_B[e].T + bias_EN[e]) * scale_R[r]`` for
    the rows r of expert e (the LoRA term optional: ``lora_in_RP [R, r]``, ``lora_B [E, N, r]``, any strides).

    ``a_RK`` in expert-sorted order; ``b_ENK`` and ``out`` ([*, N]) may be strided views (a column slice of a
    weight, say); ``scale_R`` fp32; ``out_rows_R`` a permutation (int64). Fills every row of ``out`` listed.
    """
    check_tensor("a_RK", a_RK, shape=(None, None), dtypes=IO_DTYPES)
    dev, dtype = a_RK.device, a_RK.dtype
    R, KD = a_RK.shape
    check_rows("a_RK", R)
    check_tensor("b_ENK", b_ENK, shape=(None, None, KD), dtypes=(dtype,), device=dev)
    E, N, _ = b_ENK.shape
    check_tensor("offsets_E", offsets_E, shape=(E,), dtypes=(torch.int32,), device=dev)
    check_tensor("out_rows_R", out_rows_R, shape=(R,), dtypes=(torch.int64, torch.int32), device=dev)
    check_tensor("out", out, shape=(None, N), dtypes=IO_DTYPES, device=dev)
    if bias_EN is not None:
        check_tensor("bias_EN", bias_EN, shape=(E, N), dtypes=(dtype,), device=dev)
    if scale_R is not None:
        check_tensor("scale_R", scale_R, shape=(R,), dtypes=(torch.float32,), device=dev)
    if R == 0:
        return out
    bias = bias_EN if bias_EN is not None else b_ENK
    scale = scale_R if scale_R is not None else a_RK
    (lo, lb, rank, *lora_strides), lora_meta = lora_operands(lora_in_RP, lora_B, R=R, E=E, out=N, dtype=dtype,
                                                              device=dev)
    args = (a_RK, b_ENK, bias, scale, out, out_rows_R, offsets_E, lo if lo is not None else a_RK,
            lb if lb is not None else a_RK, R, N, KD, E, rows_bucket(R), rank,
            a_RK.stride(0), a_RK.stride(1), *b_ENK.stride(), bias.stride(0), bias.stride(1),
            out.stride(0), out.stride(1), *lora_strides)
    meta = dict(HAS_BIAS=bias_EN is not None, HAS_SCALE=scale_R is not None, E_P2=e_p2(E), **lora_meta,
                DOT_PREC=dot_precision(a_RK.dtype),
                OFFS64=not offsets_fit_int32((a_RK, (1,)), (b_ENK, (1, 2)), (bias, (1,)), (out, (1,))),
                GROUP_M=group_m(a_RK.device, b_ENK[0].numel() * b_ENK.element_size()))
    launch_grouped(grouped_gemm_kernel, _grouped_gemm_tuned, lambda bn: triton.cdiv(N, bn), R, E, args, meta)
    return out


def combine(out_RC: torch.Tensor, y_TC: torch.Tensor, K: int, token_mask_T: torch.Tensor | None = None
            ) -> torch.Tensor:
    """``y_TC[t] = sum_k out_RC[t*K + k]`` (fp32 sum in slot order) written into ``y_TC`` (may be a column slice);
    ``y_TC[t] = 0`` where the bool ``token_mask_T`` is False, without reading that token's rows of ``out_RC``."""
    check_tensor("y_TC", y_TC, shape=(None, None), dtypes=IO_DTYPES)
    T, C = y_TC.shape
    check_tensor("out_RC", out_RC, shape=(T * K, C), dtypes=IO_DTYPES, device=y_TC.device)
    if out_RC.stride(1) != 1 and C > 1:
        raise ValueError(f"out_RC: expected unit column stride, got strides {out_RC.stride()}")
    if token_mask_T is not None:
        check_tensor("token_mask_T", token_mask_T, shape=(T,), dtypes=(torch.bool,), device=y_TC.device)
    if T == 0:
        return y_TC
    # bool and uint8 share a byte layout; a byte pointer loads the same way on every Triton version.
    keep = token_mask_T.contiguous().view(torch.uint8) if token_mask_T is not None else out_RC
    BT, BC = (32, 64) if interpreting() else (16, 256)
    combine_kernel[(triton.cdiv(T, BT), triton.cdiv(C, BC))](out_RC, y_TC, keep, T, K, C, out_RC.stride(0),
                                                              y_TC.stride(0), y_TC.stride(1),
                                                              HAS_MASK=token_mask_T is not None, BT=BT, BC=BC)
    return y_TC


__all__ = ["TMA_MODES", "combine", "gate_up_fwd", "grouped_gemm", "low_rank_rows", "tma_weight_desc"]
