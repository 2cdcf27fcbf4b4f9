"""Expert compute: the backend registry, the reference loop, ``torch._grouped_mm`` and the fused Triton kernels.

A backend is an :class:`ExpertsBackend` subclass in its own module, given the experts as one
:class:`ExpertWeights`; it is built in once it is listed in :data:`BUILTIN_BACKENDS` (see CONTRIBUTING.md, "Adding
a backend").
"""

# The built-in backends are registered here, with the package, so that every registry lookup (a first call under
# torch.compile too) finds them without importing anything. The Triton backend modules import triton only when they
# run, so they register even without triton.
from leanmoe.experts import autoselect  # noqa: F401  (sets the registry's measured auto choice)
from leanmoe.experts.decode import TritonDecodeBackend
from leanmoe.experts.functional import describe_call, moe_experts
from leanmoe.experts.grouped_mm import GroupedMMBackend
from leanmoe.experts.reference import ReferenceBackend
from leanmoe.experts.registry import (
    ExpertsBackend,
    ExpertsCall,
    available_backends,
    explain_backend,
    get_backend,
    register_backend,
    select_backend,
)
from leanmoe.experts.triton import TritonBackend
from leanmoe.experts.weights import ExpertWeights

#: The built-in backends, one line each (``priority`` orders them under ``auto``, not this order).
BUILTIN_BACKENDS: tuple[type[ExpertsBackend], ...] = (
    ReferenceBackend,
    GroupedMMBackend,
    TritonBackend,
    TritonDecodeBackend,
)
for _backend in BUILTIN_BACKENDS:
    register_backend(_backend())
del _backend

__all__ = [
    "BUILTIN_BACKENDS",
    "ExpertWeights",
    "ExpertsBackend",
    "ExpertsCall",
    "available_backends",
    "describe_call",
    "explain_backend",
    "get_backend",
    "moe_experts",
    "register_backend",
    "select_backend",
]
