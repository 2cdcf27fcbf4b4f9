"""Expert LoRA on transformers models patched by leanmoe.hf, against transformers + PEFT's parameter LoRA.

Tiny configs (``leanmoe.bench.hf.TINY_SHAPES``), random weights, fp32. PEFT adapters round-trip through its on-disk
format both ways (leanmoe saves, ``PeftModel.from_pretrained`` loads; PEFT saves, leanmoe loads) with the same
logits, and a few AdamW steps on the adapters track the same model trained with PEFT from the same init.
"""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import leanmoe.hf  # noqa: E402
import leanmoe.lora  # noqa: E402
from leanmoe.bench.hf import BENCH_MODEL_TYPES  # noqa: E402
from tests.helpers import assert_close  # noqa: E402
from tests.test_hf_families import tiny_model, tokens  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

FAMILIES = list(BENCH_MODEL_TYPES)  # mixtral, qwen2_moe, qwen3_moe, olmoe, deepseek_v3, gpt_oss, llama4_text
TOL = 1e-4  # fp32 logits: the same math in another order (grouped GEMMs, low-rank factors vs PEFT's delta)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _randomize(model, seed=0, std=0.2):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, _, lora in leanmoe.lora.lora_modules(model):
            for q in lora.parameters():
                q.copy_(torch.randn(q.shape, generator=gen) * std)


def _patched_with_lora(base, *, rank=4, alpha=8, targets=("gate_up", "down")):
    model = leanmoe.hf.patch(copy.deepcopy(base), backend="grouped_mm")
    return leanmoe.lora.add_expert_lora(model, rank=rank, alpha=alpha, targets=targets)


def _experts_targets(model, params=("gate_up_proj", "down_proj")):
    return [f"{n}.{p}" for n, m in model.named_modules() if n.endswith("experts") and hasattr(m, "down_proj")
            for p in params]


@pytest.mark.parametrize("model_type", FAMILIES)
def test_leanmoe_adapter_loads_in_peft_with_the_same_logits(model_type, tmp_path):
    base = tiny_model(model_type, layers=1)
    ids = tokens()
    model = _patched_with_lora(base)
    assert_close(_logits(model, ids), _logits(base, ids), tol=TOL, name="fresh adapter")
    _randomize(model)
    out = _logits(model, ids)
    assert (out - _logits(base, ids)).abs().max() > 1e-2  # the adapters matter
    leanmoe.lora.save_peft_adapter(model, tmp_path)
    ref = _logits(peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path), ids)
    assert_close(out, ref, tol=TOL, name=f"{model_type} leanmoe -> PEFT logits")


@pytest.mark.parametrize("model_type,params", [
    ("qwen3_moe", ("gate_up_proj", "down_proj")),
    ("mixtral", ("gate_up_proj", "down_proj")),
    ("mixtral", ("down_proj",)),      # one target: no nesting
    ("gpt_oss", ("gate_up_proj", "down_proj")),    # transposed storage with is_transposed
    ("llama4_text", ("gate_up_proj", "down_proj")),  # transposed storage, no flag: PEFT factors the transpose
])
def test_peft_adapter_loads_in_leanmoe_with_the_same_logits(model_type, params, tmp_path):
    base = tiny_model(model_type, layers=2)
    ids = tokens()
    # init_lora_weights=False: both factors random (PEFT's default B = 0 would hide the B mapping).
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=[], target_parameters=_experts_targets(base, params),
                             init_lora_weights=False)
    peft_model = peft.get_peft_model(copy.deepcopy(base), config)
    ref = _logits(peft_model, ids)
    assert (ref - _logits(base, ids)).abs().max() > 1e-2
    peft_model.save_pretrained(tmp_path)
    model = leanmoe.lora.load_peft_adapter(leanmoe.hf.patch(copy.deepcopy(base), backend="grouped_mm"), tmp_path)
    targets = tuple(t for t, p in (("gate_up", "gate_up_proj"), ("down", "down_proj")) if p in params)
    assert all(lora.targets == targets for _, _, lora in leanmoe.lora.lora_modules(model))
    assert_close(_logits(model, ids), ref, tol=TOL, name=f"{model_type} PEFT -> leanmoe logits")


@pytest.mark.parametrize("model_type", ["qwen3_moe", "mixtral"])
def test_keys_and_shapes_are_peft_s(model_type):
    base = tiny_model(model_type, layers=2)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=[], target_parameters=_experts_targets(base))
    theirs = peft.get_peft_model_state_dict(peft.get_peft_model(copy.deepcopy(base), config))
    ours, our_config = leanmoe.lora.peft_state_dict(_patched_with_lora(base))
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in theirs.items()}
    assert sorted(our_config["target_parameters"]) == sorted(config.target_parameters)


def test_rslora_and_unsupported_configs(tmp_path):
    base = tiny_model("qwen3_moe", layers=1)
    ids = tokens()
    config = peft.LoraConfig(r=4, lora_alpha=8, use_rslora=True, target_modules=[], init_lora_weights=False,
                             target_parameters=_experts_targets(base))
    peft_model = peft.get_peft_model(copy.deepcopy(base), config)
    state = peft.get_peft_model_state_dict(peft_model)
    model = leanmoe.hf.patch(copy.deepcopy(base), backend="grouped_mm")
    leanmoe.lora.load_peft_state_dict(model, state, config.to_dict())
    assert_close(_logits(model, ids), _logits(peft_model, ids), tol=TOL, name="rslora")
    with pytest.raises(ValueError, match="rank_pattern"):
        leanmoe.lora.load_peft_state_dict(model, state, {**config.to_dict(), "rank_pattern": {"x": 2}})
    fresh = leanmoe.hf.patch(copy.deepcopy(base), backend="grouped_mm")
    with pytest.raises(ValueError, match="not expert parameter adapters"):
        leanmoe.lora.load_peft_state_dict(fresh, {**state, "base_model.model.lm_head.lora_A.weight": torch.ones(1)},
                                          config.to_dict())
    with pytest.raises(ValueError, match="PEFT's parameter LoRA takes no dropout"):
        leanmoe.lora.peft_state_dict(leanmoe.lora.add_expert_lora(
            leanmoe.hf.patch(copy.deepcopy(base), backend="grouped_mm"), rank=4, dropout=0.1))


@pytest.mark.parametrize("model_type", ["qwen3_moe", "mixtral"])
def test_adamw_tracks_transformers_with_peft(model_type, tmp_path):
    base = tiny_model(model_type, layers=2)
    model = _patched_with_lora(base)  # B = 0, A random: PEFT's own init scheme
    for name, q in model.named_parameters():  # add_expert_lora freezes the experts only; PEFT freezes everything
        q.requires_grad_(".lora." in name)
    leanmoe.lora.save_peft_adapter(model, tmp_path)
    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path, is_trainable=True)
    ours = [q for q in model.parameters() if q.requires_grad]
    theirs = [q for q in peft_model.parameters() if q.requires_grad]
    assert sum(q.numel() for q in ours) == sum(q.numel() for q in theirs) > 0  # the same trainable set
    ids = tokens()
    losses = {}
    for tag, m, params in (("ours", model, ours), ("peft", peft_model, theirs)):
        opt = torch.optim.AdamW(params, lr=1e-2)
        losses[tag] = []
        for _ in range(3):
            loss = m(ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses[tag].append(loss.item())
    assert losses["peft"][-1] < losses["peft"][0]
    torch.testing.assert_close(torch.tensor(losses["ours"]), torch.tensor(losses["peft"]), rtol=1e-4, atol=0)
    trained, _ = leanmoe.lora.peft_state_dict(model)
    ref = peft.get_peft_model_state_dict(peft_model)
    for key, value in ref.items():
        rms = ((trained[key] - value).norm() / value.norm()).item()
        assert rms < 1e-3, f"{key} after 3 AdamW steps: relative RMS error {rms:.2e}"


def test_merge_into_hf_weights_and_back():
    base = tiny_model("qwen3_moe", layers=2)
    ids = tokens()
    model = _patched_with_lora(base)
    _randomize(model)
    adapted = _logits(model, ids)
    weights = {n: q.detach().clone() for n, q in model.named_parameters() if "experts" in n and "lora" not in n}
    leanmoe.lora.merge_expert_lora(model)
    assert_close(_logits(model, ids), adapted, tol=TOL, name="merged")
    # The merged weights alone reproduce the adapted model in plain transformers.
    plain = leanmoe.hf.unpatch(copy.deepcopy(model))
    assert_close(_logits(plain, ids), adapted, tol=TOL, name="merged, unpatched")
    leanmoe.lora.unmerge_expert_lora(model)
    for n, q in model.named_parameters():
        if n in weights:
            assert_close(q, weights[n], tol=1e-6, name=n)


def test_unpatched_model_is_refused():
    with pytest.raises(ValueError, match=r"patched with leanmoe.hf.patch\(model\)"):
        leanmoe.lora.add_expert_lora(tiny_model("mixtral", layers=1))
