"""OLMoE (``model_type="olmoe"``): softmax router, optional top-k renormalisation, no shared expert.

``OlmoeSparseMoeBlock``: ``gate`` (``OlmoeTopKRouter``: softmax in fp32, top-k, renormalised when
``norm_topk_prob``) -> ``experts`` (``OlmoeExperts``, standard layout). Only the experts are patched. Top-k lives
in ``block.gate.top_k``.
"""

from leanmoe.hf.adapter import Family

FAMILY = Family(
    name="olmoe",
    model_types=("olmoe",),
    module="transformers.models.olmoe.modeling_olmoe",
    block_class="OlmoeSparseMoeBlock",
    experts_class="OlmoeExperts",
    router_attr="gate",
)
