"""The environment every benchmark table carries: device, versions, commit, date and the exact command.

The one place for it: ``leanmoe bench``, the HF and LoRA benches and the scripts under benchmarks/ take their device
name, package versions, commit and date from here (timing is ``leanmoe.bench.harness.time_ms``).
"""

from __future__ import annotations

import datetime
import hashlib
import importlib.metadata
import os
import platform
import shlex
import subprocess
from pathlib import Path

import torch

import leanmoe


def package_version(name: str) -> str | None:
    """The installed version of distribution ``name``, or ``None`` when it is not installed."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass  # not Linux: fall back to what platform knows
    return platform.processor() or platform.machine() or "unknown CPU"


def utc_date() -> str:
    """Now, as ``YYYY-MM-DD HH:MM UTC``: the date line of every table."""
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def device_name(device: torch.device) -> str:
    """The GPU's name on CUDA; ``CPU: <model> (<n> cores)`` otherwise."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU: {_cpu_name()} ({os.cpu_count()} cores)"


def git_commit() -> str | None:
    """Short commit of the checkout leanmoe is imported from, with ``+dirty`` for uncommitted changes to tracked
    files; ``None`` when leanmoe is not imported from a git checkout or git is missing."""
    src_dir = Path(leanmoe.__file__).resolve().parent
    try:
        head = subprocess.run(["git", "-C", str(src_dir), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(src_dir), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return head.stdout.strip() + ("+dirty" if dirty.returncode == 0 and dirty.stdout.strip() else "")


def source_digest(root: Path | None = None) -> str:
    """First 12 hex digits of a SHA-256 over leanmoe's own source files (relative paths and bytes, in path order).

    It names the code that ran even where git cannot: an installed wheel, a copied tree, or a checkout whose git
    metadata is older than its files (then the commit alone would name the wrong code).
    """
    root = Path(leanmoe.__file__).resolve().parent if root is None else Path(root)
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:12]


def collect_env(device: torch.device, argv: list[str], *, program: tuple[str, ...] = ("leanmoe",)) -> dict:
    """What produced a table. ``argv`` is the command's arguments after ``program`` (a script under benchmarks/
    passes ``("python", "benchmarks/NAME.py")``)."""
    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "triton": package_version("triton"),
        "leanmoe": leanmoe.__version__,
        "git_commit": git_commit(),
        "source_sha256": source_digest(),
        "python": platform.python_version(),
        "date": utc_date(),
        "command": shlex.join([*program, *argv]),
    }
