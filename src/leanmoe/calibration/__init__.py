"""Calibration mode for quantizers: every expert sees every calibration token; the output keeps the true routing.

``with calibrate(model, observers=[HessianObserver(), StatsObserver()]) as session: model(batch)``; then
``session.results[layer][expert][projection][observer_name]``. See ``docs/CALIBRATION.md``.
"""

from leanmoe.calibration.observers import (
    PROJECTIONS,
    ExpertStats,
    Hessian,
    HessianObserver,
    Observer,
    StatsObserver,
)
from leanmoe.calibration.session import MODES, CalibrationReport, CalibrationSession, RareExpert, calibrate

__all__ = [
    "MODES",
    "PROJECTIONS",
    "CalibrationReport",
    "CalibrationSession",
    "ExpertStats",
    "Hessian",
    "HessianObserver",
    "Observer",
    "RareExpert",
    "StatsObserver",
    "calibrate",
]
