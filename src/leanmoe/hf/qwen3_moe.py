"""Qwen3-MoE (``model_type="qwen3_moe"``): softmax router, optional top-k renormalisation, no shared expert.

``Qwen3MoeSparseMoeBlock``: ``gate`` (``Qwen3MoeTopKRouter``: softmax in fp32, top-k, renormalised when
``norm_topk_prob``) -> ``experts`` (``Qwen3MoeExperts``, standard layout). Only the experts are patched; dense
layers (``mlp_only_layers``) are left alone. Top-k lives in ``block.gate.top_k``.
"""

from leanmoe.hf.adapter import Family

FAMILY = Family(
    name="qwen3_moe",
    model_types=("qwen3_moe",),
    module="transformers.models.qwen3_moe.modeling_qwen3_moe",
    block_class="Qwen3MoeSparseMoeBlock",
    experts_class="Qwen3MoeExperts",
    router_attr="gate",
)
