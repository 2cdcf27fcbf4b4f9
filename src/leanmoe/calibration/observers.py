"""Per-expert observers: what a calibration session hands each expert's projection inputs to.

Legend: R rows (tokens an expert's projection sees), C channels (D for ``gate_up``, I for ``down``), E experts.

An observer is any callable ``observer(layer_name, expert_idx, projection, rows_RC) -> None`` where
- ``layer_name`` is the qualified name of the experts module (or of the shared-experts module) in the model,
- ``expert_idx`` is the expert's index in that module (0 for a shared-experts MLP),
- ``projection`` is ``"gate_up"`` (rows are the tokens x, the input of ``gate_up_proj``, or of ``gate_proj`` and
  ``up_proj`` in a shared MLP) or ``"down"`` (rows are the expert's activation h, the input of ``down_proj``),
- ``rows_RC`` is in the model's dtype and device, read-only, and valid only during the call (copy what you keep).
Optional members: ``name`` (the key in ``session.results``, default the class name), ``results()`` returning
``{(layer_name, expert_idx, projection): value}``, and ``observe_routing(layer_name, tokens_per_expert_E)``, called
once per experts-module call with the routed (unmasked) token count of every expert (for a shared-experts MLP,
``E = 1`` and the count is every unmasked token: a shared expert receives them all).
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Hashable
from typing import Any, Protocol, runtime_checkable

import torch

Key = tuple[str, int, str]  # (layer_name, expert_idx, projection)
PROJECTIONS = ("gate_up", "down")


@runtime_checkable
class Observer(Protocol):
    """The observer protocol (see the module docstring for the optional ``name``, ``results``, ``observe_routing``)."""

    def __call__(self, layer_name: str, expert_idx: int, projection: str, rows_RC: torch.Tensor) -> None: ...


def observer_name(observer: Any) -> str:
    return getattr(observer, "name", None) or type(observer).__name__


@dataclasses.dataclass
class Hessian:
    """GPTQ's input statistics for one expert projection: ``xtx_CC = sum_r x_r x_rᵀ`` in fp32 over ``nsamples`` rows.

    GPTQ's ``H = 2 XᵀX / n`` is ``2 * xtx_CC / nsamples``.
    """

    xtx_CC: torch.Tensor
    nsamples: int


@dataclasses.dataclass
class ExpertStats:
    """What :class:`StatsObserver` saw for one expert projection.

    ``routed_tokens``: tokens the router sent to this expert (unmasked; under top-N in ``override`` mode);
    ``tokens_seen``: rows this projection was observed on (every unmasked token in ``all_experts`` mode);
    ``absmax_C``: per-channel max ``|x|`` over those rows, in fp32 (zeros if none).
    """

    routed_tokens: int
    tokens_seen: int
    absmax_C: torch.Tensor


class HessianObserver:
    """Accumulates ``XᵀX`` in fp32 and the row count per (layer, expert, projection): the GPTQ Hessian input.

    ``device``: where the ``[C, C]`` sums live (default: the rows' device). ``"cpu"`` keeps every expert's sums off
    the accelerator; the product of each call is still formed on the rows' device, one expert at a time.
    In ``all_experts`` mode every expert of a layer receives the same ``gate_up`` rows tensor: its ``XᵀX`` is formed
    once and added to each expert.
    """

    name = "hessian"

    def __init__(self, *, device: torch.device | str | None = None) -> None:
        self.device = torch.device(device) if device is not None else None
        self._xtx: dict[Key, torch.Tensor] = {}
        self._n: dict[Key, int] = {}
        self._last_rows: weakref.ref | None = None
        self._last_version = -1
        self._last_xtx: torch.Tensor | None = None

    def __call__(self, layer_name: str, expert_idx: int, projection: str, rows_RC: torch.Tensor) -> None:
        xtx_CC = self._product(rows_RC)
        key = (layer_name, expert_idx, projection)
        acc = self._xtx.get(key)
        if acc is None:
            C = rows_RC.shape[-1]
            with torch.inference_mode(False):  # a normal tensor: later batches may run outside inference mode
                acc = torch.zeros(C, C, dtype=torch.float32, device=self.device or rows_RC.device)
            self._xtx[key] = acc
            self._n[key] = 0
        acc += xtx_CC.to(acc.device)
        self._n[key] += rows_RC.shape[0]

    def _product(self, rows_RC: torch.Tensor) -> torch.Tensor:
        """``rows_RCᵀ rows_RC`` in fp32; the same tensor object, unmodified since, reuses the last product."""
        version = 0 if rows_RC.is_inference() else rows_RC._version  # inference tensors keep no version counter
        if self._last_xtx is not None and self._last_rows is not None and self._last_rows() is rows_RC \
                and self._last_version == version:
            return self._last_xtx
        r = rows_RC.detach().float()
        xtx_CC = r.T @ r
        self._last_xtx, self._last_rows, self._last_version = xtx_CC, weakref.ref(rows_RC), version
        return xtx_CC

    def results(self) -> dict[Key, Hessian]:
        """Every ``(layer, expert, projection)`` seen: its fp32 ``XᵀX [C, C]`` and row count."""
        return {key: Hessian(xtx_CC=xtx, nsamples=self._n[key]) for key, xtx in self._xtx.items()}


class StatsObserver:
    """Counts routed tokens and observed rows, and keeps the per-channel absmax, per (layer, expert, projection)."""

    name = "stats"

    def __init__(self) -> None:
        self._routed: dict[str, torch.Tensor] = {}
        self._seen: dict[Key, int] = {}
        self._absmax: dict[Key, torch.Tensor] = {}

    def observe_routing(self, layer_name: str, tokens_per_expert_E: torch.Tensor) -> None:
        """Adds a forward's ``[E]`` routed-token counts of ``layer_name`` (called by the calibration session)."""
        counts_E = tokens_per_expert_E.detach().to("cpu", torch.int64)
        prev = self._routed.get(layer_name)
        self._routed[layer_name] = counts_E if prev is None else prev + counts_E

    def __call__(self, layer_name: str, expert_idx: int, projection: str, rows_RC: torch.Tensor) -> None:
        key = (layer_name, expert_idx, projection)
        rows_RC = rows_RC.detach()
        self._seen[key] = self._seen.get(key, 0) + rows_RC.shape[0]
        amax_C = rows_RC.abs().amax(0).float() if rows_RC.shape[0] else rows_RC.new_zeros(rows_RC.shape[-1]).float()
        prev = self._absmax.get(key)
        self._absmax[key] = amax_C if prev is None else torch.maximum(prev, amax_C)

    def routed_tokens(self, layer_name: str, expert_idx: int) -> int:
        """Routed tokens of one expert so far; 0 for a layer without routing (a shared-experts MLP: see ``seen``)."""
        counts_E = self._routed.get(layer_name)
        return int(counts_E[expert_idx]) if counts_E is not None else 0

    def results(self) -> dict[Key, ExpertStats]:
        """Every ``(layer, expert, projection)`` seen: routed and seen token counts and the per-channel absmax."""
        return {key: ExpertStats(routed_tokens=self.routed_tokens(key[0], key[1]), tokens_seen=seen,
                                 absmax_C=self._absmax[key])
                for key, seen in self._seen.items()}


def merge_results(observers: list[Any]) -> dict[str, dict[int, dict[str, dict[str, Any]]]]:
    """``{layer_name: {expert_idx: {projection: {observer_name: value}}}}`` from every observer with ``results()``."""
    merged: dict[str, dict[int, dict[str, dict[str, Any]]]] = {}
    for obs in observers:
        if not callable(getattr(obs, "results", None)):
            continue
        name = observer_name(obs)
        for key, value in obs.results().items():
            if not (isinstance(key, tuple) and len(key) == 3 and all(isinstance(k, Hashable) for k in key)):
                raise TypeError(f"observer {name!r}: results() keys must be (layer_name, expert_idx, projection), "
                                f"got {key!r}")
            layer, expert, projection = key
            merged.setdefault(layer, {}).setdefault(expert, {}).setdefault(projection, {})[name] = value
    return {layer: dict(sorted(experts.items())) for layer, experts in merged.items()}
