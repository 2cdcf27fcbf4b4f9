"""Per-GEMM timing of leanmoe's Triton MoE kernels against ``torch._grouped_mm`` (CUTLASS) on the same shapes.

Run on a GPU machine:  PYTHONPATH=src python3 benchmarks/gemm_engines.py [--presets a,b] [--out FILE.json]

For each preset (bf16, uniform routing, the training token count) it times, one process, median of
``triton.testing.do_bench``:

- every Triton kernel launch of one ``backend="triton"`` fwd+bwd at save_percent 0 (gate/up forward, down +
  combine, fused gate/up backward, both weight gradients, dx + combine) and the whole backward op;
- the same GEMM done by ``torch._grouped_mm`` on expert-sorted operands, and the gathers it needs
  (``x[sorted_tokens]``, ``dy[sorted_tokens]``).

Each row gives ms, TFLOP/s and the fraction of the dense bf16 8192^3 matmul rate measured in the same run. The
output decides, per shape, which engine a backward step uses; it is the measurement behind
``leanmoe.kernels.policy``'s engine choice.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys

import torch
import triton

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from leanmoe.bench.harness import dense_matmul_tflops  # noqa: E402
from leanmoe.bench.presets import PRESETS  # noqa: E402
from leanmoe.bench.report import write_json  # noqa: E402
from leanmoe.experts.plan import plan_experts  # noqa: E402
from leanmoe.kernels.moe_bwd import expert_weight_grad, gate_up_bwd  # noqa: E402
from leanmoe.kernels.moe_common import ACTIVATION_CODES  # noqa: E402
from leanmoe.kernels.moe_fwd import gate_up_fwd  # noqa: E402
from leanmoe.kernels.policy import combine_chunked  # noqa: E402
from leanmoe.testing import random_ids  # noqa: E402

DEFAULT = "qwen3-30b-a3b,olmoe-1b-7b,gpt-oss-20b,mixtral-8x7b,deepseek-v3"


def bench(fn) -> float:
    if not torch.cuda.is_available():  # --tiny smoke run on the CPU (interpreter): one call, no timing
        fn()
        return 1.0
    return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")


def run_preset(name: str, dense: float, tiny: bool = False, old: str | None = None,
               parts: tuple[str, ...] = ("gemm", "old", "bwd")) -> list[dict]:
    p = PRESETS[name]
    T = p.tokens()
    D, I, E, K = p.dim, p.hidden_dim, p.num_experts, p.top_k
    if tiny:
        T, D, I, E = 64, 64, 32, min(E, 8)
        K = min(K, E)
    N = 2 * I
    cuda = torch.cuda.is_available()
    dev, dt = torch.device("cuda" if cuda else "cpu"), torch.bfloat16 if cuda else torch.float32
    g = torch.Generator(device="cpu").manual_seed(0)
    x = (torch.randn(T, D, generator=g) * 0.5).to(dev, dt)
    dy = (torch.randn(T, D, generator=g) * 0.5).to(dev, dt)
    wgu = (torch.randn(E, N, D, generator=g) * D ** -0.5).to(dev, dt)
    wd = (torch.randn(E, D, I, generator=g) * I ** -0.5).to(dev, dt)
    ids = random_ids(T, E, K, "uniform", g).to(dev)
    w = torch.rand(T, K, generator=g).to(dev, dt)
    R = T * K
    plan = plan_experts(ids, E)
    tok, offs, rows = plan.sorted_tokens_R, plan.offsets_E, plan.sorted_rows_R
    scale = w.reshape(-1).index_select(0, rows).float()
    act = dict(act_code=ACTIVATION_CODES["swiglu"], gated=True, interleaved=False, alpha=1.702, limit=7.0)
    out_rows: list[dict] = []

    def row(op: str, engine: str, fn, flop: float) -> None:
        ms = bench(fn)
        tf = flop / ms / 1e9 if flop else 0.0
        peak_mib = None
        if cuda:  # peak memory the call adds on top of what is allocated before it
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            fn()
            torch.cuda.synchronize()
            peak_mib = round((torch.cuda.max_memory_allocated() - before) / 2**20, 1)
        out_rows.append(dict(preset=name, op=op, engine=engine, ms=round(ms, 4), tflops=round(tf, 1),
                             dense_fraction=round(tf / dense, 3) if flop else None, peak_extra_mib=peak_mib))
        print(f"{name:15s} {op:26s} {engine:12s} {ms:8.3f} ms {tf:7.1f} TF/s  peak +{peak_mib} MiB", flush=True)

    f_gu, f_d = 2 * R * N * D, 2 * R * I * D
    h, _ = gate_up_fwd(x, tok, offs, wgu, None, n_saved=0, **act)
    empty = x.new_empty(0, N)
    dgu, hw, _ = gate_up_bwd(x, dy, tok, offs, scale, wgu, None, wd, empty, **act)
    x_s = x.index_select(0, tok)
    dy_s = dy.index_select(0, tok)
    y = torch.empty_like(x)

    if "gemm" in parts:
        row("gather x[sorted_tokens]", "torch", lambda: x.index_select(0, tok), 0)
        row("gate_up fwd (+act)", "triton", lambda: gate_up_fwd(x, tok, offs, wgu, None, n_saved=0, **act), f_gu)
        row("gate_up fwd (no act)", "grouped_mm", lambda: torch._grouped_mm(x_s, wgu.transpose(1, 2), offs=offs), f_gu)
        row("down + combine", "triton",
            lambda: combine_chunked(h, wd, None, scale, rows, offs, T, K, y, None), f_d)
        row("down (no combine)", "grouped_mm", lambda: torch._grouped_mm(h, wd.transpose(1, 2), offs=offs), f_d)
        row("gate_up bwd fused", "triton",
            lambda: gate_up_bwd(x, dy, tok, offs, scale, wgu, None, wd, empty, **act), f_gu + f_d)
        row("dh = dy_s @ W_d", "grouped_mm", lambda: torch._grouped_mm(dy_s, wd, offs=offs), f_d)
        ddown = torch.empty_like(wd)
        dgate = torch.empty_like(wgu)
        row("dW_down", "triton", lambda: expert_weight_grad(dy, hw, offs, ddown, a_rows_R=tok), f_d)
        row("dW_down", "grouped_mm", lambda: torch._grouped_mm(dy_s.t(), hw, offs=offs), f_d)
        row("dW_gate_up", "triton", lambda: expert_weight_grad(dgu, x, offs, dgate, b_rows_R=tok), f_gu)
        row("dW_gate_up", "grouped_mm", lambda: torch._grouped_mm(dgu.t(), x_s, offs=offs), f_gu)
    if old and "old" in parts:  # the same kernels from an older copy of the package (see benchmarks/ab_versions.py)
        import importlib

        old_fwd = importlib.import_module(f"{old}.kernels.moe_fwd")
        row("gate_up fwd (+act)", old, lambda: old_fwd.gate_up_fwd(x, tok, offs, wgu, None, n_saved=0, **act), f_gu)
        row("down (grouped_gemm)", old,
            lambda: old_fwd.grouped_gemm(h, wd, offs, rows, y.new_empty(R, D), scale_R=scale), f_d)
        from leanmoe.kernels.moe_fwd import combine, grouped_gemm

        row("down (grouped_gemm)", "triton",
            lambda: grouped_gemm(h, wd, offs, rows, y.new_empty(R, D), scale_R=scale), f_d)
        out_RD = y.new_empty(R, D)
        row("combine", old, lambda: old_fwd.combine(out_RD, y, K), 0)
        row("combine", "triton", lambda: combine(out_RD, y, K), 0)
    if "gemm" in parts:
        dx = torch.empty_like(x)
        row("dx + combine", "triton",
            lambda: combine_chunked(dgu, wgu.transpose(1, 2), None, None, rows, offs, T, K, dx, None), f_gu)
        row("dx (no combine)", "grouped_mm", lambda: torch._grouped_mm(dgu, wgu, offs=offs), f_gu)
    if "bwd" in parts:  # the whole backward op, per engine, with the pre-activations recomputed or saved
        from leanmoe.kernels.policy import set_backward_engine

        bwd = torch.ops.leanmoe.triton_experts_bwd
        _, saved_all = gate_up_fwd(x, tok, offs, wgu, None, n_saved=R, **act)
        for save, saved in ((0, empty), (100, saved_all)):
            for engine in ("fused", "split"):
                set_backward_engine(engine)
                row(f"backward op, save {save}", engine,
                    lambda saved=saved: bwd(dy, x, ids, w, wgu, wd, None, None, rows, tok, offs, scale, saved,
                                            "swiglu", 1.702, 7.0, "concatenated"),
                    (3 if save == 0 else 2) * f_gu + 2 * f_d)
        set_backward_engine(None)
    return out_rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--presets", default=DEFAULT)
    ap.add_argument("--out", default=None)
    ap.add_argument("--old", default=None, help="an older package copy (importable name) to time beside")
    ap.add_argument("--parts", default="gemm,old,bwd", help="gemm: per-GEMM triton vs grouped_mm; old: the "
                    "forward kernels of --old beside; bwd: the backward op per engine and save_percent")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes: a smoke run (the CPU interpreter)")
    args = ap.parse_args()
    import leanmoe.experts.triton  # noqa: F401  (registers the ops)

    cuda = torch.cuda.is_available()
    dense = dense_matmul_tflops(torch.device("cuda")) if cuda else 1.0
    env = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               device=torch.cuda.get_device_name() if cuda else "cpu", torch=torch.__version__,
               triton=triton.__version__,
               dense_tflops=round(dense, 1), command="PYTHONPATH=src python3 benchmarks/gemm_engines.py " +
               " ".join(sys.argv[1:]))
    print(env, flush=True)
    rows: list[dict] = []
    for name in args.presets.split(","):
        rows += run_preset(name, dense, args.tiny, args.old, tuple(args.parts.split(",")))
        torch.cuda.empty_cache()
    if args.out:
        write_json(args.out, rows, env)


if __name__ == "__main__":
    main()
