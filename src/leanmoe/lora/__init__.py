"""LoRA on the experts: :class:`ExpertLoRA` adapters, the routed compute with them, and model-level tools.

```python
import leanmoe, leanmoe.lora
leanmoe.lora.add_expert_lora(model, rank=16, alpha=32, targets=("gate_up", "down"))  # MoE layers or HF-patched
...train (only the adapters require grad)...
leanmoe.lora.save_peft_adapter(model, "adapter/")   # PEFT's LoRA format (target_parameters), HF models
leanmoe.lora.merge_expert_lora(model)               # fold s*B*A into the base weights; unmerge_expert_lora undoes it
```
See docs/LORA.md for the math, the backends that take adapters and the PEFT key/shape mapping.
"""

from leanmoe.lora.compute import LORA_BACKENDS, lora_moe_experts, select_lora_backend
from leanmoe.lora.model import (
    add_expert_lora,
    experts_modules,
    lora_modules,
    merge_expert_lora,
    unmerge_expert_lora,
)
from leanmoe.lora.module import TARGETS, ExpertLoRA
from leanmoe.lora.peft import load_peft_adapter, load_peft_state_dict, peft_state_dict, save_peft_adapter

__all__ = [
    "LORA_BACKENDS",
    "TARGETS",
    "ExpertLoRA",
    "add_expert_lora",
    "experts_modules",
    "load_peft_adapter",
    "load_peft_state_dict",
    "lora_modules",
    "lora_moe_experts",
    "merge_expert_lora",
    "peft_state_dict",
    "save_peft_adapter",
    "select_lora_backend",
    "unmerge_expert_lora",
]
