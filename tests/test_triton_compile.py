"""The Triton kernels compile for Hopper (sm_90) without a GPU: every build that the ResNet-1001 shapes
can select, in float32 (exact and TF32), bfloat16 and float16, compiles to a cubin, spills no
register under pressure (see QUIRK_STACK_BYTES) and fits the shared memory of one block.

The builds run in a subprocess (tests/triton_aot.py) because kernels decorated under
TRITON_INTERPRET=1, which this test session sets on a machine without a GPU, cannot be compiled.
About 670 builds; a few minutes on two cores.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton.backends.nvidia")

ROOT = Path(__file__).resolve().parents[1]
ARCH = 90


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("aot") / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    done = subprocess.run([sys.executable, str(ROOT / "tests" / "triton_aot.py"), "--arch", str(ARCH),
                           "--json", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stdout + done.stderr
    print(done.stdout)
    return json.loads(out.read_text())


def _describe(build):
    blocks = {k: v for k, v in build["constants"].items() if k.startswith("BLOCK")}
    return f"{build['kernel']} {build['dtype']} {blocks} warps={build['num_warps']}"


def test_every_kernel_and_dtype_is_built(report):
    kernels = {(b["kernel"].rsplit(".", 1)[1], b["dtype"]) for b in report}
    names = {"_conv_kernel", "_wgrad_kernel", "_bn_stats_kernel", "_bn_fold_kernel", "_bn_backward_kernel"}
    assert kernels == {(k, d) for k in names for d in ("float32", "float32-tf32", "bfloat16", "float16")}
    # the forward with each BN form, dgrad with and without the BN epilogue are among the conv builds
    switches = {(b["constants"]["TRANSPOSED"], b["constants"]["BN"], b["constants"]["PREACT"],
                 b["constants"]["BN_MASK"], b["constants"]["HAS_RESIDUAL"], b["constants"]["WANT_STATS"])
                for b in report if b["kernel"].endswith("_conv_kernel")}
    stats, fold, running = 1, 2, 3
    assert {(False, stats, True, False, True, True), (False, stats, True, False, False, True),
            (False, fold, True, False, False, False), (False, running, True, False, True, False),
            (False, 0, False, False, False, True), (True, fold, False, True, False, False),
            (True, 0, False, False, False, False)} <= switches


def test_every_build_compiles(report):
    failed = [f"{_describe(b)}: {b['error']}" for b in report if "error" in b]
    assert not failed, "\n".join(failed)


# Triton 3.6's ptxas keeps an 8-byte stack frame in a few builds at 96-128 registers, far from the
# 255 a thread may use: not register pressure. Anything more is.
QUIRK_STACK_BYTES, QUIRK_MAX_REGISTERS = 8, 128


def test_no_build_spills_registers(report):
    spilling = [f"{_describe(b)}: {b['registers']} registers, {b['stack']} stack bytes"
                for b in report if "error" not in b and b["stack"]
                and (b["stack"] > QUIRK_STACK_BYTES or b["registers"] > QUIRK_MAX_REGISTERS)]
    assert not spilling, "\n".join(spilling)


def test_every_build_fits_shared_memory(report):
    sys.path.insert(0, str(ROOT / "tests"))
    from triton_aot import SHARED_LIMIT

    over = [f"{_describe(b)}: {b['shared']} bytes" for b in report
            if "error" not in b and b["shared"] > SHARED_LIMIT[ARCH]]
    assert not over, "\n".join(over)
