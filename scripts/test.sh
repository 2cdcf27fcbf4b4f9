#!/usr/bin/env bash
# Sets up .venv (scripts/setup.sh), lints (ruff), type-checks src/ (mypy), and runs the test suite. Without a GPU, Triton kernels run in its
# interpreter and tests marked gpu/multigpu are skipped. Extra arguments go to pytest. LEANMOE_TEST_SEED changes
# the suite's base seed; LEANMOE_TEST_WORKERS the number of pytest-xdist workers (default 2).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
echo "leanmoe test: ruff check"
.venv/bin/ruff check --quiet src tests benchmarks examples
echo "leanmoe test: mypy (src)"
.venv/bin/python -m mypy
echo "leanmoe test: pytest (base seed ${LEANMOE_TEST_SEED:-0})"
# -p no:benchmark: a system-wide pytest-benchmark would only warn that xdist disables it.
exec .venv/bin/python -m pytest -n "${LEANMOE_TEST_WORKERS:-2}" -p no:cacheprovider -p no:benchmark "$@"
