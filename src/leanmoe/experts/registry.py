"""One registry for expert-compute backends.

Each backend declares the optional packages it needs, whether it takes LoRA adapters and per-expert scales, and
answers :meth:`ExpertsBackend.unsupported_reason` for a described call (its dtype rules included).
``backend="auto"`` walks the backends by ``priority`` (highest first) and takes the first that supports the call;
:func:`explain_backend` says which one it took and why the others were passed over. The built-in backends are
listed once, in :data:`leanmoe.experts.BUILTIN_BACKENDS`.

Legend: T tokens, D model dim, I expert hidden dim, E experts, K top-k.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import importlib.util
import inspect
from collections.abc import Callable
from typing import ClassVar

import torch

from leanmoe.activations import Activation
from leanmoe.experts.weights import ExpertWeights


@dataclasses.dataclass(frozen=True, kw_only=True)
class ExpertsCall:
    """What a backend needs to know to say whether it supports a call (shapes, dtypes, device, options).

    Derived from the call's :class:`~leanmoe.experts.weights.ExpertWeights` by :func:`describe_weights` (and
    :func:`leanmoe.describe_call`, which adds the inputs).
    """

    device: torch.device
    #: x's dtype (the output's).
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
    #: The projections' dtype; None: x's dtype (a description made without weights).
    weight_dtype: torch.dtype | None = None
    #: The biases' dtype (None without biases, or: x's dtype).
    bias_dtype: torch.dtype | None = None
    #: Whether the weights carry an unmerged LoRA adapter (only backends with ``takes_lora`` run it).
    has_lora: bool = False
    #: Whether that adapter applies dropout in this call (in training, with ``dropout > 0``).
    has_lora_dropout: bool = False
    #: Whether the weights carry per-expert scales (only backends with ``takes_scales`` run them).
    has_scales: bool = False


def describe_weights(weights: ExpertWeights, *, num_tokens: int, top_k: int, save_percent: float,
                     requires_grad: bool, dtype: torch.dtype | None = None,
                     has_token_mask: bool = False) -> ExpertsCall:
    """The :class:`ExpertsCall` of a call on ``weights`` with ``num_tokens`` tokens in ``dtype`` (default: the
    weights' dtype); reads no tensor data."""
    return ExpertsCall(device=weights.device, dtype=weights.dtype if dtype is None else dtype,
                       num_tokens=num_tokens, dim=weights.dim, hidden_dim=weights.hidden_dim,
                       num_experts=weights.num_experts, top_k=top_k, activation=weights.activation,
                       gate_up_layout=weights.gate_up_layout, has_gate_up_bias=weights.gate_up_bias is not None,
                       has_down_bias=weights.down_bias is not None, save_percent=save_percent,
                       requires_grad=requires_grad, has_token_mask=has_token_mask, weight_dtype=weights.dtype,
                       bias_dtype=weights.bias_dtype, has_lora=weights.active_lora is not None,
                       has_lora_dropout=_applies_dropout(weights.active_lora), has_scales=weights.has_scales)


def _applies_dropout(lora) -> bool:
    return lora is not None and bool(lora.training) and lora.dropout > 0


def same_dtype_reason(call: ExpertsCall) -> str | None:
    """The dtype rule of a backend whose kernels take the weights in x's dtype: None when they are, else why."""
    for names, dtype in (("gate_up_proj and down_proj", call.weight_dtype), ("the biases", call.bias_dtype)):
        if dtype is not None and dtype != call.dtype:
            return (f"{names} dtype {dtype} does not match x dtype {call.dtype} (this backend takes weights in "
                    f"x's dtype)")
    return None


@torch.compiler.assume_constant_result
def cuda_capability(device_index: int | None) -> tuple[int, int]:
    """``(major, minor)`` of a CUDA device (None: the current one), for the backends' support checks. A constant to
    torch.compile, so a check adds no guard or graph break."""
    return torch.cuda.get_device_capability(device_index)


@torch.compiler.assume_constant_result
def _importable(module: str) -> bool:
    # A constant to torch.compile, which cannot trace importlib's finders: the check adds no graph break.
    return importlib.util.find_spec(module) is not None


def _weights_of(args: tuple, kwargs: dict) -> ExpertWeights:
    """The ExpertWeights of a backend call's arguments after ``topk_weights_TK``: ``(weights,)``, or the form before
    ExpertWeights, ``(gate_up_proj, down_proj, gate_up_bias, down_bias)`` with ``activation=`` and
    ``gate_up_layout=`` (popped from ``kwargs``)."""
    if len(args) == 1 and isinstance(args[0], ExpertWeights):
        return args[0]
    if "weights" in kwargs and not args:
        return kwargs.pop("weights")
    if len(args) != 4:
        raise TypeError(f"an experts backend takes (x_TD, topk_ids_TK, topk_weights_TK, weights: ExpertWeights, *, "
                        f"save_percent, token_mask=None), got {3 + len(args)} positional arguments")
    gate_up_proj, down_proj, gate_up_bias, down_bias = args
    return ExpertWeights(gate_up_proj=gate_up_proj, down_proj=down_proj, gate_up_bias=gate_up_bias,
                         down_bias=down_bias, activation=kwargs.pop("activation"),
                         gate_up_layout=kwargs.pop("gate_up_layout"))


def _adapt_call(fn, legacy: bool):
    """Wraps a subclass's ``__call__`` so that it takes both call forms (see :class:`ExpertsBackend`)."""

    @functools.wraps(fn)
    def __call__(self, x_TD, topk_ids_TK, topk_weights_TK, *args, **kwargs):
        weights = _weights_of(args, kwargs)
        if not legacy:
            return fn(self, x_TD, topk_ids_TK, topk_weights_TK, weights, **kwargs)
        if kwargs.get("token_mask", False) is None:
            del kwargs["token_mask"]  # a backend written before masks existed still runs every unmasked call
        return fn(self, x_TD, topk_ids_TK, topk_weights_TK, weights.gate_up_proj, weights.down_proj,
                  weights.gate_up_bias, weights.down_bias, activation=weights.activation,
                  gate_up_layout=weights.gate_up_layout, **kwargs)

    __call__._leanmoe_adapted = True  # type: ignore[attr-defined]
    return __call__


class ExpertsBackend(abc.ABC):
    """A way to compute ``y_TD = sum_k w_tk * expert_{ids_tk}(x_t)``; see :func:`leanmoe.moe_experts`.

    A backend is a subclass with a ``name``, a ``priority``, its capabilities (``takes_lora``, ``takes_scales``),
    an :meth:`unsupported_reason` (dtypes, devices, shapes it cannot run) and a ``__call__`` taking the
    :class:`~leanmoe.experts.weights.ExpertWeights`; register an instance with :func:`register_backend`.

    Compatibility: a ``__call__`` also accepts the form before ExpertWeights, ``(x_TD, topk_ids_TK,
    topk_weights_TK, gate_up_proj, down_proj, gate_up_bias, down_bias, *, activation, gate_up_layout,
    save_percent, token_mask=None)``, and a subclass whose ``__call__`` is written in that form still works: it
    is handed the unpacked weights, and its support check gets the rule of that time (weights in x's dtype).
    """

    name: ClassVar[str]
    #: Higher runs first under ``backend="auto"``.
    priority: ClassVar[int] = 0
    #: Importable modules the backend needs, and the pip extra that brings them.
    requires: ClassVar[tuple[str, ...]] = ()
    extra: ClassVar[str | None] = None
    #: Whether ``__call__`` applies ``weights.lora`` (an unmerged :class:`leanmoe.ExpertLoRA`).
    takes_lora: ClassVar[bool] = False
    #: Whether ``__call__`` applies ``weights.gate_up_scale``/``down_scale`` (a quantized backend).
    takes_scales: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        fn = cls.__dict__.get("__call__")
        if fn is None or getattr(fn, "_leanmoe_adapted", False):
            return
        params = list(inspect.signature(fn).parameters)
        legacy = len(params) > 4 and params[4] == "gate_up_proj"
        cls.__call__ = _adapt_call(fn, legacy)  # type: ignore[method-assign]  # the contract's form, adapted once
        if legacy:
            own_reason = cls.unsupported_reason

            def unsupported_reason(self, call: ExpertsCall) -> str | None:
                return same_dtype_reason(call) or own_reason(self, call)

            cls.unsupported_reason = unsupported_reason  # type: ignore[method-assign]

    def missing_packages(self) -> list[str]:
        """The modules of :attr:`requires` that cannot be imported here (empty: the backend can load)."""
        return [m for m in self.requires if not _importable(m)]

    def unsupported_reason(self, call: ExpertsCall) -> str | None:
        """``None`` when the backend can run ``call``, else a short reason. The registry has already checked the
        capabilities (``takes_lora``, ``takes_scales``) and packages; the dtype rules are the backend's own
        (:func:`same_dtype_reason` for kernels that take weights in x's dtype)."""
        return same_dtype_reason(call)

    def auto_unsupported_reason(self, call: ExpertsCall) -> str | None:
        """Like :meth:`unsupported_reason`, for ``backend="auto"``; a backend may run a call when named but not
        be the best choice for it (the Triton interpreter on the CPU, say)."""
        return self.unsupported_reason(call)

    @abc.abstractmethod
    def __call__(self, x_TD: torch.Tensor, topk_ids_TK: torch.Tensor, topk_weights_TK: torch.Tensor,
                 weights: ExpertWeights, *, save_percent: float,
                 token_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Validated inputs (see :func:`leanmoe.moe_experts`) that this backend supports; returns ``y_TD [T, D]``
        in x's dtype.

        ``x_TD [T, D]`` float, ``topk_ids_TK [T, K]`` int32/int64 in ``[0, E)``, ``topk_weights_TK [T, K]``
        float, ``weights`` the experts (shapes checked, on x's device). ``token_mask`` (``[T]`` bool or None,
        True = keep): masked tokens take no routed rows, give exactly zero output rows and exactly zero gradients
        (see :func:`leanmoe.experts.plan.plan_experts`). On meta tensors a backend returns a meta output without
        reading data.
        """


_BACKENDS: dict[str, ExpertsBackend] = {}
#: ``call -> (backend, why) | None``: asked first under ``auto``, outside torch.compile tracing; set by
#: :mod:`leanmoe.experts.autoselect` (the measured choice). None: the priority order alone.
auto_chooser: Callable[[ExpertsCall], tuple[ExpertsBackend, str] | None] | None = None


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


def takes_lora_backends() -> list[str]:
    """Registered backends that take LoRA adapters, best first."""
    return [n for n in available_backends() if _BACKENDS[n].takes_lora]


def capability_reason(backend: ExpertsBackend, call: ExpertsCall) -> str | None:
    """None when ``backend`` has the capabilities ``call`` needs (LoRA adapters, per-expert scales), else which
    one it lacks."""
    if call.has_lora and not backend.takes_lora:
        return (f"it takes no LoRA adapters yet; backends that do: {takes_lora_backends()} (or 'auto'); "
                f"see docs/LORA.md")
    if call.has_scales and not backend.takes_scales:
        return ("it takes no per-expert weight scales (gate_up_scale, down_scale): a quantized backend declares "
                "takes_scales = True, and no built-in backend is one")
    return None


def unsupported_reason(backend: ExpertsBackend, call: ExpertsCall, auto: bool = False) -> str | None:
    """Why ``backend`` cannot run ``call`` (None: it can): a missing capability, a missing package, or the
    backend's own :meth:`~ExpertsBackend.unsupported_reason` (``auto_unsupported_reason`` when ``auto``)."""
    reason = capability_reason(backend, call)
    if reason is not None:
        return reason
    missing = backend.missing_packages()
    if missing:
        hint = f" (pip install 'leanmoe[{backend.extra}]')" if backend.extra else ""
        return f"needs {', '.join(missing)}{hint}"
    return backend.auto_unsupported_reason(call) if auto else backend.unsupported_reason(call)


_reason = unsupported_reason


def select_backend(name: str, call: ExpertsCall) -> tuple[ExpertsBackend, str]:
    """Resolves ``name`` (a backend name or ``"auto"``) for ``call``; returns the backend and why it was chosen.

    A named backend that cannot run the call raises ``ValueError`` with the reason: there is no silent fallback.
    """
    if name != "auto":
        backend = get_backend(name)
        reason = capability_reason(backend, call)
        if reason is not None:
            what = "lora" if call.has_lora and not backend.takes_lora else "per-expert scales"
            raise ValueError(f"backend {name!r} cannot run a call with {what}: {reason}")
        reason = _reason(backend, call)
        if reason is not None:
            raise ValueError(f"backend {name!r} cannot run this call: {reason}")
        return backend, f"{name!r} was asked for"
    # Weights in another dtype than x are almost always a missing cast: auto raises rather than quietly taking the
    # reference loop, the only backend that runs them (name backend="reference" to do that on purpose).
    mismatch = same_dtype_reason(call)
    if mismatch is not None:
        raise TypeError(f"backend 'auto': {mismatch.split(' (')[0]}; cast one of them, or name "
                        f"backend='reference', which computes mixed dtypes in x's dtype")
    if not torch.compiler.is_compiling() and auto_chooser is not None:
        chosen = auto_chooser(call)
        if chosen is not None:
            return chosen
    skipped: list[str] = []
    for backend_name in available_backends():
        backend = _BACKENDS[backend_name]
        reason = _reason(backend, call, auto=True)
        if reason is None:
            why = f"auto picked {backend_name!r}, the highest-priority backend that supports this call"
            if skipped:
                why += "; passed over: " + "; ".join(skipped)
            return backend, why
        skipped.append(f"{backend_name!r} ({reason})")
    raise ValueError("no registered backend can run this call: " + "; ".join(skipped))


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
            # A cast module casts every parameter: weights and biases take the dtype too.
            cast = dataclasses.replace(call, dtype=dtype, requires_grad=requires_grad,
                                       weight_dtype=dtype if call.weight_dtype is not None else None,
                                       bias_dtype=dtype if call.bias_dtype is not None else None)
            if _reason(backend, cast) is None:
                return
    raise ValueError(f"backend {name!r} cannot run on this module's device ({call.device}): {first}; pick "
                     f"backend='auto', or build the module on a device the backend runs on (or on 'meta')")


def explain_backend(call: ExpertsCall, name: str = "auto") -> str:
    """Says which backend ``name`` resolves to for ``call`` and why."""
    return select_backend(name, call)[1]

