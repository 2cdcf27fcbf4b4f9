"""Routers: score tokens against experts and pick the top-k."""

from leanmoe.routers.topk import RouterOutput, TopKRouter, stable_topk, update_balance_biases

__all__ = ["RouterOutput", "TopKRouter", "stable_topk", "update_balance_biases"]
