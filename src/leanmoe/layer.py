"""The MoE layer: router -> dispatcher.dispatch -> experts -> dispatcher.combine (+ shared experts).

Legend: T tokens, D model dim, E experts, K top-k.

1. flatten ``x [..., D]`` to ``x_TD`` (and the optional token mask to ``mask_T``);
2. the router picks ``topk_ids_TK`` and fp32 ``topk_weights_TK``, and computes the aux losses and token counts;
3. the dispatcher hands the routed tokens to the experts (locally: unchanged; expert-parallel: over all-to-all);
4. the experts compute ``sum_k w_tk * expert_k(x_t)`` with the chosen backend; the dispatcher combines;
5. shared experts, if any, add their dense output; masked tokens give zero.
After each forward, ``aux_loss`` and ``tokens_per_expert`` hold that call's values as device tensors (no sync).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from leanmoe.config import MoEConfig
from leanmoe.experts.module import GroupedExperts, SharedExperts
from leanmoe.experts.weights import check_token_mask
from leanmoe.parallel.dispatcher import LocalDispatcher
from leanmoe.routers.topk import TopKRouter


class MoE(nn.Module):
    """A Mixture-of-Experts feed-forward layer. ``layer(x)`` with ``x [..., D]`` returns ``y`` of the same shape.

    Submodules: ``router`` (:class:`TopKRouter`), ``experts`` (:class:`GroupedExperts`), ``shared_experts``
    (:class:`SharedExperts` or None). ``dispatcher`` is a plain attribute (:class:`LocalDispatcher` until
    :func:`leanmoe.parallel.expert_parallel` replaces it).

    ``config`` is a :class:`leanmoe.MoEConfig` (every field validated there, and the named backend checked against
    ``device`` at construction): ``config.router`` builds the router, ``config.experts`` the experts,
    ``config.shared_experts`` (if not None) the shared experts, all of width ``config.dim``. ``device``/``dtype`` as
    for any module, ``device="meta"`` included (then ``to_empty(device=...)`` and :meth:`reset_parameters`).
    """

    def __init__(self, config: MoEConfig, *, device=None, dtype=None) -> None:
        super().__init__()
        if not isinstance(config, MoEConfig):
            raise TypeError(f"config must be a leanmoe.MoEConfig, got {type(config).__name__}")
        self.config = config
        # Built in this order, so a seed gives the same parameters whichever form built the config.
        self.router = TopKRouter(config.router, dim=config.dim, device=device, dtype=dtype)
        self.experts = GroupedExperts.from_config(config.experts, dim=config.dim, device=device, dtype=dtype)
        self.shared_experts = None
        shared = config.shared_experts
        if shared is not None:
            self.shared_experts = SharedExperts(
                dim=config.dim, hidden_dim=shared.hidden_dim or shared.num_experts * config.experts.hidden_dim,
                gated_output=shared.gated_output, device=device, dtype=dtype)
        self.dispatcher = LocalDispatcher()
        self.aux_loss: torch.Tensor | None = None
        self.tokens_per_expert: torch.Tensor | None = None

    def reset_parameters(self) -> None:
        """Initialises every parameter and buffer as construction does (the same random stream, in the same
        order): after ``MoE(config, device="meta").to_empty(device=...)``, this gives a layer that runs and trains."""
        self.router.reset_parameters()
        self.experts.reset_parameters()
        if self.shared_experts is not None:
            self.shared_experts.reset_parameters()

    def forward(self, x: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``x [..., D]`` (floating point, the parameters' dtype) -> ``y`` of the same shape and dtype.

        ``token_mask``: optional bool tensor of exactly ``x.shape[:-1]`` on x's device (True = keep; never
        broadcast). A masked token takes no routed row in the experts (no compute) and is left out of the router's
        counts and losses; its output row is exactly 0 and its gradients are exactly 0, even when its x row holds
        NaN or inf (padding).
        """
        D = self.config.dim
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}")
        if x.dim() < 1 or x.shape[-1] != D:
            raise ValueError(f"x must be [..., {D}], got shape {list(x.shape)}")
        x_TD = x.reshape(-1, D)
        mask_T = None
        if token_mask is not None:
            check_token_mask(token_mask, tuple(x.shape[:-1]), x.device)
            mask_T = token_mask.reshape(-1)

        routing = self.router(x_TD, mask_T)
        self.aux_loss, self.tokens_per_expert = routing.aux_loss, routing.tokens_per_expert_E
        x_d, ids_d, weights_d, meta = self.dispatcher.dispatch(x_TD, routing.topk_ids_TK, routing.topk_weights_TK,
                                                               token_mask_T=mask_T)
        y_d = self.experts(x_d, ids_d, weights_d, token_mask=meta.token_mask_T, check_ids=False)
        y_TD = self.dispatcher.combine(y_d, meta)

        if self.shared_experts is not None:
            if mask_T is None:
                y_TD = y_TD + self.shared_experts(x_TD)
            else:
                # Zeroing the masked rows of x (not of the output: 0 * NaN is NaN) keeps a NaN there out of the
                # output and out of every gradient; the shared MLP has no biases, so a zero row gives exactly 0.
                y_TD = y_TD + self.shared_experts(torch.where(mask_T[:, None], x_TD, 0.0))
        return y_TD.view(x.shape)
