"""Benchmark shapes taken from real MoE models (``docs/BENCHMARK_PROTOCOL.md``), and the FLOP count per call.

Legend: T tokens, D model dim, I expert hidden dim, E experts, K top-k.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from leanmoe.activations import Activation


@dataclasses.dataclass(frozen=True, kw_only=True)
class Preset:
    """One MoE expert layer's shape and form, with its token counts for training/prefill and for decode."""

    name: str
    dim: int
    hidden_dim: int
    num_experts: int
    top_k: int
    train_tokens: int
    decode_tokens: int
    activation: Activation = Activation(name="swiglu")
    gate_up_layout: str = "concatenated"
    bias: bool = False
    #: How the preset appears in tables; differs from ``name`` for a CPU-scaled copy.
    label: str = ""

    def __post_init__(self) -> None:
        if not self.label:
            object.__setattr__(self, "label", self.name)

    @property
    def gated(self) -> bool:
        return self.activation.gated

    def tokens(self, decode: bool = False) -> int:
        return self.decode_tokens if decode else self.train_tokens

    def expert_bytes(self, element_size: int) -> int:
        """Bytes of one expert's weights (gate/up, down and biases) at ``element_size`` bytes per element."""
        N = 2 * self.hidden_dim if self.gated else self.hidden_dim
        numel = N * self.dim + self.dim * self.hidden_dim
        if self.bias:
            numel += N + self.dim
        return numel * element_size


_GPT_OSS: dict[str, Any] = dict(dim=2880, hidden_dim=2880, num_experts=32, top_k=4, train_tokens=16384,
                                decode_tokens=64)

PRESETS: dict[str, Preset] = {p.name: p for p in (
    Preset(name="qwen3-30b-a3b", dim=2048, hidden_dim=768, num_experts=128, top_k=8, train_tokens=16384,
           decode_tokens=64),
    Preset(name="olmoe-1b-7b", dim=2048, hidden_dim=1024, num_experts=64, top_k=8, train_tokens=16384,
           decode_tokens=64),
    Preset(name="gpt-oss-20b", **_GPT_OSS),
    # gpt-oss in its own form: interleaved gate/up rows, biases on both GEMMs, clamped SwiGLU.
    Preset(name="gpt-oss-20b-native", **_GPT_OSS, activation=Activation(name="clamped_swiglu", alpha=1.702, limit=7.0),
           gate_up_layout="interleaved", bias=True),
    Preset(name="mixtral-8x7b", dim=4096, hidden_dim=14336, num_experts=8, top_k=2, train_tokens=16384,
           decode_tokens=64),
    Preset(name="deepseek-v3", dim=7168, hidden_dim=2048, num_experts=256, top_k=8, train_tokens=4096,
           decode_tokens=64),
)}

DEFAULT_PRESET = "qwen3-30b-a3b"

#: The decode table's token counts (``--mode decode``); each preset's ``decode_tokens`` (64) is the headline.
DECODE_TOKENS = (1, 4, 16, 64, 256)

# The CPU run keeps each preset's form but caps its dims, so that the default `leanmoe bench` on a machine without
# a GPU (reference check included) finishes in seconds.
CPU_MAX_DIM, CPU_MAX_HIDDEN_DIM, CPU_MAX_EXPERTS, CPU_MAX_TOP_K = 256, 128, 16, 4
CPU_TRAIN_TOKENS = 256


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; expected one of {list(PRESETS)}")
    return PRESETS[name]


def cpu_scaled(preset: Preset) -> Preset:
    """``preset`` with dims capped for the CPU, labelled ``"<name> (CPU-scaled)"``."""
    return dataclasses.replace(
        preset,
        dim=min(preset.dim, CPU_MAX_DIM),
        hidden_dim=min(preset.hidden_dim, CPU_MAX_HIDDEN_DIM),
        num_experts=min(preset.num_experts, CPU_MAX_EXPERTS),
        top_k=min(preset.top_k, CPU_MAX_TOP_K),
        train_tokens=min(preset.train_tokens, CPU_TRAIN_TOKENS),
        label=f"{preset.name} (CPU-scaled)",
    )


def forward_flops(preset: Preset, num_tokens: int) -> int:
    """FLOPs of one forward: ``6·T·K·D·I`` gated (two GEMMs, the first 2I wide), ``4·T·K·D·I`` non-gated."""
    per_row = (6 if preset.gated else 4) * preset.dim * preset.hidden_dim
    return per_row * num_tokens * preset.top_k


def flops(preset: Preset, num_tokens: int, mode: str) -> int:
    """FLOPs of one call in ``mode``: ``fwd`` is :func:`forward_flops`, ``fwdbwd`` three times that."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
    return forward_flops(preset, num_tokens) * (3 if mode == "fwdbwd" else 1)


MODES = ("fwd", "fwdbwd")
ROUTINGS = ("uniform", "skewed")
