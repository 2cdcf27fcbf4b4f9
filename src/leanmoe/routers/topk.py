"""Top-k routing in fp32: softmax or sigmoid scores, node-limited selection, balancing bias, aux and z losses.

Legend: T tokens, D model dim, E experts, K top-k, G expert groups.

1. ``logits_TE = x_TD @ weight_ED.T (+ bias)`` in fp32;
2. ``scores_TE`` = softmax or sigmoid of the logits;
3. selection scores = scores + ``expert_bias`` (aux-loss-free balancing: used to choose, never to weigh);
4. grouped (node-limited) top-k: score each of G groups by the sum of its top-2 selection scores, keep the best
   ``topk_group`` groups, mask the rest;
5. top-K by a stable descending sort, so ties go to the lower expert index;
6. weights = the chosen *unbiased* scores, renormalised (``norm_topk_prob``) and scaled by ``route_scale``;
7. a token mask zeroes the masked rows of x before step 1 (so NaN/inf padding reaches nothing), zeroes their
   weights and leaves them out of the counts, the balancing load and the losses.
No step reads tensor values on the host.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from leanmoe.config import MoEConfig, RouterConfig, split_config
from leanmoe.experts.module import check_param_dtype
from leanmoe.experts.plan import expert_counts
from leanmoe.experts.weights import check_token_mask


@dataclasses.dataclass(frozen=True)
class RouterOutput:
    topk_ids_TK: torch.Tensor  # int64
    topk_weights_TK: torch.Tensor  # fp32
    logits_TE: torch.Tensor  # fp32
    tokens_per_expert_E: torch.Tensor  # int64, masked tokens excluded
    aux_loss: torch.Tensor  # fp32 scalar: aux_loss_coef * Switch loss + z_loss_coef * z-loss


def stable_topk(scores_TE: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest scores per row; equal scores go to the lower index (deterministic)."""
    return torch.sort(scores_TE, dim=-1, descending=True, stable=True).indices[:, :k]


class TopKRouter(nn.Module):
    """The router of :class:`leanmoe.MoE`. Parameters: ``weight [E, D]`` and, with ``router_bias``, ``bias [E]``.

    Buffers: ``expert_bias [E]`` (fp32, aux-loss-free balancing, with ``balance_bias``) and ``expert_load [E]``, the
    routed-token counts accumulated by training forwards since the last :meth:`update_balance_bias`.

    ``TopKRouter(RouterConfig(num_experts=E, top_k=K, ...), dim=D)`` (no expert sizes needed), or
    ``TopKRouter(moe_config)`` with a :class:`leanmoe.MoEConfig` (its ``router`` and ``dim``). ``config`` holds the
    :class:`leanmoe.RouterConfig` (validated there), ``dim`` the model dim D; ``dtype`` None or a floating dtype (the
    scoring is fp32 whatever it is). ``device="meta"``, then ``to_empty`` and :meth:`reset_parameters`, gives the
    state construction gives.
    """

    def __init__(self, config: RouterConfig | MoEConfig, *, dim: int | None = None, device=None, dtype=None) -> None:
        super().__init__()
        router_config, D = split_config(config, dim, RouterConfig)
        check_param_dtype(dtype)
        self.config, self.dim = router_config, D
        E = router_config.num_experts
        self.weight = nn.Parameter(torch.empty(E, D, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(E, device=device, dtype=dtype)) if router_config.bias else None
        if router_config.balance_bias:
            self.register_buffer("expert_bias", torch.zeros(E, device=device, dtype=torch.float32))
            self.register_buffer("expert_load", torch.zeros(E, device=device, dtype=torch.float32), persistent=False)
        else:
            self.expert_bias = None
            self.expert_load = None
        #: Process group whose load counts are summed before a balancing update (default: the whole world).
        self.balance_group: dist.ProcessGroup | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """What construction does: ``weight ~ N(0, 1/D)``, zero ``bias``, zero balancing bias and load."""
        nn.init.normal_(self.weight, std=self.dim ** -0.5)
        if self.bias is not None:
            nn.init.zeros_(self.bias)
        if self.expert_bias is not None:
            with torch.no_grad():
                self.expert_bias.zero_()
                self.expert_load.zero_()

    def forward(self, x_TD: torch.Tensor, token_mask_T: torch.Tensor | None = None) -> RouterOutput:
        """``x_TD [T, D]`` (any float dtype; scored in fp32), optional ``token_mask_T [T]`` bool on x's device
        (True = keep).

        A masked token's row of x is replaced by zeros before scoring, so a NaN or inf there (padding) reaches no
        output, loss or gradient; its weights are exactly 0, and it is left out of ``tokens_per_expert_E``, the
        balancing load and the losses. Its ids are still valid expert ids.
        """
        cfg = self.config
        if not isinstance(x_TD, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x_TD).__name__}")
        if not x_TD.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got dtype {x_TD.dtype}")
        if x_TD.dim() != 2 or x_TD.shape[1] != self.dim:
            raise ValueError(f"x must be [T, {self.dim}] (the router's dim), got shape {list(x_TD.shape)}")
        T, E, K = x_TD.shape[0], cfg.num_experts, cfg.top_k
        x32_TD = x_TD.float()
        if token_mask_T is not None:
            check_token_mask(token_mask_T, (T,), x_TD.device, name="token_mask")
            x32_TD = torch.where(token_mask_T[:, None], x32_TD, 0.0)
        bias = self.bias.float() if self.bias is not None else None
        logits_TE = F.linear(x32_TD, self.weight.float(), bias)
        scores_TE = logits_TE.softmax(-1) if cfg.score_func == "softmax" else logits_TE.sigmoid()

        select_TE = scores_TE.detach()
        if self.expert_bias is not None:
            select_TE = select_TE + self.expert_bias
        if cfg.n_group > 1:
            select_TE = self._limit_groups(select_TE)
        topk_ids_TK = stable_topk(select_TE, K)

        weights_TK = scores_TE.gather(1, topk_ids_TK)
        if cfg.norm_topk_prob:
            weights_TK = weights_TK / (weights_TK.sum(-1, keepdim=True) + 1e-20)
        weights_TK = weights_TK * cfg.route_scale
        if token_mask_T is not None:
            weights_TK = torch.where(token_mask_T[:, None], weights_TK, 0.0)

        # The routing plan's count (masked tokens left out): fixed shapes, no sort, no host sync.
        tokens_per_expert_E = expert_counts(topk_ids_TK, E, token_mask_T)
        if self.expert_load is not None and self.training:
            self.expert_load += tokens_per_expert_E.float()

        aux_loss = logits_TE.new_zeros(())
        if cfg.aux_loss_coef or cfg.z_loss_coef:
            aux_loss = self._losses(logits_TE, scores_TE, tokens_per_expert_E, token_mask_T, T)
        return RouterOutput(topk_ids_TK, weights_TK, logits_TE, tokens_per_expert_E, aux_loss)

    def _limit_groups(self, select_TE: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        T, E, G = select_TE.shape[0], cfg.num_experts, cfg.n_group
        select_TGe = select_TE.view(T, G, E // G)
        group_scores_TG = select_TGe.topk(min(2, E // G), dim=-1).values.sum(-1)
        kept_TG = torch.zeros(T, G, dtype=torch.bool, device=select_TE.device).scatter_(
            1, stable_topk(group_scores_TG, cfg.topk_group), True)
        return select_TGe.masked_fill(~kept_TG[:, :, None], float("-inf")).view(T, E)

    def _losses(self, logits_TE, scores_TE, tokens_per_expert_E, token_mask_T, T) -> torch.Tensor:
        cfg = self.config
        if token_mask_T is None:
            valid_T1 = logits_TE.new_ones(T, 1)
        else:
            valid_T1 = token_mask_T[:, None].to(logits_TE.dtype)
        n_valid = valid_T1.sum().clamp_min(1)
        loss = logits_TE.new_zeros(())
        if cfg.aux_loss_coef:
            # Switch: E * sum_e f_e * P_e, f_e the fraction of routed slots on e, P_e the mean router probability.
            probs_TE = scores_TE if cfg.score_func == "softmax" else scores_TE / scores_TE.sum(-1, keepdim=True)
            f_E = tokens_per_expert_E.float() / (n_valid * cfg.top_k)
            p_E = (probs_TE * valid_T1).sum(0) / n_valid
            loss = loss + cfg.aux_loss_coef * cfg.num_experts * (f_E * p_E).sum()
        if cfg.z_loss_coef:
            z_T1 = torch.logsumexp(logits_TE, dim=-1, keepdim=True).square()
            loss = loss + cfg.z_loss_coef * (z_T1 * valid_T1).sum() / n_valid
        return loss

    @torch.no_grad()
    def update_balance_bias(self) -> bool:
        """Aux-loss-free balancing step; call after the optimizer step.

        Moves ``expert_bias`` by ``balance_bias_rate`` toward under-loaded experts, using the load accumulated since
        the last call, summed over ``balance_group`` when ``torch.distributed`` is initialised so every rank makes
        the same selection. Does nothing (returns False) in eval mode or without ``balance_bias``.
        """
        if self.expert_bias is None or not self.training:
            return False
        load_E = self.expert_load
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(load_E, group=self.balance_group)
        self.expert_bias += self.config.balance_bias_rate * torch.sign(load_E.mean() - load_E)
        load_E.zero_()
        return True


def update_balance_biases(model: nn.Module) -> int:
    """Calls :meth:`TopKRouter.update_balance_bias` on every router in ``model``; returns how many updated."""
    return sum(int(m.update_balance_bias()) for m in model.modules() if isinstance(m, TopKRouter))
