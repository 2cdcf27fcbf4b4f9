"""Benchmark routings, exactly as ``docs/BENCHMARK_PROTOCOL.md`` defines them, reproducible from a seed.

Legend: T tokens, E experts, K top-k.

1. router logits ``[T, E]`` drawn from N(0, 1) on the CPU with a seeded generator (so a seed gives the same routing
   on every device);
2. ``skewed`` adds ``log(1 / (e + 1))`` to expert e's logits (a Zipf-like load: expert 0 busiest);
3. softmax over all E experts in fp32, top-K, the K weights renormalised to sum to 1.
"""

from __future__ import annotations

import torch

from leanmoe.bench.presets import ROUTINGS


def router_logits(num_tokens: int, num_experts: int, routing: str = "uniform", *, seed: int = 0) -> torch.Tensor:
    """``[T, E]`` fp32 router logits on the CPU for ``routing`` (``uniform`` or ``skewed``)."""
    if routing not in ROUTINGS:
        raise ValueError(f"unknown routing {routing!r}; expected one of {ROUTINGS}")
    gen = torch.Generator().manual_seed(seed)
    logits_TE = torch.randn(num_tokens, num_experts, generator=gen, dtype=torch.float32)
    if routing == "skewed":
        offsets_E = torch.log(1.0 / (torch.arange(num_experts, dtype=torch.float32) + 1.0))
        logits_TE = logits_TE + offsets_E
    return logits_TE


def make_routing(num_tokens: int, num_experts: int, top_k: int, routing: str = "uniform", *, seed: int = 0,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(topk_ids_TK int64, topk_weights_TK in dtype)`` on ``device``; each token's weights sum to 1."""
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")
    probs_TE = torch.softmax(router_logits(num_tokens, num_experts, routing, seed=seed), dim=-1)
    topk_weights_TK, topk_ids_TK = probs_TE.topk(top_k, dim=-1)
    topk_weights_TK = topk_weights_TK / topk_weights_TK.sum(dim=-1, keepdim=True)
    return topk_ids_TK.to(device), topk_weights_TK.to(device=device, dtype=dtype)
