#!/usr/bin/env bash
# One prepared GPU check (DESIGN.md §6): build the CUDA extension, run the GPU tests, time the ops
# against the naive path at Llama-3-8B shapes, and run the whole init on the Llama-3.2-1B and
# Llama-3-8B architectures with random weights. Every step writes under $OUT and is bounded by
# its own timeout, so a slow or failing step never loses the others' results; the summary is
# $OUT/gpu_check.json. Run it through the device tool as ONE command, e.g.
#   bash bench/gpu_check.sh            (with OUT set by the tool; about 9 minutes on an H200)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/out/gpu}
mkdir -p "$OUT"
PY=${PYTHON:-python}
CONFIGS=""
for c in ../shared/configs shared/configs; do [ -d "$c" ] && CONFIGS=$c && break; done
declare -A STATUS

step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  echo "=== $name (limit ${limit}s)" | tee -a "$OUT/steps.log"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  STATUS[$name]="rc=$rc s=$((SECONDS - t0))"
  echo "    ${STATUS[$name]}" | tee -a "$OUT/steps.log"
  tail -n 5 "$OUT/$name.log"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/nvidia-smi.csv" 2>&1
$PY -c "import torch, triton, transformers, peft; print(torch.__version__, triton.__version__, transformers.__version__, peft.__version__)" > "$OUT/versions.txt" 2>&1

export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} FISHERLORA_CUDA=1
step build 240 $PY -m pip install --no-deps --no-build-isolation -e .
step gpu_tests 120 $PY -m pytest -q -x -m gpu tests/test_ops_triton.py tests/test_ops_ext.py
step triton_tests 120 $PY -m pytest -q tests/test_ops_triton.py
step ops_bench 150 $PY -m pytest -q bench/test_bench_ops.py --benchmark-only --benchmark-json="$OUT/ops.json"
if [ -n "$CONFIGS" ]; then
  step init_1b 90 $PY -m bench.gpu_init --config "$CONFIGS/llama-3.2-1b.json" --memory-mode full --json "$OUT/init_1b.json"
  step init_8b 200 $PY -m bench.gpu_init --config "$CONFIGS/llama-3-8b.json" --memory-mode projected \
    --layer-groups 4 --batch-size 4 --json "$OUT/init_8b_projected_g4.json"
else
  echo "no shared/configs found: skipping the full-size inits" | tee -a "$OUT/steps.log"
fi
step svd_paths 60 $PY -m bench.svd_paths --out "$OUT/svd"

{
  echo "{"
  first=1
  for k in "${!STATUS[@]}"; do
    [ $first -eq 0 ] && echo ","
    first=0
    printf '  "%s": "%s"' "$k" "${STATUS[$k]}"
  done
  echo; echo "}"
} > "$OUT/gpu_check.json"
cat "$OUT/gpu_check.json"
