#!/usr/bin/env bash
# The prepared command for a GPU machine: build, GPU tests, then the benchmarks, all logged to OUTDIR.
#
#   bash benchmarks/gpu_check.sh OUTDIR
#
# Parts, in order of importance after the build, each capped with `timeout` and all together by
# PREACT_GPU_CHECK_BUDGET seconds (default 540); a part that fails or runs out of time is recorded
# and the next one runs. Exit status 1 when any part failed. OUTDIR receives:
#   env.txt                    nvidia-smi, python / torch / triton / CUDA versions
#   build.log                  pip install --no-build-isolation -e .  (builds the CUDA extension for
#                              this GPU's compute capability)
#   tests.log                  pytest -m cuda (8 workers with pytest-xdist when it is installed:
#                              compiling the Triton kernels for every tested configuration is CPU work)
#   kernels/                   kernel-level: each ResNet-1001 triple's fused forward and backward per
#                              backend (triton, cuda) and per op, vs eager cuDNN and the minimum-bytes
#                              time, do_bench (kernels.log, kernel_ops.csv)
#   bench/                     ResNet-1001 at batch 128, every variant but torch.compile, the
#                              reference backend and fp32 Triton (minutes of autotuning; the Triton
#                              kernels are timed in kernels/) (bench.log)
#   maxbatch/                  the largest batch of eager_amp and fused_amp, to 256 images
#                              (maxbatch.log)
#   bench_compile/             eager, eager_amp, torch.compile and fused_amp at batch 128: compiling
#                              ResNet-1001 takes minutes, once per batch size (bench_compile.log)
#   ops/                       module-level: BNReLUConv2d per backend vs eager modules, do_bench (ops.log)
#   summary.txt                each part's status and duration
set -uo pipefail

if [ $# -ne 1 ]; then
  echo "usage: bash benchmarks/gpu_check.sh OUTDIR" >&2
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
: > "$out/summary.txt"

# run NAME CAP_SECONDS COMMAND...: run with a timeout of min(CAP, budget left), log to OUTDIR/NAME.log
run() {
  local name="$1" cap="$2"
  shift 2
  local left=$(( budget - ($(date +%s) - start) ))
  local limit=$(( cap < left ? cap : left ))
  if [ "$limit" -lt 10 ]; then
    echo "$name: SKIPPED (time budget spent)" | tee -a "$out/summary.txt"
    failed=1
    return
  fi
  local t0=$(date +%s)
  echo "== $name (limit ${limit}s): $*"
  timeout --kill-after=15 "$limit" "$@" > "$out/$name.log" 2>&1
  local rc=$?
  local status="ok"
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then status="TIMED OUT after ${limit}s"; failed=1
  elif [ $rc -ne 0 ]; then status="FAILED (exit $rc)"; failed=1; fi
  echo "$name: $status in $(( $(date +%s) - t0 ))s" | tee -a "$out/summary.txt"
  tail -n 40 "$out/$name.log"
}

{
  date -u
  nvidia-smi || echo "nvidia-smi: not found"
  "$python" - <<'EOF'
import sys, torch
print("python", sys.version.split()[0])
print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version())
print("gpu", torch.cuda.get_device_name() if torch.cuda.is_available() else None)
try:
    import triton
    print("triton", triton.__version__)
except ImportError:
    print("triton: not installed")
EOF
  command -v nvcc >/dev/null && nvcc --version | tail -n 2
} > "$out/env.txt" 2>&1
cat "$out/env.txt"

# 8 test workers when pytest-xdist is installed, 2 CPU threads each (the float64 references of the
# checks run on the CPU; 8 workers of all-core thread pools would thrash).
workers=()
test_env=()
if "$python" -c "import xdist" 2>/dev/null; then
  workers=(-n 8)
  test_env=(env OMP_NUM_THREADS=2)
fi
# Build for this GPU only (half the compile time of the default "80;90").
arch=$("$python" -c "import torch; print('%d%d' % torch.cuda.get_device_capability())" 2>/dev/null)
export PREACT_FUSED_CUDA_ARCHS="${PREACT_FUSED_CUDA_ARCHS:-${arch:-80;90}}"

run build 240 "$python" -m pip install --no-build-isolation -e .
run tests 200 "${test_env[@]}" "$python" -m pytest -m cuda -q -rs "${workers[@]}"
run kernels 120 "$python" -m benchmarks.kernel_ops --batch 128 --out "$out/kernels"
run bench 150 "$python" -m benchmarks.resnet1001 --batch 128 --warmup 3 --steps 8 \
  --skip compile_amp fused_reference fused_triton --max-batch-cap 0 --out "$out/bench"
run maxbatch 120 "$python" -m benchmarks.resnet1001 --batch 128 --warmup 1 --steps 2 \
  --variants eager_amp fused_amp --max-batch-cap 4096 --max-batch-resolution 256 --out "$out/maxbatch"
run bench_compile 240 "$python" -m benchmarks.resnet1001 --batch 128 --warmup 3 --steps 10 \
  --variants eager eager_amp compile_amp fused_amp --max-batch-cap 0 --out "$out/bench_compile"
run ops 90 "$python" -m benchmarks.ops_bench --batch 128 --providers eager triton cuda --out "$out/ops"

echo "total $(( $(date +%s) - start ))s" | tee -a "$out/summary.txt"
exit $failed
