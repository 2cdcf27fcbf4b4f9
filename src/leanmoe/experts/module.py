"""``GroupedExperts``: the experts' weights in the transformers-v5 layout, computed by any registered backend.

Legend: T tokens, D model dim, I expert hidden dim, N gate/up rows (2I gated, I otherwise), E experts, K top-k.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from leanmoe.activations import Activation, check_layout, resolve_activation
from leanmoe.config import (
    ExpertsConfig,
    MoEConfig,
    check_backend_name,
    check_bool,
    check_int,
    check_save_percent,
    split_config,
)
from leanmoe.experts.functional import describe_call, moe_experts
from leanmoe.experts.registry import ExpertsCall, check_backend_for_module, describe_weights, explain_backend
from leanmoe.experts.weights import ExpertWeights  # also importable from here, where it was defined first

if TYPE_CHECKING:  # leanmoe.lora imports this package: no import at run time (a cycle)
    from leanmoe.lora.module import ExpertLoRA
    from leanmoe.parallel.expert_parallel import ExpertShard


def check_param_dtype(dtype: object) -> None:
    """A module's ``dtype`` argument: None (the default dtype) or a floating ``torch.dtype``."""
    if dtype is None:
        return
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype or None, got {type(dtype).__name__} ({dtype!r})")
    if not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating-point dtype, got {dtype}")


class GroupedExperts(nn.Module):
    """E stacked experts: ``gate_up_proj [E, N, D]``, ``down_proj [E, D, I]``, optional ``gate_up_bias [E, N]`` and
    ``down_bias [E, D]`` (one ``nn.Linear`` per expert, stacked, as transformers v5 stores them).

    ``experts(x_TD, topk_ids_TK, topk_weights_TK, token_mask=None) -> y_TD``.

    Constructor: ``num_experts``, ``dim``, ``hidden_dim`` ints >= 1; ``activation`` a name or
    :class:`leanmoe.Activation`; ``gate_up_layout`` ``"concatenated"``/``"interleaved"``; ``bias`` a bool;
    ``backend`` ``"auto"`` or a registered name that can run on ``device`` (checked here: ``"triton"`` on a CPU
    module without the Triton interpreter raises now, not at the first forward); ``save_percent`` in ``[0, 100]``;
    ``dtype`` a floating dtype or None. ``device="meta"`` builds without memory: ``to_empty`` then
    :meth:`reset_parameters` initialise it as construction does. Each bad value raises ``TypeError``/``ValueError``
    naming it.
    """

    #: Set by :func:`leanmoe.lora.add_expert_lora`; a registered submodule (or None).
    lora: ExpertLoRA | None
    #: Set by :func:`leanmoe.parallel.expert_parallel` on a sharded layer's experts; absent otherwise.
    expert_shard: ExpertShard

    def __init__(self, *, num_experts: int, dim: int, hidden_dim: int, activation: str | Activation = "swiglu",
                 gate_up_layout: str = "concatenated", bias: bool = False, backend: str = "auto",
                 save_percent: float = 0, device=None, dtype=None) -> None:
        super().__init__()
        E, D, I = (check_int(n, v, 1) for n, v in (("num_experts", num_experts), ("dim", dim),
                                                      ("hidden_dim", hidden_dim)))
        self.activation = resolve_activation(activation)
        check_layout(gate_up_layout)
        check_bool("bias", bias)
        check_backend_name(backend)
        check_save_percent(save_percent)
        check_param_dtype(dtype)
        self.gate_up_layout, self.backend, self.save_percent = gate_up_layout, backend, save_percent
        N = 2 * I if self.activation.gated else I
        self.gate_up_proj = nn.Parameter(torch.empty(E, N, D, device=device, dtype=dtype))
        self.down_proj = nn.Parameter(torch.empty(E, D, I, device=device, dtype=dtype))
        self.gate_up_bias = nn.Parameter(torch.empty(E, N, device=device, dtype=dtype)) if bias else None
        self.down_bias = nn.Parameter(torch.empty(E, D, device=device, dtype=dtype)) if bias else None
        check_backend_for_module(backend, self._one_token_call())
        # Optional leanmoe.ExpertLoRA adapters (leanmoe.lora.add_expert_lora sets it); passed to every call.
        self.register_module("lora", None)
        self.reset_parameters()

    def _one_token_call(self) -> ExpertsCall:
        """A training call of this module on one token with top-1, for the construction-time backend check."""
        return describe_weights(self.expert_weights(), num_tokens=1, top_k=1, save_percent=self.save_percent,
                                requires_grad=True)

    @classmethod
    def from_config(cls, config: ExpertsConfig | MoEConfig, *, dim: int | None = None, device=None,
                    dtype=None) -> GroupedExperts:
        """The experts of an :class:`leanmoe.ExpertsConfig` with the model ``dim``, or of a
        :class:`leanmoe.MoEConfig` (its ``experts`` and ``dim``)."""
        experts, D = split_config(config, dim, ExpertsConfig)
        return cls(num_experts=experts.num_experts, dim=D, hidden_dim=experts.hidden_dim,
                   activation=experts.activation, gate_up_layout=experts.gate_up_layout, bias=experts.bias,
                   backend=experts.backend, save_percent=experts.save_percent, device=device, dtype=dtype)

    @property
    def num_experts(self) -> int:
        return self.gate_up_proj.shape[0]

    def reset_parameters(self) -> None:
        """What construction does (after ``to_empty`` of a meta module, say): ``nn.Linear``'s initialisation, per
        expert: uniform in +-1/sqrt(fan_in), biases too."""
        for weight, bias in ((self.gate_up_proj, self.gate_up_bias), (self.down_proj, self.down_bias)):
            bound = 1 / math.sqrt(weight.shape[-1])
            nn.init.uniform_(weight, -bound, bound)
            if bias is not None:
                nn.init.uniform_(bias, -bound, bound)

    def forward(self, x_TD: torch.Tensor, topk_ids_TK: torch.Tensor, topk_weights_TK: torch.Tensor, *,
                token_mask: torch.Tensor | None = None, check_ids: bool | None = None) -> torch.Tensor:
        """``x_TD [T, D]`` in the parameters' dtype, ``topk_ids_TK [T, K]`` int32/int64 in ``[0, E)``,
        ``topk_weights_TK [T, K]`` float, optional ``token_mask [T]`` bool (True = keep; masked tokens give exactly
        zero rows and gradients) -> ``y_TD [T, D]``. See :func:`leanmoe.moe_experts` for the rest."""
        return moe_experts(x_TD, topk_ids_TK, topk_weights_TK, self.gate_up_proj, self.down_proj, self.gate_up_bias,
                           self.down_bias, activation=self.activation, gate_up_layout=self.gate_up_layout,
                           backend=self.backend, save_percent=self.save_percent, check_ids=check_ids,
                           token_mask=token_mask, lora=self.lora)

    def expert_weights(self) -> ExpertWeights:
        """The parameters as an :class:`ExpertWeights` (the parameters themselves, no copy; without the adapter,
        which :attr:`lora` holds)."""
        return ExpertWeights(gate_up_proj=self.gate_up_proj, down_proj=self.down_proj, gate_up_bias=self.gate_up_bias,
                             down_bias=self.down_bias, activation=self.activation, gate_up_layout=self.gate_up_layout)

    def explain_backend(self, x_TD: torch.Tensor, topk_ids_TK: torch.Tensor, topk_weights_TK: torch.Tensor, *,
                        token_mask: torch.Tensor | None = None) -> str:
        """Which backend ``forward`` would use on these inputs, and why."""
        weights = dataclasses.replace(self.expert_weights(), lora=self.lora)  # as forward passes it
        call = describe_call(x_TD, topk_ids_TK, topk_weights_TK, weights, save_percent=self.save_percent,
                             token_mask=token_mask)
        return explain_backend(call, self.backend)

    def extra_repr(self) -> str:
        E, N, D = self.gate_up_proj.shape
        return (f"num_experts={E}, dim={D}, hidden_dim={self.down_proj.shape[2]}, activation={self.activation.name}, "
                f"gate_up_layout={self.gate_up_layout}, bias={self.gate_up_bias is not None}, "
                f"backend={self.backend}, save_percent={self.save_percent}")


class SharedExperts(nn.Module):
    """Dense SwiGLU experts applied to every token (``gate_proj``, ``up_proj``, ``down_proj``, no biases), with an
    optional per-token sigmoid gate ``gate [1, D]`` (Qwen2-MoE). ``dim``, ``hidden_dim`` ints >= 1,
    ``gated_output`` a bool. ``shared(x_TD [T, D]) -> [T, D]``; with no biases, a zero row of x gives a zero row."""

    def __init__(self, *, dim: int, hidden_dim: int, gated_output: bool = False, device=None, dtype=None) -> None:
        super().__init__()
        dim, hidden_dim = check_int("dim", dim, 1), check_int("hidden_dim", hidden_dim, 1)
        check_bool("gated_output", gated_output)
        check_param_dtype(dtype)
        kw = {"bias": False, "device": device, "dtype": dtype}
        self.gate_proj = nn.Linear(dim, hidden_dim, **kw)
        self.up_proj = nn.Linear(dim, hidden_dim, **kw)
        self.down_proj = nn.Linear(hidden_dim, dim, **kw)
        self.gate = nn.Linear(dim, 1, **kw) if gated_output else None

    def reset_parameters(self) -> None:
        """``nn.Linear``'s initialisation of each projection, in construction order (the same random stream)."""
        for linear in (self.gate_proj, self.up_proj, self.down_proj, self.gate):
            if linear is not None:
                linear.reset_parameters()

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        y_TD = self.down_proj(nn.functional.silu(self.gate_proj(x_TD)) * self.up_proj(x_TD))
        if self.gate is not None:
            y_TD = y_TD * torch.sigmoid(self.gate(x_TD))
        return y_TD
