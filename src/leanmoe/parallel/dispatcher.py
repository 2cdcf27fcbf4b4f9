"""The dispatch/combine seam of :class:`leanmoe.MoE`.

Legend: T tokens, D model dim, E experts, K top-k.

``dispatch`` takes the router's choice and returns what the experts module computes on; ``combine`` turns the
experts' output back into ``[T, D]``. The local dispatcher is the identity (the experts backend already does the
weighted combine); the expert-parallel dispatcher subclasses it and moves rows between ranks.
"""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass(frozen=True)
class DispatchMeta:
    """State carried from ``dispatch`` to ``combine``. The local dispatcher needs only the token count.

    ``token_mask_T``: the mask the experts apply to the dispatched rows (``[T]`` bool), or None when every
    dispatched row is kept (a dispatcher that sends no rows for masked tokens leaves it None).
    """

    num_tokens: int
    token_mask_T: torch.Tensor | None = dataclasses.field(default=None, kw_only=True)


class LocalDispatcher:
    """All experts live on this device: tokens stay where they are."""

    def dispatch(self, x_TD: torch.Tensor, topk_ids_TK: torch.Tensor, topk_weights_TK: torch.Tensor, *,
                 token_mask_T: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, DispatchMeta]:
        """``(x, ids, weights, meta)`` the experts run on: here the inputs themselves (``[T, D]``, ``[T, K]``)."""
        return x_TD, topk_ids_TK, topk_weights_TK, DispatchMeta(num_tokens=x_TD.shape[0], token_mask_T=token_mask_T)

    def combine(self, y: torch.Tensor, meta: DispatchMeta) -> torch.Tensor:
        """The experts' output back on the source tokens, ``[T, D]``: here the output itself."""
        return y
