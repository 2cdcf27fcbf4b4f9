"""The gate/up forward's weight tiles through TMA descriptors or pointer loads, side by side in one process (GPU).

Legend: T tokens.

For each preset (bf16, uniform routing, the training token count, base weights requiring grad as in training): the
triton backend's fwd+bwd at save_percent 0 and its forward under ``no_grad``, with ``LEANMOE_TMA=0`` (pointer loads)
and ``LEANMOE_TMA=auto`` (TMA where the weights allow it: :func:`leanmoe.kernels.moe_fwd.tma_weight_desc`), timed in
turn for three rounds (``triton.testing.do_bench`` medians, the median of the rounds) after checking that both give
the same bits.

    python benchmarks/tma_ab.py [--preset P ...] [--json FILE]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from leanmoe.bench.env import collect_env
from leanmoe.bench.harness import make_case, time_interleaved
from leanmoe.bench.lora import _step
from leanmoe.bench.presets import PRESETS
from leanmoe.bench.report import write_json

VARIANTS = {"pointer": "0", "tma": "auto"}


def run(preset: str, device: torch.device, rounds: int = 3) -> dict:
    p = PRESETS[preset]
    case = make_case(p, "uniform", p.train_tokens, dtype=torch.bfloat16, device=device, seed=0)
    leaves = [case.x_TD, case.topk_weights_TK, *case.params().values()]
    outs = {}
    for name, mode in VARIANTS.items():
        os.environ["LEANMOE_TMA"] = mode
        for t in leaves:
            t.grad = None
        y_TD = _step(case, "triton", None, "fwdbwd", 0)()
        outs[name] = [y_TD.detach(), *(t.grad for t in leaves)]
    for t in leaves:
        t.grad = None
    same_bits = all(torch.equal(a, b) for a, b in zip(outs["pointer"], outs["tma"], strict=True))
    del outs

    def setup(mode: str, tma: str):
        def variant():
            os.environ["LEANMOE_TMA"] = tma
            return _step(case, "triton", None, mode, 0), leaves
        return variant

    ms, times = time_interleaved({f"{mode} {name}": setup(mode, tma) for mode in ("fwdbwd", "fwd")
                                  for name, tma in VARIANTS.items()}, device, rounds)
    os.environ.pop("LEANMOE_TMA", None)
    return dict(preset=preset, T=p.train_tokens, ms=ms, runs_ms=times, same_bits=same_bits,
                speedup={m: ms[f"{m} pointer"] / ms[f"{m} tma"] for m in ("fwdbwd", "fwd")})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", nargs="+", default=["qwen3-30b-a3b", "mixtral-8x7b"], choices=list(PRESETS))
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("tma_ab: needs a CUDA GPU", file=sys.stderr)
        return 1
    rows = []
    for preset in args.preset:
        row = run(preset, torch.device("cuda"))
        rows.append(row)
        ms = row["ms"]
        print(f"{preset} T={row['T']}: fwdbwd pointer {ms['fwdbwd pointer']:.3f} ms | tma {ms['fwdbwd tma']:.3f} ms "
              f"({row['speedup']['fwdbwd']:.3f}x) | fwd pointer {ms['fwd pointer']:.3f} | tma {ms['fwd tma']:.3f} "
              f"({row['speedup']['fwd']:.3f}x) | same bits {row['same_bits']}", flush=True)
        torch.cuda.empty_cache()
    env = collect_env(torch.device("cuda"), sys.argv[1:], program=("python", "benchmarks/tma_ab.py"))
    if args.json:
        write_json(args.json, rows, env)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
