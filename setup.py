"""Installs preact_fused, and builds its CUDA extension ``preact_fused._C`` from csrc/ when it can.

The extension needs torch (with CUDA) importable at build time, so install with
``pip install --no-build-isolation -e .``. Without nvcc, or with a CPU-only torch, the install is
pure Python (with a warning) and the reference / Triton backends still work.

Environment variables:
  PREACT_FUSED_SKIP_CUDA_BUILD=1   pure-Python install, no extension
  PREACT_FUSED_CUDA_ARCHS="80;90"  compute capabilities to compile for (default "80;90"); PTX of the
                                   highest one is embedded too, so newer GPUs can JIT it
  PREACT_FUSED_PTXAS_VERBOSE=0     drop ``-Xptxas -v`` (register / spill report per kernel)
  CUDA_HOME                        CUDA toolkit; else found from the ``nvcc`` on PATH
  MAX_JOBS                         parallel compile jobs (default: from cores and memory)
  NVCC_THREADS                     threads of one nvcc invocation (default 1)
"""
import os
import re
import shutil
import subprocess
import sys
import warnings

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))
EXT_NAME = "preact_fused._C"


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _warn(message: str) -> None:
    warnings.warn(f"preact_fused: {message}; installing the pure-Python package only", stacklevel=2)
    print(f"WARNING: preact_fused: {message}; installing the pure-Python package only", file=sys.stderr)


def _cuda_home_from_nvcc() -> str | None:
    """The toolkit root of the nvcc on PATH (which may be a wrapper script, not the real binary)."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    try:
        out = subprocess.run([nvcc, "-dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                             capture_output=True, text=True, timeout=60)
        text = out.stdout + out.stderr
    except (OSError, subprocess.SubprocessError):
        text = ""
    match = re.search(r"^#\$ TOP=(.+)$", text, re.MULTILINE) or re.search(r"^#\$ _HERE_=(.+)$", text, re.MULTILINE)
    if match:
        root = match.group(1).strip()
        root = os.path.normpath(os.path.dirname(root) if root.rstrip("/").endswith("bin") else root)
        if os.path.exists(os.path.join(root, "bin", "nvcc")):
            return root
    return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))


def _find_cuda_home() -> str | None:
    for name in ("CUDA_HOME", "CUDA_PATH"):
        root = os.environ.get(name)
        if root and os.path.exists(os.path.join(root, "bin", "nvcc")):
            return root
    return _cuda_home_from_nvcc()


def _extra_include_dirs(cuda_home: str) -> list[str]:
    """CUDA library headers that torch's headers include (cusparse.h, cublas_v2.h, ...) from pip's
    nvidia packages, when the toolkit itself lacks them (a compiler-only toolkit)."""
    if os.path.exists(os.path.join(cuda_home, "include", "cusparse.h")):
        return []
    try:
        import nvidia  # namespace package of the nvidia-* wheels torch depends on
    except ImportError:
        return []
    found = []
    for base in list(getattr(nvidia, "__path__", [])):
        for sub in sorted(os.listdir(base)):
            inc = os.path.join(base, sub, "include")
            if os.path.isdir(inc) and any(os.path.exists(os.path.join(inc, h)) for h in ("cusparse.h", "cublas_v2.h")):
                found.append(inc)
    return found


def _max_jobs() -> str:
    """Compile jobs: one per core, at most one per 3 GB of available memory."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        with open("/proc/meminfo") as f:
            avail_kb = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
        by_memory = max(1, avail_kb // (3 * 1024 * 1024))
    except (OSError, StopIteration, ValueError):
        by_memory = cores
    return str(max(1, min(cores, by_memory)))


def _arch_flags(archs: str) -> list[str]:
    caps = []
    for item in re.split(r"[;,\s]+", archs.strip()):
        item = item.replace(".", "").replace("+PTX", "").replace("sm_", "")
        if item:
            if not item.isdigit() or int(item) < 80:
                raise ValueError(f"PREACT_FUSED_CUDA_ARCHS: {item!r} is not a compute capability >= 80 "
                                 "(the kernels use bf16 mma.sync of sm_80)")
            caps.append(item)
    if not caps:
        raise ValueError("PREACT_FUSED_CUDA_ARCHS is empty")
    caps = sorted(set(caps), key=int)
    flags = [f"-gencode=arch=compute_{c},code=sm_{c}" for c in caps]
    flags.append(f"-gencode=arch=compute_{caps[-1]},code=compute_{caps[-1]}")
    return flags


def get_extensions():
    """(ext_modules, cmdclass) for the CUDA extension, or ([], {}) with a warning when it cannot be built."""
    if _env_flag("PREACT_FUSED_SKIP_CUDA_BUILD"):
        print("preact_fused: PREACT_FUSED_SKIP_CUDA_BUILD is set; skipping the CUDA extension", file=sys.stderr)
        return [], {}
    cuda_home = _find_cuda_home()
    if cuda_home is None:
        _warn("nvcc not found (set CUDA_HOME or put nvcc on PATH) so the CUDA extension is not built")
        return [], {}
    os.environ["CUDA_HOME"] = cuda_home  # read by torch.utils.cpp_extension at import time
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as err:
        _warn(f"torch is not importable at build time ({err}); use `pip install --no-build-isolation`")
        return [], {}
    if torch.version.cuda is None:
        _warn(f"torch {torch.__version__} has no CUDA support")
        return [], {}
    cpp_extension.CUDA_HOME = cuda_home
    os.environ.setdefault("MAX_JOBS", _max_jobs())

    sources = ["csrc/bindings.cpp", "csrc/conv/fwd.cu", "csrc/conv/dgrad.cu", "csrc/conv/wgrad.cu", "csrc/bn/bn.cu"]
    system_includes = []
    for inc in _extra_include_dirs(cuda_home):
        system_includes += ["-isystem", inc]
    # -fmad=false: no implicit multiply-add contraction, so the device code rounds as the CPU emulator
    # build of the same kernels does (-ffp-contract=off); the kernels' own FMAs are explicit fmaf.
    # -maxrregcount=255: without it ptxas caps some kernels that only have __launch_bounds__(128)
    # below their need (at 128, 96 or 72 registers) and spills; the kernels are written for 0 spills.
    nvcc_flags = ["-O3", "-fmad=false", "-maxrregcount=255", f"--threads={os.environ.get('NVCC_THREADS', '1')}"]
    nvcc_flags += _arch_flags(os.environ.get("PREACT_FUSED_CUDA_ARCHS", "80;90"))
    if os.environ.get("PREACT_FUSED_PTXAS_VERBOSE", "1") != "0":
        nvcc_flags += ["-Xptxas=-v"]
    ext = cpp_extension.CUDAExtension(
        name=EXT_NAME,
        sources=sources,
        include_dirs=[os.path.join(HERE, "csrc")],
        extra_compile_args={"cxx": ["-O3"] + system_includes, "nvcc": nvcc_flags + system_includes},
    )
    build_ext = cpp_extension.BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)
    print(f"preact_fused: building {EXT_NAME} with CUDA_HOME={cuda_home}, MAX_JOBS={os.environ['MAX_JOBS']}, "
          f"archs={os.environ.get('PREACT_FUSED_CUDA_ARCHS', '80;90')}", file=sys.stderr)
    print(f"preact_fused: compiling {len(sources)} sources ({', '.join(sources)}); about 3 minutes on 2 cores "
          "for two architectures, silent unless pip runs with -v (which shows each nvcc/ptxas line)",
          file=sys.stderr, flush=True)
    return [ext], {"build_ext": build_ext}


ext_modules, cmdclass = get_extensions()

setup(
    name="preact_fused",
    version="0.1.0",
    description="Fused BatchNorm-ReLU-conv kernels for pre-activation residual networks",
    packages=find_packages(include=["preact_fused", "preact_fused.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.4"],
    extras_require={"test": ["pytest>=7", "numpy", "matplotlib", "tqdm", "pytest-benchmark", "hypothesis"],
                    "bench": ["matplotlib", "tqdm", "pytest", "pytest-benchmark"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
