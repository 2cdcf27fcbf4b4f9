"""The shared adapter: a Hugging Face experts module seen as a leanmoe experts module, and reversible patching.

Legend: T tokens, D model dim, I expert hidden dim, N gate/up rows (2I gated, I otherwise), E experts, K top-k.

transformers v5 stores each MoE layer's experts as one module of stacked 3-D parameters, in one of a few layouts
that its ``@use_experts_implementation`` decorator describes with flags on the instance:
- ``gate_up_proj [E, N, D]`` and ``down_proj [E, D, I]`` (``is_transposed=False``), or ``[E, D, N]`` and
  ``[E, I, D]`` (``is_transposed=True``: gpt-oss, and Llama 4, which is not decorated);
- gate rows first (``is_concatenated=True``) or interleaved with the up rows (``False``: gpt-oss);
- optional ``gate_up_proj_bias [E, N]`` and ``down_proj_bias [E, D]`` (``has_bias``);
- ``up_proj`` instead of ``gate_up_proj`` when the experts are not gated (``has_gate=False``).

leanmoe wants ``gate_up_proj [E, N, D]`` and ``down_proj [E, D, I]``: every layout above is that, or its
``transpose(-2, -1)`` view. :func:`expert_weights` builds those views on each call (never a copy, so gradients and
optimizer updates reach the module's own parameters, and ``state_dict()`` is untouched).

Patching (:func:`install` / :func:`uninstall`) sets instance attributes (``forward``, ``expert_weights``) on the
module, recording what was there before, so unpatching restores the exact original objects; the class, the
parameters and the transformers code are never modified.
"""

from __future__ import annotations

import dataclasses
import sys
import types
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

from leanmoe.activations import Activation
from leanmoe.experts import functional
from leanmoe.experts.registry import available_backends, check_backend_for_module, describe_weights
from leanmoe.experts.weights import ExpertWeights

#: Instance attribute holding a patched module's :class:`PatchRecord`.
PATCH_ATTR = "_leanmoe_patch"

#: Per experts class: how to read its activation (for classes that are not the transformers default gate).
#: Family files register their classes here; see :func:`register_experts_class`.
#: Keyed by "module:qualname" so that no transformers model module is imported before a model of it exists.
_ACTIVATION_READERS: dict[str, Callable[[nn.Module], Activation]] = {}


def class_key(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def register_experts_class(key: str, activation_reader: Callable[[nn.Module], Activation]) -> None:
    """Declares how to read the activation of instances of the experts class ``key`` ("module:qualname"), for
    classes whose ``_apply_gate`` replaces transformers' default gate (e.g. gpt-oss's clamped SwiGLU)."""
    _ACTIVATION_READERS[key] = activation_reader


def is_dtensor(t: torch.Tensor) -> bool:
    # No DTensor can exist before torch.distributed.tensor is imported, so there is nothing to import here.
    dtensor_module = sys.modules.get("torch.distributed.tensor")
    return dtensor_module is not None and isinstance(t, dtensor_module.DTensor)


def _act_fn_name(act_fn: nn.Module) -> str | None:
    """The leanmoe name of an element-wise HF activation module, or None when leanmoe has no exact match."""
    # Read per forward, also inside torch.compile, which cannot trace an import of transformers' lazy modules; a
    # model that holds an HF activation module has imported the module already.
    hf_act: Any = sys.modules.get("transformers.activations")
    if hf_act is None:
        from transformers import activations as hf_act

    if isinstance(act_fn, (hf_act.SiLUActivation, nn.SiLU)):
        return "silu"
    # hidden_act "gelu_pytorch_tanh"/"gelu_python_tanh", "gelu_new", "gelu_fast", "gelu_accurate": each computes
    # the tanh approximation of GELU (leanmoe's gelu/geglu), in one arrangement or another of the same formula.
    tanh_gelus = (hf_act.GELUTanh, hf_act.NewGELUActivation, hf_act.FastGELUActivation,
                  getattr(hf_act, "AccurateGELUActivation", hf_act.GELUTanh))
    if isinstance(act_fn, tanh_gelus):
        return "gelu"
    # hidden_act "gelu" and "gelu_python": the exact, erf-based GELU (leanmoe's gelu_exact/geglu_exact). Checked
    # after the tanh classes and by exact type, so that no subclass with another formula (ClippedGELU) matches.
    if type(act_fn) is hf_act.GELUActivation:
        return "gelu_exact"
    if isinstance(act_fn, nn.GELU):
        return "gelu" if act_fn.approximate == "tanh" else "gelu_exact"
    if isinstance(act_fn, hf_act.ReLUSquaredActivation):
        return "relu2"
    return None


def default_activation(module: nn.Module) -> Activation:
    """The activation of a transformers experts module that uses the default gate ``act_fn(gate) * up``
    (or ``act_fn(up)`` when not gated). Raises ``ValueError`` when leanmoe has no exact equivalent."""
    act_fn = getattr(module, "act_fn", None)
    name = _act_fn_name(act_fn) if isinstance(act_fn, nn.Module) else None
    if name is None:
        raise ValueError(f"{type(module).__name__}.act_fn is {type(act_fn).__name__}, which leanmoe has no exact "
                         f"equivalent for (supported: SiLU, exact and tanh-approximated GELU, ReLU squared)")
    if is_gated(module):
        gated = {"silu": "swiglu", "gelu": "geglu", "gelu_exact": "geglu_exact"}.get(name)
        if gated is None:
            raise ValueError(f"{type(module).__name__}: a gated {name} expert has no leanmoe activation")
        return Activation(name=gated)  # type: ignore[arg-type]
    return Activation(name=name)  # type: ignore[arg-type]


_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def is_gated(module: nn.Module) -> bool:
    return getattr(module, "has_gate", True)


def _uses_default_gate(cls: type) -> bool:
    from transformers.integrations import moe as hf_moe

    default = getattr(hf_moe, "_default_apply_gate", None)
    return default is not None and getattr(cls, "_apply_gate", None) is default


def is_standard_experts(module: nn.Module) -> bool:
    """True for instances of a class decorated with transformers' ``@use_experts_implementation``."""
    forward = getattr(type(module), "forward", None)
    return hasattr(forward, "__wrapped__") and hasattr(module, "is_transposed") and hasattr(module, "has_gate")


def parameters_reason(module: nn.Module) -> str | None:
    """Why leanmoe cannot read this experts module's parameters as plain float tensors, or None."""
    for name, p in module.named_parameters(recurse=False):
        if is_dtensor(p):
            return f"{type(module).__name__}.{name} is a DTensor (tensor or expert parallel): not supported"
        if p.dtype not in _FLOAT_DTYPES:
            return f"{type(module).__name__}.{name} has dtype {p.dtype} (quantized experts are not supported)"
    return None


def unsupported_reason(module: nn.Module) -> str | None:
    """Why leanmoe cannot compute this transformers experts module exactly, or None when it can."""
    cls = type(module)
    if not is_standard_experts(module):
        return f"{cls.__name__} does not use transformers' standard experts layout (@use_experts_implementation)"
    if getattr(module, "_is_expert_parallel", False):
        return f"{cls.__name__} is expert-parallel (sharded by transformers); leanmoe.hf runs unsharded experts only"
    if getattr(module, "has_post_expert_norm", False):
        return f"{cls.__name__} applies a norm after each expert, which leanmoe's expert compute has no seam for"
    reason = parameters_reason(module)
    if reason is not None:
        return reason
    if class_key(cls) not in _ACTIVATION_READERS and not _uses_default_gate(cls):
        return f"{cls.__name__} overrides the gate (_apply_gate) and no leanmoe.hf family declares its activation"
    try:
        activation_of(module)
    except ValueError as e:
        return str(e)
    return None


def activation_of(module: nn.Module) -> Activation:
    reader = _ACTIVATION_READERS.get(class_key(type(module)), default_activation)
    return reader(module)


def expert_weights(module: Any) -> ExpertWeights:
    """A transformers experts module's weights as leanmoe-layout views (``[E, N, D]``, ``[E, D, I]``), no copy."""
    transposed = getattr(module, "is_transposed", False)
    gate_up = module.gate_up_proj if is_gated(module) else module.up_proj
    down = module.down_proj
    if transposed:
        gate_up, down = gate_up.transpose(-2, -1), down.transpose(-2, -1)
    gate_up_bias = down_bias = None
    if getattr(module, "has_bias", False):
        gate_up_bias = module.gate_up_proj_bias if is_gated(module) else module.up_proj_bias
        down_bias = module.down_proj_bias
    layout = "concatenated" if getattr(module, "is_concatenated", True) else "interleaved"
    return ExpertWeights(gate_up_proj=gate_up, down_proj=down, gate_up_bias=gate_up_bias, down_bias=down_bias,
                         activation=activation_of(module), gate_up_layout=layout)


def run_experts(weights: ExpertWeights, x_TD: torch.Tensor, topk_ids_TK: torch.Tensor,
                topk_weights_TK: torch.Tensor, *, backend: str, save_percent: float, lora=None) -> torch.Tensor:
    # The ids come from the family's own router, valid by construction: no range check (a host read).
    # ``lora``: the experts module's ``lora`` submodule (leanmoe.lora.add_expert_lora), or None.
    if lora is not None:
        weights = dataclasses.replace(weights, lora=lora)
    return functional.run_experts(x_TD, topk_ids_TK, topk_weights_TK, weights, backend=backend,
                                  save_percent=save_percent, check_ids=False)


def check_backend(backend: str) -> None:
    if backend != "auto" and backend not in available_backends():
        raise ValueError(f"unknown backend {backend!r}; expected 'auto' or one of {available_backends()}")


def check_backend_runs_here(weights: ExpertWeights, backend: str, save_percent: float) -> None:
    """Raises ``ValueError`` at patch time when ``backend`` can run these experts on their device in no float dtype
    (``"triton"`` on a CPU model without the Triton interpreter, say), as :class:`leanmoe.GroupedExperts` does at
    construction."""
    call = describe_weights(weights, num_tokens=1, top_k=1, save_percent=save_percent, requires_grad=True)
    check_backend_for_module(backend, call)


# --- model families --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class Family:
    """One transformers model family: which MoE block class leanmoe patches, and where its router keeps top-k.

    The router is never touched (its exact semantics come for free); the block's ``experts`` module gets
    ``experts_methods`` (by default leanmoe's standard-layout forward and ``expert_weights``), and the block gets
    ``block_methods`` when the family's block does not call its experts as ``experts(x_TD, ids_TK, weights_TK)``.
    """

    name: str
    model_types: tuple[str, ...]
    module: str  # the transformers module defining the classes, e.g. "transformers.models.mixtral.modeling_mixtral"
    block_class: str
    experts_class: str
    router_attr: str  # the block's attribute holding its router
    top_k_attr: str = "top_k"  # the router's attribute holding K (read on every forward)
    experts_attr: str = "experts"
    experts_methods: dict[str, Callable] = dataclasses.field(default_factory=lambda: dict(STANDARD_METHODS))
    block_methods: dict[str, Callable] = dataclasses.field(default_factory=dict)
    #: Why leanmoe cannot run this experts module exactly, or None; defaults to the standard-layout checks.
    check: Callable[[nn.Module], str | None] | None = None

    def owns_block(self, module: nn.Module) -> bool:
        cls = type(module)
        return cls.__module__ == self.module and cls.__qualname__ == self.block_class

    def unsupported_reason(self, experts: nn.Module) -> str | None:
        cls = type(experts)
        if cls.__module__ != self.module or cls.__qualname__ != self.experts_class:
            return f"expected {self.experts_class} experts, found {cls.__name__}"
        return (self.check or unsupported_reason)(experts)


# --- reversible instance patching -------------------------------------------------------------------------------


@dataclasses.dataclass
class PatchRecord:
    """What :func:`install` changed on one module, and the leanmoe options its patched methods read."""

    backend: str
    save_percent: float
    installed: tuple[str, ...]  # the instance attributes install set
    saved: dict[str, object]  # those of them the instance already had (restored by uninstall)


def patch_record(module: nn.Module) -> PatchRecord | None:
    return module.__dict__.get(PATCH_ATTR)


def install(module: nn.Module, methods: dict[str, Callable], *, backend: str, save_percent: float) -> None:
    """Binds each function in ``methods`` to ``module`` as an instance attribute (``module.forward`` etc.)."""
    if patch_record(module) is not None:
        raise RuntimeError(f"{type(module).__name__} is already patched; unpatch it first")
    saved = {name: module.__dict__[name] for name in methods if name in module.__dict__}
    for name, fn in methods.items():
        object.__setattr__(module, name, types.MethodType(fn, module))
    object.__setattr__(module, PATCH_ATTR, PatchRecord(backend=backend, save_percent=save_percent,
                                                       installed=tuple(methods), saved=saved))


def uninstall(module: nn.Module) -> bool:
    """Restores what :func:`install` replaced; returns False if the module was not patched."""
    record = module.__dict__.pop(PATCH_ATTR, None)
    if record is None:
        return False
    for name in record.installed:
        module.__dict__.pop(name, None)
    for name, previous in record.saved.items():
        object.__setattr__(module, name, previous)
    return True


# --- the patched methods of a standard experts module ------------------------------------------------------------


def patched_expert_weights(self: Any) -> ExpertWeights:
    """``expert_weights()`` of a patched transformers experts module (the experts-module protocol)."""
    return expert_weights(self)


def patched_experts_forward(self: Any, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                            top_k_weights: torch.Tensor) -> torch.Tensor:
    """``forward(x_TD, topk_ids_TK, topk_weights_TK) -> y_TD`` of a patched transformers experts module."""
    record = patch_record(self)
    assert record is not None  # this forward is installed with its record
    return run_experts(expert_weights(self), hidden_states, top_k_index, top_k_weights,
                       backend=record.backend, save_percent=record.save_percent, lora=self._modules.get("lora"))


STANDARD_METHODS: dict[str, Callable] = {"forward": patched_experts_forward,
                                         "expert_weights": patched_expert_weights}
