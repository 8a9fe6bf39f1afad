#!/usr/bin/env bash
# The prepared command for a GPU machine, one call of at most 9 minutes (build included):
#
#   bash benchmarks/gpu_check.sh OUTDIR            run every part, logs and results under OUTDIR
#   bash benchmarks/gpu_check.sh --dry-run OUTDIR  print each part's command and time limit, run nothing
#
# Parts, in this order, each capped with `timeout` and all together by PREACT_GPU_CHECK_BUDGET
# seconds (default 540); a part that fails or runs out of time is recorded and the next one runs.
# Every part writes its results as it goes, so a run cut off at any point leaves what it measured.
#   wheels   pip install --no-index --no-deps of benchmarks/wheels/*.whl (nvidia-cudnn-frontend for
#            the cuDNN peer; the machine has no internet; benchmarks/download_wheels.sh fills it)
#   build    pip install --no-build-isolation -e . for this GPU's compute capability only
#   smoke    correctness of both backends' ops on the ResNet-1001 shapes, bf16 and fp32, against
#            the reference (smoke/smoke.json). The timing parts read it (PREACT_FUSED_SMOKE): rows of
#            a backend that failed, or that the smoke did not finish, are marked invalid.
#   kernels  per-triple kernel timings: triton, cuda, cuDNN's fused patterns, eager cuDNN, min-bytes
#   bench    ResNet-1001 at batch 128, graphed and not (eager, eager AMP, fused cuda fp32, fused AMP,
#            memory="min"), loss checks and the CUDA profiler's kernels per step included
#   launches the CUDA profiler's kernel events per unit and per ResNet-1001 step: eager, triton, cuda
#            (batch 2, 32x32; autotuning off: the count does not depend on the tiles)
#   compile  torch.compile: default, reduce-overhead, max-autotune-no-cudagraphs (in that order)
#   sweep    images/s and peak memory from batch 128 up to the largest that fits, headline figures
#   tests    the GPU test suite (pytest -m cuda), whatever of it fits in the time left
# OUTDIR/summary.json (rewritten after every part) and summary.txt: each part's status and duration.
set -uo pipefail

dry=0
if [ "${1:-}" = "--dry-run" ]; then dry=1; shift; fi
if [ $# -ne 1 ]; then
  echo "usage: bash benchmarks/gpu_check.sh [--dry-run] OUTDIR" >&2
  exit 2
fi
out="$1"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
cd "$(dirname "$0")/.."
python="${PYTHON:-python}"
budget="${PREACT_GPU_CHECK_BUDGET:-540}"
start=$(date +%s)
failed=0
parts_json=""
planned=0
: > "$out/summary.txt"

write_summary() {
  printf '{"budget_s": %s, "elapsed_s": %s, "dry_run": %s, "smoke": "%s", "parts": [%s]}\n' \
    "$budget" "$(( $(date +%s) - start ))" "$dry" "smoke/smoke.json" "$parts_json" > "$out/summary.json.tmp"
  mv "$out/summary.json.tmp" "$out/summary.json"
}

# run NAME CAP_SECONDS COMMAND...: run with a timeout of min(CAP, budget left), log to OUTDIR/NAME.log
run() {
  local name="$1" cap="$2"
  shift 2
  if [ "$dry" -eq 1 ]; then
    planned=$(( planned + cap ))
    echo "part $name limit ${cap}s: $*" | tee -a "$out/summary.txt"
    parts_json="${parts_json:+$parts_json, }{\"name\": \"$name\", \"limit_s\": $cap, \"status\": \"planned\"}"
    return
  fi
  local left=$(( budget - ($(date +%s) - start) ))
  local limit=$(( cap < left ? cap : left ))
  local t0=$(date +%s) status rc=0
  if [ "$limit" -lt 10 ]; then
    status="SKIPPED (time budget spent)"
    failed=1
  else
    echo "== $name (limit ${limit}s): $*"
    timeout --kill-after=10 "$limit" "$@" > "$out/$name.log" 2>&1
    rc=$?
    status="ok"
    if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then status="TIMED OUT after ${limit}s"; failed=1
    elif [ $rc -ne 0 ]; then status="FAILED (exit $rc)"; failed=1; fi
  fi
  local took=$(( $(date +%s) - t0 ))
  echo "$name: $status in ${took}s" | tee -a "$out/summary.txt"
  parts_json="${parts_json:+$parts_json, }{\"name\": \"$name\", \"limit_s\": $limit, \"status\": \"$status\", \"exit\": $rc, \"seconds\": $took}"
  write_summary
  [ -f "$out/$name.log" ] && tail -n 30 "$out/$name.log"
}

if [ "$dry" -eq 0 ]; then
  {
    date -u
    nvidia-smi || echo "nvidia-smi: not found"
    "$python" - <<'PYEOF'
import sys, torch
print("python", sys.version.split()[0])
print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version())
print("gpu", torch.cuda.get_device_name() if torch.cuda.is_available() else None)
try:
    import triton
    print("triton", triton.__version__)
except ImportError:
    print("triton: not installed")
PYEOF
    command -v nvcc >/dev/null && nvcc --version | tail -n 2
  } > "$out/env.txt" 2>&1
  cat "$out/env.txt"
fi

# 8 test workers when pytest-xdist is installed, 2 CPU threads each (the float64 references of the
# checks run on the CPU; 8 workers of all-core thread pools would thrash).
workers=()
test_env=()
if [ "$dry" -eq 0 ] && "$python" -c "import xdist" 2>/dev/null; then
  workers=(-n 8)
  test_env=(env OMP_NUM_THREADS=2)
fi
# Build for this GPU only (half the compile time of the default "80;90").
arch=""
[ "$dry" -eq 0 ] && arch=$("$python" -c "import torch; print('%d%d' % torch.cuda.get_device_capability())" 2>/dev/null)
export PREACT_FUSED_CUDA_ARCHS="${PREACT_FUSED_CUDA_ARCHS:-${arch:-90}}"
export PREACT_FUSED_SMOKE="$out/smoke/smoke.json"
mkdir -p "$out/smoke"

wheels=(benchmarks/wheels/*.whl)
if [ -e "${wheels[0]}" ]; then
  run wheels 15 "$python" -m pip install --no-index --no-deps "${wheels[@]}"
fi
run build 150 "$python" -m pip install -v --no-build-isolation --no-deps -e .
run smoke 60 "$python" -m benchmarks.smoke --out "$out/smoke"
run kernels 65 "$python" -m benchmarks.kernel_ops --batch 128 --out "$out/kernels"
run bench 90 "$python" -m benchmarks.resnet1001 --batch 128 --warmup 3 --steps 6 \
  --variants eager eager_graphed eager_amp eager_amp_graphed fused_cuda fused_cuda_graphed \
  fused_amp fused_amp_graphed fused_amp_min fused_amp_min_graphed --max-batch-cap 0 --count-kernels --out "$out/bench"
run launches 30 env PREACT_FUSED_TRITON_AUTOTUNE=0 "$python" -m benchmarks.launches --backends eager triton cuda \
  --out "$out/launches/launches.json"
run compile 45 "$python" -m benchmarks.resnet1001 --batch 128 --warmup 2 --steps 4 \
  --variants eager_amp compile_amp compile_amp_reduce_overhead compile_amp_max_autotune \
  --max-batch-cap 0 --count-kernels --out "$out/compile"
run sweep 50 "$python" -m benchmarks.batch_sweep --variants eager_amp fused_amp fused_amp_graphed \
  fused_amp_min eager_amp_graphed --warmup 2 --steps 2 --resolution 128 --out "$out/sweep"
run tests 35 "${test_env[@]}" "$python" -m pytest -m cuda -q -rs -x "${workers[@]}"

if [ "$dry" -eq 1 ]; then
  echo "total of the part limits: ${planned}s (budget ${budget}s)" | tee -a "$out/summary.txt"
  write_summary
  [ "$planned" -le "$budget" ] || exit 1
  exit 0
fi
echo "total $(( $(date +%s) - start ))s" | tee -a "$out/summary.txt"
write_summary
exit $failed
