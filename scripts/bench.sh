#!/usr/bin/env bash
# Sets up .venv (scripts/setup.sh) and runs the main job: `leanmoe bench` on the default preset (the GPU when there
# is one, a small CPU run otherwise). Extra arguments go to `leanmoe bench`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/leanmoe bench "$@"
