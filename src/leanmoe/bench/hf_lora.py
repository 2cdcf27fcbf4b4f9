# SPDX-License-Identifier: Apache-2.0
"""``leanmoe bench --hf MODEL_TYPE --lora RANK``: the LoRA fine-tuning step of a transformers MoE model, leanmoe's
expert adapters against transformers' own experts with PEFT's parameter LoRA, on the same adapter.

Legend: T tokens, E experts.

1. build the family's model as :func:`leanmoe.bench.hf.run_hf_bench` does (published layer shapes, ``layers``
   decoder layers, random weights) and freeze every base parameter, as a LoRA fine-tune does;
2. leanmoe: the model patched by :func:`leanmoe.hf.patch` (``backend="auto"``) with
   :func:`leanmoe.lora.add_expert_lora` at rank ``rank``, alpha ``2 * rank``, on gate_up and down; the factors are
   drawn as :func:`leanmoe.bench.lora.make_lora` draws them (B small and random, not zero, so the adapter counts);
3. the peer: a copy of the unpatched model on transformers' ``grouped_mm`` experts (``eager`` where the family has
   no other), with ``peft.get_peft_model(LoraConfig(target_parameters=...))`` and the same adapter loaded from
   :func:`leanmoe.lora.peft_state_dict`;
4. check: both models' logits against leanmoe's model run in fp32 on the reference backend (relative RMS error;
   :func:`leanmoe.bench.hf._logits_tolerance`: the dtype's, or in low precision twice the error of
   transformers' eager experts with the same adapter where that is larger); a row that fails is not timed;
5. time the training step (forward with labels, backward into the adapters; their gradients reset between steps)
   and measure its peak CUDA memory, as the HF bench does.

Rows have the HF bench's keys (``model_type, implementation, mode, ms, peak_mem_mb, ok, rel_err, note``), with
``mode == "train"`` and ``lora_rank``.
"""

from __future__ import annotations

import copy
import math

import torch

#: Implementation names of the two rows.
LEANMOE_ROW = "leanmoe:auto+ExpertLoRA"
PEFT_ROW_FORMAT = "transformers:{impl}+peft"


def _draw_adapters(model: torch.nn.Module, rank: int, seed: int = 0) -> None:
    """A uniform in ``+-1/sqrt(in)``, B ~ N(0, (0.1/sqrt(rank))^2) for every adapter of ``model``, from ``seed``."""
    import leanmoe.lora
    from leanmoe.bench.lora import B_STD_SQRT_RANK

    gen = torch.Generator(device="cpu").manual_seed(seed + 2)
    with torch.no_grad():
        for _, _, lora in leanmoe.lora.lora_modules(model):
            for target in lora.targets:
                A, B = lora.adapted(target)
                bound = 1 / math.sqrt(A.shape[-1])
                A.copy_((torch.rand(A.shape, generator=gen) * 2 * bound - bound).to(A))
                B.copy_((torch.randn(B.shape, generator=gen) * (B_STD_SQRT_RANK / math.sqrt(rank))).to(B))


def run_hf_lora_bench(model_type: str, *, device, dtype, tokens: int, layers: int, rank: int, json_path=None,
                      config_overrides: dict | None = None) -> list[dict]:
    """The LoRA training step of ``model_type`` with leanmoe's adapters and with PEFT's (see the module docstring).

    Raises:
        ValueError: ``rank`` is not an int >= 1, or peft is not installed (``pip install 'leanmoe[lora]'``).
    """
    import leanmoe.hf
    import leanmoe.lora
    from leanmoe.bench.hf import (
        _logits_tolerance,
        _measure_step,
        _rel_rms,
        _resolve_model,
        _supports_hf_experts_implementation,
        _write_json,
        build_model,
    )

    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be an int >= 1, got {rank!r}")
    try:
        import peft
    except ImportError as exc:
        raise ValueError("--hf with --lora compares with PEFT: pip install 'leanmoe[lora]'") from exc

    device, dtype, config = _resolve_model(model_type, layers, config_overrides, device, dtype)
    base = build_model(config, device=device, dtype=dtype)
    base.train()  # dropout is 0 in these configs; train mode exercises the training paths
    for p in base.parameters():
        p.requires_grad_(False)
    generator = torch.Generator(device="cpu").manual_seed(0)
    input_ids = torch.randint(0, config.vocab_size, (1, tokens), generator=generator).to(device)

    lean = leanmoe.hf.patch(copy.deepcopy(base), backend="auto")
    leanmoe.lora.add_expert_lora(lean, rank=rank, alpha=2 * rank)
    _draw_adapters(lean, rank)
    state, lora_config = leanmoe.lora.peft_state_dict(lean)

    # The fp32 reference: leanmoe's model, adapters included, on the reference loop.
    ref_model = leanmoe.hf.patch(leanmoe.hf.unpatch(copy.deepcopy(lean)).float(), backend="reference")
    with torch.no_grad():
        ref_logits = ref_model(input_ids).logits.float()
    del ref_model

    hf_impl = "grouped_mm" if _supports_hf_experts_implementation(base) else "eager"
    hf = copy.deepcopy(base)
    peer = peft.get_peft_model(hf, peft.LoraConfig(**lora_config))
    peft.set_peft_model_state_dict(peer, state)
    del base

    def eager_err() -> float:  # transformers' eager experts, with the same adapter (not yet on hf_impl)
        with torch.no_grad():
            return _rel_rms(peer(input_ids).logits.float(), ref_logits)

    tol = _logits_tolerance(dtype, eager_err)
    if hf_impl != "eager":
        hf.set_experts_implementation(hf_impl)

    rows: list[dict] = []
    for impl, model in ((PEFT_ROW_FORMAT.format(impl=hf_impl), peer), (LEANMOE_ROW, lean)):
        params = [p for p in model.parameters() if p.requires_grad]

        def train_step(model=model):
            model(input_ids, labels=input_ids).loss.backward()

        with torch.no_grad():
            rel_err = _rel_rms(model(input_ids).logits.float(), ref_logits)
        ok = rel_err <= tol
        note = "" if ok else f"logits off the fp32 reference by {rel_err:.2e} > {tol:.1e}: not timed"
        ms, peak = _measure_step(train_step, params, device, train=True) if ok else (None, None)
        rows.append(dict(model_type=model_type, implementation=impl, mode="train", ms=ms, peak_mem_mb=peak, ok=ok,
                         rel_err=rel_err, tol=tol, note=note, lora_rank=rank))
    _write_json(json_path, device, {"model_type": model_type, "tokens": tokens, "layers": layers, "dtype": str(dtype),
                                    "lora_rank": rank}, rows)
    return rows
