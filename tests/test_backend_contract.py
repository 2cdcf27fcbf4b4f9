"""The backend contract: a backend receives one ExpertWeights, declares its capabilities, and says why it refuses.

Legend: T tokens, D model dim, I expert hidden dim, N gate/up rows, E experts, K top-k.

The example backend below is a teaching example (CONTRIBUTING.md, "Adding a backend"): it computes every expert on
every token and keeps the routed ones, O(T*E) work. It is checked against the reference like a real backend.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import leanmoe
from leanmoe.activations import apply_activation
from leanmoe.experts import BUILTIN_BACKENDS, registry
from leanmoe.experts.functional import run_experts
from leanmoe.experts.registry import ExpertsBackend, ExpertsCall, get_backend, same_dtype_reason, select_backend
from leanmoe.experts.weights import ExpertWeights
from tests.helpers import TOLERANCES, assert_close, make_problem

# --- the example backend (the text CONTRIBUTING.md shows) ---------------------------------------------------------

class DenseEinsumBackend(ExpertsBackend):
    """Every expert on every token, then the routing weights as a dense [T, E] matrix (0 off the chosen experts).
    A teaching example, never fast: real backends compute routed rows only."""

    name = "example_dense"
    priority = -1  # below the reference: auto never picks it; name it to use it

    def unsupported_reason(self, call: ExpertsCall) -> str | None:
        if call.dtype not in (torch.float32, torch.float64):
            return f"dtype {call.dtype} (the example runs float32 or float64)"
        return same_dtype_reason(call)  # its einsums take the weights in x's dtype

    def __call__(self, x_TD, topk_ids_TK, topk_weights_TK, weights: ExpertWeights, *, save_percent,
                 token_mask=None):
        w_TK = topk_weights_TK.to(x_TD.dtype)
        if token_mask is not None:  # masked rows may hold NaN: zero them, so that they reach nothing
            x_TD = torch.where(token_mask[:, None], x_TD, 0)
            w_TK = torch.where(token_mask[:, None], w_TK, 0)
        gate_up_TEN = torch.einsum("td,end->ten", x_TD, weights.gate_up_proj)
        if weights.gate_up_bias is not None:
            gate_up_TEN = gate_up_TEN + weights.gate_up_bias
        h_TEI = apply_activation(gate_up_TEN, weights.activation, weights.gate_up_layout)
        out_TED = torch.einsum("tei,edi->ted", h_TEI, weights.down_proj)
        if weights.down_bias is not None:
            out_TED = out_TED + weights.down_bias
        gates_TE = x_TD.new_zeros(x_TD.shape[0], weights.num_experts).scatter_add(1, topk_ids_TK.long(), w_TK)
        return torch.einsum("te,ted->td", gates_TE, out_TED)


@pytest.fixture
def example():
    backend = leanmoe.register_backend(DenseEinsumBackend())
    yield backend.name
    del registry._BACKENDS[backend.name]  # the registry has no unregister


def _leaves(p):
    return [t.detach().clone().requires_grad_(t.is_floating_point()) if t is not None else None for t in p.args()]


def _forward_and_grads(p, backend, token_mask=None):
    x, ids, w, gu, down, gub, db = _leaves(p)
    y = leanmoe.moe_experts(x, ids, w, gu, down, gub, db, **p.kwargs(), backend=backend,
                            token_mask=token_mask)
    inputs = [t for t in (x, w, gu, down, gub, db) if t is not None]
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(7), dtype=y.dtype)
    return y, torch.autograd.grad(y, inputs, dy)


@pytest.mark.parametrize("T, D, I, E, K, bias, activation, routing", [
    (20, 16, 8, 4, 2, True, "swiglu", "uniform"),
    (9, 12, 6, 7, 3, False, "relu2", "uniform"),  # prime E, a non-gated activation
    (8, 16, 8, 5, 1, True, "geglu_exact", "one_expert"),  # K=1, all tokens on expert 0
    (6, 16, 8, 4, 4, False, "clamped_swiglu", "uniform"),  # K=E
    (5, 16, 8, 6, 2, True, "swiglu", "few_experts"),  # experts with zero tokens
    (0, 16, 8, 4, 2, True, "swiglu", "uniform"),  # T=0
], ids=lambda v: str(v))
def test_example_backend_matches_the_reference(example, T, D, I, E, K, bias, activation, routing):
    p = make_problem(T, D, I, E, K, bias=bias, activation=activation, routing=routing)
    out_y, out_grads = _forward_and_grads(p, example)
    ref_y, ref_grads = _forward_and_grads(p, "reference")
    assert_close(out_y, ref_y, tol=TOLERANCES[torch.float32], name="y")
    for i, (g, r) in enumerate(zip(out_grads, ref_grads, strict=True)):
        assert_close(g, r, tol=TOLERANCES[torch.float32], name=f"grad {i}")


def test_example_backend_keeps_masked_tokens_out(example):
    p = make_problem(12, 16, 8, 4, 2, bias=True)
    mask = torch.arange(12) % 3 != 0
    p.x_TD = torch.where(mask[:, None], p.x_TD.detach(), float("nan"))  # a masked row may hold anything
    out_y, out_grads = _forward_and_grads(p, example, mask)
    ref_y, ref_grads = _forward_and_grads(p, "reference", mask)
    assert torch.equal(out_y[~mask], torch.zeros_like(out_y[~mask]))
    assert torch.equal(out_grads[0][~mask], torch.zeros_like(out_grads[0][~mask]))
    assert_close(out_y, ref_y, tol=TOLERANCES[torch.float32], name="y")
    for g, r in zip(out_grads, ref_grads, strict=True):
        assert_close(g, r, tol=TOLERANCES[torch.float32])


def test_example_backend_is_chosen_only_by_name_and_says_why_it_refuses(example):
    p = make_problem(4, 16, 8, 4, 2)
    call = leanmoe.describe_call(*p.args(), **p.kwargs())
    assert select_backend("auto", call)[0].name != example
    assert select_backend(example, call)[0].name == example
    with pytest.raises(ValueError, match="backend 'example_dense' cannot run this call: dtype torch.bfloat16"):
        select_backend(example, dataclasses.replace(call, dtype=torch.bfloat16, weight_dtype=torch.bfloat16))


# --- capabilities: LoRA and per-expert scales ---------------------------------------------------------------------

def _weights(p, **extra) -> ExpertWeights:
    return ExpertWeights(gate_up_proj=p.gate_up_proj, down_proj=p.down_proj, gate_up_bias=p.gate_up_bias,
                         down_bias=p.down_bias, activation=p.activation, gate_up_layout=p.gate_up_layout, **extra)


def test_the_built_in_backends_are_listed_once_and_registered():
    names = [cls.name for cls in BUILTIN_BACKENDS]
    assert sorted(names) == sorted({"reference", "grouped_mm", "triton", "triton_decode"})
    assert all(type(get_backend(n)) is cls for n, cls in zip(names, BUILTIN_BACKENDS, strict=True))
    assert leanmoe.lora.LORA_BACKENDS == tuple(n for n in leanmoe.available_backends() if get_backend(n).takes_lora)


def test_a_backend_without_lora_names_the_missing_capability():
    p = make_problem(6, 16, 8, 4, 2, requires_grad=False)
    lora = leanmoe.ExpertLoRA(num_experts=4, dim=16, hidden_dim=8, rank=4)
    call = leanmoe.describe_call(p.x_TD, p.topk_ids_TK, p.topk_weights_TK, _weights(p, lora=lora))
    assert call.has_lora and not call.has_scales
    assert "takes no LoRA adapters" in registry.unsupported_reason(get_backend("triton_decode"), call)
    backend, why = select_backend("auto", call)
    assert backend.takes_lora and "'triton_decode' (it takes no LoRA adapters" in why
    with pytest.raises(ValueError, match="backend 'triton_decode' cannot run a call with lora: it takes no LoRA"):
        select_backend("triton_decode", call)
    # A merged adapter is in the base weights already: any backend runs the call.
    lora.merged = True
    assert not leanmoe.describe_call(p.x_TD, p.topk_ids_TK, p.topk_weights_TK, _weights(p, lora=lora)).has_lora


def test_weights_with_scales_are_refused_by_every_built_in_backend_with_a_reason():
    p = make_problem(6, 16, 8, 4, 2, requires_grad=False)
    weights = _weights(p, gate_up_scale=torch.ones(4), down_scale=torch.ones(4, 16))
    call = leanmoe.describe_call(p.x_TD, p.topk_ids_TK, p.topk_weights_TK, weights)
    assert call.has_scales
    for cls in BUILTIN_BACKENDS:
        reason = registry.unsupported_reason(get_backend(cls.name), call)
        assert reason is not None and "per-expert weight scales" in reason, cls.name
        with pytest.raises(ValueError, match=f"backend '{cls.name}' cannot run a call with per-expert scales"):
            select_backend(cls.name, call)
    with pytest.raises(ValueError, match="no registered backend can run this call: 'triton_decode' "):
        run_experts(p.x_TD, p.topk_ids_TK, p.topk_weights_TK, weights)


# --- dtype rules live in the backends -----------------------------------------------------------------------------

def test_weights_in_another_dtype_than_x_are_each_backends_rule():
    p = make_problem(10, 16, 8, 4, 2, bias=True, requires_grad=False)
    weights64 = ExpertWeights(**{f: getattr(p, f).double() for f in ("gate_up_proj", "down_proj", "gate_up_bias",
                                                                     "down_bias")}, activation=p.activation)
    call = leanmoe.describe_call(p.x_TD, p.topk_ids_TK, p.topk_weights_TK, weights64)
    assert (call.dtype, call.weight_dtype, call.bias_dtype) == (torch.float32, torch.float64, torch.float64)
    for name in ("grouped_mm", "triton", "triton_decode"):
        assert "does not match x dtype torch.float32" in registry.unsupported_reason(get_backend(name), call)
    # auto refuses: mixed dtypes are almost always a missing cast, and only the slow reference loop would run them.
    with pytest.raises(TypeError, match="backend 'auto': gate_up_proj and down_proj dtype torch.float64 does not "
                                        "match x dtype torch.float32; cast one of them"):
        select_backend("auto", call)
    # Named, the reference takes any float dtypes, casting the weights to x's: what weights cast beforehand give.
    out = run_experts(p.x_TD, p.topk_ids_TK, p.topk_weights_TK, weights64, backend="reference")
    ref = leanmoe.moe_experts(p.x_TD, p.topk_ids_TK, p.topk_weights_TK, weights64.gate_up_proj.float(),
                              weights64.down_proj.float(), weights64.gate_up_bias.float(),
                              weights64.down_bias.float(), activation=p.activation, backend="reference")
    assert out.dtype == torch.float32 and torch.equal(out, ref)


def test_describe_call_takes_the_weights_or_the_form_of_moe_experts():
    p = make_problem(6, 16, 8, 4, 2, bias=True)
    mask = torch.ones(6, dtype=torch.bool)
    new = leanmoe.describe_call(p.x_TD, p.topk_ids_TK, p.topk_weights_TK, _weights(p), save_percent=50,
                                token_mask=mask)
    old = leanmoe.describe_call(*p.args(), **p.kwargs(), save_percent=50, token_mask=mask)
    assert new == old and new.weight_dtype == new.bias_dtype == torch.float32 and new.requires_grad
    with pytest.raises(TypeError, match="describe_call with an ExpertWeights takes only"):
        leanmoe.describe_call(p.x_TD, p.topk_ids_TK, p.topk_weights_TK, _weights(p), activation="swiglu")


def test_backends_take_the_form_before_expert_weights():
    # A backend written against the unpacked signature still registers and runs; callers of that form still work.
    p = make_problem(8, 16, 8, 4, 2, bias=True, requires_grad=False)
    seen = []

    class Unpacked(ExpertsBackend):
        name = "example_unpacked"

        def __call__(self, x_TD, topk_ids_TK, topk_weights_TK, gate_up_proj, down_proj, gate_up_bias, down_bias, *,
                     activation, gate_up_layout, save_percent):
            seen.append(activation.name)
            return get_backend("reference")(x_TD, topk_ids_TK, topk_weights_TK, gate_up_proj, down_proj,
                                            gate_up_bias, down_bias, activation=activation,
                                            gate_up_layout=gate_up_layout, save_percent=save_percent)

    leanmoe.register_backend(Unpacked())
    try:
        y = leanmoe.moe_experts(*p.args(), **p.kwargs(), backend="example_unpacked")
        call = leanmoe.describe_call(*p.args(), **p.kwargs())
        # Its support check keeps the rule of its time: weights in x's dtype.
        assert "does not match x dtype" in get_backend("example_unpacked").unsupported_reason(
            dataclasses.replace(call, weight_dtype=torch.float64))
    finally:
        del registry._BACKENDS["example_unpacked"]
    assert seen == ["swiglu"]
    assert torch.equal(y, leanmoe.moe_experts(*p.args(), **p.kwargs(), backend="reference"))


# --- ExpertWeights ------------------------------------------------------------------------------------------------

def test_expert_weights_derived_properties():
    p = make_problem(3, 16, 8, 5, 2, bias=True, activation="relu2")
    w = _weights(p)
    assert (w.num_experts, w.dim, w.hidden_dim, w.gated, w.dtype, w.device) == (5, 16, 8, False, torch.float32,
                                                                                 torch.device("cpu"))
    assert w.bias_dtype == torch.float32 and w.active_lora is None and not w.has_scales
    assert ExpertWeights(gate_up_proj=torch.zeros(2, 8, 4), down_proj=torch.zeros(2, 4, 4)).activation.name == \
        "swiglu"
    with pytest.raises(dataclasses.FrozenInstanceError):
        w.down_proj = p.down_proj  # type: ignore[misc]
    with pytest.raises(TypeError):
        ExpertWeights(p.gate_up_proj, p.down_proj)  # type: ignore[misc]  # keyword-only


_E, _D, _I = 4, 8, 4


@pytest.mark.parametrize("changes, error, match", [
    ({"gate_up_proj": torch.zeros(_E, 2 * _I)}, ValueError, r"gate_up_proj must be \[E, 2I, D\]"),
    ({"gate_up_proj": "w"}, TypeError, "gate_up_proj must be a torch.Tensor, got str"),
    ({"down_proj": torch.zeros(_E, _D)}, ValueError, r"down_proj must be \[E, D, I\], got shape \[4, 8\]"),
    ({"down_proj": torch.zeros(_E, _D, _I + 1)}, ValueError,
     r"for activation 'swiglu' expected gate_up_proj \[E, 2I, D\] = \[4, 10, 8\]"),
    ({"activation": "relu2"}, ValueError, r"for activation 'relu2' expected gate_up_proj \[E, I, D\]"),
    ({"down_proj": torch.zeros(_E, _D, _I, dtype=torch.float64)}, TypeError,
     "gate_up_proj dtype torch.float32 does not match down_proj dtype torch.float64"),
    ({"gate_up_bias": torch.zeros(_E, _I)}, ValueError, r"gate_up_bias must be \[4, 8\], got \[4, 4\]"),
    ({"down_bias": torch.zeros(_E, _D, dtype=torch.int32)}, TypeError, "down_bias must be floating point"),
    ({"gate_up_bias": torch.zeros(_E, 2 * _I), "down_bias": torch.zeros(_E, _D, dtype=torch.float16)}, TypeError,
     "down_bias dtype torch.float16 does not match gate_up_bias dtype torch.float32"),
    ({"gate_up_scale": torch.ones(_E + 1)}, ValueError, r"gate_up_scale must be per expert, \[E, \.\.\.\] with E=4"),
    ({"down_scale": torch.ones(_E, dtype=torch.int8)}, TypeError, "down_scale must be floating point"),
    ({"down_bias": torch.zeros(_E, _D, device="meta")}, ValueError, "down_bias is on meta but gate_up_proj is on cpu"),
    ({"activation": "swish"}, ValueError, "unknown activation 'swish'"),
    ({"gate_up_layout": "split"}, ValueError, "unknown gate_up_layout 'split'"),
    ({"lora": object()}, TypeError, "lora must be a leanmoe.ExpertLoRA or None, got object"),
    ({"lora": leanmoe.ExpertLoRA(num_experts=_E + 1, dim=_D, hidden_dim=_I)}, ValueError,
     r"does not fit the experts: expected \(4, 8, 4, True\)"),
], ids=lambda v: v.__name__ if isinstance(v, type) else None)
def test_expert_weights_validation(changes, error, match):
    fields = {"gate_up_proj": torch.zeros(_E, 2 * _I, _D), "down_proj": torch.zeros(_E, _D, _I), **changes}
    with pytest.raises(error, match=match):
        ExpertWeights(**fields)
