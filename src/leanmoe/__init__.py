"""leanmoe: fast, memory-lean Mixture-of-Experts layers for PyTorch."""

from leanmoe.activations import Activation
from leanmoe.config import ExpertsConfig, MoEConfig, RouterConfig, SharedExpertsConfig
from leanmoe.experts import (
    ExpertsBackend,
    ExpertsCall,
    ExpertWeights,
    available_backends,
    describe_call,
    explain_backend,
    moe_experts,
    register_backend,
)
from leanmoe.experts.module import GroupedExperts, SharedExperts
from leanmoe.layer import MoE
from leanmoe.lora import ExpertLoRA
from leanmoe.parallel.dispatcher import LocalDispatcher
from leanmoe.routers import RouterOutput, TopKRouter, stable_topk, update_balance_biases

__version__ = "0.2.0.dev0"

__all__ = [
    "Activation",
    "ExpertsBackend",
    "ExpertsCall",
    "ExpertsConfig",
    "ExpertLoRA",
    "ExpertWeights",
    "GroupedExperts",
    "LocalDispatcher",
    "MoE",
    "MoEConfig",
    "RouterConfig",
    "RouterOutput",
    "SharedExperts",
    "SharedExpertsConfig",
    "TopKRouter",
    "available_backends",
    "describe_call",
    "explain_backend",
    "moe_experts",
    "register_backend",
    "stable_topk",
    "update_balance_biases",
]
