"""Forward-only calls in eager mode: a custom op's Python body run directly, past the dispatcher.

leanmoe's kernels are ``torch.library`` custom ops so that ``torch.compile`` traces them (through their fakes) and
autograd reaches their backward. A call that needs neither (an eager forward with nothing requiring grad: decode,
evaluation, calibration) pays the op's Python dispatch for nothing: about 100 us per call on a CPU host
(``torch._library`` autograd and dispatch wrappers, measured with the kernels stubbed out), which is a large share
of the host time of a decode-sized call. :func:`op_or_body` gives such a call the body itself; the kernels, the
plan and the result are the same (the op runs exactly this body), only the dispatch is gone.

The body runs directly only where nothing could tell the difference: not while torch.compile traces, not under a
``TorchDispatchMode`` (fake tensors, ``make_fx``, flop counters: they must see the op), and only on plain tensors
on a real device (a tensor subclass such as DTensor, or a meta tensor, goes through the op and its fake).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch

F = TypeVar("F", bound=Callable)

_PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)


def runs_directly(*tensors: torch.Tensor | None) -> bool:
    """Whether a forward-only call on ``tensors`` (None entries skipped) may run an op's body without the op: eager
    (no torch.compile tracing), no dispatch mode active, every tensor a plain tensor off the meta device."""
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack():
        return False
    for t in tensors:
        if t is not None and (type(t) not in _PLAIN_TYPES or t.device.type == "meta"):
            return False
    return True


def op_or_body(op: F, body: F, *tensors: torch.Tensor | None) -> F:
    """``body`` (the op's own implementation) when :func:`runs_directly` holds for ``tensors``, else ``op``. For
    calls that need no autograd: the caller has checked that nothing requires grad."""
    return body if runs_directly(*tensors) else op


__all__ = ["op_or_body", "runs_directly"]
