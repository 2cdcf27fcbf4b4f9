"""Expert compute: the backend registry, the reference loop, ``torch._grouped_mm`` and the fused Triton kernels."""

from leanmoe.experts.functional import describe_call, moe_experts
from leanmoe.experts.registry import (
    ExpertsBackend,
    ExpertsCall,
    available_backends,
    explain_backend,
    get_backend,
    register_backend,
    select_backend,
)

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
