"""Reports of a benchmark run: progress while it runs, then a terminal table, JSON, and a Markdown section.

Every report carries the environment (:func:`leanmoe.bench.env.collect_env`) and the command that produced it.
rich is used when installed and the output is a terminal; plain text otherwise (logs stay readable).
"""

from __future__ import annotations

import importlib.util
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from leanmoe.bench.harness import Progress


def _fmt(fmt: str) -> Callable[[object], str]:
    return lambda v: "" if v is None else format(v, fmt)


def _pct(v: Any) -> str:
    return "" if v is None else f"{100 * v:.0f}%"


def _lora(v: Any) -> str:
    # 0: the baseline row of a LoRA run, the same layer without adapters.
    return "" if v is None else "none" if v == 0 else f"r={v}"


def _rate(v: Any) -> str:
    # Three significant digits for CPU-sized rates, no decimals for GPU-sized ones.
    if v is None:
        return ""
    return f"{v:.0f}" if v >= 100 else f"{v:.1f}" if v >= 10 else f"{v:.3g}"


# (header, row key, formatter): a column is shown only when some row has a value for it.
BENCH_COLUMNS: list[tuple[str, str, Callable[[object], str]]] = [
    ("preset", "label", str),
    ("T", "tokens", str),
    ("masked", "mask_fraction", _pct),
    ("routing", "routing", str),
    ("mode", "mode", str),
    ("backend", "backend", str),
    ("LoRA", "lora_rank", _lora),
    ("status", "status", str),
    ("ms", "ms", _fmt(".3f")),
    ("x no-LoRA", "lora_ratio", _fmt(".2f")),
    ("TFLOP/s", "tflops", _rate),
    ("% dense", "frac_dense", _pct),
    ("GB/s", "gbps", _rate),
    ("% copy", "frac_copy", _pct),
    ("peak MiB", "peak_mem_mb", _fmt(".0f")),
    ("act MiB", "act_mem_mb", _fmt(".0f")),
    ("act x no-LoRA", "act_mem_ratio", _fmt(".2f")),
    ("x grouped_mm", "speedup_vs_grouped_mm", _fmt(".2f")),
    ("max rel err", "max_error", _fmt(".1e")),
]

VERIFY_COLUMNS = [c for c in BENCH_COLUMNS if c[1] in ("label", "tokens", "mask_fraction", "routing", "mode", "backend",
                                                       "lora_rank", "status", "max_error")]

HF_COLUMNS: list[tuple[str, str, Callable[[object], str]]] = [
    ("model_type", "model_type", str),
    ("implementation", "implementation", str),
    ("mode", "mode", str),
    ("ms", "ms", _fmt(".3f")),
    ("peak MiB", "peak_mem_mb", _fmt(".0f")),
    ("tokens/s", "tokens_per_s", _rate),
    ("ok", "ok", str),
    ("rel err", "rel_err", _fmt(".1e")),
    # The model's own tolerance (bf16: twice transformers' eager error, at least the dtype's), not the header's.
    ("tol", "tol", _fmt(".1e")),
    ("note", "note", str),
]


#: Values that leave a column out when every row has one: a mask column only when something was masked.
_EMPTY: dict[str, tuple] = {"mask_fraction": (None, 0, 0.0)}


def tabulate(rows: list[dict], columns=BENCH_COLUMNS) -> tuple[list[str], list[list[str]], list[str]]:
    """Headers, string cells of the columns that have at least one value, and the numbered notes that the status
    cells point to (``unsupported (1)``), so that long reasons do not widen the table."""
    shown = [c for c in columns if any(row.get(c[1]) not in _EMPTY.get(c[1], (None,)) for row in rows)]
    notes: list[str] = []
    cells = []
    for row in rows:
        line = []
        for _, key, fmt in shown:
            if key == "status" and row.get("reason"):
                if row["reason"] not in notes:
                    notes.append(row["reason"])
                line.append(f"{row['status']} ({notes.index(row['reason']) + 1})")
            else:
                line.append(fmt(row.get(key)))
        cells.append(line)
    return [header for header, _, _ in shown], cells, [f"({i}) {note}" for i, note in enumerate(notes, 1)]


def _code_id(env: dict) -> str:
    given = [f"commit {env['git_commit']}" if env.get("git_commit") else None,
             f"source {env['source_sha256']}" if env.get("source_sha256") else None]
    parts = [p for p in given if p]
    return f" ({', '.join(parts)})" if parts else ""


def env_lines(env: dict) -> list[str]:
    """The environment as short lines: device and versions, then the command, then the run's own rates."""
    versions = [env["device"], f"torch {env['torch']}" + (f" (CUDA {env['cuda']})" if env.get("cuda") else ""),
                f"triton {env['triton'] or 'not installed'}",
                f"leanmoe {env['leanmoe']}" + _code_id(env),
                env["date"]]
    lines = [env["summary"]] if env.get("summary") else []
    lines += [" · ".join(versions), f"command: {env['command']}"]
    run = []
    if env.get("dtype"):
        run.append(f"dtype {env['dtype']}, save_percent {env.get('save_percent', 0):g}, check tolerance "
                   f"{env['tolerance']:.0e} (relative L2 error vs the fp32 reference)")
    if env.get("dense_tflops"):
        run.append(f"dense bf16 8192³ matmul {env['dense_tflops']:.0f} TFLOP/s")
    if env.get("copy_gbps"):
        where = "device-to-device" if env.get("cuda") else "in-memory"
        run.append(f"{where} copy {env['copy_gbps']:.0f} GB/s (bytes read + written; the decode reference)")
    if env.get("timer"):
        run.append(f"timer: {env['timer']}")
    if run:
        lines.append(" · ".join(run))
    if env.get("notes"):
        lines.extend(env["notes"])
    return lines


#: Headers of text columns (left-aligned); every other column holds a number and is right-aligned.
_TEXT_HEADERS = frozenset({"preset", "routing", "mode", "backend", "LoRA", "status", "model_type", "implementation",
                           "ok", "note"})


def cpu_columns(columns=BENCH_COLUMNS) -> list[tuple[str, str, Callable[[object], str]]]:
    """``columns`` for rows measured on the CPU: rates in GFLOP/s, where a CPU reaches thousandths of a TFLOP/s."""
    def gflops(v: Any) -> str:
        return _rate(None if v is None else 1e3 * v)

    return [("GFLOP/s", key, gflops) if key == "tflops" else (h, key, f)
            for h, key, f in columns]


def print_table(rows: list[dict], env: dict, *, columns=BENCH_COLUMNS, title: str = "leanmoe bench",
                file: TextIO | None = None) -> None:
    file = file or sys.stdout
    headers, cells, notes = tabulate(rows, columns)
    if importlib.util.find_spec("rich") is not None and file.isatty():
        from rich.console import Console
        from rich.table import Table

        table = Table(title=title, caption="\n".join(notes + env_lines(env)), caption_justify="left")
        for header in headers:
            table.add_column(header, justify="left" if header in _TEXT_HEADERS else "right", overflow="fold")
        for line in cells:
            table.add_row(*line)
        Console(file=file).print(table)
        return
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(headers)]

    def aligned(line: list[str]) -> str:
        return "  ".join(c.ljust(w) if h in _TEXT_HEADERS else c.rjust(w)
                         for h, c, w in zip(headers, line, widths, strict=True)).rstrip()

    print(title, file=file)
    for env_line in env_lines(env):
        print(env_line, file=file)
    print(aligned(headers), file=file)
    print("  ".join("-" * w for w in widths), file=file)
    for line in cells:
        print(aligned(line), file=file)
    for note in notes:
        print(note, file=file)


def markdown(rows: list[dict], env: dict, *, columns=BENCH_COLUMNS, title: str = "leanmoe bench",
             hf_rows: list[dict] | None = None) -> str:
    """A Markdown section (heading, environment, command, table) to paste into ``docs/BENCHMARKS.md``."""
    out = [f"## {title} ({env['date']})", ""]
    out += [f"- {line}" for line in env_lines(env) if not line.startswith("command: ")]
    out += ["", "Command:", "", "```bash", env["command"], "```", ""]

    def table(rows_: list[dict], columns_) -> None:
        headers, cells, notes = tabulate(rows_, columns_)
        out.append("| " + " | ".join(headers) + " |")
        out.append("|" + "|".join(" --- " for _ in headers) + "|")
        for line in cells:
            out.append("| " + " | ".join(c.replace("|", "\\|") for c in line) + " |")
        out.append("")
        if notes:
            out.extend(f"{note}  " for note in notes)
            out.append("")

    if rows:
        table(rows, columns)
    if hf_rows:
        out.append("Hugging Face models (`--hf`):")
        out.append("")
        table(hf_rows, HF_COLUMNS)
    out.append("MiB = 2²⁰ bytes. peak MiB: `max_memory_allocated` during one call minus `memory_allocated` before "
               "it; act MiB: that minus the weight gradients. TFLOP/s (GFLOP/s on the CPU) counts 6·T·K·D·I per "
               "forward (gated; 4·T·K·D·I non-gated; T the kept tokens), three times that for fwdbwd; % dense is "
               "its ratio to the dense bf16 matmul rate; max rel err is the largest ‖out − ref‖ / ‖ref‖ over the "
               "output and every gradient.")
    if any(row.get("lora_rank") is not None for row in rows):
        out.append("")
        out.append("LoRA: r=RANK rows run ExpertLoRA adapters on frozen base weights, none the same frozen layer "
                   "without adapters (the baseline); x no-LoRA and act x no-LoRA are a row's ms and act MiB over "
                   "the baseline's; act MiB of a LoRA row leaves out the LoRA factors' gradients.")
    return "\n".join(out) + "\n"


def write_json(path: str | Path, rows: list[dict], env: dict, hf_rows: list[dict] | None = None) -> None:
    payload = {"env": env, "rows": rows}
    if hf_rows is not None:
        payload["hf_rows"] = hf_rows
    Path(path).write_text(json.dumps(payload, indent=2) + "\n")


#: What a ``--json`` file must hold to be reported again (``--from-json``).
_ENV_KEYS = ("device", "torch", "triton", "leanmoe", "date", "command")
_ROW_KEYS = ("label", "tokens", "routing", "mode", "backend", "status")


def _read_payload(path: str | Path) -> dict:
    """The payload of one ``--json`` file; ``ValueError`` naming the file and what is wrong with it."""
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{str(path)!r} cannot be read: {getattr(exc, 'strerror', None) or exc}") from None
    try:
        payload = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{str(path)!r} is not JSON: {exc}") from None
    expected = "a leanmoe bench --json file (an object with 'env' and 'rows')"
    if not isinstance(payload, dict) or not isinstance(payload.get("env"), dict) or not isinstance(
            payload.get("rows"), list):
        raise ValueError(f"{str(path)!r} is not {expected}")
    missing = [k for k in _ENV_KEYS if k not in payload["env"]]
    if missing:
        raise ValueError(f"{str(path)!r}: its env lacks {', '.join(missing)}; expected {expected}")
    for i, row in enumerate(payload["rows"]):
        if not isinstance(row, dict) or any(k not in row for k in _ROW_KEYS):
            raise ValueError(f"{str(path)!r}: row {i} is not a bench row (expected keys {', '.join(_ROW_KEYS)})")
    if payload.get("hf_rows") is not None and not isinstance(payload["hf_rows"], list):
        raise ValueError(f"{str(path)!r}: hf_rows must be a list, got {type(payload['hf_rows']).__name__}")
    return payload


def load_json(paths: list[str]) -> tuple[list[dict], dict, list[dict] | None]:
    """Rows, environment and HF rows of one or more ``--json`` files, merged in order (the first file's
    environment, with every file's command). ``ValueError`` naming the file when one cannot be read or is not
    a ``--json`` file."""
    rows: list[dict] = []
    hf_rows: list[dict] | None = None
    envs = []
    for path in paths:
        payload = _read_payload(path)
        envs.append(payload["env"])
        rows.extend(payload["rows"])
        if payload.get("hf_rows") is not None:
            hf_rows = (hf_rows or []) + payload["hf_rows"]
    env = dict(envs[0])
    env["command"] = "\n".join(dict.fromkeys(e["command"] for e in envs))
    others = {e["device"] for e in envs[1:]} - {env["device"]}
    if len(paths) > 1:
        env["notes"] = [*env.get("notes", []), f"merged from {len(paths)} runs" +
                        (f" (also on: {', '.join(sorted(others))})" if others else "")]
    return rows, env, hf_rows

# ---------------------------------------------------------------------------------------------------- progress


class PlainProgress(Progress):
    """One line per finished measurement on stderr."""

    def __init__(self, file: TextIO | None = None) -> None:
        self.file = file or sys.stderr
        self.total = self.count = 0

    def start(self, total: int) -> None:
        self.total, self.count = total, 0

    def done(self, description: str, result: str) -> None:
        self.count += 1
        print(f"[{self.count}/{self.total}] {description}: {result}", file=self.file, flush=True)


class RichProgress(Progress):
    """A progress bar on stderr naming the measurement under way, with each result printed above it."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
        from rich.progress import Progress as _Progress

        self._progress = _Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                   TimeElapsedColumn(), console=Console(stderr=True), transient=True)
        self._task: Any = None  # rich's TaskID, from start()

    def start(self, total: int) -> None:
        self._progress.start()
        self._task = self._progress.add_task("starting", total=total)

    def step(self, description: str) -> None:
        self._progress.update(self._task, description=description)

    def done(self, description: str, result: str) -> None:
        self._progress.console.print(f"{description}: {result}", markup=False, highlight=False)
        self._progress.advance(self._task)

    def close(self) -> None:
        self._progress.stop()


def make_progress() -> Progress:
    """rich's progress bar on a terminal when rich is installed, else plain lines to stderr."""
    if importlib.util.find_spec("rich") is not None and sys.stderr.isatty():
        return RichProgress()
    return PlainProgress()
