#!/usr/bin/env bash
# One device call that checks and times everything, most important first; each step is time-boxed and writes under
# $OUT as it goes, so a call cut short still returns what finished. Usage (repo root, GPU machine):
#   OUT=/tmp/out bash benchmarks/gpu_suite.sh [STEP ...]     steps: tests core all hf (default: all four)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=src PYTHONUNBUFFERED=1
OUT=${OUT:-bench-results}
mkdir -p "$OUT"
steps=${*:-tests core all hf}
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"

for step in $steps; do
  case $step in
    tests)
      timeout 200 python3 -m pytest -q -m gpu -p no:cacheprovider --timeout 150 \
        tests/test_triton_gpu.py tests/test_gpu_core.py tests/test_cli.py 2>&1 | tee "$OUT/gpu_tests.log" | tail -25 ;;
    core)
      timeout 200 python3 -m leanmoe bench --preset qwen3-30b-a3b mixtral-8x7b \
        --json "$OUT/core.json" --markdown "$OUT/core.md" 2>"$OUT/core.err" | tail -20 ;;
    all)
      timeout 540 python3 -m leanmoe bench --preset all --routing uniform skewed \
        --json "$OUT/all.json" --markdown "$OUT/all.md" --plot "$OUT/all.png" 2>"$OUT/all.err" | tail -40 ;;
    hf)
      for m in qwen3_moe mixtral; do
        timeout 150 python3 -m leanmoe bench --hf "$m" --json "$OUT/hf_$m.json" --markdown "$OUT/hf_$m.md" \
          2>"$OUT/hf_$m.err" | tail -15
      done ;;
    *) echo "unknown step $step"; exit 2 ;;
  esac
done
