"""A/B of two leanmoe versions in one process: the checkout's ``leanmoe`` against an older copy of the package.

The older copy is a package renamed so both import side by side (its ``torch.library`` ops get their own
namespace), made from a commit with::

    mkdir -p .old && git archive COMMIT src/leanmoe | tar -x -C .old && mv .old/src/leanmoe .old/leanmoe_old \
        && grep -rl leanmoe .old/leanmoe_old | xargs sed -i 's/\\bleanmoe\\b/leanmoe_old/g'

    PYTHONPATH=src:.old python benchmarks/ab_versions.py --old leanmoe_old --backend triton grouped_mm \
        --preset qwen3-30b-a3b mixtral-8x7b

Both versions run the same inputs (``leanmoe.bench.harness.make_case``), each timed with ``do_bench`` (median, ms),
alternating old/new per case so clock drift hits both; the outputs of the two are compared before timing. Peak
extra memory per call as the benchmark protocol defines it. Prints one Markdown table and writes ``--json``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys

import torch

from leanmoe.bench.harness import make_case, peak_extra_bytes, time_ms
from leanmoe.bench.presets import get_preset


def run(case, module, backend: str, mode: str, save_percent: float):
    def call():
        return module.moe_experts(case.x_TD, case.topk_ids_TK, case.topk_weights_TK, case.gate_up_proj,
                                  case.down_proj, case.gate_up_bias, case.down_bias,
                                  activation=case.preset.activation.name, gate_up_layout=case.preset.gate_up_layout,
                                  backend=backend, save_percent=save_percent, check_ids=False)

    if mode == "fwd":
        def fn():
            with torch.no_grad():
                return call()
    else:
        def fn():
            call().backward(case.dy_TD)
    return fn


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--old", required=True, help="importable name of the older leanmoe copy")
    p.add_argument("--preset", nargs="+", default=["qwen3-30b-a3b", "mixtral-8x7b"])
    p.add_argument("--backend", nargs="+", default=["triton"])
    p.add_argument("--mode", nargs="+", default=["fwd", "fwdbwd"], choices=("fwd", "fwdbwd"))
    p.add_argument("--save-percent", type=float, default=0)
    p.add_argument("--tokens", type=int)
    p.add_argument("--json")
    args = p.parse_args(argv)
    import leanmoe

    old = importlib.import_module(args.old)
    device = torch.device("cuda")
    rows = []
    print(f"# A/B: leanmoe (checkout) vs {args.old}; {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print("| preset | backend | mode | old ms | new ms | new/old | old peak MiB | new peak MiB | max diff |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name in args.preset:
        preset = get_preset(name)
        case = make_case(preset, "uniform", args.tokens or preset.train_tokens, dtype=torch.bfloat16, device=device)
        for backend in args.backend:
            for mode in args.mode:
                fns = {tag: run(case, mod, backend, mode, args.save_percent)
                       for tag, mod in (("old", old), ("new", leanmoe))}
                with torch.no_grad():
                    outs = {tag: run(case, mod, backend, "fwd", args.save_percent)() for tag, mod in
                            (("old", old), ("new", leanmoe))}
                diff = (outs["old"].float() - outs["new"].float()).abs().max().item()
                scale = outs["old"].float().abs().max().item()
                del outs
                leaves = [t for t in (case.x_TD, case.topk_weights_TK, case.gate_up_proj, case.down_proj)
                          if t.requires_grad]
                ms = {tag: [] for tag in fns}
                for _ in range(3):  # alternate, so drift hits both
                    for tag, fn in fns.items():
                        ms[tag].append(time_ms(fn, device, grad_to_none=leaves))
                for t in leaves:
                    t.grad = None
                peak = {tag: peak_extra_bytes(fn, device) / 2**20 for tag, fn in fns.items()}
                for t in leaves:
                    t.grad = None
                best = {tag: min(v) for tag, v in ms.items()}
                row = dict(preset=name, backend=backend, mode=mode, old_ms=best["old"], new_ms=best["new"],
                           ratio=best["new"] / best["old"], old_peak_mib=peak["old"], new_peak_mib=peak["new"],
                           max_rel_diff=diff / max(scale, 1e-30))
                rows.append(row)
                print(f"| {name} | {backend} | {mode} | {best['old']:.2f} | {best['new']:.2f} | "
                      f"{row['ratio']:.3f} | {peak['old']:.0f} | {peak['new']:.0f} | {row['max_rel_diff']:.1e} |",
                      flush=True)
        del case
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
