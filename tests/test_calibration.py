"""Calibration mode on leanmoe.MoE: output untouched, every expert sees every token, Hessians by hand, override,
expert batching, restoration after exit and after an exception, shared experts, token masks, memory scaling.

Legend: T tokens, D model dim, I expert hidden dim, N gate/up rows, E experts, K top-k.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import leanmoe
from leanmoe.activations import apply_activation
from leanmoe.calibration import (
    CalibrationReport,
    ExpertStats,
    Hessian,
    HessianObserver,
    StatsObserver,
    calibrate,
)
from tests.helpers import assert_close, xtx

CONFIGS = {
    "swiglu-E8-K2": dict(dim=32, hidden_dim=16, num_experts=8, top_k=2),
    # interleaved gate/up rows with biases (gpt-oss layout): bias and layout reach the observed h.
    "clamped_swiglu-interleaved-bias-E6-K3": dict(dim=24, hidden_dim=8, num_experts=6, top_k=3,
                                                  activation="clamped_swiglu", gate_up_layout="interleaved",
                                                  bias=True),
    # non-gated: gate_up_proj is [E, I, D], h = relu(a)^2.
    "relu2-E5-K1": dict(dim=16, hidden_dim=12, num_experts=5, top_k=1, activation="relu2"),
    # DeepSeek-V3-like: sigmoid scores, node-limited groups, one shared expert.
    "sigmoid-grouped-shared-E8-K2": dict(dim=32, hidden_dim=8, num_experts=8, top_k=2, score_func="sigmoid",
                                         n_group=4, topk_group=2, num_shared_experts=1),
    # Qwen2-MoE-like: gated shared expert.
    "shared-gated-E4-K2": dict(dim=16, hidden_dim=8, num_experts=4, top_k=2, num_shared_experts=2,
                               shared_expert_gate=True),
}


pytestmark = pytest.mark.usefixtures("one_thread")


def make_layer(seed: int = 0, dtype=torch.float32, **cfg) -> leanmoe.MoE:
    torch.manual_seed(seed)
    layer = leanmoe.MoE(leanmoe.MoEConfig(**cfg), dtype=dtype)
    if layer.config.bias:
        with torch.no_grad():
            layer.experts.gate_up_bias.normal_(std=0.5)
    return layer


def batches(layer: leanmoe.MoE, shapes=((2, 7), (13,)), seed: int = 1, dtype=torch.float32) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, layer.config.dim, generator=gen).to(dtype) for s in shapes]


def run(layer: leanmoe.MoE, xs: list[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The outputs for each batch and the routed tokens per expert summed over the batches."""
    outs, routed_E = [], torch.zeros(layer.config.num_experts, dtype=torch.int64)
    for x in xs:
        outs.append(layer(x))
        routed_E += layer.tokens_per_expert
    return outs, routed_E


def by_hand_h(layer: leanmoe.MoE, e: int, x_RD: torch.Tensor) -> torch.Tensor:
    """Expert e's activation h on rows x, written out from the layer's weights."""
    ex = layer.experts
    a = x_RD @ ex.gate_up_proj[e].T
    if ex.gate_up_bias is not None:
        a = a + ex.gate_up_bias[e]
    return apply_activation(a, ex.activation, ex.gate_up_layout)


def snapshot(model: nn.Module) -> dict:
    """Everything calibration could leave behind: parameters, buffers, hooks, router configs, module attributes."""
    mods = dict(model.named_modules())
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "hooks": {n: (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._forward_hooks_with_kwargs),
                      len(m._forward_pre_hooks_with_kwargs)) for n, m in mods.items()},
        "global_hooks": (len(nn.modules.module._global_forward_hooks),
                         len(nn.modules.module._global_forward_pre_hooks)),
        "configs": {n: (id(m.config), m.config.top_k) for n, m in mods.items() if isinstance(m, leanmoe.TopKRouter)},
        "attrs": {n: sorted(vars(m)) for n, m in mods.items()},
        "training": {n: m.training for n, m in mods.items()},
    }


def assert_unchanged(before: dict, after: dict) -> None:
    assert before.keys() == after.keys()
    for k in ("hooks", "global_hooks", "configs", "attrs", "training"):
        assert before[k] == after[k], k
    for name, t in before["state"].items():
        assert torch.equal(t, after["state"][name]), name


# -- the output is the routed output ---------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["all_experts", "routed"])
@pytest.mark.parametrize("cfg", CONFIGS.values(), ids=CONFIGS.keys())
def test_output_unchanged(cfg, mode):
    layer = make_layer(**cfg)
    xs = batches(layer)
    ref = [layer(x) for x in xs]
    with calibrate(layer, mode=mode, observers=[HessianObserver(), StatsObserver()], expert_batch_size=3):
        out = [layer(x) for x in xs]
    for r, o in zip(ref, out, strict=True):
        assert torch.equal(r, o)


def test_output_and_gradients_unchanged_bf16_training():
    # bf16 weights, training mode, gradients through the layer: the hooks add nothing to the graph.
    layer = make_layer(dtype=torch.bfloat16, **CONFIGS["sigmoid-grouped-shared-E8-K2"]).train()
    x = batches(layer, shapes=((3, 5),), dtype=torch.bfloat16)[0].requires_grad_()
    ref = layer(x)
    ref.float().square().sum().backward()
    ref_grads = [p.grad.clone() for p in layer.parameters()] + [x.grad.clone()]
    layer.zero_grad()
    x.grad = None
    with calibrate(layer, observers=[HessianObserver()]) as session:
        out = layer(x)
        out.float().square().sum().backward()
    assert torch.equal(ref, out)
    for r, o in zip(ref_grads, [p.grad for p in layer.parameters()] + [x.grad], strict=True):
        assert torch.equal(r, o)
    assert session.results["experts"][0]["gate_up"]["hessian"].xtx_CC.dtype == torch.float32


# -- all_experts: every expert, every token ---------------------------------------------------------------------------

@pytest.mark.parametrize("cfg", CONFIGS.values(), ids=CONFIGS.keys())
def test_all_experts_sees_every_token_and_hessian_by_hand(cfg):
    layer = make_layer(**cfg)
    xs = batches(layer)
    with calibrate(layer, observers=[HessianObserver(), StatsObserver()]) as session:
        _, routed_E = run(layer, xs)
    x_TD = torch.cat([x.reshape(-1, layer.config.dim) for x in xs])
    T, E = x_TD.shape[0], layer.config.num_experts
    res = session.results["experts"]
    assert sorted(res) == list(range(E))
    assert torch.equal(session.routed_tokens["experts"], routed_E)
    for e in range(E):
        gate_up, down = res[e]["gate_up"], res[e]["down"]
        for proj in (gate_up, down):
            stats = proj["stats"]
            assert isinstance(stats, ExpertStats) and isinstance(proj["hessian"], Hessian)
            assert stats.tokens_seen == T and proj["hessian"].nsamples == T
            assert stats.routed_tokens == int(routed_E[e])
        assert_close(gate_up["hessian"].xtx_CC, xtx(x_TD), tol=1e-5, name=f"gate_up[{e}]")
        h_TI = by_hand_h(layer, e, x_TD)
        assert_close(down["hessian"].xtx_CC, xtx(h_TI), tol=1e-5, name=f"down[{e}]")
        assert_close(gate_up["stats"].absmax_C, x_TD.abs().amax(0), tol=0, name="absmax gate_up")
        assert_close(down["stats"].absmax_C, h_TI.abs().amax(0), tol=1e-6, name="absmax down")


def test_routed_mode_sees_only_routed_tokens():
    layer = make_layer(**CONFIGS["swiglu-E8-K2"])
    x_TD = batches(layer, shapes=((40,),))[0]
    ids_TK = layer.router(x_TD).topk_ids_TK
    with calibrate(layer, mode="routed", observers=[HessianObserver(), StatsObserver()]) as session:
        layer(x_TD)
    for e in range(layer.config.num_experts):
        x_RD = x_TD[(ids_TK == e).any(-1)]
        got = session.results["experts"].get(e, {})
        assert got["gate_up"]["stats"].tokens_seen == x_RD.shape[0] == got["gate_up"]["stats"].routed_tokens
        assert_close(got["gate_up"]["hessian"].xtx_CC, xtx(x_RD), tol=1e-5, name=f"gate_up[{e}]")
        assert_close(got["down"]["hessian"].xtx_CC, xtx(by_hand_h(layer, e, x_RD)), tol=1e-5, name=f"down[{e}]")


def test_report_names_the_experts_the_mode_rescued():
    # Expert 3's router bias is -100: it is never chosen, yet in all_experts mode it sees every token.
    layer = make_layer(**CONFIGS["swiglu-E8-K2"], router_bias=True)
    with torch.no_grad():
        layer.router.bias[3] = -100.0
    xs = batches(layer)
    with calibrate(layer, observers=[StatsObserver()]) as session:
        for x in xs:
            layer(x)
    T = sum(x.shape[:-1].numel() for x in xs)
    report = session.report(min_tokens=1)
    assert isinstance(report, CalibrationReport)
    assert [(r.layer_name, r.expert_idx, r.routed_tokens) for r in report.rare] == [("experts", 3, 0)]
    assert report.total_experts == 8
    assert "experts[3]: 0 routed tokens" in str(report)
    assert session.results["experts"][3]["gate_up"]["stats"].tokens_seen == T
    counts = session.routed_tokens["experts"]
    threshold = int(counts.max())
    assert {r.expert_idx for r in session.report(min_tokens=threshold).rare} == {
        e for e in range(8) if counts[e] < threshold}


# -- override --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cfg,top_k", [(CONFIGS["swiglu-E8-K2"], 5), (CONFIGS["swiglu-E8-K2"], 1),
                                       # grouped: at most topk_group * E / n_group = 4 experts
                                       (CONFIGS["sigmoid-grouped-shared-E8-K2"], 4)],
                         ids=["E8-K2-to-5", "E8-K2-to-1", "grouped-K2-to-4"])
def test_override_matches_a_top_n_model(cfg, top_k):
    layer = make_layer(**cfg)
    ref_layer = leanmoe.MoE(leanmoe.MoEConfig(**{**cfg, "top_k": top_k}))
    ref_layer.load_state_dict(layer.state_dict())
    xs = batches(layer)
    ref, ref_routed_E = run(ref_layer, xs)
    original_config = layer.router.config
    with calibrate(layer, mode="override", top_k=top_k, observers=[StatsObserver()]) as session:
        out = [layer(x) for x in xs]
        assert layer.config.top_k == cfg["top_k"]  # the shared config object is never mutated
    for r, o in zip(ref, out, strict=True):
        assert_close(o, r, tol=1e-6, name="override vs top-N model")
    assert torch.equal(session.routed_tokens["experts"], ref_routed_E)
    seen = {e: v["gate_up"]["stats"].tokens_seen for e, v in session.results["experts"].items()}
    assert seen == {e: int(c) for e, c in enumerate(ref_routed_E)}
    assert layer.router.config is original_config and original_config.top_k == cfg["top_k"]


def test_override_leaves_layers_outside_the_model_alone():
    # Two layers share one config; calibrating one must not change the other's routing.
    cfg = leanmoe.MoEConfig(**CONFIGS["swiglu-E8-K2"])
    torch.manual_seed(0)
    inside, outside = leanmoe.MoE(cfg), leanmoe.MoE(cfg)
    x = batches(inside)[0]
    ref = outside(x)
    with calibrate(inside, mode="override", top_k=6, observers=[StatsObserver()]):
        inside(x)
        assert torch.equal(outside(x), ref)
        assert outside.router.config.top_k == 2


# -- expert batching and memory ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["all_experts", "routed"])
def test_expert_batch_size_gives_identical_results(mode):
    layer = make_layer(**CONFIGS["sigmoid-grouped-shared-E8-K2"])
    xs = batches(layer)
    results = {}
    for B in (None, 1, 3, 8):  # 3: groups of 3, 3, 2 (a ragged last group)
        with calibrate(layer, mode=mode, observers=[HessianObserver(), StatsObserver()],
                       expert_batch_size=B) as session:
            for x in xs:
                layer(x)
        results[B] = session.results
    ref = results[None]
    for B, res in results.items():
        assert res.keys() == ref.keys()
        for layer_name in ref:
            for e in ref[layer_name]:
                for proj in ("gate_up", "down"):
                    r, o = ref[layer_name][e][proj], res[layer_name][e][proj]
                    assert torch.equal(r["hessian"].xtx_CC, o["hessian"].xtx_CC), (B, layer_name, e, proj)
                    assert r["hessian"].nsamples == o["hessian"].nsamples
                    assert torch.equal(r["stats"].absmax_C, o["stats"].absmax_C)


def test_working_memory_scales_with_expert_batch_size():
    # The session records the bytes of the activations it holds at once: the rows x [T, D] plus, per group of B
    # experts, gate_up [B, T, N] and h [B, T, I]. Peak = x + B * T * (N + I) * 4 bytes, linear in B.
    cfg = CONFIGS["swiglu-E8-K2"]
    layer = make_layer(**cfg)
    T, D, H, E = 64, cfg["dim"], cfg["hidden_dim"], cfg["num_experts"]  # H: the hidden dim I
    x = torch.randn(T, D)
    peaks = {}
    for B in (1, 2, 4, 8):
        with calibrate(layer, observers=[HessianObserver()], expert_batch_size=B) as session:
            layer(x)
        peaks[B] = session.peak_working_bytes
    with calibrate(layer, observers=[HessianObserver()]) as session:
        layer(x)
    assert session.peak_working_bytes == peaks[E]  # None = all experts of the layer in one group
    for B, peak in peaks.items():
        assert peak == 4 * (T * D + B * T * (2 * H + H)), (B, peak)
    assert peaks[8] - peaks[4] == 4 * (peaks[2] - peaks[1])  # 4 more experts vs 1 more


# -- restoration -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["all_experts", "override", "routed"])
def test_model_unchanged_after_exit_and_after_an_exception(mode):
    model = nn.Sequential(make_layer(**CONFIGS["sigmoid-grouped-shared-E8-K2"]),
                          make_layer(seed=1, **CONFIGS["sigmoid-grouped-shared-E8-K2"]))
    x = batches(model[0])[0]
    ref = model(x)
    before = snapshot(model)
    kw = {"top_k": 3} if mode == "override" else {}
    with calibrate(model, mode=mode, observers=[HessianObserver(), StatsObserver()], **kw) as session:
        model(x)
    assert session.layer_names == ["0.experts", "0.shared_experts", "1.experts", "1.shared_experts"]
    assert_unchanged(before, snapshot(model))
    assert torch.equal(model(x), ref)

    with pytest.raises(RuntimeError, match="boom"):
        with calibrate(model, mode=mode, observers=[HessianObserver()], **kw):
            model(x)
            raise RuntimeError("boom")
    assert_unchanged(before, snapshot(model))
    assert torch.equal(model(x), ref)


def test_observer_error_inside_forward_restores_the_model():
    layer = make_layer(**CONFIGS["swiglu-E8-K2"])
    before = snapshot(layer)

    def broken(layer_name, expert_idx, projection, rows):
        raise ValueError("observer failed")

    with pytest.raises(ValueError, match="observer failed"):
        with calibrate(layer, mode="override", top_k=4, observers=[broken]):
            layer(batches(layer)[0])
    assert_unchanged(before, snapshot(layer))


def test_bad_override_top_k_installs_nothing():
    layer = make_layer(**CONFIGS["swiglu-E8-K2"])
    before = snapshot(layer)
    with pytest.raises(ValueError, match="top_k must be <= num_experts, got top_k=9"):
        with calibrate(layer, mode="override", top_k=9, observers=[StatsObserver()]):
            pass
    assert_unchanged(before, snapshot(layer))


# -- shared experts and token masks ----------------------------------------------------------------------------------

def test_shared_experts_observed():
    layer = make_layer(**CONFIGS["shared-gated-E4-K2"])
    xs = batches(layer)
    with calibrate(layer, observers=[HessianObserver(), StatsObserver()]) as session:
        for x in xs:
            layer(x)
    x_TD = torch.cat([x.reshape(-1, layer.config.dim) for x in xs])
    sh = layer.shared_experts
    h_TI = nn.functional.silu(sh.gate_proj(x_TD)) * sh.up_proj(x_TD)
    res = session.results["shared_experts"]
    assert list(res) == [0]
    assert_close(res[0]["gate_up"]["hessian"].xtx_CC, xtx(x_TD), tol=1e-5, name="shared gate_up")
    assert_close(res[0]["down"]["hessian"].xtx_CC, xtx(h_TI), tol=1e-5, name="shared down")
    assert res[0]["down"]["stats"].tokens_seen == x_TD.shape[0] == res[0]["down"]["stats"].routed_tokens
    assert session.routed_tokens["shared_experts"].tolist() == [x_TD.shape[0]]


@pytest.mark.parametrize("mode", ["all_experts", "routed"])
def test_token_mask_respected(mode):
    layer = make_layer(**CONFIGS["sigmoid-grouped-shared-E8-K2"])
    x = batches(layer, shapes=((3, 11),))[0]
    mask = torch.rand(3, 11, generator=torch.Generator().manual_seed(5)) > 0.4
    ref = layer(x, token_mask=mask)
    ref_routed_E = layer.tokens_per_expert
    with calibrate(layer, mode=mode, observers=[HessianObserver(), StatsObserver()]) as session:
        out = layer(x, mask)  # by position, too
    assert torch.equal(out, ref)
    x_TD = x.reshape(-1, layer.config.dim)
    kept_RD = x_TD[mask.reshape(-1)]
    ids_TK = layer.router(x_TD).topk_ids_TK
    assert torch.equal(session.routed_tokens["experts"], ref_routed_E)
    for e, got in session.results["experts"].items():
        rows_RD = kept_RD if mode == "all_experts" else x_TD[mask.reshape(-1) & (ids_TK == e).any(-1)]
        assert got["gate_up"]["stats"].tokens_seen == rows_RD.shape[0]
        assert_close(got["gate_up"]["hessian"].xtx_CC, xtx(rows_RD), tol=1e-5, name=f"gate_up[{e}]")
        assert_close(got["down"]["hessian"].xtx_CC, xtx(by_hand_h(layer, e, rows_RD)), tol=1e-5, name=f"down[{e}]")
    shared = session.results["shared_experts"][0]["gate_up"]
    assert shared["stats"].tokens_seen == int(mask.sum())
    assert_close(shared["hessian"].xtx_CC, xtx(kept_RD), tol=1e-5, name="shared gate_up")


def test_no_mask_after_a_masked_call():
    # A masked call followed by an unmasked one: the second call observes every token (no stale mask).
    layer = make_layer(**CONFIGS["swiglu-E8-K2"])
    x = batches(layer, shapes=((10,),))[0]
    mask = torch.arange(10) < 4
    with calibrate(layer, observers=[StatsObserver()]) as session:
        layer(x, token_mask=mask)
        layer(x)
    assert session.results["experts"][0]["gate_up"]["stats"].tokens_seen == 14


# -- the observer protocol and argument checks ------------------------------------------------------------------------

def test_custom_observer_protocol():
    layer = make_layer(**CONFIGS["shared-gated-E4-K2"])
    calls = []

    def record(layer_name, expert_idx, projection, rows):
        calls.append((layer_name, expert_idx, projection, tuple(rows.shape)))

    class RowSum:
        name = "rowsum"

        def __init__(self):
            self.sums = {}

        def __call__(self, layer_name, expert_idx, projection, rows):
            key = (layer_name, expert_idx, projection)
            self.sums[key] = self.sums.get(key, 0) + rows.sum().item()

        def results(self):
            return self.sums

    with calibrate(layer, observers=[record, RowSum()]) as session:
        layer(torch.randn(5, 16))
    hidden, shared_hidden = layer.config.hidden_dim, layer.shared_experts.down_proj.in_features
    # all_experts: every expert's gate_up (one rows tensor), then the down inputs group by group.
    expected = [("experts", e, "gate_up", (5, 16)) for e in range(4)] + [("experts", e, "down", (5, hidden))
                                                                          for e in range(4)]
    expected += [("shared_experts", 0, "gate_up", (5, 16)), ("shared_experts", 0, "down", (5, shared_hidden))]
    assert calls == expected
    assert set(session.results["experts"][2]["down"]) == {"rowsum"}


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(mode="all_expert"), ValueError, "unknown mode 'all_expert'"),
    (dict(mode="override"), ValueError, "mode='override' needs top_k"),
    (dict(mode="routed", top_k=2), ValueError, "top_k is only used with mode='override'"),
    (dict(expert_batch_size=0), ValueError, "expert_batch_size must be None or an int >= 1, got 0"),
    (dict(observers=[]), ValueError, "at least one observer"),
    (dict(observers=[3]), TypeError, "an observer must be callable"),
    (dict(observers=[HessianObserver(), HessianObserver()]), ValueError, "distinct names"),
], ids=["bad-mode", "override-no-top_k", "top_k-not-override", "batch-0", "no-observers", "not-callable",
        "duplicate-names"])
def test_argument_errors(kwargs, error, match):
    layer = make_layer(**CONFIGS["swiglu-E8-K2"])
    kwargs = {"observers": [StatsObserver()], **kwargs}
    with pytest.raises(error, match=match):
        calibrate(layer, **kwargs)


def test_model_without_experts_module():
    with pytest.raises(ValueError, match=r"no experts module in Sequential.*leanmoe.hf.patch"):
        with calibrate(nn.Sequential(nn.Linear(4, 4)), observers=[StatsObserver()]):
            pass


def test_expert_parallel_layer_is_refused():
    # An expert-parallel dispatcher hands the experts module rows from other ranks, not this layer's tokens.
    class OtherDispatcher(leanmoe.LocalDispatcher):
        pass

    layer = make_layer(**CONFIGS["swiglu-E8-K2"])
    layer.dispatcher = OtherDispatcher()
    before = snapshot(layer)
    with pytest.raises(NotImplementedError, match="'experts': calibration needs the local dispatcher, got Other"):
        with calibrate(layer, observers=[StatsObserver()]):
            pass
    assert_unchanged(before, snapshot(layer))


def test_session_is_entered_once():
    layer = make_layer(**CONFIGS["swiglu-E8-K2"])
    session = calibrate(layer, observers=[StatsObserver()])
    with session:
        pass
    with pytest.raises(RuntimeError, match="entered once"):
        with session:
            pass


def test_hessian_observer_offloads_to_cpu_and_deepcopies():
    layer = make_layer(**CONFIGS["swiglu-E8-K2"])
    obs = HessianObserver(device="cpu")
    with calibrate(layer, observers=[obs]) as session:
        layer(torch.randn(6, 32))
    h = session.results["experts"][0]["gate_up"]["hessian"]
    assert h.xtx_CC.device.type == "cpu" and h.nsamples == 6
    copy.deepcopy(session.results)  # plain tensors and dataclasses: safe to keep or save


def test_observers_accumulate_across_sessions_and_inference_mode():
    # One observer pair over three sessions, the middle one outside inference mode: the sums are normal tensors.
    layer = make_layer(**CONFIGS["swiglu-E8-K2"])
    hess, stats = HessianObserver(), StatsObserver()
    xs = batches(layer, shapes=((5,), (6,), (7,)))
    for i, x in enumerate(xs):
        with (torch.inference_mode() if i != 1 else torch.no_grad()), calibrate(layer, observers=[hess, stats]):
            layer(x)
    x_TD = torch.cat(xs)
    got = hess.results()[("experts", 4, "gate_up")]
    assert got.nsamples == 18 and stats.results()[("experts", 4, "down")].tokens_seen == 18
    assert_close(got.xtx_CC, xtx(x_TD), tol=1e-5, name="gate_up[4]")


def test_hessian_observer_reuses_a_product_only_for_unmodified_rows():
    # all_experts hands every expert the same x tensor; its XᵀX is reused, unless the tensor changed in place.
    obs = HessianObserver()
    rows = torch.randn(6, 4)
    obs("layer", 0, "gate_up", rows)
    obs("layer", 1, "gate_up", rows)
    rows.mul_(2)
    obs("layer", 2, "gate_up", rows)
    res = obs.results()
    assert_close(res[("layer", 1, "gate_up")].xtx_CC, xtx(rows / 2), tol=1e-6, name="reused")
    assert_close(res[("layer", 2, "gate_up")].xtx_CC, xtx(rows), tol=1e-6, name="after an in-place change")


@pytest.mark.gpu
def test_peak_cuda_memory_scales_with_expert_batch_size():
    # The allocator's own peak, not the session's accounting. Each expert of a group holds gate_up [T, 2I] and
    # h [T, I] plus the activation's [T, I] temporary (silu(g) before the product): 24 to 32 MiB here, fp32. The
    # Hessians live on the CPU. Small groups hide under the plain forward's own peak, so large ones are compared.
    cfg = dict(dim=256, hidden_dim=512, num_experts=32, top_k=2)
    T = 4096
    per_expert = T * 3 * cfg["hidden_dim"] * 4  # gate_up + h
    torch.manual_seed(0)
    layer = leanmoe.MoE(leanmoe.MoEConfig(**cfg), device="cuda")
    x = torch.randn(T, cfg["dim"], device="cuda")

    def extra_peak(B):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        with torch.no_grad():
            if B == 0:
                layer(x)
            else:
                with calibrate(layer, observers=[HessianObserver(device="cpu")], expert_batch_size=B):
                    layer(x)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base

    extra_peak(0)  # warm-up: cuBLAS workspaces and the allocator's first blocks
    plain = extra_peak(0)
    extra = {B: extra_peak(B) - plain for B in (4, 8, 16, 32)}
    slope = (extra[32] - extra[16]) / 16
    assert per_expert <= slope <= 1.5 * per_expert, slope / per_expert
    assert extra[16] - extra[8] == pytest.approx(8 * slope, rel=0.05), {B: e / per_expert for B, e in extra.items()}
    assert extra[8] - extra[4] == pytest.approx(4 * slope, rel=0.05), {B: e / per_expert for B, e in extra.items()}


@pytest.mark.parametrize("mode", ["all_experts", "routed"])
def test_out_of_range_ids_are_no_routed_slot(mode):
    # A Hugging Face experts module under its own expert parallelism marks slots of experts held elsewhere with the
    # sentinel E; such slots (and negative ids) count for no expert and give routed mode no rows.
    inner = make_layer(**CONFIGS["swiglu-E8-K2"]).experts

    class SentinelExperts(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = inner

        def expert_weights(self):
            return self.inner.expert_weights()

        def forward(self, x_TD, topk_ids_TK, topk_weights_TK):
            return torch.zeros_like(x_TD)

    model = nn.Sequential(SentinelExperts())
    x_TD = torch.randn(4, 32, generator=torch.Generator().manual_seed(3))
    # Token 0: experts 2 and 8 (sentinel); token 1: -1 and 2; token 2: 5, 2; token 3: 8, 8.
    ids_TK = torch.tensor([[2, 8], [-1, 2], [5, 2], [8, 8]])
    calls = []
    with calibrate(model, mode=mode, observers=[lambda *a: calls.append((a[1], a[2], a[3]))]) as session:
        model[0](x_TD, ids_TK, torch.ones(4, 2))
    assert session.routed_tokens["0"].tolist() == [0, 0, 3, 0, 0, 1, 0, 0]
    gate_up = {e: rows for e, projection, rows in calls if projection == "gate_up"}
    if mode == "all_experts":
        assert sorted(gate_up) == list(range(8)) and all(torch.equal(r, x_TD) for r in gate_up.values())
    else:  # only the in-range slots, each expert's tokens in token order; the other experts see no rows
        assert torch.equal(gate_up[2], x_TD[[0, 1, 2]]) and torch.equal(gate_up[5], x_TD[[2]])
        assert [e for e, rows in gate_up.items() if rows.shape[0]] == [2, 5]
