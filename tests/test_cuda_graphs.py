"""CUDA-graph capture and replay of the expert compute and the MoE layer, against eager (GPU only).

Legend: T tokens, D model dim, I expert hidden dim, E experts, K top-k.

Recipe (docs/SERVING.md): warm up on a side stream (Triton autotuning, ``auto``'s measurement and lazy
allocations happen there), capture one call into static input/output tensors, then copy new inputs of the same
shape into the static ones and replay. Replay must equal eager on the new inputs: the fast backends are
deterministic, so equal means bitwise for them. The reference loop is not capturable (``torch.where`` has a
data-dependent shape) and is not tested here.
"""

from __future__ import annotations

import functools

import pytest
import torch

import leanmoe
from leanmoe.experts import autoselect
from leanmoe.experts.functional import describe_call
from tests.helpers import assert_close, make_problem

pytestmark = [pytest.mark.gpu, pytest.mark.no_poison]

CUDA_BACKENDS = ["grouped_mm", "triton", "triton_decode", "auto"]
#: Qwen3-30B-A3B's expert shapes at decode sizes.
D, I, E, K = 2048, 768, 128, 8


def _capture(fn, static_args, warmup=3):
    """A CUDA graph of ``fn(*static_args)`` after ``warmup`` eager calls on a side stream; returns it and its
    static output."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn(*static_args)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = fn(*static_args)
    return graph, static_out


@functools.cache
def _weights():
    g = torch.Generator(device="cuda").manual_seed(0)
    gate_up = torch.randn(E, 2 * I, D, device="cuda", generator=g) * D ** -0.5
    down = torch.randn(E, D, I, device="cuda", generator=g) * I ** -0.5
    return gate_up.bfloat16(), down.bfloat16()


def _fresh_inputs(T, seed, mask=False):
    """A problem on the shared weights with new x, routing and routing weights (generated on the GPU)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    p = make_problem(1, 8, 8, 2, 1, requires_grad=False)
    p.x_TD = torch.randn(T, D, device="cuda", generator=g).bfloat16()
    p.topk_ids_TK = torch.randn(T, E, device="cuda", generator=g).topk(K, dim=-1).indices
    p.topk_weights_TK = torch.rand(T, K, device="cuda", generator=g).bfloat16()
    p.gate_up_proj, p.down_proj = _weights()
    token_mask = (torch.arange(T, device="cuda") % 3 != 1) if mask else None
    return p, token_mask


def _assert_replay_equals_eager(out, ref, backend):
    if backend == "grouped_mm":
        assert_close(out, ref, tol=1e-3, name=f"{backend} replay")
    else:
        assert torch.equal(out, ref), f"{backend}: replay differs from eager (deterministic kernels)"


@pytest.mark.parametrize("T", [1, 64, 256])
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
def test_moe_experts_graph_replay(backend, T, tmp_path, monkeypatch):
    monkeypatch.setenv(autoselect.ENV_CACHE_DIR, str(tmp_path))
    p, _ = _fresh_inputs(T, seed=0)
    weights = (p.gate_up_proj, p.down_proj)

    def run(x, ids, w):
        return leanmoe.moe_experts(x, ids, w, *weights, **p.kwargs(), backend=backend, check_ids=False)

    static = [p.x_TD.clone(), p.topk_ids_TK.clone(), p.topk_weights_TK.clone()]
    with torch.no_grad():
        graph, static_out = _capture(run, static)
        for seed in (1, 2):
            q, _ = _fresh_inputs(T, seed)
            for s, new in zip(static, (q.x_TD, q.topk_ids_TK, q.topk_weights_TK), strict=True):
                s.copy_(new)
            graph.replay()
            ref = run(q.x_TD, q.topk_ids_TK, q.topk_weights_TK)
            _assert_replay_equals_eager(static_out, ref, backend)
    if backend == "auto":
        with torch.no_grad():
            why = leanmoe.explain_backend(describe_call(*p.args(), **p.kwargs()))
        assert "measured fastest" in why, why


@pytest.mark.parametrize("backend", ["triton", "triton_decode", "grouped_mm"])
def test_moe_experts_graph_replay_with_mask(backend):
    p, mask = _fresh_inputs(16, seed=3, mask=True)

    def run(x, ids, w, m):
        return leanmoe.moe_experts(x, ids, w, p.gate_up_proj, p.down_proj, **p.kwargs(), backend=backend,
                                   check_ids=False, token_mask=m)

    static = [p.x_TD.clone(), p.topk_ids_TK.clone(), p.topk_weights_TK.clone(), mask.clone()]
    with torch.no_grad():
        graph, static_out = _capture(run, static)
        q, _ = _fresh_inputs(16, seed=4)
        new_mask = torch.arange(16, device="cuda") % 2 == 0
        for s, new in zip(static, (q.x_TD, q.topk_ids_TK, q.topk_weights_TK, new_mask), strict=True):
            s.copy_(new)
        graph.replay()
        ref = run(q.x_TD, q.topk_ids_TK, q.topk_weights_TK, new_mask)
    _assert_replay_equals_eager(static_out, ref, backend)
    assert torch.equal(static_out[~new_mask], torch.zeros_like(static_out[~new_mask]))


def _layer(backend):
    torch.manual_seed(0)
    config = leanmoe.MoEConfig(dim=D, hidden_dim=I, num_experts=E, top_k=K, num_shared_experts=1, backend=backend)
    return leanmoe.MoE(config, device="cuda", dtype=torch.bfloat16).eval()


@pytest.mark.parametrize("T", [1, 64])
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
def test_moe_layer_graph_replay(backend, T, tmp_path, monkeypatch):
    # The whole layer: router (top-k, aux loss and token counts as device tensors), experts, shared experts.
    monkeypatch.setenv(autoselect.ENV_CACHE_DIR, str(tmp_path))
    layer = _layer(backend)
    static_x = torch.randn(T, D, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        graph, static_out = _capture(layer, [static_x])
        for _ in range(2):
            x = torch.randn(T, D, device="cuda", dtype=torch.bfloat16)
            static_x.copy_(x)
            graph.replay()
            _assert_replay_equals_eager(static_out, layer(x), backend)


@pytest.mark.parametrize("backend", CUDA_BACKENDS)
def test_moe_layer_compile_reduce_overhead(backend, tmp_path, monkeypatch):
    monkeypatch.setenv(autoselect.ENV_CACHE_DIR, str(tmp_path))
    layer = _layer(backend)
    compiled = torch.compile(layer, mode="reduce-overhead", fullgraph=True)
    with torch.no_grad():
        for step in range(4):  # the first calls warm up and record; the later ones replay the graph
            x = torch.randn(32, D, device="cuda", dtype=torch.bfloat16)
            out = compiled(x).clone()
            ref = layer(x)
            if step >= 2:
                # Under compile auto takes the priority order, which eager (after measuring) may not: compare
                # within bf16 rounding, not bitwise.
                assert_close(out, ref, tol=2e-2, name=f"{backend} reduce-overhead step {step}")
