"""Activations: values against torch's own definitions, hand-written backward against autograd, field validation.

Legend: R routed rows, I expert hidden dim, N = 2I for gated activations, I otherwise.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from leanmoe.activations import (
    ACTIVATIONS,
    GATED_ACTIVATIONS,
    Activation,
    activation_backward,
    apply_activation,
    split_gate_up,
)
from tests.helpers import assert_close


@pytest.mark.parametrize("name", ["gelu_exact", "geglu_exact"])
def test_exact_gelu_names_and_gating(name):
    assert name in ACTIVATIONS
    assert Activation(name=name).gated == (name == "geglu_exact")
    assert (name in GATED_ACTIVATIONS) == (name == "geglu_exact")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=["fp64", "fp32", "bf16"])
def test_gelu_exact_matches_torch_erf_gelu(dtype):
    a_RI = (torch.randn(17, 12, dtype=torch.float64) * 3).to(dtype)
    out = apply_activation(a_RI, Activation(name="gelu_exact"), "concatenated")
    assert out.dtype == dtype
    assert torch.equal(out, F.gelu(a_RI, approximate="none"))
    # The exact and the tanh form differ by up to ~1e-3 at |a| ~ 2: a test mixing them up fails here.
    tanh_form = apply_activation(a_RI.double(), Activation(name="gelu"), "concatenated")
    assert (tanh_form - F.gelu(a_RI.double(), approximate="none")).abs().max() > 1e-4


def test_gelu_exact_at_hand_computed_points():
    # GELU(a) = a * Phi(a): Phi(0) = 0.5, Phi(1) = 0.841344746..., Phi(-1) = 0.158655254...
    a = torch.tensor([0.0, 1.0, -1.0], dtype=torch.float64)
    out = apply_activation(a, Activation(name="gelu_exact"), "concatenated")
    assert torch.allclose(out, torch.tensor([0.0, 0.8413447460685429, -0.15865525393145707], dtype=torch.float64))


@pytest.mark.parametrize("layout", ["concatenated", "interleaved"])
def test_geglu_exact_matches_erf_gelu_of_gate_times_up(layout):
    gu_RN = torch.randn(9, 16, dtype=torch.float64) * 2
    g_RI, u_RI = split_gate_up(gu_RN, layout)
    out = apply_activation(gu_RN, Activation(name="geglu_exact"), layout)
    assert torch.equal(out, F.gelu(g_RI, approximate="none") * u_RI)


def _activations_and_layouts():
    for name in ACTIVATIONS:
        layouts = ("concatenated", "interleaved") if name in GATED_ACTIVATIONS else ("concatenated",)
        for layout in layouts:
            yield name, layout


@pytest.mark.parametrize("name,layout", list(_activations_and_layouts()), ids=lambda v: str(v))
def test_backward_matches_autograd(name, layout):
    # clamped_swiglu with a small limit so values fall on both sides of each clamp.
    act = Activation(name=name, limit=1.0) if name == "clamped_swiglu" else Activation(name=name)
    gu_RN = (torch.randn(9, 12, dtype=torch.float64) * 2).requires_grad_(True)
    h_RI = apply_activation(gu_RN, act, layout)
    dh_RI = torch.randn_like(h_RI)
    (ref_grad,) = torch.autograd.grad(h_RI, gu_RN, dh_RI)
    out_grad = activation_backward(gu_RN.detach(), dh_RI, act, layout)
    assert_close(out_grad, ref_grad, tol=1e-12, name=f"{name}-{layout}")


@pytest.mark.parametrize("name", ["gelu_exact", "geglu_exact"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_exact_gelu_backward_low_precision(name, dtype):
    # The hand-written backward computes in fp32 and rounds once: within one rounding of the fp64 truth.
    act = Activation(name=name)
    N = 16 if act.gated else 8
    gu64 = (torch.randn(33, N, dtype=torch.float64) * 2).requires_grad_(True)
    h64 = apply_activation(gu64, act, "concatenated")
    dh64 = torch.randn_like(h64)
    (ref,) = torch.autograd.grad(h64, gu64, dh64)
    out = activation_backward(gu64.detach().to(dtype), dh64.to(dtype), act, "concatenated")
    assert out.dtype == dtype
    assert_close(out, ref, tol=2e-2, name=name)


@pytest.mark.parametrize(("kwargs", "exc", "match"), [
    ({"name": 3}, TypeError, r"Activation.name must be a str, .* got 3 \(int\)"),
    ({"name": None}, TypeError, r"Activation.name must be a str, .* got None"),
    ({"name": "gelu_erf"}, ValueError, r"unknown activation 'gelu_erf'; expected one of .*gelu_exact"),
    ({"name": "clamped_swiglu", "alpha": float("nan")}, ValueError,
     r"Activation.alpha must be a finite real number, got nan"),
    ({"name": "clamped_swiglu", "limit": float("inf")}, ValueError,
     r"Activation.limit must be a finite real number, got inf"),
    ({"name": "clamped_swiglu", "alpha": "1.7"}, ValueError,
     r"Activation.alpha must be a finite real number, got '1.7' \(str\)"),
    ({"name": "clamped_swiglu", "limit": True}, ValueError,
     r"Activation.limit must be a finite real number, got True \(bool\)"),
    ({"name": "clamped_swiglu", "alpha": None}, ValueError,
     r"Activation.alpha must be a finite real number, got None"),
    ({"name": "clamped_swiglu", "limit": 0.0}, ValueError, r"Activation.limit must be > 0, got limit=0.0"),
    ({"name": "clamped_swiglu", "limit": -2}, ValueError, r"Activation.limit must be > 0, got limit=-2.0"),
    ({"name": "swiglu", "limit": 5.0}, ValueError,
     r"Activation.limit=5.0 is used by \('clamped_swiglu',\) only; activation 'swiglu' takes no limit"),
    ({"name": "gelu_exact", "alpha": 2.0}, ValueError,
     r"Activation.alpha=2.0 is used by .* activation 'gelu_exact' takes no alpha \(expected the default 1.702\)"),
    # Non-finite values are refused for every activation, before the "unused field" check.
    ({"name": "relu2", "alpha": float("-inf")}, ValueError, r"Activation.alpha must be a finite real number"),
], ids=["int-name", "none-name", "unknown-name", "nan-alpha", "inf-limit", "str-alpha", "bool-limit",
        "none-alpha", "zero-limit", "negative-limit", "limit-on-swiglu", "alpha-on-gelu_exact", "inf-alpha-relu2"])
def test_activation_fields_are_validated(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        Activation(**kwargs)


def test_activation_accepts_real_numbers_and_stores_floats():
    import numpy as np

    act = Activation(name="clamped_swiglu", alpha=np.float32(1.5), limit=3)
    assert type(act.alpha) is float and type(act.limit) is float
    assert act.alpha == 1.5 and act.limit == 3.0
    assert act == Activation(name="clamped_swiglu", alpha=1.5, limit=3.0)
    # The defaults pass for every activation, given explicitly or not.
    for name in ACTIVATIONS:
        assert Activation(name=name, alpha=1.702, limit=7.0) == Activation(name=name)
    assert math.isclose(Activation().alpha, 1.702)


@pytest.mark.parametrize("name,layout", list(_activations_and_layouts()), ids=lambda v: str(v))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_backward_into_out_even_in_place(name, layout, dtype):
    # grouped_mm writes the gradient into the pre-activations' own buffer: every read must precede the write.
    act = Activation(name=name, limit=1.0) if name == "clamped_swiglu" else Activation(name=name)
    N = 12 if act.gated else 6
    gu_RN = (torch.randn(9, N) * 2).to(dtype)
    dh_RI = torch.randn(9, N // 2 if act.gated else N).to(dtype)
    expected = activation_backward(gu_RN, dh_RI, act, layout)
    out = torch.full_like(gu_RN, float("nan"))
    assert activation_backward(gu_RN, dh_RI, act, layout, out=out) is out
    assert torch.equal(out, expected)
    in_place = gu_RN.clone()
    activation_backward(in_place, dh_RI, act, layout, out=in_place)
    assert torch.equal(in_place, expected)
