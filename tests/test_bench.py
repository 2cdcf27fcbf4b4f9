"""leanmoe.bench: presets, FLOP counts, routing generators and the chunked fp32 reference check.

Legend: T tokens, D model dim, I expert hidden dim, E experts, K top-k.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from leanmoe import Activation
from leanmoe.bench import (
    DEFAULT_PRESET,
    PRESETS,
    cpu_scaled,
    flops,
    get_preset,
    make_case,
    make_routing,
    reference_errors,
    router_logits,
)
from leanmoe.bench.harness import make_token_mask, run_once, worst_error

CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_thread")

# The table of docs/BENCHMARK_PROTOCOL.md: D, I, E, K, T train, T decode.
PROTOCOL = {
    "qwen3-30b-a3b": (2048, 768, 128, 8, 16384, 64),
    "olmoe-1b-7b": (2048, 1024, 64, 8, 16384, 64),
    "gpt-oss-20b": (2880, 2880, 32, 4, 16384, 64),
    "gpt-oss-20b-native": (2880, 2880, 32, 4, 16384, 64),
    "mixtral-8x7b": (4096, 14336, 8, 2, 16384, 64),
    "deepseek-v3": (7168, 2048, 256, 8, 4096, 64),
}


def test_presets_match_the_protocol():
    assert DEFAULT_PRESET == "qwen3-30b-a3b"
    assert set(PRESETS) == set(PROTOCOL)
    for name, dims in PROTOCOL.items():
        p = PRESETS[name]
        assert (p.dim, p.hidden_dim, p.num_experts, p.top_k, p.train_tokens, p.decode_tokens) == dims, name
        assert p.label == name


def test_gpt_oss_is_measured_plain_and_in_its_own_form():
    plain, native = PRESETS["gpt-oss-20b"], PRESETS["gpt-oss-20b-native"]
    assert (plain.activation.name, plain.gate_up_layout, plain.bias) == ("swiglu", "concatenated", False)
    assert native.activation == Activation(name="clamped_swiglu", alpha=1.702, limit=7.0)
    assert (native.gate_up_layout, native.bias) == ("interleaved", True)
    for name, p in PRESETS.items():
        if name != "gpt-oss-20b-native":
            assert (p.activation.name, p.gate_up_layout, p.bias) == ("swiglu", "concatenated", False), name


def test_cpu_scaled_keeps_the_form_and_says_so():
    scaled = cpu_scaled(PRESETS["gpt-oss-20b-native"])
    assert scaled.label == "gpt-oss-20b-native (CPU-scaled)"
    assert (scaled.dim, scaled.hidden_dim, scaled.num_experts, scaled.top_k) == (256, 128, 16, 4)
    assert (scaled.activation, scaled.gate_up_layout, scaled.bias) == (PRESETS["gpt-oss-20b-native"].activation,
                                                                       "interleaved", True)
    # Mixtral is already under the caps in E and K: they stay.
    mixtral = cpu_scaled(PRESETS["mixtral-8x7b"])
    assert (mixtral.num_experts, mixtral.top_k) == (8, 2)


def test_get_preset_names_the_choices():
    with pytest.raises(ValueError, match="unknown preset 'nope'.*qwen3-30b-a3b"):
        get_preset("nope")


def test_flop_formula():
    qwen = PRESETS["qwen3-30b-a3b"]
    assert flops(qwen, 16384, "fwd") == 6 * 16384 * 8 * 2048 * 768
    assert flops(qwen, 16384, "fwdbwd") == 3 * 6 * 16384 * 8 * 2048 * 768
    non_gated = dataclasses.replace(qwen, activation=Activation(name="relu2"))
    assert flops(non_gated, 10, "fwd") == 4 * 10 * 8 * 2048 * 768
    with pytest.raises(ValueError, match="unknown mode 'bwd'"):
        flops(qwen, 1, "bwd")


def test_expert_bytes_count_weights_and_biases():
    native = PRESETS["gpt-oss-20b-native"]
    D, hidden = native.dim, native.hidden_dim
    assert native.expert_bytes(2) == 2 * (2 * hidden * D + D * hidden + 2 * hidden + D)
    assert PRESETS["gpt-oss-20b"].expert_bytes(2) == 2 * 3 * hidden * D


def test_uniform_routing_is_the_protocol_and_reproducible():
    T, E, K = 512, 16, 4
    ids_TK, weights_TK = make_routing(T, E, K, "uniform", seed=3)
    assert ids_TK.shape == weights_TK.shape == (T, K) and ids_TK.dtype == torch.int64
    torch.testing.assert_close(weights_TK.sum(-1), torch.ones(T))
    assert ((ids_TK >= 0) & (ids_TK < E)).all()
    assert all(len(set(row.tolist())) == K for row in ids_TK), "a token's K experts are distinct"
    # Softmax over all experts, top-k, renormalised: the same as doing it by hand from the logits.
    probs_TE = torch.softmax(router_logits(T, E, "uniform", seed=3), -1)
    top_TK, top_ids_TK = probs_TE.topk(K, -1)
    assert torch.equal(ids_TK, top_ids_TK)
    torch.testing.assert_close(weights_TK, top_TK / top_TK.sum(-1, keepdim=True))
    again = make_routing(T, E, K, "uniform", seed=3)
    assert torch.equal(again[0], ids_TK) and torch.equal(again[1], weights_TK)
    assert not torch.equal(make_routing(T, E, K, "uniform", seed=4)[0], ids_TK)


def test_skewed_routing_is_skewed():
    T, E, K = 4096, 16, 2
    uniform_E = torch.bincount(make_routing(T, E, K, "uniform")[0].flatten(), minlength=E).float()
    skewed_E = torch.bincount(make_routing(T, E, K, "skewed")[0].flatten(), minlength=E).float()
    assert uniform_E.max() / uniform_E.min() < 1.5
    # log(1/(e+1)) offsets: expert 0 is far busier than the last one, and load falls with the index.
    assert skewed_E[0] > 5 * skewed_E[-1]
    assert skewed_E[:4].sum() > 2 * skewed_E[-4:].sum()
    torch.testing.assert_close(make_routing(8, E, K, "skewed")[1].sum(-1), torch.ones(8))
    diff_TE = router_logits(8, E, "skewed") - router_logits(8, E, "uniform")
    torch.testing.assert_close(diff_TE[0], torch.log(1 / (torch.arange(E) + 1.0)))


def test_unknown_routing():
    with pytest.raises(ValueError, match="unknown routing 'zipf'"):
        make_routing(4, 4, 2, "zipf")


@pytest.mark.parametrize("preset_name", ["qwen3-30b-a3b", "gpt-oss-20b-native"])
@pytest.mark.parametrize("chunk_bytes", [1, 1 << 30], ids=["chunk1expert", "onechunk"])
def test_reference_check_passes_a_correct_backend_and_catches_a_wrong_gradient(preset_name, chunk_bytes):
    small = dataclasses.replace(cpu_scaled(PRESETS[preset_name]), dim=32, hidden_dim=16, num_experts=6, top_k=2)
    case = make_case(small, "skewed", 40, dtype=torch.float32, device=CPU, seed=1)
    outs = run_once(case, "grouped_mm", "fwdbwd", 0)
    errors = reference_errors(case, outs, chunk_bytes=chunk_bytes)
    expected = {"out", "grad_x", "grad_topk_weights", "grad_gate_up_proj", "grad_down_proj"}
    if small.bias:
        expected |= {"grad_gate_up_bias", "grad_down_bias"}
    assert set(errors) == expected
    assert worst_error(errors)[1] < 1e-5, errors

    # A 1e-2 relative error in one expert's slice of one gradient shows up, under that gradient's name.
    outs["grad_down_proj"] = outs["grad_down_proj"].clone()
    outs["grad_down_proj"][3] *= 1.5
    errors = reference_errors(case, outs, chunk_bytes=chunk_bytes)
    name, worst = worst_error(errors)
    assert name == "grad_down_proj" and worst > 1e-2


def test_reference_check_treats_nan_as_the_worst():
    case = make_case(cpu_scaled(PRESETS["qwen3-30b-a3b"]), "uniform", 8, dtype=torch.float32, device=CPU)
    outs = run_once(case, "grouped_mm", "fwd", 0)
    outs["out"][0, 0] = float("nan")
    name, worst = worst_error(reference_errors(case, outs))
    assert name == "out" and math.isnan(worst)


def test_token_mask_masks_the_floor_of_the_fraction_reproducibly():
    keep_T = make_token_mask(10, 0.55, seed=2)
    assert keep_T.dtype == torch.bool and keep_T.shape == (10,) and int((~keep_T).sum()) == 5
    assert torch.equal(make_token_mask(10, 0.55, seed=2), keep_T)
    assert not torch.equal(make_token_mask(10, 0.55, seed=3), keep_T)
    assert make_token_mask(10, 0.0) is None and make_token_mask(1, 0.9) is None  # floor: nothing to mask
    for bad in (1.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match=r"mask_fraction must be in \[0, 1\)"):
            make_token_mask(10, bad)


@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
def test_reference_check_applies_the_mask(mode):
    small = dataclasses.replace(cpu_scaled(PRESETS["qwen3-30b-a3b"]), dim=32, hidden_dim=16, num_experts=6, top_k=2)
    case = make_case(small, "uniform", 24, dtype=torch.float32, device=CPU, seed=1, mask_fraction=0.5)
    assert int(case.token_mask_T.sum()) == case.kept_tokens == 12
    outs = run_once(case, "reference", mode, 0)
    assert worst_error(reference_errors(case, outs))[1] < 1e-5
    keep_T = case.token_mask_T
    assert torch.equal(outs["out"][~keep_T], torch.zeros_like(outs["out"][~keep_T]))
    # The masked tokens' outputs of an unmasked call are wrong under the mask: the check sees them.
    unmasked = dataclasses.replace(case, token_mask_T=None)
    outs = run_once(unmasked, "reference", mode, 0)
    errors = reference_errors(case, outs)
    # Masked rows hold NaN (padding garbage): computed and then dropped, they would still poison the result.
    assert torch.isnan(case.x_TD[~keep_T]).all() and not torch.isnan(case.x_TD[keep_T]).any()
    assert not errors["out"] <= 0.1  # NaN fails too
    if mode == "fwdbwd":  # and the gradients that masked tokens fed
        for name in ("grad_x", "grad_topk_weights", "grad_down_proj"):
            assert not errors[name] <= 0.01, name


# ------------------------------------------------------------------------------------------------- LoRA rows


def _lora_case(mask_fraction: float = 0.0):
    from leanmoe.bench.lora import make_lora

    small = dataclasses.replace(cpu_scaled(PRESETS["qwen3-30b-a3b"]), dim=32, hidden_dim=16, num_experts=5, top_k=2)
    case = make_case(small, "uniform", 24, dtype=torch.float32, device=CPU, seed=3, mask_fraction=mask_fraction)
    for t in case.params().values():
        t.requires_grad_(False)
    return case, make_lora(case, 4, seed=3)


def test_make_lora_is_seeded_with_a_nonzero_b():
    from leanmoe.bench.lora import make_lora

    case, lora = _lora_case()
    assert (lora.rank, lora.alpha, lora.targets) == (4, 8.0, ("gate_up", "down"))
    again = make_lora(case, 4, seed=3)
    for name, p in lora.named_parameters():
        assert p.dtype == case.x_TD.dtype and p.requires_grad, name
        assert torch.equal(p, dict(again.named_parameters())[name]), name
    for target in lora.targets:
        A, B = lora.factors(target)
        assert A.abs().max() <= A.shape[-1] ** -0.5
        assert B.abs().min() > 0 and B.std().item() == pytest.approx(0.1 / 2, rel=0.3)
    assert not torch.equal(make_lora(case, 4, seed=4).down_B, lora.down_B)


@pytest.mark.parametrize("mask_fraction", [0.0, 0.5])
@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
def test_lora_reference_check_passes_grouped_mm_and_catches_a_wrong_factor_gradient(mode, mask_fraction):
    from leanmoe.bench.lora import lora_reference_errors, run_lora_once

    case, lora = _lora_case(mask_fraction)
    outs = run_lora_once(case, "grouped_mm", lora, mode, 0)
    errors = lora_reference_errors(case, lora, outs)
    expected = {"out"} | ({"grad_x", "grad_topk_weights", "grad_gate_up_A", "grad_gate_up_B", "grad_down_A",
                           "grad_down_B"} if mode == "fwdbwd" else set())
    assert set(errors) == expected and worst_error(errors)[1] < 1e-5
    assert all(p.grad is None for p in lora.parameters())  # cleared after the call
    # The adapter matters: the same call without it is far from the reference with it.
    plain = run_lora_once(case, "grouped_mm", None, mode, 0)
    assert not lora_reference_errors(case, lora, {**outs, "out": plain["out"]})["out"] <= 1e-2
    if mode == "fwdbwd":
        for name in ("grad_gate_up_B", "grad_down_A"):
            wrong = lora_reference_errors(case, lora, {**outs, name: outs[name] * 1.01})
            assert wrong[name] == pytest.approx(0.01, rel=1e-3)
            assert worst_error(wrong)[0] == name


def test_lora_baseline_check_has_no_factor_gradients():
    from leanmoe.bench.lora import baseline_backend, lora_reference_errors, run_lora_once

    case, _ = _lora_case()
    backend = baseline_backend(case, "fwdbwd", 0)
    assert backend != "triton"  # on the CPU triton runs only in its interpreter
    outs = run_lora_once(case, backend, None, "fwdbwd", 0)
    errors = lora_reference_errors(case, None, outs)
    assert set(errors) == {"out", "grad_x", "grad_topk_weights"} and worst_error(errors)[1] < 1e-5
    assert all(t.grad is None for t in case.params().values())  # the base stays frozen


def test_time_interleaved_runs_each_variant_in_turn_every_round(monkeypatch):
    from leanmoe.bench import harness

    order, cleared = [], []

    def fake_time_ms(fn, device, grad_to_none=None):
        cleared.append(grad_to_none)
        return fn()

    monkeypatch.setattr(harness, "time_ms", fake_time_ms)
    times = {"a": iter([3.0, 1.0, 2.0]), "b": iter([5.0, 4.0, 6.0])}
    grads = [torch.zeros(1)]

    def setup(name):
        def variant():
            order.append(name)
            return (lambda: next(times[name])), grads if name == "a" else None
        return variant

    ms, runs = harness.time_interleaved({"a": setup("a"), "b": setup("b")}, torch.device("cpu"), rounds=3)
    assert order == ["a", "b"] * 3  # set up again before each of its runs, in turn
    assert runs == {"a": [3.0, 1.0, 2.0], "b": [5.0, 4.0, 6.0]} and ms == {"a": 2.0, "b": 5.0}
    assert cleared == [grads, None] * 3
