#!/usr/bin/env bash
# The whole GPU check of the local SDXL backend, in one call of at most ~9 minutes on an H100/H200:
#
#   1. benchmarks/gpu_sync_check.py   the sync-free proof of the backend's own loop (SDXLPipeline), its CUDA-graph
#                                     capture and replay (tiny UNet, ~1 min)
#   2. benchmarks/sdxl.py             stock vs tuned vs TAESD at 1024², 24 steps, preset sdxl-random,
#                                     with whatever time is left as its budget for the optional phases
#
# Logs and JSON go to $OUT (the device tool's result folder) or benchmarks/results/. A failure in step 1 does
# not stop step 2: a device run is scarce, so everything that can be measured is measured.
#
# Usage (repository root):
#   bash benchmarks/gpu_check.sh              on the GPU machine (carried wheels in .whl/ are installed first)
#   bash benchmarks/gpu_check.sh --dry-run    on a CPU: the same steps at toy size, to check the script itself
# Environment: GPU_CHECK_BUDGET_S (default 540) bounds the whole run.
set -u
cd "$(dirname "$0")/.." || exit 2
dry=0
[ "${1:-}" = "--dry-run" ] && dry=1
budget=${GPU_CHECK_BUDGET_S:-540}
out=${OUT:-benchmarks/results}
mkdir -p "$out"
start=$(date +%s)
left() { echo $(( budget - ($(date +%s) - start) )); }

# The GPU image has torch but not diffusers/structlog: install the wheels carried in .whl/ (see README).
if [ "$dry" = 0 ] && compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "FAIL installing the carried wheels"; exit 2; }
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/inductor}
python3 -c 'import diffusers, structlog, torch' || { echo "FAIL: diffusers/structlog/torch not importable"; exit 2; }
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm \
  --format=csv | tee "$out/gpu.txt"

status=0
if [ "$dry" = 1 ]; then
  sync_args=(--dry-run --steps 4)
  bench_args=(--preset tiny --device cpu --size 64 --steps 4 --also-steps 0 --batches 1,2 --repeats 1)
else
  sync_args=()
  bench_args=(--preset sdxl-random)
fi

echo "== 1/2 gpu_sync_check ($(left)s left)"
timeout 150 python3 benchmarks/gpu_sync_check.py "${sync_args[@]}" 2>&1 | tee "$out/gpu_sync_check.log"
[ "${PIPESTATUS[0]}" = 0 ] || status=1

# sdxl.py skips optional phases past its budget; keep ~60 s for the phases it cannot skip once started.
bench_budget=$(( $(left) - 60 ))
echo "== 2/2 sdxl benchmark (budget ${bench_budget}s, $(left)s left)"
timeout $(( $(left) > 30 ? $(left) : 30 )) python3 benchmarks/sdxl.py "${bench_args[@]}" --budget-s "$bench_budget" \
  --json "$out/sdxl.json" 2>&1 | tee "$out/sdxl.log"
[ "${PIPESTATUS[0]}" = 0 ] || status=1

echo "== gpu_check finished in $(( $(date +%s) - start ))s: $([ $status = 0 ] && echo PASS || echo 'FAIL (see above)')"
exit $status
