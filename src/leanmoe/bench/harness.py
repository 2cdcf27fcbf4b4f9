"""Verify-then-time harness for one MoE expert layer, as ``docs/BENCHMARK_PROTOCOL.md`` prescribes.

Legend: T tokens, D model dim, I expert hidden dim, N gate/up rows (2I gated, I otherwise), E experts, K top-k,
R routed rows (T*K), r routed rows of one expert chunk.

For each case (preset, routing, T):
1. build the problem on the device (:func:`make_case`): x, the seeded routing, weights, biases, a fixed random dy
   and, with a mask fraction, a fixed random token mask (masked tokens take no routed rows: FLOPs and bytes count
   the kept tokens only, and the reference check applies the same mask; their x rows are NaN, so a leak fails);
2. for each backend and mode, ask the registry whether the backend can run the call; if not the row says
   ``unsupported`` with the registry's reason (on the CPU, a backend that only runs in the Triton interpreter, or
   that ``auto`` would pass over, is ``skipped`` unless named);
3. check (:func:`check_backend`): run it once and compare its output (``fwd``) or its output and every gradient
   (``fwdbwd``: x, routing weights, every expert weight and bias) with the reference backend computed in fp32 from
   the same upcast inputs; a backend over the dtype's tolerance is ``FAILED`` and not timed;
4. time (:func:`time_ms`): ``triton.testing.do_bench(..., return_mode="median")`` on CUDA, the median of
   ``perf_counter`` timings after a short warm-up on the CPU; ``fwd`` under ``torch.no_grad()``, ``fwdbwd`` the
   forward and ``y.backward(dy)`` with every gradient reset to ``None`` between runs;
5. memory (CUDA only, :func:`peak_extra_bytes`): peak extra memory of one call; for ``fwdbwd`` also that minus the
   weight-gradient bytes (activation memory).

The fp32 reference runs one chunk of experts at a time (its routed rows as a K=1 problem), so the fp32 copies of all
experts' weights and gradients are never resident together: at DeepSeek-V3 size they would need ~90 GB.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import statistics
import time
from collections.abc import Callable, Iterator

import torch

from leanmoe.bench.presets import DECODE_TOKENS, Preset, flops
from leanmoe.bench.routing import make_routing
from leanmoe.experts import (
    ExpertsCall,
    available_backends,
    describe_call,
    get_backend,
    moe_experts,
    select_backend,
)
from leanmoe.experts.autoselect import graph_replay
from leanmoe.testing import TOLERANCES_VS_FP32_REFERENCE, Problem

#: Relative-error tolerance ``||out - ref|| / ||ref||`` per dtype against the fp32 reference (leanmoe.testing).
TOLERANCES = TOLERANCES_VS_FP32_REFERENCE

#: Bytes of fp32 expert weights upcast at once by the chunked reference.
REFERENCE_CHUNK_BYTES = 1 << 30

CPU_WARMUP_RUNS, CPU_MIN_RUNS, CPU_MAX_RUNS, CPU_TIME_BUDGET_S = 2, 5, 50, 1.0

#: Bytes of the copy that a decode run's bandwidth is compared with: larger than any cache, on each device.
COPY_BYTES = {"cuda": 1 << 30, "cpu": 1 << 28}

#: Memory figures are in MiB (the ``*_mem_mb`` row keys, like transformers' and leanmoe.bench.hf's).
MIB = 2**20

PARAM_NAMES = ("gate_up_proj", "down_proj", "gate_up_bias", "down_bias")


@dataclasses.dataclass(kw_only=True)
class Case(Problem):
    """One benchmark problem: a :class:`leanmoe.testing.Problem` (tensors on the device, every differentiable one a
    leaf that requires grad; activation and layout the preset's) with its preset, routing name and output gradient
    ``dy_TD [T, D]``."""

    preset: Preset
    routing: str
    dy_TD: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return self.x_TD.shape[0]

    @property
    def kept_tokens(self) -> int:
        return self.num_tokens if self.token_mask_T is None else int(self.token_mask_T.sum())

    @property
    def mask_kwargs(self) -> dict:
        # Passed only when there is a mask, so an unmasked run makes the call it always made.
        return {} if self.token_mask_T is None else {"token_mask": self.token_mask_T}

    def params(self) -> dict[str, torch.Tensor]:
        """Expert weights and biases by name (biases only when the preset has them)."""
        named = {name: getattr(self, name) for name in PARAM_NAMES}
        return {name: t for name, t in named.items() if t is not None}

    def leaves(self) -> dict[str, torch.Tensor]:
        """Every tensor that gets a gradient, by the name its gradient is reported under (without ``grad_``)."""
        return {"x": self.x_TD, "topk_weights": self.topk_weights_TK, **self.params()}

    def clear_grads(self) -> None:
        for t in self.leaves().values():
            t.grad = None

    def weight_grad_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.params().values())

    def touched_weight_bytes(self) -> int:
        """Bytes of the expert weights that the kept tokens' routing touches: each active expert's weights once."""
        ids_TK = self.topk_ids_TK if self.token_mask_T is None else self.topk_ids_TK[self.token_mask_T]
        active_experts = int(torch.unique(ids_TK).numel())
        return active_experts * self.preset.expert_bytes(self.gate_up_proj.element_size())

    def call(self, backend: str, save_percent: float) -> torch.Tensor:
        # Ids come from the routing generator, so they are in range: no host-syncing id check while timing.
        return moe_experts(*self.args(), **self.kwargs(), backend=backend, save_percent=save_percent,
                           check_ids=False)

    def describe(self, mode: str, save_percent: float):
        with torch.set_grad_enabled(mode == "fwdbwd"):
            return describe_call(*self.args(), **self.kwargs(), save_percent=save_percent)


def make_token_mask(num_tokens: int, mask_fraction: float, *, seed: int = 0, device: torch.device | str = "cpu"
                    ) -> torch.Tensor | None:
    """``[T]`` bool (True = keep) masking ``floor(mask_fraction * T)`` tokens picked at random from ``seed`` on the CPU
    (the same mask on every device); None when that masks nothing. ``mask_fraction`` in ``[0, 1)``, so a token is
    always kept."""
    if not 0 <= mask_fraction < 1:
        raise ValueError(f"mask_fraction must be in [0, 1), got {mask_fraction}")
    num_masked = math.floor(mask_fraction * num_tokens)
    if num_masked == 0:
        return None
    gen = torch.Generator().manual_seed(seed + 1)  # not the routing's stream, so the mask is not tied to it
    keep_T = torch.ones(num_tokens, dtype=torch.bool)
    keep_T[torch.randperm(num_tokens, generator=gen)[:num_masked]] = False
    return keep_T.to(device)


def make_case(preset: Preset, routing: str, num_tokens: int, *, dtype: torch.dtype, device: torch.device,
              seed: int = 0, mask_fraction: float = 0.0) -> Case:
    """Random inputs at unit scale (weights ~ N(0, 1/fan_in), biases ~ N(0, 0.01)), reproducible from ``seed``;
    ``mask_fraction`` of the tokens masked (:func:`make_token_mask`), their x rows NaN."""
    T, D, E, K = num_tokens, preset.dim, preset.num_experts, preset.top_k
    hidden = preset.hidden_dim
    N = 2 * hidden if preset.gated else hidden
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape: int, scale: float = 1.0, leaf: bool = True) -> torch.Tensor:
        t = torch.randn(*shape, generator=gen, device=device, dtype=dtype)
        if scale != 1.0:
            t.mul_(scale)
        return t.requires_grad_(leaf)

    topk_ids_TK, topk_weights_TK = make_routing(T, E, K, routing, seed=seed, device=device, dtype=dtype)
    x_TD = randn(T, D, leaf=False)
    token_mask_T = make_token_mask(T, mask_fraction, seed=seed, device=device)
    if token_mask_T is not None:
        # Padding often holds garbage: a masked row must not reach any output or gradient, so a backend that
        # computes it and zeroes it afterwards gives NaN and fails the check.
        x_TD[~token_mask_T] = float("nan")
    return Case(
        preset=preset,
        routing=routing,
        x_TD=x_TD.requires_grad_(),
        topk_ids_TK=topk_ids_TK,
        topk_weights_TK=topk_weights_TK.requires_grad_(),
        gate_up_proj=randn(E, N, D, scale=D ** -0.5),
        down_proj=randn(E, D, hidden, scale=hidden ** -0.5),
        gate_up_bias=randn(E, N, scale=0.1) if preset.bias else None,
        down_bias=randn(E, D, scale=0.1) if preset.bias else None,
        activation=preset.activation,
        gate_up_layout=preset.gate_up_layout,
        dy_TD=randn(T, D, leaf=False),
        token_mask_T=token_mask_T,
    )


# ----------------------------------------------------------------------------------------------------- support


def unsupported(case: Case, backend: str, mode: str, save_percent: float, *, named: bool
                ) -> tuple[str, str] | None:
    """``("unsupported" | "skipped", reason)`` when ``backend`` is not to run this case, else ``None``.

    ``unsupported``: the registry says the backend cannot run the call. ``skipped``: on the CPU, a backend not named
    on the command line that ``auto`` would pass over, or that needs triton (it would run in the interpreter).
    """
    return call_unsupported(case.describe(mode, save_percent), backend, named=named)


def call_unsupported(call: ExpertsCall, backend: str, *, named: bool) -> tuple[str, str] | None:
    """:func:`unsupported` for a described call (no tensors needed)."""
    reason = unsupported_reason(backend, call)
    if reason is not None:
        return "unsupported", reason
    if named or call.device.type != "cpu":
        return None
    reason = _cpu_pass_over_reason(backend, call)
    if reason is not None:
        return "skipped", f"{reason} (not run on the CPU unless named: --backend {backend})"
    return None


def _cpu_pass_over_reason(backend: str, call: ExpertsCall) -> str | None:
    impl = get_backend(backend)
    reason = impl.auto_unsupported_reason(call)
    if reason is None and "triton" in impl.requires:
        reason = "it would run in the Triton interpreter"
    return reason


def cpu_default_backends(backends: list[str], calls: list[ExpertsCall]) -> tuple[list[str], dict[str, str]]:
    """Splits the default ``backends`` of a CPU run into those that run some of ``calls`` and those left out, with
    the reason for each one left out (the first call's). A backend that needs triton is left out: on the CPU it runs
    only in the Triton interpreter, a correctness tool far too slow to time."""
    kept, left_out = [], {}
    for backend in backends:
        reasons = [call_unsupported(call, backend, named=False) for call in calls]
        given = [r for r in reasons if r is not None]
        if calls and len(given) == len(reasons):
            status, reason = given[0]
            if "triton" in get_backend(backend).requires:
                reason = "needs a CUDA GPU (on the CPU, Triton kernels run only in its interpreter, too slow to time)"
            elif status == "skipped":
                reason = _cpu_pass_over_reason(backend, calls[0]) or reason
            left_out[backend] = reason
        else:
            kept.append(backend)
    return kept, left_out


def unsupported_reason(backend: str, call: ExpertsCall) -> str | None:
    """The registry's reason why ``backend`` cannot run ``call`` (missing package, dtype, device, shape), or None."""
    try:
        select_backend(backend, call)
    except ValueError as exc:
        prefix = f"backend {backend!r} cannot run this call: "
        message = str(exc)
        return message[len(prefix):] if message.startswith(prefix) else message
    return None


# ------------------------------------------------------------------------------------------------------- check


def run_once(case: Case, backend: str, mode: str, save_percent: float) -> dict[str, torch.Tensor]:
    """One call: ``{"out": y}`` for ``fwd``; for ``fwdbwd`` also ``grad_<leaf>`` for every leaf (zeros when the
    backend left a gradient unset, so a missing gradient fails the check instead of passing it)."""
    case.clear_grads()
    if mode == "fwd":
        with torch.no_grad():
            return {"out": case.call(backend, save_percent)}
    y_TD = case.call(backend, save_percent)
    y_TD.backward(case.dy_TD)
    outs = {"out": y_TD.detach()}
    for name, t in case.leaves().items():
        outs[f"grad_{name}"] = t.grad if t.grad is not None else torch.zeros_like(t)
    case.clear_grads()
    return outs


@contextlib.contextmanager
def _ieee_fp32(device: torch.device) -> Iterator[None]:
    """fp32 matmuls in true fp32 (no TF32) on CUDA, whatever the process set."""
    if device.type != "cuda":
        yield
        return
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):
        old = matmul.fp32_precision
        matmul.fp32_precision = "ieee"
        try:
            yield
        finally:
            matmul.fp32_precision = old
    else:
        old_tf32 = matmul.allow_tf32
        matmul.allow_tf32 = False
        try:
            yield
        finally:
            matmul.allow_tf32 = old_tf32


def _check_shape(name: str, out: torch.Tensor, expected: tuple[int, ...]) -> None:
    if tuple(out.shape) != tuple(expected):
        raise ValueError(f"{name} has shape {list(out.shape)}, expected {list(expected)}")


def _squared_norms(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """``(||out - ref||^2, ||ref||^2)``; NaN in ``out`` gives a NaN error, which never passes."""
    diff = torch.linalg.vector_norm(out.float() - ref).item()
    return diff * diff, torch.linalg.vector_norm(ref).item() ** 2


def _relative(sq_err: float, sq_ref: float) -> float:
    return math.sqrt(sq_err / sq_ref) if sq_ref > 0 else math.sqrt(sq_err)


def reference_errors(case: Case, outs: dict[str, torch.Tensor], *, chunk_bytes: int = REFERENCE_CHUNK_BYTES
                     ) -> dict[str, float]:
    """Relative error ``||out - ref|| / ||ref||`` of each tensor in ``outs`` (see :func:`run_once`) against the
    reference backend in fp32 on the upcast inputs. Gradients are checked when ``outs`` has them. Masked tokens'
    rows are left out of the reference: their output, their x gradient and their routing-weight gradients are 0."""
    preset = case.preset
    with_grads = "grad_x" in outs
    T, K = case.topk_ids_TK.shape
    E = preset.num_experts
    experts_per_chunk = max(1, chunk_bytes // preset.expert_bytes(4))
    device = case.x_TD.device

    _check_shape("out", outs["out"], case.x_TD.shape)
    if with_grads:
        for name, t in case.leaves().items():
            _check_shape(f"grad_{name}", outs[f"grad_{name}"], t.shape)

    ids_R = case.topk_ids_TK.reshape(-1)
    keep_R = None if case.token_mask_T is None else case.token_mask_T[:, None].expand(T, K).reshape(-1)
    x_TD = case.x_TD.detach().float()
    weights_R = case.topk_weights_TK.detach().float().reshape(-1)
    dy_TD = case.dy_TD.float()
    ref_y_TD = torch.zeros(T, preset.dim, device=device)
    ref_grad_x_TD = torch.zeros_like(ref_y_TD) if with_grads else None
    ref_grad_weights_R = torch.zeros(T * K, device=device) if with_grads else None
    sq_param = {name: [0.0, 0.0] for name in case.params()}

    with _ieee_fp32(device):
        for e0 in range(0, E, experts_per_chunk):
            e1 = min(E, e0 + experts_per_chunk)
            ref_params = {name: t.detach()[e0:e1].float().requires_grad_(with_grads)
                          for name, t in case.params().items()}
            in_chunk_R = (ids_R >= e0) & (ids_R < e1)
            rows_r = torch.nonzero(in_chunk_R if keep_R is None else in_chunk_R & keep_R).squeeze(1)
            if rows_r.numel():
                tokens_r = torch.div(rows_r, K, rounding_mode="floor")
                x_rD = x_TD.index_select(0, tokens_r).requires_grad_(with_grads)
                weights_r1 = weights_R.index_select(0, rows_r).unsqueeze(1).requires_grad_(with_grads)
                ids_r1 = (ids_R.index_select(0, rows_r) - e0).unsqueeze(1)
                with torch.set_grad_enabled(with_grads):
                    y_rD = moe_experts(x_rD, ids_r1, weights_r1, ref_params["gate_up_proj"], ref_params["down_proj"],
                                       ref_params.get("gate_up_bias"), ref_params.get("down_bias"),
                                       activation=preset.activation, gate_up_layout=preset.gate_up_layout,
                                       backend="reference", check_ids=False)
                ref_y_TD.index_add_(0, tokens_r, y_rD.detach())
                if with_grads:
                    y_rD.backward(dy_TD.index_select(0, tokens_r))
                    assert x_rD.grad is not None and weights_r1.grad is not None  # leaves of this backward
                    assert ref_grad_x_TD is not None and ref_grad_weights_R is not None  # with_grads
                    ref_grad_x_TD.index_add_(0, tokens_r, x_rD.grad)
                    ref_grad_weights_R[rows_r] = weights_r1.grad.squeeze(1)
                del x_rD, weights_r1, y_rD
            if with_grads:
                for name, ref_param in ref_params.items():
                    ref_grad = ref_param.grad if ref_param.grad is not None else torch.zeros_like(ref_param)
                    sq_err, sq_ref = _squared_norms(outs[f"grad_{name}"][e0:e1], ref_grad)
                    sq_param[name][0] += sq_err
                    sq_param[name][1] += sq_ref
            del ref_params

    errors = {"out": _relative(*_squared_norms(outs["out"], ref_y_TD))}
    if with_grads:
        assert ref_grad_x_TD is not None and ref_grad_weights_R is not None
        errors["grad_x"] = _relative(*_squared_norms(outs["grad_x"], ref_grad_x_TD))
        errors["grad_topk_weights"] = _relative(*_squared_norms(outs["grad_topk_weights"].reshape(-1),
                                                                ref_grad_weights_R))
        for name, (sq_err, sq_ref) in sq_param.items():
            errors[f"grad_{name}"] = _relative(sq_err, sq_ref)
    return errors


def worst_error(errors: dict[str, float]) -> tuple[str, float]:
    """The tensor with the largest error; NaN counts as the worst."""
    name = max(errors, key=lambda n: math.inf if math.isnan(errors[n]) else errors[n])
    return name, errors[name]


# ------------------------------------------------------------------------------------------------ time, memory


def time_ms(fn: Callable[[], object], device: torch.device, grad_to_none: list[torch.Tensor] | None = None
            ) -> float:
    """Median time of ``fn`` in ms: ``triton.testing.do_bench`` on CUDA; on the CPU a median of ``perf_counter``
    timings after ``CPU_WARMUP_RUNS`` runs, ``CPU_MIN_RUNS`` to ``CPU_MAX_RUNS`` runs within ``CPU_TIME_BUDGET_S``."""
    if device.type == "cuda":
        import triton.testing  # checked by the CLI before any case runs

        return float(triton.testing.do_bench(fn, grad_to_none=grad_to_none, return_mode="median"))

    def clear() -> None:
        for t in grad_to_none or ():
            t.grad = None

    for _ in range(CPU_WARMUP_RUNS):
        clear()
        fn()
    times_s: list[float] = []
    start = time.perf_counter()
    while len(times_s) < CPU_MIN_RUNS or (len(times_s) < CPU_MAX_RUNS
                                          and time.perf_counter() - start < CPU_TIME_BUDGET_S):
        clear()
        t0 = time.perf_counter()
        fn()
        times_s.append(time.perf_counter() - t0)
    clear()
    return statistics.median(times_s) * 1e3


#: A variant of an A/B run: sets itself up (switches, environment) and returns the timed function and the tensors
#: whose gradients are cleared between runs (None: none).
Setup = Callable[[], "tuple[Callable[[], object], list[torch.Tensor] | None]"]


def time_interleaved(variants: dict[str, Setup], device: torch.device, rounds: int = 3
                     ) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Every variant timed in turn (:func:`time_ms`), ``rounds`` times over, so that a drift of the machine reaches
    each alike: ``(median ms per variant, each round's ms per variant)``."""
    runs: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, setup in variants.items():
            fn, grads = setup()
            runs[name].append(time_ms(fn, device, grad_to_none=grads))
    return {name: statistics.median(ms) for name, ms in runs.items()}, runs


def time_row(row: dict, fn: Callable[[], object], device: torch.device, *, cuda_graphs: bool,
             grad_to_none: list[torch.Tensor] | None = None) -> float | None:
    """:func:`time_ms` of ``fn``, or with ``cuda_graphs`` of its :func:`~leanmoe.experts.autoselect.graph_replay`;
    None when capture fails, the row then marked ``FAILED`` with the reason (never timed eagerly instead)."""
    if not cuda_graphs:
        return time_ms(fn, device, grad_to_none=grad_to_none)
    try:
        replay = graph_replay(fn, device)
    except Exception as exc:  # noqa: BLE001 - reported in the row, as a failed check is
        row.update(status="FAILED", reason=f"CUDA graph capture failed: {type(exc).__name__}: {exc}"[:300])
        return None
    return time_ms(replay, device)  # the graph, and its memory pool, go with ``replay`` on return


def peak_extra_bytes(fn: Callable[[], object], device: torch.device) -> int | None:
    """``max_memory_allocated`` during one call of ``fn`` minus ``memory_allocated`` just before; ``None`` off CUDA."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def step_fn(case: Case, backend: str, mode: str, save_percent: float) -> Callable[[], None]:
    """The timed work of one mode."""
    if mode == "fwd":
        def fwd() -> None:
            with torch.no_grad():
                case.call(backend, save_percent)
        return fwd

    def fwdbwd() -> None:
        case.call(backend, save_percent).backward(case.dy_TD)
    return fwdbwd


def dense_matmul_tflops(device: torch.device, n: int = 8192) -> float:
    """TFLOP/s of a bf16 ``n x n x n`` ``torch.matmul`` (the protocol's dense reference; CUDA only)."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    ms = time_ms(lambda: torch.matmul(a, b), device)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def copy_gbps(device: torch.device, nbytes: int | None = None) -> float:
    """GB/s (bytes read + written) of a copy of ``nbytes`` within the device (the decode reference), by default
    :data:`COPY_BYTES` of the device's type."""
    nbytes = COPY_BYTES.get(device.type, 1 << 28) if nbytes is None else nbytes
    src = torch.zeros(nbytes, dtype=torch.uint8, device=device)
    dst = torch.zeros_like(src)
    ms = time_ms(lambda: dst.copy_(src), device)
    return 2 * nbytes / (ms * 1e-3) / 1e9


# ------------------------------------------------------------------------------------------------------ the run


@dataclasses.dataclass(frozen=True, kw_only=True)
class BenchPlan:
    """What one ``leanmoe bench`` / ``leanmoe verify`` run measures."""

    presets: list[Preset]
    backends: list[str]
    #: Backends named on the command line (run even where ``auto`` would pass them over on the CPU).
    named_backends: frozenset[str]
    modes: list[str]
    routings: list[str]
    #: Token counts to run each preset at; None: the decode table's (:data:`DECODE_TOKENS`) with ``decode``, else
    #: the preset's training T.
    tokens: tuple[int, ...] | None
    #: Forward only, with the touched weights' bandwidth against a copy on the device.
    decode: bool
    save_percent: float
    dtype: torch.dtype
    device: torch.device
    check_only: bool = False
    seed: int = 0
    #: Fraction of each case's tokens masked (``token_mask``), in ``[0, 1)``.
    mask_fraction: float = 0.0
    #: Time the forward as CUDA-graph replays (``graph_replay``; CUDA only): the decode table's default there.
    cuda_graphs: bool = False
    #: With a rank, the LoRA run of :mod:`leanmoe.bench.lora` (``backends`` are then LoRA backends or ``auto``).
    lora_rank: int | None = None

    def token_counts(self, preset: Preset) -> tuple[int, ...]:
        if self.tokens is not None:
            return self.tokens
        return DECODE_TOKENS if self.decode else (preset.train_tokens,)

    @property
    def tolerance(self) -> float:
        return TOLERANCES[self.dtype]


class Progress:
    """What the harness reports while it runs (see :mod:`leanmoe.bench.report` for the terminal versions)."""

    def start(self, total: int) -> None: ...

    def step(self, description: str) -> None: ...

    def done(self, description: str, result: str) -> None: ...

    def close(self) -> None: ...


def _base_row(plan: BenchPlan, case: Case, backend: str, mode: str) -> dict:
    p = case.preset
    return {
        "preset": p.name, "label": p.label, "dim": p.dim, "hidden_dim": p.hidden_dim, "num_experts": p.num_experts,
        "top_k": p.top_k, "activation": p.activation.name, "gate_up_layout": p.gate_up_layout, "bias": p.bias,
        "tokens": case.num_tokens, "mask_fraction": plan.mask_fraction, "kept_tokens": case.kept_tokens,
        "decode": plan.decode, "routing": case.routing, "mode": mode, "backend": backend,
        "save_percent": plan.save_percent, "dtype": str(plan.dtype).removeprefix("torch."),
        "device": plan.device.type, "status": None, "reason": None, "check_ok": None, "errors": None,
        "max_error": None,
        "tolerance": plan.tolerance, "ms": None, "tflops": None, "frac_dense": None, "weight_bytes": None,
        "gbps": None, "frac_copy": None, "peak_mem_mb": None, "act_mem_mb": None, "speedup_vs_grouped_mm": None,
        # LoRA runs only (leanmoe.bench.lora): the rank (0 on the no-adapter baseline row) and the baseline ratios.
        "lora_rank": None, "lora_alpha": None, "baseline_backend": None, "baseline_ms": None, "lora_ratio": None,
        "act_mem_ratio": None,
    }


def _result_text(row: dict) -> str:
    if row["status"] != "ok":
        return f"{row['status']}: {row['reason']}"
    if row["ms"] is None:
        return f"ok (max error {row['max_error']:.1e})"
    return f"ok {row['ms']:.3f} ms, {row['tflops']:.3g} TFLOP/s, max error {row['max_error']:.1e}"


def record_check(row: dict, errors: dict[str, float], tolerance: float) -> bool:
    """Puts a check's ``errors`` and worst error in ``row`` with its status (``ok``, or ``FAILED`` with the reason)
    and ``check_ok``; True when the row passed (every error within ``tolerance``; NaN fails)."""
    worst_name, worst = worst_error(errors)
    row.update(errors=errors, max_error=worst)
    if not worst <= tolerance:
        row.update(status="FAILED", check_ok=False,
                   reason=f"{worst_name} relative error {worst:.2e} > tolerance {tolerance:.0e}")
        return False
    row.update(status="ok", check_ok=True)
    return True


def _measure(plan: BenchPlan, case: Case, backend: str, mode: str, row: dict, dense_tflops: float | None,
             copy_rate_gbps: float | None) -> None:
    """Check, then (unless ``plan.check_only``) time and measure memory; fills ``row``."""
    outs = run_once(case, backend, mode, plan.save_percent)
    errors = reference_errors(case, outs)
    del outs
    if not record_check(row, errors, plan.tolerance) or plan.check_only:
        return
    fn = step_fn(case, backend, mode, plan.save_percent)
    leaves = list(case.leaves().values())
    ms = time_row(row, fn, plan.device, cuda_graphs=plan.cuda_graphs and mode == "fwd",
                  grad_to_none=leaves if mode == "fwdbwd" else None)
    if ms is None:
        return
    tflops = flops(case.preset, case.kept_tokens, mode) / (ms * 1e-3) / 1e12  # masked tokens cost no FLOPs
    row.update(ms=ms, tflops=tflops, frac_dense=tflops / dense_tflops if dense_tflops else None)
    if plan.decode and mode == "fwd":
        weight_bytes = case.touched_weight_bytes()
        gbps = weight_bytes / (ms * 1e-3) / 1e9
        row.update(weight_bytes=weight_bytes, gbps=gbps, frac_copy=gbps / copy_rate_gbps if copy_rate_gbps else None)
    case.clear_grads()
    peak = peak_extra_bytes(fn, plan.device)
    case.clear_grads()
    if peak is not None:
        row["peak_mem_mb"] = peak / MIB
        if mode == "fwdbwd":
            row["act_mem_mb"] = (peak - case.weight_grad_bytes()) / MIB


def run_plan(plan: BenchPlan, progress: Progress | None = None, *, dense_tflops: float | None = None,
             copy_rate_gbps: float | None = None, on_row: Callable[[list[dict]], None] | None = None) -> list[dict]:
    """Runs every (preset, T, routing, backend, mode) of ``plan``; one row per combination, in that order.

    ``on_row`` is called with the rows so far after each one (the CLI rewrites its JSON file, so a run cut short
    still leaves its results). With ``plan.lora_rank``, the LoRA run (:func:`leanmoe.bench.lora.run_lora_plan`)."""
    if plan.lora_rank is not None:
        from leanmoe.bench.lora import run_lora_plan  # here: leanmoe.bench.lora imports this module

        return run_lora_plan(plan, progress, on_row=on_row)
    progress = progress or Progress()
    cases = [(preset, T, routing) for preset in plan.presets for T in plan.token_counts(preset)
             for routing in plan.routings]
    progress.start(len(cases) * len(plan.backends) * len(plan.modes))
    rows: list[dict] = []
    try:
        for preset, T, routing in cases:
            case = make_case(preset, routing, T, dtype=plan.dtype, device=plan.device, seed=plan.seed,
                             mask_fraction=plan.mask_fraction)
            for backend in plan.backends:
                for mode in plan.modes:
                    masked = f" masked {plan.mask_fraction:.0%}" if case.token_mask_T is not None else ""
                    description = f"{preset.label} T={case.num_tokens}{masked} {routing} {mode} {backend}"
                    progress.step(description)
                    row = _base_row(plan, case, backend, mode)
                    skip = unsupported(case, backend, mode, plan.save_percent,
                                       named=backend in plan.named_backends)
                    if skip is not None:
                        row.update(status=skip[0], reason=skip[1])
                    else:
                        try:
                            _measure(plan, case, backend, mode, row, dense_tflops, copy_rate_gbps)
                        except Exception as exc:  # reported as FAILED in the table, and in the exit code
                            case.clear_grads()
                            row.update(status="FAILED", reason=f"{type(exc).__name__}: {exc}", ms=None)
                    rows.append(row)
                    progress.done(description, _result_text(row))
                    if on_row is not None:
                        add_speedups(rows)
                        on_row(rows)
            del case  # freed before the next case is built
            if plan.device.type == "cuda":
                torch.cuda.empty_cache()
    finally:
        progress.close()
    add_speedups(rows)
    return rows


def add_speedups(rows: list[dict]) -> None:
    """Sets ``speedup_vs_grouped_mm`` (grouped_mm's time over the row's) where grouped_mm and another backend timed
    the same case (grouped_mm alone would only say 1.00)."""
    baseline, others = {}, set()
    for row in rows:
        if row["backend"] == "grouped_mm" and row["ms"]:
            baseline[_case_key(row)] = row["ms"]
        elif row["ms"]:
            others.add(_case_key(row))
    for row in rows:
        base = baseline.get(_case_key(row))
        if base and row["ms"] and _case_key(row) in others:
            row["speedup_vs_grouped_mm"] = base / row["ms"]


def _case_key(row: dict) -> tuple:
    return row["label"], row["tokens"], row["routing"], row["mode"]


def default_backends() -> list[str]:
    """Every registered backend but the reference (always run for the check; timed only when named)."""
    return [name for name in available_backends() if name != "reference"]


def describe_preset(preset: Preset, num_tokens: int, *, dtype: torch.dtype, device: torch.device,
                    requires_grad: bool, save_percent: float = 0) -> ExpertsCall:
    """The registry's description of a call at ``preset``'s shape, without allocating its tensors."""
    return ExpertsCall(device=device, dtype=dtype, num_tokens=num_tokens, dim=preset.dim,
                       hidden_dim=preset.hidden_dim, num_experts=preset.num_experts, top_k=preset.top_k,
                       activation=preset.activation, gate_up_layout=preset.gate_up_layout,
                       has_gate_up_bias=preset.bias, has_down_bias=preset.bias, save_percent=save_percent,
                       requires_grad=requires_grad)
