"""The Triton backend against the reference loop: the edge battery at small shapes, on the CPU under the Triton
interpreter (``TRITON_INTERPRET=1``, set by conftest when there is no GPU) in float32 and float16, and compiled on a
GPU (``-m gpu``) with autotuning on and off, where the float32 cases run in bfloat16 (the interpreter has none).
Real model sizes on the GPU: ``test_triton_gpu.py``.

Legend: T tokens, D model dim, I expert hidden dim, E experts, K top-k.
Every test compares the forward and every gradient (x, routing weights, both weights, both biases) with fresh random
inputs; ``torch.empty`` is NaN-poisoned by conftest, so a row a kernel forgets to write fails.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from leanmoe import Activation, describe_call, moe_experts
from leanmoe.experts.registry import ExpertsCall, get_backend, select_backend
from tests.helpers import TOLERANCES, assert_close, assert_deterministic, make_problem

pytest.importorskip("triton")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

import leanmoe.experts.triton as triton_backend  # noqa: E402
from leanmoe.kernels.moe_common import tile_coords  # noqa: E402

ON_GPU = torch.cuda.is_available()
# Tests of the interpreter itself (its block sizes, CPU backend selection): conftest sets it on CPU-only machines.
interpreter_only = pytest.mark.skipif(ON_GPU, reason="the interpreter runs on CPU-only machines")


@dataclasses.dataclass(frozen=True)
class Target:
    """Where the battery runs: ``cpu`` (the interpreter) or ``cuda`` (compiled), and the dtype a case runs in."""

    device: str

    def dtype(self, cpu_dtype: torch.dtype) -> torch.dtype:
        return torch.bfloat16 if self.device == "cuda" and cpu_dtype == torch.float32 else cpu_dtype


@pytest.fixture(params=[pytest.param("interpreter", id="interp", marks=interpreter_only),
                        pytest.param(True, id="gpu_tuned", marks=pytest.mark.gpu),
                        pytest.param(False, id="gpu_untuned", marks=pytest.mark.gpu)])
def target(request):
    """The interpreter on the CPU, or the GPU with autotuning on or off: ``LEANMOE_AUTOTUNE`` is read once, when
    the kernels are defined, so the kernels' config lists are switched for the test and set back after it."""
    if request.param == "interpreter":
        yield Target("cpu")
        return
    import leanmoe.kernels.moe_bwd  # noqa: F401  (defines the autotuned kernels before they are switched)
    import leanmoe.kernels.moe_fwd  # noqa: F401
    from leanmoe.kernels import moe_common

    moe_common.set_autotuning(request.param)
    yield Target("cuda")
    moe_common.set_autotuning(moe_common.autotune_enabled())

@dataclasses.dataclass(frozen=True)
class Engine:
    """The backward engine a test runs (``leanmoe.kernels.policy.backward_engine``): ``fused`` or ``split``."""

    name: str

    def skip_unsupported(self, dtype: torch.dtype, device: str) -> None:
        # torch._grouped_mm on CUDA takes bfloat16 only: the split engine's float16 cases run on the CPU.
        if self.name == "split" and device == "cuda" and dtype != torch.bfloat16:
            pytest.skip("the split engine runs bfloat16 on CUDA")


@pytest.fixture(params=["fused", "split"])
def engine(request):
    """Both backward engines, forced for the test (``auto`` picks split on Hopper GPUs, fused on the CPU)."""
    from leanmoe.kernels import policy

    policy.set_backward_engine(request.param)
    yield Engine(request.param)
    policy.set_backward_engine(None)


GRAD_NAMES = ["dx", "dweights", "dgate_up_proj", "ddown_proj", "dgate_up_bias", "ddown_bias"]

# A clamp limit small enough that clamped_swiglu's clamps are hit by N(0, 1)-ish pre-activations (and not a
# multiple of 1/8, so no pre-activation of on_exact_grid's problems lies on it).
CLAMPED = Activation(name="clamped_swiglu", alpha=1.702, limit=0.8)


def on_exact_grid(problem):
    """In bfloat16/float16, a clamped activation's inputs moved onto a coarse grid, in place: x in {0, ±1/2}, gate/up
    weights in {0, ±1/4}, biases multiples of 1/8. Every gate/up pre-activation is then a multiple of 1/8 with at
    most 8 significant bits, exact in fp32 and in the I/O dtype however it is summed, so the kernel and the reference
    see the same values. On random inputs a pre-activation within an ulp of the limit may round to either side of
    it in the two, flipping the clamp's 0/1 derivative for that element (dx errors of 10% of max|dx| in bf16); the
    fp32 interpreter runs cover the clamps on random inputs."""
    if problem.activation.name != "clamped_swiglu" or problem.x_TD.dtype == torch.float32:
        return problem

    def grid(t, step, levels):  # drawn from the per-test seeded default generator
        values = torch.randint(-levels, levels + 1, t.shape).to(t.dtype) * step
        with torch.no_grad():
            t.copy_(values.to(t.device))

    grid(problem.x_TD, 0.5, 1)
    grid(problem.gate_up_proj, 0.25, 1)
    if problem.gate_up_bias is not None:
        grid(problem.gate_up_bias, 0.125, 2)
    return problem


def run_both(problem, *, save_percent=0.0, tol=None, backend="triton"):
    """Runs the reference and ``backend`` with the same ``dy``; compares y and every gradient."""
    on_exact_grid(problem)
    dtype = problem.x_TD.dtype
    tol = tol or TOLERANCES[dtype]
    ref_y = moe_experts(*problem.args(), **problem.kwargs(), backend="reference")
    out_y = moe_experts(*problem.args(), **problem.kwargs(), backend=backend, save_percent=save_percent)
    assert out_y.dtype == ref_y.dtype
    assert_close(out_y, ref_y, tol=tol, name="y")
    dy = torch.randn_like(ref_y)
    inputs = problem.inputs()
    ref_grads = torch.autograd.grad(ref_y, inputs, dy)
    out_grads = torch.autograd.grad(out_y, inputs, dy)
    names = [n for n, t in zip(GRAD_NAMES, [problem.x_TD, problem.topk_weights_TK, problem.gate_up_proj,
                                            problem.down_proj, problem.gate_up_bias, problem.down_bias], strict=True)
             if t is not None]
    for name, out_g, ref_g in zip(names, out_grads, ref_grads, strict=True):
        assert out_g.dtype == ref_g.dtype, name
        assert_close(out_g, ref_g, tol=tol, name=name)
    return out_y, out_grads


ACTIVATION_CASES = [
    ("swiglu", "concatenated"), ("swiglu", "interleaved"),
    ("geglu", "concatenated"), ("geglu", "interleaved"),
    (CLAMPED, "concatenated"), (CLAMPED, "interleaved"),
    ("relu2", "concatenated"), ("gelu", "concatenated"), ("silu", "concatenated"),
    # erf GELU beside the tanh one: the two differ by ~1e-3, far above the fp32 tolerance, so a swap fails.
    ("geglu_exact", "concatenated"), ("geglu_exact", "interleaved"), ("gelu_exact", "concatenated"),
]


def _act_id(case):
    act, layout = case
    return f"{act if isinstance(act, str) else act.name}-{layout[:6]}"


# float16 (no biases) on a subset: both layouts, the clamps, one non-gated activation of each kind, erf GELU.
FP16_CASES = [ACTIVATION_CASES[i] for i in (0, 1, 5, 6, 8, 10, 11)]
PARAMS = [pytest.param(c, torch.float32, True, id=f"fp32-bias-{_act_id(c)}") for c in ACTIVATION_CASES] + \
    [pytest.param(c, torch.float16, False, id=f"fp16-{_act_id(c)}") for c in FP16_CASES]


@pytest.mark.parametrize("case,dtype,bias", PARAMS)
def test_activations_and_layouts(case, dtype, bias, target, engine):
    activation, layout = case
    engine.skip_unsupported(target.dtype(dtype), target.device)
    # T13-E5-K2, D40 I24: no size is a multiple of a tile, so every dimension's mask is exercised.
    problem = make_problem(13, 40, 24, 5, 2, activation=activation, layout=layout, bias=bias,
                           dtype=target.dtype(dtype), device=target.device)
    run_both(problem)


EDGE_CASES = {
    # id: (T, D, I, E, K, routing)
    "T40-E6-K2-few_experts": (40, 32, 24, 6, 2, "few_experts"),  # experts 2..5 get no tokens: zero weight grads
    "T20-E4-K2-one_expert": (20, 32, 24, 4, 2, "one_expert"),  # every token on expert 0: one expert spans tiles
    "T17-E5-K1": (17, 32, 24, 5, 1, "uniform"),  # K = 1: no combine across slots
    "T9-E4-K4": (9, 32, 24, 4, 4, "uniform"),  # K = E: every token visits every expert
    "T30-E13-K3": (30, 24, 16, 13, 3, "uniform"),  # prime E, not a power of two (the schedule's E_P2 padding)
    "T3-E5-K2": (3, 32, 24, 5, 2, "uniform"),  # T smaller than a tile, most experts empty
    "T1-E3-K2": (1, 16, 8, 3, 2, "uniform"),  # a single token
    # ~100 rows per expert: several row tiles per expert; D72 and I80 also span several K steps and column tiles
    # (the routing-weight gradient sums partials across column tiles).
    "T150-E3-K2-D72-I80": (150, 72, 80, 3, 2, "skewed"),
}


@pytest.mark.parametrize("case", list(EDGE_CASES), ids=list(EDGE_CASES))
def test_edge_cases(case, target, engine):
    T, D, I, E, K, routing = EDGE_CASES[case]
    run_both(make_problem(T, D, I, E, K, routing=routing, bias=True, dtype=target.dtype(torch.float32),
                          device=target.device))


def test_zero_tokens(target, engine):
    # T = 0: an empty output, and zero gradients for weights, biases and routing weights.
    problem = make_problem(0, 16, 8, 4, 2, bias=True, dtype=target.dtype(torch.float32), device=target.device)
    y = moe_experts(*problem.args(), **problem.kwargs(), backend="triton")
    assert y.shape == (0, 16)
    grads = torch.autograd.grad(y.sum(), problem.inputs(), allow_unused=True)
    for name, g, t in zip(GRAD_NAMES, grads, problem.inputs(), strict=False):
        assert g is not None and g.shape == t.shape, name
        assert not g.isnan().any() and (g == 0).all(), name


@pytest.mark.parametrize("save_percent", [0, 50, 100])
def test_save_percent(save_percent, target, engine):
    # T150-E3-K2: 50% splits the sorted rows inside an expert, so a row tile straddles the saved/recomputed boundary.
    problem = make_problem(150, 40, 24, 3, 2, bias=True, activation=CLAMPED, layout="interleaved",
                           dtype=target.dtype(torch.float32), device=target.device)
    run_both(problem, save_percent=save_percent)


def test_save_percent_same_gradients(target, engine):
    # Saving rounds the pre-activation to the I/O dtype exactly as the recompute does: the gradients agree closely
    # (on a GPU the forward's and the backward's tuned tiles may sum in another order: the dtype's tolerance there).
    dtype = target.dtype(torch.float32)
    problem = make_problem(60, 32, 24, 3, 2, bias=True, dtype=dtype, device=target.device)
    dy = torch.randn(60, 32, dtype=dtype, device=target.device)
    grads = []
    for save_percent in (0, 100):
        y = moe_experts(*problem.args(), **problem.kwargs(), backend="triton", save_percent=save_percent)
        grads.append(torch.autograd.grad(y, problem.inputs(), dy))
    for name, g0, g100 in zip(GRAD_NAMES, *grads, strict=False):
        assert_close(g100, g0, tol=1e-6 if target.device == "cpu" else TOLERANCES[dtype], name=name)


def test_saved_rows():
    assert triton_backend.saved_rows(1000, 0) == 0
    assert triton_backend.saved_rows(1000, 100) == 1000
    assert triton_backend.saved_rows(1000, 33.3) == 333
    assert triton_backend.saved_rows(7, 50) == 3


def test_deterministic(target, engine):
    # Two runs on the same inputs are bitwise identical (no atomics, fixed-order sums), forward and backward.
    dtype = target.dtype(torch.float32)
    problem = make_problem(150, 40, 24, 3, 2, bias=True, routing="skewed", dtype=dtype, device=target.device)
    assert_deterministic(problem, "triton", torch.randn(150, 40, dtype=dtype, device=target.device))


def test_non_contiguous_x_int32_ids_float64_weights(target, engine):
    # x is a strided view (every other column of a wider tensor), ids are int32, weights float64: the routing-weight
    # gradient must come back in float64.
    dtype = target.dtype(torch.float32)
    problem = make_problem(21, 32, 24, 5, 2, bias=True, dtype=dtype, device=target.device)
    wide = torch.randn(21, 64, dtype=dtype, device=target.device)
    problem.x_TD = wide[:, ::2].detach().requires_grad_()
    assert not problem.x_TD.is_contiguous()
    problem.topk_ids_TK = problem.topk_ids_TK.int()
    problem.topk_weights_TK = problem.topk_weights_TK.detach().double().requires_grad_()
    run_both(problem, tol=TOLERANCES[dtype])


def test_combine_in_chunks(monkeypatch, target, engine):
    # A tiny chunk budget splits D = 200 into column chunks of 128 + 72 for the forward combine and for dx.
    from leanmoe.kernels import policy

    monkeypatch.setattr(policy, "COMBINE_CHUNK_BYTES", 1)
    assert policy.d_chunks(10, 200, 4) == [(0, 128), (128, 200)]
    run_both(make_problem(11, 200, 16, 3, 2, bias=True, dtype=target.dtype(torch.float32), device=target.device))


@interpreter_only
@pytest.mark.parametrize("block_n", [32, 64])
def test_block_sizes(monkeypatch, block_n):
    # Column tiles of 32 and 64 (GPU autotuning runs several on the same buffers): the routing-weight partials
    # are per 32 hidden columns, so every block size fills the same rows and gives the same gradients.
    from leanmoe.kernels import moe_common

    monkeypatch.setitem(moe_common.INTERPRETER_META, "BN", block_n)
    run_both(make_problem(40, 40, 72, 3, 2, bias=True))


@interpreter_only
@pytest.mark.parametrize("group_m", [1, 2, 3])
def test_tile_bands(monkeypatch, group_m):
    # Small row tiles, so every kernel walks several bands of them, the last one partial.
    from leanmoe.kernels import moe_common

    for key, value in {"BM": 16, "BN": 32, "BK": 16, "GROUP_M": group_m}.items():  # BN >= the 32-column partials
        monkeypatch.setitem(moe_common.INTERPRETER_META, key, value)
    run_both(make_problem(37, 48, 40, 5, 2, bias=True))


def test_group_m_bands_only_operands_larger_than_half_of_l2(monkeypatch):
    from leanmoe.kernels import moe_common

    monkeypatch.setattr(moe_common, "_l2_bytes", lambda index: 50 * 2**20)
    cuda = torch.device("cuda", 0)
    assert moe_common.group_m(cuda, 117 * 2**20) == moe_common.GROUP_M  # Mixtral's down projection
    assert moe_common.group_m(cuda, 25 * 2**20) == 1
    assert moe_common.group_m(cuda, 3 * 2**20) == 1  # Qwen3-30B-A3B's
    assert moe_common.group_m(torch.device("cpu"), 2**40) == 1


@triton.jit
def _tile_coords_probe(out_ptr, num_m, num_n, GROUP_M: tl.constexpr):
    pid = tl.program_id(0)
    pid_m, pid_n = tile_coords(pid, num_m, num_n, GROUP_M)
    tl.store(out_ptr + 2 * pid, pid_m)
    tl.store(out_ptr + 2 * pid + 1, pid_n)


@interpreter_only
@pytest.mark.parametrize("num_m,num_n,group_m", [(1, 1, 8), (5, 3, 2), (7, 4, 3), (16, 5, 8), (3, 7, 8)])
def test_tile_coords_visit_every_tile_once(num_m, num_n, group_m):
    out = torch.full((num_m * num_n, 2), -1, dtype=torch.int32)
    _tile_coords_probe[(num_m * num_n,)](out, num_m, num_n, GROUP_M=group_m)
    assert sorted(map(tuple, out.tolist())) == [(m, n) for m in range(num_m) for n in range(num_n)]
    # Bands: the first min(group_m, num_m) programs share column tile 0 and take consecutive row tiles.
    first = min(group_m, num_m)
    assert out[:first].tolist() == [[m, 0] for m in range(first)]


def test_compile_fullgraph(target):
    # The custom ops' fake implementations let dynamo trace the whole call (aot_eager: no C++ compiler needed).
    dtype = target.dtype(torch.float32)
    problem = make_problem(13, 32, 24, 5, 2, bias=True, dtype=dtype, device=target.device)

    def fn(x, ids, w, gate_up, down, b1, b2):
        return moe_experts(x, ids, w, gate_up, down, b1, b2, activation="swiglu", backend="triton", check_ids=False)

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    out_y = compiled(*problem.args())
    ref_y = moe_experts(*problem.args(), **problem.kwargs(), backend="reference")
    assert_close(out_y, ref_y, tol=TOLERANCES[dtype], name="y")
    dy = torch.randn_like(ref_y)
    for name, out_g, ref_g in zip(GRAD_NAMES, torch.autograd.grad(out_y, problem.inputs(), dy),
                                  torch.autograd.grad(ref_y, problem.inputs(), dy), strict=False):
        assert_close(out_g, ref_g, tol=TOLERANCES[dtype], name=name)


def test_fake_shapes():
    problem = make_problem(10, 32, 24, 5, 2)
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        args = [mode.from_tensor(t) if isinstance(t, torch.Tensor) else t for t in problem.args()]
        out = torch.ops.leanmoe.triton_experts_fwd(*args, "swiglu", 1.702, 7.0, "concatenated", 50.0)
    assert [tuple(t.shape) for t in out] == [(10, 32), (20,), (20,), (5,), (20,), (10, 48)]


def _call(**overrides):
    fields = dict(device=torch.device("cpu"), dtype=torch.float32, num_tokens=8, dim=16, hidden_dim=8, num_experts=4,
                  top_k=2, activation=Activation(), gate_up_layout="concatenated", has_gate_up_bias=False,
                  has_down_bias=False, save_percent=0, requires_grad=True)
    fields.update(overrides)
    return ExpertsCall(**fields)


@interpreter_only
def test_backend_selection(monkeypatch):
    backend = get_backend("triton")
    assert (backend.priority, backend.requires, backend.extra) == (20, ("triton",), "triton")
    # Under the interpreter a named call runs on the CPU, but auto never picks the interpreter.
    assert backend.unsupported_reason(_call()) is None
    assert "interpreter" in backend.auto_unsupported_reason(_call())
    picked, why = select_backend("auto", _call())
    assert picked.name != "triton" and "'triton'" in why
    assert "bfloat16" in backend.unsupported_reason(_call(dtype=torch.bfloat16))
    assert "float64" in backend.unsupported_reason(_call(dtype=torch.float64))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "TRITON_INTERPRET=1" in backend.unsupported_reason(_call())
    with pytest.raises(ValueError, match="cannot run this call"):
        problem = make_problem(4, 16, 8, 4, 2)
        moe_experts(*problem.args(), **problem.kwargs(), backend="triton")


@pytest.mark.parametrize("tokens,experts,top_k,requires_grad", [
    (16384, 8, 2, False), (16384, 8, 2, True),  # mixtral: 4096 rows per expert
    (16384, 128, 8, False), (16384, 128, 8, True),  # qwen3: 1024 rows per expert
])
def test_auto_takes_triton_for_every_cuda_call_it_runs(monkeypatch, tokens, experts, top_k, requires_grad):
    # Described as a CUDA call without needing a GPU; on the CPU auto never takes the interpreter. The priority
    # order is what is checked: measuring (on a GPU machine) is off.
    monkeypatch.setenv("LEANMOE_AUTOSELECT", "0")
    import dataclasses

    from leanmoe.experts.triton import TritonBackend

    monkeypatch.setattr(TritonBackend, "unsupported_reason", lambda self, call: None)
    p = make_problem(8, 16, 8, 4, 2, requires_grad=False)
    call = dataclasses.replace(describe_call(*p.args(), **p.kwargs()), num_tokens=tokens, num_experts=experts,
                               top_k=top_k, requires_grad=requires_grad)
    backend = TritonBackend()
    assert backend.auto_unsupported_reason(dataclasses.replace(call, device=torch.device("cuda"))) is None
    assert "never picks the Triton interpreter" in backend.auto_unsupported_reason(call)
    assert select_backend("auto", dataclasses.replace(call, device=torch.device("cuda")))[0].name == "triton"


def test_autotuning_results_are_cached_on_disk_where_triton_can(monkeypatch):
    # On GPUs the kernels autotune; the results go to Triton's disk cache (per GPU target and shape bucket), so a
    # new process skips the first-call tuning. The interpreter never autotunes (and Triton turns the cache off
    # there), so this checks what leanmoe asks Triton for.
    import inspect

    import triton

    from leanmoe.kernels import moe_common

    asked = {}

    def fake_autotune(**kwargs):
        asked.update(kwargs)
        return lambda kernel: kernel

    monkeypatch.setattr(moe_common, "interpreting", lambda: False)
    monkeypatch.setattr(moe_common.triton, "autotune", fake_autotune)
    moe_common.autotuned(moe_common.gate_up_rows, moe_common.configs([(16, 16, 16, 4, 2)]), key=["I"])
    monkeypatch.undo()
    supported = "cache_results" in inspect.signature(triton.autotune).parameters
    assert asked.get("cache_results", False) is supported
    assert asked["key"] == ["I"]


@pytest.mark.parametrize("env,expected", [(None, 3), ("1", 3), ("0", 1)])
def test_autotune_env_switch_keeps_only_the_default_config(monkeypatch, env, expected):
    from leanmoe.kernels import moe_common

    asked = {}

    def fake_autotune(**kwargs):
        asked.update(kwargs)
        return lambda kernel: kernel

    if env is None:
        monkeypatch.delenv("LEANMOE_AUTOTUNE", raising=False)
    else:
        monkeypatch.setenv("LEANMOE_AUTOTUNE", env)
    monkeypatch.setattr(moe_common, "interpreting", lambda: False)
    monkeypatch.setattr(moe_common.triton, "autotune", fake_autotune)
    cfgs = moe_common.configs([(16, 16, 16, 4, 2), (32, 16, 16, 4, 2), (32, 32, 16, 4, 2)])
    moe_common.autotuned(moe_common.gate_up_rows, cfgs, key=["I"])
    assert asked["configs"] == cfgs[:expected]


def test_autotune_env_switch_rejects_other_values(monkeypatch):
    from leanmoe.kernels import moe_common

    monkeypatch.setenv("LEANMOE_AUTOTUNE", "off")
    with pytest.raises(ValueError, match="LEANMOE_AUTOTUNE must be '0' or '1', got 'off'"):
        moe_common.autotune_enabled()


MASK_CASES = {
    # id: (T, D, I, E, K, routing, mask): "random" keeps about half the tokens
    "T40-E6-K2-random": (40, 32, 24, 6, 2, "uniform", "random"),
    "T17-E5-K1-random": (17, 32, 24, 5, 1, "uniform", "random"),  # K = 1
    "T9-E4-K4-random": (9, 32, 24, 4, 4, "uniform", "random"),  # K = E: every expert loses rows
    "T30-E13-K3-random": (30, 24, 16, 13, 3, "uniform", "random"),  # prime E
    "T40-E6-K2-few_experts": (40, 32, 24, 6, 2, "few_experts", "random"),  # experts 2..5 empty besides the mask
    "T3-E5-K2-first_masked": (3, 32, 24, 5, 2, "uniform", "first"),  # T smaller than a tile
    "T20-E4-K2-all_masked": (20, 32, 24, 4, 2, "uniform", "none"),  # no kept row: every program exits
    "T20-E4-K2-all_kept": (20, 32, 24, 4, 2, "uniform", "all"),  # a mask of all True changes nothing
    "T0-E4-K2": (0, 32, 24, 4, 2, "uniform", "random"),
}


def _mask(kind: str, T: int) -> torch.Tensor:
    if kind == "random":
        return torch.rand(T) < 0.5
    if kind == "first":
        return torch.arange(T) > 0
    return torch.full((T,), kind == "all", dtype=torch.bool)


def run_masked(problem, keep_T, *, save_percent=0.0, tol=None):
    """Triton against the reference with a token mask; masked rows of x and dy hold NaN. Masked tokens' output,
    dx and routing-weight gradient rows must be exact zeros; everything else matches the reference."""
    on_exact_grid(problem)
    tol = tol or TOLERANCES[problem.x_TD.dtype]
    T = keep_T.numel()
    x_TD = problem.x_TD.detach().clone()
    x_TD[~keep_T] = float("nan")  # padding often holds garbage: it must never reach a GEMM
    problem.x_TD = x_TD.requires_grad_()
    ref_y = moe_experts(*problem.args(), **problem.kwargs(), backend="reference", token_mask=keep_T)
    out_y = moe_experts(*problem.args(), **problem.kwargs(), backend="triton", token_mask=keep_T,
                        save_percent=save_percent)
    assert_close(out_y, ref_y, tol=tol, name="y")
    assert torch.equal(out_y[~keep_T], torch.zeros_like(out_y[~keep_T])), "masked tokens' output is not exactly 0"
    dy = torch.randn_like(ref_y)
    dy[~keep_T] = float("nan")  # the gradient of a masked row may be anything: it must not be read
    if T == 0:
        return
    ref_grads = torch.autograd.grad(ref_y, problem.inputs(), dy)
    out_grads = torch.autograd.grad(out_y, problem.inputs(), dy)
    for name, out_g, ref_g in zip(GRAD_NAMES, out_grads, ref_grads, strict=False):
        assert_close(out_g, ref_g, tol=tol, name=name)
    dx, dweights = out_grads[0], out_grads[1]
    assert torch.equal(dx[~keep_T], torch.zeros_like(dx[~keep_T])), "masked tokens' dx is not exactly 0"
    assert torch.equal(dweights[~keep_T], torch.zeros_like(dweights[~keep_T])), "masked dweights are not exactly 0"


@pytest.mark.parametrize("case", list(MASK_CASES), ids=list(MASK_CASES))
def test_token_mask(case, monkeypatch, target, engine):
    from leanmoe.kernels import moe_fwd

    T, D, I, E, K, routing, kind = MASK_CASES[case]
    keep_T = _mask(kind, T).to(target.device)
    # The gate/up GEMM's schedule covers offsets_E[-1] rows: the kept tokens' rows and no others.
    kept_rows = []
    gate_up_fwd = moe_fwd.gate_up_fwd

    def spy(x_TD, sorted_tokens_R, offsets_E, *args, **kwargs):
        kept_rows.append(int(offsets_E[-1]))
        return gate_up_fwd(x_TD, sorted_tokens_R, offsets_E, *args, **kwargs)

    monkeypatch.setattr(moe_fwd, "gate_up_fwd", spy)
    run_masked(make_problem(T, D, I, E, K, routing=routing, bias=True, dtype=target.dtype(torch.float32),
                            device=target.device), keep_T)
    # The split engine's backward recomputes the pre-activations with the same kernel: a second call, same rows.
    assert kept_rows == [int(keep_T.sum()) * K] * (2 if engine.name == "split" and T else 1)  # T=0: no backward


@pytest.mark.parametrize("save_percent", [0, 100])
def test_token_mask_fp16_and_saved(save_percent, target, engine):
    # float16, interleaved clamped_swiglu, several row tiles per expert; at 100% the saved rows include the masked
    # positions, which are never written and never read. The pre-activations lie on on_exact_grid's grid.
    engine.skip_unsupported(torch.float16, target.device)
    problem = make_problem(150, 40, 24, 3, 2, bias=True, activation=CLAMPED, layout="interleaved",
                           dtype=torch.float16, routing="skewed", device=target.device)
    run_masked(problem, torch.rand(150, device=target.device) < 0.7, save_percent=save_percent)


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode", "nothing_requires_grad"])
def test_inference_keeps_nothing(monkeypatch, mode, target):
    # save_percent=100 keeps [R, N] pre-activations for backward; when no backward can run none is kept (nor
    # written), and the output is the same.
    import contextlib

    from leanmoe.kernels import moe_fwd

    saved = []
    gate_up_fwd = moe_fwd.gate_up_fwd

    def spy(*args, **kwargs):
        h_RI, saved_SN = gate_up_fwd(*args, **kwargs)
        saved.append(saved_SN.shape[0])
        return h_RI, saved_SN

    monkeypatch.setattr(moe_fwd, "gate_up_fwd", spy)
    problem = make_problem(30, 32, 24, 4, 2, bias=True, dtype=target.dtype(torch.float32), device=target.device)
    train_y = moe_experts(*problem.args(), **problem.kwargs(), backend="triton", save_percent=100)
    assert saved == [60]  # with a backward to come, every row is kept
    if mode == "nothing_requires_grad":
        problem = dataclasses.replace(problem, **{f: getattr(problem, f).detach() for f in (
            "x_TD", "topk_weights_TK", "gate_up_proj", "down_proj", "gate_up_bias", "down_bias")})
    context = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode,
               "nothing_requires_grad": contextlib.nullcontext}[mode]
    with context():
        y = moe_experts(*problem.args(), **problem.kwargs(), backend="triton", save_percent=100)
    assert saved == [60, 0]
    assert not y.requires_grad and torch.equal(y, train_y.detach())


def test_meta_tensors():
    # Meta tensors run the ops' fake implementations: a meta [T, D] output and meta gradients, no data read.
    problem = make_problem(13, 32, 24, 5, 2, bias=True)
    meta = dataclasses.replace(problem, **{f: getattr(problem, f).detach().to("meta").requires_grad_(
        getattr(problem, f).requires_grad) for f in ("x_TD", "topk_ids_TK", "topk_weights_TK", "gate_up_proj",
                                                      "down_proj", "gate_up_bias", "down_bias")})
    keep_T = torch.ones(13, dtype=torch.bool, device="meta")
    y = moe_experts(*meta.args(), **meta.kwargs(), backend="triton", token_mask=keep_T)
    assert (y.device.type, tuple(y.shape), y.dtype) == ("meta", (13, 32), torch.float32)
    grads = torch.autograd.grad(y, meta.inputs(), torch.empty_like(y))
    for name, g, t in zip(GRAD_NAMES, grads, meta.inputs(), strict=True):
        assert g.device.type == "meta" and g.shape == t.shape and g.dtype == t.dtype, name


@pytest.mark.parametrize("frozen", ["experts", "gate_up", "down", "x"])
def test_gradients_not_asked_for_run_no_kernel(monkeypatch, frozen, target, engine):
    # Frozen expert weights (LoRA, partial fine-tuning) or an x without grad: those gradients are not computed (no
    # weight-gradient kernel runs for a frozen projection) and the others match the reference.
    from leanmoe.kernels import moe_bwd

    calls = []

    def spying(fn):  # both engines' weight-gradient launchers take the output (or its model) 4th
        def spy(*args, **kwargs):
            calls.append(args[3].shape)
            return fn(*args, **kwargs)
        return spy

    monkeypatch.setattr(moe_bwd, "expert_weight_grad", spying(moe_bwd.expert_weight_grad))
    monkeypatch.setattr(triton_backend, "grouped_weight_grad", spying(triton_backend.grouped_weight_grad))
    problem = make_problem(40, 32, 24, 5, 2, bias=True, dtype=target.dtype(torch.float32), device=target.device)
    frozen_names = {"experts": ("gate_up_proj", "gate_up_bias", "down_proj", "down_bias"),
                    "gate_up": ("gate_up_proj", "gate_up_bias"), "down": ("down_proj", "down_bias"),
                    "x": ("x_TD",)}[frozen]
    for name in frozen_names:
        getattr(problem, name).requires_grad_(False)
    inputs = [t for t in problem.inputs() if t.requires_grad]
    ref_y = moe_experts(*problem.args(), **problem.kwargs(), backend="reference")
    out_y = moe_experts(*problem.args(), **problem.kwargs(), backend="triton")
    dy = torch.randn_like(ref_y)
    ref_grads = torch.autograd.grad(ref_y, inputs, dy)
    out_grads = torch.autograd.grad(out_y, inputs, dy)
    for i, (out_g, ref_g) in enumerate(zip(out_grads, ref_grads, strict=True)):
        assert_close(out_g, ref_g, tol=TOLERANCES[out_g.dtype], name=f"grad {i}")
    expected = {"experts": [], "gate_up": [problem.down_proj.shape], "down": [problem.gate_up_proj.shape],
                "x": [problem.down_proj.shape, problem.gate_up_proj.shape]}[frozen]
    assert calls == expected


def test_env_choice_reads_a_checked_switch(monkeypatch):
    from leanmoe.kernels.policy import env_choice

    monkeypatch.delenv("LEANMOE_TEST_SWITCH", raising=False)
    assert env_choice("LEANMOE_TEST_SWITCH", ("a", "b"), "a") == "a"
    monkeypatch.setenv("LEANMOE_TEST_SWITCH", "b")
    assert env_choice("LEANMOE_TEST_SWITCH", ("a", "b"), "a") == "b"
    monkeypatch.setenv("LEANMOE_TEST_SWITCH", "c")
    with pytest.raises(ValueError, match=r"LEANMOE_TEST_SWITCH: expected one of \('a', 'b'\), got 'c'"):
        env_choice("LEANMOE_TEST_SWITCH", ("a", "b"), "a")


def test_backward_engine_choice(monkeypatch):
    # auto: split on Hopper GPUs in bfloat16 (torch._grouped_mm's CUDA path), fused elsewhere; forced split raises
    # where it cannot run; bad names are refused.
    from leanmoe.kernels import policy

    monkeypatch.delenv("LEANMOE_TRITON_BACKWARD", raising=False)
    x = torch.zeros(4, 32)
    down = torch.zeros(3, 32, 24)
    assert policy.backward_engine(x, down) == "fused"  # the CPU: split only when asked
    monkeypatch.setenv("LEANMOE_TRITON_BACKWARD", "split")
    assert policy.backward_engine(x, down) == "split"
    with pytest.raises(ValueError, match="multiples of 4"):
        policy.backward_engine(x, torch.zeros(3, 32, 10))  # I = 10 fp32: rows not 16-byte aligned
    with pytest.raises(ValueError, match="unit stride"):
        policy.backward_engine(x, torch.zeros(3, 32, 48)[:, ::2, ::2])
    monkeypatch.setenv("LEANMOE_TRITON_BACKWARD", "fast")
    with pytest.raises(ValueError, match="LEANMOE_TRITON_BACKWARD.*'fast'"):
        policy.backward_engine(x, down)
    policy.set_backward_engine("fused")  # the in-process choice wins over the environment
    try:
        assert policy.backward_engine(x, down) == "fused"
    finally:
        policy.set_backward_engine(None)
    with pytest.raises(ValueError, match="engine.*'fast'"):
        policy.set_backward_engine("fast")
    if ON_GPU and torch.cuda.get_device_capability() >= (9, 0):
        monkeypatch.delenv("LEANMOE_TRITON_BACKWARD")
        assert policy.backward_engine(x.cuda().bfloat16(), down.cuda().bfloat16()) == "split"
        assert policy.backward_engine(x.cuda().half(), down.cuda().half()) == "fused"


def test_forced_split_engine_on_unaligned_rows_raises(monkeypatch):
    # I = 10 in float32: torch._grouped_mm needs 16-byte aligned rows; the error names the sizes, no fallback.
    from leanmoe.kernels import policy

    problem = make_problem(8, 32, 10, 3, 2, device="cuda" if ON_GPU else "cpu",
                           dtype=torch.bfloat16 if ON_GPU else torch.float32)
    if ON_GPU:
        problem = make_problem(8, 32, 12, 3, 2, device="cuda", dtype=torch.bfloat16)  # 12 % 8: unaligned in bf16
    policy.set_backward_engine("split")
    try:
        y = moe_experts(*problem.args(), **problem.kwargs(), backend="triton")
        with pytest.raises(ValueError, match="16-byte aligned"):
            y.sum().backward()
    finally:
        policy.set_backward_engine(None)


def test_int32_offsets_flag():
    # The kernels take int32 column offsets (the faster loop) unless an operand's reachable offset passes 2^31.
    from leanmoe.kernels.moe_common import offsets_fit_int32

    x = torch.empty(4, 8)
    assert offsets_fit_int32((x, (1,)), (torch.empty(3, 8, 5), (1, 2)))
    t = torch.empty(3, 2**30, device="meta").t()  # [2^30, 3], column stride 2^30: column 2 is at 2^31
    assert offsets_fit_int32((t, (0,)))  # unit row stride: row offsets stay small (and rows are int64 anyway)
    assert not offsets_fit_int32((t, (1,)))
    assert offsets_fit_int32((t[:, :2], (1,)))  # 2^30 fits
    assert offsets_fit_int32((torch.empty(0, 5), (0, 1)))
