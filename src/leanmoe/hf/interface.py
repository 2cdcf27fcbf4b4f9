"""leanmoe in transformers' experts interface: ``from_pretrained(..., experts_implementation="leanmoe")``.

transformers (5.x; tested on 5.17 and 5.23) dispatches the forward of every experts class decorated with
``@use_experts_implementation`` through ``ExpertsInterface``, a registry of functions
``fn(experts_module, hidden_states, top_k_index, top_k_weights) -> y`` selected by
``config._experts_implementation`` (``"eager"``, ``"grouped_mm"``, ``"batched_mm"``, ...). Importing
``leanmoe.hf`` registers ``"leanmoe"`` (backend ``"auto"``) there; :func:`register_experts_implementation` adds
more names (``"leanmoe_triton"`` with ``backend="triton"``, say).

This route needs no patching and survives ``from_pretrained``, but it covers only decorated experts classes
(not Llama 4) and gives the modules no ``expert_weights()``: use :func:`leanmoe.hf.patch` for the full
experts-module protocol.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

import torch
import torch.nn as nn

from leanmoe.config import check_save_percent
from leanmoe.hf.adapter import check_backend, expert_weights, run_experts, unsupported_reason

#: The name importing ``leanmoe.hf`` registers.
EXPERTS_IMPLEMENTATION = "leanmoe"

_REGISTERED: dict[str, Callable] = {}


def _experts_interface():
    from transformers.integrations import moe as hf_moe

    interface = getattr(hf_moe, "ExpertsInterface", None)
    if interface is None or not hasattr(interface, "register"):
        import transformers

        raise ImportError(f"transformers {transformers.__version__} has no ExpertsInterface (added in 5.0); use "
                          f"leanmoe.hf.patch(model) or upgrade transformers")
    return interface


def interface_available() -> bool:
    """Whether the installed transformers has the experts interface (``transformers.integrations.moe``)."""
    if importlib.util.find_spec("transformers.integrations.moe") is None:
        return False
    from transformers.integrations import moe as hf_moe

    return hasattr(getattr(hf_moe, "ExpertsInterface", None), "register")


def make_experts_forward(backend: str = "auto", save_percent: float = 0) -> Callable:
    """An ``ExpertsInterface`` function computing a standard-layout experts module with leanmoe."""
    check_backend(backend)
    check_save_percent(save_percent)

    def leanmoe_experts_forward(self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                                top_k_weights: torch.Tensor) -> torch.Tensor:
        reason = unsupported_reason(self)
        if reason is not None:
            raise ValueError(f"experts_implementation={leanmoe_experts_forward.__name__!r} cannot run "
                             f"{type(self).__name__}: {reason}")
        return run_experts(expert_weights(self), hidden_states, top_k_index, top_k_weights, backend=backend,
                           save_percent=save_percent)

    leanmoe_experts_forward.__name__ = "leanmoe_experts_forward"
    return leanmoe_experts_forward


def register_experts_implementation(name: str = EXPERTS_IMPLEMENTATION, *, backend: str = "auto",
                                    save_percent: float = 0) -> None:
    """Registers ``name`` in transformers' ``ExpertsInterface``, computing with the leanmoe ``backend``.

    Then ``from_pretrained(..., experts_implementation=name)`` or ``model.set_experts_implementation(name)``
    selects it. Re-registering a name leanmoe registered replaces it; a name transformers owns is refused.
    """
    interface = _experts_interface()
    if name in interface._global_mapping and name not in _REGISTERED:
        raise ValueError(f"experts implementation {name!r} is already registered by transformers or another library")
    fn = make_experts_forward(backend, save_percent)
    interface.register(name, fn)
    _REGISTERED[name] = fn


def unregister_experts_implementation(name: str) -> None:
    """Removes a name :func:`register_experts_implementation` added."""
    if name not in _REGISTERED:
        raise ValueError(f"{name!r} was not registered by leanmoe.hf (registered: {sorted(_REGISTERED)})")
    interface = _experts_interface()
    if interface._global_mapping.get(name) is _REGISTERED[name]:
        del interface._global_mapping[name]
    del _REGISTERED[name]
