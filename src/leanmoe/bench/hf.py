"""``leanmoe bench --hf MODEL_TYPE``: a transformers MoE model on transformers' own experts vs on leanmoe.

Legend: T tokens, D model dim, E experts, K top-k.

1. build the family's model with its published layer shapes (transformers' default config for the model type is
   the flagship checkpoint's: Mixtral-8x7B, Qwen1.5-MoE-A2.7B, Qwen3-30B-A3B, DeepSeek-V3, gpt-oss-120b,
   Llama-4-Scout; OLMoE-1B-7B's expert width is set by hand), with
   ``layers`` decoder layers, every one of them MoE, random weights;
2. verify before timing: the logits of one forward over ``tokens`` tokens under each implementation against the
   same model run in fp32 with transformers' eager experts (relative RMS error; the dtype's tolerance, or twice
   eager's own error where larger); a row that fails is reported ``ok=False`` and not timed;
3. time a training step (forward with labels, backward; gradients reset to None between steps) and a prefill
   (a no-grad forward with ``logits_to_keep=1``) for transformers' ``eager``, ``grouped_mm`` and ``batched_mm``
   experts implementations (where the family has them) and leanmoe (``leanmoe:auto`` and each other leanmoe
   backend that runs the call, except the reference loop); median of ``triton.testing.do_bench`` on CUDA, of a
   few ``perf_counter`` runs on the CPU; peak CUDA memory of one run (``None`` on the CPU).

``batched_mm`` gathers a ``[T*K, N, D]`` copy of the expert weights; rows where that would not fit are skipped
with a note. DeepSeek-V3's real layer holds ~23 GB of bf16 expert weights: one layer is the most an 80 GB GPU
trains.
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from leanmoe.bench import env as bench_env
from leanmoe.testing import LOGITS_TOLERANCES_VS_FP32_MODEL

#: Tiny shapes for CPU tests and smoke runs: every family's routing features, seconds per model on 2 cores.
TINY_SHAPES: dict[str, dict] = {
    "mixtral": dict(intermediate_size=48, num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(intermediate_size=64, moe_intermediate_size=24, shared_expert_intermediate_size=40,
                      num_experts=6, num_experts_per_tok=2, norm_topk_prob=False),
    "qwen3_moe": dict(intermediate_size=64, moe_intermediate_size=24, num_experts=6, num_experts_per_tok=2,
                      norm_topk_prob=True),
    "olmoe": dict(intermediate_size=24, num_experts=6, num_experts_per_tok=2),
    "deepseek_v3": dict(intermediate_size=64, moe_intermediate_size=16, n_routed_experts=8, num_experts_per_tok=2,
                        n_group=4, topk_group=2, n_shared_experts=1, routed_scaling_factor=2.5, q_lora_rank=16,
                        kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
                        num_key_value_heads=4, norm_topk_prob=True),
    "gpt_oss": dict(intermediate_size=24, num_local_experts=4, num_experts_per_tok=2),
    "llama4_text": dict(intermediate_size=24, intermediate_size_mlp=48, num_local_experts=4, num_experts_per_tok=1),
}
_TINY_COMMON = dict(vocab_size=128, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                    max_position_embeddings=64, initializer_range=0.1, tie_word_embeddings=False)
#: Where transformers' default config is not the flagship checkpoint's shape: OLMoE-1B-7B has I=1024 (default 2048).
_REAL_SHAPE_FIXES: dict[str, dict] = {"olmoe": dict(intermediate_size=1024)}
#: Settings that make every decoder layer an MoE layer (the real configs interleave dense layers in some families).
_ALL_MOE_LAYERS: dict[str, dict] = {
    "deepseek_v3": dict(first_k_dense_replace=0),
    "qwen2_moe": dict(decoder_sparse_step=1, mlp_only_layers=[]),
    "qwen3_moe": dict(decoder_sparse_step=1, mlp_only_layers=[]),
    "llama4_text": dict(interleave_moe_layer_step=1),
}
#: Bench model types: the ones with a family file that build as a causal LM on their own.
BENCH_MODEL_TYPES = tuple(TINY_SHAPES)

#: Tolerance on the relative RMS error of the logits against the fp32 model (at least twice eager's own error).
_LOGITS_TOL = LOGITS_TOLERANCES_VS_FP32_MODEL


def _logits_tolerance(dtype: torch.dtype, eager_error: Callable[[], float]) -> float:
    """The logits check's tolerance against the fp32 model: the dtype's; in low precision at least twice
    ``eager_error()`` (transformers' eager experts' own error, computed only then), because a rounding difference
    can flip a later layer's expert choice for a token, so two correct bf16 implementations can differ from each
    other by more than either differs from fp32."""
    if dtype == torch.float32:
        return _LOGITS_TOL[dtype]
    return max(_LOGITS_TOL.get(dtype, 4e-2), 2 * eager_error())


def model_config(model_type: str, *, layers: int, tiny: bool = False, **overrides):
    """A transformers config for ``model_type``: real layer shapes (transformers' defaults), or :data:`TINY_SHAPES`
    when ``tiny``; ``layers`` decoder layers, all MoE; ``overrides`` last."""
    from transformers import AutoConfig

    if model_type not in BENCH_MODEL_TYPES:
        raise ValueError(f"no bench shapes for model type {model_type!r}; expected one of {BENCH_MODEL_TYPES}")
    kwargs = dict(num_hidden_layers=layers, **_ALL_MOE_LAYERS.get(model_type, {}))
    if model_type == "llama4_text":
        kwargs["moe_layers"] = list(range(layers))
    if tiny:
        kwargs.update(_TINY_COMMON, **TINY_SHAPES[model_type])
    else:
        kwargs.update(_REAL_SHAPE_FIXES.get(model_type, {}))
    kwargs.update(overrides)
    return AutoConfig.for_model(model_type, **kwargs)


def build_model(config, *, device, dtype, experts_implementation: str | None = "eager", seed: int = 0):
    """``AutoModelForCausalLM.from_config`` on ``device`` in ``dtype``, with seeded random weights."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    kwargs = {"dtype": dtype}
    if experts_implementation is not None:
        kwargs["experts_implementation"] = experts_implementation
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, **kwargs)
    # A no-op normally; it matters where torch.empty is wrapped in Python (the tests' NaN poisoning), which makes
    # torch's device context skip it, so that some parameters start on the CPU.
    return model.to(device)


def _supports_hf_experts_implementation(model) -> bool:
    return model._can_set_experts_implementation()


def _fp32_logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    """The logits of ``model`` run in float32: the semantics every implementation is checked against.

    The model is cast in place and back: each parameter and buffer gets its own dtype again (bf16 -> fp32 -> bf16 is
    exact, and buffers kept in fp32, such as rotary frequencies, stay fp32). It needs room for an fp32 copy of the
    weights for the duration of one forward.
    """
    dtypes = [(m, kind, name, t.dtype) for m in model.modules() for kind in ("_parameters", "_buffers")
              for name, t in getattr(m, kind).items() if t is not None]
    try:
        model.float()
        with torch.no_grad():
            return model(input_ids).logits.float()
    finally:
        for module, kind, name, dtype in dtypes:
            t = getattr(module, kind)[name]
            if kind == "_parameters":
                t.data = t.data.to(dtype)  # keeps the Parameter object (and optimiser or patch references)
            else:
                module._buffers[name] = t.to(dtype)


def _rel_rms(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def _time_ms(fn, device: torch.device, grad_to_none=None) -> float:
    """Median ms of ``fn``: the bench's ``time_ms`` on CUDA. On the CPU one warm-up and three runs, not
    ``time_ms``'s second-long budget: each run is a whole model's step and the CPU figures are a smoke test."""
    if device.type == "cuda":
        from leanmoe.bench.harness import time_ms

        return time_ms(fn, device, grad_to_none=grad_to_none)
    fn()
    times = []
    for _ in range(3):
        if grad_to_none:
            for p in grad_to_none:
                p.grad = None
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _peak_mb(fn, device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 2**20


def _measure_step(fn, params: Sequence[torch.Tensor], device: torch.device, *, train: bool
                  ) -> tuple[float | None, float | None]:
    """``(ms, peak MiB)`` of ``fn``: one warm-up call (Triton autotuning, lazy allocations) outside the peak-memory
    run, then the peak and the timing; ``params``' gradients are reset around each (every call when ``train``)."""
    fn()
    for p in params:
        p.grad = None
    peak = _peak_mb(fn, device)
    ms = _time_ms(fn, device, grad_to_none=params if train else None)
    for p in params:
        p.grad = None
    return ms, peak


def _write_json(json_path, device: torch.device, config: dict, rows: list[dict]) -> None:
    """``{"env", "config", "rows"}`` of an HF bench run, to ``json_path`` (nothing when it is None)."""
    if json_path is None:
        return
    with open(json_path, "w") as f:
        json.dump({"env": environment(device), "config": config, "rows": rows}, f, indent=2)


def _batched_mm_bytes(config, tokens: int, dtype: torch.dtype) -> int:
    # batched_mm gathers gate_up [T*K, 2I, D] (then down [T*K, D, I]) per layer.
    K = config.num_experts_per_tok
    inter = getattr(config, "moe_intermediate_size", None) or config.intermediate_size
    return tokens * K * 2 * inter * config.hidden_size * torch.tensor([], dtype=dtype).element_size()


def _free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return 16 * 2**30


def _batched_mm_skip_note(config, tokens: int, dtype: torch.dtype, device: torch.device) -> str | None:
    """Why transformers' ``batched_mm`` experts cannot run a forward of ``tokens`` tokens here, or None: they index
    a copy of an expert's weights per routed row (``gate_up_proj[expert_ids]``), which for large experts (Mixtral's
    352 MB) outgrows the GPU at a few hundred rows."""
    need, free = _batched_mm_bytes(config, tokens, dtype), _free_bytes(device)
    if need <= free // 2:
        return None
    return (f"skipped: batched_mm gathers {need / 2**30:.1f} GiB of expert weights per layer for {tokens} tokens, "
            f"more than half of the {free / 2**30:.1f} GiB free")


def _leanmoe_backends(model, tokens: int, device, dtype) -> tuple[str, list[str]]:
    """The backend ``auto`` picks for this model's expert calls, and the other non-reference backends that run."""
    import leanmoe.hf
    from leanmoe.experts.functional import describe_call
    from leanmoe.experts.registry import available_backends, get_backend, select_backend

    name, experts = leanmoe.hf.experts_modules(model)[0]
    w = experts.expert_weights()
    E, _, D = w.gate_up_proj.shape
    K = model.config.num_experts_per_tok
    x_TD = torch.zeros(tokens, D, device=device, dtype=dtype)
    ids_TK = torch.zeros(tokens, K, device=device, dtype=torch.int64)
    call = describe_call(x_TD, ids_TK, x_TD.new_zeros(tokens, K), w.gate_up_proj, w.down_proj, w.gate_up_bias,
                         w.down_bias, activation=w.activation, gate_up_layout=w.gate_up_layout)
    auto = select_backend("auto", call)[0].name
    others = [b for b in available_backends()
              if b not in (auto, "reference") and get_backend(b).auto_unsupported_reason(call) is None]
    return auto, others


def environment(device: torch.device) -> dict:
    import transformers

    import leanmoe

    env: dict[str, str | None] = {
        "torch": torch.__version__, "transformers": transformers.__version__, "leanmoe": leanmoe.__version__,
        "python": platform.python_version(), "device": str(device)}
    if device.type == "cuda":
        env["gpu"] = bench_env.device_name(device)
    env["triton"] = bench_env.package_version("triton")
    env["commit"] = bench_env.git_commit()
    env["source_sha256"] = bench_env.source_digest()
    return env


def _resolve_model(model_type: str, layers: int, config_overrides: dict | None, device: torch.device | str,
                   dtype: torch.dtype | str) -> tuple[torch.device, torch.dtype, Any]:
    """The device, dtype and transformers config of a bench model (``config_overrides`` may hold ``tiny``)."""
    resolved: torch.dtype = getattr(torch, dtype.removeprefix("torch.")) if isinstance(dtype, str) else dtype
    overrides = dict(config_overrides or {})
    tiny = bool(overrides.pop("tiny", False))
    return torch.device(device), resolved, model_config(model_type, layers=layers, tiny=tiny, **overrides)


def run_hf_bench(model_type: str, *, device, dtype, tokens: int, layers: int, save_percent: float = 0,
                 json_path=None, config_overrides: dict | None = None) -> list[dict]:
    """Benchmarks one transformers MoE family on its own experts implementations and on leanmoe.

    Args:
        model_type: one of :data:`BENCH_MODEL_TYPES` (``"qwen3_moe"``, ``"mixtral"``, ...).
        device, dtype: where and in what precision the model runs (bf16 on a GPU is the intended use); a dtype
            may be given by name (``"bfloat16"``).
        tokens: tokens per step (one sequence of this length).
        layers: decoder layers (all MoE).
        save_percent: the leanmoe backends' ``save_percent`` (transformers' implementations keep what autograd keeps).
        json_path: if given, writes ``{"env": ..., "rows": [...]}`` there.
        config_overrides: extra config fields (tests pass tiny shapes; ``tiny=True`` is ``TINY_SHAPES``).

    Returns:
        One row per (implementation, mode): ``model_type, implementation, mode ("train" | "prefill"), ms,
        peak_mem_mb, ok`` plus ``rel_err`` (relative RMS error of the logits against the model run in fp32 with
        eager experts) and ``note``. ``ms`` is None for rows
        that were skipped or failed verification.
    """
    import leanmoe.hf

    device, dtype, config = _resolve_model(model_type, layers, config_overrides, device, dtype)
    model = build_model(config, device=device, dtype=dtype)
    model.train()  # dropout is 0 in these configs; train mode exercises the training paths
    generator = torch.Generator(device="cpu").manual_seed(0)
    input_ids = torch.randint(0, config.vocab_size, (1, tokens), generator=generator).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    # Every implementation, transformers' eager experts included, is checked against the model run in fp32.
    ref_logits = _fp32_logits(model, input_ids)

    def eager_err() -> float:
        with torch.no_grad():
            return _rel_rms(model(input_ids).logits.float(), ref_logits)

    tol = _logits_tolerance(dtype, eager_err)

    def train_step():
        loss = model(input_ids, labels=input_ids).loss
        loss.backward()

    def prefill():
        with torch.no_grad():
            model(input_ids, logits_to_keep=1)

    hf_impls = ["eager", "grouped_mm", "batched_mm"] if _supports_hf_experts_implementation(model) else ["eager"]
    leanmoe.hf.patch(model)
    auto, others = _leanmoe_backends(model, tokens, device, dtype)
    leanmoe.hf.unpatch(model)
    impls = [(name, None) for name in hf_impls] + [("leanmoe:auto", "auto")] + [(f"leanmoe:{b}", b) for b in others]

    rows: list[dict] = []
    for impl, backend in impls:
        note = ""
        leanmoe.hf.unpatch(model)
        if backend is None:
            if impl != "eager" or _supports_hf_experts_implementation(model):
                model.set_experts_implementation(impl)
            if impl == "batched_mm" and (skip := _batched_mm_skip_note(config, tokens, dtype, device)):
                rows += [dict(model_type=model_type, implementation=impl, mode=mode, ms=None, peak_mem_mb=None,
                              ok=False, rel_err=None, tol=tol, note=skip) for mode in ("train", "prefill")]
                continue
        else:
            if _supports_hf_experts_implementation(model):
                model.set_experts_implementation("eager")
            leanmoe.hf.patch(model, backend=backend, save_percent=save_percent)
            if backend == "auto":
                note = f"auto -> {auto}"
        with torch.no_grad():
            rel_err = _rel_rms(model(input_ids).logits.float(), ref_logits)
        ok = rel_err <= tol
        if not ok:
            note = (note + "; " if note else "") + f"logits off the fp32 model by {rel_err:.2e} > {tol:.1e}: not timed"
        for mode, fn in (("train", train_step), ("prefill", prefill)):
            ms, peak = _measure_step(fn, params, device, train=mode == "train") if ok else (None, None)
            rows.append(dict(model_type=model_type, implementation=impl, mode=mode, ms=ms, peak_mem_mb=peak, ok=ok,
                             rel_err=rel_err, tol=tol, note=note))
    leanmoe.hf.unpatch(model)
    _write_json(json_path, device, {"model_type": model_type, "tokens": tokens, "layers": layers, "dtype": str(dtype),
                                    "save_percent": save_percent}, rows)
    return rows


#: Prompts per decode run (the decode step's T) by device, and tokens per prompt and generated per run.
HF_DECODE_BATCH = {"cuda": 8, "cpu": 2}
HF_DECODE_PROMPT_LEN = 32
HF_DECODE_NEW_TOKENS = 32
#: How :func:`run_hf_decode_bench` times a decode step (the report's ``timer`` line).
HF_DECODE_TIMER = ("median wall time of 3 greedy generate() runs with a static cache (eager unless compiled); a step "
                   f"is (t({HF_DECODE_NEW_TOKENS}) - t(1)) / {HF_DECODE_NEW_TOKENS - 1}, host launch overhead included")


def _generate_ms(model, input_ids: torch.Tensor, new_tokens: int, device: torch.device, *, compiled: bool,
                 runs: int | None = None) -> float:
    """Median wall time (ms) of greedy ``generate`` of exactly ``new_tokens`` tokens with a static cache.

    Not ``time_ms``: ``do_bench`` would repeat a whole generation for its ~100 ms budget; a few synchronised
    wall-clock runs measure it as a user sees it."""
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                  eos_token_id=None, cache_implementation="static", disable_compile=not compiled)

    def run():
        with torch.no_grad():
            model.generate(input_ids, **kwargs)

    run()  # warm-up: autotuning, auto's measurement, compilation and graph capture happen here
    times = []
    for _ in range(runs or (3 if device.type == "cuda" else 1)):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def run_hf_decode_bench(model_type: str, *, device, dtype, batch: int, layers: int,
                        prompt_len: int = HF_DECODE_PROMPT_LEN, new_tokens: int = HF_DECODE_NEW_TOKENS,
                        compiled: bool = False, backends: list[str] | None = None, json_path=None,
                        config_overrides: dict | None = None) -> list[dict]:
    """Greedy decode throughput of one transformers MoE family on its own experts implementations and on leanmoe.

    ``batch`` prompts of ``prompt_len`` random tokens generate ``new_tokens`` tokens each with a static KV cache,
    under ``torch.no_grad()`` (``compiled``: transformers' own ``torch.compile`` of the forward, CUDA graphs
    included; else eager). A decode step's time is ``(t(new_tokens) - t(1)) / (new_tokens - 1)``, with ``t(n)``
    the median wall time of a ``generate`` of n tokens, so the prefill cancels out.
    Throughput is ``batch / step`` tokens per second.

    Each implementation is first checked: the logits of a prefill (``batch x prompt_len`` tokens) and of a
    decode-sized forward (``batch x 1``) against the model run in fp32 with eager experts, with the tolerance of
    :func:`run_hf_bench`. Rows that fail are not timed. Implementations: transformers' ``eager``,
    ``grouped_mm`` and ``batched_mm`` (where the family has them; ``compiled`` leaves out ``eager``, whose loop
    over the hit experts breaks the compiled graph at every step), ``leanmoe:auto``, and ``backends`` (default:
    every other leanmoe backend that runs the no-grad decode call, the reference loop excepted).

    Returns:
        One row per implementation: ``model_type, implementation, mode ("decode"), ms`` (one decode step),
        ``tokens_per_s, batch, prompt_len, new_tokens, peak_mem_mb`` (None), ``ok, rel_err, note``.
    """
    import leanmoe.hf

    if new_tokens < 2:
        raise ValueError(f"new_tokens must be >= 2 (a decode step is timed between 1 and new_tokens), got {new_tokens}")
    device, dtype, config = _resolve_model(model_type, layers, config_overrides, device, dtype)
    if config.max_position_embeddings < prompt_len + new_tokens:
        config.max_position_embeddings = prompt_len + new_tokens
    model = build_model(config, device=device, dtype=dtype).eval()
    generator = torch.Generator(device="cpu").manual_seed(0)
    prompts = torch.randint(0, config.vocab_size, (batch, prompt_len), generator=generator).to(device)
    checks = [prompts, prompts[:, -1:]]
    refs = [_fp32_logits(model, ids) for ids in checks]

    def rel_err() -> float:
        with torch.no_grad():
            return max(_rel_rms(model(ids).logits.float(), ref) for ids, ref in zip(checks, refs, strict=True))

    tol = _logits_tolerance(dtype, rel_err)

    hf_impls = ["eager", "grouped_mm", "batched_mm"] if _supports_hf_experts_implementation(model) else ["eager"]
    if compiled and len(hf_impls) > 1:
        hf_impls.remove("eager")
    leanmoe.hf.patch(model)
    with torch.no_grad():
        auto, others = _leanmoe_backends(model, batch, device, dtype)
    leanmoe.hf.unpatch(model)
    from leanmoe.experts.registry import available_backends

    # Every backend that runs the decode call, auto's own choice included (it also runs under its own name).
    others = [b for b in dict.fromkeys([auto, *others]) if b in available_backends() and b != "reference"]
    if backends is not None:
        unknown = [b for b in backends if b not in available_backends()]
        if unknown:
            raise ValueError(f"backends: unknown {unknown}; registered: {available_backends()}")
        others = list(dict.fromkeys(backends))
    impls = [(name, None) for name in hf_impls] + [("leanmoe:auto", "auto")] + [(f"leanmoe:{b}", b) for b in others]

    rows = []
    for impl, backend in impls:
        note = ""
        leanmoe.hf.unpatch(model)
        if backend is None:
            # generate()'s prefill runs batch x prompt_len tokens through the experts.
            if impl == "batched_mm" and (skip := _batched_mm_skip_note(config, batch * prompt_len, dtype, device)):
                rows.append(dict(model_type=model_type, implementation=impl, mode="decode", ms=None,
                                 tokens_per_s=None, batch=batch, prompt_len=prompt_len, new_tokens=new_tokens,
                                 peak_mem_mb=None, ok=False, rel_err=None, tol=tol, note=skip))
                continue
            if _supports_hf_experts_implementation(model):
                model.set_experts_implementation(impl)
        else:
            if _supports_hf_experts_implementation(model):
                model.set_experts_implementation("eager")
            leanmoe.hf.patch(model, backend=backend)
        err = rel_err()
        ok = err <= tol
        ms = tokens_per_s = None
        if ok:
            t_1 = _generate_ms(model, prompts, 1, device, compiled=compiled)
            t_n = _generate_ms(model, prompts, new_tokens, device, compiled=compiled)
            # The difference of two medians: on a busy or tiny run it can come out <= 0, which is no time at all.
            ms = (t_n - t_1) / (new_tokens - 1) if t_n > t_1 else None
            tokens_per_s = batch * 1e3 / ms if ms is not None else None
            note = "" if ms is not None else "step time below the timer's resolution (or the noise)"
        else:
            note = f"logits off the fp32 model by {err:.2e} > {tol:.1e}: not timed"
        if backend == "auto":
            with torch.no_grad():  # after the runs: on CUDA this is the measured choice for T=batch
                chosen = _leanmoe_backends(model, batch, device, dtype)[0]
            note = "; ".join(n for n in (note, f"auto -> {chosen} at T={batch}") if n)
        rows.append(dict(model_type=model_type, implementation=impl, mode="decode", ms=ms, tokens_per_s=tokens_per_s,
                         batch=batch, prompt_len=prompt_len, new_tokens=new_tokens, peak_mem_mb=None, ok=ok,
                         rel_err=err, tol=tol, note=note))
    leanmoe.hf.unpatch(model)
    _write_json(json_path, device, {"model_type": model_type, "batch": batch, "prompt_len": prompt_len,
                                    "new_tokens": new_tokens, "layers": layers, "dtype": str(dtype),
                                    "compiled": compiled}, rows)
    return rows
