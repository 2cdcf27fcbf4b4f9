"""LoRA on a model's experts: add adapters, merge them into the base weights, take them out again.

Legend: D model dim, I expert hidden dim, N gate/up rows (2I gated, I otherwise), E experts, r rank.

An *experts module* is a :class:`leanmoe.GroupedExperts` (inside :class:`leanmoe.MoE` layers) or a transformers
experts module patched by :func:`leanmoe.hf.patch`. :func:`add_expert_lora` gives each one an
:class:`leanmoe.ExpertLoRA` as its ``lora`` submodule, which its forward passes to :func:`leanmoe.moe_experts`.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
import torch.nn as nn

from leanmoe.experts.module import GroupedExperts
from leanmoe.lora.compute import LORA_BACKENDS
from leanmoe.lora.module import TARGETS, ExpertLoRA, check_lora_options, check_targets


def _is_hf_patched_experts(module: nn.Module) -> bool:
    # A patched transformers model imported leanmoe.hf already; an unpatched model needs nothing from it.
    adapter = sys.modules.get("leanmoe.hf.adapter")
    return adapter is not None and adapter.patch_record(module) is not None and "expert_weights" in module.__dict__


def _backend_of(module: Any) -> str:
    if _is_hf_patched_experts(module):
        return sys.modules["leanmoe.hf.adapter"].patch_record(module).backend
    return module.backend


def experts_modules(model: nn.Module) -> list[tuple[str, Any]]:
    """``(qualified name, module)`` of every experts module of ``model`` that can take adapters (``model`` itself
    included): :class:`leanmoe.GroupedExperts` and transformers experts patched by :func:`leanmoe.hf.patch` (duck-typed:
    both have ``expert_weights()`` and a ``lora`` submodule slot)."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, GroupedExperts) or
            _is_hf_patched_experts(m)]


def lora_modules(model: nn.Module) -> list[tuple[str, Any, ExpertLoRA]]:
    """``(name, experts module, adapter)`` of every experts module of ``model`` that has an adapter."""
    return [(name, m, m.lora) for name, m in experts_modules(model) if isinstance(m._modules.get("lora"), ExpertLoRA)]


def add_expert_lora(model: nn.Module, *, rank: int = 16, alpha: float = 32, targets=TARGETS, dropout: float = 0.0,
                    dtype: torch.dtype | None = None) -> nn.Module:
    """Adds an :class:`leanmoe.ExpertLoRA` to every experts module of ``model``; returns ``model``.

    Each experts module's own parameters (``gate_up_proj``, ``down_proj``, biases) are frozen
    (``requires_grad=False``); the adapter becomes its ``lora`` submodule, so ``model.parameters()``, optimizers,
    ``state_dict()`` (keys ``...experts.lora.gate_up_A`` etc.) and FSDP2 see it. Adapters start with ``B = 0``: the
    model's outputs are unchanged until they are trained.

    Args:
        rank, alpha: the LoRA rank (int >= 1) and scale numerator (``s = alpha / rank``).
        targets: which weights to adapt: ``("gate_up", "down")``, ``("gate_up",)`` or ``("down",)``.
        dropout: LoRA dropout on the adapter's input, in ``[0, 1]`` (training mode only).
        dtype: the adapters' dtype; ``None`` takes that of each module's expert weights.

    Raises ``ValueError`` when the model has no experts module (patch transformers models with
    :func:`leanmoe.hf.patch` first), when one already has an adapter, or when one runs on a backend that takes no
    adapters; nothing is changed then.
    """
    check_lora_options(rank=rank, alpha=alpha, dropout=dropout)
    targets = check_targets(targets)
    found = experts_modules(model)
    if not found:
        raise ValueError(f"{type(model).__name__} has no experts module: expected leanmoe.MoE / GroupedExperts "
                         f"layers or a transformers model patched with leanmoe.hf.patch(model)")
    for name, module in found:
        if module._modules.get("lora") is not None:
            raise ValueError(f"{name or type(module).__name__} already has a LoRA adapter")
        backend = _backend_of(module)
        if backend != "auto" and backend not in LORA_BACKENDS:
            raise ValueError(f"{name or type(module).__name__} runs on backend {backend!r}, which takes no LoRA "
                             f"adapters; use 'auto' or one of {list(LORA_BACKENDS)}")
    for _, module in found:
        w = module.expert_weights()
        E, N, D = w.gate_up_proj.shape
        lora = ExpertLoRA(num_experts=E, dim=D, hidden_dim=w.down_proj.shape[2], rank=rank, alpha=alpha,
                          gated=w.activation.gated, targets=targets, dropout=dropout,
                          dtype=dtype or w.gate_up_proj.dtype, device=w.gate_up_proj.device)
        for p in module.parameters(recurse=False):
            p.requires_grad_(False)
        module.lora = lora
    return model


def _fold(model: nn.Module, sign: int, merged: bool) -> nn.Module:
    with torch.no_grad():
        for _, module, lora in lora_modules(model):
            if lora.merged == merged:
                continue
            w = module.expert_weights()
            for target in lora.targets:
                base = w.gate_up_proj if target == "gate_up" else w.down_proj  # a view of the parameter
                # The delta in fp32, added in the base dtype: unmerge subtracts the same rounded delta.
                base.add_(lora.delta(target).to(base.dtype), alpha=sign)
            lora.merged = merged
    return model


def merge_expert_lora(model: nn.Module) -> nn.Module:
    """Folds ``s B A`` into each adapted experts module's base weights, in place; returns ``model``. While merged,
    the expert compute skips the adapter (so it is never added twice); merging twice changes nothing."""
    if not lora_modules(model):
        raise ValueError(f"{type(model).__name__} has no expert LoRA adapter (see leanmoe.lora.add_expert_lora)")
    return _fold(model, 1, True)


def unmerge_expert_lora(model: nn.Module) -> nn.Module:
    """Takes ``s B A`` out of the base weights again (exact up to the base dtype's round-off); returns ``model``."""
    if not lora_modules(model):
        raise ValueError(f"{type(model).__name__} has no expert LoRA adapter (see leanmoe.lora.add_expert_lora)")
    return _fold(model, -1, False)
