"""The decode kernels stage by stage, and every config and split of them, at decode sizes (CUDA only, one process).

    OUT=DIR PYTHONPATH=src python benchmarks/decode_sweep.py        # gpu_suite.sh step decode-sweep

Legend: T tokens, D model dim, I expert hidden dim, N gate/up rows, E experts, R routed rows.

Per (preset, T): the copy rate, the routing plan, ``decode_gate_up`` and ``decode_down_combine`` as the backend runs
them (tuned), the whole ``triton_decode`` op as CUDA-graph replays, and each kernel again with every config of
``CONFIGS`` forced at splits 1, 2 and 4 (``do_bench`` medians; each kernel's fraction of the copy rate on the weight
bytes it reads). Printed as the five fastest per kernel, and written to ``$OUT/decode_sweep.json``. ``SWEEP_S``
bounds the forced part (default 250 s).
"""
import json
import os
import sys
import time

import torch
import triton
from triton.testing import do_bench

import leanmoe.kernels.moe_decode as md
from leanmoe.bench.harness import copy_gbps, make_case
from leanmoe.bench.presets import PRESETS
from leanmoe.kernels.moe_common import ACTIVATION_CODES

OUT = os.environ.get("OUT", ".")
dev = torch.device("cuda")
copy = 0.0  # the device copy rate, GB/s: measured in main()

BASE = [(c.kwargs["BM"], c.kwargs["BN"], c.kwargs["BK"], c.num_warps, c.num_stages) for c in md._DECODE_CONFIGS]
EXTRA = [(16, 128, 64, 4, 4), (16, 64, 64, 4, 6), (16, 64, 128, 4, 6), (16, 128, 128, 8, 4), (16, 256, 64, 8, 4),
         (16, 32, 256, 2, 4), (16, 64, 256, 8, 3), (16, 128, 256, 8, 3), (16, 64, 128, 8, 5), (16, 32, 128, 4, 6)]
CONFIGS = list(dict.fromkeys(BASE + EXTRA))
orig_launch = md._launch


def forced(cfg):
    bm, bn, bk, w, s = cfg

    def _launch(plain, tuned, R, E, num_cols, split, args, meta, tune_key):
        grid = (md.row_tiles_bound(R, E, bm) * triton.cdiv(num_cols, bn), split)
        plain[grid](*args, **meta, BM=bm, BN=bn, BK=bk, num_warps=w, num_stages=s)
    return _launch


def bench(fn):
    return do_bench(fn, warmup=10, rep=40, return_mode="median")


def gate_up_call(case, plan, act, split=None):
    _, st, se, _, off = plan
    return lambda: md.decode_gate_up(case.x_TD, st, se, off, case.gate_up_proj, case.gate_up_bias, split=split, **act)


def down_call(case, plan, h, split=None):
    sr, _, _, _, off = plan
    return lambda: md.decode_down_combine(h, case.down_proj, case.down_bias, case.topk_weights_TK, sr, off,
                                          split=split)


def sweep_case(name: str, T: int, deadline: float) -> dict:
    p = PRESETS[name]
    case = make_case(p, "uniform", T, dtype=torch.bfloat16, device=dev, seed=0)
    E, N, D = case.gate_up_proj.shape
    I = case.down_proj.shape[2]
    ids = case.topk_ids_TK
    touched = int(torch.unique(ids).numel())
    gu_bytes, dn_bytes = touched * N * D * 2, touched * D * I * 2
    act = dict(act_code=ACTIVATION_CODES[p.activation.name], gated=p.gated,
               interleaved=p.gate_up_layout == "interleaved", alpha=float(p.activation.alpha),
               limit=float(p.activation.limit))
    plan = md.decode_plan(ids, E)
    R = ids.numel()
    md._launch = orig_launch
    t_plan = bench(lambda: md.decode_plan(ids, E))
    h = gate_up_call(case, plan, act)()
    t_gu = bench(gate_up_call(case, plan, act))
    t_dn = bench(down_call(case, plan, h))
    sms = md.sm_count(dev)
    from leanmoe.experts.decode import _triton_decode_fwd

    args = (case.x_TD, ids, case.topk_weights_TK, case.gate_up_proj, case.down_proj, case.gate_up_bias,
            case.down_bias, None, p.activation.name, p.gated, float(p.activation.alpha), float(p.activation.limit),
            p.gate_up_layout)
    with torch.no_grad():
        for _ in range(3):
            _triton_decode_fwd(*args)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            _triton_decode_fwd(*args)
        t_whole = bench(g.replay)
    head = dict(preset=name, T=T, touched=touched, gu_bytes=gu_bytes, dn_bytes=dn_bytes, plan_ms=t_plan,
                gate_up_ms=t_gu, down_combine_ms=t_dn, whole_graph_ms=t_whole,
                split_gu=md.choose_split(R, E, I, D, sms), split_dn=md.choose_split(R, E, D, I, sms),
                copy_gbps=copy, whole_frac=(gu_bytes + dn_bytes) / (t_whole * 1e-3) / 1e9 / copy,
                gu_frac=gu_bytes / (t_gu * 1e-3) / 1e9 / copy, dn_frac=dn_bytes / (t_dn * 1e-3) / 1e9 / copy,
                tuned={str(k[2:]): v for k, v in md._CHOSEN_CONFIGS.items()})
    print(json.dumps({k: v for k, v in head.items() if k != "tuned"}), flush=True)
    rows = []
    for kernel in ("gate_up", "down"):
        for split in (1, 2, 4):
            for cfg in CONFIGS:
                if time.time() > deadline:
                    break
                md._launch = forced(cfg)
                fn = gate_up_call(case, plan, act, split) if kernel == "gate_up" else down_call(case, plan, h, split)
                try:
                    out = fn()
                    ok = kernel != "gate_up" or torch.allclose(out[:R].float(), h[:R].float(), atol=2e-2, rtol=2e-2)
                    ms = bench(fn)
                    b = gu_bytes if kernel == "gate_up" else dn_bytes
                    rows.append(dict(kernel=kernel, split=split, cfg=cfg, ms=ms, ok=ok,
                                     frac=b / (ms * 1e-3) / 1e9 / copy))
                except Exception as exc:  # noqa: BLE001 - a config out of resources is a row with its error
                    rows.append(dict(kernel=kernel, split=split, cfg=cfg, ms=None, err=str(exc)[:100]))
    md._launch = orig_launch
    for kernel, default in (("gate_up", t_gu), ("down", t_dn)):
        ks = sorted([r for r in rows if r["kernel"] == kernel and r.get("ms")], key=lambda r: r["ms"])
        print(f"  {name} T={T} {kernel}: tuned {default:.4f} ms; best:",
              "; ".join(f"s{r['split']} {r['cfg']} {r['ms']:.4f} ({r['frac']:.2f}){'' if r['ok'] else ' BAD'}"
                        for r in ks[:5]), flush=True)
    head["sweep"] = rows
    return head


def main() -> None:
    global copy
    copy = copy_gbps(dev)
    print(f"copy {copy:.0f} GB/s", flush=True)
    results = []
    t_start = time.time()
    deadline = t_start + float(os.environ.get("SWEEP_S", "250"))
    for name, T in [("olmoe-1b-7b", 64), ("qwen3-30b-a3b", 64), ("olmoe-1b-7b", 16), ("qwen3-30b-a3b", 256)]:
        results.append(sweep_case(name, T, deadline))
        with open(os.path.join(OUT, "decode_sweep.json"), "w") as f:
            json.dump(results, f)
    print("done", time.time() - t_start, file=sys.stderr)


if __name__ == "__main__":
    main()
