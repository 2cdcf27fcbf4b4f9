"""Qwen2-MoE (``model_type="qwen2_moe"``): softmax router, a shared expert behind a sigmoid gate.

``Qwen2MoeSparseMoeBlock``: ``gate`` (``Qwen2MoeTopKRouter``: softmax in fp32, top-k, renormalised when
``norm_topk_prob``) -> ``experts`` (``Qwen2MoeExperts``, standard layout), plus ``shared_expert`` (a dense SwiGLU
MLP) scaled by ``sigmoid(shared_expert_gate(x))``. Only the routed experts are patched: the shared expert and its
gate run as transformers wrote them. Layers listed in ``mlp_only_layers`` (or off ``decoder_sparse_step``) are
dense and left alone. Top-k lives in ``block.gate.top_k``.
"""

from leanmoe.hf.adapter import Family

FAMILY = Family(
    name="qwen2_moe",
    model_types=("qwen2_moe",),
    module="transformers.models.qwen2_moe.modeling_qwen2_moe",
    block_class="Qwen2MoeSparseMoeBlock",
    experts_class="Qwen2MoeExperts",
    router_attr="gate",
)
