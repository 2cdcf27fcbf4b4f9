#!/usr/bin/env bash
# Sets up .venv (scripts/setup.sh) and runs the test suite. Without a GPU, Triton kernels run in its interpreter
# and tests marked gpu/multigpu are skipped. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -n "${LEANMOE_TEST_WORKERS:-2}" -p no:cacheprovider "$@"
