"""Decode-sized MoE forward kernels: few routed rows, every touched expert's weights read once by many programs.

Legend: T tokens, D model dim, I expert hidden dim, N gate/up rows (2I gated, I otherwise), E experts, K top-k,
R routed rows (T*K) sorted by expert (see :mod:`leanmoe.experts.plan`), S reduction splits.

At decode sizes (T of 1-256) an expert sees a few rows, so the layer is bound by reading the touched experts'
weights, not by the MMAs. The kernels here keep the expert-grouped row tiles of :mod:`leanmoe.kernels.moe_fwd`
but with small row tiles (BM 16-32, so one tile holds all of an expert's rows and each weight element is read by
one program) and split the reduction dimension S ways when the output tiles alone would leave SMs idle
(:func:`choose_split`, from the shapes only, never from the routing):

1. :func:`decode_gate_up`: grid ``(row tiles x I/BN, S)``. A program reads its expert's gate and up weight rows for
   BN hidden columns over its D-chunk, and its rows of x (gathered through ``sorted_tokens``). With S = 1 the bias
   and activation run in its epilogue and it stores ``h``; with S > 1 it stores fp32 partial pre-activations and
   :func:`gate_up_finish_kernel` sums the S partials in split order, adds the bias and applies the activation.
2. :func:`decode_down`: grid ``(row tiles x D/BN, S)``. A program reads ``W_down[e]`` for BN output columns over
   its I-chunk, and stores ``w_r * (partial + bias on split 0)`` in fp32 at the row's token-slot position.
3. :func:`decode_combine`: ``y_t = sum_k sum_s part[s, t*K + k]`` in a fixed order (deterministic, no atomics);
   masked tokens (whose rows no GEMM touched) get exact zeros.

No launch reads the routing on the host: grids are bounds from T, K, E and the shapes (surplus programs exit), and
every buffer's size depends on shapes only, so the path can be captured in a CUDA graph.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from leanmoe.kernels.moe_common import (
    activation_fwd,
    autotuned,
    dot_precision,
    e_p2,
    expert_tile,
    gate_up_rows,
    gate_up_tile,
    interpreting,
    rows_bucket,
    tile_cols,
    tile_rows,
)

#: Every split's chunk of the reduction dimension is a multiple of this (and so of every BK in the configs).
SPLIT_QUANTUM = 256
#: Programs per SM that :func:`choose_split` aims for: enough loads in flight to cover memory latency.
PROGRAMS_PER_SM = 4
MAX_SPLIT = 8


@triton.jit(do_not_specialize=["R"])
def decode_gate_up_kernel(
    # pointers
    x_ptr, sorted_tokens_ptr, offsets_E_ptr, w_ptr, bias_ptr, h_ptr, part_ptr,
    # sizes and scalars
    R, D, I, E, chunk, alpha, limit, rows_key,
    # strides
    stride_xt, stride_xd, stride_we, stride_wn, stride_wd, stride_be, stride_bn, stride_hr, stride_ps, stride_pr,
    # meta-parameters
    ACT: tl.constexpr, GATED: tl.constexpr, INTERLEAVED: tl.constexpr, HAS_BIAS: tl.constexpr,
    SPLIT: tl.constexpr, E_P2: tl.constexpr, DOT_PREC: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    num_n = tl.cdiv(I, BN)
    pid = tl.program_id(0)
    pid_m, pid_n, pid_s = pid // num_n, pid % num_n, tl.program_id(1)
    expert, row_start, row_end = expert_tile(pid_m, offsets_E_ptr, E, E_P2, BM)
    if expert >= E:
        return
    rows, row_mask = tile_rows(row_start, row_end, BM)
    tokens, cols, col_mask, g_rows, u_rows = gate_up_tile(pid_n, sorted_tokens_ptr, rows, row_mask, I, BN, GATED,
                                                          INTERLEAVED)
    e64 = expert.to(tl.int64)
    w_base = w_ptr + e64 * stride_we
    x_rows = x_ptr + tokens[:, None] * stride_xt
    acc_g = tl.zeros((BM, BN), dtype=tl.float32)
    acc_u = tl.zeros((BM, BN), dtype=tl.float32)
    k_lo = pid_s * chunk
    k_hi = tl.minimum(k_lo + chunk, D)
    for k0 in range(k_lo, k_hi, BK):
        ks = k0 + tl.arange(0, BK)
        k_mask = ks < k_hi
        a = tl.load(x_rows + ks[None, :] * stride_xd, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w_mask = k_mask[:, None] & col_mask[None, :]
        wg = tl.load(w_base + ks[:, None] * stride_wd + g_rows[None, :] * stride_wn, mask=w_mask, other=0.0)
        acc_g = tl.dot(a, wg, acc_g, input_precision=DOT_PREC)
        if GATED:
            wu = tl.load(w_base + ks[:, None] * stride_wd + u_rows[None, :] * stride_wn, mask=w_mask, other=0.0)
            acc_u = tl.dot(a, wu, acc_u, input_precision=DOT_PREC)
    rows64 = rows.to(tl.int64)
    out_mask = row_mask[:, None] & col_mask[None, :]
    if SPLIT == 1:
        if HAS_BIAS:
            b_base = bias_ptr + e64 * stride_be
            acc_g += tl.load(b_base + g_rows * stride_bn, mask=col_mask, other=0.0).to(tl.float32)[None, :]
            if GATED:
                acc_u += tl.load(b_base + u_rows * stride_bn, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        # Round the pre-activation to the I/O dtype first, as the reference and the training kernels do.
        g = acc_g.to(h_ptr.dtype.element_ty).to(tl.float32)
        u = acc_u.to(h_ptr.dtype.element_ty).to(tl.float32)
        h = activation_fwd(g, u, alpha, limit, ACT)
        tl.store(h_ptr + rows64[:, None] * stride_hr + cols[None, :], h.to(h_ptr.dtype.element_ty), mask=out_mask)
    else:
        # Partials [S, R, 2, I]: gate columns then up columns of this split, fp32.
        p_rows = part_ptr + pid_s.to(tl.int64) * stride_ps + rows64[:, None] * stride_pr
        tl.store(p_rows + cols[None, :], acc_g, mask=out_mask)
        if GATED:
            tl.store(p_rows + (cols + I)[None, :], acc_u, mask=out_mask)


@triton.jit(do_not_specialize=["R"])
def gate_up_finish_kernel(
    # pointers
    part_ptr, sorted_experts_ptr, bias_ptr, h_ptr,
    # sizes and scalars
    R, I, n_rows, alpha, limit,
    # strides
    stride_ps, stride_pr, stride_be, stride_bn, stride_hr,
    # meta-parameters
    ACT: tl.constexpr, GATED: tl.constexpr, INTERLEAVED: tl.constexpr, HAS_BIAS: tl.constexpr,
    SPLIT: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr,
):
    """``h = act(sum_s part[s] + bias)`` for the first ``n_rows`` (device scalar: the kept rows) sorted rows."""
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    cols = tl.program_id(1) * BC + tl.arange(0, BC)
    kept = tl.load(n_rows)
    row_mask = (rows < R) & (rows < kept)
    col_mask = cols < I
    mask = row_mask[:, None] & col_mask[None, :]
    rows64 = rows.to(tl.int64)
    p_rows = part_ptr + rows64[:, None] * stride_pr
    g = tl.zeros((BR, BC), dtype=tl.float32)
    u = tl.zeros((BR, BC), dtype=tl.float32)
    for s in range(SPLIT):
        g += tl.load(p_rows + s * stride_ps + cols[None, :], mask=mask, other=0.0)
        if GATED:
            u += tl.load(p_rows + s * stride_ps + (cols + I)[None, :], mask=mask, other=0.0)
    if HAS_BIAS:
        experts = tl.load(sorted_experts_ptr + rows, mask=row_mask, other=0).to(tl.int64)
        g_rows, u_rows = gate_up_rows(cols, I, GATED, INTERLEAVED)
        b_rows = bias_ptr + experts[:, None] * stride_be
        g += tl.load(b_rows + g_rows[None, :] * stride_bn, mask=mask, other=0.0).to(tl.float32)
        if GATED:
            u += tl.load(b_rows + u_rows[None, :] * stride_bn, mask=mask, other=0.0).to(tl.float32)
    g = g.to(h_ptr.dtype.element_ty).to(tl.float32)
    u = u.to(h_ptr.dtype.element_ty).to(tl.float32)
    h = activation_fwd(g, u, alpha, limit, ACT)
    tl.store(h_ptr + rows64[:, None] * stride_hr + cols[None, :], h.to(h_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["R"])
def decode_down_kernel(
    # pointers
    h_ptr, w_ptr, bias_ptr, topk_weights_ptr, out_rows_ptr, offsets_E_ptr, part_ptr,
    # sizes
    R, D, I, E, K, chunk, rows_key,
    # strides
    stride_hr, stride_we, stride_wd, stride_wi, stride_be, stride_bd, stride_tt, stride_tk, stride_ps, stride_pr,
    # meta-parameters
    HAS_BIAS: tl.constexpr, E_P2: tl.constexpr, DOT_PREC: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    """``part[s, out_rows[r]] = w_r * (h[r, chunk s] @ W_down[e, :, chunk s].T + (bias[e] if s == 0))``, fp32,
    with ``w_r`` read from ``topk_weights[t, k]`` for the routed row ``out_rows[r] = t*K + k``."""
    num_n = tl.cdiv(D, BN)
    pid = tl.program_id(0)
    pid_m, pid_n, pid_s = pid // num_n, pid % num_n, tl.program_id(1)
    expert, row_start, row_end = expert_tile(pid_m, offsets_E_ptr, E, E_P2, BM)
    if expert >= E:
        return
    rows, row_mask = tile_rows(row_start, row_end, BM)
    rows64 = rows.to(tl.int64)
    cols, col_mask = tile_cols(pid_n, D, BN)
    e64 = expert.to(tl.int64)
    w_base = w_ptr + e64 * stride_we
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    k_lo = pid_s * chunk
    k_hi = tl.minimum(k_lo + chunk, I)
    for k0 in range(k_lo, k_hi, BK):
        ks = k0 + tl.arange(0, BK)
        k_mask = ks < k_hi
        a = tl.load(h_ptr + rows64[:, None] * stride_hr + ks[None, :], mask=row_mask[:, None] & k_mask[None, :],
                    other=0.0)
        b = tl.load(w_base + ks[:, None] * stride_wi + cols[None, :] * stride_wd,
                    mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PREC)
    if HAS_BIAS:
        if pid_s == 0:
            bias = tl.load(bias_ptr + e64 * stride_be + cols * stride_bd, mask=col_mask, other=0.0)
            acc += bias.to(tl.float32)[None, :]
    out_rows = tl.load(out_rows_ptr + rows, mask=row_mask, other=0).to(tl.int64)
    # The routing weight gathered here: no sorted copy of the weights is made for the decode path.
    w_r = tl.load(topk_weights_ptr + (out_rows // K) * stride_tt + (out_rows % K) * stride_tk, mask=row_mask,
                  other=0.0)
    acc *= w_r.to(tl.float32)[:, None]
    tl.store(part_ptr + pid_s.to(tl.int64) * stride_ps + out_rows[:, None] * stride_pr + cols[None, :], acc,
             mask=row_mask[:, None] & col_mask[None, :])


@triton.jit(do_not_specialize=["T"])
def decode_combine_kernel(
    # pointers
    part_ptr, mask_ptr, y_ptr,
    # sizes
    T, K, D,
    # strides
    stride_ps, stride_pr, stride_yt, stride_yd,
    # meta-parameters
    HAS_MASK: tl.constexpr, SPLIT: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
):
    """``y[t] = sum_k sum_s part[s, t*K + k]`` (k outer, s inner: a fixed order); 0 for masked tokens."""
    tokens = tl.program_id(0) * BT + tl.arange(0, BT)
    cs = tl.program_id(1) * BC + tl.arange(0, BC)
    t_mask = tokens < T
    if HAS_MASK:
        t_mask = t_mask & (tl.load(mask_ptr + tokens, mask=t_mask, other=0) != 0)
    mask = t_mask[:, None] & (cs < D)[None, :]
    t64 = tokens.to(tl.int64)
    acc = tl.zeros((BT, BC), dtype=tl.float32)
    for k in range(0, K):
        p_rows = part_ptr + (t64 * K + k)[:, None] * stride_pr + cs[None, :]
        for s in range(SPLIT):
            acc += tl.load(p_rows + s * stride_ps, mask=mask, other=0.0)
    tl.store(y_ptr + t64[:, None] * stride_yt + cs[None, :] * stride_yd, acc.to(y_ptr.dtype.element_ty),
             mask=(tokens < T)[:, None] & (cs < D)[None, :])


@triton.jit
def decode_plan_kernel(
    # pointers
    ids_ptr, keep_ptr, sorted_rows_ptr, sorted_tokens_ptr, sorted_experts_ptr, counts_ptr, offsets_ptr,
    # sizes
    R, K, E,
    # strides
    stride_it, stride_ik,
    # meta-parameters
    HAS_MASK: tl.constexpr, R_P2: tl.constexpr, BINS: tl.constexpr,
):
    """The routing plan of :func:`leanmoe.experts.plan.plan_experts` in one program: each row's key (its expert, E
    for a masked token's row) packed with its row index and sorted (so ties keep row order: a stable sort), and the
    per-expert counts and inclusive offsets from a histogram of the keys."""
    r = tl.arange(0, R_P2)
    valid = r < R
    t = r // K
    key = tl.load(ids_ptr + t.to(tl.int64) * stride_it + (r % K) * stride_ik, mask=valid, other=0).to(tl.int64)
    if HAS_MASK:
        keep = tl.load(keep_ptr + t, mask=valid, other=0) != 0
        key = tl.where(keep, key, E)
    key = tl.where(valid, key, BINS - 1)  # padding lanes sort last, in a bin past E
    packed = tl.sort(key * R_P2 + r)
    s_key = packed // R_P2
    s_row = packed % R_P2
    tl.store(sorted_rows_ptr + r, s_row, mask=valid)
    tl.store(sorted_tokens_ptr + r, s_row // K, mask=valid)
    # Masked rows (key E) read expert E-1: indexing by it stays in range, the column non-decreasing.
    tl.store(sorted_experts_ptr + r, tl.minimum(s_key, E - 1).to(sorted_experts_ptr.dtype.element_ty), mask=valid)
    counts = tl.histogram(key.to(tl.int32), BINS)
    offsets = tl.cumsum(counts, 0)
    b = tl.arange(0, BINS)
    tl.store(counts_ptr + b, counts.to(tl.int64), mask=b < E)
    tl.store(offsets_ptr + b, offsets.to(tl.int32), mask=b < E)


def _configs(shapes):
    return [triton.Config({"BM": bm, "BN": bn, "BK": bk}, num_warps=w, num_stages=s) for bm, bn, bk, w, s in shapes]


# Small row tiles (tl.dot needs 16), narrow column tiles so there are many programs, long BK for few loop trips.
# The first config is the one LEANMOE_AUTOTUNE=0 runs: its stages fit shared memory in fp32 too (gated: x tile and
# two weight tiles, (16*64 + 2*64*64) * 4 B * 3 stages = 108 KB).
_DECODE_CONFIGS = _configs([(16, 64, 64, 4, 3), (16, 64, 128, 4, 4), (16, 32, 256, 4, 3), (16, 64, 256, 4, 3),
                            (16, 128, 128, 4, 4), (32, 64, 128, 4, 4), (16, 32, 128, 2, 5),
                            # experts with more rows than 16 (T=256 on few experts: olmoe, gpt-oss)
                            (64, 64, 64, 4, 3)])
_decode_gate_up_tuned = autotuned(decode_gate_up_kernel, _DECODE_CONFIGS, ["D", "I", "rows_key", "SPLIT"])
_decode_down_tuned = autotuned(decode_down_kernel, _DECODE_CONFIGS, ["D", "I", "rows_key", "chunk"])
#: Under the interpreter: the smallest legal tiles, so the tests' tiny shapes still have several tiles and splits.
INTERPRETER_META = {"BM": 16, "BN": 16, "BK": 16}


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device``; 2 under the interpreter (so that tests see splits)."""
    if device.type != "cuda":
        return 2
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def row_tiles_bound(R: int, E: int, BM: int) -> int:
    """At most this many non-empty row tiles: ``sum_e ceil(c_e / BM)`` is ``<= R/BM + (experts hit)`` and ``<= R``."""
    return min(triton.cdiv(R, BM) + min(E, R), R)


def choose_split(R: int, E: int, out_cols: int, reduce_dim: int, sms: int, *, quantum: int = SPLIT_QUANTUM) -> int:
    """Splits of the reduction dimension: 1 when the output tiles (BM 16, BN 64) already give
    :data:`PROGRAMS_PER_SM` programs per SM, else a power of two that does, at most :data:`MAX_SPLIT` and with
    chunks of at least ``quantum``. From the shapes only, so it is the same for every call of a shape."""
    programs = row_tiles_bound(R, E, 16) * triton.cdiv(out_cols, 64)
    split = 1
    while split < MAX_SPLIT and programs * split < PROGRAMS_PER_SM * sms and quantum * split * 2 <= reduce_dim:
        split *= 2
    return split


def _chunk(reduce_dim: int, split: int, quantum: int) -> int:
    return triton.cdiv(triton.cdiv(reduce_dim, split), quantum) * quantum


#: ``(autotuner, its config count, tuning key) -> the chosen config's launch options``: a decode call launches the
#: plain kernel with them once its shape bucket is tuned. Triton's autotuner costs tens of microseconds of host
#: time per launch on top of the kernel's own launch, which a decode step spends once per layer.
_CHOSEN_CONFIGS: dict[tuple, dict] = {}


def _launch(plain, tuned, R, E, num_cols, split, args, meta, tune_key: tuple):
    if tuned is None:
        meta = {**meta, **INTERPRETER_META}
        plain[(row_tiles_bound(R, E, meta["BM"]) * triton.cdiv(num_cols, meta["BN"]), split)](*args, **meta)
        return
    # tune_key: the values of the autotuner's key and the tensors' dtypes, as the autotuner keys its own cache.
    key = (id(tuned), len(tuned.configs), *tune_key)
    chosen = _CHOSEN_CONFIGS.get(key)
    if chosen is None:
        tuned[lambda m: (row_tiles_bound(R, E, m["BM"]) * triton.cdiv(num_cols, m["BN"]), split)](*args, **meta)
        _CHOSEN_CONFIGS[key] = dict(tuned.best_config.all_kwargs())
        return
    grid = (row_tiles_bound(R, E, chosen["BM"]) * triton.cdiv(num_cols, chosen["BN"]), split)
    plain[grid](*args, **meta, **chosen)


def _quantum() -> int:
    return INTERPRETER_META["BK"] if interpreting() else SPLIT_QUANTUM


def decode_gate_up(x_TD: torch.Tensor, sorted_tokens_R: torch.Tensor, sorted_experts_R: torch.Tensor,
                   offsets_E: torch.Tensor, gate_up_proj: torch.Tensor, gate_up_bias: torch.Tensor | None, *,
                   act_code: int, gated: bool, interleaved: bool, alpha: float, limit: float,
                   split: int | None = None) -> torch.Tensor:
    """``h_RI = act(x[sorted_tokens] @ gate_up_proj[e].T + b)`` for the kept sorted rows (``offsets_E[-1]`` of
    them; rows past it are left unwritten), x's dtype. ``split`` overrides :func:`choose_split`."""
    E, N, D = gate_up_proj.shape
    I = N // 2 if gated else N
    R = sorted_tokens_R.numel()
    h_RI = torch.empty(R, I, device=x_TD.device, dtype=x_TD.dtype)
    if R == 0:
        return h_RI
    quantum = _quantum()
    if split is None:
        split = choose_split(R, E, I, D, sm_count(x_TD.device), quantum=quantum)
    chunk = _chunk(D, split, quantum)
    part = torch.empty(split, R, 2 * I if gated else I, device=x_TD.device, dtype=torch.float32) if split > 1 \
        else h_RI
    bias = gate_up_bias if gate_up_bias is not None else gate_up_proj  # never read when HAS_BIAS is False
    flags = dict(ACT=act_code, GATED=gated, INTERLEAVED=interleaved, HAS_BIAS=gate_up_bias is not None, SPLIT=split)
    args = (x_TD, sorted_tokens_R, offsets_E, gate_up_proj, bias, h_RI, part, R, D, I, E, chunk, float(alpha),
            float(limit), rows_bucket(R), x_TD.stride(0), x_TD.stride(1), *gate_up_proj.stride(), bias.stride(0),
            bias.stride(1), h_RI.stride(0), part.stride(0) if split > 1 else 0, part.stride(1) if split > 1 else 0)
    _launch(decode_gate_up_kernel, _decode_gate_up_tuned, R, E, I, split, args,
            dict(flags, E_P2=e_p2(E), DOT_PREC=dot_precision(x_TD.dtype)),
            (D, I, rows_bucket(R), split, x_TD.dtype, gate_up_proj.dtype, bias.dtype, h_RI.dtype, part.dtype))
    if split > 1:
        BR, BC = 16, 64
        gate_up_finish_kernel[(triton.cdiv(R, BR), triton.cdiv(I, BC))](
            part, sorted_experts_R, bias, h_RI, R, I, offsets_E[E - 1:], float(alpha), float(limit),
            part.stride(0), part.stride(1), bias.stride(0), bias.stride(1), h_RI.stride(0), **flags, BR=BR, BC=BC)
    return h_RI


def decode_down_combine(h_RI: torch.Tensor, down_proj: torch.Tensor, down_bias: torch.Tensor | None,
                        topk_weights_TK: torch.Tensor, sorted_rows_R: torch.Tensor, offsets_E: torch.Tensor,
                        token_mask_T: torch.Tensor | None = None, *, split: int | None = None) -> torch.Tensor:
    """``y_TD[t] = sum_k w_tk * (down_proj[e] h + b)`` over the token's kept rows; masked tokens' rows are 0.

    ``topk_weights_TK`` any float dtype and strides; ``token_mask_T`` bool (True = keep) or None.
    """
    T, K = topk_weights_TK.shape
    E, D, I = down_proj.shape
    R = h_RI.shape[0]
    y_TD = torch.empty(T, D, device=h_RI.device, dtype=h_RI.dtype)
    if T == 0:
        return y_TD
    quantum = _quantum()
    if split is None:
        split = choose_split(R, E, D, I, sm_count(h_RI.device), quantum=quantum)
    chunk = _chunk(I, split, quantum)
    part = torch.empty(split, R, D, device=h_RI.device, dtype=torch.float32)
    bias = down_bias if down_bias is not None else down_proj
    args = (h_RI, down_proj, bias, topk_weights_TK, sorted_rows_R, offsets_E, part, R, D, I, E, K, chunk,
            rows_bucket(R), h_RI.stride(0), *down_proj.stride(), bias.stride(0), bias.stride(1),
            topk_weights_TK.stride(0), topk_weights_TK.stride(1), part.stride(0), part.stride(1))
    _launch(decode_down_kernel, _decode_down_tuned, R, E, D, split, args,
            dict(HAS_BIAS=down_bias is not None, E_P2=e_p2(E), DOT_PREC=dot_precision(h_RI.dtype)),
            (D, I, rows_bucket(R), chunk, h_RI.dtype, down_proj.dtype, bias.dtype, topk_weights_TK.dtype))
    BT, BC = (16, 64) if interpreting() else (16, 256)
    mask = token_mask_T if token_mask_T is not None else y_TD
    decode_combine_kernel[(triton.cdiv(T, BT), triton.cdiv(D, BC))](
        part, mask, y_TD, T, K, D, part.stride(0), part.stride(1), y_TD.stride(0), y_TD.stride(1),
        HAS_MASK=token_mask_T is not None, SPLIT=split, BT=BT, BC=BC)
    return y_TD


#: Routed rows up to which :func:`decode_plan` sorts in one program (beyond, the plan's torch ops are as cheap).
PLAN_MAX_ROWS = 4096


def decode_plan(topk_ids_TK: torch.Tensor, num_experts: int, token_mask_T: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(sorted_rows_R, sorted_tokens_R, sorted_experts_R, counts_E, offsets_E)``, exactly
    :func:`leanmoe.experts.plan.plan_experts`'s, from one kernel launch instead of its ~9 torch ops: at decode
    sizes each op's launch is host time the step waits for. ``R = T*K <= PLAN_MAX_ROWS``; ids trusted in
    ``[0, E)``; ``token_mask_T`` bool ``[T]`` (True = keep) or None. The ``[R]`` outputs and ``counts_E`` share one
    int64 buffer (``sorted_experts_R`` in the ids' dtype)."""
    T, K = topk_ids_TK.shape
    R, E = T * K, num_experts
    if R > PLAN_MAX_ROWS or E < 1:
        raise ValueError(f"decode_plan: expected T*K <= {PLAN_MAX_ROWS} and num_experts >= 1, got T*K={R}, "
                         f"num_experts={E}")
    dev = topk_ids_TK.device
    buf = torch.empty(3 * R + E, device=dev, dtype=torch.int64)
    sorted_rows_R, sorted_tokens_R, counts_E = buf[:R], buf[R:2 * R], buf[3 * R:]
    sorted_experts_R = buf[2 * R:3 * R] if topk_ids_TK.dtype == torch.int64 else \
        torch.empty(R, device=dev, dtype=topk_ids_TK.dtype)
    offsets_E = torch.empty(E, device=dev, dtype=torch.int32)
    if R == 0:
        counts_E.zero_()
        offsets_E.zero_()
        return sorted_rows_R, sorted_tokens_R, sorted_experts_R, counts_E, offsets_E
    keep = token_mask_T if token_mask_T is not None else offsets_E
    R_P2 = max(triton.next_power_of_2(R), 16)
    decode_plan_kernel[(1,)](topk_ids_TK, keep, sorted_rows_R, sorted_tokens_R, sorted_experts_R, counts_E,
                             offsets_E, R, K, E, topk_ids_TK.stride(0), topk_ids_TK.stride(1),
                             HAS_MASK=token_mask_T is not None, R_P2=R_P2, BINS=triton.next_power_of_2(E + 2),
                             num_warps=4 if R_P2 <= 1024 else 8)
    return sorted_rows_R, sorted_tokens_R, sorted_experts_R, counts_E, offsets_E


__all__ = ["choose_split", "decode_down_combine", "decode_gate_up", "decode_plan", "row_tiles_bound"]
