"""Benchmarks of preact_fused, each leaving a record under ``benchmarks/results/<device>/``.

    python -m benchmarks.resnet1001     ResNet-1001 training: images/s, memory, max batch, roofline
    python -m benchmarks.ops_bench      one fused BN-ReLU-conv triple per ResNet-1001 shape vs eager
                                        (modules, with autograd)
    python -m benchmarks.kernel_ops     GPU: the same triples at the kernel level, per backend and
                                        per op, against eager cuDNN and the minimum-bytes time
    bash benchmarks/gpu_check.sh OUT    the prepared GPU run: build, GPU tests, the benchmarks

This module holds what the scripts share: timing, the device's name and the run's environment.
"""
from __future__ import annotations

import datetime
import os
import platform
import re
import statistics
from pathlib import Path

import torch

from preact_fused.backend import unavailable_reason

RESULTS = Path(__file__).resolve().parent / "results"


def device_slug(device: torch.device) -> str:
    """Folder name for a device's results: "cpu", or the GPU's name ("nvidia-h200")."""
    if device.type != "cuda":
        return device.type
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")


def time_calls(fn, count: int, device: torch.device) -> list[float]:
    """Seconds taken by each of ``fn(0) .. fn(count - 1)``.

    CUDA events around each call on a GPU (one synchronisation at the end), ``time.perf_counter``
    around each call elsewhere.
    """
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(count)]
        for i, (start, end) in enumerate(events):
            start.record()
            fn(i)
            end.record()
        torch.cuda.synchronize(device)
        return [start.elapsed_time(end) / 1e3 for start, end in events]
    from time import perf_counter
    times = []
    for i in range(count):
        start = perf_counter()
        fn(i)
        times.append(perf_counter() - start)
    return times


def summarize(times: list[float]) -> dict:
    """Median and 20th/80th percentiles of a list of seconds."""
    if len(times) == 1:
        return {"median": times[0], "q20": times[0], "q80": times[0]}
    q = statistics.quantiles(times, n=5, method="inclusive")
    return {"median": statistics.median(times), "q20": q[0], "q80": q[3]}


def precision_settings() -> dict:
    """The float32 precision switches in force: TF32 in cuDNN convs and matmuls."""
    return {"cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
            "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
            "float32_matmul_precision": torch.get_float32_matmul_precision(),
            "cudnn_benchmark": torch.backends.cudnn.benchmark}


def cpu_name() -> str:
    """The processor's model name (from /proc/cpuinfo on Linux), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> dict:
    """Where and with what a benchmark ran: device, versions, date, precision switches."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "device": str(device), "device_name": cpu_name(),
           "cpu_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
           "python": platform.python_version(), "torch": torch.__version__, "triton": triton_version,
           "cuda": torch.version.cuda, **precision_settings()}
    if device.type == "cuda":
        env["device_name"] = torch.cuda.get_device_name(device)
        env["cudnn"] = torch.backends.cudnn.version()
    return env


def fast_backend_reason(name: str, device: torch.device) -> str | None:
    """Why fast backend ``name`` is not timed on ``device``, or None.

    Off a GPU a fast backend is not timed even where it runs: Triton on CPU is its interpreter, a
    correctness tool (``TRITON_INTERPRET=1``) far too slow for a benchmark.
    """
    reason = unavailable_reason(name, device)
    if reason is None and device.type != "cuda":
        reason = f"not timed on {device.type}: it runs there only as a correctness tool (the interpreter)"
    return reason
