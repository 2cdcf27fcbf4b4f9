"""Expert compute: the backend registry, the reference loop, ``torch._grouped_mm`` and the fused Triton kernels."""

# The built-in backends register themselves when imported: here, with the package, so that every registry lookup
# (a first call under torch.compile too) finds them without importing anything. The Triton backend module imports
# triton only when it runs, so it registers even without triton.
from leanmoe.experts import autoselect, decode, grouped_mm, reference, triton  # noqa: F401
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
