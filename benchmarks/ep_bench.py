"""Expert-parallel throughput: EP over all GPUs against each GPU holding every expert, fixed tokens per GPU.

    PYTHONPATH=src torchrun --nproc-per-node 2 benchmarks/ep_bench.py [--tokens 4096 16384] [--iters 20]

Shape: the qwen3-30b-a3b MoE layer (D=2048, I=768, E=128, K=8, SwiGLU, softmax top-k renormalised), bf16, the
default backend (``auto``). Every rank feeds T tokens of its own to
- ``EP=1``: a full layer of its own (all E experts, no communication): what one GPU does alone;
- ``EP=P``: the same layer with its experts sharded over the P ranks (all-to-all dispatch and combine).
Each configuration is verified first (EP output against the full layer on the same tokens), then timed with CUDA
events: fixed warm-up and iteration counts on every rank (collectives must match), the median per rank, the slowest
rank reported. ``fwd`` runs under ``torch.no_grad``; ``fwd+bwd`` is the layer's training step with a random output
gradient. Peak memory is ``torch.cuda.max_memory_allocated`` during ``fwd+bwd``. The forward is also split into
phases (router, dispatch, experts, combine; CUDA events between them, so each phase includes its share of waits).
With ``$OUT`` set, the results also go to ``$OUT/ep_bench.json``. ``--smoke`` runs a tiny shape on the CPU (gloo,
wall-clock timing) to check the script itself.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.distributed as dist

import leanmoe
from leanmoe.bench.report import write_json
from leanmoe.parallel.expert_parallel import expert_parallel

PRESET = {"name": "qwen3-30b-a3b", "dim": 2048, "hidden_dim": 768, "num_experts": 128, "top_k": 8}


SMOKE = {"name": "smoke", "dim": 64, "hidden_dim": 32, "num_experts": 8, "top_k": 2}


def make_layer(device, backend: str) -> leanmoe.MoE:
    cfg = leanmoe.MoEConfig(dim=PRESET["dim"], hidden_dim=PRESET["hidden_dim"], num_experts=PRESET["num_experts"],
                            top_k=PRESET["top_k"], backend=backend)
    torch.manual_seed(0)
    return leanmoe.MoE(cfg).to(device=device, dtype=torch.bfloat16)


def time_ms(fn, warmup: int, iters: int) -> float:
    """Median milliseconds of ``fn`` on this rank; the same call count on every rank."""
    for _ in range(warmup):
        fn()
    if not torch.cuda.is_available():  # --smoke on the CPU
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    dist.barrier()
    torch.cuda.synchronize()
    for s, e in zip(starts, ends, strict=True):
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends, strict=True))


def slowest(value: float, device) -> float:
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def rel_rms(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def forward_phases_ms(layer: leanmoe.MoE, x: torch.Tensor, warmup: int, iters: int) -> dict[str, float]:
    """Median ms of each forward phase (no grad): router, dispatch (incl. the split-size host sync), experts,
    combine. CUDA only: events between the phases."""
    names = ("router", "dispatch", "experts", "combine")
    times: dict[str, list[float]] = {n: [] for n in names}
    for i in range(warmup + iters):
        ev = [torch.cuda.Event(enable_timing=True) for _ in range(len(names) + 1)]
        with torch.no_grad():
            ev[0].record()
            routing = layer.router(x)
            ev[1].record()
            x_d, ids_d, w_d, meta = layer.dispatcher.dispatch(x, routing.topk_ids_TK, routing.topk_weights_TK)
            ev[2].record()
            y_d = layer.experts(x_d, ids_d, w_d, check_ids=False)
            ev[3].record()
            layer.dispatcher.combine(y_d, meta)
            ev[4].record()
        torch.cuda.synchronize()
        if i >= warmup:
            for j, n in enumerate(names):
                times[n].append(ev[j].elapsed_time(ev[j + 1]))
    return {n: statistics.median(t) for n, t in times.items()}


def bench_one(layer: leanmoe.MoE, T: int, args, device) -> dict:
    gen = torch.Generator(device=device).manual_seed(100 + dist.get_rank())
    x = torch.randn(T, PRESET["dim"], device=device, dtype=torch.bfloat16, generator=gen)
    dy = torch.randn_like(x)
    x_grad = x.clone().requires_grad_(True)

    def fwd():
        with torch.no_grad():
            layer(x)

    def fwd_bwd():
        layer(x_grad).backward(dy)

    fwd_ms = slowest(time_ms(fwd, args.warmup, args.iters), device)
    layer.zero_grad(set_to_none=True)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    fwd_bwd_ms = slowest(time_ms(fwd_bwd, args.warmup, args.iters), device)
    peak_gib = slowest(torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan"), device)
    layer.zero_grad(set_to_none=True)
    phases = {}
    if cuda:
        phases = {k: slowest(v, device) for k, v in forward_phases_ms(layer, x, args.warmup, args.iters).items()}
    return {"tokens_per_gpu": T, "fwd_ms": fwd_ms, "fwd_bwd_ms": fwd_bwd_ms,
            "fwd_tokens_per_s_per_gpu": T / fwd_ms * 1e3, "fwd_bwd_tokens_per_s_per_gpu": T / fwd_bwd_ms * 1e3,
            "peak_mem_gib": peak_gib, "fwd_phases_ms": phases}


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (no git checkout)"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384], help="tokens per GPU")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--backend", default="auto", help="experts backend of both configurations")
    parser.add_argument("--smoke", action="store_true", help="tiny shape on the CPU with gloo: checks the script")
    args = parser.parse_args()

    if args.smoke:
        PRESET.update(SMOKE)
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    else:
        local_rank = int(os.environ["LOCAL_RANK"])
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()

    full = make_layer(device, args.backend)
    ep = expert_parallel(make_layer(device, args.backend), None)
    backend = full.experts.explain_backend(torch.zeros(8, PRESET["dim"], device=device, dtype=torch.bfloat16),
                                           torch.zeros(8, PRESET["top_k"], device=device, dtype=torch.int64),
                                           torch.zeros(8, PRESET["top_k"], device=device))
    rows = []
    for T in args.tokens:
        # Verify before timing: the EP layer against the full layer on this rank's tokens.
        x = torch.randn(T, PRESET["dim"], device=device, dtype=torch.bfloat16,
                        generator=torch.Generator(device=device).manual_seed(7 + rank))
        with torch.no_grad():
            err = slowest(rel_rms(ep(x), full(x)), device)
        if err > 1e-2:
            raise SystemExit(f"EP output differs from the full layer at T={T}: relative RMS error {err:.3e}")
        for name, layer in (("EP=1", full), (f"EP={world}", ep)):
            row = bench_one(layer, T, args, device)
            row.update(config=name, verified_rel_rms=err if layer is ep else 0.0)
            rows.append(row)

    if rank == 0:
        cuda = device.type == "cuda"
        env = {"gpu": torch.cuda.get_device_name(device) if cuda else "CPU", "gpus": world,
               "torch": torch.__version__, "cuda": torch.version.cuda,
               "nccl": ".".join(map(str, torch.cuda.nccl.version())) if cuda else None,
               "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
               "commit": git_commit(), "command": f"torchrun --nproc-per-node {world} {' '.join(sys.argv)}",
               "backend": backend, "preset": PRESET, "warmup": args.warmup, "iters": args.iters}
        print(f"# {PRESET['name']} MoE layer (D={PRESET['dim']}, I={PRESET['hidden_dim']}, E={PRESET['num_experts']}, "
              f"K={PRESET['top_k']}), bf16, {world}x {env['gpu']}")
        print(f"# torch {env['torch']} (CUDA {env['cuda']}, NCCL {env['nccl']}), {env['date']}, commit {env['commit']}")
        print(f"# command: {env['command']}")
        print(f"# experts backend: {backend}")
        print("| tokens/GPU | config | fwd ms | fwd+bwd ms | fwd tok/s/GPU | fwd+bwd tok/s/GPU | peak GiB/GPU "
              "| fwd phases ms: router / dispatch / experts / combine |")
        print("| ---: | --- | ---: | ---: | ---: | ---: | ---: | --- |")
        for r in rows:
            ph = " / ".join(f"{v:.2f}" for v in r["fwd_phases_ms"].values()) or "-"
            print(f"| {r['tokens_per_gpu']} | {r['config']} | {r['fwd_ms']:.2f} | {r['fwd_bwd_ms']:.2f} | "
                  f"{r['fwd_tokens_per_s_per_gpu']:,.0f} | {r['fwd_bwd_tokens_per_s_per_gpu']:,.0f} | "
                  f"{r['peak_mem_gib']:.2f} | {ph} |")
        if os.environ.get("OUT"):
            write_json(os.path.join(os.environ["OUT"], "ep_bench.json"), rows, env)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
