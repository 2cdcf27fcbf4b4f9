"""gpt-oss (``model_type="gpt_oss"``): router with a bias, softmax over the top-k logits, clamped SwiGLU experts.

``GptOssMLP``: ``router`` (``GptOssTopKRouter``: ``logits = x W^T + b``, top-k of the logits, softmax over those
k) -> ``experts`` (``GptOssExperts``: ``gate_up_proj [E, D, 2I]`` with gate and up columns interleaved,
``down_proj [E, I, D]``, biases ``gate_up_proj_bias [E, 2I]`` and ``down_proj_bias [E, D]``). leanmoe reads the
weights as ``transpose(-2, -1)`` views with ``gate_up_layout="interleaved"`` and the activation
``clamped_swiglu(alpha=experts.alpha, limit=experts.limit)``:
``(clamp(up, -limit, limit) + 1) * g * sigmoid(alpha * g)`` with ``g = min(gate, limit)``.
The block also returns the router scores, unchanged. Top-k lives in ``block.router.top_k``.
"""

from typing import Any

from leanmoe.activations import Activation
from leanmoe.hf.adapter import Family, register_experts_class

_MODULE = "transformers.models.gpt_oss.modeling_gpt_oss"


def _activation(experts: Any) -> Activation:
    # transformers <= 5.17 hard-codes alpha=1.702, limit=7.0 on the module; later versions read them from the config.
    return Activation(name="clamped_swiglu", alpha=float(experts.alpha), limit=float(experts.limit))


register_experts_class(f"{_MODULE}:GptOssExperts", _activation)

FAMILY = Family(
    name="gpt_oss",
    model_types=("gpt_oss",),
    module=_MODULE,
    block_class="GptOssMLP",
    experts_class="GptOssExperts",
    router_attr="router",
)
