#!/usr/bin/env bash
# Creates .venv (seeing the system's packages, so a machine that already has torch keeps its own build) and installs
# leanmoe into it with its test, Triton, Hugging Face, LoRA and benchmark extras, at the exact versions of
# constraints/test.txt (the environment the test suite is run with). Safe to run again: pip only adds what is missing.
#
# torch: an importable torch (a CUDA build on a GPU machine, say) is kept, and so is the triton it came with. With no
# torch anywhere, torch==2.13.0 is installed from your package index, or from LEANMOE_TORCH_INDEX when set. On Linux
# x86-64, PyPI's torch is the CUDA build (about 2.8 GB of wheels); for the CPU build set
# LEANMOE_TORCH_INDEX=https://download.pytorch.org/whl/cpu (or install torch yourself first).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${LEANMOE_VENV:-.venv}
PYTHON=${PYTHON:-python3}
CONSTRAINTS=constraints/test.txt
EXTRAS=${LEANMOE_EXTRAS:-dev,triton,hf,lora,bench}
START=$SECONDS

step() { printf 'leanmoe setup [%3ds] %s\n' "$((SECONDS - START))" "$*"; }
# pip's own progress is one line per package at this verbosity; machine-local index warnings are noise.
pip_quiet() { "$PY" -m pip install --disable-pip-version-check -q "$@" 2>&1 | { grep -v '^WARNING: Location' || true; }; }

if [ ! -x "$VENV/bin/python" ]; then
    step "creating $VENV (with the system's site packages)"
    "$PYTHON" -m venv --system-site-packages "$VENV"
fi
PY="$VENV/bin/python"

pins=$(mktemp)
trap 'rm -f "$pins"' EXIT
if "$PY" -c "import torch" 2>/dev/null; then
    step "keeping the installed torch $("$PY" -c 'import torch; print(torch.__version__)')"
    if "$PY" -c "import sys, torch; sys.exit(torch.version.cuda is None)"; then
        # A CUDA build pins its own triton: leave both out of the pins.
        grep -v -E '^(torch|triton)==' "$CONSTRAINTS" >"$pins"
    else
        grep -v -E '^torch==' "$CONSTRAINTS" >"$pins"
    fi
else
    cp "$CONSTRAINTS" "$pins"
    if [ -n "${LEANMOE_TORCH_INDEX:-}" ]; then
        step "installing torch 2.13.0 from $LEANMOE_TORCH_INDEX"
        pip_quiet --index-url "$LEANMOE_TORCH_INDEX" "torch==2.13.0"
    else
        step "installing torch 2.13.0 from the package index (set LEANMOE_TORCH_INDEX for a CPU-only build)"
        pip_quiet "torch==2.13.0"
    fi
fi

step "installing leanmoe[$EXTRAS] with the versions of $CONSTRAINTS"
if ! pip_quiet -c "$pins" -e ".[$EXTRAS]"; then
    # No package index (an offline machine that already has every dependency): leanmoe alone, and say so.
    step "pip could not install the pinned dependencies; installing leanmoe alone over what is already there"
    "$PY" -m pip install --disable-pip-version-check -q --no-deps --no-build-isolation -e .
fi
step "done: $("$PY" -c 'import torch; print("torch", torch.__version__)')"
