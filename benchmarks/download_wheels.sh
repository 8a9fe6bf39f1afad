#!/usr/bin/env bash
# Download the wheels the offline GPU machine needs beyond its torch (Python 3.12, manylinux x86_64)
# into benchmarks/wheels/ (git-ignored; it travels with the working tree, so it must stay small:
# nvidia-cudnn-frontend is about 12 MB). benchmarks/gpu_check.sh installs them with
# pip install --no-index --no-deps. torch+cu130 ships cuDNN itself; only the frontend is needed
# (its cutlass-dsl / tvm-ffi dependencies serve other APIs than the graph API used here).
set -euo pipefail
cd "$(dirname "$0")"
mkdir -p wheels
python -m pip download --only-binary=:all: --python-version "${PYTHON_VERSION:-3.12}" \
  --platform manylinux_2_28_x86_64 --no-deps -d wheels "nvidia-cudnn-frontend${CUDNN_FRONTEND_VERSION:+==$CUDNN_FRONTEND_VERSION}"
du -sh wheels
ls -l wheels
