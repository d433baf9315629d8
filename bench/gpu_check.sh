#!/usr/bin/env bash
# One prepared GPU check (docs/DESIGN.md §6, §11), steps in order of importance:
#   a. build the CUDA extension, run the kernel tests on the GPU (Triton, the extension's FMA and
#      tensor-core paths, the compile counts of tests/test_counting.py), the weight-gradient op's
#      (issue 31) in a step of their own first;
#   b. the full 32-layer Llama-3-8B-shaped init (random bf16 weights from fisherlora/configs,
#      128 x 512 tokens): projected mode with the layer groups the plan picks for 24 GB, then full
#      mode; each after a warm-up on a 1-layer model of the same shapes (compiles and autotuning
#      timed apart), with time per phase, Triton compiles in the timed run, and allocator peak
#      against the plan;
#   c. a Llama-3.2-1B-shaped whole init side by side in one run: the naive baseline, fisherlora in
#      each mode, PEFT's PiSSA (full SVD), CorDA, LoRA-GA and EVA (bench/init_methods.py);
#   d. the ops (the weight gradient's included) at 8B shapes against naive and against the bf16 matrix rate measured in the same
#      run, then the dispatch table filled from them (fisherlora/ops/table.py), and the SVD solvers.
#
# A lease is short (about 15 minutes of device time per session, start included), so the steps
# run under one overall budget (GPU_CHECK_BUDGET seconds, default 540 = 9 minutes): each step gets
# its own limit or what is left of the budget, whichever is smaller, and a step with under 20 s
# left is skipped. A slow or failing step never loses the others' results.
#
# Output under $OUT (the device tool brings back at most 8 files, so the logs travel as one
# archive): steps.log (one line per step), gpu_check.json (status and seconds per step),
# summary.md (bench/gpu_summary.py's tables, also printed last) and gpu_check.tar.gz (every log
# and result file, under work/). Run it through the device tool as ONE command:
#   bash bench/gpu_check.sh          (architectures from fisherlora/configs, or GPU_CHECK_CONFIGS)
# GPU_CHECK_STEPS (a comma list of step names) runs only those; GPU_CHECK_TOKENS ("128x512")
# and GPU_CHECK_1B_METHODS change the calibration size and the methods of step c.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/out/gpu}
WORK=$(mktemp -d)/work
mkdir -p "$WORK" "$OUT"
PY=${PYTHON:-$(command -v python3 || command -v python)}
BUDGET=${GPU_CHECK_BUDGET:-540}
CONFIGS=${GPU_CHECK_CONFIGS:-fisherlora/configs}
export PYTHONUNBUFFERED=1
declare -A STATUS
ORDER=()

STEPS=${GPU_CHECK_STEPS:-all}  # comma list of step names to run (the smoke test runs a few on a CPU)

step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2; shift 2
  local left=$((BUDGET - SECONDS))
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$STEPS" != all ] && [[ ",$STEPS," != *",$name,"* ]]; then
    return
  fi
  ORDER+=("$name")
  if [ "$limit" -lt 20 ]; then
    STATUS[$name]="skipped (budget spent)"
    echo "=== $name skipped: ${left}s of the budget left" | tee -a "$OUT/steps.log"
    return
  fi
  local t0=$SECONDS
  echo "=== $name (limit ${limit}s, at ${t0}s)" | tee -a "$OUT/steps.log"
  timeout "$limit" "$@" > "$WORK/$name.log" 2>&1
  local rc=$?
  STATUS[$name]="rc=$rc s=$((SECONDS - t0))"
  echo "    ${STATUS[$name]}" | tee -a "$OUT/steps.log"
  tail -n 4 "$WORK/$name.log"
}

finish() {
  {
    echo "{"
    local sep=""
    for k in "${ORDER[@]}"; do
      printf '%s  "%s": "%s"' "$sep" "$k" "${STATUS[$k]}"
      sep=$',\n'
    done
    printf '\n}\n'
  } > "$OUT/gpu_check.json"
  tar -czf "$OUT/gpu_check.tar.gz" -C "$(dirname "$WORK")" work
  "$PY" -m bench.gpu_summary "$WORK" > "$OUT/summary.md" 2>&1
  cat "$OUT/gpu_check.json" "$OUT/summary.md"
}
trap finish EXIT

{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv; nvidia-smi; } \
  > "$WORK/nvidia-smi.txt" 2>&1
"$PY" -c "import sys, torch, triton, transformers, peft; print(sys.version.split()[0], torch.__version__,
triton.__version__, transformers.__version__, peft.__version__, torch.cuda.get_device_name())" \
  > "$WORK/versions.txt" 2>&1
cat "$WORK/versions.txt"

export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} FISHERLORA_CUDA=1
DEVICE=$("$PY" -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')" 2>/dev/null || echo cpu)
DTYPE=bfloat16; [ "$DEVICE" = cpu ] && DTYPE=float32  # the CPU smoke test runs the steps at toy size
TOKENS=${GPU_CHECK_TOKENS:-128x512}
SAMPLES=${TOKENS%x*} LENGTH=${TOKENS#*x}
METHODS_1B=${GPU_CHECK_1B_METHODS:-naive,fisherlora[triton,full],fisherlora[triton,packed],fisherlora[triton,projected],fisherlora[ext,full],pissa,corda,lora_ga,eva}

# a. build, kernel tests
step build 180 "$PY" -m pip install --no-deps --no-build-isolation --no-index -e .
# every case of the Triton and extension op tests runs on the GPU when one is visible; serially
# they outlast 150 s there (Triton compiles each case), so they spread over workers when
# pytest-xdist is installed (it is on the H200 image)
XDIST=()
"$PY" -c "import xdist" 2>/dev/null && XDIST=(-n 8)
# the weight gradient's kernels first: their compiled Triton and CUDA paths are the newest, and a
# kernel step that runs out of its limit would otherwise take their results with it
step gradient_op 90 "$PY" -m pytest -q -p no:cacheprovider -rfE "${XDIST[@]}" -k gradient tests/test_ops_triton.py \
  tests/test_ops_ext.py
step kernel_tests 120 "$PY" -m pytest -q -p no:cacheprovider -rfE "${XDIST[@]}" -k "not gradient" \
  tests/test_ops_triton.py tests/test_ops_ext.py tests/test_counting.py

# b. the full 32-layer 8B init, projected for 24 GB and full; c. the 1B side by side
if [ -f "$CONFIGS/llama-3-8b.json" ]; then
  step init_8b_projected_24gb 180 "$PY" -m bench.gpu_init --config "$CONFIGS/llama-3-8b.json" \
    --memory-mode projected --free-gb 24 --num-samples "$SAMPLES" --max-length "$LENGTH" --batch-size 4 \
    --warmup --json "$WORK/init_8b_projected_24gb.json"
  step init_8b_full 150 "$PY" -m bench.gpu_init --config "$CONFIGS/llama-3-8b.json" --memory-mode full \
    --layer-groups 1 --num-samples "$SAMPLES" --max-length "$LENGTH" --batch-size 4 --warmup \
    --json "$WORK/init_8b_full.json"
  step init_1b_methods 150 "$PY" -m bench.init_methods --config "$CONFIGS/llama-3.2-1b.json" \
    --device "$DEVICE" --dtype "$DTYPE" --in-process --methods "$METHODS_1B" --num-samples "$SAMPLES" \
    --max-length "$LENGTH" --batch-size 8 --out "$WORK/init_1b_methods"
else
  echo "no model configs in $CONFIGS: full-size inits skipped" | tee -a "$OUT/steps.log"
fi

# d. the ceiling the kernels' TFLOP/s are read against (one large bf16 matrix product), the ops
# against naive at the 8B shapes, the dispatch table they fill, the SVD solvers
step matmul_rate 20 "$PY" -c "import torch, triton.testing as tt
a, b = (torch.randn(8192, 8192, device='cuda', dtype=torch.bfloat16) for _ in range(2))
ms = tt.do_bench(lambda: a @ b, warmup=100, rep=500, return_mode='median')
print(f'bf16 8192^3 matmul: {2 * 8192**3 / ms / 1e9:.0f} TFLOP/s')"
step ops_bench 90 "$PY" -m pytest -q -p no:cacheprovider bench/test_bench_ops.py --benchmark-only \
  --benchmark-json="$WORK/ops.json" --benchmark-columns=median,iqr,rounds --benchmark-sort=name
step dispatch_table 20 "$PY" -c "import json, sys; from pathlib import Path; from fisherlora.ops import table
src = Path(sys.argv[1])
t = table.from_benchmark(json.loads(src.read_text())) if src.exists() else {}
Path(sys.argv[2]).write_text(json.dumps(t, indent=1)); print(json.dumps(t)[:2000])" \
  "$WORK/ops.json" "$WORK/dispatch_table.json"
step svd_paths 60 "$PY" -m bench.svd_paths --out "$WORK/svd"
