"""Ways of the LoRA step's backward terms, side by side in one process with the frozen step (GPU).

Legend: T tokens, R routed rows, P the LoRA rank (padded).

For each preset: the frozen expert layer (no adapter) and the LoRA step (rank 16, alpha 32, both targets, base
frozen, as ``leanmoe bench --lora 16`` builds it) on the triton backend in each variant named by ``--variants``,
each a setting of the backward's switches:

- ``default``: the defaults (forward's ``s x A_gu^T`` and ``s h A_d^T`` in one pass over the rows,
  :func:`leanmoe.kernels.moe_fwd.low_rank_rows`; one pass over the rows per B factor,
  :func:`leanmoe.kernels.moe_bwd.low_rank_pair`; ``d A_d`` and ``d A_gu`` from the weight-gradient kernel with
  rank-wide tiles, x's rows gathered in its loads);
- ``token-major``: ``LEANMOE_LORA_LOW_RANK=token_major`` (forward's ``s x A_gu^T`` a token-major GEMM, ``s h A_d^T``
  a grouped GEMM: :func:`leanmoe.lora.triton.low_rank_rows_path`);
- ``a-torch``: ``token-major`` with ``LEANMOE_LORA_A_GRADS=torch`` (``d A_d`` a grouped GEMM, ``d A_gu``
  token-major: :func:`leanmoe.lora.triton.a_grads_path`);
- ``grouped_mm``: ``a-torch`` with ``LEANMOE_LORA_FACTOR_GRADS=grouped_mm`` (``dy B_d`` and ``d B_d``,
  ``dgate_up B_gu`` and ``d B_gu``: four grouped GEMMs, each streaming its ``[R, X]`` rows).

All are timed in turn, three rounds (``triton.testing.do_bench`` medians, the median of the rounds), after checking
that every LoRA variant gives ``default``'s output and gradients.

    python benchmarks/lora_ab.py [--preset P ...] [--variants V ...] [--json FILE]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from leanmoe.bench.env import collect_env
from leanmoe.bench.harness import make_case, time_interleaved
from leanmoe.bench.lora import _leaves, _step, make_lora, run_lora_once
from leanmoe.bench.presets import PRESETS
from leanmoe.bench.report import write_json

#: Each LoRA variant's environment (the switches not named keep their defaults).
VARIANTS = {
    "grouped_mm": {"LEANMOE_LORA_FACTOR_GRADS": "grouped_mm", "LEANMOE_LORA_A_GRADS": "torch",
                   "LEANMOE_LORA_LOW_RANK": "token_major"},
    "a-torch": {"LEANMOE_LORA_A_GRADS": "torch", "LEANMOE_LORA_LOW_RANK": "token_major"},
    "token-major": {"LEANMOE_LORA_LOW_RANK": "token_major"},
    "default": {},
}
SWITCHES = ("LEANMOE_LORA_FACTOR_GRADS", "LEANMOE_LORA_A_GRADS", "LEANMOE_LORA_LOW_RANK")


def _set_env(env: dict[str, str]) -> None:
    for name in SWITCHES:
        os.environ.pop(name, None)
    os.environ.update(env)


def run(preset: str, device: torch.device, variants: list[str], rounds: int = 3) -> dict:
    p = PRESETS[preset]
    case = make_case(p, "uniform", p.train_tokens, dtype=torch.bfloat16, device=device, seed=0)
    for w in case.params().values():
        w.requires_grad_(False)
    lora = make_lora(case, 16)
    outs = {}
    for name in dict.fromkeys(["default", *variants]):
        _set_env(VARIANTS[name])
        outs[name] = run_lora_once(case, "triton", lora, "fwdbwd", 0)
    diff = {name: max(((out[k].float() - outs["default"][k].float()).norm()
                       / outs["default"][k].float().norm().clamp_min(1e-30)).item() for k in out)
            for name, out in outs.items() if name != "default"}
    def setup(name: str):
        def variant():
            _set_env(VARIANTS.get(name, {}))
            adapter = None if name == "frozen" else lora
            return _step(case, "triton", adapter, "fwdbwd", 0), list(_leaves(case, adapter).values())
        return variant

    ms, times = time_interleaved({name: setup(name) for name in ["frozen", *variants]}, device, rounds)
    _set_env({})
    return dict(preset=preset, T=p.train_tokens, rank=16, ms=ms, runs_ms=times, max_rel_diff_vs_default=diff,
                ratio={v: ms[v] / ms["frozen"] for v in variants})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", nargs="+", default=["qwen3-30b-a3b", "mixtral-8x7b"], choices=sorted(PRESETS))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU (the timings compare GPU kernels)")
    rows = []
    for preset in args.preset:
        row = run(preset, torch.device("cuda"), list(dict.fromkeys(args.variants)))
        rows.append(row)
        ms = row["ms"]
        parts = " | ".join(f"{v} {ms[v]:.3f} ms ({r:.3f}x)" for v, r in row["ratio"].items())
        diffs = ", ".join(f"{v} {d:.1e}" for v, d in row["max_rel_diff_vs_default"].items())
        print(f"{preset} T={row['T']} rank 16: frozen {ms['frozen']:.3f} ms | {parts} | max rel diff vs default: "
              f"{diffs or '-'}", flush=True)
    env = collect_env(torch.device("cuda"), sys.argv[1:] if argv is None else argv,
                      program=("python", "benchmarks/lora_ab.py"))
    if args.json:
        write_json(args.json, rows, env)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
