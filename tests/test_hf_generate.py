"""``generate()`` end to end: a patched transformers MoE model gives the unpatched model's greedy tokens.

Tiny Qwen3-MoE and Mixtral configs (``leanmoe.bench.hf.TINY_SHAPES``), two layers, random weights, a static KV
cache, fp32. The same model (same tensors) generates unpatched, then patched: any difference is the expert
compute. On the GPU the patched model also generates under ``torch.compile(mode="reduce-overhead")`` (CUDA
graphs), against the unpatched eager tokens.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

import leanmoe.hf  # noqa: E402
from leanmoe.bench.hf import build_model, model_config  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

FAMILIES = ["qwen3_moe", "mixtral"]
GENERATE = dict(do_sample=False, pad_token_id=0, eos_token_id=None, cache_implementation="static")


def _model(model_type, device="cpu"):
    # initializer_range 0.1 (the tiny shapes' default): experts move the logits well beyond rounding.
    return build_model(model_config(model_type, layers=2, tiny=True), device=device, dtype=torch.float32,
                       seed=0).eval()


def _prompts(batch=2, seq=5, device="cpu"):
    return torch.randint(0, 128, (batch, seq), generator=torch.Generator().manual_seed(0)).to(device)


def _generate(model, ids, new_tokens):
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=new_tokens, **GENERATE)


@pytest.mark.parametrize("model_type", FAMILIES)
@pytest.mark.parametrize("backend", ["auto", "grouped_mm"])
def test_greedy_tokens_match_unpatched(model_type, backend):
    model = _model(model_type)
    ids = _prompts()
    ref = _generate(model, ids, 8)
    leanmoe.hf.patch(model, backend=backend)
    out = _generate(model, ids, 8)
    assert ref.shape == (2, 13)
    assert torch.equal(out, ref), f"{model_type} on {backend}: greedy tokens differ"
    # The tokens depend on the experts: zeroing them changes what is generated (the test can fail).
    leanmoe.hf.unpatch(model)
    for name, p in model.named_parameters():
        if ".experts." in name:
            p.data.zero_()
    assert not torch.equal(_generate(model, ids, 8), ref)


@pytest.mark.parametrize("model_type", ["qwen3_moe", pytest.param("mixtral", marks=pytest.mark.slow)])
def test_greedy_tokens_on_the_decode_backend(model_type):
    # triton_decode under the Triton interpreter: the prefill (10 tokens) and every decode step (2 tokens).
    pytest.importorskip("triton")
    model = _model(model_type)
    ids = _prompts()
    ref = _generate(model, ids, 3)
    leanmoe.hf.patch(model, backend="triton_decode")
    assert torch.equal(_generate(model, ids, 3), ref)


@pytest.mark.gpu
@pytest.mark.no_poison
@pytest.mark.parametrize("model_type", FAMILIES)
@pytest.mark.parametrize("backend", ["auto", "triton_decode", "triton"])
def test_gpu_generate_compiled_reduce_overhead(model_type, backend, tmp_path, monkeypatch):
    # On CUDA with a static cache, generate() compiles the decode step itself (transformers' CompileConfig,
    # mode="reduce-overhead": CUDA graphs) unless disable_compile is set; here fullgraph=True on top.
    from transformers import CompileConfig

    from leanmoe.experts import autoselect

    monkeypatch.setenv(autoselect.ENV_CACHE_DIR, str(tmp_path))
    model = _model(model_type, device="cuda")
    ids = _prompts(batch=4, device="cuda")

    def generate(**kw):
        with torch.no_grad():
            return model.generate(ids, max_new_tokens=12, **GENERATE, **kw)

    ref = generate(disable_compile=True)
    leanmoe.hf.patch(model, backend=backend)
    assert torch.equal(generate(disable_compile=True), ref), f"{model_type} on {backend}, eager: tokens differ"
    compiled = dict(compile_config=CompileConfig(fullgraph=True, mode="reduce-overhead"))
    for _ in range(2):  # the first generate compiles and records the graphs, the second replays them
        out = generate(**compiled)
        assert torch.equal(out, ref), f"{model_type} on {backend}, reduce-overhead: greedy tokens differ"


def test_hf_decode_bench_rows():
    from leanmoe.bench.hf import run_hf_decode_bench

    rows = run_hf_decode_bench("qwen3_moe", device="cpu", dtype=torch.float32, batch=2, layers=1, prompt_len=4,
                               new_tokens=3, config_overrides={"tiny": True})
    impls = [r["implementation"] for r in rows]
    assert impls[:3] == ["eager", "grouped_mm", "batched_mm"] and "leanmoe:auto" in impls
    for row in rows:
        assert row["ok"], row
        assert row["mode"] == "decode" and row["batch"] == 2 and row["rel_err"] < 1e-4
        # A tiny model on a busy CPU can time its step at or below zero: then no figure, and the note says why.
        if row["ms"] is None:
            assert row["tokens_per_s"] is None and "resolution" in row["note"], row
        else:
            assert row["ms"] > 0 and row["tokens_per_s"] == pytest.approx(2e3 / row["ms"])
    with pytest.raises(ValueError, match="new_tokens must be >= 2"):
        run_hf_decode_bench("qwen3_moe", device="cpu", dtype=torch.float32, batch=2, layers=1, new_tokens=1,
                            config_overrides={"tiny": True})
    # backends= names the leanmoe rows beside auto's; an unknown name raises before anything is timed.
    rows = run_hf_decode_bench("qwen3_moe", device="cpu", dtype=torch.float32, batch=2, layers=1, prompt_len=4,
                               new_tokens=2, backends=["reference"], config_overrides={"tiny": True})
    assert [r["implementation"] for r in rows] == ["eager", "grouped_mm", "batched_mm", "leanmoe:auto",
                                                   "leanmoe:reference"]
    with pytest.raises(ValueError, match="backends: unknown"):
        run_hf_decode_bench("qwen3_moe", device="cpu", dtype=torch.float32, batch=2, layers=1, backends=["nope"],
                            config_overrides={"tiny": True})


def test_hf_decode_bench_skips_batched_mm_that_cannot_fit(monkeypatch):
    """transformers' batched_mm copies an expert's weights per routed row: where generate()'s prefill would need more
    than half the free memory (Mixtral's experts on a GPU), its row says so and is not run, and the others are."""
    import leanmoe.bench.hf as hf

    monkeypatch.setattr(hf, "_free_bytes", lambda device: 2**10)
    rows = hf.run_hf_decode_bench("qwen3_moe", device="cpu", dtype=torch.float32, batch=2, layers=1, prompt_len=4,
                                  new_tokens=2, backends=["reference"], config_overrides={"tiny": True})
    by_impl = {r["implementation"]: r for r in rows}
    skipped = by_impl["batched_mm"]
    assert not skipped["ok"] and skipped["ms"] is None and skipped["rel_err"] is None
    assert "batched_mm gathers" in skipped["note"] and "for 8 tokens" in skipped["note"], skipped
    assert all(r["ok"] for name, r in by_impl.items() if name != "batched_mm")
