"""``moe_experts``: the validated entry point to every expert backend.

Legend: T tokens, D model dim, I expert hidden dim, N gate/up rows (2I gated, I otherwise), E experts, K top-k.
"""

from __future__ import annotations

import torch

from leanmoe.activations import Activation, resolve_activation
from leanmoe.config import check_save_percent
from leanmoe.experts.registry import ExpertsCall, describe_weights, select_backend
from leanmoe.experts.weights import ExpertWeights, check_token_mask, require_tensor, shape_str

# The names before weights.py held them; kept for importers.
_shape, _require_tensor = shape_str, require_tensor


def describe_call(x_TD, topk_ids_TK, topk_weights_TK, weights, *legacy_args, save_percent: float = 0,
                  token_mask: torch.Tensor | None = None, **legacy_kwargs) -> ExpertsCall:
    """Validates a call's arguments and describes it for backend selection.

    ``describe_call(x_TD, topk_ids_TK, topk_weights_TK, weights: ExpertWeights, *, save_percent=0,
    token_mask=None)``; the form of :func:`moe_experts` works too: ``describe_call(x_TD, topk_ids_TK,
    topk_weights_TK, gate_up_proj, down_proj, gate_up_bias=None, down_bias=None, *, activation="swiglu",
    gate_up_layout="concatenated", save_percent=0, token_mask=None)``.

    Checks the inputs against the weights (shapes, devices) and derives the rest from the weights; dtype rules are
    the backends' (:meth:`leanmoe.ExpertsBackend.unsupported_reason`). Raises ``TypeError``/``ValueError`` naming
    the bad and the expected value; never reads tensor data.
    """
    if not isinstance(weights, ExpertWeights):
        weights = _legacy_weights(weights, *legacy_args, **legacy_kwargs)
    elif legacy_args or legacy_kwargs:
        raise TypeError(f"describe_call with an ExpertWeights takes only save_percent and token_mask as keywords, "
                        f"got {len(legacy_args)} more positional arguments and {sorted(legacy_kwargs)}")
    check_save_percent(save_percent)
    for name, t in (("x", x_TD), ("topk_ids", topk_ids_TK), ("topk_weights", topk_weights_TK)):
        require_tensor(name, t)
    if not x_TD.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got dtype {x_TD.dtype}")
    if x_TD.dim() != 2:
        raise ValueError(f"x must be [T, D], got shape {shape_str(x_TD)}")
    if topk_ids_TK.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"topk_ids must be int32 or int64, got dtype {topk_ids_TK.dtype}")
    if not topk_weights_TK.is_floating_point():
        raise TypeError(f"topk_weights must be a floating-point tensor, got dtype {topk_weights_TK.dtype}")
    if topk_ids_TK.dim() != 2 or topk_ids_TK.shape[0] != x_TD.shape[0]:
        raise ValueError(f"topk_ids must be [T, K] with T={x_TD.shape[0]}, got shape {shape_str(topk_ids_TK)}")
    if topk_weights_TK.shape != topk_ids_TK.shape:
        raise ValueError(f"topk_weights must have the shape of topk_ids {shape_str(topk_ids_TK)}, "
                         f"got {shape_str(topk_weights_TK)}")
    E, D = weights.num_experts, weights.dim
    if D != x_TD.shape[1]:
        raise ValueError(f"gate_up_proj {shape_str(weights.gate_up_proj)} expects D={D}, but x is {shape_str(x_TD)}")
    K = topk_ids_TK.shape[1]
    if not 1 <= K <= E:
        raise ValueError(f"top-k must be in [1, E={E}], got K={K}")
    # The weights share gate_up_proj's device (ExpertWeights checks): a mismatch names the first tensor off x's.
    for name, t in (("gate_up_proj", weights.gate_up_proj), ("topk_ids", topk_ids_TK),
                    ("topk_weights", topk_weights_TK)):
        if t.device != x_TD.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x_TD.device}")
    lora = weights.active_lora
    if lora is not None:
        for name, p in lora.named_parameters(recurse=False):
            if p.device != x_TD.device:
                raise ValueError(f"lora.{name} is on {p.device} but x is on {x_TD.device}")
    if token_mask is not None:
        check_token_mask(token_mask, (x_TD.shape[0],), x_TD.device)
    requires_grad = weights.requires_grad() or (torch.is_grad_enabled() and (
        x_TD.requires_grad or topk_weights_TK.requires_grad))
    return describe_weights(weights, num_tokens=x_TD.shape[0], top_k=K, save_percent=save_percent,
                            requires_grad=requires_grad, dtype=x_TD.dtype, has_token_mask=token_mask is not None)


def _legacy_weights(gate_up_proj, down_proj, gate_up_bias=None, down_bias=None, *,
                    activation: str | Activation = "swiglu", gate_up_layout: str = "concatenated") -> ExpertWeights:
    return ExpertWeights(gate_up_proj=gate_up_proj, down_proj=down_proj, gate_up_bias=gate_up_bias,
                         down_bias=down_bias, activation=resolve_activation(activation), gate_up_layout=gate_up_layout)


def check_expert_ids(topk_ids_TK: torch.Tensor, num_experts: int) -> None:
    """Raises ``ValueError`` if any id is outside ``[0, num_experts)``. Reads the ids: a host sync on GPUs; skipped
    for meta tensors, which hold no values."""
    if topk_ids_TK.numel() == 0 or topk_ids_TK.is_meta:
        return
    lo, hi = int(topk_ids_TK.min()), int(topk_ids_TK.max())
    if lo < 0 or hi >= num_experts:
        raise ValueError(f"topk_ids must lie in [0, {num_experts}), got values in [{lo}, {hi}]")


def moe_experts(x_TD: torch.Tensor, topk_ids_TK: torch.Tensor, topk_weights_TK: torch.Tensor,
                gate_up_proj: torch.Tensor, down_proj: torch.Tensor, gate_up_bias: torch.Tensor | None = None,
                down_bias: torch.Tensor | None = None, *, activation: str | Activation = "swiglu",
                gate_up_layout: str = "concatenated", backend: str = "auto", save_percent: float = 0,
                check_ids: bool | None = None, token_mask: torch.Tensor | None = None,
                lora=None) -> torch.Tensor:
    """Routed expert compute: ``y_t = sum_k w_tk * (down_proj[e] act(gate_up_proj[e] x_t + b1[e]) + b2[e])``.

    Args:
        x_TD: ``[T, D]`` tokens, any float dtype the backend supports; need not be contiguous.
        topk_ids_TK: ``[T, K]`` int32/int64 expert ids in ``[0, E)``.
        topk_weights_TK: ``[T, K]`` routing weights (any float dtype; the gradient comes back in that dtype).
        gate_up_proj: ``[E, 2I, D]`` for gated activations (layout per ``gate_up_layout``), ``[E, I, D]`` otherwise.
        down_proj: ``[E, D, I]``.
        gate_up_bias, down_bias: optional ``[E, 2I]`` (or ``[E, I]``) and ``[E, D]``, added after each GEMM.
        activation: a name (``swiglu``, ``geglu``, ``clamped_swiglu``, ``relu2``, ``gelu``, ``silu``) or an
            :class:`leanmoe.Activation` carrying parameters.
        gate_up_layout: ``"concatenated"`` (gate rows first) or ``"interleaved"`` (gate even rows, gpt-oss).
        backend: a registered backend name or ``"auto"`` (see :func:`leanmoe.explain_backend`).
        save_percent: in ``[0, 100]``; how much of the intermediate state the backend keeps for backward.
        check_ids: read the ids to check their range. ``None`` checks on the CPU only, where it costs no sync;
            ``True`` also checks on GPUs (a host sync); ``False`` never checks (ids from a router are valid). The
            ids of masked tokens are checked too. Meta tensors are never checked (they hold no values).
        token_mask: optional ``[T]`` bool on x's device, True = keep. A masked token takes no routed row in any
            backend (no GEMM work): its output row is exactly 0, even when its x row holds NaN or inf, and its
            gradients (its dx row, its routing-weight gradients) are exactly 0; the expert weights get no gradient
            from it. A mask of any other shape, dtype or device raises (it is never broadcast).
        lora: optional :class:`leanmoe.ExpertLoRA` adapting the experts (see :mod:`leanmoe.lora`); only the
            backends that take adapters (``takes_lora``: ``leanmoe.lora.LORA_BACKENDS``) run it, ``auto`` picks
            among them, and another named backend raises. A merged adapter runs on any backend (it is in the
            weights already).

    Every tensor may be on the meta device: the output is then a meta ``[T, D]`` tensor and no data is read.

    Returns:
        ``[T, D]`` in x's dtype.

    Raises:
        TypeError, ValueError: for any argument outside what is listed above, naming the argument, the bad value
            and the expected one; ``ValueError`` when the named backend cannot run the call (with its reason).
    """
    weights = ExpertWeights(gate_up_proj=gate_up_proj, down_proj=down_proj, gate_up_bias=gate_up_bias,
                            down_bias=down_bias, activation=resolve_activation(activation),
                            gate_up_layout=gate_up_layout, lora=lora)
    return run_experts(x_TD, topk_ids_TK, topk_weights_TK, weights, backend=backend, save_percent=save_percent,
                       check_ids=check_ids, token_mask=token_mask)


def run_experts(x_TD: torch.Tensor, topk_ids_TK: torch.Tensor, topk_weights_TK: torch.Tensor,
                weights: ExpertWeights, *, backend: str = "auto", save_percent: float = 0,
                check_ids: bool | None = None, token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`moe_experts` on an :class:`ExpertWeights` (its ``lora`` included): ``y_TD [T, D]`` in x's dtype.
    The same checks, selection and errors."""
    call = describe_call(x_TD, topk_ids_TK, topk_weights_TK, weights, save_percent=save_percent,
                         token_mask=token_mask)
    if check_ids or (check_ids is None and x_TD.device.type == "cpu" and not torch.compiler.is_compiling()):
        check_expert_ids(topk_ids_TK, call.num_experts)
    impl, _ = select_backend(backend, call)
    # Passed only when given, so a backend registered before masks existed still runs every unmasked call.
    mask_kw = {} if token_mask is None else {"token_mask": token_mask}
    return impl(x_TD, topk_ids_TK, topk_weights_TK, weights, save_percent=save_percent, **mask_kw)
