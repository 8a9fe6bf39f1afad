"""benchmarks/gpu_check.sh, the prepared GPU run, driven by a stand-in python that records each call.

The stand-in exits with the status the test chooses per part, so the order of the parts, their
commands, the failure accounting and the time budget are checked without a GPU.
"""
import json
import os
import stat
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

STUB = """#!/usr/bin/env bash
echo "$*" >> "{log}"
case "$*" in
  "-c import xdist") exit {xdist} ;;
  -c*get_device_capability*) echo 90 ;;
  *pip*) echo "archs=$PREACT_FUSED_CUDA_ARCHS" >> "{log}" ;;
  *pytest*) echo "omp=$OMP_NUM_THREADS" >> "{log}"; exit {tests} ;;
esac
exit 0
"""


PARTS = ["smoke", "kernels", "bench", "launches", "compile", "sweep", "tests"]
MODULES = ["benchmarks.smoke", "benchmarks.kernel_ops", "benchmarks.resnet1001", "benchmarks.launches",
           "benchmarks.resnet1001", "benchmarks.batch_sweep", "pytest"]


def _run(tmp_path, budget=540, xdist=0, tests=0, extra=()):
    log = tmp_path / "calls.log"
    stub = tmp_path / "python"
    stub.write_text(STUB.format(log=log, xdist=xdist, tests=tests))
    stub.chmod(stub.stat().st_mode | stat.S_IEXEC)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": str(stub), "PREACT_GPU_CHECK_BUDGET": str(budget)}
    for name in ("PREACT_FUSED_CUDA_ARCHS", "OMP_NUM_THREADS"):
        env.pop(name, None)
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), *extra, str(out)], env=env,
                          capture_output=True, text=True, timeout=120)
    lines = log.read_text().splitlines() if log.exists() else []
    calls = [line for line in lines if line != "-" and not line.startswith(("-c ", "archs=", "omp="))]
    return done, calls, (out / "summary.txt").read_text(), lines


def _parts(summary):
    return [line.split(":")[0] for line in summary.splitlines() if not line.startswith("total")]


def test_parts_run_in_order_and_pass(tmp_path):
    done, calls, summary, lines = _run(tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    steps = [c.split()[1] for c in calls]
    wheels = ["pip"] if (ROOT / "benchmarks" / "wheels").is_dir() and any((ROOT / "benchmarks" / "wheels").glob("*.whl")) else []
    assert steps == wheels + ["pip"] + MODULES
    assert calls[-1].startswith("-m pytest -m cuda") and calls[-1].endswith("-n 8")
    assert _parts(summary) == (["wheels"] if wheels else []) + ["build"] + PARTS
    assert all(": ok in " in line for line in summary.splitlines()[:-1])
    assert summary.splitlines()[-1].startswith("total ")
    assert "archs=90" in lines  # the extension is built for the GPU's own compute capability
    assert "omp=2" in lines     # 8 test workers, 2 CPU threads each
    record = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [p["name"] for p in record["parts"]] == _parts(summary) and record["budget_s"] == 540


def test_tests_run_serially_without_xdist(tmp_path):
    done, calls, _, lines = _run(tmp_path, xdist=1)
    assert done.returncode == 0
    assert calls[-1].endswith("-q -rs -x")
    assert "omp=2" not in lines


def test_a_failed_part_is_recorded_and_the_rest_still_run(tmp_path):
    done, calls, summary, _ = _run(tmp_path, tests=1)
    assert done.returncode == 1
    assert "tests: FAILED (exit 1)" in summary
    record = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert record["parts"][-1]["status"] == "FAILED (exit 1)"


def test_parts_past_the_budget_are_skipped(tmp_path):
    done, calls, summary, _ = _run(tmp_path, budget=5)
    assert done.returncode == 1
    assert calls == []
    assert "build: SKIPPED (time budget spent)" in summary


def test_dry_run_shows_every_part_within_nine_minutes(tmp_path):
    done, calls, summary, _ = _run(tmp_path, extra=["--dry-run"])
    assert done.returncode == 0, done.stdout + done.stderr
    assert calls == []          # nothing ran
    planned = [line for line in summary.splitlines() if line.startswith("part ")]
    names = [line.split()[1] for line in planned]
    assert names[names.index("build"):] == ["build"] + PARTS
    limits = [int(line.split()[3].rstrip("s:")) for line in planned]
    assert sum(limits) <= 540 and f"total of the part limits: {sum(limits)}s" in summary
    for module, line in zip(MODULES, planned[-len(MODULES):]):
        assert module in line
    record = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert sum(p["limit_s"] for p in record["parts"]) == sum(limits) and record["dry_run"] == 1
