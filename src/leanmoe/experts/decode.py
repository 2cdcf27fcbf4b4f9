"""The ``triton_decode`` backend: a forward-only Triton path for decode-sized calls (a few routed rows per expert).

Legend: T tokens, D model dim, I expert hidden dim, N gate/up rows (2I gated, I otherwise), E experts, K top-k,
R routed rows (T*K).

Inference only (``no_grad``, ``inference_mode`` or nothing requiring grad): it keeps nothing and has no backward,
so it refuses calls that require grad, and ``auto`` never takes it for training. Pipeline
(``leanmoe::triton_decode_fwd``, a custom op with a fake, so it traces under ``torch.compile``):
1. plan: stable sort of the routed rows by expert (masked tokens' rows last, out of the counts), in one kernel
   launch up to :data:`leanmoe.kernels.moe_decode.PLAN_MAX_ROWS` routed rows
   (:func:`~leanmoe.kernels.moe_decode.decode_plan`), else with :func:`leanmoe.experts.plan.plan_experts`;
2. :func:`leanmoe.kernels.moe_decode.decode_gate_up`: gather-fused gate/up GEMM, bias and activation, small row
   tiles and the reduction split over D when the output tiles alone would not fill the GPU;
3. :func:`leanmoe.kernels.moe_decode.decode_down_combine`: the down projection (bias, routing weight) into fp32
   per-slot partials, then a fixed-order sum over slots and splits (deterministic, no atomics).
No host sync and no data-dependent allocation: the path can be captured in a CUDA graph (tune outside capture).

Under ``auto``: on CUDA the measured choice (:mod:`leanmoe.experts.autoselect`) decides between it and the
training backends per shape bucket; without a measurement (``LEANMOE_AUTOSELECT=0``, during graph capture or
torch.compile tracing before any measurement) the priority order takes it for no-grad calls of at most
:data:`AUTO_MAX_TOKENS` tokens.
"""

# torch.library.custom_op infers each op's schema from the annotations: keep ``Optional[Tensor]``.
# ruff: noqa: UP045
from __future__ import annotations

from typing import Optional

import torch

from leanmoe.experts.eager import op_or_body
from leanmoe.experts.plan import ExpertPlan, plan_experts
from leanmoe.experts.registry import ExpertsBackend, ExpertsCall
from leanmoe.experts.triton import triton_call_reason
from leanmoe.experts.weights import ExpertWeights

Tensor = torch.Tensor

#: Tokens per call up to which the priority order (no measurement) takes this backend.
AUTO_MAX_TOKENS = 256
#: Routed rows past which the backend refuses a call: it is built for decode, and its fp32 per-slot partials
#: (``[S, R, D]``) grow with R.
MAX_ROWS = 16384


_CODES: dict[str, int] = {}


def _activation_codes() -> dict[str, int]:
    # Filled on first use: importing the kernels imports triton. (Not functools.cache: torch.compile traces the
    # support check, and warns on a cached function.)
    if not _CODES:
        from leanmoe.kernels.moe_common import ACTIVATION_CODES

        _CODES.update(ACTIVATION_CODES)
    return _CODES


def _triton_decode_fwd(
    x_TD: Tensor, topk_ids_TK: Tensor, topk_weights_TK: Tensor, gate_up_proj: Tensor, down_proj: Tensor,
    gate_up_bias: Optional[Tensor], down_bias: Optional[Tensor], token_mask_T: Optional[Tensor], activation: str,
    gated: bool, alpha: float, limit: float, gate_up_layout: str,
) -> Tensor:
    """``y_TD`` in x's dtype (see :func:`leanmoe.moe_experts`); forward only."""
    from leanmoe.kernels.moe_decode import PLAN_MAX_ROWS, decode_down_combine, decode_gate_up, decode_plan

    E = gate_up_proj.shape[0]
    if topk_ids_TK.numel() <= PLAN_MAX_ROWS:  # one launch instead of the plan's torch ops (host time at decode)
        plan = ExpertPlan(*decode_plan(topk_ids_TK, E, token_mask_T))
    else:
        plan = plan_experts(topk_ids_TK, E, token_mask_T)
    h_RI = decode_gate_up(x_TD, plan.sorted_tokens_R, plan.sorted_experts_R, plan.offsets_E, gate_up_proj,
                          gate_up_bias, act_code=_activation_codes()[activation], gated=gated,
                          interleaved=gate_up_layout == "interleaved", alpha=alpha, limit=limit)
    return decode_down_combine(h_RI, down_proj, down_bias, topk_weights_TK, plan.sorted_rows_R, plan.offsets_E,
                               token_mask_T)


triton_decode_fwd = torch.library.custom_op("leanmoe::triton_decode_fwd", mutates_args=())(_triton_decode_fwd)


@triton_decode_fwd.register_fake
def _(x_TD, topk_ids_TK, topk_weights_TK, gate_up_proj, down_proj, gate_up_bias, down_bias, token_mask_T,
      activation, gated, alpha, limit, gate_up_layout):
    return x_TD.new_empty(x_TD.shape[0], down_proj.shape[1])


def _grad_reason(call: ExpertsCall) -> str | None:
    if call.requires_grad:
        return "forward only (decode): the call requires grad; run it under torch.no_grad()/inference_mode or " \
               "pick a training backend"
    return None


class TritonDecodeBackend(ExpertsBackend):
    """Forward-only Triton kernels for decode-sized calls on CUDA GPUs of compute capability >= 8.0 (bfloat16,
    float16, float32); on CPU tensors only under the Triton interpreter (tests; ``auto`` never picks it there)."""

    name = "triton_decode"
    # Above triton (20): among the backends that run a no-grad decode-sized call, it is the one built for it.
    priority = 25
    requires = ("triton",)
    extra = "triton"

    def unsupported_reason(self, call: ExpertsCall) -> str | None:
        reason = _grad_reason(call)
        if reason is not None:
            return reason
        if call.activation.name not in _activation_codes():
            return f"activation {call.activation.name!r} has no kernel code yet"
        if call.num_tokens * call.top_k > MAX_ROWS:
            return f"{call.num_tokens * call.top_k} routed rows (T*K) > {MAX_ROWS}: the decode path is for few tokens"
        return triton_call_reason(call)

    def candidate_reason(self, call: ExpertsCall) -> str | None:
        """Why ``auto`` may not even measure this backend for ``call`` (None: it may)."""
        reason = self.unsupported_reason(call)
        if reason is None and call.device.type != "cuda":
            reason = "auto never picks the Triton interpreter (CPU tensors); name backend='triton_decode' to use it"
        return reason

    def auto_unsupported_reason(self, call: ExpertsCall) -> str | None:
        # The priority order (no measurement for this shape) takes it for decode-sized calls only.
        reason = self.candidate_reason(call)
        if reason is None and call.num_tokens > AUTO_MAX_TOKENS:
            reason = f"T={call.num_tokens} > {AUTO_MAX_TOKENS} and no measurement for this shape bucket"
        return reason

    def __call__(self, x_TD, topk_ids_TK, topk_weights_TK, weights: ExpertWeights, *, save_percent,
                 token_mask=None):
        if torch.is_grad_enabled() and (x_TD.requires_grad or topk_weights_TK.requires_grad
                                        or any(t.requires_grad for t in weights.tensors())):
            raise ValueError("backend 'triton_decode' is forward only: got inputs that require grad with grad mode "
                             "on; use torch.no_grad()/inference_mode, or a training backend")
        activation = weights.activation
        # Forward only: in eager, the op's body without the dispatcher (leanmoe.experts.eager).
        args = (x_TD, topk_ids_TK, topk_weights_TK, weights.gate_up_proj, weights.down_proj, weights.gate_up_bias,
                weights.down_bias, token_mask)
        fwd = op_or_body(triton_decode_fwd, _triton_decode_fwd, *args)
        return fwd(*args, activation.name, activation.gated, float(activation.alpha), float(activation.limit),
                   weights.gate_up_layout)
