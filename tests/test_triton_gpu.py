"""The Triton backend on a CUDA GPU: bfloat16 at real model sizes against the reference, save_percent, determinism,
64-bit row and column offsets, exact GELU, token masks, and ``torch.compile(fullgraph=True)``. Run through the
device machine: ``python -m pytest -m gpu tests/test_triton_gpu.py``.

Legend: T tokens, D model dim, I expert hidden dim, E experts, K top-k.
"""

from __future__ import annotations

import pytest
import torch

from leanmoe import Activation, moe_experts
from leanmoe.experts.functional import describe_call
from leanmoe.experts.registry import select_backend
from tests.helpers import TOLERANCES, assert_close, assert_deterministic, make_problem

pytestmark = pytest.mark.gpu

GRAD_NAMES = ["dx", "dweights", "dgate_up_proj", "ddown_proj", "dgate_up_bias", "ddown_bias"]
BF16 = TOLERANCES[torch.bfloat16]


def compare(problem, *, save_percent=0.0, fn=None, tol=BF16):
    ref_y = moe_experts(*problem.args(), **problem.kwargs(), backend="reference")
    if fn is None:
        out_y = moe_experts(*problem.args(), **problem.kwargs(), backend="triton", save_percent=save_percent)
    else:
        out_y = fn(*problem.args())
    assert_close(out_y, ref_y, tol=tol, name="y")
    dy = torch.randn_like(ref_y)
    out_grads = torch.autograd.grad(out_y, problem.inputs(), dy)
    ref_grads = torch.autograd.grad(ref_y, problem.inputs(), dy)
    for name, out_g, ref_g in zip(GRAD_NAMES, out_grads, ref_grads, strict=False):
        assert_close(out_g, ref_g, tol=tol, name=name)


SHAPES = {
    # id: (T, D, I, E, K, activation, layout, bias)
    "qwen3-T2048-E128-K8": (2048, 2048, 768, 128, 8, "swiglu", "concatenated", False),
    "gpt-oss-own-T1024-E32-K4": (1024, 2880, 2880, 32, 4, Activation(name="clamped_swiglu"), "interleaved", True),
    # deepseek-v3's D and I: few rows per expert (~32), and I=2048 spans many column tiles (v3's routing-weight
    # partials went stale under autotuning here).
    # E is cut from 256 to 32: the weights are drawn on the CPU in fp32 (256 experts would be 30 GB).
    "deepseek-dims-T128-E32-K8": (128, 7168, 2048, 32, 8, "swiglu", "concatenated", False),
    "odd-T1000-D520-I200-E13-K3-relu2": (1000, 520, 200, 13, 3, "relu2", "concatenated", True),  # masks everywhere
}


@pytest.mark.parametrize("shape", list(SHAPES), ids=list(SHAPES))
def test_bf16_real_sizes(shape):
    T, D, I, E, K, act, layout, bias = SHAPES[shape]
    compare(make_problem(T, D, I, E, K, activation=act, layout=layout, bias=bias, dtype=torch.bfloat16,
                         device="cuda"))


@pytest.mark.parametrize("routing", ["skewed", "one_expert", "few_experts"])
def test_bf16_routings(routing):
    # one_expert puts every token on expert 0 (one expert spans many tiles); few_experts leaves most experts empty.
    compare(make_problem(1024, 1024, 512, 16, 4, routing=routing, dtype=torch.bfloat16, device="cuda"))


@pytest.mark.parametrize("save_percent", [0, 37.5, 100])
def test_bf16_save_percent(save_percent):
    compare(make_problem(2048, 1024, 512, 16, 4, bias=True, dtype=torch.bfloat16, device="cuda"),
            save_percent=save_percent)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
def test_other_dtypes(dtype):
    compare(make_problem(512, 256, 128, 8, 2, bias=True, dtype=dtype, device="cuda"), tol=TOLERANCES[dtype] * 10
            if dtype == torch.float32 else TOLERANCES[dtype])


def test_deterministic():
    problem = make_problem(4096, 1024, 512, 32, 4, dtype=torch.bfloat16, device="cuda")
    assert_deterministic(problem, "triton", torch.randn(4096, 1024, device="cuda", dtype=torch.bfloat16))


def test_64bit_offsets():
    # R * D = 2^21 * 2048 = 2^32 elements: row offsets into the [R, D] buffers pass 2^31.
    T, D, I, E, K = 2**18, 2048, 64, 8, 8
    problem = make_problem(T, D, I, E, K, dtype=torch.bfloat16, device="cuda")
    compare(problem)


def test_64bit_column_strides():
    # x, dy and both weights are transposed views into one [D, S] bf16 buffer of 2^31+ elements (4.3 GB): their
    # last columns lie past 2^31 elements (crashed with SIGSEGV before the column offsets were int64).
    from tests.test_kernels_strides import wide_buffer_problem

    problem, dy_TD, _ = wide_buffer_problem(4096, 256, 128, 8, 2, dtype=torch.bfloat16, device="cuda")
    ref_y = moe_experts(*problem.args(), **problem.kwargs(), backend="reference")
    out_y = moe_experts(*problem.args(), **problem.kwargs(), backend="triton")
    assert_close(out_y, ref_y, tol=BF16, name="y")
    out_grads = torch.autograd.grad(out_y, problem.inputs(), dy_TD)
    ref_grads = torch.autograd.grad(ref_y, problem.inputs(), dy_TD)
    for name, out_g, ref_g in zip(GRAD_NAMES, out_grads, ref_grads, strict=True):
        assert_close(out_g, ref_g, tol=BF16, name=name)


@pytest.mark.parametrize("activation", ["geglu_exact", "gelu_exact"])
def test_bf16_exact_gelu(activation):
    compare(make_problem(1024, 1024, 512, 16, 4, activation=activation, bias=True, dtype=torch.bfloat16,
                         device="cuda"))


@pytest.mark.parametrize("save_percent", [0, 100])
def test_bf16_token_mask(save_percent):
    # About half the tokens masked, their x and dy rows NaN: zero output, dx and dweights rows, nothing leaks.
    problem = make_problem(2048, 1024, 512, 16, 4, bias=True, dtype=torch.bfloat16, device="cuda")
    keep_T = torch.rand(2048, device="cuda") < 0.5
    x_TD = problem.x_TD.detach().clone()
    x_TD[~keep_T] = float("nan")
    problem.x_TD = x_TD.requires_grad_()
    ref_y = moe_experts(*problem.args(), **problem.kwargs(), backend="reference", token_mask=keep_T)
    out_y = moe_experts(*problem.args(), **problem.kwargs(), backend="triton", token_mask=keep_T,
                        save_percent=save_percent)
    assert_close(out_y, ref_y, tol=BF16, name="y")
    assert (out_y[~keep_T] == 0).all()
    dy = torch.randn_like(ref_y)
    dy[~keep_T] = float("nan")
    out_grads = torch.autograd.grad(out_y, problem.inputs(), dy)
    ref_grads = torch.autograd.grad(ref_y, problem.inputs(), dy)
    for name, out_g, ref_g in zip(GRAD_NAMES, out_grads, ref_grads, strict=True):
        assert_close(out_g, ref_g, tol=BF16, name=name)
    assert (out_grads[0][~keep_T] == 0).all() and (out_grads[1][~keep_T] == 0).all()


def test_zero_tokens():
    problem = make_problem(0, 256, 128, 8, 2, dtype=torch.bfloat16, device="cuda")
    y = moe_experts(*problem.args(), **problem.kwargs(), backend="triton")
    grads = torch.autograd.grad(y.sum(), problem.inputs())
    assert y.shape == (0, 256) and all((g == 0).all() for g in grads)


def test_auto_picks_triton(monkeypatch):
    monkeypatch.setenv("LEANMOE_AUTOSELECT", "0")  # the priority order; measured choices: tests/test_cuda_graphs.py
    problem = make_problem(64, 256, 128, 8, 2, dtype=torch.bfloat16, device="cuda")
    backend, why = select_backend("auto", describe_call(*problem.args(), **problem.kwargs()))
    assert backend.name == "triton", why


@pytest.mark.no_poison  # torch.compile cannot trace the poisoning replacements of torch.empty*
def test_compile_fullgraph():
    problem = make_problem(1024, 1024, 512, 16, 4, bias=True, dtype=torch.bfloat16, device="cuda")

    def fn(x, ids, w, gate_up, down, b1, b2):
        return moe_experts(x, ids, w, gate_up, down, b1, b2, activation="swiglu", backend="triton", check_ids=False)

    compiled = torch.compile(fn, fullgraph=True, dynamic=True)
    compare(problem, fn=compiled)
    # A new token count reuses the dynamic-shape graph.
    other = make_problem(777, 1024, 512, 16, 4, bias=True, dtype=torch.bfloat16, device="cuda")
    compare(other, fn=compiled)
