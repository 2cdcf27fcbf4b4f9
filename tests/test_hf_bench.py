"""``leanmoe.bench.hf.run_hf_bench`` on tiny shapes: rows, verification, JSON (real shapes run on the GPU only)."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")

from leanmoe.bench.hf import BENCH_MODEL_TYPES, model_config, run_hf_bench  # noqa: E402

ROW_KEYS = {"model_type", "implementation", "mode", "ms", "peak_mem_mb", "ok"}


@pytest.mark.parametrize("model_type, implementations", [
    ("qwen3_moe", ["eager", "grouped_mm", "batched_mm", "leanmoe:auto"]),
    ("llama4_text", ["eager", "leanmoe:auto"]),  # Llama 4 has no transformers experts interface
])
def test_run_hf_bench_cpu_tiny(model_type, implementations, tmp_path):
    path = tmp_path / "bench.json"
    rows = run_hf_bench(model_type, device="cpu", dtype=torch.float32, tokens=16, layers=1, json_path=path,
                        config_overrides={"tiny": True})
    assert all(ROW_KEYS <= row.keys() for row in rows)
    assert [(r["implementation"], r["mode"]) for r in rows] == [(i, m) for i in implementations
                                                               for m in ("train", "prefill")]
    assert all(r["ok"] and r["ms"] > 0 and r["peak_mem_mb"] is None and r["model_type"] == model_type for r in rows)
    assert rows[-1]["note"] == "auto -> grouped_mm"
    saved = json.loads(path.read_text())
    assert saved["rows"] == rows and saved["env"]["transformers"]


def test_save_percent_reaches_the_patched_experts(monkeypatch):
    import leanmoe.hf

    seen = []
    patch = leanmoe.hf.patch

    def spy(model, backend="auto", *, save_percent=0):
        seen.append(save_percent)
        return patch(model, backend, save_percent=save_percent)

    monkeypatch.setattr(leanmoe.hf, "patch", spy)
    rows = run_hf_bench("olmoe", device="cpu", dtype=torch.float32, tokens=8, layers=1, save_percent=37.5,
                        config_overrides={"tiny": True})
    assert all(r["ok"] for r in rows)
    assert seen and set(seen[1:]) == {37.5}  # the first patch only asks which backend auto takes


def test_real_shapes_are_the_published_ones():
    """No weights are built: the configs alone carry the flagship checkpoints' layer shapes."""
    olmoe = model_config("olmoe", layers=2)
    assert (olmoe.hidden_size, olmoe.intermediate_size, olmoe.num_experts, olmoe.num_experts_per_tok) == \
        (2048, 1024, 64, 8)
    mixtral = model_config("mixtral", layers=2)
    assert (mixtral.hidden_size, mixtral.intermediate_size, mixtral.num_local_experts,
            mixtral.num_experts_per_tok) == (4096, 14336, 8, 2)
    qwen3 = model_config("qwen3_moe", layers=2)
    assert (qwen3.hidden_size, qwen3.moe_intermediate_size, qwen3.num_experts, qwen3.num_experts_per_tok) == \
        (2048, 768, 128, 8)
    deepseek = model_config("deepseek_v3", layers=1)
    assert (deepseek.hidden_size, deepseek.moe_intermediate_size, deepseek.n_routed_experts, deepseek.n_group,
            deepseek.topk_group, deepseek.first_k_dense_replace) == (7168, 2048, 256, 8, 4, 0)  # all layers MoE
    gpt_oss = model_config("gpt_oss", layers=2)
    assert (gpt_oss.hidden_size, gpt_oss.intermediate_size, gpt_oss.num_local_experts) == (2880, 2880, 128)
    llama4 = model_config("llama4_text", layers=2)
    assert (llama4.hidden_size, llama4.intermediate_size, llama4.num_local_experts, llama4.num_experts_per_tok,
            llama4.moe_layers) == (5120, 8192, 16, 1, [0, 1])
    with pytest.raises(ValueError, match="no bench shapes for model type 'llama'"):
        model_config("llama", layers=1)
    assert set(BENCH_MODEL_TYPES) == {"mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "gpt_oss",
                                      "llama4_text"}


@pytest.mark.gpu
@pytest.mark.parametrize("model_type", BENCH_MODEL_TYPES)
def test_run_hf_bench_gpu_tiny(model_type):
    # One layer: every implementation routes on the same bf16 inputs. With two, a rounding difference in the first
    # layer can flip a tiny model's second-layer expert choice for a token, which no tolerance covers.
    rows = run_hf_bench(model_type, device="cuda", dtype=torch.bfloat16, tokens=64, layers=1,
                        config_overrides={"tiny": True})
    lean = [r for r in rows if r["implementation"].startswith("leanmoe")]
    assert lean and all(r["ok"] and r["ms"] > 0 and r["peak_mem_mb"] > 0 for r in lean), lean


def test_fp32_reference_logits_leave_the_model_as_it_was():
    import copy

    from leanmoe.bench.hf import _fp32_logits, build_model

    model = build_model(model_config("qwen3_moe", layers=1, tiny=True), device="cpu", dtype=torch.bfloat16)
    fp32_buffers = {n for n, b in model.named_buffers() if b.dtype == torch.float32}
    before = {n: (t.dtype, t.clone()) for n, t in model.state_dict().items()}
    params = {n: p for n, p in model.named_parameters()}
    reference = copy.deepcopy(model).float()
    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(0))

    logits = _fp32_logits(model, ids)

    assert logits.dtype == torch.float32
    with torch.no_grad():
        assert torch.equal(logits, reference(ids).logits.float())
    assert {n for n, b in model.named_buffers() if b.dtype == torch.float32} == fp32_buffers
    for name, t in model.state_dict().items():
        assert t.dtype == before[name][0] and torch.equal(t, before[name][1]), name
    assert all(p is params[n] for n, p in model.named_parameters())  # the same Parameter objects
