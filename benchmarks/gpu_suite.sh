#!/usr/bin/env bash
# GPU checks and timings in few device calls, most important first. Each step is time-boxed and writes under $OUT
# as it goes, so a call cut short still returns what finished. Usage (repo root, GPU machine):
#   OUT=/tmp/out bash benchmarks/gpu_suite.sh [STEP ...]
# Steps (default: tests core): tests | hftests | core | all | hf | ep (ep needs 2 GPUs: nvidia-h200-x2).
# Triton autotunes on its first call per shape bucket (60-90 s on a fresh machine; cached on disk afterwards), so
# put the steps that share shapes in one call.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=src:. PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # never NVLink multicast
OUT=${OUT:-bench-results}
mkdir -p "$OUT"
steps=${*:-tests core}
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"

for step in $steps; do
  case $step in
    tests)  # core and Triton GPU tests, the no-host-sync and compile tests first
      timeout 400 python3 -m pytest -q -m gpu -p no:cacheprovider --timeout 200 -rA \
        tests/test_gpu_core.py tests/test_triton_gpu.py tests/test_cli.py tests/test_calibration.py 2>&1 \
        | tee "$OUT/gpu_tests.log" | grep -E "PASSED|FAILED|ERROR|passed|failed" | tail -40 ;;
    hftests)
      timeout 400 python3 -m pytest -q -m gpu -p no:cacheprovider --timeout 200 -rA \
        tests/test_hf_families.py tests/test_hf_patching.py tests/test_hf_bench.py 2>&1 \
        | tee "$OUT/hf_tests.log" | grep -E "PASSED|FAILED|ERROR|passed|failed" | tail -40 ;;
    core)
      timeout 300 python3 -m leanmoe bench --preset qwen3-30b-a3b mixtral-8x7b \
        --json "$OUT/core.json" --markdown "$OUT/core.md" 2>"$OUT/core.err" | tail -20 ;;
    all)
      timeout 560 python3 -m leanmoe bench --preset all --routing uniform skewed \
        --json "$OUT/all.json" --markdown "$OUT/all.md" --plot "$OUT/all.png" 2>"$OUT/all.err" | tail -40 ;;
    hf)
      for m in qwen3_moe mixtral; do
        timeout 240 python3 -m leanmoe bench --hf "$m" --json "$OUT/hf_$m.json" --markdown "$OUT/hf_$m.md" \
          2>"$OUT/hf_$m.err" | tail -15
      done ;;
    ep)
      timeout 200 torchrun --nproc-per-node 2 tests/test_parallel_ep.py --device cuda --backend reference 2>&1 \
        | tee "$OUT/ep_tests.log" | tail -15
      timeout 120 torchrun --nproc-per-node 2 examples/expert_parallel.py --backend grouped_mm --steps 10 2>&1 \
        | tee "$OUT/ep_example.log" | tail -6 ;;
    *) echo "unknown step $step"; exit 2 ;;
  esac
done
