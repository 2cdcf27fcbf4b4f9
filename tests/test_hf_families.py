"""Each supported transformers MoE family, patched onto leanmoe, against the same model on transformers' eager experts.

Tiny configs (``leanmoe.bench.hf.TINY_SHAPES``: 2 layers, D=32, 4-8 experts), built offline, fp32 unless stated.
Every test runs the *same* model (same tensors) unpatched and patched, so any difference is the expert compute.
Weights use ``initializer_range=0.1`` (not 0.02) and random biases / correction biases so that experts, biases and
grouped routing move the logits well beyond the tolerance.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch

pytest.importorskip("transformers")

import leanmoe.hf  # noqa: E402
from leanmoe.bench.hf import BENCH_MODEL_TYPES, build_model, model_config  # noqa: E402
from leanmoe.experts.functional import moe_experts  # noqa: E402
from tests.helpers import TOLERANCES, assert_close  # noqa: E402

FAMILIES = list(BENCH_MODEL_TYPES)  # mixtral, qwen2_moe, qwen3_moe, olmoe, deepseek_v3, gpt_oss, llama4_text
#: The triton backend runs on CPU tensors only in the Triton interpreter (conftest sets TRITON_INTERPRET=1 first),
#: seconds per model: its gradients are checked on the families whose expert layout differs most (biases,
#: interleaved and transposed weights, clamped SwiGLU: gpt-oss; inputs scaled before the experts, K=1, transposed
#: weights: Llama 4; shared expert behind a sigmoid gate: Qwen2-MoE) rather than on all seven.
CPU_BACKENDS = ["reference", "grouped_mm", pytest.param("triton", marks=pytest.mark.slow)]
TRITON_GRAD_FAMILIES = ("gpt_oss", "llama4_text", "qwen2_moe")
BF16_TOL = 3e-2


def tiny_model(model_type: str, *, dtype=torch.float32, device="cpu", layers: int = 2, seed: int = 0, **overrides):
    model = build_model(model_config(model_type, layers=layers, tiny=True, **overrides), device=device, dtype=dtype,
                        seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if "e_score_correction_bias" in name:  # DeepSeek-V3: zero at init; random so it changes the choice
                buf.copy_(torch.rand(buf.shape, generator=gen) - 0.5)
        for name, p in model.named_parameters():
            if name.endswith("bias") or name.endswith("_bias"):  # gpt-oss expert and router biases
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model


def tokens(batch: int = 2, seq: int = 9, vocab: int = 128, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def backend_runs(backend: str) -> None:
    if backend == "triton":
        pytest.importorskip("triton")
        if os.environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("triton on CPU tensors needs TRITON_INTERPRET=1 before triton is imported")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("model_type", FAMILIES)
def test_logits_match_eager(model_type, backend):
    backend_runs(backend)
    model = tiny_model(model_type)
    ids = tokens()
    with torch.no_grad():
        ref = model(ids).logits
        leanmoe.hf.patch(model, backend=backend)
        out = model(ids).logits
    assert_close(out, ref, tol=1e-5, name=f"{model_type} logits, backend {backend}")


@pytest.mark.parametrize("backend", ["grouped_mm", "reference"])
@pytest.mark.parametrize("model_type", FAMILIES)
def test_logits_match_eager_bf16(model_type, backend):
    model = tiny_model(model_type, dtype=torch.bfloat16)
    ids = tokens()
    with torch.no_grad():
        ref = model(ids).logits
        leanmoe.hf.patch(model, backend=backend)
        out = model(ids).logits
    assert_close(out, ref, tol=BF16_TOL, name=f"{model_type} bf16 logits, backend {backend}")


def _grads(model, ids) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    model(ids, labels=ids).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("model_type", FAMILIES)
def test_gradients_match_eager(model_type, backend):
    backend_runs(backend)
    if backend == "triton" and model_type not in TRITON_GRAD_FAMILIES:
        pytest.skip(f"triton gradients in the interpreter are checked on {TRITON_GRAD_FAMILIES} only (CPU time)")
    model = tiny_model(model_type)
    ids = tokens()
    ref = _grads(model, ids)
    leanmoe.hf.patch(model, backend=backend)
    out = _grads(model, ids)
    assert out.keys() == ref.keys()
    # Every routed-expert parameter and the router get a gradient (the routing weights are differentiated).
    assert any("experts" in n for n in ref) and any(("gate" in n or "router" in n) and "experts" not in n for n in ref)
    for name in ref:
        assert_close(out[name], ref[name], tol=TOLERANCES[torch.float32] * 5, name=f"{model_type} d{name}")


@pytest.mark.parametrize("model_type", FAMILIES)
def test_adamw_tracks_eager(model_type):
    ref_model = tiny_model(model_type)
    model = copy.deepcopy(ref_model)
    leanmoe.hf.patch(model, backend="grouped_mm")
    losses = {}
    for tag, m in (("ref", ref_model), ("out", model)):
        # eps=1e-6, not the default 1e-8: an expert that no token chose has router-row gradients that are zero
        # mathematically (top-k renormalised softmax) and ~1e-10 of fp32 rounding noise in practice, which differs
        # between any two correct implementations. Adam's g / (sqrt(v) + eps) turns that noise into steps of ~lr
        # when eps is far below it (relative RMS errors of 1e-3 on Qwen3-MoE's router, while every real gradient
        # agrees to 1e-7). With eps=1e-6 the noise moves nothing and real gradients (~1e-2) still drive Adam.
        opt = torch.optim.AdamW(m.parameters(), lr=1e-2, eps=1e-6)
        losses[tag] = []
        ids = tokens()
        for _ in range(4):
            loss = m(ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses[tag].append(loss.item())
    assert losses["ref"][-1] < losses["ref"][0], "the eager model should learn on a repeated batch"
    torch.testing.assert_close(torch.tensor(losses["out"]), torch.tensor(losses["ref"]), rtol=1e-4, atol=0)
    for (name, p), (_, q) in zip(model.named_parameters(), ref_model.named_parameters(), strict=True):
        rms = ((p.detach() - q.detach()).norm() / q.detach().norm()).item()
        assert rms < 1e-4, f"{model_type} {name} after 4 AdamW steps: relative RMS error {rms:.2e}"


@pytest.mark.parametrize("model_type", FAMILIES)
def test_generate_greedy_same_tokens(model_type):
    model = tiny_model(model_type).eval()
    ids = tokens(batch=2, seq=5)
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)
    ref = model.generate(ids, **kwargs)
    leanmoe.hf.patch(model)
    out = model.generate(ids, **kwargs)
    assert ref.shape == (2, 13)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_unpatch_restores_and_no_weight_copies(model_type):
    model = tiny_model(model_type)
    ids = tokens()
    ptrs = {n: p.data_ptr() for n, p in model.named_parameters()}
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    forwards = {n: m.__dict__.get("forward") for n, m in model.named_modules()}
    with torch.no_grad():
        ref = model(ids).logits

    assert leanmoe.hf.patch(model) is model and leanmoe.hf.is_patched(model)
    assert {k: v.shape for k, v in model.state_dict().items()} == shapes
    assert {n: p.data_ptr() for n, p in model.named_parameters()} == ptrs
    model(ids, labels=ids).loss.backward()  # a training step's forward and backward touch no parameter storage
    assert {n: p.data_ptr() for n, p in model.named_parameters()} == ptrs

    assert leanmoe.hf.unpatch(model) is model and not leanmoe.hf.is_patched(model)
    assert {n: m.__dict__.get("forward") for n, m in model.named_modules()} == forwards
    assert not any("_leanmoe_patch" in m.__dict__ or "expert_weights" in m.__dict__ for m in model.modules())
    assert {n: p.data_ptr() for n, p in model.named_parameters()} == ptrs
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref)  # bitwise: the eager experts run again


@pytest.mark.parametrize("model_type", FAMILIES)
def test_experts_module_protocol(model_type):
    """Patched experts are leanmoe experts modules: ``forward(x, ids, w)`` and ``expert_weights()`` views."""
    model = tiny_model(model_type)
    leanmoe.hf.patch(model, backend="grouped_mm")
    experts = leanmoe.hf.experts_modules(model)
    assert len(experts) == 2  # every tiny layer is an MoE layer
    gen = torch.Generator().manual_seed(0)
    for name, module in experts:
        w = module.expert_weights()
        params = {p.untyped_storage().data_ptr() for p in module.parameters(recurse=False)}
        for t in (w.gate_up_proj, w.down_proj, w.gate_up_bias, w.down_bias):
            assert t is None or t.untyped_storage().data_ptr() in params, f"{name}: a weight view is a copy"
        E, N, D = w.gate_up_proj.shape
        x_TD = torch.randn(7, D, generator=gen)
        ids_TK = torch.randint(0, E, (7, 2), generator=gen)
        weights_TK = torch.rand(7, 2, generator=gen)
        ref = moe_experts(x_TD, ids_TK, weights_TK, w.gate_up_proj, w.down_proj, w.gate_up_bias, w.down_bias,
                          activation=w.activation, gate_up_layout=w.gate_up_layout, backend="reference")
        assert_close(module(x_TD, ids_TK, weights_TK), ref, tol=1e-5, name=f"{name} protocol forward")

    calls = []
    handles = [m.register_forward_hook(lambda mod, args, out: calls.append(args[0].shape)) for _, m in experts]
    with torch.no_grad():
        model(tokens())
    for h in handles:
        h.remove()
    assert len(calls) == 2, "forward hooks on patched experts fire once per MoE layer"


@pytest.mark.parametrize("model_type", FAMILIES)
def test_router_top_k_attr(model_type):
    """``router_top_k_attr`` finds the K the router reads: raising it changes routing, patched and not alike."""
    model = tiny_model(model_type)
    leanmoe.hf.patch(model)
    patched = {id(m) for _, m in leanmoe.hf.experts_modules(model)}
    blocks = [m for m in model.modules() if id(getattr(m, "experts", None)) in patched]
    assert len(blocks) == 2
    ids = tokens()
    with torch.no_grad():
        before = model(ids).logits
        for block in blocks:
            router, attr = leanmoe.hf.router_top_k_attr(block)
            assert getattr(router, attr) == model.config.num_experts_per_tok
            setattr(router, attr, getattr(router, attr) + 1)  # still valid for every tiny config (DeepSeek: <= 4)
        out = model(ids).logits
        leanmoe.hf.unpatch(model)
        ref = model(ids).logits
    assert (out - before).abs().max() > 1e-3, "top_k + 1 should change the output"
    assert_close(out, ref, tol=1e-5, name=f"{model_type} logits with top_k + 1")


@pytest.mark.parametrize("model_type", FAMILIES)
def test_save_pretrained_loads_in_plain_transformers(model_type, tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_model(model_type)
    keys = set(model.state_dict())
    leanmoe.hf.patch(model)
    ids = tokens()
    with torch.no_grad():
        out = model(ids).logits
    model.save_pretrained(tmp_path)
    assert "leanmoe" not in (tmp_path / "config.json").read_text()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, experts_implementation="eager")
    assert not leanmoe.hf.is_patched(loaded)
    assert set(loaded.state_dict()) == keys
    for name, t in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], t), name
    with torch.no_grad():
        assert_close(loaded(ids).logits, out, tol=1e-5, name=f"{model_type} reloaded logits")


def test_transposed_weight_views_are_not_copied():
    """gpt-oss and Llama 4 store ``[E, D, 2I]``; leanmoe reads the transposed view (non-contiguous) as is."""
    for model_type in ("gpt_oss", "llama4_text"):
        model = tiny_model(model_type)
        leanmoe.hf.patch(model)
        for _, module in leanmoe.hf.experts_modules(model):
            w = module.expert_weights()
            assert not w.gate_up_proj.is_contiguous() and not w.down_proj.is_contiguous()
            assert w.gate_up_proj.data_ptr() == module.gate_up_proj.data_ptr()


@pytest.mark.gpu
@pytest.mark.parametrize("model_type", FAMILIES)
def test_gpu_fp32_auto_matches_eager(model_type):
    """On the GPU in fp32 with backend="auto", two layers: the second layer routes on the first one's output, so
    tight logits mean the whole stack matches."""
    model = tiny_model(model_type, device="cuda")
    ids = tokens().cuda()
    with torch.no_grad():
        ref = model(ids).logits
        leanmoe.hf.patch(model, backend="auto")
        out = model(ids).logits
    assert_close(out, ref, tol=1e-5, name=f"{model_type} fp32 logits")


@pytest.mark.gpu
@pytest.mark.parametrize("model_type", FAMILIES)
def test_gpu_bf16_auto_matches_eager(model_type):
    """On the GPU in bf16 with backend="auto" (the fastest): logits and gradients against eager experts.

    One MoE layer: its router sees bit-identical inputs in both runs. With a second layer, a bf16 rounding
    difference in the first layer's output can flip the second layer's expert choice for a token (the tiny
    DeepSeek-V3 model, with its random correction bias, does so), which changes that token's logits wholesale."""
    model = tiny_model(model_type, dtype=torch.bfloat16, device="cuda", layers=1)
    ids = tokens().cuda()
    with torch.no_grad():
        ref = model(ids).logits
    ref_grads = _grads(model, ids)
    leanmoe.hf.patch(model, backend="auto")
    with torch.no_grad():
        out = model(ids).logits
    out_grads = _grads(model, ids)
    assert_close(out.float(), ref.float(), tol=BF16_TOL, name=f"{model_type} bf16 logits")
    for name in ref_grads:
        # bf16 gradients of tiny tensors: compare by relative RMS, looser than logits.
        ref_g, out_g = ref_grads[name].double(), out_grads[name].double()
        rms = ((out_g - ref_g).norm() / ref_g.norm().clamp_min(1e-30)).item()
        assert rms < 6e-2, f"{model_type} d{name}: relative RMS error {rms:.2e}"
