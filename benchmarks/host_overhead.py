"""Host time of eager decode-sized expert calls, and of their parts (GPU).

Legend: T tokens, D model dim, I expert hidden dim, E experts, K top-k, R routed rows (T*K).

In eager decode a step waits for the host: each call's Python and kernel launches. With tiny expert dims (E=128,
K=8 as Qwen3-30B-A3B, D=256, I=128) the GPU work is far shorter than the launches, so the wall time of 400
back-to-back calls divided by 400 is the host time per call. Rows: ``moe_experts`` on each backend under
``no_grad``, the triton_decode path's parts (the routing plan, the gate/up and down launchers), an empty Triton
kernel with 22 arguments, ``torch.empty`` and ``torch.sort``; ``--profile`` adds a cProfile of triton_decode calls.

    python benchmarks/host_overhead.py [--tokens T ...] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time

import torch

E, D, I, K = 128, 256, 128, 8


def per_call_us(fn, n: int = 400) -> tuple[float, float]:
    """(host, wall) microseconds per call: the loop's time before and after a final synchronize."""
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    host = (time.perf_counter() - t0) / n * 1e6
    torch.cuda.synchronize()
    return host, (time.perf_counter() - t0) / n * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--profile", action="store_true", help="cProfile 300 triton_decode calls at the 2nd T")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU (it times host launches of GPU kernels)")
    import triton
    import triton.language as tl

    import leanmoe
    from leanmoe.experts.plan import plan_experts
    from leanmoe.kernels import moe_decode
    from leanmoe.kernels.moe_common import ACTIVATION_CODES

    @triton.jit
    def empty_kernel(a, b, c, d, e, f, g, h, n1, n2, n3, n4, n5, n6, n7, n8, n9, n10, n11, n12, n13, n14,
                     BM: tl.constexpr):
        pass

    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    w1 = torch.randn(E, 2 * I, D, device=dev, dtype=torch.bfloat16, generator=gen)
    w2 = torch.randn(E, D, I, device=dev, dtype=torch.bfloat16, generator=gen)
    act = dict(act_code=ACTIVATION_CODES["swiglu"], gated=True, interleaved=False, alpha=1.702, limit=7.0)
    def run(T: int, profile: bool) -> None:
        x = torch.randn(T, D, device=dev, dtype=torch.bfloat16, generator=gen)
        ids = torch.stack([torch.randperm(E, device=dev, generator=gen)[:K] for _ in range(T)])
        tw = torch.rand(T, K, device=dev, dtype=torch.bfloat16, generator=gen)
        plan = plan_experts(ids, E)
        h = moe_decode.decode_gate_up(x, plan.sorted_tokens_R, plan.sorted_experts_R, plan.offsets_E, w1, None, **act)
        rows = {f"moe_experts {b}": (lambda b=b: leanmoe.moe_experts(x, ids, tw, w1, w2, backend=b))
                for b in ("triton_decode", "triton", "grouped_mm", "auto")}
        rows.update({
            "plan_experts (torch ops)": lambda: plan_experts(ids, E),
            "decode_plan (one kernel)": lambda: moe_decode.decode_plan(ids, E),
            "decode_gate_up": lambda: moe_decode.decode_gate_up(
                x, plan.sorted_tokens_R, plan.sorted_experts_R, plan.offsets_E, w1, None, **act),
            "decode_down_combine": lambda: moe_decode.decode_down_combine(h, w2, None, tw, plan.sorted_rows_R,
                                                                          plan.offsets_E),
            "empty Triton launch (22 args)": lambda: empty_kernel[(1,)](x, x, x, x, x, x, x, x, *range(1, 15), BM=16),
            "torch.empty": lambda: torch.empty(T, D, device=dev),
            "torch.sort": lambda: torch.sort(ids.reshape(-1), stable=True),
        })
        for name, fn in rows.items():
            host, wall = per_call_us(fn)
            print(f"T={T:3d} {name:32s} host {host:7.1f} us/call  wall {wall:7.1f} us/call", flush=True)
        if profile:
            profiler = cProfile.Profile()
            profiler.enable()
            for _ in range(300):
                leanmoe.moe_experts(x, ids, tw, w1, w2, backend="triton_decode")
            profiler.disable()
            torch.cuda.synchronize()
            out = io.StringIO()
            pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(30)
            print(out.getvalue())

    with torch.no_grad():
        for i, T in enumerate(args.tokens):
            run(T, args.profile and i == min(1, len(args.tokens) - 1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
