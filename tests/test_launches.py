"""The launch counter and host-overhead tools (benchmarks/launches.py, benchmarks/host_overhead.py) on CPU.

Tiny inputs (batch 1, 8x8) and the two smallest bottleneck depths (11 and 20: one and two units
per stage); the command-line runs go to subprocesses, so the emulated CUDA ops they load do not
meet another build of the same namespace in this process.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import host_overhead, launches
from benchmarks.launches import LaunchCounter

ROOT = Path(__file__).resolve().parent.parent
SMALL = dict(depths=(11, 20), batch=1, image=8, warmup=1)  # warm: workspaces allocated once

# A plain bottleneck unit (identity shortcut) of the eager model, by hand:
#   forward:  3 BN (native_batch_norm, plus num_batches_tracked.add_(1) each), 3 ReLU, 3 conv,
#             1 residual add                                                   = 3*2 + 3 + 3 + 1 = 13
#   backward: 3 convolution_backward (data + weight gradient: 2 each), 3 threshold_backward,
#             3 native_batch_norm_backward, 1 add (the unit input's gradient from the shortcut and
#             from bn1)                                                        = 3*2 + 3 + 3 + 1 = 13
#   optimizer (SGD, momentum, weight decay, for-loop on CPU): 9 parameters x (grad + wd*p, buf.mul_,
#             buf.add_, p.add_)                                                = 9*4 = 36
EAGER_UNIT = {
    "forward": {"aten.native_batch_norm": 3, "aten.add_": 3, "aten.relu": 3, "aten.convolution": 3, "aten.add": 1},
    "backward": {"aten.convolution_backward": 6, "aten.threshold_backward": 3, "aten.native_batch_norm_backward": 3,
                 "aten.add": 1},
    "optimizer": {"aten.add": 9, "aten.mul_": 9, "aten.add_": 18},
}


def _count(fn) -> LaunchCounter:
    with LaunchCounter() as counter:
        fn()
    return counter


def test_rule_views_and_allocations_launch_nothing():
    x = torch.randn(4, 6)
    counter = _count(lambda: (x.view(24), x.t(), x.permute(1, 0), x[1:], x[0], x.unsqueeze(0).squeeze(0),
                              x.expand(2, 4, 6), x.detach(), torch.empty(3), torch.empty_like(x),
                              torch.empty_strided((2, 2), (1, 2)), x.new_empty(5), x.contiguous(),
                              x.to(torch.float32), x.reshape(2, 12), x.split(2), torch.zeros(0)))
    assert counter.total == 0, counter.by_name()


def test_rule_kernels_count_one_each():
    x, y = torch.randn(4, 6), torch.randn(4, 6)
    counter = _count(lambda: (torch.zeros(3), x.clone().fill_(1.0), x.clone().copy_(y), x.clone().add_(y),
                              x.t().contiguous(), x.to(torch.float64), x.t().reshape(24)))
    assert counter.aten == {"zeros": 1, "clone": 5, "fill_": 1, "copy_": 1, "add_": 1, "_to_copy": 1}
    assert counter.total == 10


def test_rule_custom_op_counts_its_inner_aten_ops(tmp_path):
    """A custom op launches nothing itself; the ATen ops it runs inside count (rule 3)."""
    lib = torch.library.Library("launches_test", "DEF")
    lib.define("twice_plus_one(Tensor x) -> Tensor")

    def impl(x):
        return torch.ones_like(x).add_(x).add_(x)

    lib.impl("twice_plus_one", impl, "CompositeExplicitAutograd")
    x = torch.randn(5)
    counter = _count(lambda: torch.ops.launches_test.twice_plus_one(x))
    assert counter.aten == {"ones_like": 1, "add_": 2} and not counter.kernels
    assert torch.allclose(torch.ops.launches_test.twice_plus_one(x), 1 + 2 * x)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="Triton interpreter only (CPU)")
def test_rule_triton_launches_counted_once_each():
    import triton
    import triton.language as tl

    @triton.jit
    def _double(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(y_ptr + offs, 2 * tl.load(x_ptr + offs, mask=offs < n), mask=offs < n)

    tuned = triton.autotune(configs=[triton.Config({"BLOCK": 16})], key=["n"])(_double)
    x = torch.randn(40)
    y = torch.empty_like(x)

    def run():
        _double[(3,)](x, y, 40, BLOCK=16)
        tuned[lambda meta: (triton.cdiv(40, meta["BLOCK"]),)](x, y, 40)
        _double[(0,)](x, y, 40, BLOCK=16)   # an empty grid launches nothing

    counter = _count(run)
    assert counter.kernels == {"triton._double": 2}
    assert counter.total == 2  # the interpreter's copies of the arguments are not counted
    assert torch.equal(y, 2 * x)


def test_eager_unit_matches_the_hand_count():
    row = launches.measure("eager", **SMALL)
    assert row["reason"] is None
    assert row["unit_forward"] == 13 and row["unit_backward"] == 13 and row["unit_step"] == 26
    assert row["unit_optimizer"] == 36
    assert row["per_unit"] == EAGER_UNIT
    # ResNet-1001 = fixed part + 333 units; every count is a positive integer
    for name in ("forward", "backward", "optimizer"):
        assert row[f"resnet1001_{name}"] == row[f"fixed_{name}"] + 333 * row[f"unit_{name}"]
        assert row[f"fixed_{name}"] > 0 and float(row[f"fixed_{name}"]).is_integer()
    assert row["resnet1001_step"] == row["resnet1001_forward"] + row["resnet1001_backward"]


def test_a_backend_that_cannot_run_gets_a_row_saying_why(monkeypatch):
    def no_compiler(*args, **kwargs):
        raise RuntimeError("no host C++ compiler (c++) to build the CUDA emulator")

    monkeypatch.setattr(launches, "build_emulated_cuda", no_compiler)
    row = launches.measure("cuda", device="cpu", **SMALL)
    assert "no host C++ compiler" in row["reason"] and "unit_forward" not in row
    assert "cannot run: RuntimeError: no host C++ compiler" in launches.table([row])
    row = host_overhead.measure("cuda", steps=1, depths=(11, 20), device="cpu")  # needs the emulator too
    assert "no host C++ compiler" in row["reason"]


def _run(module, *args, tmp_path):
    out = tmp_path / f"{module}.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-m", f"benchmarks.{module}", *args, "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout, json.loads(out.read_text())


def _row_line(stdout, backend):
    return next(line for line in stdout.splitlines() if line.startswith(f"| {backend} |"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU proxy (a GPU run counts profiler kernels)")
def test_launches_command_prints_table_and_writes_json(tmp_path):
    stdout, record = _run("launches", "--depths", "11", "20", "--batch", "1", "--image", "8", "--warmup", "1",
                          tmp_path=tmp_path)
    assert "| backend | unit fwd | unit bwd |" in stdout
    rows = {r["backend"]: r for r in record["rows"]}
    assert list(rows) == ["eager", "reference", "triton", "cuda"]
    assert record["config"]["depths"] == [11, 20]
    assert rows["eager"]["unit_forward"] == 13 and rows["eager"]["unit_backward"] == 13
    assert _row_line(stdout, "eager").startswith("| eager | 13 | 13 | 26 |")
    for backend in ("reference", "triton", "cuda"):
        row = rows[backend]
        if row["reason"] is not None:  # e.g. no host compiler for the emulator: said in its row
            assert "cannot run" in _row_line(stdout, backend)
            continue
        for name in ("unit_forward", "unit_backward", "resnet1001_step", "resnet1001_optimizer"):
            assert row[name] > 0 and float(row[name]).is_integer(), (backend, name, row[name])
    if rows["triton"]["reason"] is None:
        assert any(k.startswith("triton.") for k in rows["triton"]["per_unit"]["forward"])
    if rows["cuda"]["reason"] is None:  # the emulator's kernels, not the custom ops, are what count
        assert any(k.startswith("preact_fused_emu.") for k in rows["cuda"]["per_unit"]["backward"])


def test_host_overhead_command_prints_table_and_writes_json(tmp_path):
    stdout, record = _run("host_overhead", "--depths", "11", "20", "--steps", "2", tmp_path=tmp_path)
    assert "| backend | step fwd+bwd (ms) |" in stdout
    rows = {r["backend"]: r for r in record["rows"]}
    assert list(rows) == ["eager", "reference", "triton", "cuda"]
    for backend, row in rows.items():
        if row["reason"] is not None:
            assert "cannot run" in _row_line(stdout, backend)
            continue
        assert row["resnet1001_step_s"]["median"] > 0
        assert len(row["times_s"]["20"]["step"]) == 2
    assert rows["eager"]["reason"] is None and rows["reference"]["reason"] is None
