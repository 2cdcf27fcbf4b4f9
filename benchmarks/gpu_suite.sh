#!/usr/bin/env bash
# GPU checks and timings in few device calls, most important first. Each step is time-boxed and writes under $OUT
# as it goes, so a call cut short still returns what finished. Usage (repo root, GPU machine):
#   OUT=/tmp/out bash benchmarks/gpu_suite.sh [STEP ...]
# Steps (default: tests core): tests | hftests | core | all | hf | ep (ep needs 2 GPUs: nvidia-h200-x2) | any other
# word: the Python script scratch/WORD.py, if there is one (ad-hoc diagnostics, not part of the repository).
# Triton autotunes on its first call per shape bucket (60-90 s on a fresh machine; cached on disk afterwards), so
# put the steps that share shapes in one call.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=src:. PYTHONUNBUFFERED=1
# Triton's kernel and tuning caches inside the (ignored) checkout, so later calls on a warm machine reuse them.
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$PWD/.cache/triton}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # never NVLink multicast
OUT=${OUT:-bench-results}
mkdir -p "$OUT"
steps=${*:-tests core}
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"

for step in $steps; do
  case $step in
    tests)  # core and Triton GPU tests, the no-host-sync and compile tests first (tuning off: correctness only)
      LEANMOE_AUTOTUNE=0 timeout 120 python3 -m pytest -v -m gpu -p no:cacheprovider --timeout 100 --tb=long \
        tests/test_gpu_core.py 2>&1 | tee "$OUT/gpu_core_tests.log" | grep -E "PASSED|FAILED|ERROR|Error|passed|failed"
      # Four workers share the GPU, so the tests that take tens of GB run after them, alone.
      big="64bit_offsets or bench_on_the_gpu or peak_cuda_memory"
      LEANMOE_AUTOTUNE=0 timeout 240 python3 -m pytest -v -n 4 -m gpu -k "not ($big)" -p no:cacheprovider \
        --timeout 200 --tb=short tests/test_triton_gpu.py tests/test_cli.py tests/test_calibration.py 2>&1 \
        | tee "$OUT/gpu_tests.log" | grep -E "PASSED|FAILED|ERROR|Error|passed|failed"
      LEANMOE_AUTOTUNE=0 timeout 200 python3 -m pytest -v -m gpu -k "$big" -p no:cacheprovider --timeout 150 \
        --tb=short tests/test_triton_gpu.py tests/test_cli.py tests/test_calibration.py 2>&1 \
        | tee "$OUT/gpu_tests_big.log" | grep -E "PASSED|FAILED|ERROR|Error|passed|failed" ;;
    hftests)
      LEANMOE_AUTOTUNE=0 timeout 200 python3 -m pytest -v -n 4 -m gpu -p no:cacheprovider --timeout 180 --tb=short \
        tests/test_hf_families.py tests/test_hf_patching.py tests/test_hf_bench.py 2>&1 \
        | tee "$OUT/hf_tests.log" | grep -E "PASSED|FAILED|ERROR|Error|passed|failed" ;;
    core)
      timeout 300 python3 -m leanmoe bench --preset qwen3-30b-a3b mixtral-8x7b \
        --json "$OUT/core.json" --markdown "$OUT/core.md" 2>"$OUT/core.err" | tail -20 ;;
    all)
      timeout 560 python3 -m leanmoe bench --preset all --routing uniform skewed \
        --json "$OUT/all.json" --markdown "$OUT/all.md" --plot "$OUT/all.png" 2>"$OUT/all.err" | tail -40 ;;
    hf)  # the HF table of docs/BENCHMARKS.md: Qwen3-MoE and Mixtral at save_percent 0, Mixtral also at 100
      for spec in qwen3_moe:0 mixtral:0 mixtral:100; do
        m=${spec%:*} s=${spec#*:}
        timeout 240 python3 -m leanmoe bench --hf "$m" --save-percent "$s" --json "$OUT/hf_${m}_$s.json" \
          --markdown "$OUT/hf_${m}_$s.md" 2>"$OUT/hf_${m}_$s.err" | tail -15
      done ;;
    ep)  # NCCL checks: reference backend in fp32 and bf16, then triton in bf16 (tuning off); the example
      timeout 150 torchrun --nproc-per-node 2 tests/test_parallel_ep.py --device cuda --backend reference 2>&1 \
        | tee "$OUT/ep_tests.log" | tail -15
      LEANMOE_AUTOTUNE=0 timeout 200 torchrun --nproc-per-node 2 tests/test_parallel_ep.py --device cuda \
        --backend triton --dtypes bfloat16 2>&1 | tee "$OUT/ep_tests_triton.log" | tail -15
      LEANMOE_AUTOTUNE=0 timeout 150 torchrun --nproc-per-node 2 examples/expert_parallel.py --steps 10 --fsdp 2>&1 \
        | tee "$OUT/ep_example.log" | tail -6 ;;
    *) if [ -f "scratch/$step.py" ]; then timeout 300 python3 "scratch/$step.py" 2>&1 | tee "$OUT/$step.log"
       else echo "unknown step $step"; exit 2; fi ;;
  esac
done
