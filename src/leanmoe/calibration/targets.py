"""Finding what a calibration session hooks: experts modules (by protocol), their routers and shared experts.

1. an *experts module* is any module with ``expert_weights()`` (see :class:`leanmoe.ExpertWeights`):
   :class:`leanmoe.GroupedExperts`, or a Hugging Face experts module patched by :func:`leanmoe.hf.patch`;
2. its *block* is its parent module (``leanmoe.MoE``, ``MixtralSparseMoeBlock``, ``DeepseekV3MoE``, ...);
3. the block's *router* is its :class:`leanmoe.TopKRouter` (top-k in ``router.config.top_k``) or, for Hugging Face,
   the child with an integer ``top_k`` attribute (``gate.top_k`` in Mixtral, Qwen3-MoE and DeepSeek-V3);
4. the block's *shared experts* are its children with ``gate_proj``, ``up_proj`` and ``down_proj`` linear layers
   (``MoE.shared_experts``, ``DeepseekV3MoE.shared_experts``, ``Qwen2MoeSparseMoeBlock.shared_expert``).
"""

from __future__ import annotations

import dataclasses
import sys
from contextlib import ExitStack
from typing import Any

import torch.nn as nn

from leanmoe.routers.topk import TopKRouter


@dataclasses.dataclass
class SharedTarget:
    name: str
    module: Any  # duck-typed: a transformers shared-expert MLP (gate_proj, up_proj, down_proj)


@dataclasses.dataclass
class ExpertsTarget:
    name: str
    # Duck-typed: leanmoe.GroupedExperts or a patched transformers experts module (expert_weights()), its block
    # and router as the family defines them.
    module: Any
    num_experts: int
    block: Any
    router: Any
    shared: list[SharedTarget]


def is_experts_module(module: nn.Module) -> bool:
    return callable(getattr(module, "expert_weights", None))


def _is_shared_mlp(module: nn.Module) -> bool:
    return all(isinstance(getattr(module, p, None), nn.Linear) for p in ("gate_proj", "up_proj", "down_proj"))


def _hf_top_k(module: nn.Module) -> int | None:
    top_k = getattr(module, "top_k", None)
    return top_k if isinstance(top_k, int) and not isinstance(top_k, bool) else None


def find_targets(model: nn.Module) -> list[ExpertsTarget]:
    """Every experts module in ``model`` with its block, router and shared experts, in ``named_modules`` order."""
    targets = []
    for name, module in model.named_modules():
        if not is_experts_module(module):
            continue
        block, block_name = None, ""
        if name:
            block_name = name.rpartition(".")[0]
            block = model.get_submodule(block_name)
        router, shared = None, []
        if block is not None:
            for child_name, child in block.named_children():
                if child is module:
                    continue
                if router is None and (isinstance(child, TopKRouter) or _hf_top_k(child) is not None):
                    router = child
                elif _is_shared_mlp(child):
                    shared.append(SharedTarget(f"{block_name}.{child_name}" if block_name else child_name, child))
        num_experts = module.expert_weights().gate_up_proj.shape[0]
        targets.append(ExpertsTarget(name, module, num_experts, block, router, shared))
    return targets


def check_dispatcher(target: ExpertsTarget) -> None:
    """Calibration observes tokens where the experts module receives them: only a local dispatcher passes tokens."""
    from leanmoe.parallel.dispatcher import LocalDispatcher

    dispatcher = getattr(target.block, "dispatcher", None)
    if dispatcher is not None and type(dispatcher) is not LocalDispatcher:
        raise NotImplementedError(
            f"{target.name!r}: calibration needs the local dispatcher, got {type(dispatcher).__name__} "
            f"(expert-parallel layers hand the experts module dispatched rows, not tokens)")


def override_top_k(target: ExpertsTarget, top_k: int, stack: ExitStack) -> None:
    """Makes ``target``'s router pick ``top_k`` experts until ``stack`` closes.

    leanmoe: the router's config is replaced by a copy with ``top_k`` (the original, possibly shared by other
    layers, is never mutated); Hugging Face: the attribute :func:`leanmoe.hf.router_top_k_attr` names (the router's
    ``top_k``) is set.
    """
    router = target.router
    if router is None:
        raise ValueError(f"mode='override' needs a router beside {target.name!r}: none found in its parent module "
                         f"(a leanmoe.TopKRouter or a child with an integer top_k attribute)")
    if isinstance(router, TopKRouter):
        original = router.config
        router.config = dataclasses.replace(original, top_k=top_k)  # validates top_k against the router's config
        stack.callback(setattr, router, "config", original)
        return
    E = target.num_experts
    num_group, topk_group = getattr(router, "num_group", None), getattr(router, "topk_group", None)
    limit = E // num_group * topk_group if isinstance(num_group, int) and isinstance(topk_group, int) else E
    if not 1 <= top_k <= limit:
        raise ValueError(f"top_k must be in [1, {limit}] for {target.name!r} ({E} experts"
                         + (f", {topk_group} of {num_group} groups kept" if limit != E else "") + f"), got {top_k}")
    owners = [(router, "top_k")]
    hf = sys.modules.get("leanmoe.hf")  # loaded whenever leanmoe.hf.patch patched the model; never imported here
    if hf is not None and target.block is not None:
        owners = [hf.router_top_k_attr(target.block)]
    for owner, attr in owners:
        old = getattr(owner, attr)
        setattr(owner, attr, top_k)
        stack.callback(setattr, owner, attr, old)
