"""Token masks: masked tokens cost nothing and leak nothing, on every backend that runs on the CPU.

Legend: T tokens, D model dim, I expert hidden dim, E experts, K top-k.

Each check runs the masked call with NaN/inf in the masked rows of x and compares it with the reference backend run
on the kept tokens alone: kept rows and every gradient must match, masked rows of the output and of dx (and of the
routing-weight gradient) must be exactly 0. triton runs in its interpreter (fp32, small sizes).
"""

from __future__ import annotations

import pytest
import torch

import leanmoe
from tests.helpers import TOLERANCES, assert_close, make_problem

pytestmark = pytest.mark.usefixtures("one_thread")

BACKENDS = ["reference", "grouped_mm", "triton"]
TOL = TOLERANCES[torch.float32]


def poison_masked_rows(x_TD: torch.Tensor, mask_T: torch.Tensor) -> torch.Tensor:
    """x with NaN in half of the masked rows and +inf in the other half (padding that was never written)."""
    x_TD = x_TD.detach().clone()
    masked = (~mask_T).nonzero().flatten()
    x_TD[masked[0::2]] = float("nan")
    x_TD[masked[1::2]] = float("inf")
    return x_TD


def random_mask(T: int, kind: str, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if kind == "none_masked":
        return torch.ones(T, dtype=torch.bool)
    if kind == "all_masked":
        return torch.zeros(T, dtype=torch.bool)
    mask = torch.rand(T, generator=gen) > 0.4
    if T >= 2:
        mask[0], mask[1] = True, False  # at least one kept and one masked token
    return mask


# (T, D, I, E, K, routing, mask kind); each odd case names the edge it hits.
CASES = [
    pytest.param(13, 32, 16, 5, 2, "uniform", "some_masked", id="T13-E5-K2"),
    pytest.param(9, 32, 16, 7, 1, "uniform", "some_masked", id="T9-E7-K1"),  # K=1, prime E
    pytest.param(8, 32, 16, 4, 4, "uniform", "some_masked", id="T8-E4-K4"),  # K=E: every token on every expert
    pytest.param(11, 32, 16, 6, 2, "one_expert", "some_masked", id="T11-one-expert"),  # all tokens on expert 0
    pytest.param(10, 32, 16, 8, 2, "few_experts", "some_masked", id="T10-few-experts"),  # experts with no token
    pytest.param(6, 32, 16, 5, 2, "uniform", "all_masked", id="T6-all-masked"),  # no kept row at all
    pytest.param(7, 32, 16, 5, 2, "uniform", "none_masked", id="T7-none-masked"),  # the mask changes nothing
    pytest.param(0, 32, 16, 5, 2, "uniform", "all_masked", id="T0"),  # an empty batch with an empty mask
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("T,D,I,E,K,routing,kind", CASES)
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_moe_experts_mask_equals_running_only_the_kept_tokens(backend, T, D, I, E, K, routing, kind, bias):
    p = make_problem(T, D, I, E, K, bias=bias, routing=routing, seed=T * 31 + E, requires_grad=False)
    mask_T = random_mask(T, kind, seed=T + K)
    x_TD = poison_masked_rows(p.x_TD, mask_T).requires_grad_(True)
    weights_TK = p.topk_weights_TK.clone().requires_grad_(True)
    params = [t.clone().requires_grad_(True) for t in (p.gate_up_proj, p.down_proj, p.gate_up_bias, p.down_bias)
              if t is not None]
    ref_params = [t.clone().requires_grad_(True) for t in params]
    dy_TD = torch.randn(T, D, generator=torch.Generator().manual_seed(1))

    def run(x, ids, w, ps, backend, **kw):
        gate_up, down, *biases = ps
        return leanmoe.moe_experts(x, ids, w, gate_up, down, *(biases or [None, None]), backend=backend,
                                   **p.kwargs(), **kw)

    out_y = run(x_TD, p.topk_ids_TK, weights_TK, params, backend, token_mask=mask_T)
    ref_x = p.x_TD[mask_T].clone().requires_grad_(True)
    ref_w = p.topk_weights_TK[mask_T].clone().requires_grad_(True)
    ref_y = run(ref_x, p.topk_ids_TK[mask_T], ref_w, ref_params, "reference")

    assert out_y.shape == (T, D)
    assert (out_y[~mask_T] == 0).all(), "masked tokens must give exactly zero output rows"
    assert_close(out_y[mask_T], ref_y, tol=TOL, name=f"{backend} y (kept rows)")

    out_grads = torch.autograd.grad(out_y, [x_TD, weights_TK, *params], dy_TD, allow_unused=True)
    ref_grads = torch.autograd.grad(ref_y, [ref_x, ref_w, *ref_params], dy_TD[mask_T], allow_unused=True)
    out_dx, out_dw, *out_dparams = (g if g is not None else torch.zeros_like(t)
                                    for g, t in zip(out_grads, [x_TD, weights_TK, *params], strict=True))
    ref_dx, ref_dw, *ref_dparams = (g if g is not None else torch.zeros_like(t)
                                    for g, t in zip(ref_grads, [ref_x, ref_w, *ref_params], strict=True))
    assert (out_dx[~mask_T] == 0).all(), "masked tokens must get exactly zero dx"
    assert (out_dw[~mask_T] == 0).all(), "masked tokens must get exactly zero routing-weight gradients"
    assert_close(out_dx[mask_T], ref_dx, tol=TOL, name=f"{backend} dx (kept rows)")
    assert_close(out_dw[mask_T], ref_dw, tol=TOL, name=f"{backend} dweights (kept rows)")
    for i, (out_g, ref_g) in enumerate(zip(out_dparams, ref_dparams, strict=True)):
        assert_close(out_g, ref_g, tol=TOL, name=f"{backend} d(expert parameter {i})")


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_call_under_no_grad_gives_zero_rows(backend):
    p = make_problem(12, 32, 16, 5, 2, seed=3, requires_grad=False)
    mask_T = random_mask(12, "some_masked", seed=4)
    with torch.no_grad():
        y = leanmoe.moe_experts(poison_masked_rows(p.x_TD, mask_T), *p.args()[1:], **p.kwargs(), backend=backend,
                                token_mask=mask_T)
        ref = leanmoe.moe_experts(p.x_TD[mask_T], p.topk_ids_TK[mask_T], p.topk_weights_TK[mask_T],
                                  *p.args()[3:], **p.kwargs(), backend="reference")
    assert (y[~mask_T] == 0).all()
    assert_close(y[mask_T], ref, tol=TOL, name=f"{backend} no_grad")


def layer_config(backend: str) -> leanmoe.MoEConfig:
    # Shared experts behind a gate, both losses and a router bias: every path a masked token could leak through.
    return leanmoe.MoEConfig(dim=32, hidden_dim=16, num_experts=6, top_k=2, bias=True, router_bias=True,
                             num_shared_experts=1, shared_expert_gate=True, aux_loss_coef=0.01, z_loss_coef=0.001,
                             backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["some_masked", "all_masked"])
def test_layer_mask_equals_running_only_the_kept_tokens(backend, kind):
    torch.manual_seed(0)
    layer = leanmoe.MoE(layer_config(backend))
    ref_layer = leanmoe.MoE(layer_config("reference"))
    ref_layer.load_state_dict(layer.state_dict())
    x = torch.randn(3, 5, 32)
    mask = random_mask(15, kind, seed=5).view(3, 5)
    out_x = poison_masked_rows(x.view(15, 32), mask.view(15)).view(3, 5, 32).requires_grad_(True)
    ref_x = x[mask].clone().requires_grad_(True)  # [kept, D]: only the kept tokens
    dy = torch.randn(3, 5, 32)

    out_y = layer(out_x, token_mask=mask)
    ref_y = ref_layer(ref_x)
    assert (out_y[~mask] == 0).all(), "masked tokens must give exactly zero output rows"
    assert_close(out_y[mask], ref_y, tol=TOL, name=f"{backend} layer y")
    assert torch.equal(layer.tokens_per_expert, ref_layer.tokens_per_expert)
    assert torch.isfinite(layer.aux_loss)
    assert_close(layer.aux_loss, ref_layer.aux_loss, tol=TOL, name="aux_loss")

    ((out_y * dy).sum() + layer.aux_loss).backward()
    ((ref_y * dy[mask]).sum() + ref_layer.aux_loss).backward()
    assert (out_x.grad[~mask] == 0).all(), "masked tokens must get exactly zero dx"
    assert_close(out_x.grad[mask], ref_x.grad, tol=TOL, name=f"{backend} layer dx")
    ref_params = dict(ref_layer.named_parameters())
    for name, param in layer.named_parameters():
        ref_grad = ref_params[name].grad
        if ref_grad is None:  # all masked: nothing reaches this parameter
            ref_grad = torch.zeros_like(param)
        grad = param.grad if param.grad is not None else torch.zeros_like(param)
        assert torch.isfinite(grad).all(), f"{name}: a NaN in a masked row leaked into its gradient"
        if ref_grad.abs().max() == 0:
            assert (grad == 0).all(), f"d{name} must be exactly 0 when every token is masked"
        else:
            assert_close(grad, ref_grad, tol=TOL, name=f"{backend} d{name}")


def test_router_keeps_nan_in_masked_rows_out_of_everything():
    config = leanmoe.MoEConfig(dim=8, hidden_dim=4, num_experts=4, top_k=2, router_bias=True, aux_loss_coef=1.0,
                               z_loss_coef=0.1, score_func="sigmoid")
    router = leanmoe.TopKRouter(config)
    x = torch.randn(6, 8)
    mask = torch.tensor([True, False, True, False, True, True])
    out_x = poison_masked_rows(x, mask).requires_grad_(True)
    out = router(out_x, mask)
    for name in ("topk_weights_TK", "logits_TE", "aux_loss"):
        assert torch.isfinite(getattr(out, name)).all(), f"{name} has a NaN/inf from a masked row"
    assert (out.topk_weights_TK[~mask] == 0).all()
    assert ((out.topk_ids_TK >= 0) & (out.topk_ids_TK < 4)).all()
    (out.topk_weights_TK.sum() + out.aux_loss).backward()
    out_dweight, out_dbias = router.weight.grad.clone(), router.bias.grad.clone()
    router.zero_grad(set_to_none=True)
    ref_x = x[mask].clone().requires_grad_(True)
    ref = router(ref_x)
    (ref.topk_weights_TK.sum() + ref.aux_loss).backward()
    assert (out_x.grad[~mask] == 0).all()
    assert_close(out_x.grad[mask], ref_x.grad, tol=1e-5, name="router dx")
    assert_close(out_dweight, router.weight.grad, tol=1e-5, name="router dweight")
    assert_close(out_dbias, router.bias.grad, tol=1e-5, name="router dbias")
    assert_close(out.aux_loss, ref.aux_loss, tol=1e-6, name="aux_loss")


def test_layer_nan_in_masked_rows_under_no_grad():
    layer = leanmoe.MoE(layer_config("auto"))
    x = torch.randn(2, 6, 32)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[:, 4:] = False  # right padding
    with torch.no_grad():
        y = layer(poison_masked_rows(x.view(12, 32), mask.view(12)).view(2, 6, 32), token_mask=mask)
    assert torch.isfinite(y).all() and (y[~mask] == 0).all()


# --- the mask's own validation: never broadcast, never coerced ------------------------------------------------


@pytest.mark.parametrize("mask,error,match", [
    (torch.ones(1, dtype=torch.bool), ValueError, r"token_mask must have shape \[2, 3\] \(one flag per token\), "
                                                  r"got \[1\]"),
    (torch.ones(2, 1, dtype=torch.bool), ValueError, r"must have shape \[2, 3\].*got \[2, 1\]"),  # broadcastable
    (torch.ones(6, dtype=torch.bool), ValueError, r"must have shape \[2, 3\].*got \[6\]"),  # same numel, flat
    (torch.ones(3, 2, dtype=torch.bool), ValueError, r"must have shape \[2, 3\].*got \[3, 2\]"),
    (torch.ones(2, 3), TypeError, r"token_mask must be a bool tensor \(True = keep\), got dtype torch.float32"),
    (torch.ones(2, 3, dtype=torch.uint8), TypeError, "got dtype torch.uint8"),
    ([[True] * 3] * 2, TypeError, r"token_mask must be a bool tensor of shape \[2, 3\] or None, got list"),
    (torch.ones(2, 3, dtype=torch.bool, device="meta"), ValueError, "token_mask is on meta but x is on cpu"),
], ids=["one", "broadcastable", "flat", "transposed", "float", "uint8", "list", "device"])
def test_layer_refuses_bad_masks(mask, error, match):
    layer = leanmoe.MoE(leanmoe.MoEConfig(dim=8, hidden_dim=4, num_experts=4, top_k=2))
    with pytest.raises(error, match=match):
        layer(torch.randn(2, 3, 8), token_mask=mask)


@pytest.mark.parametrize("mask,error,match", [
    (torch.ones(5, 1, dtype=torch.bool), ValueError, r"token_mask must have shape \[5\].*got \[5, 1\]"),
    (torch.ones(4, dtype=torch.bool), ValueError, r"token_mask must have shape \[5\].*got \[4\]"),
    (torch.ones(5, dtype=torch.int64), TypeError, "token_mask must be a bool tensor.*got dtype torch.int64"),
    (1, TypeError, "token_mask must be a bool tensor of shape \\[5\\] or None, got int"),
    (torch.ones(5, dtype=torch.bool, device="meta"), ValueError, "token_mask is on meta but x is on cpu"),
], ids=["2d", "short", "int", "int-scalar", "device"])
def test_moe_experts_and_router_refuse_bad_masks(mask, error, match):
    p = make_problem(5, 8, 4, 3, 2, requires_grad=False)
    with pytest.raises(error, match=match):
        leanmoe.moe_experts(*p.args(), **p.kwargs(), token_mask=mask)
    router = leanmoe.TopKRouter(leanmoe.MoEConfig(dim=8, hidden_dim=4, num_experts=3, top_k=2))
    with pytest.raises(error, match=match):
        router(p.x_TD, mask)


@pytest.mark.no_poison  # torch.compile cannot trace the NaN-poisoning replacements of torch.empty
def test_layer_with_a_mask_compiles_fullgraph():
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = leanmoe.MoE(layer_config("grouped_mm"))
    compiled = torch.compile(layer, fullgraph=True)
    x = torch.randn(2, 7, 32)
    mask = random_mask(14, "some_masked", seed=2).view(2, 7)
    x_in = poison_masked_rows(x.view(14, 32), mask.view(14)).view(2, 7, 32)
    out_x, ref_x = x_in.clone().requires_grad_(True), x_in.clone().requires_grad_(True)
    out_y, ref_y = compiled(out_x, mask), layer(ref_x, token_mask=mask)
    assert (out_y[~mask] == 0).all()
    assert_close(out_y, ref_y, tol=TOL, name="compiled y")
    out_y.sum().backward()
    ref_y.sum().backward()
    assert (out_x.grad[~mask] == 0).all()
    assert_close(out_x.grad, ref_x.grad, tol=TOL, name="compiled dx")
