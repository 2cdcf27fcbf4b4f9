"""Hugging Face transformers integration: run transformers MoE models on leanmoe, with no weight copies.

```python
import leanmoe.hf
model = AutoModelForCausalLM.from_pretrained(...)  # or from_config(...)
leanmoe.hf.patch(model, backend="auto")             # its MoE experts now run on leanmoe; returns the model
leanmoe.hf.patch(model, backend="auto")             # again, same options: a no-op (other options: ValueError)
leanmoe.hf.unpatch(model)                           # exactly the original behaviour again (unpatched: a no-op)
leanmoe.hf.supported_models()                       # the model types with a family file (tested)
# or, without patching (standard-layout experts only, see leanmoe.hf.interface):
model = AutoModelForCausalLM.from_pretrained(..., experts_implementation="leanmoe")
```

:func:`patch`:
1. finds every MoE block of a known family (one file per family in this package) and every other experts module
   in transformers' standard layout (``@use_experts_implementation``; see :mod:`leanmoe.hf.adapter`);
2. checks that leanmoe computes each exactly (layout, activation, no expert parallelism); one that it cannot
   raises ``ValueError`` naming the model type, before anything is changed;
3. gives each experts module a leanmoe ``forward(x_TD, topk_ids_TK, topk_weights_TK)`` and ``expert_weights()``
   (the experts-module protocol of :class:`leanmoe.ExpertWeights`), and the block a new forward where the family
   needs one (Llama 4). Routers, shared experts, attention and every parameter are left as they are.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch.nn as nn

if importlib.util.find_spec("transformers") is None:
    raise ImportError("leanmoe.hf needs transformers >= 5.0: pip install 'leanmoe[hf]'")

from leanmoe.config import check_save_percent
from leanmoe.hf import adapter
from leanmoe.hf.adapter import Family
from leanmoe.hf.deepseek_v3 import FAMILY as _DEEPSEEK_V3
from leanmoe.hf.gpt_oss import FAMILY as _GPT_OSS
from leanmoe.hf.interface import (
    EXPERTS_IMPLEMENTATION,
    interface_available,
    register_experts_implementation,
    unregister_experts_implementation,
)
from leanmoe.hf.llama4 import FAMILY as _LLAMA4
from leanmoe.hf.mixtral import FAMILY as _MIXTRAL
from leanmoe.hf.olmoe import FAMILY as _OLMOE
from leanmoe.hf.qwen2_moe import FAMILY as _QWEN2_MOE
from leanmoe.hf.qwen3_moe import FAMILY as _QWEN3_MOE

__all__ = [
    "EXPERTS_IMPLEMENTATION",
    "FAMILIES",
    "experts_modules",
    "interface_available",
    "is_patched",
    "patch",
    "register_experts_implementation",
    "router_top_k_attr",
    "supported_models",
    "unpatch",
    "unregister_experts_implementation",
]

FAMILIES: tuple[Family, ...] = (_MIXTRAL, _QWEN2_MOE, _QWEN3_MOE, _OLMOE, _DEEPSEEK_V3, _GPT_OSS, _LLAMA4)
MIN_TRANSFORMERS = (5, 0)


def _check_transformers() -> None:
    import transformers

    major_minor = tuple(int(p) for p in transformers.__version__.split(".")[:2] if p.isdigit())
    if major_minor < MIN_TRANSFORMERS:
        raise ImportError(f"leanmoe.hf needs transformers >= 5.0 (stacked experts modules), found "
                          f"{transformers.__version__}: pip install 'leanmoe[hf]'")


def supported_models() -> list[str]:
    """Model types with a leanmoe family file, tested against transformers' eager experts. Other models whose
    experts use transformers' standard layout are patched too (see :func:`patch`)."""
    return sorted(t for family in FAMILIES for t in family.model_types)


def _family_of_block(module: nn.Module) -> Family | None:
    return next((f for f in FAMILIES if f.owns_block(module)), None)


def _model_type(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None) or type(model).__name__


def _check_model(model: object) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (a transformers model or a module containing one), got "
                        f"{type(model).__name__}")


def _options(backend: str, save_percent: float) -> str:
    return f"backend={backend!r}, save_percent={save_percent!r}"


def patch(model: nn.Module, backend: str = "auto", *, save_percent: float = 0) -> nn.Module:
    """Runs the model's MoE experts on leanmoe's ``backend``; returns ``model`` (patched in place).

    Args:
        model: a transformers model (any head), or any module containing transformers MoE blocks (an
            ``nn.Module``; anything else raises ``TypeError``).
        backend: ``"auto"`` (the fastest backend that supports each call) or a name from
            :func:`leanmoe.available_backends`. One that can run the experts on their device in no dtype (``"triton"``
            on a CPU model without the Triton interpreter) raises here; one that cannot run a particular call (a
            dtype, an alignment) raises when called.
        save_percent: passed to :func:`leanmoe.moe_experts` (memory kept for backward, in ``[0, 100]``).

    Patching a patched model again with the same options is a no-op (it returns the model unchanged); with other
    options it raises ``ValueError`` naming both, and changes nothing: ``unpatch`` first to change the backend, so
    that a backend never changes silently. Parameters stay the same tensors: ``state_dict()`` and
    ``save_pretrained`` are unchanged. Raises ``ValueError`` naming the model type when the model has no MoE
    experts that leanmoe can compute exactly.
    """
    _check_model(model)
    _check_transformers()
    adapter.check_backend(backend)
    check_save_percent(save_percent)
    model_type = _model_type(model)

    plan: list[tuple[nn.Module, dict]] = []
    claimed: set[int] = set()
    for name, module in model.named_modules():
        family = _family_of_block(module)
        if family is None:
            continue
        experts = getattr(module, family.experts_attr)
        reason = family.unsupported_reason(experts)
        if reason is not None:
            raise ValueError(f"leanmoe.hf cannot patch model type {model_type!r} ({family.name} family): "
                             f"{name}.{family.experts_attr}: {reason}")
        plan.append((experts, family.experts_methods))
        if family.block_methods:
            plan.append((module, family.block_methods))
        claimed.add(id(experts))
    for name, module in model.named_modules():
        if id(module) in claimed or not adapter.is_standard_experts(module):
            continue
        reason = adapter.unsupported_reason(module)
        if reason is not None:
            raise ValueError(f"leanmoe.hf cannot patch model type {model_type!r}: {name}: {reason}")
        plan.append((module, adapter.STANDARD_METHODS))
    if not plan:
        raise ValueError(f"leanmoe.hf does not support model type {model_type!r}: it has no MoE experts module in "
                         f"transformers' standard layout (@use_experts_implementation) nor a block of a known family "
                         f"(supported model types: {', '.join(supported_models())})")
    for module, methods in plan:
        if "expert_weights" in methods:
            try:
                adapter.check_backend_runs_here(methods["expert_weights"](module), backend, save_percent)
            except ValueError as e:
                raise ValueError(f"leanmoe.hf cannot patch model type {model_type!r}: {e}") from None
    # Checked before anything changes: a refused patch leaves the model as it was.
    for name, module in model.named_modules():
        record = adapter.patch_record(module)
        if record is not None and (record.backend, record.save_percent) != (backend, save_percent):
            raise ValueError(f"model type {model_type!r} is already patched ({name or 'the model'}: "
                             f"{_options(record.backend, record.save_percent)}); patching it again with "
                             f"{_options(backend, save_percent)} would change its "
                             f"backend: call leanmoe.hf.unpatch(model) first")
    for module, methods in plan:
        if adapter.patch_record(module) is None:  # a module patched with these options already stays as it is
            adapter.install(module, methods, backend=backend, save_percent=save_percent)
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Restores every module :func:`patch` changed; returns ``model``.

    On a model that is not patched (or no longer is) it is a documented no-op: nothing changes and nothing is
    raised, so ``unpatch`` can be called to make sure. A non-module raises ``TypeError``.
    """
    _check_model(model)
    for module in model.modules():
        adapter.uninstall(module)
    return model


def is_patched(model: nn.Module) -> bool:
    """Whether any module of ``model`` is patched by :func:`patch`."""
    _check_model(model)
    return any(adapter.patch_record(m) is not None for m in model.modules())


def experts_modules(model: nn.Module) -> list[tuple[str, Any]]:
    """``(qualified name, module)`` of every patched experts module: each has ``forward(x_TD, topk_ids_TK,
    topk_weights_TK) -> y_TD`` and ``expert_weights()`` (the experts-module protocol)."""
    _check_model(model)
    return [(name, m) for name, m in model.named_modules()
            if adapter.patch_record(m) is not None and "expert_weights" in m.__dict__]


def router_top_k_attr(block: nn.Module) -> tuple[nn.Module, str]:
    """Where an MoE block's router reads K, as ``(module, attribute)``: ``setattr(module, attribute, k)`` makes the
    block route each token to k experts (patched or not; the router reads it on every forward).

    Known families: ``block.gate.top_k`` (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V3) or
    ``block.router.top_k`` (gpt-oss, Llama 4). Other blocks: the first child other than the experts that has a
    ``top_k`` attribute, else the block's own; ``ValueError`` when there is none.
    """
    family = _family_of_block(block)
    if family is not None:
        router = getattr(block, family.router_attr)
        return router, family.top_k_attr
    for child in block.children():
        if not adapter.is_standard_experts(child) and hasattr(child, "top_k"):
            return child, "top_k"
    if hasattr(block, "top_k"):
        return block, "top_k"
    raise ValueError(f"{type(block).__name__} is not an MoE block of a known family and has no router with a top_k "
                     f"attribute")


if interface_available():
    register_experts_implementation(EXPERTS_IMPLEMENTATION)
