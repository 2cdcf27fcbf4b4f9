"""leanmoe: fast, memory-lean Mixture-of-Experts layers for PyTorch."""

from leanmoe.activations import Activation
from leanmoe.config import MoEConfig
from leanmoe.experts import (
    ExpertsBackend,
    ExpertsCall,
    available_backends,
    describe_call,
    explain_backend,
    moe_experts,
    register_backend,
)

__version__ = "0.1.0"

__all__ = [
    "Activation",
    "ExpertsBackend",
    "ExpertsCall",
    "MoEConfig",
    "available_backends",
    "describe_call",
    "explain_backend",
    "moe_experts",
    "register_backend",
]
