"""The MoE layer: shapes, the seams composed by hand, shared experts, masks, losses, backends agree."""

from __future__ import annotations

import pytest
import torch

import leanmoe
from tests.helpers import TOLERANCES, assert_close


def small_config(**kw) -> leanmoe.MoEConfig:
    base = {"dim": 32, "hidden_dim": 16, "num_experts": 8, "top_k": 2}
    base.update(kw)
    return leanmoe.MoEConfig(**base)


def test_output_shape_matches_input():
    layer = leanmoe.MoE(small_config())
    for shape in [(5, 32), (2, 3, 32), (1, 1, 1, 32)]:
        assert layer(torch.randn(*shape)).shape == shape


def test_layer_equals_router_then_experts_by_hand():
    layer = leanmoe.MoE(small_config(num_shared_experts=2, shared_expert_gate=True))
    x = torch.randn(2, 7, 32)
    x_TD = x.reshape(-1, 32)
    r = layer.router(x_TD)
    expected = leanmoe.moe_experts(x_TD, r.topk_ids_TK, r.topk_weights_TK, layer.experts.gate_up_proj,
                                   layer.experts.down_proj, backend="reference")
    se = layer.shared_experts
    shared = se.down_proj(torch.nn.functional.silu(se.gate_proj(x_TD)) * se.up_proj(x_TD))
    expected = expected + shared * torch.sigmoid(se.gate(x_TD))
    assert_close(layer(x).reshape(-1, 32), expected, tol=1e-5)


def test_shared_hidden_dim_default_and_explicit():
    assert leanmoe.MoE(small_config(num_shared_experts=2)).shared_experts.gate_proj.out_features == 32
    assert leanmoe.MoE(small_config(num_shared_experts=1, shared_hidden_dim=24)).shared_experts.up_proj.out_features \
        == 24


def test_token_mask_gives_zero_output_and_no_gradient():
    layer = leanmoe.MoE(small_config(num_shared_experts=1))
    x = torch.randn(3, 4, 32, requires_grad=True)
    mask = torch.rand(3, 4) > 0.5
    mask[0, 0], mask[0, 1] = True, False
    y = layer(x, token_mask=mask)
    assert (y[~mask] == 0).all() and (y[mask] != 0).any()
    y.sum().backward()
    assert (x.grad[~mask] == 0).all()
    assert layer.tokens_per_expert.sum().item() == 2 * int(mask.sum())


@pytest.mark.parametrize("backend", ["grouped_mm", "triton"])
def test_backends_agree_through_the_layer(backend):
    # triton runs in its interpreter here (fp32, small sizes); each backend against the reference loop.
    torch.manual_seed(0)
    ref_layer = leanmoe.MoE(small_config(bias=True, aux_loss_coef=0.01, num_shared_experts=1, backend="reference"))
    layer = leanmoe.MoE(small_config(bias=True, aux_loss_coef=0.01, num_shared_experts=1, backend=backend))
    layer.load_state_dict(ref_layer.state_dict())
    x = torch.randn(4, 9, 32)
    mask = torch.rand(4, 9) > 0.3
    ref_x, out_x = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ref_y, out_y = ref_layer(ref_x, token_mask=mask), layer(out_x, token_mask=mask)
    assert_close(out_y, ref_y, tol=TOLERANCES[torch.float32], name="y")
    (ref_y.square().sum() + ref_layer.aux_loss).backward()
    (out_y.square().sum() + layer.aux_loss).backward()
    assert_close(out_x.grad, ref_x.grad, tol=TOLERANCES[torch.float32], name="dx")
    ref_params = dict(ref_layer.named_parameters())
    for name, p in layer.named_parameters():
        assert p.grad is not None, name
        assert_close(p.grad, ref_params[name].grad, tol=TOLERANCES[torch.float32], name=f"d{name}")


def test_aux_loss_and_counts_exposed_without_sync():
    layer = leanmoe.MoE(small_config(aux_loss_coef=0.01, z_loss_coef=0.001))
    layer(torch.randn(10, 32))
    assert isinstance(layer.aux_loss, torch.Tensor) and layer.aux_loss.requires_grad
    assert layer.tokens_per_expert.shape == (8,) and layer.tokens_per_expert.sum().item() == 20


def test_zero_tokens_through_the_layer():
    layer = leanmoe.MoE(small_config(num_shared_experts=1))
    x = torch.randn(0, 32, requires_grad=True)
    y = layer(x)
    assert y.shape == (0, 32)
    y.sum().backward()
    assert x.grad.shape == (0, 32)


def test_bf16_layer_runs():
    layer = leanmoe.MoE(small_config(), dtype=torch.bfloat16)
    y = layer(torch.randn(6, 32, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and not y.isnan().any()


def test_state_dict_layout_is_transformers_v5():
    sd = leanmoe.MoE(small_config(bias=True)).state_dict()
    assert sd["experts.gate_up_proj"].shape == (8, 32, 32)
    assert sd["experts.down_proj"].shape == (8, 32, 16)
    assert sd["experts.gate_up_bias"].shape == (8, 32) and sd["experts.down_bias"].shape == (8, 32)
    assert sd["router.weight"].shape == (8, 32)


def test_explain_backend_says_why():
    layer = leanmoe.MoE(small_config())
    x = torch.randn(4, 32)
    r = layer.router(x)
    why = layer.experts.explain_backend(x, r.topk_ids_TK, r.topk_weights_TK)
    assert "auto picked 'grouped_mm'" in why
