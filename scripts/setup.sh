#!/usr/bin/env bash
# Creates .venv (seeing the system's packages, so a machine that already has torch keeps its own build) and installs
# leanmoe into it with its test, Triton, Hugging Face and benchmark extras. Safe to run again: it only adds what is
# missing. With no torch anywhere it installs torch==2.13.0 (the CPU build on a machine without CUDA: install your
# own CUDA build of torch first on a GPU machine).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${LEANMOE_VENV:-.venv}
PYTHON=${PYTHON:-python3}

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv --system-site-packages "$VENV"
fi
PY="$VENV/bin/python"

if ! "$PY" -c "import torch" 2>/dev/null; then
    "$PY" -m pip install -q "torch==2.13.0"
fi

if "$PY" - <<'PYCHECK' 2>/dev/null; then
import importlib.util, sys
needed = ["triton", "pytest", "hypothesis", "xdist", "pytest_timeout", "transformers", "rich", "matplotlib"]
sys.exit(0 if all(importlib.util.find_spec(m) for m in needed) else 1)
PYCHECK
    # Everything is already there (a machine without network access, say): install leanmoe alone.
    "$PY" -m pip install -q --no-deps --no-build-isolation -e .
else
    "$PY" -m pip install -q -e ".[dev,triton,hf,bench]"
fi
