"""``leanmoe bench | verify | info``: measure, check, and describe the expert backends on this machine.

- ``bench``: for each preset, routing, backend and mode, check the backend against the fp32 reference, then time it
  and measure its memory (``docs/BENCHMARK_PROTOCOL.md``); print a table with the environment; optionally write JSON,
  Markdown and a PNG chart. ``--mode decode`` (alias ``--decode``) is the decode table: the forward at T in
  {1, 4, 16, 64, 256} with the touched weights' bandwidth against a copy on the device (``--hf`` with it: tokens/s
  of greedy generation). ``--mask-fraction F`` masks a fixed random fraction of the tokens (``token_mask``).
  ``--hf MODEL --lora RANK``: the model's LoRA step, leanmoe's adapters against transformers + PEFT's
  (:mod:`leanmoe.bench.hf_lora`).
  ``--lora RANK``: the layer with ExpertLoRA adapters on frozen base weights against the same frozen layer without
  them (:mod:`leanmoe.bench.lora`).
  ``--hf MODEL_TYPE`` benchmarks a Hugging Face model family instead (or as well, with ``--preset``). Exit status 1
  when any check FAILED or a run stopped early (130 when interrupted), keeping the rows it measured; 2 for a usage
  error (one line; output paths are checked before any work).
- ``verify``: the checks alone.
- ``info``: versions, device, registered backends, and which backend ``auto`` picks for the default case and why.

Defaults: on a CUDA GPU, preset qwen3-30b-a3b at its training T in bf16, fwd and fwdbwd, every backend but the
reference; on the CPU, the presets scaled down (labelled ``(CPU-scaled)``) in float32, so that the run takes seconds,
and only the backends that run there by default (a Triton backend would run in its interpreter; named, it runs).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import sys
from pathlib import Path
from typing import NoReturn

import torch

from leanmoe.bench import env as bench_env
from leanmoe.bench.harness import (
    TOLERANCES,
    BenchPlan,
    copy_gbps,
    cpu_default_backends,
    default_backends,
    dense_matmul_tflops,
    describe_preset,
    run_plan,
    unsupported_reason,
)
from leanmoe.bench.presets import (
    CPU_MAX_DIM,
    CPU_MAX_EXPERTS,
    CPU_MAX_HIDDEN_DIM,
    CPU_MAX_TOP_K,
    DECODE_TOKENS,
    DEFAULT_PRESET,
    MODES,
    PRESETS,
    ROUTINGS,
    Preset,
    cpu_scaled,
)
from leanmoe.bench.report import (
    BENCH_COLUMNS,
    HF_COLUMNS,
    VERIFY_COLUMNS,
    cpu_columns,
    load_json,
    make_progress,
    markdown,
    print_table,
    write_json,
)
from leanmoe.experts import ExpertsCall, available_backends, explain_backend, get_backend
from leanmoe.lora import LORA_BACKENDS

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
HF_DEFAULT_TOKENS = {"cuda": 4096, "cpu": 64}


def _add_case_args(p: argparse.ArgumentParser, *, token_counts: bool = False) -> None:
    p.add_argument("--preset", action="extend", nargs="+", metavar="P",
                   help=f"model shapes to run (default {DEFAULT_PRESET}); any of: {', '.join(PRESETS)}, or all")
    p.add_argument("--device", choices=("cuda", "cpu"), help="default: cuda when available, else cpu")
    p.add_argument("--dtype", choices=tuple(DTYPES), help="default: bf16 on cuda, fp32 on cpu")
    if token_counts:
        p.add_argument("--tokens", type=int, action="extend", nargs="+", metavar="T",
                       help="tokens per call, one or more counts (default: the preset's training T; with --mode "
                            f"decode, {', '.join(map(str, DECODE_TOKENS))}); --hf takes one count")
    else:
        p.add_argument("--tokens", type=int, metavar="T", help="tokens per call (default: the preset's training T)")
    p.add_argument("--full-size", action="store_true",
                   help="on the CPU, keep the presets' real dims (slow, many GB) instead of scaling them down")


def _add_run_args(p: argparse.ArgumentParser) -> None:
    _add_case_args(p, token_counts=True)
    p.add_argument("--backend", action="extend", nargs="+", metavar="B",
                   help="backends to run (default: every registered backend but the reference, which is always "
                        "computed for the check and timed only when named; on the CPU, only those that run there, "
                        "so not the Triton ones)")
    p.add_argument("--mode", action="extend", nargs="+", choices=(*MODES, "decode"),
                   help="fwd, fwdbwd or both (default: both); decode: the decode table, forward only at T in "
                        f"{{{', '.join(map(str, DECODE_TOKENS))}}} (unless --tokens), with the touched expert "
                        "weights' bandwidth against a copy on the device")
    p.add_argument("--decode", action="store_true", help="the same as --mode decode")
    p.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=None,
                   help="time the forward as CUDA-graph replays, as a server runs it (no host launch overhead; "
                        "CUDA only; default: on for the decode table on CUDA, off otherwise); with --hf M --mode "
                        "decode: generate() compiled by transformers (torch.compile, CUDA graphs), else eager")
    p.add_argument("--routing", action="extend", nargs="+", choices=ROUTINGS, help="default: uniform")
    p.add_argument("--save-percent", type=float, default=0, metavar="S",
                   help="the backends' save_percent in [0, 100] (default 0)")
    p.add_argument("--mask-fraction", type=float, default=0.0, metavar="F",
                   help="mask this fraction of each case's tokens (a fixed random token_mask from --seed), in "
                        "[0, 1); FLOP and bandwidth figures count the kept tokens only (default 0)")
    p.add_argument("--seed", type=int, default=0, help="seed of the inputs and the routing (default 0)")
    p.add_argument("--json", metavar="FILE", help="write every row and the environment as JSON")
    p.add_argument("--lora", type=_lora_rank, metavar="RANK",
                   help="the layer with ExpertLoRA adapters of this rank (alpha 2*RANK, gate_up and down) on frozen "
                        "base weights, against the same frozen layer without adapters on leanmoe's fastest backend "
                        "(triton on CUDA); fwdbwd unless --mode; backends: auto's pick and grouped_mm (and the "
                        f"reference on the CPU), or any of {', '.join(LORA_BACKENDS)}, auto; with --hf MODEL: the "
                        "model's LoRA training step with leanmoe's adapters against transformers + PEFT's")


def _lora_rank(text: str) -> int:
    try:
        rank = int(text)
    except ValueError:
        rank = None
    if rank is None or rank < 1:
        raise argparse.ArgumentTypeError(f"RANK must be a positive int (the LoRA rank), got {text!r}")
    return rank


class _Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors (``leanmoe bench: error: ...``, exit status 2): a mistake on the command
    line reads as one sentence, never as a traceback or a screen of usage."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="leanmoe", description="leanmoe: fast, memory-lean MoE layers.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{bench,verify,info}",
                                parser_class=_Parser)

    bench = sub.add_parser("bench", help="check, then time and measure the memory of each backend",
                           description="Check each backend against the fp32 reference, then time it and measure "
                                       "its peak extra memory (docs/BENCHMARK_PROTOCOL.md).")
    _add_run_args(bench)
    bench.set_defaults(command_parser=bench)
    bench.add_argument("--markdown", metavar="FILE", help="write the table, environment and command as Markdown")
    bench.add_argument("--plot", metavar="PNG", help="write a chart of TFLOP/s and peak memory per backend")
    bench.add_argument("--hf", metavar="MODEL_TYPE",
                       help="benchmark a Hugging Face model family (transformers' expert implementations vs "
                            "leanmoe); runs alone unless --preset is given too")
    bench.add_argument("--hf-layers", type=int, default=2, metavar="N", help="decoder layers for --hf (default 2)")
    bench.add_argument("--from-json", nargs="+", metavar="FILE",
                       help="measure nothing: report the rows of earlier --json files (merged), with --markdown, "
                            "--plot and --json")

    verify = sub.add_parser("verify", help="check each backend against the fp32 reference (no timing)",
                            description="Check each backend's output and gradients against the fp32 reference.")
    _add_run_args(verify)
    verify.set_defaults(command_parser=verify)

    info = sub.add_parser("info", help="versions, device, backends, and what auto picks here")
    _add_case_args(info)
    info.set_defaults(command_parser=info)
    return parser


# --------------------------------------------------------------------------------------------- argument checks


def _resolve_device(parser: argparse.ArgumentParser, args: argparse.Namespace) -> torch.device:
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch.cuda.is_available() is False")
    return torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))


def _resolve_presets(parser: argparse.ArgumentParser, args: argparse.Namespace, device: torch.device
                     ) -> list[Preset]:
    names = [n for name in args.preset or [DEFAULT_PRESET] for n in (PRESETS if name == "all" else [name])]
    names = list(dict.fromkeys(names))
    unknown = [n for n in names if n not in PRESETS]
    if unknown:
        parser.error(f"unknown preset(s) {', '.join(map(repr, unknown))}; expected any of: {', '.join(PRESETS)}")
    presets = [PRESETS[n] for n in names]
    if device.type == "cpu" and not args.full_size:
        presets = [cpu_scaled(p) for p in presets]
    return presets


def _resolve_backends(parser: argparse.ArgumentParser, args: argparse.Namespace, calls: list[ExpertsCall]
                      ) -> tuple[list[str], dict[str, str]]:
    """The backends to run, and those left out of a CPU run's default (with why)."""
    if args.backend is None:
        if not calls or calls[0].device.type != "cpu":
            return default_backends(), {}
        backends, left_out = cpu_default_backends(default_backends(), calls)
        if not backends:
            parser.error("no registered backend runs these cases on the CPU by default: "
                         + "; ".join(f"{name}: {why}" for name, why in left_out.items())
                         + "; name one with --backend to run it anyway")
        return backends, left_out
    names = list(dict.fromkeys(args.backend))
    known = available_backends()
    unknown = [n for n in names if n not in known]
    if unknown:
        parser.error(f"unknown backend(s) {', '.join(map(repr, unknown))}; registered: {', '.join(known)}")
    return names, {}


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for tokens in args.tokens if isinstance(args.tokens, list) else [args.tokens]:
        if tokens is not None and tokens < 1:
            parser.error(f"--tokens must be >= 1, got {tokens}")
    if not 0 <= getattr(args, "save_percent", 0) <= 100:
        parser.error(f"--save-percent must be in [0, 100], got {args.save_percent:g}")
    mask_fraction = getattr(args, "mask_fraction", 0.0)
    if not 0 <= mask_fraction < 1:  # NaN fails too
        parser.error(f"--mask-fraction must be in [0, 1), got {mask_fraction:g}")
    if getattr(args, "hf_layers", 1) < 1:
        parser.error(f"--hf-layers must be >= 1, got {args.hf_layers}")
    _check_output_paths(parser, args)


def _check_output_paths(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Every output file can be written, before any work: a typo in a path must not cost a long run."""
    seen: dict[str, str] = {}
    for flag in ("--json", "--markdown", "--plot"):
        path = getattr(args, flag.removeprefix("--"), None)
        if path is None:
            continue
        _check_writable(parser, flag, path)
        same = seen.setdefault(os.path.realpath(path), flag)
        if same != flag:
            parser.error(f"{same} and {flag} name the same file {path!r}; give each its own")


def _check_writable(parser: argparse.ArgumentParser, flag: str, path: str) -> None:
    target = Path(path)
    if target.is_dir():
        parser.error(f"{flag} {path!r} is a directory; expected a file name")
    parent = target.parent
    if not parent.exists():
        parser.error(f"{flag} {path!r}: the directory {str(parent)!r} does not exist")
    if not parent.is_dir():
        parser.error(f"{flag} {path!r}: {str(parent)!r} is not a directory")
    # Opening for append is the one check that holds for every user (root included) and file system; a file that
    # was not there before is removed again.
    existed = target.exists()
    try:
        with open(target, "a"):
            pass
    except OSError as exc:
        parser.error(f"{flag} {path!r} cannot be written: {exc.strerror or exc}")
    if not existed:
        target.unlink(missing_ok=True)


def _check_hf_model_type(parser: argparse.ArgumentParser, model_type: str) -> None:
    from leanmoe.bench.hf import BENCH_MODEL_TYPES  # imports torch only; transformers is needed to run, not here

    if model_type not in BENCH_MODEL_TYPES:
        parser.error(f"--hf: unknown model type {model_type!r}; expected one of: {', '.join(BENCH_MODEL_TYPES)}")


def _resolve_modes(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[str]:
    """The modes to run; sets ``args.decode`` for ``--mode decode`` (``--decode`` is its alias)."""
    requested = list(dict.fromkeys(args.mode or ()))
    args.decode = args.decode or "decode" in requested
    modes = [m for m in requested if m != "decode"]
    if args.decode and args.lora is not None:
        parser.error("--lora measures the training step (fwdbwd) or fwd; it cannot be combined with --mode decode")
    if args.lora is not None:
        return modes or ["fwdbwd"]
    if args.decode:
        if "fwdbwd" in modes:
            parser.error("--mode decode times the forward only: it cannot be combined with fwdbwd")
        return ["fwd"]
    return modes or list(MODES)


def _cuda_graphs(parser: argparse.ArgumentParser, args: argparse.Namespace, device: torch.device,
                 modes: list[str]) -> bool:
    """Whether the forward is timed as CUDA-graph replays: ``--cuda-graphs``, else on for the decode table on CUDA."""
    if args.cuda_graphs is None:
        return bool(args.decode) and device.type == "cuda" and args.lora is None
    if args.cuda_graphs and device.type != "cuda":
        parser.error(f"--cuda-graphs needs a CUDA device, got --device {device.type}")
    if args.cuda_graphs and "fwd" not in modes:
        parser.error("--cuda-graphs times the forward: add --mode fwd (or --mode decode)")
    return bool(args.cuda_graphs)


def _hf_tokens(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int | None:
    """The one token count that ``--hf`` takes (None: its default)."""
    if not args.tokens:
        return None
    if len(set(args.tokens)) > 1:
        parser.error(f"--hf takes one --tokens count, got {' '.join(map(str, args.tokens))}")
    return args.tokens[0]


def _plan(parser: argparse.ArgumentParser, args: argparse.Namespace, *, check_only: bool
          ) -> tuple[BenchPlan, dict[str, str]]:
    """The run's plan, and the backends left out of a CPU run's default with why."""
    _check_args(parser, args)
    device = _resolve_device(parser, args)
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    presets = _resolve_presets(parser, args, device)
    modes = _resolve_modes(parser, args)
    plan = BenchPlan(
        presets=presets,
        backends=[],
        named_backends=frozenset(args.backend or ()),
        modes=modes,
        routings=list(dict.fromkeys(args.routing or ["uniform"])),
        tokens=tuple(dict.fromkeys(args.tokens)) if args.tokens else None,
        decode=args.decode,
        save_percent=args.save_percent,
        dtype=dtype,
        device=device,
        check_only=check_only,
        seed=args.seed,
        mask_fraction=args.mask_fraction,
        lora_rank=args.lora,
        cuda_graphs=_cuda_graphs(parser, args, device, modes),
    )
    if args.lora is not None:
        return dataclasses.replace(plan, backends=_lora_backends(parser, args, device)), {}
    calls = [describe_preset(p, T, dtype=dtype, device=device, requires_grad=mode == "fwdbwd",
                             save_percent=args.save_percent)
             for p in presets for T in plan.token_counts(p) for mode in modes]
    backends, left_out = _resolve_backends(parser, args, calls)
    return dataclasses.replace(plan, backends=backends), left_out


def _lora_backends(parser: argparse.ArgumentParser, args: argparse.Namespace, device: torch.device) -> list[str]:
    """The LoRA backends to run: those named (each in LORA_BACKENDS or auto), else triton and grouped_mm on CUDA
    (``auto`` measures between them there: the rows show both), and on the CPU auto's pick (grouped_mm) and the
    reference (too slow to time at full size)."""
    if args.backend is None:
        return ["triton", "grouped_mm"] if device.type == "cuda" else ["auto", "grouped_mm", "reference"]
    names = list(dict.fromkeys(args.backend))
    bad = [n for n in names if n not in (*LORA_BACKENDS, "auto")]
    if bad:
        parser.error(f"--lora: backend(s) {', '.join(map(repr, bad))} take no LoRA adapters; expected any of: "
                     f"{', '.join(LORA_BACKENDS)}, auto")
    return names


def _run_env(plan: BenchPlan, argv: list[str], left_out: dict[str, str]) -> dict:
    env = bench_env.collect_env(plan.device, argv)
    env.update(dtype=str(plan.dtype).removeprefix("torch."), tolerance=TOLERANCES[plan.dtype],
               save_percent=plan.save_percent, mask_fraction=plan.mask_fraction, dense_tflops=None, copy_gbps=None,
               notes=[])
    if plan.mask_fraction:
        env["notes"].append(f"token mask: {plan.mask_fraction:.0%} of each case's tokens masked (floor of the "
                            "fraction, a fixed random mask); TFLOP/s and GB/s count the kept tokens only, and the "
                            "reference check applies the same mask.")
    if plan.lora_rank is not None:
        env["lora_rank"] = plan.lora_rank
        env["notes"].append(
            f"LoRA: ExpertLoRA rank {plan.lora_rank}, alpha {2 * plan.lora_rank}, targets gate_up and down, B drawn "
            "small and random (not zero); base expert weights frozen, x and the routing weights require grad. Rows "
            "with LoRA 'none' are the same frozen layer without adapters (the baseline); 'x no-LoRA' and 'act x "
            "no-LoRA' are a row's time and activation memory over the baseline's. Each LoRA row is checked (output; "
            "gradients of x, the routing weights and the four LoRA factors) against the reference loop with the "
            "adapter in fp32. TFLOP/s is not reported: the frozen base skips the weight-gradient GEMMs.")
    if not plan.check_only:
        env["timer"] = ("triton.testing.do_bench median" if plan.device.type == "cuda"
                        else "median of perf_counter timings")
        if plan.cuda_graphs:
            env["timer"] += " of CUDA-graph replays (forward; captured after 3 warm-up calls)"
    if plan.device.type == "cpu":
        env["summary"] = _summary(plan)
        if left_out:
            by_reason: dict[str, list[str]] = {}
            for name, why in left_out.items():
                by_reason.setdefault(why, []).append(name)
            env["notes"].append("left out of the CPU default (name one with --backend to run it): "
                                + "; ".join(f"{', '.join(names)}: {why}" for why, names in by_reason.items()))
        if any(p.label != p.name for p in plan.presets):
            env["notes"].append(f"CPU run: presets scaled down (D ≤ {CPU_MAX_DIM}, I ≤ {CPU_MAX_HIDDEN_DIM}, "
                                f"E ≤ {CPU_MAX_EXPERTS}, K ≤ {CPU_MAX_TOP_K}); memory is measured on CUDA only.")
        else:
            env["notes"].append("CPU run: memory is measured on CUDA only.")
    return env


def _summary(plan: BenchPlan) -> str:
    """One line saying what the run measured and where, above the table of a CPU run."""
    if len(plan.presets) == 1:
        p = plan.presets[0]
        what = f"{p.name} (D={p.dim}, I={p.hidden_dim}, E={p.num_experts}, K={p.top_k}"
        what += ", CPU-scaled)" if p.label != p.name else ")"
    else:
        what = f"{len(plan.presets)} presets" + (" (CPU-scaled)" if any(p.label != p.name for p in plan.presets)
                                                 else "")
    tokens = sorted({T for p in plan.presets for T in plan.token_counts(p)})
    masked = f", {plan.mask_fraction:.0%} of tokens masked" if plan.mask_fraction else ""
    how = "checked against the fp32 reference" + ("" if plan.check_only else ", then timed")
    modes = "decode (fwd)" if plan.decode else " and ".join(plan.modes)
    if plan.lora_rank is not None:
        modes += f" with LoRA rank {plan.lora_rank} (base frozen) and without"
    backends = ("backends " if len(plan.backends) > 1 else "backend ") + ", ".join(plan.backends)
    return (f"measured: {what} at T={'/'.join(map(str, tokens))}{masked}, {' and '.join(plan.routings)} routing, "
            f"{modes}, {backends}; {str(plan.dtype).removeprefix('torch.')} on the CPU; each row {how}")


# ---------------------------------------------------------------------------------------------------- commands


class _StoppedEarly(Exception):
    """A run that ended before its last row; carries what it measured (``rows``) and why it stopped (``cause``)."""

    def __init__(self, rows: list[dict], cause: BaseException) -> None:
        super().__init__(f"{type(cause).__name__}: {cause}")
        self.rows, self.cause = rows, cause


def _bench(parser: argparse.ArgumentParser, args: argparse.Namespace, argv: list[str], *, check_only: bool) -> int:
    if not check_only and args.from_json:
        _check_output_paths(parser, args)
        try:
            rows, env, hf_rows = load_json(args.from_json)
        except ValueError as exc:
            parser.error(f"--from-json: {exc}")
        return _report(args, rows, env, hf_rows, title="leanmoe bench", check_only=False)
    plan, left_out = _plan(parser, args, check_only=check_only)
    hf_only = not check_only and args.hf is not None and args.preset is None
    if hf_only and args.mask_fraction:
        parser.error("--mask-fraction applies to the expert-layer rows (--preset), not to --hf")
    if not check_only and args.hf is not None:
        _check_hf_model_type(parser, args.hf)
    if plan.device.type == "cuda" and not check_only and importlib.util.find_spec("triton") is None:
        raise SystemExit("timing on CUDA uses triton.testing.do_bench: pip install 'leanmoe[triton]'")
    if not check_only and args.plot and importlib.util.find_spec("matplotlib") is None:
        raise SystemExit("--plot needs matplotlib: pip install 'leanmoe[bench]'")
    run_hf_bench = _load_hf_bench() if not check_only and args.hf is not None else None

    hf_tokens = _hf_tokens(parser, args) if run_hf_bench is not None else None

    env = _run_env(plan, argv, left_out)
    if hf_only and plan.lora_rank is not None:  # no expert-layer rows: say what the model rows compare instead
        env["notes"] = [f"LoRA (--hf): leanmoe's ExpertLoRA and PEFT's parameter LoRA with the same rank-"
                        f"{plan.lora_rank} adapter (alpha {2 * plan.lora_rank}, gate_up and down, B small and random) "
                        "on frozen base weights; each row's logits are checked against the fp32 model with the "
                        "tolerance in its tol column, and the training step (forward with labels, backward into "
                        "the adapters) is timed."]
    if run_hf_bench is not None and args.decode:
        from leanmoe.bench.hf import HF_DECODE_TIMER

        # generate() wall times, not the expert-layer timer; --cuda-graphs: transformers' compiled decode step
        env["timer"] = HF_DECODE_TIMER + ("; compiled (torch.compile, CUDA graphs)" if args.cuda_graphs
                                          else "; eager")
    if plan.device.type == "cuda" and not check_only and not hf_only and plan.lora_rank is None:
        print("measuring the dense bf16 matmul and device copy rates ...", file=sys.stderr, flush=True)
        env["dense_tflops"] = dense_matmul_tflops(plan.device)
        if plan.decode:
            env["copy_gbps"] = copy_gbps(plan.device)
        torch.cuda.empty_cache()
    elif plan.decode and not check_only and not hf_only:
        # The protocol's decode reference, on the CPU too: a copy larger than the caches, in the same run.
        print("measuring the copy rate within the device ...", file=sys.stderr, flush=True)
        env["copy_gbps"] = copy_gbps(plan.device)

    rows_so_far: list[dict] = []

    def keep(rows_: list[dict]) -> None:
        rows_so_far[:] = rows_
        if args.json:
            write_json(args.json, rows_, env)

    title = "leanmoe verify" if check_only else "leanmoe bench"
    hf_rows = None
    try:
        rows = [] if hf_only else run_plan(plan, make_progress(), dense_tflops=env["dense_tflops"],
                                           copy_rate_gbps=env["copy_gbps"], on_row=keep)
        if run_hf_bench is not None and args.decode:
            # Greedy generate() throughput; --tokens is the batch of prompts (one decode step's T).
            from leanmoe.bench.hf import HF_DECODE_BATCH, run_hf_decode_bench

            print(f"benchmarking Hugging Face model type {args.hf!r} in decode ...", file=sys.stderr, flush=True)
            # --cuda-graphs: generate() as transformers compiles it (CUDA graphs); by default eager.
            hf_rows = run_hf_decode_bench(args.hf, device=plan.device, dtype=plan.dtype, layers=args.hf_layers,
                                          batch=hf_tokens or HF_DECODE_BATCH[plan.device.type],
                                          compiled=args.cuda_graphs is True,
                                          backends=plan.backends if args.backend else None)
        elif run_hf_bench is not None and args.lora is not None:
            # The LoRA step of the model: leanmoe's expert adapters against transformers + PEFT, same adapter.
            from leanmoe.bench.hf_lora import run_hf_lora_bench

            print(f"benchmarking Hugging Face model type {args.hf!r} with LoRA rank {args.lora} ...",
                  file=sys.stderr, flush=True)
            hf_rows = run_hf_lora_bench(args.hf, device=plan.device, dtype=plan.dtype,
                                        tokens=hf_tokens or HF_DEFAULT_TOKENS[plan.device.type],
                                        layers=args.hf_layers, rank=args.lora)
        elif run_hf_bench is not None:
            print(f"benchmarking Hugging Face model type {args.hf!r} ...", file=sys.stderr, flush=True)
            hf_rows = run_hf_bench(args.hf, device=plan.device, dtype=plan.dtype,
                                   tokens=hf_tokens or HF_DEFAULT_TOKENS[plan.device.type], layers=args.hf_layers,
                                   save_percent=args.save_percent)
    except (Exception, KeyboardInterrupt) as exc:
        if isinstance(exc, ValueError | TypeError) and not rows_so_far:
            raise  # nothing measured: a bad combination of options, which main reports as a usage error
        # Anything later keeps what was measured: the rows so far are printed and written, and the status says so.
        return _stopped(args, env, title, check_only, _StoppedEarly(list(rows_so_far), exc))
    return _report(args, rows, env, hf_rows, title=title, check_only=check_only)


def _stopped(args: argparse.Namespace, env: dict, title: str, check_only: bool, stop: _StoppedEarly) -> int:
    """Reports and writes the rows of a run that stopped early; exit status 130 when interrupted, else 1."""
    interrupted = isinstance(stop.cause, KeyboardInterrupt)
    why = "interrupted" if interrupted else f"stopped by {stop}"
    env["notes"] = [*env.get("notes", []), f"incomplete run: {why} after {len(stop.rows)} row(s)"]
    _report(args, stop.rows, env, None, title=title, check_only=check_only)
    print(f"{title}: {why} after {len(stop.rows)} row(s); the table and files above hold those rows",
          file=sys.stderr)
    return 130 if interrupted else 1


def _report(args: argparse.Namespace, rows: list[dict], env: dict, hf_rows: list[dict] | None, *, title: str,
            check_only: bool) -> int:
    """Prints the tables, writes the requested files, and returns the exit status (1 when a check FAILED)."""
    columns = VERIFY_COLUMNS if check_only else BENCH_COLUMNS
    if rows and all(row.get("device") == "cpu" for row in rows):
        columns = cpu_columns(columns)
    if rows:
        print_table(rows, env, columns=columns, title=title)
    if hf_rows is not None:
        print_table(hf_rows, env, columns=HF_COLUMNS, title="leanmoe bench --hf")
    if args.json:
        write_json(args.json, rows, env, hf_rows)
        print(f"wrote {args.json}")
    if not check_only and args.markdown:
        Path(args.markdown).write_text(markdown(rows, env, columns=columns, title=title, hf_rows=hf_rows))
        print(f"wrote {args.markdown}")
    if not check_only and args.plot:
        if rows:
            from leanmoe.bench.plot import write_plot

            write_plot(args.plot, rows, env)
            print(f"wrote {args.plot}")
        else:
            print(f"no expert-layer rows to plot: {args.plot} not written", file=sys.stderr)

    failed = [r for r in rows if r["status"] == "FAILED"]
    # leanmoe.bench.hf marks skipped rows (a note starting "skipped") ok=False too; those are not failures.
    failed_hf = [r for r in hf_rows or () if not r.get("ok") and not str(r.get("note") or "").startswith("skipped")]
    if failed or failed_hf:
        print(f"{len(failed) + len(failed_hf)} check(s) FAILED", file=sys.stderr)
        return 1
    return 0


def _load_hf_bench():
    if importlib.util.find_spec("transformers") is None:
        raise SystemExit("--hf needs transformers: pip install 'leanmoe[hf]'")
    if importlib.util.find_spec("leanmoe.bench.hf") is None:
        raise SystemExit("--hf: leanmoe.bench.hf is missing from this install of leanmoe")
    from leanmoe.bench.hf import run_hf_bench

    return run_hf_bench


def _info(parser: argparse.ArgumentParser, args: argparse.Namespace, argv: list[str]) -> int:
    _check_args(parser, args)
    device = _resolve_device(parser, args)
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    preset = _resolve_presets(parser, args, device)[0]
    T = args.tokens or preset.train_tokens
    env = bench_env.collect_env(device, argv)
    print(f"leanmoe {env['leanmoe']}" + (f" (commit {env['git_commit']})" if env["git_commit"] else ""))
    print(f"torch {env['torch']}" + (f" (CUDA {torch.version.cuda})" if torch.version.cuda else "")
          + f", triton {env['triton'] or 'not installed'}, python {env['python']}")
    print(f"device: {env['device']}")
    calls = {
        "training (fwdbwd)": describe_preset(preset, T, dtype=dtype, device=device, requires_grad=True),
        "inference (fwd)": describe_preset(preset, T, dtype=dtype, device=device, requires_grad=False),
    }
    shape = (f"{preset.label}: T={T}, D={preset.dim}, I={preset.hidden_dim}, E={preset.num_experts}, "
             f"K={preset.top_k}, {preset.activation.name}, {preset.gate_up_layout}"
             + (", biases" if preset.bias else "") + f", {str(dtype).removeprefix('torch.')} on {device}")
    print(f"\nbackends (best first), for {shape}:")
    for name in available_backends():
        reasons = {what.split()[0]: unsupported_reason(name, call) for what, call in calls.items()}
        if len(set(reasons.values())) == 1:
            reason = next(iter(reasons.values()))
            status = "runs" if reason is None else f"unsupported: {reason}"
        else:
            status = "; ".join(f"{what}: " + ("runs" if r is None else f"unsupported: {r}")
                               for what, r in reasons.items())
        print(f"  {name:<12} priority {get_backend(name).priority:<4} {status}")
    print("\nbackend='auto' here:")
    for what, call in calls.items():
        print(f"  {what}: {explain_backend(call)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """The ``leanmoe`` console script; returns the exit status (2 for a usage error)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    parser: argparse.ArgumentParser = args.command_parser
    try:
        if args.command == "info":
            return _info(parser, args, argv)
        return _bench(parser, args, argv, check_only=args.command == "verify")
    except (ValueError, TypeError) as exc:
        # leanmoe's own validation of an option combination (an activation, a dtype a backend refuses, ...): a
        # usage error in one line, like argparse's.
        parser.error(str(exc))
    except KeyboardInterrupt:  # before the first row (later ones are kept and reported by _bench)
        print(f"{parser.prog}: interrupted before any row was measured", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
