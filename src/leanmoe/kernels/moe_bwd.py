"""Backward MoE kernels: the fused gate/up + activation backward, and the per-expert weight gradient.

Legend: T tokens, D model dim, I expert hidden dim, N gate/up rows (2I gated, I otherwise), E experts, K top-k,
R routed rows (T*K) in expert-sorted order, P groups of PART_W hidden columns (routing-weight gradient partials).

1. :func:`gate_up_bwd`: per row tile of one expert and BN hidden columns, one pass over D computes
   ``dh_unweighted = dy[sorted_tokens] @ down_proj[e]`` (``W_down^T dy``); the gate/up pre-activations come from the
   saved copy when the whole tile was saved, else a second pass over D recomputes them (x gathered in the loads).
   The epilogue produces ``w_r * h`` (for dW_down), ``dgate_up = act'(gate_up) * w_r * dh_unweighted`` and the partial
   routing-weight gradient ``sum_i dh_unweighted * h`` of its columns (``<dy, W_down h> = <W_down^T dy, h>``: the
   unweighted expert output is never formed). Partials go to ``[P, R]`` and are summed in a fixed order.
2. :func:`expert_weight_grad`: ``out[e] = sum_{r in e} a[a_rows_r]^T b[b_rows_r]``, one program per
   (expert, output tile) looping over that expert's rows: no atomics, deterministic, and experts with no rows get
   exact zeros. The bias gradient ``sum_r scale_r * a[a_rows_r]`` is a separate small kernel of the same shape.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from leanmoe.kernels.moe_common import (
    INTERPRETER_META,
    IO_DTYPES,
    activation_bwd,
    autotuned,
    check_act_code,
    check_rows,
    check_tensor,
    configs,
    dot_precision,
    e_p2,
    expert_row_range,
    expert_tile,
    gate_up_preact,
    gate_up_rows,
    gate_up_tile,
    group_m,
    interpreting,
    launch_grouped,
    lora_rank_block,
    offsets_fit_int32,
    rows_bucket,
    source_rows,
    tile_cols,
    tile_coords,
    tile_rows,
)

# Hidden columns per routing-weight partial (divides every config's BN).
PART_W = 32


@triton.jit(do_not_specialize=["R", "n_saved"])  # no recompile for a new token count
def gate_up_bwd_kernel(
    # pointers
    x_ptr, dy_ptr, sorted_tokens_ptr, offsets_E_ptr, scale_ptr, wgu_ptr, bgu_ptr, wd_ptr, saved_ptr,
    dgu_ptr, h_ptr, dw_part_ptr,
    # sizes and scalars
    R, D, I, E, n_saved, alpha, limit, rows_key,
    # strides
    stride_xt, stride_xd, stride_dyt, stride_dyd, stride_wge, stride_wgn, stride_wgd, stride_bge, stride_bgn,
    stride_wde, stride_wdd, stride_wdi, stride_sr, stride_dgr, stride_hr, stride_pp,
    # meta-parameters
    ACT: tl.constexpr, GATED: tl.constexpr, INTERLEAVED: tl.constexpr, HAS_BIAS: tl.constexpr,
    E_P2: tl.constexpr, DOT_PREC: tl.constexpr, PART_W: tl.constexpr, OFFS64: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = tile_coords(tl.program_id(0), tl.cdiv(R, BM) + E, tl.cdiv(I, BN), GROUP_M)
    expert, row_start, row_end = expert_tile(pid_m, offsets_E_ptr, E, E_P2, BM)
    if expert >= E:
        return
    io_dtype = h_ptr.dtype.element_ty
    rows, row_mask = tile_rows(row_start, row_end, BM)
    rows64 = rows.to(tl.int64)
    tokens, cols, col_mask, g_rows, u_rows = gate_up_tile(pid_n, sorted_tokens_ptr, rows, row_mask, I, BN, GATED,
                                                          INTERLEAVED)
    e64 = expert.to(tl.int64)

    # dh_unweighted = dy[tokens] @ down_proj[e][:, cols]; int64 offsets once per tile (dy may be a transposed view
    # whose column stride times D passes 2^31), then BK-column pointer steps.
    cols64 = cols.to(tl.int64)
    ks = tl.arange(0, BK)
    ks64 = ks.to(tl.int64)
    dy_ptrs = dy_ptr + tokens[:, None] * stride_dyt + ks64[None, :] * stride_dyd
    wd_ptrs = wd_ptr + e64 * stride_wde + ks64[:, None] * stride_wdd + cols64[None, :] * stride_wdi
    dy_step = tl.cast(stride_dyd, tl.int64) * BK
    wd_step = tl.cast(stride_wdd, tl.int64) * BK
    acc_dh = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, D, BK):
        k_mask = k0 + ks < D
        a = tl.load(dy_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(wd_ptrs, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        acc_dh = tl.dot(a, w, acc_dh, input_precision=DOT_PREC)
        dy_ptrs += dy_step
        wd_ptrs += wd_step

    out_mask = row_mask[:, None] & col_mask[None, :]
    if tl.minimum(row_start + BM, row_end) <= n_saved:
        s_rows = saved_ptr + rows64[:, None] * stride_sr
        g = tl.load(s_rows + cols64[None, :], mask=out_mask, other=0.0).to(tl.float32)  # saved as [gate | up]
        if GATED:
            u = tl.load(s_rows + (cols64 + I)[None, :], mask=out_mask, other=0.0).to(tl.float32)
        else:
            u = g
    else:
        # Recompute the pre-activations exactly as the forward did (rounded to the I/O dtype).
        acc_g, acc_u = gate_up_preact(tl.zeros((BM, BN), dtype=tl.float32), tl.zeros((BM, BN), dtype=tl.float32),
                                      x_ptr + tokens[:, None] * stride_xt, row_mask, wgu_ptr + e64 * stride_wge,
                                      bgu_ptr + e64 * stride_bge, g_rows, u_rows, col_mask, D, stride_xd,
                                      stride_wgd, stride_wgn, stride_bgn, GATED, HAS_BIAS, DOT_PREC, BK, OFFS64,
                                      wgu_ptr, 0, 0, False)  # pointer loads: the same sums as the TMA ones
        g = acc_g.to(io_dtype).to(tl.float32)
        u = acc_u.to(io_dtype).to(tl.float32)

    w_r = tl.load(scale_ptr + rows, mask=row_mask, other=0.0)
    h, dg, du = activation_bwd(g, u, acc_dh * w_r[:, None], alpha, limit, ACT)
    h = h.to(io_dtype)
    # Partial routing-weight gradients, one per PART_W hidden columns, so every config writes the same rows of the
    # [P, R] buffer (autotuning runs several configs on it; a per-program partial would leave another config's
    # rows behind). Masked columns have g = u = 0, so h = 0 there for every activation and they add nothing.
    prod = acc_dh * h.to(tl.float32)
    part = tl.sum(tl.reshape(prod, (BM, BN // PART_W, PART_W)), axis=2)
    p_idx = (pid_n * (BN // PART_W) + tl.arange(0, BN // PART_W)).to(tl.int64)
    tl.store(dw_part_ptr + p_idx[None, :] * stride_pp + rows[:, None], part, mask=row_mask[:, None])
    # h is stored times the routing weight: d down_proj[e] = dy^T (w h) then needs no scaling inside its loop.
    tl.store(h_ptr + rows64[:, None] * stride_hr + cols64[None, :], (h.to(tl.float32) * w_r[:, None]).to(io_dtype),
             mask=out_mask)
    d_rows = dgu_ptr + rows64[:, None] * stride_dgr
    tl.store(d_rows + g_rows.to(tl.int64)[None, :], dg.to(io_dtype), mask=out_mask)
    if GATED:
        tl.store(d_rows + u_rows.to(tl.int64)[None, :], du.to(io_dtype), mask=out_mask)


@triton.jit(do_not_specialize=["R"])
def activation_bwd_rows_kernel(
    # pointers
    pre_ptr, dh_ptr, scale_ptr, offsets_E_ptr, dgu_ptr, hw_ptr, dw_ptr,
    # sizes and scalars
    R, I, E, alpha, limit,
    # strides
    stride_pr, stride_dhr, stride_dgr, stride_hwr,
    # meta-parameters
    ACT: tl.constexpr, GATED: tl.constexpr, INTERLEAVED: tl.constexpr, BM: tl.constexpr, BI: tl.constexpr,
):
    """One row tile, every hidden column: from the pre-activations (``[gate | up]``) and ``dh_unweighted``, writes
    ``dgate_up`` (in the weights' layout), ``w_r * h`` and ``dweights_r = sum_i dh_unweighted * h``. Rows past
    ``offsets_E[E-1]`` (masked tokens; their inputs were never written) get a zero ``dweights`` and nothing else.
    ``dgu`` may alias ``pre`` (concatenated layout) and ``hw`` may alias ``dh``: each element is read before the
    same program writes it, and no other program touches it."""
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    kept = tl.load(offsets_E_ptr + E - 1)
    row_mask = rows < kept
    rows64 = rows.to(tl.int64)
    io_dtype = hw_ptr.dtype.element_ty
    w_r = tl.load(scale_ptr + rows, mask=row_mask, other=0.0)
    acc_dw = tl.zeros((BM,), dtype=tl.float32)
    p_rows = pre_ptr + rows64[:, None] * stride_pr
    for c0 in range(0, I, BI):
        cols = c0 + tl.arange(0, BI)
        mask = row_mask[:, None] & (cols < I)[None, :]
        cols64 = cols.to(tl.int64)
        g = tl.load(p_rows + cols64[None, :], mask=mask, other=0.0).to(tl.float32)
        u = tl.load(p_rows + (cols64 + I)[None, :], mask=mask, other=0.0).to(tl.float32) if GATED else g
        dh = tl.load(dh_ptr + rows64[:, None] * stride_dhr + cols64[None, :], mask=mask, other=0.0).to(tl.float32)
        h, dg, du = activation_bwd(g, u, dh * w_r[:, None], alpha, limit, ACT)
        h = h.to(io_dtype).to(tl.float32)
        acc_dw += tl.sum(dh * h, axis=1)  # masked columns have g = u = 0, so h = 0 there
        tl.store(hw_ptr + rows64[:, None] * stride_hwr + cols64[None, :], (h * w_r[:, None]).to(io_dtype),
                 mask=mask)
        g_rows, u_rows = gate_up_rows(cols, I, GATED, INTERLEAVED)
        d_rows = dgu_ptr + rows64[:, None] * stride_dgr
        tl.store(d_rows + g_rows.to(tl.int64)[None, :], dg.to(io_dtype), mask=mask)
        if GATED:
            tl.store(d_rows + u_rows.to(tl.int64)[None, :], du.to(io_dtype), mask=mask)
    tl.store(dw_ptr + rows, acc_dw, mask=rows < R)


@triton.jit(do_not_specialize=["R"])
def lora_rows_add_kernel(
    # pointers
    out_ptr, lo_ptr, la_ptr, offsets_E_ptr,
    # sizes and scalars
    N, E, rank, scale,
    # strides
    stride_or, stride_lor, stride_lae, stride_lar, stride_lan,
    # meta-parameters
    E_P2: tl.constexpr, DOT_PREC: tl.constexpr, RP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
):
    """``out[r, cols] += scale * lo[r] @ la[e][:, cols]`` for one row tile of one expert (:func:`expert_tile`) and
    BN columns: a rank-``rank`` term (padded to ``RP``) added in place, fp32 sum rounded once."""
    expert, row_start, row_end = expert_tile(tl.program_id(0), offsets_E_ptr, E, E_P2, BM)
    if expert >= E:
        return
    rows, row_mask = tile_rows(row_start, row_end, BM)
    rows64 = rows.to(tl.int64)
    cols, col_mask = tile_cols(tl.program_id(1), N, BN)
    cols64 = cols.to(tl.int64)
    rs = tl.arange(0, RP)
    r_mask = rs < rank
    lo = tl.load(lo_ptr + rows64[:, None] * stride_lor + rs[None, :], mask=row_mask[:, None] & r_mask[None, :],
                 other=0.0)
    la = tl.load(la_ptr + expert.to(tl.int64) * stride_lae + rs[:, None] * stride_lar + cols64[None, :] * stride_lan,
                 mask=r_mask[:, None] & col_mask[None, :], other=0.0)
    term = tl.dot(lo, la, input_precision=DOT_PREC)
    o_ptrs = out_ptr + rows64[:, None] * stride_or + cols64[None, :]
    mask = row_mask[:, None] & col_mask[None, :]
    out = tl.load(o_ptrs, mask=mask, other=0.0).to(tl.float32) + scale * term
    tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def low_rank_pair_kernel(
    # pointers
    a_ptr, w_ptr, b_ptr, offsets_E_ptr, part_ptr, dw_ptr,
    # sizes
    X, rank,
    # strides
    stride_ar, stride_we, stride_wx, stride_wp, stride_br, stride_ps, stride_pr, stride_dwe, stride_dwx,
    # meta-parameters
    DOT_PREC: tl.constexpr, RP: tl.constexpr, BM: tl.constexpr, BX: tl.constexpr,
):
    """One expert and BX columns of ``a``: streams the expert's rows once for both of a LoRA factor's terms, the
    rows' partial ``a[:, cols] @ w[e][cols]`` (fp32, to ``part[chunk]``) and ``dw[e][cols] = a[:, cols]^T b``
    (fp32 in registers over every row, stored once: no atomics, zeros for an expert without rows)."""
    expert = tl.program_id(0)
    chunk = tl.program_id(1)
    start, end = expert_row_range(offsets_E_ptr, expert)
    cols = chunk * BX + tl.arange(0, BX)
    col_mask = cols < X
    cols64 = cols.to(tl.int64)
    ps = tl.arange(0, RP)
    p_mask = ps < rank
    e64 = expert.to(tl.int64)
    w = tl.load(w_ptr + e64 * stride_we + cols64[:, None] * stride_wx + ps[None, :] * stride_wp,
                mask=col_mask[:, None] & p_mask[None, :], other=0.0)
    dw = tl.zeros((BX, RP), dtype=tl.float32)
    part_base = part_ptr + chunk.to(tl.int64) * stride_ps
    for r0 in range(start, end, BM):
        rows = r0 + tl.arange(0, BM)
        row_mask = rows < end
        rows64 = rows.to(tl.int64)
        a = tl.load(a_ptr + rows64[:, None] * stride_ar + cols64[None, :], mask=row_mask[:, None] & col_mask[None, :],
                    other=0.0)
        b = tl.load(b_ptr + rows64[:, None] * stride_br + ps[None, :], mask=row_mask[:, None] & p_mask[None, :],
                    other=0.0)
        low = tl.dot(a, w, input_precision=DOT_PREC)
        tl.store(part_base + rows64[:, None] * stride_pr + ps[None, :], low,
                 mask=row_mask[:, None] & p_mask[None, :])
        dw = tl.dot(tl.trans(a), b, dw, input_precision=DOT_PREC)
    tl.store(dw_ptr + e64 * stride_dwe + cols64[:, None] * stride_dwx + ps[None, :], dw.to(dw_ptr.dtype.element_ty),
             mask=col_mask[:, None] & p_mask[None, :])


@triton.jit(do_not_specialize=["R"])
def sum_partials_kernel(part_ptr, out_ptr, S, R, rank, scale, stride_ps, stride_pr, stride_or, RP: tl.constexpr,
                        BR: tl.constexpr):
    """``out[r] = scale * sum_s part[s, r]`` (fp32, in chunk order), rounded once to out's dtype."""
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    ps = tl.arange(0, RP)
    mask = (rows < R)[:, None] & (ps < rank)[None, :]
    offs = rows.to(tl.int64)[:, None] * stride_pr + ps[None, :]
    acc = tl.zeros((BR, RP), dtype=tl.float32)
    for chunk in range(0, S):
        acc += tl.load(part_ptr + chunk * stride_ps + offs, mask=mask, other=0.0)
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * stride_or + ps[None, :], (acc * scale).to(out_ptr.dtype.element_ty),
             mask=mask)


@triton.jit
def expert_weight_grad_kernel(
    # pointers
    a_ptr, a_rows_ptr, b_ptr, b_rows_ptr, offsets_E_ptr, c_ptr,
    # sizes
    M, N, E,
    # strides
    stride_ar, stride_am, stride_br, stride_bn, stride_ce, stride_cm, stride_cn,
    # meta-parameters
    A_GATHER: tl.constexpr, B_GATHER: tl.constexpr, DOT_PREC: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = tile_coords(tl.program_id(0), tl.cdiv(M, BM), tl.cdiv(N, BN), GROUP_M)
    expert = tl.program_id(1)
    start, end = expert_row_range(offsets_E_ptr, expert)
    ms = pid_m * BM + tl.arange(0, BM)
    m_mask = ms < M
    ns = pid_n * BN + tl.arange(0, BN)
    n_mask = ns < N
    ms64 = ms.to(tl.int64)
    ns64 = ns.to(tl.int64)
    # Column offsets in int64 once per tile (a transposed dy has column stride T); the rows are int64 already.
    a_cols = a_ptr + ms64[None, :] * stride_am
    b_cols = b_ptr + ns64[None, :] * stride_bn
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for r0 in range(start, end, BK):
        rows = r0 + tl.arange(0, BK)
        r_mask = rows < end
        a_rows = source_rows(a_rows_ptr, rows, r_mask, A_GATHER)
        b_rows = source_rows(b_rows_ptr, rows, r_mask, B_GATHER)
        a = tl.load(a_cols + a_rows[:, None] * stride_ar, mask=r_mask[:, None] & m_mask[None, :], other=0.0)
        b = tl.load(b_cols + b_rows[:, None] * stride_br, mask=r_mask[:, None] & n_mask[None, :], other=0.0)
        acc = tl.dot(tl.trans(a), b, acc, input_precision=DOT_PREC)
    tl.store(c_ptr + expert.to(tl.int64) * stride_ce + ms64[:, None] * stride_cm + ns64[None, :] * stride_cn,
             acc.to(c_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def zero_empty_experts_kernel(out_ptr, offsets_E_ptr, numel, stride_e, BLOCK: tl.constexpr):
    """``out[e] = 0`` for every expert without rows; programs of other experts exit at once (no write)."""
    expert = tl.program_id(1)
    start, end = expert_row_range(offsets_E_ptr, expert)
    if end > start:
        return
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + expert.to(tl.int64) * stride_e + offs, tl.zeros((BLOCK,), dtype=out_ptr.dtype.element_ty),
             mask=offs < numel)


@triton.jit
def expert_bias_grad_kernel(
    # pointers
    a_ptr, a_rows_ptr, scale_ptr, offsets_E_ptr, db_ptr,
    # sizes
    M,
    # strides
    stride_ar, stride_am, stride_dbe, stride_dbm,
    # meta-parameters
    A_GATHER: tl.constexpr, SCALE: tl.constexpr, BR: tl.constexpr, BM: tl.constexpr,
):
    """``db[e, m] = sum_{r of e} scale_r * a[a_rows_r, m]`` in row order (fp32, deterministic).

    Kept out of the weight-gradient loop: summing the A tile in registers there slows its matrix pipeline.
    """
    expert = tl.program_id(1)
    start, end = expert_row_range(offsets_E_ptr, expert)
    ms = tl.program_id(0) * BM + tl.arange(0, BM)
    m_mask = ms < M
    ms64 = ms.to(tl.int64)
    a_cols = a_ptr + ms64[None, :] * stride_am
    acc = tl.zeros((BR, BM), dtype=tl.float32)
    for r0 in range(start, end, BR):
        rows = r0 + tl.arange(0, BR)
        r_mask = rows < end
        a_rows = source_rows(a_rows_ptr, rows, r_mask, A_GATHER)
        a = tl.load(a_cols + a_rows[:, None] * stride_ar, mask=r_mask[:, None] & m_mask[None, :],
                    other=0.0).to(tl.float32)
        if SCALE:
            a = a * tl.load(scale_ptr + rows, mask=r_mask, other=0.0)[:, None]
        acc += a
    db = tl.sum(acc, axis=0)
    tl.store(db_ptr + expert.to(tl.int64) * stride_dbe + ms64 * stride_dbm, db.to(db_ptr.dtype.element_ty),
             mask=m_mask)


_GATE_UP_BWD_CONFIGS = configs([(128, 64, 64, 8, 3), (128, 64, 64, 8, 4), (64, 128, 64, 8, 3), (64, 128, 64, 4, 3),
                                 (128, 128, 64, 8, 2)])
_WEIGHT_GRAD_CONFIGS = configs([(128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 256, 64, 8, 3),
                                (256, 128, 64, 8, 3), (128, 128, 128, 8, 2)])
_gate_up_bwd_tuned = autotuned(gate_up_bwd_kernel, _GATE_UP_BWD_CONFIGS, ["D", "I", "rows_key"])
_weight_grad_tuned = autotuned(expert_weight_grad_kernel, _WEIGHT_GRAD_CONFIGS, ["M", "N", "E"])
# Row tiles of low_rank_pair (its BX columns are fixed: they size the partials). On an H200, qwen3's [R, 2048] dy
# rows: 228 us at BM=64, 4 warps; 166 us at 32; its [R, 1536] dgate_up rows: 173, 144 and 137 us at 64 with 8 warps.
_low_rank_pair_tuned = autotuned(low_rank_pair_kernel, [
    triton.Config({"BM": bm}, num_warps=w, num_stages=st) for bm, w, st in ((32, 4, 3), (64, 8, 3), (32, 8, 3),
                                                                            (32, 4, 4))], ["X", "RP"])
#: Output tiles ``BN`` wide for an ``out_EMN`` at most this many columns wide (the LoRA factors' ``d A``: N the
#: padded rank): the row loads, not the MMA, bound these, and a 128-wide tile would mask most of its columns.
THIN_N_MAX = 64
_weight_grad_thin_tuned = {
    bn: autotuned(expert_weight_grad_kernel, configs([(128, bn, 64, 4, 4), (256, bn, 64, 8, 3), (128, bn, 128, 4, 3),
                                                      (64, bn, 128, 4, 4), (256, bn, 128, 8, 2)]), ["M", "N", "E"])
    for bn in (16, 32, 64)}


def gate_up_bwd(x_TD: torch.Tensor, dy_TD: torch.Tensor, sorted_tokens_R: torch.Tensor, offsets_E: torch.Tensor,
                scale_R: torch.Tensor, gate_up_proj: torch.Tensor, gate_up_bias: torch.Tensor | None,
                down_proj: torch.Tensor, saved_SN: torch.Tensor, *, act_code: int, gated: bool, interleaved: bool,
                alpha: float, limit: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns ``dgate_up_RN`` and ``hw_RI = w_r * h`` (sorted rows, x's dtype) and ``dweights_R`` (fp32, sorted
    rows, without the down-bias term ``<dy_t, b_down[e]>``).

    ``saved_SN`` holds the pre-activations of the first ``S`` sorted rows (``S`` may be 0); ``scale_R`` is the fp32
    routing weight of each sorted row.
    """
    check_tensor("x_TD", x_TD, shape=(None, None), dtypes=IO_DTYPES)
    dev, dtype = x_TD.device, x_TD.dtype
    T, D = x_TD.shape
    check_tensor("dy_TD", dy_TD, shape=(T, D), dtypes=(dtype,), device=dev)
    check_tensor("gate_up_proj", gate_up_proj, shape=(None, None, D), dtypes=(dtype,), device=dev)
    E, N, _ = gate_up_proj.shape
    I = N // 2 if gated else N
    if gated and N % 2:
        raise ValueError(f"gate_up_proj: a gated activation needs an even number of gate/up rows, got N={N}")
    check_tensor("down_proj", down_proj, shape=(E, D, I), dtypes=(dtype,), device=dev)
    if gate_up_bias is not None:
        check_tensor("gate_up_bias", gate_up_bias, shape=(E, N), dtypes=(dtype,), device=dev)
    check_tensor("sorted_tokens_R", sorted_tokens_R, shape=(None,), dtypes=(torch.int64, torch.int32), device=dev)
    R = sorted_tokens_R.numel()
    check_rows("sorted_tokens_R", R)
    check_tensor("offsets_E", offsets_E, shape=(E,), dtypes=(torch.int32,), device=dev)
    check_tensor("scale_R", scale_R, shape=(R,), dtypes=(torch.float32,), device=dev)
    check_tensor("saved_SN", saved_SN, shape=(None, N), dtypes=(dtype,), device=dev)
    n_saved = saved_SN.shape[0]
    if n_saved > R:
        raise ValueError(f"saved_SN: expected at most R={R} saved rows, got {n_saved}")
    check_act_code(act_code)
    dgate_up_RN = torch.empty(R, N, device=dev, dtype=dtype)
    h_RI = torch.empty(R, I, device=dev, dtype=dtype)
    # Rows for the widest column coverage of any config; rows past I stay zero.
    P = max(triton.cdiv(I, bn) * (bn // PART_W) for bn in [INTERPRETER_META["BN"]] +
            [c.kwargs["BN"] for c in _GATE_UP_BWD_CONFIGS])
    dw_part_PR = torch.zeros(P, R, device=dev, dtype=torch.float32)
    if R == 0:
        return dgate_up_RN, h_RI, dw_part_PR.sum(0)
    bias = gate_up_bias if gate_up_bias is not None else gate_up_proj
    saved = saved_SN if n_saved else h_RI  # never read when no tile is saved
    args = (x_TD, dy_TD, sorted_tokens_R, offsets_E, scale_R, gate_up_proj, bias, down_proj, saved,
            dgate_up_RN, h_RI, dw_part_PR,
            R, D, I, E, n_saved, float(alpha), float(limit), rows_bucket(R),
            x_TD.stride(0), x_TD.stride(1), dy_TD.stride(0), dy_TD.stride(1), *gate_up_proj.stride(),
            bias.stride(0), bias.stride(1), *down_proj.stride(), saved.stride(0), dgate_up_RN.stride(0),
            h_RI.stride(0), dw_part_PR.stride(0))
    meta = dict(ACT=act_code, GATED=gated, INTERLEAVED=interleaved, HAS_BIAS=gate_up_bias is not None,
                E_P2=e_p2(E), DOT_PREC=dot_precision(dtype), PART_W=PART_W,
                OFFS64=not offsets_fit_int32((x_TD, (1,)), (gate_up_proj, (1, 2)), (bias, (1,))),
                GROUP_M=group_m(dev, (gate_up_proj[0].numel() + down_proj[0].numel()) * gate_up_proj.element_size()))
    launch_grouped(gate_up_bwd_kernel, _gate_up_bwd_tuned, lambda bn: triton.cdiv(I, bn), R, E, args, meta)
    # Fixed-order sum over the column tiles: deterministic.
    return dgate_up_RN, h_RI, dw_part_PR.sum(0)


def activation_bwd_rows(pre_RN: torch.Tensor, dh_RI: torch.Tensor, scale_R: torch.Tensor, offsets_E: torch.Tensor,
                        *, act_code: int, gated: bool, interleaved: bool, alpha: float, limit: float,
                        dgate_up_RN: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The activation backward of the split engine, row by row: returns ``(dgate_up_RN, hw_RI, dweights_R)``.

    ``pre_RN``: gate/up pre-activations of the sorted rows as ``[gate | up]`` (the saved-copy format, whatever the
    weight layout); ``dh_RI``: ``dy[sorted_tokens] @ down_proj[e]`` (unweighted); ``scale_R``: fp32 routing weights.
    ``dgate_up_RN`` (in the weights' layout) is written into the given buffer (which may be ``pre_RN`` itself for
    the concatenated layout) or a new one; ``hw_RI = w_r * h`` overwrites ``dh_RI``; ``dweights_R`` is fp32 and
    lacks the down-bias term. Rows past ``offsets_E[-1]`` get ``dweights`` 0 and are otherwise left as they were.
    """
    check_tensor("pre_RN", pre_RN, shape=(None, None), dtypes=IO_DTYPES)
    dev, dtype = pre_RN.device, pre_RN.dtype
    R, N = pre_RN.shape
    I = N // 2 if gated else N
    if gated and N % 2:
        raise ValueError(f"pre_RN: a gated activation needs an even number of gate/up columns, got N={N}")
    check_tensor("dh_RI", dh_RI, shape=(R, I), dtypes=(dtype,), device=dev)
    check_tensor("scale_R", scale_R, shape=(R,), dtypes=(torch.float32,), device=dev)
    check_tensor("offsets_E", offsets_E, shape=(None,), dtypes=(torch.int32,), device=dev)
    check_act_code(act_code)
    for name, t in (("pre_RN", pre_RN), ("dh_RI", dh_RI)):
        if t.stride(1) != 1 and t.shape[1] > 1:
            raise ValueError(f"{name}: expected unit column stride, got strides {t.stride()}")
    if interleaved and dgate_up_RN is not None and dgate_up_RN.data_ptr() == pre_RN.data_ptr():
        raise ValueError("dgate_up_RN: cannot overwrite pre_RN for the interleaved layout (columns move)")
    dgu = dgate_up_RN if dgate_up_RN is not None else torch.empty(R, N, device=dev, dtype=dtype)
    check_tensor("dgate_up_RN", dgu, shape=(R, N), dtypes=(dtype,), device=dev)
    dweights_R = torch.zeros(R, device=dev, dtype=torch.float32)
    E = offsets_E.numel()
    if R == 0 or E == 0:
        return dgu, dh_RI, dweights_R
    BM, BI = (16, 32) if interpreting() else (32, 128)
    activation_bwd_rows_kernel[(triton.cdiv(R, BM),)](
        pre_RN, dh_RI, scale_R, offsets_E, dgu, dh_RI, dweights_R, R, I, E, float(alpha), float(limit),
        pre_RN.stride(0), dh_RI.stride(0), dgu.stride(0), dh_RI.stride(0),
        ACT=act_code, GATED=gated, INTERLEAVED=interleaved, BM=BM, BI=BI)
    return dgu, dh_RI, dweights_R


def _check_low_rank_operands(rows: tuple[str, torch.Tensor], low: tuple[str, torch.Tensor], offsets_E: torch.Tensor,
                             factor: tuple[str, torch.Tensor], factor_shape) -> tuple[int, int, int, int]:
    """The checks of a LoRA term's launcher: ``rows`` ``[R, X]`` and ``low`` ``[R, r]`` with unit column strides,
    ``offsets_E`` int32 ``[E]``, ``factor`` of shape ``factor_shape(E, X, r)``, one float dtype and device.
    Returns ``(R, X, r, E)``; raises ``ValueError`` naming the operand."""
    (rows_name, rows_t), (low_name, low_t), (factor_name, factor_t) = rows, low, factor
    check_tensor(rows_name, rows_t, shape=(None, None), dtypes=IO_DTYPES)
    dev, dtype = rows_t.device, rows_t.dtype
    R, X = rows_t.shape
    check_tensor(low_name, low_t, shape=(R, None), dtypes=(dtype,), device=dev)
    rank = low_t.shape[1]
    check_tensor("offsets_E", offsets_E, shape=(None,), dtypes=(torch.int32,), device=dev)
    E = offsets_E.numel()
    check_tensor(factor_name, factor_t, shape=factor_shape(E, X, rank), dtypes=(dtype,), device=dev)
    for name, t in (rows, low):
        if t.stride(1) != 1 and t.shape[1] > 1:
            raise ValueError(f"{name}: expected unit column stride, got strides {t.stride()}")
    return R, X, rank, E


def lora_rows_add_(out_RN: torch.Tensor, lo_RP: torch.Tensor, la_EPN: torch.Tensor, offsets_E: torch.Tensor,
                   scale: float) -> torch.Tensor:
    """``out_RN[r] += scale * lo_RP[r] @ la_EPN[e]`` in place for the kept sorted rows r of each expert e (rows past
    ``offsets_E[-1]`` untouched); returns ``out_RN``. A LoRA term added to a GEMM's result without a temporary of
    its size: the down adapter's ``s (B_d^T dy) A_d`` on ``W_down^T dy`` in the split backward.

    ``out_RN`` ``[R, N]`` with unit column stride; ``lo_RP`` ``[R, r]`` (unit column stride) and ``la_EPN``
    ``[E, r, N]`` (any strides) in out's dtype; ``offsets_E`` int32 inclusive ends.
    """
    R, N, rank, E = _check_low_rank_operands(("out_RN", out_RN), ("lo_RP", lo_RP), offsets_E,
                                             ("la_EPN", la_EPN), lambda E, N, rank: (E, rank, N))
    dtype = out_RN.dtype
    if R == 0 or E == 0 or N == 0 or rank == 0:
        return out_RN
    BM, BN, warps = (16, 32, 4) if interpreting() else (64, 128, 4)
    lora_rows_add_kernel[(triton.cdiv(R, BM) + E, triton.cdiv(N, BN))](
        out_RN, lo_RP, la_EPN, offsets_E, N, E, rank, float(scale), out_RN.stride(0), lo_RP.stride(0),
        *la_EPN.stride(), E_P2=e_p2(E), DOT_PREC=dot_precision(dtype), RP=lora_rank_block(rank), BM=BM, BN=BN,
        num_warps=warps)
    return out_RN


#: Columns of ``a`` per program of :func:`low_rank_pair` (every chunk's partial is ``[R, P]`` fp32).
LOW_RANK_PAIR_BX = 256


def low_rank_pair(a_RX: torch.Tensor, w_EXP: torch.Tensor, b_RP: torch.Tensor, offsets_E: torch.Tensor, *,
                  scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Both of a LoRA factor's terms that read the rows ``a_RX`` (expert-sorted), in one pass over them:
    ``low_RP[r] = scale * a_RX[r] @ w_EXP[e]`` (a's dtype; rows past ``offsets_E[-1]`` mean nothing) and
    ``dw_EXP[e] = sum_{r of e} a_RX[r]^T b_RP[r]`` (w's dtype, contiguous; zeros for experts with no rows).

    The split backward's down adapter: ``a`` the gathered dy rows, ``w`` = B_d, ``b`` = w h A_d^T (``dy B_d`` and
    d B_d); its gate/up adapter: ``a`` = dgate_up, ``w`` = B_gu, ``b`` = s x A_gu^T (``s dgate_up B_gu`` and
    d B_gu). Separately they are two grouped GEMMs, each streaming all of ``a``. ``a_RX`` ``[R, X]`` and ``b_RP``
    ``[R, r]`` with unit column stride, ``w_EXP`` ``[E, X, r]`` (any strides), one float dtype; fp32 sums; one
    program per (expert, ``LOW_RANK_PAIR_BX`` columns), so an expert holding most rows runs longest.
    """
    R, X, rank, E = _check_low_rank_operands(("a_RX", a_RX), ("b_RP", b_RP), offsets_E, ("w_EXP", w_EXP),
                                             lambda E, X, rank: (E, X, rank))
    dev, dtype = a_RX.device, a_RX.dtype
    dw_EXP = torch.empty(E, X, rank, device=dev, dtype=dtype)
    if R == 0 or E == 0 or X == 0 or rank == 0:
        return torch.zeros(R, rank, device=dev, dtype=dtype), dw_EXP.zero_()
    BX = 16 if interpreting() else LOW_RANK_PAIR_BX
    chunks = triton.cdiv(X, BX)
    RP = lora_rank_block(rank)
    part_SRP = torch.empty(chunks, R, rank, device=dev, dtype=torch.float32)
    args = (a_RX, w_EXP, b_RP, offsets_E, part_SRP, dw_EXP, X, rank, a_RX.stride(0), *w_EXP.stride(),
            b_RP.stride(0), part_SRP.stride(0), part_SRP.stride(1), dw_EXP.stride(0), dw_EXP.stride(1))
    if _low_rank_pair_tuned is None:
        low_rank_pair_kernel[(E, chunks)](*args, DOT_PREC=dot_precision(dtype), RP=RP, BX=BX, BM=16, num_warps=4,
                                          num_stages=1)
    else:
        _low_rank_pair_tuned[(E, chunks)](*args, DOT_PREC=dot_precision(dtype), RP=RP, BX=BX)
    low_RP = torch.empty(R, rank, device=dev, dtype=dtype)
    BR = 16 if interpreting() else 64
    sum_partials_kernel[(triton.cdiv(R, BR),)](part_SRP, low_RP, chunks, R, rank, float(scale), part_SRP.stride(0),
                                               part_SRP.stride(1), low_RP.stride(0), RP=RP, BR=BR)
    return low_RP, dw_EXP


def expert_bias_grad(a: torch.Tensor, offsets_E: torch.Tensor, dbias_EM: torch.Tensor, *,
                     a_rows_R: torch.Tensor | None = None, scale_R: torch.Tensor | None = None) -> torch.Tensor:
    """``dbias_EM[e] = sum_{r of e} scale_R[r] * a[a_rows_R[r]]`` (fp32 sums in row order; ``scale_R`` defaults to
    ones, ``a_rows_R`` to r itself); zeros for experts with no rows. Returns ``dbias_EM``, written in place."""
    check_tensor("dbias_EM", dbias_EM, shape=(None, None), dtypes=IO_DTYPES)
    dev = dbias_EM.device
    E, M = dbias_EM.shape
    check_tensor("a", a, shape=(None, M), dtypes=IO_DTYPES, device=dev)
    check_tensor("offsets_E", offsets_E, shape=(E,), dtypes=(torch.int32,), device=dev)
    if a_rows_R is not None:
        check_tensor("a_rows_R", a_rows_R, shape=(None,), dtypes=(torch.int64, torch.int32), device=dev)
        check_rows("a_rows_R", a_rows_R.numel())
    if scale_R is not None:
        check_tensor("scale_R", scale_R, shape=(None,), dtypes=(torch.float32,), device=dev)
    BR, BM = (64, 64) if interpreting() else (32, 256)
    expert_bias_grad_kernel[(triton.cdiv(M, BM), E)](
        a, a_rows_R if a_rows_R is not None else offsets_E, scale_R if scale_R is not None else offsets_E,
        offsets_E, dbias_EM, M, a.stride(0), a.stride(1), dbias_EM.stride(0), dbias_EM.stride(1),
        A_GATHER=a_rows_R is not None, SCALE=scale_R is not None, BR=BR, BM=BM)
    return dbias_EM


def zero_empty_experts_(out_E: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
    """Zeros ``out_E[e]`` (each expert's slice contiguous) for every expert with no rows, in place, without a host
    sync and without touching the other experts' memory: a grouped GEMM's weight gradient need not write the
    groups it has no rows for (``torch._grouped_mm`` is documented to on Hopper only)."""
    check_tensor("offsets_E", offsets_E, shape=(out_E.shape[0],), dtypes=(torch.int32,), device=out_E.device)
    numel = out_E[0].numel() if out_E.shape[0] else 0
    if numel == 0:
        return out_E
    if not out_E[0].is_contiguous():
        raise ValueError(f"out_E: expected contiguous expert slices, got strides {out_E.stride()}")
    BLOCK = 1024 if interpreting() else 4096
    zero_empty_experts_kernel[(triton.cdiv(numel, BLOCK), out_E.shape[0])](out_E, offsets_E, numel,
                                                                          out_E.stride(0), BLOCK=BLOCK)
    return out_E


def expert_weight_grad(a: torch.Tensor, b: torch.Tensor, offsets_E: torch.Tensor, out_EMN: torch.Tensor, *,
                       a_rows_R: torch.Tensor | None = None, b_rows_R: torch.Tensor | None = None,
                       dbias_EM: torch.Tensor | None = None, bias_scale_R: torch.Tensor | None = None) -> torch.Tensor:
    """``out_EMN[e] = sum_{r of e} a[a_rows_R[r]]^T b[b_rows_R[r]]`` (rows r in sorted order; ``a_rows_R`` and
    ``b_rows_R`` default to r itself); ``dbias_EM[e] = sum_{r of e} bias_scale_R[r] * a[a_rows_R[r]]`` (fp32
    ``bias_scale_R`` defaults to ones).

    ``a`` is ``[*, M]``, ``b`` ``[*, N]``, both may be strided; every element of ``out_EMN`` (and ``dbias_EM``) is
    written, zeros for experts with no rows.
    """
    check_tensor("out_EMN", out_EMN, shape=(None, None, None), dtypes=IO_DTYPES)
    dev = out_EMN.device
    E, M, N = out_EMN.shape
    check_tensor("a", a, shape=(None, M), dtypes=IO_DTYPES, device=dev)
    check_tensor("b", b, shape=(None, N), dtypes=(a.dtype,), device=dev)
    check_tensor("offsets_E", offsets_E, shape=(E,), dtypes=(torch.int32,), device=dev)
    for name, rows_R in (("a_rows_R", a_rows_R), ("b_rows_R", b_rows_R)):
        if rows_R is not None:
            check_tensor(name, rows_R, shape=(None,), dtypes=(torch.int64, torch.int32), device=dev)
            check_rows(name, rows_R.numel())
    if dbias_EM is not None:
        check_tensor("dbias_EM", dbias_EM, shape=(E, M), dtypes=IO_DTYPES, device=dev)
    if bias_scale_R is not None:
        check_tensor("bias_scale_R", bias_scale_R, shape=(None,), dtypes=(torch.float32,), device=dev)
    a_rows = a_rows_R if a_rows_R is not None else offsets_E  # never read when A_GATHER is False
    args = (a, a_rows, b, b_rows_R if b_rows_R is not None else offsets_E, offsets_E, out_EMN, M, N, E,
            a.stride(0), a.stride(1), b.stride(0), b.stride(1), *out_EMN.stride())
    # Each output tile streams its expert's rows of a and b: about R / E of them.
    rows = triton.cdiv(a_rows_R.numel() if a_rows_R is not None else a.shape[0], max(E, 1))
    meta = dict(A_GATHER=a_rows_R is not None, B_GATHER=b_rows_R is not None, DOT_PREC=dot_precision(a.dtype),
                GROUP_M=group_m(a.device, rows * (M + N) * a.element_size()))
    if _weight_grad_tuned is None:
        meta.update(INTERPRETER_META)
        grid = (triton.cdiv(M, meta["BM"]) * triton.cdiv(N, meta["BN"]), E)
        expert_weight_grad_kernel[grid](*args, **meta)
    else:
        tuned = _weight_grad_thin_tuned[max(16, triton.next_power_of_2(N))] if N <= THIN_N_MAX else _weight_grad_tuned
        tuned[lambda m: (triton.cdiv(M, m["BM"]) * triton.cdiv(N, m["BN"]), E)](*args, **meta)
    if dbias_EM is not None:
        expert_bias_grad(a, offsets_E, dbias_EM, a_rows_R=a_rows_R, scale_R=bias_scale_R)
    return out_EMN


__all__ = ["activation_bwd_rows", "expert_bias_grad", "expert_weight_grad", "gate_up_bwd", "lora_rows_add_",
           "low_rank_pair", "zero_empty_experts_"]
