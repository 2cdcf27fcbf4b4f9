"""Mixtral (``model_type="mixtral"``): softmax router, top-k renormalised, SwiGLU experts, no shared expert.

``MixtralSparseMoeBlock``: ``gate`` (``MixtralTopKRouter``: softmax in fp32 over all experts, top-k, the k weights
renormalised to sum to 1) -> ``experts`` (``MixtralExperts``: ``gate_up_proj [E, 2I, D]`` gate rows first,
``down_proj [E, D, I]``). Only the experts are patched. Top-k lives in ``block.gate.top_k`` (``block.top_k`` is
a copy the forward never reads).
"""

from leanmoe.hf.adapter import Family

FAMILY = Family(
    name="mixtral",
    model_types=("mixtral",),
    module="transformers.models.mixtral.modeling_mixtral",
    block_class="MixtralSparseMoeBlock",
    experts_class="MixtralExperts",
    router_attr="gate",
)
