"""Calibration mode on tiny Hugging Face models patched by leanmoe.hf: Mixtral, Qwen3-MoE, DeepSeek-V3.

The by-hand references use transformers' own expert formula (``act_fn(gate) * up`` on ``gate_up_proj`` rows), and
the tokens and routing captured by the test's own hooks on each block's router and experts.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

pytest.importorskip("transformers", reason="the Hugging Face tests need transformers: pip install 'leanmoe[hf]'")
hf = pytest.importorskip("leanmoe.hf", reason="leanmoe.hf is not importable")

import transformers  # noqa: E402

from leanmoe.calibration import HessianObserver, StatsObserver, calibrate  # noqa: E402
from tests.helpers import assert_close, xtx  # noqa: E402

_ATTN = dict(vocab_size=64, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
             attn_implementation="eager", initializer_range=0.2)


def mixtral(top_k: int = 2):
    return transformers.MixtralForCausalLM(transformers.MixtralConfig(
        **_ATTN, intermediate_size=16, num_local_experts=6, num_experts_per_tok=top_k))


def qwen3_moe(top_k: int = 2):
    # norm_topk_prob=False: Qwen3-MoE's un-renormalised weights.
    return transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(
        **_ATTN, intermediate_size=48, moe_intermediate_size=16, num_experts=8, num_experts_per_tok=top_k,
        norm_topk_prob=False, head_dim=8))


def deepseek_v3(top_k: int = 2):
    # Layer 0 dense (first_k_dense_replace=1), layer 1 MoE: 8 experts in 4 groups, 2 groups kept, 1 shared expert.
    return transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(
        **{**_ATTN, "num_key_value_heads": 4}, intermediate_size=48, moe_intermediate_size=16, n_routed_experts=8,
        num_experts_per_tok=top_k, n_group=4, topk_group=2, n_shared_experts=1, first_k_dense_replace=1,
        q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8))


FAMILIES = {"mixtral": mixtral, "qwen3_moe": qwen3_moe, "deepseek_v3": deepseek_v3}


pytestmark = pytest.mark.usefixtures("one_thread")


def patched(family: str, seed: int = 0, top_k: int = 2) -> nn.Module:
    if not hasattr(hf, "patch"):
        pytest.skip("leanmoe.hf.patch is not available yet")
    torch.manual_seed(seed)
    return hf.patch(FAMILIES[family](top_k).eval())


def input_ids(seed: int = 1, shape=(2, 9)) -> torch.Tensor:
    return torch.randint(0, 64, shape, generator=torch.Generator().manual_seed(seed))


def blocks(model: nn.Module) -> dict[str, nn.Module]:
    """``{experts module name: its block}`` for every MoE block."""
    return {f"{name}.experts": m for name, m in model.named_modules() if hasattr(m, "experts") and hasattr(m, "gate")}


def capture(model: nn.Module) -> tuple[dict[str, list], list]:
    """Test hooks recording, per experts module, its input tokens and the router's chosen ids, call by call."""
    seen, handles = {}, []
    for name, block in blocks(model).items():
        seen[name] = []
        handles.append(block.gate.register_forward_hook(
            lambda m, a, out, name=name: seen[name].append({"ids": out[2].detach().clone()})))
        handles.append(block.experts.register_forward_pre_hook(
            lambda m, a, name=name: seen[name][-1].update(x=a[0].detach().clone())))
    return seen, handles


def hf_h(experts: nn.Module, e: int, x_RD: torch.Tensor) -> torch.Tensor:
    """transformers' own expert activation: ``act_fn(gate) * up``, gate rows first in ``gate_up_proj[e]``."""
    gate, up = F.linear(x_RD, experts.gate_up_proj[e]).chunk(2, dim=-1)
    return experts.act_fn(gate) * up


def snapshot(model: nn.Module) -> dict:
    mods = dict(model.named_modules())
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "hooks": {n: (len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in mods.items()},
        "attrs": {n: {k: v for k, v in vars(m).items() if isinstance(v, (int, float, str, bool, type(None)))}
                  for n, m in mods.items()},
        "top_k": {n: b.gate.top_k for n, b in blocks(model).items()},
        "patched": hf.is_patched(model),
    }


@pytest.mark.parametrize("mode", ["all_experts", "routed"])
@pytest.mark.parametrize("family", FAMILIES)
def test_output_unchanged(family, mode):
    model = patched(family)
    ids = input_ids()
    with torch.no_grad():
        ref = model(ids).logits
        with calibrate(model, mode=mode, observers=[HessianObserver(), StatsObserver()], expert_batch_size=3):
            out = model(ids).logits
    assert torch.equal(out, ref)


@pytest.mark.parametrize("family", FAMILIES)
def test_all_experts_counts_and_hessian_by_hand(family):
    model = patched(family)
    seen, handles = capture(model)
    with torch.no_grad(), calibrate(model, observers=[HessianObserver(), StatsObserver()]) as session:
        model(input_ids(1))
        model(input_ids(2, shape=(1, 5)))
    for h in handles:
        h.remove()
    assert list(seen) == [n for n in session.layer_names if n.endswith(".experts")]
    for name, calls in seen.items():
        experts = model.get_submodule(name)
        x_TD = torch.cat([c["x"] for c in calls])
        ids_TK = torch.cat([c["ids"] for c in calls])
        E = experts.gate_up_proj.shape[0]
        assert torch.equal(session.routed_tokens[name], torch.bincount(ids_TK.reshape(-1), minlength=E))
        res = session.results[name]
        assert sorted(res) == list(range(E))
        for e in range(E):
            for proj in ("gate_up", "down"):
                assert res[e][proj]["stats"].tokens_seen == x_TD.shape[0] == res[e][proj]["hessian"].nsamples
                assert res[e][proj]["stats"].routed_tokens == int((ids_TK == e).sum())
            assert_close(res[e]["gate_up"]["hessian"].xtx_CC, xtx(x_TD), tol=1e-5, name=f"{name}[{e}] gate_up")
            assert_close(res[e]["down"]["hessian"].xtx_CC, xtx(hf_h(experts, e, x_TD)), tol=1e-5,
                         name=f"{name}[{e}] down")


def test_deepseek_v3_shared_experts_and_attention_mask():
    # Left padding: the first tokens of row 0 are masked; masked tokens are neither observed nor counted.
    model = patched("deepseek_v3")
    ids = input_ids()
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[0, :4] = 0
    seen, handles = capture(model)
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).logits
        with calibrate(model, observers=[HessianObserver(), StatsObserver()]) as session:
            out = model(ids, attention_mask=mask).logits
    for h in handles:
        h.remove()
    assert torch.equal(out, ref)
    assert session.layer_names == ["model.layers.1.mlp.experts", "model.layers.1.mlp.shared_experts"]
    keep_T = mask.reshape(-1).bool()
    call = seen["model.layers.1.mlp.experts"][-1]
    x_RD, ids_RK = call["x"][keep_T], call["ids"][keep_T]
    experts = model.get_submodule("model.layers.1.mlp.experts")
    assert torch.equal(session.routed_tokens["model.layers.1.mlp.experts"], torch.bincount(ids_RK.reshape(-1),
                                                                                          minlength=8))
    res = session.results["model.layers.1.mlp.experts"]
    for e in range(8):
        assert res[e]["gate_up"]["stats"].tokens_seen == int(mask.sum()) == 14
        assert_close(res[e]["down"]["hessian"].xtx_CC, xtx(hf_h(experts, e, x_RD)), tol=1e-5, name=f"down[{e}]")
    shared = model.get_submodule("model.layers.1.mlp.shared_experts")
    h_RI = shared.act_fn(shared.gate_proj(x_RD)) * shared.up_proj(x_RD)
    res = session.results["model.layers.1.mlp.shared_experts"][0]
    assert res["gate_up"]["stats"].tokens_seen == 14 and res["down"]["hessian"].nsamples == 14
    assert_close(res["gate_up"]["hessian"].xtx_CC, xtx(x_RD), tol=1e-5, name="shared gate_up")
    assert_close(res["down"]["hessian"].xtx_CC, xtx(h_RI), tol=1e-5, name="shared down")


@pytest.mark.parametrize("family,top_k", [("mixtral", 4), ("qwen3_moe", 1), ("deepseek_v3", 4)])
def test_override_matches_a_top_n_model(family, top_k):
    model = patched(family)
    ref_model = patched(family, top_k=top_k)
    ref_model.load_state_dict(model.state_dict())
    ids = input_ids()
    with torch.no_grad():
        ref = ref_model(ids).logits
        base = model(ids).logits
        with calibrate(model, mode="override", top_k=top_k, observers=[StatsObserver()]) as session:
            out = model(ids).logits
        assert torch.equal(model(ids).logits, base)  # restored
    assert_close(out, ref, tol=1e-5, name="override vs top-N model")
    T = ids.numel()
    for name in (n for n in session.layer_names if n.endswith(".experts")):
        assert int(session.routed_tokens[name].sum()) == T * top_k


def test_override_top_k_beyond_the_groups_is_refused():
    model = patched("deepseek_v3")
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"top_k must be in \[1, 4\].*2 of 4 groups kept\), got 5"):
        with calibrate(model, mode="override", top_k=5, observers=[StatsObserver()]):
            pass
    assert snapshot_equal(before, snapshot(model))


@pytest.mark.parametrize("family", FAMILIES)
def test_expert_batch_size_gives_identical_results(family):
    model = patched(family)
    ids = input_ids()
    results = {}
    for B in (None, 1, 3):
        with torch.no_grad(), calibrate(model, observers=[HessianObserver()], expert_batch_size=B) as session:
            model(ids)
        results[B] = session.results
    for B in (1, 3):
        for name, experts in results[None].items():
            for e, projs in experts.items():
                for proj, value in projs.items():
                    assert torch.equal(value["hessian"].xtx_CC, results[B][name][e][proj]["hessian"].xtx_CC)


def snapshot_equal(a: dict, b: dict) -> bool:
    return (a.keys() == b.keys() and all(a[k] == b[k] for k in ("hooks", "attrs", "top_k", "patched"))
            and all(torch.equal(t, b["state"][n]) for n, t in a["state"].items()))


@pytest.mark.parametrize("mode", ["all_experts", "override"])
@pytest.mark.parametrize("family", FAMILIES)
def test_model_unchanged_after_exit_and_after_an_exception(family, mode):
    model = patched(family)
    ids = input_ids()
    kw = {"top_k": 3} if mode == "override" else {}
    with torch.no_grad():
        ref = model(ids).logits
        before = snapshot(model)
        with calibrate(model, mode=mode, observers=[HessianObserver()], **kw):
            model(ids)
        assert snapshot_equal(before, snapshot(model))
        with pytest.raises(RuntimeError, match="boom"), calibrate(model, mode=mode, observers=[StatsObserver()], **kw):
            model(ids)
            raise RuntimeError("boom")
        assert snapshot_equal(before, snapshot(model))
        assert torch.equal(model(ids).logits, ref)
        hf.unpatch(model)  # the patch itself is still reversible
        assert not hf.is_patched(model)


def test_unpatched_model_is_refused_with_a_hint():
    torch.manual_seed(0)
    model = mixtral()
    with pytest.raises(ValueError, match=r"leanmoe.hf.patch\(model\)"):
        with calibrate(model, observers=[StatsObserver()]):
            pass
