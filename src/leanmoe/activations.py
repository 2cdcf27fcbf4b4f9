"""Expert activations: names, parameters and the plain PyTorch definitions every backend must match.

Legend: R routed rows (T*K), I expert hidden dim, N = 2I for gated activations, I otherwise.

Gated activations read a gate pre-activation g and an up pre-activation u from the first GEMM's output:
- ``concatenated`` layout: g = rows [0, I) of ``gate_up_proj``, u = rows [I, 2I);
- ``interleaved`` layout (gpt-oss): g = even rows, u = odd rows.
Non-gated activations read one pre-activation a (``gate_up_proj`` is ``[E, I, D]``).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch
import torch.nn.functional as F

ActivationName = Literal["swiglu", "geglu", "clamped_swiglu", "relu2", "gelu", "silu"]
GateUpLayout = Literal["concatenated", "interleaved"]

GATED_ACTIVATIONS = ("swiglu", "geglu", "clamped_swiglu")
NON_GATED_ACTIVATIONS = ("relu2", "gelu", "silu")
ACTIVATIONS = GATED_ACTIVATIONS + NON_GATED_ACTIVATIONS
GATE_UP_LAYOUTS = ("concatenated", "interleaved")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Activation:
    """An expert activation and its parameters.

    ``alpha`` and ``limit`` are used by ``clamped_swiglu`` only (gpt-oss defaults):
    g <- min(g, limit), u <- clamp(u, -limit, limit), h = (u + 1) * g * sigmoid(alpha * g).
    """

    name: ActivationName = "swiglu"
    alpha: float = 1.702
    limit: float = 7.0

    def __post_init__(self) -> None:
        if self.name not in ACTIVATIONS:
            raise ValueError(f"unknown activation {self.name!r}; expected one of {ACTIVATIONS}")
        if self.name == "clamped_swiglu" and not self.limit > 0:
            raise ValueError(f"clamped_swiglu needs limit > 0, got limit={self.limit}")

    @property
    def gated(self) -> bool:
        return self.name in GATED_ACTIVATIONS


def resolve_activation(activation: str | Activation) -> Activation:
    """Turns a name or an :class:`Activation` into an :class:`Activation`, with a clear error otherwise."""
    if isinstance(activation, Activation):
        return activation
    if isinstance(activation, str):
        return Activation(name=activation)  # type: ignore[arg-type]
    raise TypeError(f"activation must be a str or leanmoe.Activation, got {type(activation).__name__}")


def check_layout(gate_up_layout: str) -> None:
    if gate_up_layout not in GATE_UP_LAYOUTS:
        raise ValueError(f"unknown gate_up_layout {gate_up_layout!r}; expected one of {GATE_UP_LAYOUTS}")


def split_gate_up(gate_up_RN: torch.Tensor, gate_up_layout: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Splits the first GEMM's output into (gate, up), each ``[R, I]``."""
    if gate_up_layout == "interleaved":
        return gate_up_RN[..., 0::2], gate_up_RN[..., 1::2]
    half = gate_up_RN.shape[-1] // 2
    return gate_up_RN[..., :half], gate_up_RN[..., half:]


def apply_activation(gate_up_RN: torch.Tensor, activation: Activation, gate_up_layout: str) -> torch.Tensor:
    """The reference activation: ``[R, N]`` pre-activations to ``[R, I]`` hidden states, in the input's dtype."""
    name = activation.name
    if not activation.gated:
        if name == "relu2":
            return F.relu(gate_up_RN).square()
        if name == "gelu":
            return F.gelu(gate_up_RN, approximate="tanh")
        return F.silu(gate_up_RN)
    g_RI, u_RI = split_gate_up(gate_up_RN, gate_up_layout)
    if name == "swiglu":
        return F.silu(g_RI) * u_RI
    if name == "geglu":
        return F.gelu(g_RI, approximate="tanh") * u_RI
    g_RI = g_RI.clamp(max=activation.limit)
    u_RI = u_RI.clamp(min=-activation.limit, max=activation.limit)
    return (u_RI + 1) * g_RI * torch.sigmoid(activation.alpha * g_RI)


_GELU_C = 0.7978845608028654  # sqrt(2 / pi)
_GELU_A = 0.044715


def _gelu_tanh_and_grad(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    t = torch.tanh(_GELU_C * (a + _GELU_A * a * a * a))
    value = 0.5 * a * (1 + t)
    grad = 0.5 * (1 + t) + 0.5 * a * (1 - t * t) * _GELU_C * (1 + 3 * _GELU_A * a * a)
    return value, grad


def _silu_and_grad(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    s = torch.sigmoid(a)
    return a * s, s * (1 + a * (1 - s))


def activation_backward(
    gate_up_RN: torch.Tensor, grad_h_RI: torch.Tensor, activation: Activation, gate_up_layout: str
) -> torch.Tensor:
    """Gradient of :func:`apply_activation` with respect to its input, computed in at least fp32.

    Used by backends that write their own backward; the clamp masks match ``torch.clamp`` (gradient passes where
    the value lies inside the closed interval).
    """
    compute = torch.promote_types(gate_up_RN.dtype, torch.float32)
    dh = grad_h_RI.to(compute)
    name = activation.name
    if not activation.gated:
        a = gate_up_RN.to(compute)
        if name == "relu2":
            grad = 2 * torch.relu(a)
        elif name == "gelu":
            grad = _gelu_tanh_and_grad(a)[1]
        else:
            grad = _silu_and_grad(a)[1]
        return (dh * grad).to(gate_up_RN.dtype)
    g, u = split_gate_up(gate_up_RN, gate_up_layout)
    g, u = g.to(compute), u.to(compute)
    if name == "swiglu":
        act, dact = _silu_and_grad(g)
        dg, du = dh * u * dact, dh * act
    elif name == "geglu":
        act, dact = _gelu_tanh_and_grad(g)
        dg, du = dh * u * dact, dh * act
    else:
        limit, alpha = activation.limit, activation.alpha
        g_c = g.clamp(max=limit)
        u_c = u.clamp(min=-limit, max=limit)
        s = torch.sigmoid(alpha * g_c)
        dg = dh * (u_c + 1) * (s + alpha * g_c * s * (1 - s)) * (g <= limit)
        du = dh * g_c * s * ((u >= -limit) & (u <= limit))
    if gate_up_layout == "interleaved":
        out = torch.stack((dg, du), dim=-1).flatten(-2)
    else:
        out = torch.cat((dg, du), dim=-1)
    return out.to(gate_up_RN.dtype)
