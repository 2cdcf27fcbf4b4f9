"""Expert activations: names, parameters and the plain PyTorch definitions every backend must match.

Legend: R routed rows (T*K), I expert hidden dim, N = 2I for gated activations, I otherwise.

Gated activations read a gate pre-activation g and an up pre-activation u from the first GEMM's output:
- ``concatenated`` layout: g = rows [0, I) of ``gate_up_proj``, u = rows [I, 2I);
- ``interleaved`` layout (gpt-oss): g = even rows, u = odd rows.
Non-gated activations read one pre-activation a (``gate_up_proj`` is ``[E, I, D]``).

``gelu``/``geglu`` are the tanh approximation of GELU; ``gelu_exact``/``geglu_exact`` the exact, erf-based one
(Hugging Face's ``hidden_act="gelu"``).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Literal

import torch
import torch.nn.functional as F

ActivationName = Literal["swiglu", "geglu", "geglu_exact", "clamped_swiglu", "relu2", "gelu", "gelu_exact", "silu"]
GateUpLayout = Literal["concatenated", "interleaved"]

GATED_ACTIVATIONS = ("swiglu", "geglu", "geglu_exact", "clamped_swiglu")
NON_GATED_ACTIVATIONS = ("relu2", "gelu", "gelu_exact", "silu")
ACTIVATIONS = GATED_ACTIVATIONS + NON_GATED_ACTIVATIONS
GATE_UP_LAYOUTS = ("concatenated", "interleaved")


#: The activations that read ``alpha`` and ``limit``; the others take only the defaults.
_PARAMETERISED = ("clamped_swiglu",)
_DEFAULT_ALPHA, _DEFAULT_LIMIT = 1.702, 7.0


def _finite_real(field: str, value: object) -> float:
    # bool is an int subclass, and True would silently mean 1.0.
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"Activation.{field} must be a finite real number, got {value!r} "
                         f"({type(value).__name__})")
    value = float(value)
    # Not math.isfinite: torch 2.11's dynamo cannot trace it, and activations are built inside compiled forwards
    # (Hugging Face adapters read them per call). NaN fails the comparison too.
    if not abs(value) < math.inf:
        raise ValueError(f"Activation.{field} must be a finite real number, got {value!r}")
    return value


@dataclasses.dataclass(frozen=True, kw_only=True)
class Activation:
    """An expert activation and its parameters.

    ``alpha`` and ``limit`` are used by ``clamped_swiglu`` only (gpt-oss defaults):
    g <- min(g, limit), u <- clamp(u, -limit, limit), h = (u + 1) * g * sigmoid(alpha * g).
    Both must be finite real numbers (stored as float), ``limit > 0``; other activations take only the defaults.

    Raises:
        TypeError: ``name`` is not a str.
        ValueError: ``name`` is unknown, or ``alpha``/``limit`` is not a finite real number, ``limit <= 0``, or
            either is set for an activation that does not use it.
    """

    name: ActivationName = "swiglu"
    alpha: float = _DEFAULT_ALPHA
    limit: float = _DEFAULT_LIMIT

    def __post_init__(self) -> None:
        if not isinstance(self.name, str):
            raise TypeError(f"Activation.name must be a str, one of {ACTIVATIONS}, got {self.name!r} "
                            f"({type(self.name).__name__})")
        if self.name not in ACTIVATIONS:
            raise ValueError(f"unknown activation {self.name!r}; expected one of {ACTIVATIONS}")
        alpha, limit = _finite_real("alpha", self.alpha), _finite_real("limit", self.limit)
        if not limit > 0:
            raise ValueError(f"Activation.limit must be > 0, got limit={limit}")
        if self.name not in _PARAMETERISED:
            for field, value, default in (("alpha", alpha, _DEFAULT_ALPHA), ("limit", limit, _DEFAULT_LIMIT)):
                if value != default:
                    raise ValueError(f"Activation.{field}={value} is used by {_PARAMETERISED} only; activation "
                                     f"{self.name!r} takes no {field} (expected the default {default})")
        # Frozen: store the validated values as floats (an int 7 and 7.0 compare and hash alike anyway).
        object.__setattr__(self, "alpha", alpha)
        object.__setattr__(self, "limit", limit)

    @property
    def gated(self) -> bool:
        return self.name in GATED_ACTIVATIONS


#: One instance per name with default parameters: resolving a name builds nothing (and validates nothing again)
#: on the hot path, also under torch.compile.
_DEFAULT_ACTIVATIONS: dict[str, Activation] = {
    name: Activation(name=name) for name in ACTIVATIONS}  # type: ignore[arg-type]  # ACTIVATIONS lists the Literal


def resolve_activation(activation: str | Activation) -> Activation:
    """Turns a name or an :class:`Activation` into an :class:`Activation`, with a clear error otherwise."""
    if isinstance(activation, Activation):
        return activation
    if isinstance(activation, str):
        default = _DEFAULT_ACTIVATIONS.get(activation)
        return default if default is not None else Activation(name=activation)  # type: ignore[arg-type]
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
        if name == "gelu_exact":
            return F.gelu(gate_up_RN, approximate="none")
        return F.silu(gate_up_RN)
    g_RI, u_RI = split_gate_up(gate_up_RN, gate_up_layout)
    if name == "swiglu":
        return F.silu(g_RI) * u_RI
    if name == "geglu":
        return F.gelu(g_RI, approximate="tanh") * u_RI
    if name == "geglu_exact":
        return F.gelu(g_RI, approximate="none") * u_RI
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


_SQRT_HALF = 0.7071067811865476  # 1 / sqrt(2)
_INV_SQRT_2PI = 0.3989422804014327  # 1 / sqrt(2 pi)


def _gelu_erf_and_grad(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # GELU(a) = a * Phi(a); its derivative is Phi(a) + a * phi(a) (phi the standard normal density).
    cdf = 0.5 * (1 + torch.erf(a * _SQRT_HALF))
    return a * cdf, cdf + a * torch.exp(-0.5 * a * a) * _INV_SQRT_2PI


def _silu_and_grad(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    s = torch.sigmoid(a)
    return a * s, s * (1 + a * (1 - s))


def activation_backward(
    gate_up_RN: torch.Tensor, grad_h_RI: torch.Tensor, activation: Activation, gate_up_layout: str,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Gradient of :func:`apply_activation` with respect to its input, computed in at least fp32.

    Used by backends that write their own backward; the clamp masks match ``torch.clamp`` (gradient passes where
    the value lies inside the closed interval). ``out`` (``[R, N]``, any float dtype) receives the result, rounded
    once, without an fp32 ``[R, N]`` copy; it may be ``gate_up_RN`` itself (every read happens before the write).
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
        elif name == "gelu_exact":
            grad = _gelu_erf_and_grad(a)[1]
        else:
            grad = _silu_and_grad(a)[1]
        if out is not None:
            return out.copy_(dh * grad)
        return (dh * grad).to(gate_up_RN.dtype)
    g, u = split_gate_up(gate_up_RN, gate_up_layout)
    g, u = g.to(compute), u.to(compute)
    if name == "swiglu":
        act, dact = _silu_and_grad(g)
        dg, du = dh * u * dact, dh * act
    elif name == "geglu":
        act, dact = _gelu_tanh_and_grad(g)
        dg, du = dh * u * dact, dh * act
    elif name == "geglu_exact":
        act, dact = _gelu_erf_and_grad(g)
        dg, du = dh * u * dact, dh * act
    else:
        limit, alpha = activation.limit, activation.alpha
        g_c = g.clamp(max=limit)
        u_c = u.clamp(min=-limit, max=limit)
        s = torch.sigmoid(alpha * g_c)
        dg = dh * (u_c + 1) * (s + alpha * g_c * s * (1 - s)) * (g <= limit)
        du = dh * g_c * s * ((u >= -limit) & (u <= limit))
    if out is not None:
        out_g, out_u = split_gate_up(out, gate_up_layout)
        out_g.copy_(dg)
        out_u.copy_(du)
        return out
    if gate_up_layout == "interleaved":
        out = torch.stack((dg, du), dim=-1).flatten(-2)
    else:
        out = torch.cat((dg, du), dim=-1)
    return out.to(gate_up_RN.dtype)
