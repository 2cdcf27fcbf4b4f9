#!/usr/bin/env bash
# Runs the Hugging Face tests against the newest transformers (and peft) on the package index, in a venv of its own
# (.venv-newest), with every other package at the versions of constraints/test.txt. A failure here names the test
# that the next transformers release breaks, while main stays on the tested, pinned release. Extra arguments go to
# pytest. LEANMOE_HF_SPEC picks another release instead (LEANMOE_HF_SPEC="transformers==5.17.0", the oldest in the
# tested range), LEANMOE_VENV another venv (default .venv-newest).
set -euo pipefail
cd "$(dirname "$0")/.."
pins=$(mktemp)
trap 'rm -f "$pins"' EXIT
# transformers and the hub packages that move with it float; everything else stays pinned.
grep -v -E '^(transformers|huggingface_hub|tokenizers|safetensors|hf-xet|peft|accelerate)==' constraints/test.txt >"$pins"
VENV=${LEANMOE_VENV:-.venv-newest}
LEANMOE_VENV=$VENV bash scripts/setup.sh
"$VENV/bin/python" -m pip install --disable-pip-version-check -q -c "$pins" --upgrade ${LEANMOE_HF_SPEC:-transformers} peft \
    2>&1 | { grep -v '^WARNING: Location' || true; }
"$VENV/bin/python" -c "import transformers, peft; print('testing: transformers', transformers.__version__, \
'peft', peft.__version__)"
exec "$VENV/bin/python" -m pytest -n "${LEANMOE_TEST_WORKERS:-2}" -p no:cacheprovider -p no:benchmark \
    tests/test_hf_families.py tests/test_hf_patching.py tests/test_calibration_hf.py tests/test_hf_bench.py \
    $(ls tests/test_lora_hf.py tests/test_hf_generate.py 2>/dev/null) "$@"
