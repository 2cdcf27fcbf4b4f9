"""Calibration mode: every expert sees the calibration tokens, while the model's output keeps the true routing.

Legend: T tokens, D model dim, I expert hidden dim, N gate/up rows (2I gated, I otherwise), E experts, K top-k,
B experts in one group (``expert_batch_size``), R rows one expert sees.

On entering ``with calibrate(model, ...) as session``:
1. find every experts module (any module with ``expert_weights()``), its router and its shared experts;
2. hook each experts module's forward (a post-hook that returns None: the layer's output is untouched), a pre-hook
   on each ``leanmoe.MoE`` (its ``token_mask``) and on the model (a 2-D ``attention_mask``, for Hugging Face), and
   pre-hooks on each shared MLP's ``gate_proj`` and ``down_proj``;
3. in ``override`` mode, make each router pick ``top_k`` experts.
On each experts-module call, under ``torch.no_grad()``:
4. count the routed, unmasked tokens per expert and pass the counts to observers with ``observe_routing``;
5. ``all_experts``: call every observer with ``(layer, expert, "gate_up", x_RD)`` for each expert, x_RD the
   unmasked tokens (one tensor for all experts); then per group of B experts form ``gate_up_BRN`` and
   ``h_BRI = activation(gate_up_BRN)`` from the module's weights and call ``(layer, expert, "down", h_RI)``; the
   group's activations are freed before the next group;
6. ``routed`` and ``override``: per expert, the unmasked tokens routed to it, ``"gate_up"`` then ``"down"``.
On exit, also after an exception: every hook is removed and every router restored, in reverse order.
"""

from __future__ import annotations

import dataclasses
import inspect
from contextlib import ExitStack
from typing import Any, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from leanmoe.activations import apply_activation
from leanmoe.calibration.observers import merge_results, observer_name
from leanmoe.calibration.targets import (
    ExpertsTarget,
    SharedTarget,
    check_dispatcher,
    find_targets,
    override_top_k,
)
from leanmoe.experts.plan import expert_counts, plan_experts
from leanmoe.layer import MoE

Mode = Literal["all_experts", "override", "routed"]
MODES = ("all_experts", "override", "routed")


@dataclasses.dataclass(frozen=True)
class RareExpert:
    layer_name: str
    expert_idx: int
    routed_tokens: int


@dataclasses.dataclass(frozen=True)
class CalibrationReport:
    """Experts that the router sent fewer than ``min_tokens`` tokens during the session.

    In ``all_experts`` mode their observers still saw every token: these are the experts the mode rescued.
    """

    mode: str
    min_tokens: int
    rare: list[RareExpert]
    total_experts: int

    def __str__(self) -> str:
        lines = [f"{len(self.rare)} of {self.total_experts} experts were routed fewer than {self.min_tokens} tokens "
                 f"(mode={self.mode})"]
        lines += [f"  {r.layer_name}[{r.expert_idx}]: {r.routed_tokens} routed tokens" for r in self.rare]
        return "\n".join(lines)


def calibrate(model: nn.Module, *, observers: list[Any], mode: Mode = "all_experts", top_k: int | None = None,
              expert_batch_size: int | None = None) -> CalibrationSession:
    """A context manager that feeds every experts module's projection inputs to ``observers``.

    - ``mode="all_experts"``: each expert's projections run on every (unmasked) token and the observers see those
      inputs; the model's output is exactly the normal routed output.
    - ``mode="override"`` with ``top_k=N``: the routers pick N experts for the duration (the output changes, as for a
      model with top-k N); observers see the routed tokens.
    - ``mode="routed"``: observers see only the tokens routed to each expert (what a plain hook would see).
    - ``expert_batch_size``: experts processed per group in ``all_experts`` mode (default: all of a layer at once);
      the working activations, ``B * T * (N + I)`` elements plus the activation's temporaries, scale with it.

    ``observers``: callables ``(layer_name, expert_idx, projection, rows_RC) -> None`` (see
    :mod:`leanmoe.calibration.observers`). Token masks: a ``leanmoe.MoE``'s ``token_mask``, else a 2-D
    ``attention_mask`` passed to ``model`` (True/1 = keep) when it has one entry per token of the layer's input;
    masked tokens are neither observed nor counted. Expert-parallel layers are not supported.
    """
    return CalibrationSession(model, observers=observers, mode=mode, top_k=top_k,
                              expert_batch_size=expert_batch_size)


class CalibrationSession:
    """Returned by :func:`calibrate`; enter it once. Its results stay readable after exit.

    - ``results``: ``{layer_name: {expert_idx: {projection: {observer_name: value}}}}``, ``layer_name`` being the
      experts module's (or shared MLP's) qualified name, ``projection`` ``"gate_up"`` or ``"down"``;
    - ``routed_tokens``: ``{layer_name: int64 [E]}``, routed unmasked tokens per expert (shared MLPs: ``[1]``, every
      unmasked token);
    - ``report(min_tokens)``: the experts routed fewer than ``min_tokens`` tokens;
    - ``peak_working_bytes``: the most bytes of activations (rows, ``gate_up``, ``h``) the session held at once,
      not counting the activation function's own temporaries (one more ``[B, T, I]`` for SwiGLU).
    """

    def __init__(self, model: nn.Module, *, observers: list[Any], mode: Mode = "all_experts",
                 top_k: int | None = None, expert_batch_size: int | None = None) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
        if mode == "override":
            if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
                raise ValueError(f"mode='override' needs top_k, an int >= 1, got top_k={top_k!r}")
        elif top_k is not None:
            raise ValueError(f"top_k is only used with mode='override', got top_k={top_k!r} with mode={mode!r}")
        if expert_batch_size is not None and (
                isinstance(expert_batch_size, bool) or not isinstance(expert_batch_size, int) or expert_batch_size < 1):
            raise ValueError(f"expert_batch_size must be None or an int >= 1, got {expert_batch_size!r}")
        observers = list(observers)
        if not observers:
            raise ValueError("observers must hold at least one observer")
        for obs in observers:
            if not callable(obs):
                raise TypeError(f"an observer must be callable (layer_name, expert_idx, projection, rows), "
                                f"got {type(obs).__name__}")
        names = [observer_name(o) for o in observers if callable(getattr(o, "results", None))]
        if len(set(names)) != len(names):
            raise ValueError(f"observers with results() need distinct names (their keys in results), got {names}")
        self.model, self.mode, self.top_k, self.expert_batch_size = model, mode, top_k, expert_batch_size
        self.observers = observers
        self.routed_tokens: dict[str, torch.Tensor] = {}
        self.peak_working_bytes = 0
        self._stack: ExitStack | None = None
        self._entered = False
        self._targets: list[ExpertsTarget] = []
        self._block_masks: dict[int, torch.Tensor | None] = {}
        self._root_mask_T: torch.Tensor | None = None

    # -- context ---------------------------------------------------------------------------------------------------

    def __enter__(self) -> CalibrationSession:
        if self._entered:
            raise RuntimeError("a CalibrationSession is entered once; call calibrate() again for another session")
        self._entered = True
        targets = find_targets(self.model)
        if not targets:
            raise ValueError(
                f"no experts module in {type(self.model).__name__}: calibration hooks modules with expert_weights() "
                f"(leanmoe.GroupedExperts; Hugging Face models after leanmoe.hf.patch(model))")
        for t in targets:
            check_dispatcher(t)
        self._targets = targets
        with ExitStack() as stack:
            stack.callback(self.model.register_forward_pre_hook(self._root_pre_hook, with_kwargs=True).remove)
            for t in targets:
                if isinstance(t.block, MoE):
                    hook = self._block_pre_hook(t.block)
                    stack.callback(t.block.register_forward_pre_hook(hook, with_kwargs=True).remove)
                hook = self._experts_hook(t)
                stack.callback(t.module.register_forward_hook(hook, with_kwargs=True).remove)
                for s in t.shared:
                    for linear, projection in ((s.module.gate_proj, "gate_up"), (s.module.down_proj, "down")):
                        hook = self._shared_pre_hook(t, s, projection)
                        stack.callback(linear.register_forward_pre_hook(hook).remove)
                if self.mode == "override":
                    assert self.top_k is not None  # checked in __init__: override mode needs top_k
                    override_top_k(t, self.top_k, stack)
            self._stack = stack.pop_all()
        return self

    def __exit__(self, *exc_info) -> None:
        stack, self._stack = self._stack, None
        self._block_masks.clear()
        self._root_mask_T = None
        if stack is not None:
            stack.close()

    # -- results ---------------------------------------------------------------------------------------------------

    @property
    def layer_names(self) -> list[str]:
        """Observed layers: each experts module, then its shared MLPs, in model order."""
        return [n for t in self._targets for n in [t.name] + [s.name for s in t.shared]]

    @property
    def results(self) -> dict[str, dict[int, dict[str, dict[str, Any]]]]:
        return merge_results(self.observers)

    def report(self, min_tokens: int = 1) -> CalibrationReport:
        """The experts (shared MLPs included) routed fewer than ``min_tokens`` unmasked tokens in this session."""
        rare, total = [], 0
        for layer in self.layer_names:
            counts_E = self.routed_tokens.get(layer)
            if counts_E is None:
                continue
            total += counts_E.numel()
            rare += [RareExpert(layer, e, int(c)) for e, c in enumerate(counts_E.tolist()) if c < min_tokens]
        return CalibrationReport(mode=self.mode, min_tokens=min_tokens, rare=rare, total_experts=total)

    # -- hooks -----------------------------------------------------------------------------------------------------

    def _root_pre_hook(self, module, args, kwargs):
        mask = kwargs.get("attention_mask")
        if mask is None and args:
            try:
                mask = inspect.signature(module.forward).bind_partial(*args).arguments.get("attention_mask")
            except TypeError:
                mask = None
        ok = isinstance(mask, torch.Tensor) and mask.dim() == 2
        self._root_mask_T = mask.reshape(-1).bool() if ok else None

    def _block_pre_hook(self, block: MoE):
        def hook(module, args, kwargs):
            mask = kwargs.get("token_mask", args[1] if len(args) > 1 else None)
            self._block_masks[id(block)] = mask.reshape(-1) if isinstance(mask, torch.Tensor) else None
        return hook

    def _mask_for(self, target: ExpertsTarget, T: int) -> torch.Tensor | None:
        mask_T = self._block_masks.get(id(target.block)) if target.block is not None else None
        if mask_T is None:
            mask_T = self._root_mask_T
        if mask_T is None or mask_T.numel() != T:
            return None
        return mask_T

    def _experts_hook(self, target: ExpertsTarget):
        forward_params = _positional_names(target.module)

        def hook(module, args, kwargs, output):
            x, ids = _first_two(args, kwargs, forward_params, target.name)
            with torch.no_grad():
                self._observe_experts(target, x.detach(), ids)
        return hook

    def _shared_pre_hook(self, target: ExpertsTarget, shared: SharedTarget, projection: str):
        def hook(module, args):
            rows_TC = args[0].detach()
            rows_TC = rows_TC.reshape(-1, rows_TC.shape[-1])
            with torch.no_grad():
                mask_T = self._mask_for(target, rows_TC.shape[0])
                if mask_T is not None:
                    rows_TC = rows_TC[mask_T]
                self._note_working(rows_TC.nbytes)
                if projection == "gate_up":
                    self._count(shared.name, torch.tensor([rows_TC.shape[0]], dtype=torch.int64))
                for obs in self.observers:
                    obs(shared.name, 0, projection, rows_TC)
        return hook

    # -- observation -----------------------------------------------------------------------------------------------

    def _count(self, layer: str, tokens_per_expert_E: torch.Tensor) -> None:
        for obs in self.observers:
            observe_routing = getattr(obs, "observe_routing", None)
            if callable(observe_routing):
                observe_routing(layer, tokens_per_expert_E)
        counts_E = tokens_per_expert_E.to("cpu", torch.int64)
        prev = self.routed_tokens.get(layer)
        self.routed_tokens[layer] = counts_E if prev is None else prev + counts_E

    def _note_working(self, nbytes: int) -> None:
        self.peak_working_bytes = max(self.peak_working_bytes, nbytes)

    def _observe_experts(self, target: ExpertsTarget, x: torch.Tensor, ids: torch.Tensor) -> None:
        w = target.module.expert_weights()
        E, D = w.gate_up_proj.shape[0], w.gate_up_proj.shape[2]
        x_TD = x.reshape(-1, D)
        T = x_TD.shape[0]
        ids_TK = ids.reshape(T, -1)
        mask_T = self._mask_for(target, T)

        # Routed slots; ids outside [0, E) (e.g. Hugging Face's expert-parallel sentinel E) and masked tokens drop out.
        # all_experts needs only the counts; routed and override also each expert's tokens (the plan's sort).
        plan = None if self.mode == "all_experts" else plan_experts(ids_TK, E, mask_T, drop_invalid_ids=True)
        counts_E = expert_counts(ids_TK, E, mask_T, drop_invalid_ids=True) if plan is None else plan.counts_E
        self._count(target.name, counts_E)

        B = self.expert_batch_size or E
        if plan is None:  # all_experts
            x_RD = x_TD if mask_T is None else x_TD[mask_T]
            for e in range(E):  # one rows tensor for every expert: an observer may reuse its work on it
                for obs in self.observers:
                    obs(target.name, e, "gate_up", x_RD)
            for e0 in range(0, E, B):
                e1 = min(e0 + B, E)
                gate_up_BRN = torch.matmul(x_RD.to(w.gate_up_proj.dtype), w.gate_up_proj[e0:e1].transpose(1, 2))
                if w.gate_up_bias is not None:
                    gate_up_BRN = gate_up_BRN + w.gate_up_bias[e0:e1, None, :]
                h_BRI = apply_activation(gate_up_BRN, w.activation, w.gate_up_layout)
                self._note_working(x_RD.nbytes + gate_up_BRN.nbytes + h_BRI.nbytes)
                for b, e in enumerate(range(e0, e1)):
                    for obs in self.observers:
                        obs(target.name, e, "down", h_BRI[b])
                del gate_up_BRN, h_BRI
            return

        # routed / override: each expert's routed tokens, in token order (the plan's sort is stable). One host copy
        # of the offsets: calibration is no hot path.
        bounds = [0] + plan.offsets_E.tolist()
        for e in range(E):
            x_RD = x_TD[plan.sorted_tokens_R[bounds[e]:bounds[e + 1]]]
            bias = w.gate_up_bias[e] if w.gate_up_bias is not None else None
            gate_up_RN = F.linear(x_RD.to(w.gate_up_proj.dtype), w.gate_up_proj[e], bias)
            h_RI = apply_activation(gate_up_RN, w.activation, w.gate_up_layout)
            self._note_working(x_RD.nbytes + gate_up_RN.nbytes + h_RI.nbytes)
            for obs in self.observers:
                obs(target.name, e, "gate_up", x_RD)
                obs(target.name, e, "down", h_RI)


def _positional_names(module: nn.Module) -> list[str]:
    try:
        params = inspect.signature(module.forward).parameters.values()
    except (TypeError, ValueError):
        return []
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return [p.name for p in params if p.kind in kinds]


def _first_two(args: tuple, kwargs: dict, names: list[str], layer: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The experts module's first two inputs, ``x_TD`` and ``topk_ids_TK``, passed by position or by name."""
    values = list(args[:2]) + [kwargs[n] for n in names[len(args):2] if n in kwargs]
    if len(values) < 2 or not all(isinstance(v, torch.Tensor) for v in values):
        raise TypeError(f"{layer!r}: cannot read (x_TD, topk_ids_TK) from the experts call "
                        f"(args: {len(args)}, kwargs: {sorted(kwargs)}, forward parameters: {names[:3]})")
    return values[0], values[1]
