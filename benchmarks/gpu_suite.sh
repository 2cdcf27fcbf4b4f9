#!/usr/bin/env bash
# GPU checks and timings in one device call, steps in the order given. Usage (repo root, GPU machine):
#   OUT=/tmp/out bash benchmarks/gpu_suite.sh [STEP ...]        (default: tests peers)
# Steps:
#   tests    every GPU-marked test (-m "gpu and not multigpu"), tuning off (LEANMOE_AUTOTUNE=0; a test of tuning
#            sets it itself): the no-host-sync and compile tests first, then the rest on 4 workers, then the tests
#            that take tens of GB alone (caps TESTS_CORE_S 120, TESTS_S 300, TESTS_BIG_S 150; TESTS_WORKERS 4)
#   kernels  tests/test_kernels.py compiled: every case with tuning off, the fp32 masked prime-E routing with it on
#            (caps KERNELS_S 240, KERNELS_TUNED_S 150; KERNELS_WORKERS 12)
#   peers    benchmarks/peers.py, one process per preset (PEERS_PRESETS, default all six, most wanted first; each
#            at most PEERS_PRESET_S seconds, default 270; fwdbwd first; PEERS_ARGS adds arguments, a later
#            --mode replacing it), merged into $OUT/h200-peers.{json,md,png}; rows a time limit cut are "not run"
#   decode   leanmoe bench --decode --preset all -> $OUT/h200-decode.json
#   decode-sweep  benchmarks/decode_sweep.py: decode kernels by stage, every config and split -> $OUT/decode_sweep.json
#   bench    leanmoe bench --preset qwen3-30b-a3b mixtral-8x7b -> $OUT/bench.json
#   lora     leanmoe bench --lora 16 (skipped with a note while the option does not exist) -> $OUT/lora.json
#   tests-core  tests/test_gpu_core.py alone (no host sync, compile, CUDA graphs), tuning off
#   lora-ab  benchmarks/lora_ab.py: the LoRA step in each of its variants, and the frozen step
#   tma-ab   benchmarks/tma_ab.py: fwd+bwd and fwd with the gate/up weight tiles through TMA or pointer loads
#   retest   the GPU tests matching RETEST_K
#   peers-decode  peers.py --cuda-graphs at every T in DECODE_T (1 4 16 64 256), a process per preset in
#            DECODE_PRESETS (each at most PEERS_DECODE_S, default 150) -> $OUT/h200-peers-decode.{json,md}; then
#            eagerly (no graphs: liger-kernel cannot be captured) for DECODE_EAGER_PRESETS -> ...-eager-P.json
#   hf-lora  leanmoe bench --hf M --lora 16 for M in HF_LORA_MODELS (qwen3_moe mixtral)
#   hf-decode  leanmoe bench --hf M --mode decode for M in HF_DECODE_MODELS (qwen3_moe mixtral) -> $OUT/hf_decode_M.json
#   hf-decode-compiled  the same with --cuda-graphs (compiled generate()) -> $OUT/hf_decode_compiled_M.json
#   host     benchmarks/host_overhead.py --profile: host time of eager decode-sized calls
#   profile  benchmarks/profile_step.py: the step's CUDA kernels by name (PROFILE_ARGS) -> $OUT/profile.json
#   ab       benchmarks/ab_versions.py, .old/leanmoe_v5 against the checkout (carry .old)
#   engines  benchmarks/gemm_engines.py: every GEMM of a fwd+bwd on both backward engines, and the backward op per
#            engine (ENGINES_ARGS, default "--parts gemm,bwd") -> $OUT/gemm_engines.json
#   hftests | core | all | hf | ep (ep needs 2 GPUs: nvidia-h200-x2) | any other word: scratch/WORD.py, if any
# Limits of the device call, kept here: the whole script ends within SUITE_BUDGET_S seconds (default 540: a call
# may run 600), each step under `timeout` for the smaller of its own cap and the time left (a step with under 15 s
# left is skipped, saying so); a failing step does not stop the next. $OUT gets at most 8 files: suite.log (every
# step's full output) and each step's results. Carried wheels (.whl/*.whl) are installed to /tmp/site first.
# Triton autotunes on its first call per shape bucket (60-90 s on a fresh machine; cached on disk afterwards), so
# put the steps that share shapes in one call.
set -uo pipefail
cd "$(dirname "$0")/.."
START=$SECONDS
BUDGET=${SUITE_BUDGET_S:-540}
OUT=${OUT:-bench-results}
mkdir -p "$OUT"
LOG="$OUT/suite.log"
: >"$LOG"

if compgen -G ".whl/*.whl" >/dev/null; then
  if python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      .whl/*.whl >>"$LOG" 2>&1; then
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    echo "installed to /tmp/site: $(cd .whl && ls *.whl | tr '\n' ' ')"
  else
    echo "wheel install FAILED (see suite.log); going on without them"
  fi
fi
# leanmoe from the checkout (no install), ahead of everything else.
export PYTHONPATH=src:.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
# Triton's kernel and tuning caches inside the (ignored) checkout, so later calls on a warm machine reuse them.
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$PWD/.cache/triton}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # never NVLink multicast

python3 - <<'EOF' 2>&1 | tee -a "$LOG"
import importlib.metadata as md, platform, torch, triton
props = torch.cuda.get_device_properties(0) if torch.cuda.is_available() else None
print("python", platform.python_version(), "| torch", torch.__version__, "CUDA", torch.version.cuda, "| triton",
      triton.__version__, "|", f"{props.name}, {props.multi_processor_count} SMs, {torch.cuda.device_count()} GPU(s)"
      if props else "no CUDA device")
def version(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return "not installed"
print(" | ".join(f"{n} {version(n)}" for n in ("moe-ops", "liger-kernel", "peft", "transformers", "matplotlib")))
EOF
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,memory.used,memory.total --format=csv,noheader \
  2>&1 | tee -a "$LOG"
timeout 60 python3 -m leanmoe info >>"$LOG" 2>&1

left() { echo $((BUDGET - (SECONDS - START))); }

# run NAME CAP_S PATTERN CMD...: CMD under timeout min(CAP_S, time left - RESERVE), its output appended to suite.log,
# the lines matching PATTERN echoed; then the step's exit status and elapsed time.
RESERVE=5
run() {
  local name=$1 cap=$2 pattern=$3
  shift 3
  local t=$(($(left) - RESERVE))
  ((t > cap)) && t=$cap
  if ((t < 15)); then
    echo "[$name] SKIPPED: ${t}s left of the ${BUDGET}s budget"
    return
  fi
  local t0=$SECONDS
  echo "===== $name (timeout ${t}s): $*" >>"$LOG"
  timeout -k 10 "$t" "$@" 2>&1 | tee -a "$LOG" | grep -E --line-buffered "$pattern"
  local rc=${PIPESTATUS[0]}
  local note=""
  ((rc == 124 || rc == 137)) && note=" (TIMED OUT at ${t}s)"
  echo "[$name] exit $rc, $((SECONDS - t0)) s$note; $(left) s left" | tee -a "$LOG"
}

TEST_PAT="FAILED|ERROR|Error|[0-9]+ (passed|failed)|no tests ran"
steps=${*:-tests peers}
for step in $steps; do
  case $step in
    tests)
      big="64bit_offsets or bench_on_the_gpu or peak_cuda_memory"
      LEANMOE_AUTOTUNE=0 run tests-core "${TESTS_CORE_S:-120}" "$TEST_PAT" python3 -m pytest -q -rfE -m "gpu and not multigpu" \
        -p no:cacheprovider --timeout 100 --tb=short tests/test_gpu_core.py
      # Four workers share the GPU, so the tests that take tens of GB run after them, alone.
      LEANMOE_AUTOTUNE=0 run tests "${TESTS_S:-300}" "$TEST_PAT" python3 -m pytest -q -rfE -n "${TESTS_WORKERS:-4}" -m "gpu and not multigpu" \
        -k "not ($big)" -p no:cacheprovider --timeout 200 --tb=short --durations 15 --ignore=tests/test_gpu_core.py tests
      LEANMOE_AUTOTUNE=0 run tests-big "${TESTS_BIG_S:-150}" "$TEST_PAT" python3 -m pytest -q -rfE -m "gpu and not multigpu" \
        -k "$big" -p no:cacheprovider --timeout 150 --tb=short --ignore=tests/test_gpu_core.py tests ;;
    tests-core)  # the no-host-sync, compile and CUDA-graph tests alone (the first part of tests)
      LEANMOE_AUTOTUNE=0 run tests-core "${TESTS_CORE_S:-120}" "$TEST_PAT" python3 -m pytest -q -rfE -m "gpu and not multigpu" \
        -p no:cacheprovider --timeout 100 --tb=short tests/test_gpu_core.py ;;
    tma-ab)  # the gate/up forward's weight tiles through TMA or pointer loads, fwd+bwd and fwd, in one process
      run tma-ab 300 "Error|Traceback|T=" python3 benchmarks/tma_ab.py --preset ${TMA_AB_PRESETS:-qwen3-30b-a3b \
        mixtral-8x7b deepseek-v3} --json "$OUT/tma_ab.json" ;;
    kernels)  # tests/test_kernels.py (no gpu mark: it runs wherever it is called) compiled on the GPU, both ways;
      # each case compiles its own kernels (CPU-bound), so many workers (KERNELS_WORKERS, default 12)
      LEANMOE_AUTOTUNE=0 run kernels-untuned "${KERNELS_S:-240}" "$TEST_PAT" python3 -m pytest -q -rfE \
        -n "${KERNELS_WORKERS:-12}" -p no:cacheprovider --timeout 200 --tb=short tests/test_kernels.py
      LEANMOE_AUTOTUNE=1 run kernels-tuned "${KERNELS_TUNED_S:-150}" "$TEST_PAT" python3 -m pytest -q -rfE \
        -n "${KERNELS_WORKERS:-12}" -p no:cacheprovider --timeout 140 --tb=short -k "fp32-E7-masked_tail" \
        tests/test_kernels.py ;;
    peers)
      dir=/tmp/peers
      rm -rf "$dir" && mkdir -p "$dir"
      presets=${PEERS_PRESETS:-qwen3-30b-a3b mixtral-8x7b olmoe-1b-7b deepseek-v3 gpt-oss-20b gpt-oss-20b-native}
      for p in $presets; do
        # Each preset its own process, so one that runs out of time keeps the rows it finished (JSON rewritten
        # after every row) and leaves time for the next; 40 s are kept for the merge.
        RESERVE=40 run "peers-$p" "${PEERS_PRESET_S:-270}" "ms, first call|FAILED|Error|Traceback" \
          python3 benchmarks/peers.py --preset "$p" --mode fwdbwd fwd ${PEERS_ARGS:-} --json "$dir/$p.json"
      done
      done_json=()
      for p in $presets; do [ -s "$dir/$p.json" ] && done_json+=("$dir/$p.json"); done
      if ((${#done_json[@]})); then
        run peers-merge 60 "Traceback|Error" python3 benchmarks/peers.py --from-json "${done_json[@]}" \
          --json "$OUT/h200-peers.json" --markdown "$OUT/h200-peers.md" --plot "$OUT/h200-peers.png"
        [ -f "$OUT/h200-peers.md" ] && sed -n '/against the fastest peer/,/^MiB/p' "$OUT/h200-peers.md" | head -40
      else
        echo "[peers] no preset finished a row"
      fi ;;
    decode-sweep)  # benchmarks/decode_sweep.py: the decode kernels stage by stage and every config and split of them
      run decode-sweep 300 "best|Error|Traceback" python3 benchmarks/decode_sweep.py ;;
    decode)
      run decode 240 "FAILED|Error|Traceback" python3 -m leanmoe bench --decode --preset all \
        --json "$OUT/h200-decode.json" ;;
    bench)
      run bench 300 "FAILED|Error|Traceback" python3 -m leanmoe bench --preset qwen3-30b-a3b mixtral-8x7b \
        --json "$OUT/bench.json" ;;
    lora)
      if python3 -m leanmoe bench --help 2>/dev/null | grep -q -- "--lora"; then
        run lora 240 "FAILED|Error|Traceback" python3 -m leanmoe bench --lora 16 --preset qwen3-30b-a3b mixtral-8x7b \
          --json "$OUT/lora.json"
      else
        echo "[lora] SKIPPED: this leanmoe bench has no --lora option yet" | tee -a "$LOG"
      fi ;;
    retest)  # the GPU tests matching RETEST_K (pytest -k), tuning off
      LEANMOE_AUTOTUNE=0 run retest 200 "$TEST_PAT" python3 -m pytest -q -rfE -n 4 -m "gpu and not multigpu" \
        -k "${RETEST_K:?retest needs RETEST_K}" -p no:cacheprovider --timeout 180 --tb=short tests ;;
    peers-decode)  # the decode figure beside the peers: forward as CUDA-graph replays at every T in DECODE_T, one
      # process per preset in DECODE_PRESETS, merged into $OUT/h200-peers-decode.{json,md}
      dir=/tmp/peers-decode
      rm -rf "$dir" && mkdir -p "$dir"
      dpresets=${DECODE_PRESETS-qwen3-30b-a3b olmoe-1b-7b gpt-oss-20b deepseek-v3 mixtral-8x7b}  # "" runs none (eager only)
      for p in $dpresets; do
        RESERVE=30 run "peers-decode-$p" "${PEERS_DECODE_S:-150}" "ms, first call|FAILED|Error|Traceback" \
          python3 benchmarks/peers.py --preset "$p" --tokens ${DECODE_T:-1 4 16 64 256} --mode fwd --cuda-graphs \
          --impl leanmoe-auto leanmoe-triton-s0 leanmoe-triton_decode leanmoe-grouped_mm torchtitan-style moe-ops \
          liger-kernel transformers-batched_mm --json "$dir/$p.json"
      done
      # liger-kernel cannot be captured (a host sync per call): the same T timed eagerly, beside leanmoe eagerly
      for p in ${DECODE_EAGER_PRESETS:-}; do
        RESERVE=30 run "peers-decode-eager-$p" "${PEERS_DECODE_S:-150}" "ms, first call|FAILED|Error|Traceback" \
          python3 benchmarks/peers.py --preset "$p" --tokens ${DECODE_T:-1 4 16 64 256} --mode fwd \
          --impl leanmoe-auto leanmoe-triton_decode moe-ops liger-kernel --json "$dir/eager-$p.json"
      done
      done_json=()
      for p in $dpresets; do [ -s "$dir/$p.json" ] && done_json+=("$dir/$p.json"); done
      for p in ${DECODE_EAGER_PRESETS:-}; do
        [ -s "$dir/eager-$p.json" ] && cp "$dir/eager-$p.json" "$OUT/h200-peers-decode-eager-$p.json"
      done
      if ((${#done_json[@]})); then
        run peers-decode-merge 30 "Traceback|Error" python3 benchmarks/peers.py --from-json "${done_json[@]}" \
          --json "$OUT/h200-peers-decode.json" --markdown "$OUT/h200-peers-decode.md"
        [ -f "$OUT/h200-peers-decode.md" ] && sed -n '/against the fastest peer/,/^MiB/p' "$OUT/h200-peers-decode.md" \
          | head -40
      fi ;;
    lora-ab)  # the LoRA step's B-factor terms fused or as grouped GEMMs, beside the frozen step, in one process
      run lora-ab 240 "Error|Traceback|rank 16" python3 benchmarks/lora_ab.py --preset ${LORA_AB_PRESETS:-qwen3-30b-a3b \
        mixtral-8x7b} --json "$OUT/lora_ab.json" ;;
    ab)  # v5 against the checkout in one process (needs .old/leanmoe_v5, carried; see benchmarks/ab_versions.py)
      PYTHONPATH=$PYTHONPATH:.old run ab 240 "Traceback|Error|\|" python3 benchmarks/ab_versions.py --old leanmoe_v5 \
        --backend triton grouped_mm --preset ${AB_PRESETS:-qwen3-30b-a3b mixtral-8x7b} --json "$OUT/ab.json" ;;
    engines)
      run engines 300 "Error|Traceback" python3 benchmarks/gemm_engines.py ${ENGINES_ARGS:---parts gemm,bwd} \
        --out "$OUT/gemm_engines.json" ;;
    hf-lora)  # the model's LoRA step, leanmoe's adapters against transformers grouped_mm + PEFT (issue 15's target)
      for m in ${HF_LORA_MODELS:-qwen3_moe mixtral}; do
        run "hf-lora-$m" 200 "FAILED|Error|Traceback" python3 -m leanmoe bench --hf "$m" --lora 16 \
          --json "$OUT/hf_lora_$m.json"
      done ;;
    hf-decode)  # tokens/s of a patched model's decode steps against transformers' expert implementations
      for m in ${HF_DECODE_MODELS:-qwen3_moe mixtral}; do
        run "hf-decode-$m" 200 "FAILED|Error|Traceback" python3 -m leanmoe bench --hf "$m" --mode decode \
          --json "$OUT/hf_decode_$m.json"
      done ;;
    hf-decode-compiled)  # the same with generate() compiled by transformers (CUDA graphs); HF_DECODE_COMPILED_ARGS
      for m in ${HF_DECODE_MODELS:-qwen3_moe mixtral}; do
        run "hf-decode-compiled-$m" "${HF_DECODE_COMPILED_S:-240}" "FAILED|Error|Traceback" python3 -m leanmoe bench \
          --hf "$m" --mode decode --cuda-graphs ${HF_DECODE_COMPILED_ARGS:---backend triton_decode} \
          --json "$OUT/hf_decode_compiled_$m.json"
      done ;;
    host)  # benchmarks/host_overhead.py: host time per eager decode-sized call and of its parts
      run host 120 "." python3 benchmarks/host_overhead.py --profile ;;
    profile)
      run profile 240 "==|Error|Traceback" python3 benchmarks/profile_step.py ${PROFILE_ARGS:-} --json "$OUT/profile.json" ;;
    hftests)
      LEANMOE_AUTOTUNE=0 run hftests 200 "$TEST_PAT" python3 -m pytest -q -rfE -n 4 -m gpu -p no:cacheprovider \
        --timeout 180 --tb=short tests/test_hf_families.py tests/test_hf_patching.py tests/test_hf_bench.py ;;
    core)
      run core 300 "FAILED|Error|Traceback" python3 -m leanmoe bench --preset qwen3-30b-a3b mixtral-8x7b \
        --json "$OUT/core.json" ;;
    all)
      run all 540 "FAILED|Error|Traceback" python3 -m leanmoe bench --preset all --routing uniform skewed \
        --json "$OUT/all.json" --plot "$OUT/all.png" ;;
    hf)  # the HF table of docs/BENCHMARKS.md: Qwen3-MoE and Mixtral at save_percent 0, Mixtral also at 100
      for spec in qwen3_moe:0 mixtral:0 mixtral:100; do
        m=${spec%:*} s=${spec#*:}
        run "hf-$m-$s" 240 "FAILED|Error|Traceback" python3 -m leanmoe bench --hf "$m" --save-percent "$s" \
          --json "$OUT/hf_${m}_$s.json"
      done ;;
    ep)  # NCCL checks: reference backend in fp32 and bf16, then triton in bf16 (tuning off); the example
      run ep-reference 150 "passed|failed|FAILED|Error" torchrun --nproc-per-node 2 tests/test_parallel_ep.py \
        --device cuda --backend reference
      LEANMOE_AUTOTUNE=0 run ep-triton 200 "passed|failed|FAILED|Error" torchrun --nproc-per-node 2 \
        tests/test_parallel_ep.py --device cuda --backend triton --dtypes bfloat16
      LEANMOE_AUTOTUNE=0 run ep-example 150 "step|FAILED|Error" torchrun --nproc-per-node 2 \
        examples/expert_parallel.py --steps 10 --fsdp ;;
    *)
      if [ -f "scratch/$step.py" ]; then
        run "$step" 300 "." python3 "scratch/$step.py"
      else
        echo "unknown step $step" | tee -a "$LOG"
      fi ;;
  esac
done
echo "suite done in $((SECONDS - START)) s (budget ${BUDGET} s); full output in $LOG"
