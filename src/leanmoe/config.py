"""Keyword-only configuration for the MoE layer, its router and its experts."""

from __future__ import annotations

import dataclasses
import math
import numbers
import operator
from typing import Literal

from leanmoe.activations import Activation, check_layout, resolve_activation

ScoreFunc = Literal["softmax", "sigmoid"]
SCORE_FUNCS = ("softmax", "sigmoid")


def check_int(name: str, value: object, minimum: int) -> int:
    """``value`` as an int >= ``minimum``: any integer (Python, NumPy, a 0-d integer tensor), never a bool, a float
    or a string."""
    try:
        if isinstance(value, bool):
            raise TypeError
        value = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})") from None
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_bool(name: str, value: object) -> None:
    # A string such as "false" is truthy: only real bools are accepted.
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} ({value!r})")


def check_real(name: str, value: object, *, minimum: float, strict: bool = False) -> float:
    """``value`` as a finite float ``>= minimum`` (``> minimum`` when ``strict``); bools and strings are refused."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a finite number, got {type(value).__name__} ({value!r})")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}")
    if value < minimum or (strict and value == minimum):
        raise ValueError(f"{name} must be {'>' if strict else '>='} {minimum:g}, got {value}")
    return value


def check_save_percent(save_percent: object) -> None:
    if isinstance(save_percent, bool) or not isinstance(save_percent, numbers.Real):
        raise TypeError(f"save_percent must be a number in [0, 100], got {type(save_percent).__name__}")
    if not 0 <= save_percent <= 100:  # NaN fails this too
        raise ValueError(f"save_percent must be in [0, 100], got {save_percent}")


def check_backend_name(backend: object) -> None:
    """``backend`` must be ``"auto"`` or a registered backend name."""
    from leanmoe.experts.registry import available_backends  # the registry imports this module's users

    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str ('auto' or one of {available_backends()}), got "
                        f"{type(backend).__name__}")
    if backend != "auto" and backend not in available_backends():
        raise ValueError(f"unknown backend {backend!r}; expected 'auto' or one of {available_backends()}")


@dataclasses.dataclass(kw_only=True)
class MoEConfig:
    """Everything that defines a :class:`leanmoe.MoE` layer.

    Experts: ``num_experts`` experts of hidden size ``hidden_dim``; gated activations keep ``gate_up_proj [E, 2I, D]``
    in ``gate_up_layout``, non-gated ones ``[E, I, D]``; ``bias`` adds ``gate_up_bias`` and ``down_bias``.

    Router (fp32): ``score_func`` over ``router`` logits, top-``top_k`` with ties toward the lower expert index,
    optional node-limited selection (``n_group`` groups of experts, the best ``topk_group`` of them kept, a group
    scored by the sum of its top-2 selection scores as in DeepSeek-V3), weights renormalised when ``norm_topk_prob``
    and scaled by ``route_scale``. ``balance_bias`` enables the aux-loss-free selection bias, updated by
    :meth:`leanmoe.TopKRouter.update_balance_bias` with ``balance_bias_rate``. ``aux_loss_coef`` (Switch
    load-balancing loss) and ``z_loss_coef`` (router z-loss) are summed into ``MoE.aux_loss``.

    Shared experts: ``num_shared_experts`` dense SwiGLU experts fused into one MLP of hidden size
    ``shared_hidden_dim`` (default ``num_shared_experts * hidden_dim``), optionally scaled per token by a sigmoid
    gate (``shared_expert_gate``, Qwen2-MoE).

    Every field is checked at construction: ``TypeError`` for a wrong type (a bool, float or string where an int
    is expected, a flag that is not a bool, a number that is a string), ``ValueError`` for a value out of range
    (sizes < 1, ``num_shared_experts`` < 0, non-finite or negative coefficients, ``route_scale`` <= 0,
    ``top_k > num_experts``, an unknown name), each naming the field, the bad value and what is expected.
    """

    dim: int
    hidden_dim: int
    num_experts: int
    top_k: int
    activation: str | Activation = "swiglu"
    gate_up_layout: Literal["concatenated", "interleaved"] = "concatenated"
    bias: bool = False
    # router
    score_func: ScoreFunc = "softmax"
    norm_topk_prob: bool = True
    route_scale: float = 1.0
    router_bias: bool = False
    n_group: int = 1
    topk_group: int = 1
    balance_bias: bool = False
    balance_bias_rate: float = 1e-3
    aux_loss_coef: float = 0.0
    z_loss_coef: float = 0.0
    # shared experts
    num_shared_experts: int = 0
    shared_hidden_dim: int | None = None
    shared_expert_gate: bool = False
    # expert compute
    backend: str = "auto"
    save_percent: float = 0

    def __post_init__(self) -> None:
        # Every field is checked here, so a bad value fails at construction with its name, never deep in a forward.
        for name in ("dim", "hidden_dim", "num_experts", "top_k", "n_group", "topk_group"):
            setattr(self, name, check_int(name, getattr(self, name), 1))
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k must be <= num_experts, got top_k={self.top_k}, num_experts={self.num_experts}")
        self.activation = resolve_activation(self.activation)
        check_layout(self.gate_up_layout)
        for name in ("bias", "norm_topk_prob", "router_bias", "balance_bias", "shared_expert_gate"):
            check_bool(name, getattr(self, name))
        if not isinstance(self.score_func, str):
            raise TypeError(f"score_func must be a str, one of {SCORE_FUNCS}, got {type(self.score_func).__name__}")
        if self.score_func not in SCORE_FUNCS:
            raise ValueError(f"unknown score_func {self.score_func!r}; expected one of {SCORE_FUNCS}")
        if self.num_experts % self.n_group:
            raise ValueError(
                f"num_experts must be divisible by n_group, got num_experts={self.num_experts}, n_group={self.n_group}"
            )
        if self.topk_group > self.n_group:
            raise ValueError(f"topk_group must be <= n_group, got topk_group={self.topk_group}, n_group={self.n_group}")
        if self.n_group > 1 and self.top_k > self.topk_group * (self.num_experts // self.n_group):
            raise ValueError(
                f"top_k={self.top_k} exceeds the {self.topk_group * (self.num_experts // self.n_group)} experts "
                f"left by topk_group={self.topk_group} groups of {self.num_experts // self.n_group}"
            )
        self.route_scale = check_real("route_scale", self.route_scale, minimum=0.0, strict=True)
        for name in ("aux_loss_coef", "z_loss_coef", "balance_bias_rate"):
            setattr(self, name, check_real(name, getattr(self, name), minimum=0.0))
        self.num_shared_experts = check_int("num_shared_experts", self.num_shared_experts, 0)
        if self.shared_hidden_dim is not None:
            self.shared_hidden_dim = check_int("shared_hidden_dim", self.shared_hidden_dim, 1)
        check_backend_name(self.backend)
        check_save_percent(self.save_percent)

    @property
    def gate_up_rows(self) -> int:
        """Rows of ``gate_up_proj`` per expert: 2I for gated activations, I otherwise."""
        return 2 * self.hidden_dim if self.activation.gated else self.hidden_dim  # type: ignore[union-attr]
