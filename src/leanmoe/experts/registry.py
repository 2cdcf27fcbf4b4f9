"""One registry for expert-compute backends.

Each backend declares the optional packages it needs and answers :meth:`ExpertsBackend.unsupported_reason` for a
described call. ``backend="auto"`` walks the backends by ``priority`` (highest first) and takes the first that
supports the call; :func:`explain_backend` says which one it took and why the others were passed over.
"""

from __future__ import annotations

import abc
import dataclasses
import importlib.util
from typing import ClassVar

import torch

from leanmoe.activations import Activation


@dataclasses.dataclass(frozen=True, kw_only=True)
class ExpertsCall:
    """What a backend needs to know to say whether it supports a call (shapes, dtype, device, options)."""

    device: torch.device
    dtype: torch.dtype
    num_tokens: int
    dim: int
    hidden_dim: int
    num_experts: int
    top_k: int
    activation: Activation
    gate_up_layout: str
    has_gate_up_bias: bool
    has_down_bias: bool
    save_percent: float
    requires_grad: bool
    #: Whether the call carries a token mask (every backend takes one: ``__call__(..., token_mask=)``).
    has_token_mask: bool = False


@torch.compiler.assume_constant_result
def cuda_capability(device_index: int | None) -> tuple[int, int]:
    """``(major, minor)`` of a CUDA device (None: the current one), for the backends' support checks. A constant to
    torch.compile, so a check adds no guard or graph break."""
    return torch.cuda.get_device_capability(device_index)


@torch.compiler.assume_constant_result
def _importable(module: str) -> bool:
    # A constant to torch.compile, which cannot trace importlib's finders: the check adds no graph break.
    return importlib.util.find_spec(module) is not None


class ExpertsBackend(abc.ABC):
    """A way to compute ``y_TD = sum_k w_tk * expert_{ids_tk}(x_t)``; see :func:`leanmoe.moe_experts`."""

    name: ClassVar[str]
    #: Higher runs first under ``backend="auto"``.
    priority: ClassVar[int] = 0
    #: Importable modules the backend needs, and the pip extra that brings them.
    requires: ClassVar[tuple[str, ...]] = ()
    extra: ClassVar[str | None] = None

    def missing_packages(self) -> list[str]:
        return [m for m in self.requires if not _importable(m)]

    def unsupported_reason(self, call: ExpertsCall) -> str | None:
        """``None`` when the backend can run ``call``, else a short reason."""
        return None

    def auto_unsupported_reason(self, call: ExpertsCall) -> str | None:
        """Like :meth:`unsupported_reason`, for ``backend="auto"``; a backend may run a call when named but not
        be the best choice for it (the Triton interpreter on the CPU, say)."""
        return self.unsupported_reason(call)

    @abc.abstractmethod
    def __call__(
        self,
        x_TD: torch.Tensor,
        topk_ids_TK: torch.Tensor,
        topk_weights_TK: torch.Tensor,
        gate_up_proj: torch.Tensor,
        down_proj: torch.Tensor,
        gate_up_bias: torch.Tensor | None,
        down_bias: torch.Tensor | None,
        *,
        activation: Activation,
        gate_up_layout: str,
        save_percent: float,
        token_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Validated inputs (see :func:`leanmoe.moe_experts`); returns ``y_TD [T, D]`` in x's dtype.

        ``token_mask`` (``[T]`` bool or None, True = keep; passed only when not None): masked tokens take no routed
        rows, give exactly zero output rows and exactly zero gradients (see
        :func:`leanmoe.experts.plan.plan_experts`). On meta tensors a backend returns a meta output without
        reading data.
        """


_BACKENDS: dict[str, ExpertsBackend] = {}
#: ``call -> (backend, why) | None``: asked first under ``auto``, outside torch.compile tracing; set by
#: :mod:`leanmoe.experts.autoselect` (the measured choice). None: the priority order alone.
auto_chooser = None


def register_backend(backend: ExpertsBackend) -> ExpertsBackend:
    """Adds ``backend`` under ``backend.name``; a second backend with the same name is an error."""
    if backend.name in _BACKENDS:
        raise ValueError(f"an experts backend named {backend.name!r} is already registered")
    _BACKENDS[backend.name] = backend
    return backend


def available_backends() -> list[str]:
    """Registered backend names, best first."""
    return [b.name for b in sorted(_BACKENDS.values(), key=lambda b: -b.priority)]


def get_backend(name: str) -> ExpertsBackend:
    if name not in _BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected 'auto' or one of {available_backends()}")
    return _BACKENDS[name]


def _reason(backend: ExpertsBackend, call: ExpertsCall, auto: bool = False) -> str | None:
    missing = backend.missing_packages()
    if missing:
        hint = f" (pip install 'leanmoe[{backend.extra}]')" if backend.extra else ""
        return f"needs {', '.join(missing)}{hint}"
    return backend.auto_unsupported_reason(call) if auto else backend.unsupported_reason(call)


def select_backend(name: str, call: ExpertsCall) -> tuple[ExpertsBackend, str]:
    """Resolves ``name`` (a backend name or ``"auto"``) for ``call``; returns the backend and why it was chosen.

    A named backend that cannot run the call raises ``ValueError`` with the reason: there is no silent fallback.
    """
    if name != "auto":
        backend = get_backend(name)
        reason = _reason(backend, call)
        if reason is not None:
            raise ValueError(f"backend {name!r} cannot run this call: {reason}")
        return backend, f"{name!r} was asked for"
    if not torch.compiler.is_compiling() and auto_chooser is not None:
        chosen = auto_chooser(call)
        if chosen is not None:
            return chosen
    skipped = []
    for backend_name in available_backends():
        backend = _BACKENDS[backend_name]
        reason = _reason(backend, call, auto=True)
        if reason is None:
            why = f"auto picked {backend_name!r}, the highest-priority backend that supports this call"
            if skipped:
                why += "; passed over: " + "; ".join(skipped)
            return backend, why
        skipped.append(f"{backend_name!r} ({reason})")
    raise AssertionError("the reference backend supports every valid call")


#: Dtypes a module may be cast to after construction: a backend that runs in any of them is not refused then.
_MODULE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_backend_for_module(name: str, call: ExpertsCall) -> None:
    """At an experts module's construction: raises ``ValueError`` when the backend ``name`` can run no call of
    this module on its device in any float dtype (say, ``"triton"`` on CPU without the Triton interpreter, or a
    missing package), so that the error comes at construction and not at the first forward.

    ``call`` describes the module's shapes and options with a representative batch. Meta modules are not checked
    (their device is decided by ``to_empty``); neither is ``"auto"`` (the reference backend runs everything). What
    depends on the batch, the grad mode or the dtype (a dtype cast after construction, alignment in one dtype) is
    left to the forward, which raises with the reason.
    """
    backend = get_backend(name) if name != "auto" else None
    if backend is None or call.device.type == "meta":
        return
    first = _reason(backend, call)
    if first is None:
        return
    for dtype in dict.fromkeys((call.dtype, *_MODULE_DTYPES)):
        for requires_grad in (True, False):  # a forward-only backend runs under no_grad
            if _reason(backend, dataclasses.replace(call, dtype=dtype, requires_grad=requires_grad)) is None:
                return
    raise ValueError(f"backend {name!r} cannot run on this module's device ({call.device}): {first}; pick "
                     f"backend='auto', or build the module on a device the backend runs on (or on 'meta')")


def explain_backend(call: ExpertsCall, name: str = "auto") -> str:
    """Says which backend ``name`` resolves to for ``call`` and why."""
    return select_backend(name, call)[1]

