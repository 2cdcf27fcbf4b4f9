"""Meta-device construction: build on ``meta``, ``to_empty``, ``reset_parameters``: the layer construction gives.

Also ``moe_experts`` on meta tensors: a meta ``[T, D]`` output on every backend, no data read (FSDP and
torch.compile trace on such tensors).
"""

from __future__ import annotations

import pytest
import torch

import leanmoe
from tests.helpers import make_problem

pytestmark = pytest.mark.usefixtures("one_thread")

BACKENDS = ["reference", "grouped_mm", "triton"]


def full_config(**kw) -> leanmoe.MoEConfig:
    # Every parameter and buffer kind: expert biases, router bias, balancing buffers, gated shared experts.
    base = dict(dim=16, hidden_dim=8, num_experts=4, top_k=2, bias=True, router_bias=True, balance_bias=True,
                num_shared_experts=1, shared_expert_gate=True, aux_loss_coef=0.01)
    base.update(kw)
    return leanmoe.MoEConfig(**base)


def materialise(config: leanmoe.MoEConfig, seed: int) -> leanmoe.MoE:
    layer = leanmoe.MoE(config, device="meta")
    assert all(t.is_meta for t in [*layer.parameters(), *layer.buffers()])
    layer.to_empty(device="cpu")  # conftest fills fresh memory with NaN: anything left uninitialised shows
    torch.manual_seed(seed)
    layer.reset_parameters()
    return layer


def test_meta_layer_after_to_empty_and_reset_equals_a_constructed_one():
    torch.manual_seed(7)
    ref = leanmoe.MoE(full_config())
    layer = materialise(full_config(), seed=7)
    ref_state, state = ref.state_dict(keep_vars=True), layer.state_dict(keep_vars=True)
    assert state.keys() == ref_state.keys()
    for name, t in state.items():
        assert torch.equal(t, ref_state[name]), f"{name} is not initialised as construction does"
    for (name, buf), (_, ref_buf) in zip(layer.named_buffers(), ref.named_buffers(), strict=True):
        assert torch.equal(buf, ref_buf), f"buffer {name} (persistent or not) differs"


def test_meta_layer_runs_and_trains_like_a_constructed_one():
    torch.manual_seed(3)
    ref = leanmoe.MoE(full_config())
    layer = materialise(full_config(), seed=3)
    ref.train(), layer.train()
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (ref, layer)]
    x = torch.randn(2, 5, 16)
    mask = torch.rand(2, 5) > 0.3
    for _ in range(2):
        losses = []
        for m, opt in zip((ref, layer), opts, strict=True):
            opt.zero_grad()
            loss = m(x, token_mask=mask).square().mean() + m.aux_loss
            loss.backward()
            opt.step()
            leanmoe.update_balance_biases(m)
            losses.append(loss.detach())
        assert torch.equal(losses[0], losses[1])
    for (name, p), (_, ref_p) in zip(layer.named_parameters(), ref.named_parameters(), strict=True):
        assert torch.isfinite(p).all() and torch.equal(p, ref_p), name
    assert torch.equal(layer.router.expert_bias, ref.router.expert_bias)


def test_reset_parameters_restores_construction_state():
    torch.manual_seed(1)
    ref = leanmoe.MoE(full_config())
    layer = leanmoe.MoE(full_config())
    layer.train()
    layer(torch.randn(6, 16)).sum().backward()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(1.0)
    leanmoe.update_balance_biases(layer)
    torch.manual_seed(1)
    layer.reset_parameters()
    for (name, t), (_, ref_t) in zip(layer.state_dict().items(), ref.state_dict().items(), strict=True):
        assert torch.equal(t, ref_t), name
    assert (layer.router.expert_load == 0).all()


def test_meta_layer_with_a_cuda_only_backend_builds_and_materialises_on_a_device_it_runs_on():
    # Under the interpreter triton runs CPU tensors; on meta the device is not decided, so nothing is refused.
    layer = materialise(full_config(backend="triton"), seed=0)
    assert layer.experts.backend == "triton"


def test_meta_layer_forward_gives_meta_output():
    layer = leanmoe.MoE(full_config(backend="reference"), device="meta")
    x = torch.empty(3, 4, 16, device="meta")
    y = layer(x, token_mask=torch.ones(3, 4, dtype=torch.bool, device="meta"))
    assert y.is_meta and y.shape == (3, 4, 16) and y.dtype == torch.float32


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_moe_experts_on_meta_tensors_gives_a_meta_output(backend, masked, dtype):
    p = make_problem(9, 32, 16, 5, 2, bias=True, dtype=dtype, device="meta", requires_grad=True)
    mask = torch.empty(9, dtype=torch.bool, device="meta") if masked else None
    y = leanmoe.moe_experts(*p.args(), **p.kwargs(), backend=backend, token_mask=mask, check_ids=True)
    assert y.is_meta and y.shape == (9, 32) and y.dtype == dtype


def test_compile_traces_a_meta_built_layer():
    """A meta-built layer traces under torch.compile (as FSDP and memory estimation do), without data."""
    layer = leanmoe.MoE(full_config(backend="auto", balance_bias=False), device="meta")
    compiled = torch.compile(layer, backend="eager", fullgraph=True)
    y = compiled(torch.empty(2, 3, 16, device="meta"))
    assert y.is_meta and y.shape == (2, 3, 16)
