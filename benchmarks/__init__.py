"""Benchmarks of preact_fused, each leaving a record under ``benchmarks/results/<device>/``.

    python -m benchmarks.resnet1001     ResNet-1001 training: images/s, memory, max batch, roofline
    python -m benchmarks.ops_bench      one fused BN-ReLU-conv triple per ResNet-1001 shape vs eager
                                        (modules, with autograd)
    python -m benchmarks.kernel_ops     GPU: the same triples at the kernel level, per backend and
                                        per op, against eager cuDNN and the minimum-bytes time
    bash benchmarks/gpu_check.sh OUT    the prepared GPU run: build, GPU tests, the benchmarks

Results go to ``benchmarks/results/local/<device>/`` (ignored by git) unless ``--out DIR`` is given;
``--commit-results`` writes the committed record under ``benchmarks/results/<device>/`` instead.

This module holds what the scripts share: timing, the device's name and the run's environment, where
results go, and the verdict of the correctness smoke (``benchmarks.smoke``) on the rows.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import re
import shlex
import statistics
import sys
from collections import Counter
from pathlib import Path

import torch

from preact_fused.backend import unavailable_reason

RESULTS = Path(__file__).resolve().parent / "results"
COMMITTED = RESULTS                  # committed records: benchmarks/results/<device>/
LOCAL = RESULTS / "local"            # a user's runs: benchmarks/results/local/<device>/ (git-ignored)
SMOKE_ENV = "PREACT_FUSED_SMOKE"     # path of the correctness smoke's smoke.json, set by gpu_check.sh


def output_dir(out: Path | None, commit: bool, device: torch.device) -> Path:
    """Where a benchmark writes: ``out`` if given, else the committed or the local results folder."""
    if out is not None:
        return Path(out)
    return (COMMITTED if commit else LOCAL) / device_slug(device)


def write_json_atomic(path: Path, record) -> None:
    """Write ``record`` as JSON so that a reader (or a run cut off mid-write) never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=1, default=str))
    os.replace(tmp, path)


def smoke_failures(path: str | None = None) -> dict | None:
    """Backends the correctness smoke failed, {backend: reason}; None when no smoke applies.

    ``path`` (default: the environment variable PREACT_FUSED_SMOKE) names the smoke's JSON. When it
    is named but missing or unreadable (the smoke crashed or ran out of time), every fused backend
    counts as failed: nothing vouches for its kernels."""
    path = path if path is not None else os.environ.get(SMOKE_ENV)
    if not path:
        return None
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        reason = f"no correctness smoke result ({type(err).__name__} reading {path})"
        return {"triton": reason, "cuda": reason, "reference": reason}
    failed = {name: f"failed the correctness smoke: {info.get('summary', 'see smoke.json')}"
              for name, info in record.get("backends", {}).items() if not info.get("ok")}
    if not record.get("complete"):
        for name in ("triton", "cuda"):   # not reached, or still running when the smoke stopped
            info = record.get("backends", {}).get(name)
            if info is None or info.get("summary") == "running":
                failed[name] = "was not vouched for: the correctness smoke did not finish"
    return failed


def mark_invalid(rows: list[dict], failures: dict | None = None) -> list[dict]:
    """Mark every row timed on a backend that failed the correctness smoke: ``invalid`` says why.

    Timings of a kernel that computes the wrong thing are not results; the rows stay (they show
    what ran) but reports and the README table leave them out."""
    failures = smoke_failures() if failures is None else failures
    for row in rows:
        if failures and row.get("backend") in failures:
            row["invalid"] = f"backend {row['backend']} {failures[row['backend']]}"
    return rows


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


def cuda_kernel_count(fn) -> dict:
    """{"total", "by_name"}: the kernels (and memsets/memcpys) the CUDA profiler records while ``fn``
    runs (a CUDA graph's replay counts each kernel of the graph)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    names = Counter(e.name for e in prof.events() if e.device_type == DeviceType.CUDA)
    return {"total": sum(names.values()), "by_name": dict(names)}


def backend_table(columns: list[str], rows: list[dict], cells) -> str:
    """A markdown table with a row per backend: ``columns`` between "backend" and "note";
    ``cells(row)`` gives a row's cells and its note; a row with a ``reason`` says why it cannot run."""
    lines = ["| " + " | ".join(["backend", *columns, "note"]) + " |", "|" + " --- |" * (len(columns) + 2)]
    for r in rows:
        if r["reason"] is not None:
            values, note = ["-"] * len(columns), f"cannot run: {r['reason']}"
        else:
            values, note = cells(r)
        lines.append("| " + " | ".join([r["backend"], *values, note]) + " |")
    return "\n".join(lines)


def command_line(module: str, argv) -> str:
    """The shell command that ran benchmark ``module`` with ``argv`` (None: this process's arguments)."""
    return shlex.join(["python", "-m", module, *(sys.argv[1:] if argv is None else argv)])


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
