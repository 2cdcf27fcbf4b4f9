"""``GroupedExperts``: the experts' weights in the transformers-v5 layout, computed by any registered backend.

Legend: T tokens, D model dim, I expert hidden dim, N gate/up rows (2I gated, I otherwise), E experts, K top-k.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn as nn

from leanmoe.activations import Activation, check_layout, resolve_activation
from leanmoe.config import MoEConfig, check_save_percent
from leanmoe.experts.functional import describe_call, moe_experts
from leanmoe.experts.registry import explain_backend


@dataclasses.dataclass(frozen=True)
class ExpertWeights:
    """An experts module's weights as views in leanmoe's layout, plus how to apply them.

    Any module whose forward is ``(x_TD, topk_ids_TK, topk_weights_TK) -> y_TD`` and that has an
    ``expert_weights()`` method returning this is an *experts module* to leanmoe's tools (calibration, benchmarks):
    :class:`GroupedExperts`, and Hugging Face experts modules once :func:`leanmoe.hf.patch` has patched them.
    """

    gate_up_proj: torch.Tensor  # [E, N, D]
    down_proj: torch.Tensor  # [E, D, I]
    gate_up_bias: torch.Tensor | None  # [E, N]
    down_bias: torch.Tensor | None  # [E, D]
    activation: Activation
    gate_up_layout: str


class GroupedExperts(nn.Module):
    """E stacked experts: ``gate_up_proj [E, N, D]``, ``down_proj [E, D, I]``, optional ``gate_up_bias [E, N]`` and
    ``down_bias [E, D]`` (one ``nn.Linear`` per expert, stacked, as transformers v5 stores them).

    ``experts(x_TD, topk_ids_TK, topk_weights_TK) -> y_TD``.
    """

    def __init__(self, *, num_experts: int, dim: int, hidden_dim: int, activation: str | Activation = "swiglu",
                 gate_up_layout: str = "concatenated", bias: bool = False, backend: str = "auto",
                 save_percent: float = 0, device=None, dtype=None) -> None:
        super().__init__()
        self.activation = resolve_activation(activation)
        check_layout(gate_up_layout)
        check_save_percent(save_percent)
        self.gate_up_layout, self.backend, self.save_percent = gate_up_layout, backend, save_percent
        E, D, I = num_experts, dim, hidden_dim
        N = 2 * I if self.activation.gated else I
        self.gate_up_proj = nn.Parameter(torch.empty(E, N, D, device=device, dtype=dtype))
        self.down_proj = nn.Parameter(torch.empty(E, D, I, device=device, dtype=dtype))
        self.gate_up_bias = nn.Parameter(torch.empty(E, N, device=device, dtype=dtype)) if bias else None
        self.down_bias = nn.Parameter(torch.empty(E, D, device=device, dtype=dtype)) if bias else None
        self.reset_parameters()

    @classmethod
    def from_config(cls, config: MoEConfig, *, device=None, dtype=None) -> GroupedExperts:
        return cls(num_experts=config.num_experts, dim=config.dim, hidden_dim=config.hidden_dim,
                   activation=config.activation, gate_up_layout=config.gate_up_layout, bias=config.bias,
                   backend=config.backend, save_percent=config.save_percent, device=device, dtype=dtype)

    @property
    def num_experts(self) -> int:
        return self.gate_up_proj.shape[0]

    def reset_parameters(self) -> None:
        # nn.Linear's initialisation, per expert: uniform in +-1/sqrt(fan_in).
        for weight, bias in ((self.gate_up_proj, self.gate_up_bias), (self.down_proj, self.down_bias)):
            bound = 1 / math.sqrt(weight.shape[-1])
            nn.init.uniform_(weight, -bound, bound)
            if bias is not None:
                nn.init.uniform_(bias, -bound, bound)

    def forward(self, x_TD: torch.Tensor, topk_ids_TK: torch.Tensor, topk_weights_TK: torch.Tensor, *,
                check_ids: bool | None = None) -> torch.Tensor:
        return moe_experts(x_TD, topk_ids_TK, topk_weights_TK, self.gate_up_proj, self.down_proj, self.gate_up_bias,
                           self.down_bias, activation=self.activation, gate_up_layout=self.gate_up_layout,
                           backend=self.backend, save_percent=self.save_percent, check_ids=check_ids)

    def expert_weights(self) -> ExpertWeights:
        return ExpertWeights(self.gate_up_proj, self.down_proj, self.gate_up_bias, self.down_bias, self.activation,
                             self.gate_up_layout)

    def explain_backend(self, x_TD: torch.Tensor, topk_ids_TK: torch.Tensor, topk_weights_TK: torch.Tensor) -> str:
        """Which backend ``forward`` would use on these inputs, and why."""
        call = describe_call(x_TD, topk_ids_TK, topk_weights_TK, self.gate_up_proj, self.down_proj,
                             self.gate_up_bias, self.down_bias, activation=self.activation,
                             gate_up_layout=self.gate_up_layout, save_percent=self.save_percent)
        return explain_backend(call, self.backend)

    def extra_repr(self) -> str:
        E, N, D = self.gate_up_proj.shape
        return (f"num_experts={E}, dim={D}, hidden_dim={self.down_proj.shape[2]}, activation={self.activation.name}, "
                f"gate_up_layout={self.gate_up_layout}, bias={self.gate_up_bias is not None}, "
                f"backend={self.backend}, save_percent={self.save_percent}")


class SharedExperts(nn.Module):
    """Dense SwiGLU experts applied to every token (``gate_proj``, ``up_proj``, ``down_proj``, no biases), with an
    optional per-token sigmoid gate ``gate [1, D]`` (Qwen2-MoE)."""

    def __init__(self, *, dim: int, hidden_dim: int, gated_output: bool = False, device=None, dtype=None) -> None:
        super().__init__()
        kw = {"bias": False, "device": device, "dtype": dtype}
        self.gate_proj = nn.Linear(dim, hidden_dim, **kw)
        self.up_proj = nn.Linear(dim, hidden_dim, **kw)
        self.down_proj = nn.Linear(hidden_dim, dim, **kw)
        self.gate = nn.Linear(dim, 1, **kw) if gated_output else None

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        y_TD = self.down_proj(nn.functional.silu(self.gate_proj(x_TD)) * self.up_proj(x_TD))
        if self.gate is not None:
            y_TD = y_TD * torch.sigmoid(self.gate(x_TD))
        return y_TD
