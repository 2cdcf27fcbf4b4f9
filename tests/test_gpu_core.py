"""Core backends on a CUDA GPU: bf16 at real sizes against an fp32 reference, no host syncs, compile."""

from __future__ import annotations

import pytest
import torch

import leanmoe
from tests.helpers import assert_close, make_problem

pytestmark = [pytest.mark.gpu]

# bf16 operands against an fp32 reference: errors land between 1e-3 and 1e-2 of the output's scale.
BF16_TOL = 2e-2


def _fp32_copy(p):
    q = make_problem(1, 8, 8, 2, 1, device="cuda")
    for field in ("x_TD", "topk_weights_TK", "gate_up_proj", "down_proj", "gate_up_bias", "down_bias"):
        t = getattr(p, field)
        setattr(q, field, None if t is None else t.detach().float().requires_grad_(True))
    q.topk_ids_TK, q.activation, q.gate_up_layout = p.topk_ids_TK, p.activation, p.gate_up_layout
    return q


def _fwd_bwd(p, backend, dy):
    y = leanmoe.moe_experts(*p.args(), backend=backend, **p.kwargs())
    return y, torch.autograd.grad(y, p.inputs(), dy.to(y.dtype))


@pytest.mark.parametrize("routing", ["uniform", "skewed", "few_experts"])
@pytest.mark.parametrize("activation,layout,bias", [("swiglu", "concatenated", False),
                                                    ("clamped_swiglu", "interleaved", True),
                                                    ("relu2", "concatenated", False)])
def test_grouped_mm_bf16_matches_fp32_reference(routing, activation, layout, bias):
    p = make_problem(2048, 512, 256, 32, 4, activation=activation, layout=layout, bias=bias, dtype=torch.bfloat16,
                     device="cuda", routing=routing, seed=0)
    dy = torch.randn(2048, 512, device="cuda")
    ref_y, ref_grads = _fwd_bwd(_fp32_copy(p), "reference", dy)
    y, grads = _fwd_bwd(p, "grouped_mm", dy)
    assert_close(y, ref_y, tol=BF16_TOL, name="y")
    for g, r in zip(grads, ref_grads, strict=True):
        assert_close(g, r, tol=BF16_TOL)


def test_grouped_mm_has_no_host_sync():
    p = make_problem(1024, 256, 128, 16, 4, bias=True, dtype=torch.bfloat16, device="cuda", seed=1)
    leanmoe.moe_experts(*p.args(), backend="grouped_mm", check_ids=False, **p.kwargs())  # warm up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        y = leanmoe.moe_experts(*p.args(), backend="grouped_mm", check_ids=False, **p.kwargs())
        y.backward(torch.randn_like(y))
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_layer_forward_has_no_host_sync():
    cfg = leanmoe.MoEConfig(dim=256, hidden_dim=128, num_experts=16, top_k=4, num_shared_experts=1,
                            aux_loss_coef=0.01, z_loss_coef=1e-3, balance_bias=True, n_group=4, topk_group=2)
    layer = leanmoe.MoE(cfg, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(512, 256, device="cuda", dtype=torch.bfloat16)
    mask = torch.rand(512, device="cuda") > 0.1
    layer(x, token_mask=mask)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        y = layer(x, token_mask=mask)
        (y.float().square().mean() + layer.aux_loss).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.no_poison
def test_grouped_mm_compiles_fullgraph_on_cuda():
    torch._dynamo.reset()
    cfg = leanmoe.MoEConfig(dim=256, hidden_dim=128, num_experts=16, top_k=4, backend="grouped_mm")
    layer = leanmoe.MoE(cfg, device="cuda", dtype=torch.bfloat16)
    compiled = torch.compile(layer, fullgraph=True)
    x = torch.randn(300, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y = compiled(x)
    y.float().square().sum().backward()
    assert_close(y, layer(x.detach()), tol=BF16_TOL)


def test_grouped_mm_is_deterministic_on_cuda():
    p = make_problem(4096, 256, 128, 16, 4, bias=True, dtype=torch.bfloat16, device="cuda", seed=2)
    dy = torch.randn(4096, 256, device="cuda", dtype=torch.bfloat16)
    y1, g1 = _fwd_bwd(p, "grouped_mm", dy)
    y2, g2 = _fwd_bwd(p, "grouped_mm", dy)
    assert torch.equal(y1, y2) and all(torch.equal(a, b) for a, b in zip(g1, g2, strict=True))
