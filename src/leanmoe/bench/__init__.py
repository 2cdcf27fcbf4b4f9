"""Benchmarks of the expert layer: real model shapes, the verify-then-time harness, reports and plots.

``leanmoe bench`` / ``leanmoe verify`` (:mod:`leanmoe.cli`) are built on these; importing this package imports
neither rich nor matplotlib.
"""

from leanmoe.bench.harness import TOLERANCES, BenchPlan, Case, make_case, reference_errors, run_plan
from leanmoe.bench.presets import DEFAULT_PRESET, MODES, PRESETS, ROUTINGS, Preset, cpu_scaled, flops, get_preset
from leanmoe.bench.routing import make_routing, router_logits

__all__ = [
    "DEFAULT_PRESET",
    "MODES",
    "PRESETS",
    "ROUTINGS",
    "TOLERANCES",
    "BenchPlan",
    "Case",
    "Preset",
    "cpu_scaled",
    "flops",
    "get_preset",
    "make_case",
    "make_routing",
    "reference_errors",
    "router_logits",
    "run_plan",
]
