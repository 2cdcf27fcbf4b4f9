"""Shared pieces of the MoE kernels: the on-device tile schedule, activations and their derivatives, configs.

Legend: R routed rows (T*K) in expert-sorted order, E experts, BM rows per tile.

Tile schedule: expert e owns sorted rows ``[offsets_E[e-1], offsets_E[e])`` and ``ceil(count_e / BM)`` row tiles.
Summed over experts that is at most ``ceil(R / BM) + E`` tiles, so the launchers start that many row tiles and each
program finds its (expert, first row) from ``offsets_E`` in registers (a cumulative sum over ``E_P2`` lanes); the
programs past the last tile exit at once. The routing is never read on the host, so there is no host sync.
"""

from __future__ import annotations

import functools
import inspect
import os

import torch
import triton
import triton.language as tl
from triton.runtime.autotuner import Autotuner

# Activation codes: the constexpr ACT of every kernel. The names are leanmoe.activations' names.
ACT_SWIGLU = tl.constexpr(0)
ACT_GEGLU = tl.constexpr(1)  # tanh-approximated GELU, gated
ACT_CLAMPED_SWIGLU = tl.constexpr(2)
ACT_RELU2 = tl.constexpr(3)
ACT_GELU = tl.constexpr(4)  # tanh-approximated GELU
ACT_SILU = tl.constexpr(5)
ACT_GELU_EXACT = tl.constexpr(6)  # erf GELU
ACT_GEGLU_EXACT = tl.constexpr(7)  # erf GELU, gated
#: Activation name -> the ``act_code`` the launchers take.
ACTIVATION_CODES = {name: code.value for name, code in (
    ("swiglu", ACT_SWIGLU), ("geglu", ACT_GEGLU), ("clamped_swiglu", ACT_CLAMPED_SWIGLU), ("relu2", ACT_RELU2),
    ("gelu", ACT_GELU), ("silu", ACT_SILU), ("gelu_exact", ACT_GELU_EXACT), ("geglu_exact", ACT_GEGLU_EXACT))}

_SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)
_GELU_A = tl.constexpr(0.044715)  # the cubic coefficient of the tanh approximation
_SQRT_HALF = tl.constexpr(0.7071067811865476)  # 1 / sqrt(2)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)  # 1 / sqrt(2 pi)


#: Row indices and expert offsets are int32 in the kernels (``offsets_E`` is ``torch._grouped_mm``'s int32 ``offs``).
MAX_ROWS = 2**31 - 1
#: Floating dtypes the kernels take (the interpreter has no bfloat16; the backend says so before it launches).
IO_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_tensor(name: str, t: object, *, shape: tuple | None = None, dtypes: tuple | None = None,
                 device: torch.device | None = None) -> None:
    """A launcher's input check: ``ValueError`` naming the field, the bad value and the expected one.

    ``shape`` gives each dimension's size, ``None`` for any size (the number of dimensions is always checked).
    """
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if shape is not None and (t.dim() != len(shape) or any(
            want is not None and want != got for want, got in zip(shape, t.shape, strict=True))):
        want = ", ".join("*" if d is None else str(d) for d in shape)
        raise ValueError(f"{name}: expected shape [{want}], got {list(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        raise ValueError(f"{name}: expected dtype {' or '.join(map(str, dtypes))}, got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{name}: expected device {device}, got {t.device}")


def check_act_code(act_code: int) -> None:
    if act_code not in ACTIVATION_CODES.values():
        raise ValueError(f"act_code: expected one of {sorted(ACTIVATION_CODES.values())} (ACTIVATION_CODES), "
                         f"got {act_code!r}")


def check_rows(name: str, num_rows: int) -> None:
    if num_rows > MAX_ROWS:
        raise ValueError(f"{name}: {num_rows} routed rows; the kernels index rows in int32 (at most {MAX_ROWS})")


def offsets_fit_int32(*operands: tuple[torch.Tensor, tuple[int, ...]]) -> bool:
    """True when, for every ``(tensor, dims)``, the largest offset reachable along ``dims`` (``sum (size-1) *
    |stride|``) fits int32: the kernels' ``OFFS64=False`` loops multiply those indices by their strides in int32.
    Row and expert offsets are int64 in every kernel and are not counted here."""
    limit = 2**31 - 1
    for t, dims in operands:
        if sum((t.shape[d] - 1) * abs(t.stride(d)) for d in dims if t.shape[d] > 0) > limit:
            return False
    return True


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def dot_precision(dtype: torch.dtype) -> str:
    # A float32 tl.dot defaults to tf32 on GPUs (~3e-4 relative error); keep float32 exact.
    return "ieee" if dtype == torch.float32 else "tf32"


def rows_bucket(R: int) -> int:
    """Autotune key for the routed-row count: a power of two, so a new token count rarely re-tunes."""
    return 1 << max(R - 1, 0).bit_length()


# Triton >= 3.4 can keep tuning results on disk (in TRITON_CACHE_DIR), keyed by the GPU target, the kernel source,
# the configs and the tuning-key values (our shape buckets): a new process then skips the first-call tuning.
_AUTOTUNE_CACHE_KWARGS = {"cache_results": True} if "cache_results" in inspect.signature(
    triton.autotune).parameters else {}


def autotune_enabled() -> bool:
    """``LEANMOE_AUTOTUNE=0`` turns tuning off: each kernel then runs the first (default) of its configs, with no
    tuning time and possibly a slower kernel than the tuned one. Read once, when the kernels are defined."""
    value = os.environ.get("LEANMOE_AUTOTUNE", "1")
    if value not in ("0", "1"):
        raise ValueError(f"LEANMOE_AUTOTUNE must be '0' or '1', got {value!r}")
    return value == "1"


#: Every autotuned kernel of this process with its full config list, for :func:`set_autotuning`.
_TUNED_KERNELS: list[tuple[Autotuner, list]] = []


def autotuned(kernel, configs, key):
    """``kernel`` autotuned over ``configs`` on GPUs, with the results cached on disk per GPU and shape bucket
    where Triton supports it (only the first config with ``LEANMOE_AUTOTUNE=0``); under the interpreter, the plain
    kernel (the caller passes a fixed small config) so tests do not benchmark."""
    if interpreting():
        return None
    tuned = triton.autotune(configs=configs if autotune_enabled() else configs[:1], key=key,
                            **_AUTOTUNE_CACHE_KWARGS)(kernel)
    if isinstance(tuned, Autotuner):
        _TUNED_KERNELS.append((tuned, list(configs)))
    return tuned


def set_autotuning(enabled: bool) -> None:
    """Tuning on or off from now on, in this process, for every autotuned kernel defined so far: what
    ``LEANMOE_AUTOTUNE`` chooses when the kernels are defined, switchable afterwards (tests run both ways in one
    process). Off, each kernel runs the first of its configs: with one config Triton's autotuner launches it
    without benchmarking (and without reading its tuning cache)."""
    for tuned, configs in _TUNED_KERNELS:
        tuned.configs = configs if enabled else configs[:1]


#: Row tiles per band of the tile order, for operands too large for L2 (see :func:`tile_coords`, :func:`group_m`).
GROUP_M = 8


def configs(shapes, *, pre_hook=None):
    """``(BM, BN, BK, warps, stages)`` tuples as Triton configs (``pre_hook`` runs before each launch with one)."""
    return [triton.Config({"BM": bm, "BN": bn, "BK": bk}, num_warps=w, num_stages=s, pre_hook=pre_hook)
            for bm, bn, bk, w, s in shapes]


@functools.cache
def _l2_bytes(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).L2_cache_size


def group_m(device: torch.device, streamed_bytes: int) -> int:
    """``GROUP_M`` for :func:`tile_coords`: bands of :data:`GROUP_M` row tiles when the per-expert operand that
    every row tile streams (``streamed_bytes``, the expert's weight matrix, say) exceeds half of L2, so that
    row-major order would read it from memory again for each row tile; else 1, row-major.

    Measured on an H100 (50 MB L2), Mixtral-8x7B's 117-235 MB expert matrices: forward 27.9 -> 20.8 ms with
    bands; Qwen3-30B-A3B's 3-6 MB ones: no gain (fwd+bwd 11.3 ms row-major, 12.1 ms banded). Derived from the
    shapes alone, so it is the same for every call in one autotuning bucket.
    """
    if device.type != "cuda":
        return 1
    index = device.index if device.index is not None else torch.cuda.current_device()
    return GROUP_M if streamed_bytes > _l2_bytes(index) // 2 else 1


# Under the interpreter every kernel runs with these blocks: large, so that few programs run (each nested jit call
# costs the interpreter about 1 ms).
INTERPRETER_META = {"BM": 64, "BN": 64, "BK": 64}


def launch_grouped(plain, tuned, num_n_of, R, E, args, meta):
    """Launches over an upper bound of ``ceil(R / BM) + E`` row tiles times the column tiles."""
    if tuned is None:
        meta = {**meta, **INTERPRETER_META}
        grid = ((triton.cdiv(R, meta["BM"]) + E) * num_n_of(meta["BN"]),)
        plain[grid](*args, **meta)
    else:
        tuned[lambda m: ((triton.cdiv(R, m["BM"]) + E) * num_n_of(m["BN"]),)](*args, **meta)


def e_p2(E: int) -> int:
    return max(triton.next_power_of_2(E), 2)


@triton.jit
def tile_coords(pid, num_m, num_n, GROUP_M: tl.constexpr):
    """Program ``pid`` -> (row tile, column tile), in bands of ``GROUP_M`` row tiles walked column by column.

    Row-major order (every column tile of one row tile, then the next row tile) streams the whole weight matrix
    of an expert once per row tile, and for a large expert (Mixtral's down projection: 117 MB) that misses L2 each
    time. In bands, the programs running together share GROUP_M row tiles of A and a few column tiles of B.
    """
    band = GROUP_M * num_n
    first_m = (pid // band) * GROUP_M
    band_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % band) % band_m
    pid_n = (pid % band) // band_m
    return pid_m, pid_n


@triton.jit
def expert_tile(pid_m, offsets_E_ptr, E, E_P2: tl.constexpr, BM: tl.constexpr):
    """Row tile ``pid_m`` of the expert-grouped schedule -> (expert, first sorted row, end row of that expert).

    ``expert == E`` marks a surplus program (more tiles were launched than exist); it must exit.
    """
    e_idx = tl.arange(0, E_P2)
    e_mask = e_idx < E
    ends = tl.load(offsets_E_ptr + e_idx, mask=e_mask, other=0)
    starts = tl.load(offsets_E_ptr + e_idx - 1, mask=e_mask & (e_idx > 0), other=0)
    tiles = tl.where(e_mask, (ends - starts + BM - 1) // BM, 0)
    tile_ends = tl.cumsum(tiles, 0)
    # Experts whose tiles all come before pid_m; with empty experts skipped, that is pid_m's expert.
    expert = tl.sum((tile_ends <= pid_m).to(tl.int32), 0)
    this = e_idx == expert
    first_tile = tl.sum(tl.where(this, tile_ends - tiles, 0), 0)
    row_start = tl.sum(tl.where(this, starts, 0), 0) + (pid_m - first_tile) * BM
    row_end = tl.sum(tl.where(this, ends, 0), 0)
    return expert, row_start, row_end


@triton.jit
def tile_rows(row_start, row_end, BM: tl.constexpr):
    """A row tile from :func:`expert_tile`'s bounds -> ``(rows [BM], row_mask [BM])``: its sorted rows, masked to
    the expert's own. (Called after the surplus programs' exit, so that they compute nothing more.)"""
    rows = row_start + tl.arange(0, BM)
    return rows, rows < row_end


@triton.jit
def tile_cols(pid_n, n_cols, BN: tl.constexpr):
    """Column tile ``pid_n`` -> ``(cols [BN], col_mask [BN])``, masked to ``n_cols``."""
    cols = pid_n * BN + tl.arange(0, BN)
    return cols, cols < n_cols


@triton.jit
def gate_up_tile(pid_n, sorted_tokens_ptr, rows, row_mask, I, BN: tl.constexpr, GATED: tl.constexpr,
                 INTERLEAVED: tl.constexpr):
    """A gate/up tile's operands: ``(tokens [BM] int64, cols [BN], col_mask, gate rows, up rows)``, the tokens
    the sorted rows gather x from and the ``gate_up_proj[e]`` rows of hidden columns ``cols`` (:func:`gate_up_rows`)."""
    tokens = tl.load(sorted_tokens_ptr + rows, mask=row_mask, other=0).to(tl.int64)
    cols, col_mask = tile_cols(pid_n, I, BN)
    g_rows, u_rows = gate_up_rows(cols, I, GATED, INTERLEAVED)
    return tokens, cols, col_mask, g_rows, u_rows


@triton.jit
def gate_up_rows(cols, I, GATED: tl.constexpr, INTERLEAVED: tl.constexpr):
    """Rows of ``gate_up_proj[e]`` holding the gate and up pre-activations of hidden columns ``cols``
    (non-gated: both are the column's own row)."""
    if GATED:
        if INTERLEAVED:
            return 2 * cols, 2 * cols + 1
        return cols, cols + I
    return cols, cols


@triton.jit
def gate_up_preact(acc_g, acc_u, x_rows, row_mask, w_base, b_base, g_rows, u_rows, col_mask, D, stride_xd,
                   stride_wd, stride_wn, stride_bn, GATED: tl.constexpr, HAS_BIAS: tl.constexpr,
                   DOT_PREC: tl.constexpr, BK: tl.constexpr, OFFS64: tl.constexpr, w_desc, g_row0, u_row0,
                   W_TMA: tl.constexpr):
    """fp32 gate and up pre-activations of one tile: ``acc_g`` / ``acc_u`` (``[BM, BN]`` fp32, the accumulators'
    start: zeros, or a LoRA term) plus ``x_rows`` (row pointers, gathered) times the expert's weight rows
    ``g_rows`` / ``u_rows`` (base ``w_base``), plus its bias (base ``b_base``); up stays as given when not
    ``GATED``. The forward and the recomputing backward share it, so both round the same sums.

    ``OFFS64`` (see :func:`offsets_fit_int32`): column offsets in int64, computed once per tile, the pointers
    stepping by ``BK`` columns (a transposed x has column stride T, so ``d * stride_xd`` can pass 2^31). Otherwise
    int32 offsets recomputed each step, which is the faster loop (fewer live 64-bit pointer registers).

    ``W_TMA``: the weight tiles come through ``w_desc``, a TMA descriptor over the weights as ``[E*N, D]`` with
    ``[BN, BK]`` blocks, at rows ``g_row0`` / ``u_row0`` (the tile's first gate / up row); x's rows stay pointer
    loads (they are gathered). A tile's rows past its expert's gate or up block only reach masked columns, and past
    ``E*N`` or D the descriptor reads zeros. Every path sums in the same order, so all give the same bits.
    """
    ks = tl.arange(0, BK)
    if W_TMA:
        for k0 in range(0, D, BK):
            kk = k0 + ks
            a = tl.load(x_rows + kk[None, :] * stride_xd, mask=row_mask[:, None] & (kk < D)[None, :], other=0.0)
            acc_g = tl.dot(a, w_desc.load([g_row0, k0]).T, acc_g, input_precision=DOT_PREC)
            if GATED:
                acc_u = tl.dot(a, w_desc.load([u_row0, k0]).T, acc_u, input_precision=DOT_PREC)
    elif OFFS64:
        ks64 = ks.to(tl.int64)
        g64 = g_rows.to(tl.int64)
        u64 = u_rows.to(tl.int64)
        a_ptrs = x_rows + ks64[None, :] * stride_xd
        wg_ptrs = w_base + ks64[:, None] * stride_wd + g64[None, :] * stride_wn
        wu_ptrs = w_base + ks64[:, None] * stride_wd + u64[None, :] * stride_wn
        a_step = tl.cast(stride_xd, tl.int64) * BK
        w_step = tl.cast(stride_wd, tl.int64) * BK
        for k0 in range(0, D, BK):
            k_mask = k0 + ks < D
            a = tl.load(a_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            w_mask = k_mask[:, None] & col_mask[None, :]
            wg = tl.load(wg_ptrs, mask=w_mask, other=0.0)
            acc_g = tl.dot(a, wg, acc_g, input_precision=DOT_PREC)
            if GATED:
                wu = tl.load(wu_ptrs, mask=w_mask, other=0.0)
                acc_u = tl.dot(a, wu, acc_u, input_precision=DOT_PREC)
                wu_ptrs += w_step
            a_ptrs += a_step
            wg_ptrs += w_step
    else:
        for k0 in range(0, D, BK):
            kk = k0 + ks
            k_mask = kk < D
            a = tl.load(x_rows + kk[None, :] * stride_xd, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            w_mask = k_mask[:, None] & col_mask[None, :]
            wg = tl.load(w_base + kk[:, None] * stride_wd + g_rows[None, :] * stride_wn, mask=w_mask, other=0.0)
            acc_g = tl.dot(a, wg, acc_g, input_precision=DOT_PREC)
            if GATED:
                wu = tl.load(w_base + kk[:, None] * stride_wd + u_rows[None, :] * stride_wn, mask=w_mask,
                             other=0.0)
                acc_u = tl.dot(a, wu, acc_u, input_precision=DOT_PREC)
    if HAS_BIAS:
        acc_g += tl.load(b_base + g_rows.to(tl.int64) * stride_bn, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        if GATED:
            acc_u += tl.load(b_base + u_rows.to(tl.int64) * stride_bn, mask=col_mask,
                             other=0.0).to(tl.float32)[None, :]
    return acc_g, acc_u


@triton.jit
def lora_addend(acc, lo_ptr, rows64, row_mask, lb_base, cols, col_mask, rank, stride_lor, stride_lbn, stride_lbr,
                DOT_PREC: tl.constexpr, RP: tl.constexpr):
    """``acc + lo[rows] @ lb[cols]^T``: a LoRA term of one tile, ``lo`` ``[R, rank]`` (sorted rows, already scaled)
    and ``lb`` (base ``lb_base``: one expert's ``[out, rank]`` factor) read at output columns ``cols``; the rank
    is padded to ``RP`` (a power of two, at least 16, for the MMA) with masked zeros."""
    rs = tl.arange(0, RP)
    r_mask = rs < rank
    lo = tl.load(lo_ptr + rows64[:, None] * stride_lor + rs[None, :], mask=row_mask[:, None] & r_mask[None, :],
                 other=0.0)
    lb = tl.load(lb_base + cols.to(tl.int64)[None, :] * stride_lbn + rs[:, None] * stride_lbr,
                 mask=r_mask[:, None] & col_mask[None, :], other=0.0)
    return tl.dot(lo, lb, acc, input_precision=DOT_PREC)


def lora_rank_block(rank: int) -> int:
    """``RP`` for :func:`lora_addend`: the rank padded to a power of two of at least 16 (``tl.dot``'s minimum)."""
    return max(16, triton.next_power_of_2(max(rank, 1)))


@triton.jit
def expert_row_range(offsets_E_ptr, expert):
    """Sorted rows ``[start, end)`` of ``expert`` (``offsets_E`` holds each expert's end)."""
    start = tl.load(offsets_E_ptr + expert - 1, mask=expert > 0, other=0)
    end = tl.load(offsets_E_ptr + expert)
    return start, end


@triton.jit
def source_rows(rows_ptr, rows, r_mask, GATHER: tl.constexpr):
    """int64 rows of an operand for sorted positions ``rows``: gathered through ``rows_ptr`` (token order) or the
    positions themselves (an operand already in expert order)."""
    if GATHER:
        return tl.load(rows_ptr + rows, mask=r_mask, other=0).to(tl.int64)
    return rows.to(tl.int64)


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _gelu_tanh_and_grad(a):
    z = _SQRT_2_OVER_PI * (a + _GELU_A * a * a * a)
    t = 2.0 * _sigmoid(2.0 * z) - 1.0  # tanh(z), in a form every Triton version has
    value = 0.5 * a * (1.0 + t)
    grad = 0.5 * (1.0 + t) + 0.5 * a * (1.0 - t * t) * _SQRT_2_OVER_PI * (1.0 + 3.0 * _GELU_A * a * a)
    return value, grad


@triton.jit
def _gelu_erf_and_grad(a):
    """``gelu(a) = 0.5 a (1 + erf(a / sqrt 2))``; its derivative ``0.5 (1 + erf(a / sqrt 2)) + a phi(a)``."""
    cdf = 0.5 * (1.0 + tl.math.erf(a * _SQRT_HALF))
    return a * cdf, cdf + a * _INV_SQRT_2PI * tl.exp(-0.5 * a * a)


@triton.jit
def _silu_and_grad(a):
    s = _sigmoid(a)
    return a * s, s * (1.0 + a * (1.0 - s))


@triton.jit
def activation_fwd(g, u, alpha, limit, ACT: tl.constexpr):
    """fp32 pre-activations -> fp32 hidden state. Gated: ``g`` gate, ``u`` up; non-gated: ``g`` only."""
    if ACT == ACT_SWIGLU:
        h = _silu_and_grad(g)[0] * u
    elif ACT == ACT_GEGLU:
        h = _gelu_tanh_and_grad(g)[0] * u
    elif ACT == ACT_GEGLU_EXACT:
        h = _gelu_erf_and_grad(g)[0] * u
    elif ACT == ACT_CLAMPED_SWIGLU:
        g_c = tl.minimum(g, limit)
        u_c = tl.minimum(tl.maximum(u, -limit), limit)
        h = (u_c + 1.0) * g_c * _sigmoid(alpha * g_c)
    elif ACT == ACT_RELU2:
        r = tl.maximum(g, 0.0)
        h = r * r
    elif ACT == ACT_GELU:
        h = _gelu_tanh_and_grad(g)[0]
    elif ACT == ACT_GELU_EXACT:
        h = _gelu_erf_and_grad(g)[0]
    else:
        tl.static_assert(ACT == ACT_SILU, "unknown activation code")
        h = _silu_and_grad(g)[0]
    return h


@triton.jit
def activation_bwd(g, u, dh, alpha, limit, ACT: tl.constexpr):
    """fp32 pre-activations and hidden-state gradient -> (h, dg, du); ``du`` is zero for non-gated activations.

    The clamp masks match ``torch.clamp``: the gradient passes where the value lies in the closed interval.
    """
    if ACT == ACT_SWIGLU:
        act, dact = _silu_and_grad(g)
        h, dg, du = act * u, dh * u * dact, dh * act
    elif ACT == ACT_GEGLU:
        act, dact = _gelu_tanh_and_grad(g)
        h, dg, du = act * u, dh * u * dact, dh * act
    elif ACT == ACT_GEGLU_EXACT:
        act, dact = _gelu_erf_and_grad(g)
        h, dg, du = act * u, dh * u * dact, dh * act
    elif ACT == ACT_CLAMPED_SWIGLU:
        g_c = tl.minimum(g, limit)
        u_c = tl.minimum(tl.maximum(u, -limit), limit)
        s = _sigmoid(alpha * g_c)
        h = (u_c + 1.0) * g_c * s
        dg = tl.where(g <= limit, dh * (u_c + 1.0) * (s + alpha * g_c * s * (1.0 - s)), 0.0)
        du = tl.where((u >= -limit) & (u <= limit), dh * g_c * s, 0.0)
    elif ACT == ACT_RELU2:
        r = tl.maximum(g, 0.0)
        h, dg, du = r * r, dh * 2.0 * r, 0.0 * dh
    elif ACT == ACT_GELU:
        act, dact = _gelu_tanh_and_grad(g)
        h, dg, du = act, dh * dact, 0.0 * dh
    elif ACT == ACT_GELU_EXACT:
        act, dact = _gelu_erf_and_grad(g)
        h, dg, du = act, dh * dact, 0.0 * dh
    else:
        tl.static_assert(ACT == ACT_SILU, "unknown activation code")
        act, dact = _silu_and_grad(g)
        h, dg, du = act, dh * dact, 0.0 * dh
    return h, dg, du
