"""Expert compute: the backend registry, the reference loop, ``torch._grouped_mm`` and the fused Triton kernels."""

from leanmoe.experts.functional import describe_call, moe_experts
from leanmoe.experts.registry import (
    ExpertsBackend,
    ExpertsCall,
    _load_builtin_backends,
    available_backends,
    explain_backend,
    get_backend,
    register_backend,
    select_backend,
)

# Registered at import, so a first call under torch.compile finds them without tracing an import.
_load_builtin_backends()

__all__ = [
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
