"""Every CPU backend and the layer under torch.compile(fullgraph=True), forward and backward."""

from __future__ import annotations

import pytest
import torch

import leanmoe
from tests.helpers import TOLERANCES, assert_close, make_problem

pytestmark = [pytest.mark.slow, pytest.mark.no_poison]


def _compiled_experts(backend):
    def f(x, ids, w, gu, down, gub, db):
        return leanmoe.moe_experts(x, ids, w, gu, down, gub, db, activation="swiglu", backend=backend,
                                   check_ids=False)

    return torch.compile(f, fullgraph=True)


# torch._grouped_mm traces in bfloat16 only; the reference runs in any dtype; triton's custom ops run its kernels
# in the interpreter on the CPU.
@pytest.mark.parametrize("backend,dtype", [("reference", torch.float32), ("grouped_mm", torch.bfloat16),
                                           ("triton", torch.float32)])
def test_backend_compiles_fullgraph(backend, dtype):
    torch._dynamo.reset()
    p = make_problem(24, 16, 8, 5, 2, bias=True, dtype=dtype)
    eager = leanmoe.moe_experts(*p.args(), backend=backend, **p.kwargs())
    dy = torch.randn_like(eager)
    ref_grads = torch.autograd.grad(eager, p.inputs(), dy)
    # The reference loop's torch.where has a data-dependent size: dynamo must be allowed to capture it.
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=(backend == "reference")):
        y = _compiled_experts(backend)(*p.args())
        grads = torch.autograd.grad(y, p.inputs(), dy)
    # Compiled and eager runs of one backend differ only by fusion-order rounding.
    assert_close(y, eager, tol=TOLERANCES[dtype], name="y")
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
