"""Kernel-by-kernel GPU time of one expert-layer step, from the PyTorch profiler: where a step's time goes.

Run on a GPU machine:  PYTHONPATH=src python3 benchmarks/profile_step.py [--presets a,b] [--lora R] [--json F]

For each preset (bf16, uniform routing, the training token count) and each variant (the frozen-base step without
adapters, and with ``--lora R`` the same step with a rank-R adapter on both targets; ``--train-base`` makes the
base weights require grad instead), it warms up, then profiles ``--steps`` fwd+bwd steps on the triton backend
and prints the CUDA kernels grouped by name: total ms per step, calls per step, share of the step
(``--sequence``: also the last step's kernels in launch order). The profiler's
kernel times add up to a little less than a timed step (launch gaps); the figures say which kernels to work on,
the timings in docs/BENCHMARKS.md come from ``leanmoe bench``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from leanmoe.bench.harness import make_case  # noqa: E402
from leanmoe.bench.lora import make_lora  # noqa: E402
from leanmoe.bench.presets import PRESETS  # noqa: E402
from leanmoe.experts import moe_experts  # noqa: E402


def kernel_sequence(prof, steps: int) -> list[dict]:
    """The last step's CUDA kernels in launch order, with their GPU time (us)."""
    evts = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA),
                  key=lambda e: e.time_range.start)
    per_step = len(evts) // steps
    return [{"kernel": e.name[:60], "us": e.device_time} for e in evts[-per_step:]]


#: CUDA runtime calls that make the host wait for the GPU (a host-device synchronisation) when they run.
SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy ",
              "cudaMemcpyAsync")


def idle_gaps(prof, steps: int, top: int = 12) -> dict:
    """Where the GPU waits between the last step's kernels: the total idle time, the largest gaps with the kernels
    either side, and the host calls per step that can synchronise (``cudaMemcpyAsync`` counts device-to-device
    copies too: a row says where to look, not that it waited)."""
    evts = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA),
                  key=lambda e: e.time_range.start)
    last = evts[-(len(evts) // steps):] if evts else []
    gaps = []
    for prev, nxt in zip(last, last[1:], strict=False):
        gap = nxt.time_range.start - prev.time_range.end
        if gap > 0:
            gaps.append({"us": gap, "after": prev.name[:60], "before": nxt.name[:60]})
    syncs: dict[str, float] = defaultdict(float)
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CPU and e.name.startswith(SYNC_CALLS):
            syncs[e.name] += 1 / steps
    return {"idle_us": sum(g["us"] for g in gaps), "span_us": (last[-1].time_range.end - last[0].time_range.start)
            if last else 0.0, "largest": sorted(gaps, key=lambda g: -g["us"])[:top], "sync_calls_per_step": syncs}


def kernel_table(prof, steps: int) -> list[dict]:
    """CUDA kernel events grouped by (shortened) name: ms and calls per step, largest first."""
    total_us: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)
    for evt in prof.events():
        if evt.device_type != torch.autograd.DeviceType.CUDA:
            continue
        name = evt.name[:90]
        total_us[name] += evt.device_time
        calls[name] += 1
    rows = [{"kernel": n, "ms": us / 1e3 / steps, "calls": calls[n] / steps} for n, us in total_us.items()]
    return sorted(rows, key=lambda r: -r["ms"])


def profile_variant(preset, rank: int, train_base: bool, steps: int, save_percent: float) -> dict:
    case = make_case(preset, "uniform", preset.train_tokens, dtype=torch.bfloat16, device=torch.device("cuda"))
    for p in case.params().values():
        p.requires_grad_(train_base)
    lora = make_lora(case, rank) if rank else None
    leaves = [case.x_TD, case.topk_weights_TK, *(lora.parameters() if lora is not None else ())]
    if train_base:
        leaves += list(case.params().values())

    def step():
        y = moe_experts(*case.args(), **case.kwargs(), backend="triton", save_percent=save_percent,
                        check_ids=False, lora=lora)
        y.backward(case.dy_TD)
        for t in leaves:
            t.grad = None

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(steps):
        step()
    end.record()
    torch.cuda.synchronize()
    step_ms = start.elapsed_time(end) / steps
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    rows = kernel_table(prof, steps)
    return {"preset": preset.name, "lora_rank": rank, "train_base": train_base, "save_percent": save_percent,
            "step_ms": step_ms, "kernel_ms": sum(r["ms"] for r in rows), "kernels": rows,
            "sequence": kernel_sequence(prof, steps), "gaps": idle_gaps(prof, steps)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default="qwen3-30b-a3b,mixtral-8x7b")
    ap.add_argument("--lora", type=int, default=16, metavar="R", help="adapter rank (0: only the frozen step)")
    ap.add_argument("--train-base", action="store_true", help="base weights require grad (no adapter variant)")
    ap.add_argument("--save-percent", type=float, default=0.0)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--sequence", action="store_true", help="also print the last step's kernels in launch order")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    results = []
    for name in args.presets.split(","):
        preset = PRESETS[name]
        ranks = [0] if args.train_base or not args.lora else [0, args.lora]
        for rank in ranks:
            res = profile_variant(preset, rank, args.train_base, args.steps, args.save_percent)
            results.append(res)
            print(f"== {name} lora_rank={rank} train_base={args.train_base}: step {res['step_ms']:.3f} ms, "
                  f"kernels {res['kernel_ms']:.3f} ms")
            for r in res["kernels"][:25]:
                print(f"  {r['ms']:8.3f} ms {r['calls']:5.1f}x {100 * r['ms'] / res['kernel_ms']:5.1f}%  {r['kernel']}")
            gaps = res["gaps"]
            print(f"  GPU idle between the last step's kernels: {gaps['idle_us']:.0f} us of {gaps['span_us']:.0f} us;"
                  f" host calls that can synchronise, per step: {dict(gaps['sync_calls_per_step']) or 'none'}")
            for g in gaps["largest"]:
                print(f"    gap {g['us']:7.1f} us after {g['after']} | before {g['before']}")
            if args.sequence:
                print("  -- launch order (us):")
                for r in res["sequence"]:
                    if r["us"] >= 5:
                        print(f"    {r['us']:8.1f}  {r['kernel']}")
            torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
