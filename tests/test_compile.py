"""Every CPU backend and the layer under torch.compile(fullgraph=True), forward and backward."""

from __future__ import annotations

import pytest
import torch

import leanmoe
from tests.helpers import TOLERANCES, assert_close, make_problem

pytestmark = [pytest.mark.slow, pytest.mark.no_poison]


def _compiled_experts(backend, save_percent=0):
    def f(x, ids, w, gu, down, gub, db):
        return leanmoe.moe_experts(x, ids, w, gu, down, gub, db, activation="swiglu", backend=backend,
                                   check_ids=False, save_percent=save_percent)

    return torch.compile(f, fullgraph=True)


# The reference runs in any dtype; grouped_mm's opaque custom ops in every dtype it runs eagerly on the CPU (Inductor
# never sees torch._grouped_mm, whose compiled kernel takes bfloat16 only); triton's custom ops run its kernels in
# the interpreter on the CPU.
@pytest.mark.parametrize("backend,dtype,save_percent", [
    ("reference", torch.float32, 0),
    ("grouped_mm", torch.float32, 0),
    ("grouped_mm", torch.float16, 0),
    ("grouped_mm", torch.bfloat16, 0),
    ("grouped_mm", torch.float32, 100),  # the saved pre-activations pass from the forward op to the backward op
    ("triton", torch.float32, 0),
], ids=lambda v: str(v).replace("torch.", ""))
def test_backend_compiles_fullgraph(backend, dtype, save_percent):
    torch._dynamo.reset()
    p = make_problem(24, 16, 8, 5, 2, bias=True, dtype=dtype, seed=0)
    eager = leanmoe.moe_experts(*p.args(), backend=backend, **p.kwargs(), save_percent=save_percent)
    dy = torch.randn_like(eager)
    ref_grads = torch.autograd.grad(eager, p.inputs(), dy)
    # The reference loop's torch.where has a data-dependent size: dynamo must be allowed to capture it.
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=(backend == "reference")):
        y = _compiled_experts(backend, save_percent)(*p.args())
        grads = torch.autograd.grad(y, p.inputs(), dy)
    # Compiled and eager runs of one backend differ only by fusion-order rounding.
    assert_close(y, eager, tol=TOLERANCES[dtype], name="y")
    for g, r in zip(grads, ref_grads, strict=True):
        assert_close(g, r, tol=TOLERANCES[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_grouped_mm_with_token_mask_compiles_fullgraph(dtype):
    # Compiled with a mask, against the eager reference: masked tokens (NaN x rows) give exact zeros.
    from leanmoe.experts.registry import get_backend

    torch._dynamo.reset()
    p = make_problem(24, 16, 8, 5, 2, bias=True, dtype=dtype, seed=1)
    mask = torch.rand(24, generator=torch.Generator().manual_seed(2)) < 0.6
    x = torch.where(mask[:, None], p.x_TD.detach(), float("nan")).requires_grad_(True)
    inputs = [x, *p.inputs()[1:]]
    backend = get_backend("grouped_mm")

    def f(x, ids, w, gu, down, gub, db, mask):
        return backend(x, ids, w, gu, down, gub, db, activation=p.activation, gate_up_layout="concatenated",
                       save_percent=0, token_mask=mask)

    y = torch.compile(f, fullgraph=True)(x, p.topk_ids_TK, *p.inputs()[1:], mask)
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, inputs, dy)
    ref_y = get_backend("reference")(x, p.topk_ids_TK, *p.inputs()[1:], activation=p.activation,
                                     gate_up_layout="concatenated", save_percent=0, token_mask=mask)
    ref_grads = torch.autograd.grad(ref_y, inputs, dy)
    assert torch.equal(y[~mask], torch.zeros_like(y[~mask]))
    assert torch.equal(grads[0][~mask], torch.zeros_like(grads[0][~mask]))
    assert_close(y, ref_y, tol=TOLERANCES[dtype], name="y")
    for g, r in zip(grads, ref_grads, strict=True):
        assert_close(g, r, tol=TOLERANCES[dtype])


def test_layer_compiles_fullgraph_and_a_new_token_count_reuses_it():
    torch._dynamo.reset()
    cfg = leanmoe.MoEConfig(dim=16, hidden_dim=8, num_experts=6, top_k=2, num_shared_experts=1,
                            aux_loss_coef=0.01, backend="grouped_mm")
    layer = leanmoe.MoE(cfg, dtype=torch.bfloat16)
    compiled = torch.compile(layer, fullgraph=True, dynamic=True)
    for T in (10, 17):
        x = torch.randn(T, 16, dtype=torch.bfloat16, requires_grad=True)
        y = compiled(x)
        (y.float().square().sum() + layer.aux_loss).backward()
        assert x.grad is not None and not x.grad.isnan().any()
        assert_close(y, layer(x.detach()), tol=TOLERANCES[torch.bfloat16])
