"""The LoRA step's two ways of the B factors' backward terms, side by side in one process (GPU).

Legend: T tokens, R routed rows, P the LoRA rank (padded).

For each preset: the frozen expert layer (no adapter) and the LoRA step (rank 16, alpha 32, both targets, base
frozen, as ``leanmoe bench --lora 16`` builds it) on the triton backend with ``LEANMOE_LORA_FACTOR_GRADS`` =
``grouped_mm`` (``dy B_d`` and ``d B_d``, ``dgate_up B_gu`` and ``d B_gu``: four grouped GEMMs, each streaming its
``[R, X]`` rows) and ``fused`` (one pass over the rows per factor, :func:`leanmoe.kernels.moe_bwd.low_rank_pair`).
The three are timed in turn, three rounds (``triton.testing.do_bench`` medians, the median of the rounds), after
checking that both LoRA variants give the same output and gradients.

    python benchmarks/lora_ab.py [--preset P ...] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

import torch

from leanmoe.bench.env import source_digest
from leanmoe.bench.harness import make_case, time_ms
from leanmoe.bench.lora import _leaves, _step, make_lora, run_lora_once
from leanmoe.bench.presets import PRESETS

VARIANTS = ("frozen", "grouped_mm", "fused")


def run(preset: str, device: torch.device, rounds: int = 3) -> dict:
    p = PRESETS[preset]
    case = make_case(p, "uniform", p.train_tokens, dtype=torch.bfloat16, device=device, seed=0)
    for w in case.params().values():
        w.requires_grad_(False)
    lora = make_lora(case, 16)
    outs = {}
    for path in ("grouped_mm", "fused"):
        os.environ["LEANMOE_LORA_FACTOR_GRADS"] = path
        outs[path] = run_lora_once(case, "triton", lora, "fwdbwd", 0)
    diff = max(((outs["fused"][k].float() - outs["grouped_mm"][k].float()).norm()
                / outs["grouped_mm"][k].float().norm().clamp_min(1e-30)).item() for k in outs["fused"])
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for _ in range(rounds):
        for variant in VARIANTS:
            os.environ["LEANMOE_LORA_FACTOR_GRADS"] = "fused" if variant == "frozen" else variant
            adapter = None if variant == "frozen" else lora
            fn = _step(case, "triton", adapter, "fwdbwd", 0)
            times[variant].append(time_ms(fn, device, grad_to_none=list(_leaves(case, adapter).values())))
    os.environ.pop("LEANMOE_LORA_FACTOR_GRADS", None)
    ms = {v: statistics.median(t) for v, t in times.items()}
    return dict(preset=preset, T=p.train_tokens, rank=16, ms=ms, runs_ms=times, max_rel_diff=diff,
                ratio_grouped_mm=ms["grouped_mm"] / ms["frozen"], ratio_fused=ms["fused"] / ms["frozen"],
                fused_over_grouped_mm=ms["fused"] / ms["grouped_mm"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", nargs="+", default=["qwen3-30b-a3b", "mixtral-8x7b"], choices=sorted(PRESETS))
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU (the timings compare GPU kernels)")
    import triton

    rows = []
    for preset in args.preset:
        row = run(preset, torch.device("cuda"))
        rows.append(row)
        ms = row["ms"]
        print(f"{preset} T={row['T']} rank 16: frozen {ms['frozen']:.3f} ms | LoRA, grouped GEMMs "
              f"{ms['grouped_mm']:.3f} ms ({row['ratio_grouped_mm']:.3f}x) | LoRA, fused pass {ms['fused']:.3f} ms "
              f"({row['ratio_fused']:.3f}x) | fused / grouped {row['fused_over_grouped_mm']:.3f} | max rel diff "
              f"{row['max_rel_diff']:.1e}", flush=True)
    env = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
               source_sha256=source_digest())
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"env": env, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
