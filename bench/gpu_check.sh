#!/usr/bin/env bash
# One prepared GPU check (docs/DESIGN.md §6): build the CUDA extension, run the kernel tests on the
# GPU, time each op against the naive path at Llama-3-8B shapes, time the SVD solvers, and run the
# whole init on the Llama-3-8B shapes (first layers only) and on the Llama-3.2-1B architecture,
# with random weights.
#
# A lease is short (about 15 minutes of device time per session, start included), so the steps
# run in order of importance under one overall budget (GPU_CHECK_BUDGET seconds, default 420):
# each step gets its own limit or what is left of the budget, whichever is smaller, and a step
# with under 20 s left is skipped. A slow or failing step never loses the others' results.
#
# Output under $OUT (the device tool brings back at most 8 files, so the logs travel as one
# archive): steps.log (one line per step), gpu_check.json (status and seconds per step),
# summary.md (bench/gpu_summary.py's tables, also printed last) and gpu_check.tar.gz (every log
# and result file, under work/). Run it through the device tool as ONE command:
#   bash bench/gpu_check.sh          (architectures from fisherlora/configs, or GPU_CHECK_CONFIGS)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/out/gpu}
WORK=$(mktemp -d)/work
mkdir -p "$WORK" "$OUT"
PY=${PYTHON:-$(command -v python3 || command -v python)}
BUDGET=${GPU_CHECK_BUDGET:-420}
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
step build 200 "$PY" -m pip install --no-deps --no-build-isolation --no-index -e .
# every case of the Triton and extension op tests runs on the GPU when one is visible; serially
# they outlast 150 s there (Triton compiles each case), so they spread over workers when
# pytest-xdist is installed (it is on the H200 image)
XDIST=()
"$PY" -c "import xdist" 2>/dev/null && XDIST=(-n 8)
step kernel_tests 150 "$PY" -m pytest -q -p no:cacheprovider -rfE "${XDIST[@]}" tests/test_ops_triton.py tests/test_ops_ext.py
# the ceiling the kernels' TFLOP/s are read against: one large bf16 matrix product
step matmul_rate 30 "$PY" -c "import torch, triton.testing as tt
a, b = (torch.randn(8192, 8192, device='cuda', dtype=torch.bfloat16) for _ in range(2))
ms = tt.do_bench(lambda: a @ b, warmup=200, rep=1000, return_mode='median')
print(f'bf16 8192^3 matmul: {2 * 8192**3 / ms / 1e9:.0f} TFLOP/s')"
step ops_bench 150 "$PY" -m pytest -q -p no:cacheprovider bench/test_bench_ops.py --benchmark-only \
  --benchmark-json="$WORK/ops.json" --benchmark-columns=median,iqr,rounds --benchmark-sort=name
step svd_paths 90 "$PY" -m bench.svd_paths --out "$WORK/svd"
if [ -f "$CONFIGS/llama-3-8b.json" ]; then
  # Llama-3-8B shapes, 4 of its 32 decoder layers: one layer's SVD cost times 32 is the full
  # model's; the measured peak is checked against the plan for this same truncated model
  step init_8b_4layers 120 "$PY" -m bench.gpu_init --config "$CONFIGS/llama-3-8b.json" --num-layers 4 \
    --memory-mode projected --layer-groups 1 --batch-size 4 --json "$WORK/init_8b_4layers.json"
  step init_1b 150 "$PY" -m bench.gpu_init --config "$CONFIGS/llama-3.2-1b.json" --memory-mode full \
    --batch-size 8 --json "$WORK/init_1b_full.json"
else
  echo "no model configs in $CONFIGS: full-size inits skipped" | tee -a "$OUT/steps.log"
fi
