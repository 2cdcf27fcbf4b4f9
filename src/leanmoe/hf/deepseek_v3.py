"""DeepSeek-V3 (``model_type="deepseek_v3"``): sigmoid scores, correction bias, grouped top-k, routed scaling.

``DeepseekV3MoE``: ``gate`` (``DeepseekV3TopkRouter``, all in fp32: ``sigmoid(x W^T)``; the expert choice adds
``e_score_correction_bias`` and keeps the ``topk_group`` best of ``n_group`` groups (a group scores the sum of its
two best experts); the weights are the un-biased scores, renormalised when ``norm_topk_prob``, times
``routed_scaling_factor``) -> ``experts`` (``DeepseekV3Experts``, standard layout), plus ``shared_experts`` (a
dense SwiGLU MLP). Only the routed experts are patched. The first ``first_k_dense_replace`` layers are dense and
left alone. Top-k lives in ``block.gate.top_k`` (raising it past ``topk_group`` groups' worth of experts picks
masked experts: the router's own constraint).
"""

from leanmoe.hf.adapter import Family

FAMILY = Family(
    name="deepseek_v3",
    model_types=("deepseek_v3",),
    module="transformers.models.deepseek_v3.modeling_deepseek_v3",
    block_class="DeepseekV3MoE",
    experts_class="DeepseekV3Experts",
    router_attr="gate",
)
