"""``moe_experts``: the validated entry point to every expert backend.

Legend: T tokens, D model dim, I expert hidden dim, N gate/up rows (2I gated, I otherwise), E experts, K top-k.
"""

from __future__ import annotations

import torch

from leanmoe.activations import Activation, check_layout, resolve_activation
from leanmoe.config import check_save_percent
from leanmoe.experts.registry import ExpertsCall, select_backend


def _shape(t: torch.Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def _require_tensor(name: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def check_token_mask(token_mask: object, shape: tuple[int, ...], device: torch.device,
                     name: str = "token_mask") -> torch.Tensor:
    """Checks that ``token_mask`` is a bool tensor of exactly ``shape`` on ``device`` (no broadcasting); returns it.

    Raises ``TypeError`` (not a tensor, not bool) or ``ValueError`` (shape, device); never reads tensor data.
    """
    expected = "[" + ", ".join(str(s) for s in shape) + "]"
    if not isinstance(token_mask, torch.Tensor):
        raise TypeError(f"{name} must be a bool tensor of shape {expected} or None, got {type(token_mask).__name__}")
    if token_mask.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool tensor (True = keep), got dtype {token_mask.dtype}")
    if tuple(token_mask.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {expected} (one flag per token), got {_shape(token_mask)}")
    if token_mask.device != device:
        raise ValueError(f"{name} is on {token_mask.device} but x is on {device}")
    return token_mask


def describe_call(x_TD, topk_ids_TK, topk_weights_TK, gate_up_proj, down_proj, gate_up_bias=None, down_bias=None,
                  *, activation: str | Activation = "swiglu", gate_up_layout: str = "concatenated",
                  save_percent: float = 0, token_mask: torch.Tensor | None = None) -> ExpertsCall:
    """Validates a call's arguments (those of :func:`moe_experts`) and describes it for backend selection.

    Raises ``TypeError``/``ValueError`` naming the bad and the expected value; never reads tensor data.
    """
    activation = resolve_activation(activation)
    check_layout(gate_up_layout)
    check_save_percent(save_percent)
    for name, t in (("x", x_TD), ("topk_ids", topk_ids_TK), ("topk_weights", topk_weights_TK),
                    ("gate_up_proj", gate_up_proj), ("down_proj", down_proj)):
        _require_tensor(name, t)
    if not x_TD.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got dtype {x_TD.dtype}")
    if x_TD.dim() != 2:
        raise ValueError(f"x must be [T, D], got shape {_shape(x_TD)}")
    if topk_ids_TK.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"topk_ids must be int32 or int64, got dtype {topk_ids_TK.dtype}")
    if not topk_weights_TK.is_floating_point():
        raise TypeError(f"topk_weights must be a floating-point tensor, got dtype {topk_weights_TK.dtype}")
    if topk_ids_TK.dim() != 2 or topk_ids_TK.shape[0] != x_TD.shape[0]:
        raise ValueError(f"topk_ids must be [T, K] with T={x_TD.shape[0]}, got shape {_shape(topk_ids_TK)}")
    if topk_weights_TK.shape != topk_ids_TK.shape:
        raise ValueError(f"topk_weights must have the shape of topk_ids {_shape(topk_ids_TK)}, "
                         f"got {_shape(topk_weights_TK)}")
    if gate_up_proj.dim() != 3:
        raise ValueError(f"gate_up_proj must be [E, 2I, D] (gated) or [E, I, D], got shape {_shape(gate_up_proj)}")
    if down_proj.dim() != 3:
        raise ValueError(f"down_proj must be [E, D, I], got shape {_shape(down_proj)}")
    E, N, D = gate_up_proj.shape
    if D != x_TD.shape[1]:
        raise ValueError(f"gate_up_proj {_shape(gate_up_proj)} expects D={D}, but x is {_shape(x_TD)}")
    I = down_proj.shape[2]
    expected_N = 2 * I if activation.gated else I
    if down_proj.shape[:2] != (E, D) or N != expected_N:
        raise ValueError(
            f"for activation {activation.name!r} expected gate_up_proj [E, {'2I' if activation.gated else 'I'}, D] "
            f"= [{E}, {expected_N}, {D}] and down_proj [E, D, I] = [{E}, {D}, {I}], "
            f"got gate_up_proj {_shape(gate_up_proj)} and down_proj {_shape(down_proj)}")
    K = topk_ids_TK.shape[1]
    if not 1 <= K <= E:
        raise ValueError(f"top-k must be in [1, E={E}], got K={K}")
    for name, bias, expected in (("gate_up_bias", gate_up_bias, (E, N)), ("down_bias", down_bias, (E, D))):
        if bias is None:
            continue
        _require_tensor(name, bias)
        if tuple(bias.shape) != expected:
            raise ValueError(f"{name} must be {list(expected)}, got {_shape(bias)}")
    params = [("gate_up_proj", gate_up_proj), ("down_proj", down_proj), ("gate_up_bias", gate_up_bias),
              ("down_bias", down_bias)]
    for name, t in params:
        if t is not None and t.dtype != x_TD.dtype:
            raise TypeError(f"{name} dtype {t.dtype} does not match x dtype {x_TD.dtype}")
    for name, t in params + [("topk_ids", topk_ids_TK), ("topk_weights", topk_weights_TK)]:
        if t is not None and t.device != x_TD.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x_TD.device}")
    if token_mask is not None:
        check_token_mask(token_mask, (x_TD.shape[0],), x_TD.device)
    requires_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x_TD, topk_weights_TK, gate_up_proj, down_proj, gate_up_bias,
                                                    down_bias))
    return ExpertsCall(device=x_TD.device, dtype=x_TD.dtype, num_tokens=x_TD.shape[0], dim=D, hidden_dim=I,
                       num_experts=E, top_k=K, activation=activation, gate_up_layout=gate_up_layout,
                       has_gate_up_bias=gate_up_bias is not None, has_down_bias=down_bias is not None,
                       save_percent=save_percent, requires_grad=requires_grad, has_token_mask=token_mask is not None)


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
            backends in ``leanmoe.lora.compute.LORA_BACKENDS`` take it (another named backend raises).

    Every tensor may be on the meta device: the output is then a meta ``[T, D]`` tensor and no data is read.

    Returns:
        ``[T, D]`` in x's dtype.

    Raises:
        TypeError, ValueError: for any argument outside what is listed above, naming the argument, the bad value
            and the expected one; ``ValueError`` when the named backend cannot run the call (with its reason).
    """
    call = describe_call(x_TD, topk_ids_TK, topk_weights_TK, gate_up_proj, down_proj, gate_up_bias, down_bias,
                         activation=activation, gate_up_layout=gate_up_layout, save_percent=save_percent,
                         token_mask=token_mask)
    if check_ids or (check_ids is None and x_TD.device.type == "cpu" and not torch.compiler.is_compiling()):
        check_expert_ids(topk_ids_TK, call.num_experts)
    if lora is not None:
        from leanmoe.lora.compute import lora_moe_experts  # here: leanmoe.lora imports this module

        return lora_moe_experts(call, backend, x_TD, topk_ids_TK, topk_weights_TK, gate_up_proj, down_proj,
                                gate_up_bias, down_bias, lora=lora, token_mask=token_mask)
    impl, _ = select_backend(backend, call)
    # Passed only when given, so a backend registered before masks existed still runs every unmasked call.
    mask_kw = {} if token_mask is None else {"token_mask": token_mask}
    return impl(x_TD, topk_ids_TK, topk_weights_TK, gate_up_proj, down_proj, gate_up_bias, down_bias,
                activation=call.activation, gate_up_layout=gate_up_layout, save_percent=save_percent, **mask_kw)
