"""``ExpertWeights``: the experts' weights and how to apply them, the one thing an expert backend receives.

Legend: D model dim, I expert hidden dim, N gate/up rows (2I gated, I otherwise), E experts.

A backend's ``__call__(x_TD, topk_ids_TK, topk_weights_TK, weights, *, save_percent, token_mask=None)`` gets one
of these; its support check gets the :class:`leanmoe.experts.registry.ExpertsCall` derived from it (dtypes,
``has_lora``, ``has_scales``). The bundle validates its own shapes and devices here, once, so a backend never
re-checks them; which dtypes a backend computes in is the backend's own rule.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import torch

from leanmoe.activations import Activation, check_layout, resolve_activation

if TYPE_CHECKING:  # leanmoe.lora imports the experts package: no import at run time (a cycle)
    from leanmoe.lora.module import ExpertLoRA


def shape_str(t: torch.Tensor | tuple[int, ...]) -> str:
    """``"[a, b, ...]"``: the shape of a tensor, or a shape itself, as error messages print it."""
    shape = t.shape if isinstance(t, torch.Tensor) else t
    return "[" + ", ".join(str(s) for s in shape) + "]"


def check_token_mask(token_mask: object, shape: tuple[int, ...], device: torch.device, *,
                     name: str = "token_mask", device_of: str = "x") -> torch.Tensor:
    """Checks that ``token_mask`` is a bool tensor of exactly ``shape`` on ``device`` (that of ``device_of``; no
    broadcasting); returns it. The one mask check of the layer, the router, ``moe_experts`` and the routing plan.

    Raises ``TypeError`` (not a tensor, not bool) or ``ValueError`` (shape, device); never reads tensor data, so it
    costs no sync and traces under ``torch.compile``.
    """
    expected = shape_str(tuple(shape))
    if not isinstance(token_mask, torch.Tensor):
        raise TypeError(f"{name} must be a bool tensor of shape {expected} or None, got {type(token_mask).__name__}")
    if token_mask.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool tensor (True = keep), got dtype {token_mask.dtype}")
    if tuple(token_mask.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {expected} (one flag per token), got {shape_str(token_mask)}")
    if token_mask.device != device:
        raise ValueError(f"{name} is on {token_mask.device} but {device_of} is on {device}")
    return token_mask


def require_tensor(name: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return t


@dataclasses.dataclass(frozen=True, kw_only=True)
class ExpertWeights:
    """E experts' weights in leanmoe's layout (views, never copies), plus how to apply them.

    Fields:
        gate_up_proj: ``[E, 2I, D]`` for a gated activation (gate/up rows per ``gate_up_layout``), ``[E, I, D]``
            otherwise.
        down_proj: ``[E, D, I]``, in gate_up_proj's dtype.
        gate_up_bias, down_bias: optional ``[E, N]`` and ``[E, D]``, floating point, one dtype for both.
        activation: a name or an :class:`leanmoe.Activation` (resolved here); default ``swiglu``.
        gate_up_layout: ``"concatenated"`` (gate rows first) or ``"interleaved"`` (gate even rows, gpt-oss).
        lora: optional :class:`leanmoe.ExpertLoRA` fitting these experts; only backends with ``takes_lora`` run it
            (a merged adapter is in the base weights already: see :attr:`active_lora`).
        gate_up_scale, down_scale: optional per-expert scales (floating point, leading dimension E) for quantized
            backends, which declare ``takes_scales``; no built-in backend takes them.

    All tensors live on gate_up_proj's device. Every bad field raises ``TypeError``/``ValueError`` naming the
    field, the bad value and the expected one; no tensor data is read (meta tensors work).

    Any module whose forward is ``(x_TD, topk_ids_TK, topk_weights_TK) -> y_TD`` and that has an
    ``expert_weights()`` method returning this is an *experts module* to leanmoe's tools (calibration, benchmarks):
    :class:`leanmoe.GroupedExperts`, and Hugging Face experts modules once :func:`leanmoe.hf.patch` has patched
    them.
    """

    gate_up_proj: torch.Tensor
    down_proj: torch.Tensor
    gate_up_bias: torch.Tensor | None = None
    down_bias: torch.Tensor | None = None
    activation: Activation = dataclasses.field(default_factory=lambda: resolve_activation("swiglu"))
    gate_up_layout: str = "concatenated"
    lora: ExpertLoRA | None = None
    gate_up_scale: torch.Tensor | None = None
    down_scale: torch.Tensor | None = None

    def __post_init__(self) -> None:
        # A name is resolved to its prebuilt Activation (frozen dataclass: set through object.__setattr__).
        object.__setattr__(self, "activation", resolve_activation(self.activation))
        check_layout(self.gate_up_layout)
        gate_up, down = require_tensor("gate_up_proj", self.gate_up_proj), require_tensor("down_proj", self.down_proj)
        if gate_up.dim() != 3:
            raise ValueError(f"gate_up_proj must be [E, 2I, D] (gated) or [E, I, D], got shape {shape_str(gate_up)}")
        if down.dim() != 3:
            raise ValueError(f"down_proj must be [E, D, I], got shape {shape_str(down)}")
        E, N, D = gate_up.shape
        I = down.shape[2]
        gated = self.activation.gated
        expected_N = 2 * I if gated else I
        if down.shape[:2] != (E, D) or N != expected_N:
            raise ValueError(
                f"for activation {self.activation.name!r} expected gate_up_proj [E, {'2I' if gated else 'I'}, D] "
                f"= [{E}, {expected_N}, {D}] and down_proj [E, D, I] = [{E}, {D}, {I}], "
                f"got gate_up_proj {shape_str(gate_up)} and down_proj {shape_str(down)}")
        if down.dtype != gate_up.dtype:
            raise TypeError(f"gate_up_proj dtype {gate_up.dtype} does not match down_proj dtype {down.dtype} (the "
                            f"projections share one dtype)")
        bias_dtype = None
        for name, bias, expected in (("gate_up_bias", self.gate_up_bias, (E, N)), ("down_bias", self.down_bias,
                                                                                     (E, D))):
            if bias is None:
                continue
            require_tensor(name, bias)
            if tuple(bias.shape) != expected:
                raise ValueError(f"{name} must be {list(expected)}, got {shape_str(bias)}")
            if not bias.is_floating_point():
                raise TypeError(f"{name} must be floating point, got dtype {bias.dtype}")
            if bias_dtype is not None and bias.dtype != bias_dtype:
                raise TypeError(f"{name} dtype {bias.dtype} does not match gate_up_bias dtype {bias_dtype}")
            bias_dtype = bias.dtype
        for name, scale in (("gate_up_scale", self.gate_up_scale), ("down_scale", self.down_scale)):
            if scale is None:
                continue
            require_tensor(name, scale)
            if scale.dim() < 1 or scale.shape[0] != E:
                raise ValueError(f"{name} must be per expert, [E, ...] with E={E}, got shape {shape_str(scale)}")
            if not scale.is_floating_point():
                raise TypeError(f"{name} must be floating point, got dtype {scale.dtype}")
        for name in ("down_proj", "gate_up_bias", "down_bias", "gate_up_scale", "down_scale"):
            t = getattr(self, name)
            if t is not None and t.device != gate_up.device:
                raise ValueError(f"{name} is on {t.device} but gate_up_proj is on {gate_up.device}")
        if self.lora is not None:
            from leanmoe.lora.compute import check_lora  # here: leanmoe.lora imports the experts package

            check_lora(self.lora, self)

    @property
    def num_experts(self) -> int:
        return self.gate_up_proj.shape[0]

    @property
    def dim(self) -> int:
        return self.gate_up_proj.shape[2]

    @property
    def hidden_dim(self) -> int:
        return self.down_proj.shape[2]

    @property
    def gated(self) -> bool:
        return self.activation.gated

    @property
    def dtype(self) -> torch.dtype:
        """The projections' dtype (gate_up_proj and down_proj share it)."""
        return self.gate_up_proj.dtype

    @property
    def bias_dtype(self) -> torch.dtype | None:
        """The biases' dtype, or None without biases."""
        bias = self.gate_up_bias if self.gate_up_bias is not None else self.down_bias
        return None if bias is None else bias.dtype

    @property
    def device(self) -> torch.device:
        return self.gate_up_proj.device

    @property
    def active_lora(self) -> ExpertLoRA | None:
        """The adapter a backend must apply: ``lora`` unless it is merged into the base weights (then None)."""
        return None if self.lora is None or self.lora.merged else self.lora

    @property
    def has_scales(self) -> bool:
        return self.gate_up_scale is not None or self.down_scale is not None

    def tensors(self) -> list[torch.Tensor]:
        """The base tensors present (projections, biases, scales), for autograd bookkeeping."""
        ts = (self.gate_up_proj, self.down_proj, self.gate_up_bias, self.down_bias, self.gate_up_scale,
              self.down_scale)
        return [t for t in ts if t is not None]

    def requires_grad(self) -> bool:
        """Whether a backward could reach any of these weights (grad mode on and a tensor, or the active adapter's
        parameters, requiring grad)."""
        if not torch.is_grad_enabled():
            return False
        lora = self.active_lora
        params: list[Any] = [] if lora is None else list(lora.parameters())
        return any(t.requires_grad for t in (*self.tensors(), *params))
