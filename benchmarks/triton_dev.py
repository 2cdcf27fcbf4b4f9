"""Development check-and-time script for the Triton backend (one device call does everything).

Run on a GPU machine:  PYTHONUNBUFFERED=1 PYTHONPATH=src python3 benchmarks/triton_dev.py [--presets a,b] [--quick]

1. prints the environment (GPU, torch, triton, date, commit) and the dense bf16 8192^3 matmul rate;
2. checks the triton backend against the reference loop in bf16 at real shapes (forward and every gradient);
3. times fwd and fwd+bwd (``triton.testing.do_bench``, median) for triton (save_percent 0 and 100) and grouped_mm,
   as ``docs/BENCHMARK_PROTOCOL.md`` says, and the fwd+bwd activation memory;
4. prints a table last and writes logs under $OUT (when set).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time

import torch
import triton

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from leanmoe import Activation, moe_experts  # noqa: E402

PRESETS = {  # name: (D, I, E, K, T, activation, layout, bias)
    "qwen3-30b-a3b": (2048, 768, 128, 8, 16384, "swiglu", "concatenated", False),
    "olmoe-1b-7b": (2048, 1024, 64, 8, 16384, "swiglu", "concatenated", False),
    "gpt-oss-20b": (2880, 2880, 32, 4, 16384, "swiglu", "concatenated", False),
    "gpt-oss-20b-own": (2880, 2880, 32, 4, 16384, "clamped_swiglu", "interleaved", True),
    "mixtral-8x7b": (4096, 14336, 8, 2, 16384, "swiglu", "concatenated", False),
    "deepseek-v3": (7168, 2048, 256, 8, 4096, "swiglu", "concatenated", False),
}
OUT = os.environ.get("OUT")
LOG = []


def log(msg: str) -> None:
    print(msg, flush=True)
    LOG.append(msg)


def make(preset: str, T: int | None = None, routing: str = "uniform", seed: int = 0):
    D, I, E, K, T0, act, layout, bias = PRESETS[preset]
    T = T or T0
    g = torch.Generator(device="cuda").manual_seed(seed)
    dev, dt = "cuda", torch.bfloat16
    N = 2 * I
    logits = torch.randn(T, E, device=dev, generator=g)
    if routing == "skewed":
        logits = logits + torch.log(1.0 / (torch.arange(E, device=dev) + 1.0))
    w, ids = logits.softmax(-1).topk(K, dim=-1)
    w = (w / w.sum(-1, keepdim=True)).to(dt)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, device=dev, generator=g) * scale).to(dt)

    args = [rand(T, D), ids, w, rand(E, N, D, scale=D ** -0.5), rand(E, D, I, scale=I ** -0.5),
            rand(E, N, scale=0.1) if bias else None, rand(E, D, scale=0.1) if bias else None]
    return args, dict(activation=Activation(name=act), gate_up_layout=layout)


def rel(out, ref):
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def check(preset: str, T: int, save_percent: float = 0, routing: str = "uniform") -> bool:
    args, kw = make(preset, T, routing, seed=1)
    leaves = [a.requires_grad_() if a is not None and a.is_floating_point() else a for a in args]
    inputs = [a for i, a in enumerate(leaves) if a is not None and i != 1]
    results = {}
    for backend in ("reference", "triton"):
        y = moe_experts(*leaves, **kw, backend=backend, save_percent=save_percent)
        dy = torch.randn_like(y, generator=torch.Generator(device="cuda").manual_seed(2))
        grads = torch.autograd.grad(y, inputs, dy)
        results[backend] = [y] + list(grads)
    names = ["y", "dx", "dw", "dgate_up", "ddown", "dgate_up_bias", "ddown_bias"]
    errs = {n: rel(o, r) for n, o, r in zip(names, results["triton"], results["reference"], strict=False)}
    nan = any(torch.isnan(t).any().item() for t in results["triton"])
    ok = not nan and all(e < 1e-2 for e in errs.values())
    log(f"check {preset} T={T} save={save_percent} {routing}: {'OK' if ok else 'FAIL'} nan={nan} "
        + " ".join(f"{n}={e:.2e}" for n, e in errs.items()))
    # determinism: two runs bitwise equal
    y1 = moe_experts(*leaves, **kw, backend="triton", save_percent=save_percent)
    g1 = torch.autograd.grad(y1, inputs, dy)
    same = torch.equal(y1, results["triton"][0]) and all(
        torch.equal(a, b) for a, b in zip(g1, results["triton"][1:], strict=True))
    log(f"  deterministic: {same}")
    return ok and same


def flops(preset: str, T: int) -> float:
    D, I, E, K, _, act, _, _ = PRESETS[preset]
    return (6 if act in ("swiglu", "geglu", "clamped_swiglu") else 4) * T * K * D * I


def time_one(preset: str, backend: str, save_percent: float, routing: str = "uniform", mem: bool = True):
    args, kw = make(preset, routing=routing)
    T = args[0].shape[0]
    leaves = [a.requires_grad_() if a is not None and a.is_floating_point() else a for a in args]
    params = [a for i, a in enumerate(leaves) if a is not None and i >= 3]
    dy = torch.randn_like(args[0])

    def fwd():
        with torch.no_grad():
            return moe_experts(*leaves, **kw, backend=backend, save_percent=save_percent, check_ids=False)

    def fwd_bwd():
        for a in leaves:
            if a is not None and a.is_floating_point():
                a.grad = None
        y = moe_experts(*leaves, **kw, backend=backend, save_percent=save_percent, check_ids=False)
        y.backward(dy)

    t_f = triton.testing.do_bench(fwd, return_mode="median")
    t_fb = triton.testing.do_bench(fwd_bwd, return_mode="median")
    act_mem = float("nan")
    if mem:
        fwd_bwd()
        torch.cuda.synchronize()
        for a in leaves:
            if a is not None and a.is_floating_point():
                a.grad = None
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fwd_bwd()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
        act_mem = (peak - sum(p.numel() * p.element_size() for p in params)) / 2**20
    f = flops(preset, T)
    return t_f, t_fb, f / t_f / 1e9, 3 * f / t_fb / 1e9, act_mem


def profile(preset: str, save_percent: float) -> None:
    """Per-kernel device times of one fwd+bwd (after warm-up), from torch.profiler."""
    args, kw = make(preset)
    leaves = [a.requires_grad_() if a is not None and a.is_floating_point() else a for a in args]
    dy = torch.randn_like(args[0])

    def step():
        y = moe_experts(*leaves, **kw, backend="triton", save_percent=save_percent, check_ids=False)
        y.backward(dy)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            step()
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="self_cuda_time_total" if hasattr(prof.key_averages()[0],
                                      "self_cuda_time_total") else "self_device_time_total", row_limit=18,
                                      max_name_column_width=60)
    log(f"profile {preset} save={save_percent} (5 steps):\n{table}")
    from leanmoe.kernels import moe_bwd, moe_fwd
    for name, k in [("gate_up_fwd", moe_fwd._gate_up_fwd_tuned), ("grouped_gemm", moe_fwd._grouped_gemm_tuned),
                    ("gate_up_bwd", moe_bwd._gate_up_bwd_tuned), ("weight_grad", moe_bwd._weight_grad_tuned)]:
        log(f"  tuned {name}: " + "; ".join(f"{key} -> {cfg}" for key, cfg in k.cache.items()))


def dense_rate() -> float:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    t = triton.testing.do_bench(lambda: a @ b, return_mode="median")
    return 2 * 8192 ** 3 / t / 1e9


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--presets", default=",".join(PRESETS))
    p.add_argument("--check", default="qwen3-30b-a3b:4096,gpt-oss-20b-own:2048,deepseek-v3:1024")
    p.add_argument("--backends", default="triton:0,triton:100,grouped_mm:0")
    p.add_argument("--skewed", default="qwen3-30b-a3b")
    p.add_argument("--profile", default="", help="presets to profile kernel by kernel (triton, save 0)")
    p.add_argument("--group-m", default="auto",
                   help="row tiles per band of the tile order: 'auto' (leanmoe's rule) or a number for every kernel "
                        "(1 = row-major), for A/B runs")
    args = p.parse_args()
    if args.group_m != "auto":
        from leanmoe.kernels import moe_bwd, moe_fwd
        fixed = int(args.group_m)
        for module in (moe_fwd, moe_bwd):
            module.group_m = lambda device, streamed_bytes: fixed
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    log(f"# {torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__} | "
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC | commit {commit} (+ working tree) | "
        f"GROUP_M {args.group_m}")
    peak = dense_rate()
    log(f"dense bf16 8192^3: {peak:.0f} TFLOP/s")
    t0 = time.time()
    all_ok = True
    for item in filter(None, args.check.split(",")):
        name, T = item.split(":")
        for sp in (0, 100):
            all_ok &= check(name, int(T), sp)
    log(f"checks {'all OK' if all_ok else 'FAILED'} ({time.time() - t0:.0f}s)")
    for preset in filter(None, args.profile.split(",")):
        profile(preset, 0)
    rows = []
    for preset in filter(None, args.presets.split(",")):
        routings = ["uniform", "skewed"] if preset in args.skewed.split(",") else ["uniform"]
        for routing in routings:
            for spec in args.backends.split(","):
                backend, sp, *chunk = spec.split(":")
                t1 = time.time()
                try:
                    from leanmoe.kernels import policy
                    policy.COMBINE_CHUNK_BYTES = int(chunk[0]) * 2**20 if chunk else 256 * 2**20
                    r = time_one(preset, backend, float(sp), routing)
                except Exception as e:  # report and go on: one failing backend must not hide the others
                    log(f"{preset} {backend}:{sp} {routing}: ERROR {type(e).__name__}: {str(e)[:300]}")
                    continue
                rows.append((preset, routing, spec) + r)
                log(f"{preset} {routing} {spec} fwd {r[0]:.3f} ms fwd+bwd {r[1]:.3f} ms "
                    f"({r[2] / peak * 100:.0f}% / {r[3] / peak * 100:.0f}% of dense) act mem {r[4]:.0f} MiB "
                    f"[{time.time() - t1:.0f}s]")
    log("")
    log("| preset | routing | backend:save | fwd ms | fwd TF/s | fwd % | fwd+bwd ms | f+b TF/s | f+b % | act MiB |")
    log("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for preset, routing, b, tf, tfb, rf, rfb, m in rows:
        log(f"| {preset} | {routing} | {b} | {tf:.3f} | {rf:.0f} | {rf / peak * 100:.0f} | {tfb:.3f} | {rfb:.0f} | "
            f"{rfb / peak * 100:.0f} | {m:.0f} |")
    if OUT:
        with open(os.path.join(OUT, "triton_dev.log"), "w") as f:
            f.write("\n".join(LOG) + "\n")
        with open(os.path.join(OUT, "triton_dev.json"), "w") as f:
            json.dump({"peak_tflops": peak, "rows": rows}, f)


if __name__ == "__main__":
    main()
