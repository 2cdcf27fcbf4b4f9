"""Fingerprints of the code every leanmoe Triton kernel compiles to, for a GPU this machine need not have.

    PYTHONPATH=src python benchmarks/kernel_codegen.py --json BEFORE.json            # at one commit
    PYTHONPATH=src python benchmarks/kernel_codegen.py --json AFTER.json             # at another
    PYTHONPATH=src python benchmarks/kernel_codegen.py --compare BEFORE.json AFTER.json

A refactor of the kernels' source that leaves every fingerprint as it was changes neither behaviour nor speed on
that GPU with this Triton: the GPU runs the same instructions. The script drives the ``triton`` backend (forward
and backward on both backward engines, save_percent 0 / 50 / 100, token masks, biases, every activation code, the
interleaved layout, LoRA) and the ``triton_decode`` backend on small CPU tensors with the Triton interpreter off:
each kernel launch is compiled for the target (``--arch``, default 90: Hopper) through Triton's own argument
binding (so the specialisations are a real launch's), and not run. The fingerprint is the SHA-256 of the PTX
(compiled without line information, comment lines dropped), listed per launch in launch order. Kernel outputs are
never written, so everything downstream computes on uninitialised memory: only the launches mean anything here.

Not covered: the TMA variant of the gate/up forward (its descriptors need a GPU), and configurations that only
autotuning picks (tuning is off: the first config of each kernel, as ``LEANMOE_AUTOTUNE=0`` runs).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime import driver
from triton.runtime.jit import JITFunction

#: Set before leanmoe's kernels are imported (``@triton.jit`` reads TRITON_INTERPRET when it decorates).
ENVIRONMENT = {
    "TRITON_INTERPRET": "0",
    "LEANMOE_AUTOTUNE": "0",
    "LEANMOE_TMA": "0",
    "TRITON_DEFAULT_FP_FUSION": "1",  # what Triton 3.9 and earlier do by default
    "TRITON_DISABLE_LINE_INFO": "1",  # source line numbers are not code: a moved line changes no instruction
}


class CompileOnlyDriver:
    """The parts of a Triton driver a launch asks for before it compiles: a device, a stream and the target."""

    def __init__(self, arch: int) -> None:
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_current_target(self) -> GPUTarget:
        return self.target

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")

    def get_device_interface(self):
        return torch.cuda

    def is_active(self) -> bool:
        return True


LAUNCHES: list[dict] = []


def _fingerprint(ptx: str) -> str:
    body = "\n".join(line for line in ptx.splitlines() if not line.lstrip().startswith("//"))
    return hashlib.sha256(body.encode()).hexdigest()[:16]


def _compile_only(orig, dump_dir: str | None):
    """``JITFunction.run`` that compiles (``warmup``) and records the launch instead of running it; with
    ``dump_dir``, each PTX is also written there as ``<kernel>-<fingerprint>.ptx`` (to diff two versions)."""
    def run(self, *args, grid, warmup, **kwargs):
        kernel = orig(self, *args, grid=grid, warmup=True, **kwargs)
        ptx = _fingerprint(kernel.asm["ptx"])
        if dump_dir:
            with open(os.path.join(dump_dir, f"{self.__name__}-{ptx}.ptx"), "w") as f:
                f.write(kernel.asm["ptx"])
        LAUNCHES.append({"kernel": self.__name__, "ptx": ptx,
                         "meta": {k: v for k, v in sorted(kwargs.items()) if (k.isupper() or k.startswith("num_"))
                                  and isinstance(v, (int, float, bool, str))}})
        return kernel
    return run


def _allow_cpu() -> None:
    """The backends' support checks accept CPU tensors (their kernels are only compiled here, never run)."""
    import leanmoe.experts.decode as decode
    import leanmoe.experts.triton as triton_backend
    import leanmoe.kernels.policy as policy

    def no_reason(call):
        return None

    triton_backend.triton_call_reason = no_reason
    decode.triton_call_reason = no_reason
    policy.split_unsupported = lambda x_TD, down_proj: None


def drive(dtypes: list[torch.dtype]) -> list[tuple[str, int]]:
    """Every path the fingerprint covers; returns ``(case, launches)`` per case."""
    from leanmoe import moe_experts
    from leanmoe.kernels.policy import set_backward_engine
    from leanmoe.testing import make_problem

    cases = []
    forms = [dict(activation="swiglu", layout="concatenated", bias=False),
             dict(activation="clamped_swiglu", layout="interleaved", bias=True),
             dict(activation="gelu", layout="concatenated", bias=False)]
    for dtype in dtypes:
        for form in forms:
            for engine in ("split", "fused"):
                for save_percent in (0, 50, 100):
                    for masked in (False, True):
                        p = make_problem(64, 128, 64, 7, 2, activation=form["activation"], layout=form["layout"],
                                         bias=form["bias"], dtype=dtype, seed=0, requires_grad=True,
                                         keep_fraction=0.5 if masked else None)
                        n0 = len(LAUNCHES)
                        set_backward_engine(engine)
                        try:
                            y = moe_experts(*p.args(), **p.kwargs(), backend="triton", save_percent=save_percent,
                                            check_ids=False)
                            y.backward(torch.ones_like(y))
                        finally:
                            set_backward_engine(None)
                        cases.append((f"triton {dtype} {form} {engine} s{save_percent} mask={masked}",
                                      len(LAUNCHES) - n0))
            p = make_problem(8, 128, 64, 7, 2, activation=form["activation"], layout=form["layout"],
                             bias=form["bias"], dtype=dtype, seed=0)
            n0 = len(LAUNCHES)
            with torch.no_grad():
                moe_experts(*p.args(), **p.kwargs(), backend="triton_decode", check_ids=False)
            cases.append((f"triton_decode {dtype} {form}", len(LAUNCHES) - n0))
        # One token on a wide D: the decode gate/up splits its reduction (the finishing kernel runs).
        p = make_problem(1, 1024, 64, 7, 1, dtype=dtype, seed=0)
        n0 = len(LAUNCHES)
        with torch.no_grad():
            moe_experts(*p.args(), **p.kwargs(), backend="triton_decode", check_ids=False)
        cases.append((f"triton_decode split {dtype}", len(LAUNCHES) - n0))
        cases.append(("lora", _drive_lora(dtype)))
    return cases


def _drive_lora(dtype: torch.dtype) -> int:
    from leanmoe import moe_experts
    from leanmoe.lora import ExpertLoRA
    from leanmoe.testing import make_problem

    p = make_problem(64, 128, 64, 7, 2, dtype=dtype, seed=0, requires_grad=False)
    lora = ExpertLoRA(num_experts=7, dim=128, hidden_dim=64, rank=8, gated=True, dtype=dtype)
    n0 = len(LAUNCHES)
    y = moe_experts(*p.args(), **p.kwargs(), backend="triton", check_ids=False, lora=lora)
    y.backward(torch.ones_like(y))
    return len(LAUNCHES) - n0


def compare(a_path: str, b_path: str) -> int:
    a, b = (json.load(open(p)) for p in (a_path, b_path))
    la, lb = a["launches"], b["launches"]
    if len(la) != len(lb):
        print(f"launch counts differ: {len(la)} against {len(lb)}")
        return 1
    diff = [(i, x, y) for i, (x, y) in enumerate(zip(la, lb, strict=True)) if x != y]
    kernels = sorted({x["kernel"] for x in la})
    if not diff:
        print(f"same code: {len(la)} launches of {len(kernels)} kernels ({', '.join(kernels)}), "
              f"{len({x['ptx'] for x in la})} distinct PTX; target sm_{a['arch']}, triton {a['triton']}")
        return 0
    for i, x, y in diff[:20]:
        print(f"launch {i}: {x['kernel']} {x['ptx']} -> {y['kernel']} {y['ptx']} {x['meta']}")
    print(f"{len(diff)} of {len(la)} launches compile differently")
    return 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/kernel_codegen.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x 10 (default 90: Hopper)")
    parser.add_argument("--dtype", nargs="+", choices=("bf16", "fp16", "fp32"), default=["bf16", "fp32"])
    parser.add_argument("--json", metavar="FILE", help="write the fingerprints")
    parser.add_argument("--dump", metavar="DIR", help="write each distinct PTX into DIR")
    parser.add_argument("--compare", nargs=2, metavar=("A", "B"),
                        help="compare two --json files; exit 1 if they differ")
    args = parser.parse_args(argv)
    if args.compare:
        return compare(*args.compare)
    if args.dump:
        os.makedirs(args.dump, exist_ok=True)
    if "leanmoe.kernels.moe_fwd" in sys.modules:
        parser.error("run it as a script: leanmoe's kernels are already imported in this process")
    os.environ.update(ENVIRONMENT)
    driver.set_active(CompileOnlyDriver(args.arch))
    JITFunction.run = _compile_only(JITFunction.run, args.dump)
    _allow_cpu()
    dtypes = [{"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[d] for d in args.dtype]
    cases = drive(dtypes)
    payload = {"arch": args.arch, "triton": triton.__version__, "torch": torch.__version__, "cases": cases,
               "launches": LAUNCHES}
    print(f"{len(LAUNCHES)} launches, {len({x['ptx'] for x in LAUNCHES})} distinct PTX, "
          f"{len({x['kernel'] for x in LAUNCHES})} kernels", file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
