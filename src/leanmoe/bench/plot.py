"""A PNG of a benchmark run: TFLOP/s (top) and peak extra memory (bottom) per case, one bar per backend.

Without memory figures (a CPU run: memory is measured on CUDA only) the chart has the speed panel alone, which says
so; rates measured on the CPU are drawn in GFLOP/s.

matplotlib is imported here only, through its object API with the Agg canvas (no pyplot global state, no display).
"""

from __future__ import annotations

import importlib.util
import textwrap
from pathlib import Path

from leanmoe.bench.report import env_lines


def _case_label(row: dict) -> str:
    return f"{row['label']}\nT={row['tokens']} {row['routing']} {row['mode']}"


def _short(v: float) -> str:
    return f"{v:.0f}" if v >= 100 else f"{v:.1f}" if v >= 10 else f"{v:.2g}"


def write_plot(path: str | Path, rows: list[dict], env: dict) -> None:
    """Writes the chart of ``rows`` (from :func:`leanmoe.bench.harness.run_plan`) to ``path``."""
    if importlib.util.find_spec("matplotlib") is None:
        raise SystemExit("--plot needs matplotlib: pip install 'leanmoe[bench]'")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cases = list(dict.fromkeys(_case_label(r) for r in rows))
    backends = list(dict.fromkeys(r["backend"] for r in rows))
    by_key = {(_case_label(r), r["backend"]): r for r in rows}
    width = 0.8 / max(1, len(backends))

    has_memory = any(r.get("peak_mem_mb") is not None for r in rows)
    on_cpu = all(r.get("device") == "cpu" for r in rows)
    scale, unit = (1e3, "GFLOP/s") if on_cpu else (1.0, "TFLOP/s")
    fig = Figure(figsize=(max(10.0, 0.45 * len(cases) * len(backends) + 3), 10 if has_memory else 6),
                 layout="constrained")
    FigureCanvasAgg(fig)
    if has_memory:
        speed_ax, mem_ax = fig.subplots(2, 1, sharex=True)
    else:
        speed_ax, mem_ax = fig.subplots(1, 1), None
    colors = [f"C{i}" for i in range(len(backends))]
    act_legend = False

    for b, backend in enumerate(backends):
        xs, speeds, peaks, acts, act_xs = [], [], [], [], []
        for c, case in enumerate(cases):
            row = by_key.get((case, backend))
            x = c + (b - (len(backends) - 1) / 2) * width
            if row is None:
                continue
            if row["tflops"] is None:
                # No bar: say why at the base (FAILED, unsupported, skipped).
                speed_ax.text(x, 0, row["status"], rotation=90, ha="center", va="bottom", fontsize=7,
                              color=colors[b])
                continue
            xs.append(x)
            speeds.append(row["tflops"] * scale)
            peaks.append(row["peak_mem_mb"] or 0.0)
            if row["act_mem_mb"] is not None:
                act_xs.append(x)
                acts.append(row["act_mem_mb"])
        bars = speed_ax.bar(xs, speeds, width, label=backend, color=colors[b])
        speed_ax.bar_label(bars, labels=[_short(v) for v in speeds], fontsize=6)
        if mem_ax is not None:
            bars = mem_ax.bar(xs, peaks, width, label=f"{backend} peak extra", color=colors[b])
            mem_ax.bar_label(bars, labels=[_short(v) for v in peaks], fontsize=6)
            if acts:
                mem_ax.bar(act_xs, acts, width * 0.5, color="none", edgecolor="black", hatch="//",
                           label="activation memory (fwdbwd: peak minus weight gradients)" if not act_legend
                           else "_nolegend_")
                act_legend = True

    if env.get("dense_tflops"):
        speed_ax.axhline(env["dense_tflops"], color="grey", linestyle="--", linewidth=1,
                         label=f"dense bf16 matmul ({env['dense_tflops']:.0f})")
    speed_ax.set_ylabel(unit)
    speed_ax.set_title("Speed" if has_memory else "Speed (no memory panel: peak memory is measured on CUDA only)")
    speed_ax.legend(fontsize=8)
    if mem_ax is not None:
        mem_ax.set_ylabel("MiB")
        mem_ax.set_title("Peak extra memory of one call")
        mem_ax.legend(fontsize=8)
    (mem_ax or speed_ax).set_xticks(range(len(cases)), cases, rotation=60, ha="right", fontsize=8)
    lines = [line for line in env_lines(env) if line != env.get("summary")]
    title = [textwrap.fill(line, 160, subsequent_indent="    ") for line in lines[:2]]
    fig.suptitle("\n".join(title), fontsize=9)
    fig.savefig(path, dpi=120)
