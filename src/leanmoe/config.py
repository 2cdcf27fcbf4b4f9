"""Keyword-only configuration for the MoE layer, its router and its experts."""

from __future__ import annotations

import dataclasses
from typing import Literal

from leanmoe.activations import Activation, check_layout, resolve_activation

ScoreFunc = Literal["softmax", "sigmoid"]
SCORE_FUNCS = ("softmax", "sigmoid")


def _positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")


def check_save_percent(save_percent: object) -> None:
    if isinstance(save_percent, bool) or not isinstance(save_percent, (int, float)):
        raise TypeError(f"save_percent must be a number in [0, 100], got {type(save_percent).__name__}")
    if not 0 <= save_percent <= 100:
        raise ValueError(f"save_percent must be in [0, 100], got {save_percent}")


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
        for name in ("dim", "hidden_dim", "num_experts", "top_k", "n_group", "topk_group"):
            _positive_int(name, getattr(self, name))
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k must be <= num_experts, got top_k={self.top_k}, num_experts={self.num_experts}")
        self.activation = resolve_activation(self.activation)
        check_layout(self.gate_up_layout)
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
        if self.num_shared_experts < 0:
            raise ValueError(f"num_shared_experts must be >= 0, got {self.num_shared_experts}")
        if self.shared_hidden_dim is not None:
            _positive_int("shared_hidden_dim", self.shared_hidden_dim)
        for name in ("aux_loss_coef", "z_loss_coef", "balance_bias_rate"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        check_save_percent(self.save_percent)

    @property
    def gate_up_rows(self) -> int:
        """Rows of ``gate_up_proj`` per expert: 2I for gated activations, I otherwise."""
        return 2 * self.hidden_dim if self.activation.gated else self.hidden_dim  # type: ignore[union-attr]
