"""The CUDA extension on a machine without a GPU: built, loadable, registered, and its kernels emulated.

CI builds the extension (``pip install --no-build-isolation -e .`` with nvcc and a CUDA build of
torch) on CPU-only machines; these tests check what can be checked there: the library loads
without a GPU and without initialising CUDA, each schema is the contract's (preact_fused/contract.py),
the fake (meta) implementations give the shapes and strides the kernels produce, and a missing
build or an unsupported dtype gives an error that says what to do. Last, the kernel sources
themselves run on the CPU under a small emulator (csrc/emulate/: blocks one after another, the
threads of a block as fibers in forward, reverse or shuffled order between barriers), one emulated
kernel launch per op call.

The contract checks are those of tests/backend_checks.py, which tests/test_conformance.py runs on
every backend (the emulated kernels included, in the forward thread order); this file runs only
what is particular to the CUDA kernels: the other thread orders, ResNet-sized and wide shapes in
more dtypes, the wgrad split plans, opcheck and torch.compile on the emulated ops, AddressSanitizer
and the sm_90 register report.
"""
from __future__ import annotations

import inspect
import os
import shutil
import subprocess
import sys

import pytest
import torch

import preact_fused.cuda as cuda_backend
from preact_fused import contract, reference
from preact_fused.shapes import RESNET1001_TRIPLES, triple_roles

from backend_checks import (MANY_TILES, MANY_TILES_CASE, ODD_CASES, WIDE_BN_CASE, WIDE_CASE, check_bn_backward,
                            check_bn_fold, check_bn_stats, check_compiled_unit, check_conv_dgrad, check_conv_fwd,
                            check_conv_wgrad, check_conv_wgrad_bn_backward, check_reruns_identical, opcheck_samples,
                            resnet1001_case)

# ---- the extension: build, load, schemas -----------------------------------------------------------

def _build_expected() -> str | None:
    """Why the extension may legitimately be absent here, or None when it must have been built."""
    if os.environ.get("PREACT_FUSED_SKIP_CUDA_BUILD", "").strip().lower() in ("1", "true", "yes", "on"):
        return "PREACT_FUSED_SKIP_CUDA_BUILD is set: pure-Python install"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} has no CUDA support: pure-Python install"
    if shutil.which("nvcc") is None and not os.environ.get("CUDA_HOME"):
        return "no nvcc on PATH and no CUDA_HOME: pure-Python install"
    return None


@pytest.fixture(scope="module")
def ext():
    if not cuda_backend.is_built():
        reason = _build_expected()
        if reason is not None:
            pytest.skip(f"CUDA extension not built ({reason})")
        pytest.fail(f"nvcc and a CUDA build of torch are present but: {cuda_backend._state['error']}")
    return cuda_backend._load()


def _run(code: str, **env) -> str:
    full_env = dict(os.environ, **env)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_import_is_lean():
    """Importing the package (and the cuda backend module) neither loads the library nor CUDA."""
    code = ("import sys, torch, preact_fused, preact_fused.cuda, preact_fused.backend\n"
            "print('preact_fused._C' in sys.modules, torch.cuda.is_initialized())")
    assert _run(code) == "False False"


def test_extension_file_exists(ext):
    assert os.path.isfile(ext.__file__), ext.__file__
    assert os.path.dirname(ext.__file__) == os.path.dirname(cuda_backend.__file__)


def test_loads_without_a_gpu(ext):
    """Loading the library needs no GPU and does not initialise CUDA."""
    code = ("import torch, preact_fused.cuda as c\n"
            "c._load()\n"
            "print(hasattr(torch.ops.preact_fused, 'conv_fwd'), torch.cuda.is_initialized())")
    assert _run(code, CUDA_VISIBLE_DEVICES="") == "True False"


def test_built_against_running_torch(ext):
    running = tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2])
    assert (ext.torch_version_major, ext.torch_version_minor) == running
    if torch.version.cuda is not None:
        assert ext.cuda_runtime_version // 1000 == int(torch.version.cuda.split(".")[0])


@pytest.mark.parametrize("name", cuda_backend.OPS)
def test_schema_registered(ext, name):
    op = getattr(torch.ops.preact_fused, name).default
    assert str(op._schema) == f"preact_fused::{contract.SCHEMAS[name]}"
    for key in ("CUDA", "Meta"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"preact_fused::{name}", key), (name, key)
    assert not torch._C._dispatch_has_kernel_for_dispatch_key(f"preact_fused::{name}", "Autograd"), name


@pytest.mark.parametrize("name", cuda_backend.OPS)
def test_python_signatures_are_the_references(name):
    assert inspect.signature(getattr(cuda_backend, name)) == inspect.signature(getattr(reference, name))


def _meta(shape, dtype=torch.bfloat16, channels_last=True):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty(shape, dtype=dtype, device="meta", memory_format=fmt)


def check_fakes(ops):
    """The fakes of namespace ``ops`` (contract.register_fakes) on meta tensors."""
    x, w = _meta((3, 17, 9, 9)), torch.empty(5, 17, 3, 3, device="meta")
    s4 = torch.empty(4, 17, device="meta")
    vec = torch.empty(17, device="meta")
    y, y_stats, fold = ops.conv_fwd(x, w, 2, 1, s4, None, vec, vec, None, None, None, 1e-5, 0.1, False, None, True)
    assert y.shape == (3, 5, 5, 5) and y.is_contiguous(memory_format=torch.channels_last) and y.dtype == torch.bfloat16
    assert y_stats.shape == (4, 5) and fold.shape == (4, 17) and fold.dtype == torch.float32
    _, y_stats, fold = ops.conv_fwd(x, w, 2, 1, None, s4, None, None, None, None, None, 1e-5, 0.1, False, None, False)
    assert y_stats.shape == (0,) and fold.shape == (0,)
    assert ops.bn_stats(x).shape == (4, 17)
    assert ops.bn_fold(s4, vec, vec, vec, vec, None, 1e-5, 0.1, True).shape == (4, 17)
    dy = _meta((3, 5, 5, 5))
    g, sums = ops.conv_dgrad(dy, w, x, 2, 1, s4)
    assert g.shape == x.shape and g.is_contiguous(memory_format=torch.channels_last) and sums.shape == (3, 17)
    assert ops.conv_dgrad(dy, w, x, 2, 1, None)[1].shape == (0,)
    dw = ops.conv_wgrad(x, dy, _meta((5, 17, 3, 3)), 2, 1, s4)
    assert dw.shape == (5, 17, 3, 3) and dw.dtype == torch.float32
    assert ops.bn_backward(x, x, s4, s4[:3], 243.0, True, x).shape == x.shape


def test_fake_shapes_and_strides(ext):
    check_fakes(torch.ops.preact_fused)


def test_no_autograd_formula_on_the_ops(ext):
    """The ops are plain kernels; autograd lives in preact_fused.functions, not on the ops."""
    assert not hasattr(cuda_backend, "_conv_fwd_backward")


def test_unavailable_reasons(ext):
    assert "CUDA devices only" in cuda_backend.unavailable_reason(torch.device("cpu"))
    if not torch.cuda.is_available():
        assert cuda_backend.unavailable_reason(torch.device("cuda")) == "no CUDA device is available"


def test_missing_build_says_how_to_build(monkeypatch):
    def missing(name):
        raise ModuleNotFoundError(f"No module named {name!r}")

    monkeypatch.setattr(cuda_backend, "_state", {"module": None, "error": None})
    monkeypatch.setattr(cuda_backend.importlib, "import_module", missing)
    reason = cuda_backend.unavailable_reason(torch.device("cuda"))
    assert "not built" in reason and "pip install --no-build-isolation -e ." in reason
    with pytest.raises(cuda_backend.ExtensionUnavailable, match="pip install --no-build-isolation"):
        cuda_backend.conv_fwd(torch.zeros(1, 1, 1, 1), torch.zeros(1, 1, 1, 1), 1, 0)


def test_mismatched_build_says_rebuild(monkeypatch):
    class Stale:
        torch_version_major, torch_version_minor, cuda_runtime_version = 1, 0, 11000

    monkeypatch.setattr(cuda_backend, "_state", {"module": None, "error": None})
    monkeypatch.setattr(cuda_backend.importlib, "import_module", lambda name: Stale)
    reason = cuda_backend.unavailable_reason(torch.device("cuda"))
    assert "built against torch 1.0" in reason and "rebuild" in reason


def test_float64_is_a_clear_error():
    x = torch.zeros(1, 2, 3, 3, dtype=torch.float64)
    with pytest.raises(TypeError, match="float32, bfloat16 and float16"):
        cuda_backend.conv_fwd(x, torch.zeros(2, 2, 1, 1, dtype=torch.float64), 1, 0)



# ---- the kernels themselves, on the CPU ----------------------------------------------------------
# csrc/ compiled with the host compiler against the emulator of csrc/emulate/ (blocks in turn,
# threads as cooperative fibers, mma.sync / ldmatrix / shuffles per the PTX ISA, int atomics and
# fences): the kernels' index arithmetic, tiling, masks, epilogues, in-launch trees and split-K
# checked against torch in float64. Not covered: hardware behaviour (timing, races the fibers cannot
# show, the memory model behind __threadfence).

CSRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc")
EMU_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# ResNet-1001 triples at batch 2, larger than the odd cases: several row tiles, column tiles of 64,
# stride 2, split-K (preact_fused/shapes.py).
EMU_RESNET_TRIPLES = [t for t in RESNET1001_TRIPLES
                      if t[0] in ("stem", "s1.conv2", "s2.conv2.first", "s3.shortcut", "s3.conv3")]


# The emulated build itself is the session fixture ``emulated_build`` of tests/conftest.py.


def emulated_launches() -> int:
    """Kernel launches of the emulated build so far (csrc/emulate/emu_runtime.h)."""
    return torch.ops.preact_fused_emu_debug.launches()


class _Counted:
    """preact_fused.cuda's wrappers, asserting that every op call is exactly one kernel launch
    (none for an op on an empty batch)."""

    def __init__(self, module):
        self._module = module

    def __getattr__(self, name):
        fn = getattr(self._module, name)
        if name not in contract.OPS:
            return fn

        def counted(*args, **kwargs):
            before = emulated_launches()
            out = fn(*args, **kwargs)
            launched = emulated_launches() - before
            tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor) and a.dim() == 4]
            if any(t.numel() == 0 for t in tensors):  # an empty batch: at most the fold's launch
                assert launched <= 1, f"{name}: {launched} kernel launches"
            else:
                assert launched == 1, f"{name}: {launched} kernel launches"
            return out

        return counted


@pytest.fixture
def emu(emulated_build, monkeypatch):
    """preact_fused.cuda's wrappers running the emulated kernels on CPU tensors, one launch per call."""
    monkeypatch.setattr(cuda_backend, "_ops", lambda: emulated_build)
    return _Counted(cuda_backend)


@pytest.mark.slow
def test_emulated_schemas_are_the_contracts(emulated_build):
    for name, schema in contract.SCHEMAS.items():
        assert str(getattr(emulated_build, name).default._schema) == f"preact_fused_emu::{schema}"
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"preact_fused_emu::{name}", "CPU")
        assert not torch._C._dispatch_has_kernel_for_dispatch_key(f"preact_fused_emu::{name}", "Autograd")
    check_fakes(emulated_build)


@pytest.mark.slow
def test_emulated_bad_geometry_is_a_clear_error(emu):
    """The bindings refuse what the kernels cannot index, before any launch."""
    x, w = torch.randn(1, 4, 5, 5), torch.randn(6, 4, 3, 3)
    with pytest.raises(RuntimeError, match="at least one input channel"):
        emu._module.conv_fwd(torch.randn(1, 0, 5, 5), torch.randn(6, 0, 3, 3), 1, 1)
    with pytest.raises(RuntimeError, match="at least one input channel"):
        emu._module.conv_wgrad(torch.randn(1, 0, 5, 5), torch.randn(1, 6, 5, 5), torch.randn(6, 0, 3, 3), 1, 1)
    with pytest.raises(RuntimeError, match="empty convolution output"):
        emu._module.conv_fwd(x[..., :2, :2], w, 1, 0)
    with pytest.raises(RuntimeError, match="stride must be >= 1"):
        emu._module.conv_fwd(x, w, 0, 1)
    with pytest.raises(RuntimeError, match="momentum=None needs num_batches_tracked"):
        emu._module.conv_fwd(x, w, 1, 1, stats=reference.bn_stats(x), running_mean=torch.zeros(4),
                             running_var=torch.ones(4), momentum=None, update_running=True)


@pytest.mark.slow
@pytest.mark.parametrize("triple", EMU_RESNET_TRIPLES, ids=lambda t: t[0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_emulated_resnet_convs(emu, triple, dtype):
    """ResNet-1001 triples at batch 2 in the roles the network gives them (preact_fused/shapes.py)."""
    name, case, roles = triple[0], resnet1001_case(triple, 2), triple_roles(triple[0])
    with_bn = roles["with_bn"]
    mode = "none" if not with_bn else "fold" if name.endswith("shortcut") else "update"
    check_conv_fwd(emu, case, dtype, "cpu", "channels_last", mode, roles["with_residual"], roles["want_stats"])
    check_conv_dgrad(emu, case, dtype, "cpu", "channels_last", True, with_bn=with_bn)
    check_conv_wgrad(emu, case, dtype, "cpu", "channels_last", True, with_bn=with_bn)
    if roles["next_bn"]:
        check_conv_wgrad_bn_backward(emu, case, dtype, "cpu", "channels_last", True)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_emulated_wide_channels(emu, dtype):
    """A fold table and a coefficient table wider than a few KB in the dtypes the conformance suite
    leaves out (it runs float16 here)."""
    check_conv_fwd(emu, WIDE_CASE, dtype, "cpu", "nchw", "update", True, True)
    check_conv_dgrad(emu, WIDE_CASE, dtype, "cpu", "nchw", True)
    check_conv_wgrad(emu, WIDE_CASE, dtype, "cpu", "nchw", True)
    check_bn_backward(emu, WIDE_BN_CASE, dtype, "cpu", "channels_last", True, True)


@pytest.mark.slow
def test_emulated_wgrad_splits(emulated_build):
    """The split-K plans of the cases above (kEmulatedSMs = 132 multiprocessors): several splits
    for the small and the large ones, one where a single chunk of pixels is all there is."""
    splits = torch.ops.preact_fused_emu_debug.wgrad_splits
    assert splits(torch.empty(3, 17, 9, 9), [3, 17, 3, 3], 2, 1) == 3      # 75 pixels, 5 chunks of 16
    assert splits(torch.empty(2, 16, 96, 96), [16, 16, 1, 1], 1, 0) > 100
    assert splits(torch.empty(1, 3, 3, 3), [4, 3, 3, 3], 1, 1) == 1


@pytest.mark.slow
@pytest.mark.parametrize("order", ["reverse", "shuffle"])
@pytest.mark.parametrize("dtype", EMU_DTYPES, ids=str)
def test_emulated_kernels_in_other_thread_orders(emu, dtype, order, monkeypatch):
    """Every kernel with the threads of a block run in reverse and in shuffled order between
    barriers (PF_EMU_ORDER, csrc/emulate/emu.h): a shared-memory race that the forward order hides
    gives wrong results in one of them. Odd shapes and shapes with several tiles, groups and splits."""
    monkeypatch.setenv("PF_EMU_ORDER", order)
    for case in (ODD_CASES[1], ODD_CASES[-1], resnet1001_case(EMU_RESNET_TRIPLES[2], 2), MANY_TILES_CASE):
        with_bn = case.cin != 3
        check_conv_fwd(emu, case, dtype, "cpu", "channels_last", "update" if with_bn else "none", with_bn, True)
        check_conv_dgrad(emu, case, dtype, "cpu", "channels_last", True, with_bn=with_bn)
        check_conv_wgrad(emu, case, dtype, "cpu", "channels_last", True, with_bn=with_bn)
        check_conv_wgrad_bn_backward(emu, case, dtype, "cpu", "channels_last", with_bn)
    check_bn_stats(emu, (3, 17, 9, 9), dtype, "cpu", "nchw")
    check_bn_stats(emu, MANY_TILES, dtype, "cpu", "channels_last")
    check_bn_fold(emu, 17, dtype, "cpu", "update_cumulative")
    check_bn_backward(emu, ODD_CASES[1], dtype, "cpu", "channels_last", True, True)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_emulated_reruns_are_bit_identical(emu, dtype):
    """The conformance suite reruns float32; the 16-bit kernels' trees too."""
    check_reruns_identical(emu, dtype, "cpu")


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", cuda_backend.OPS)
def test_emulated_opcheck(emulated_build, name, dtype):
    """torch.library.opcheck of the contract's schemas and fakes with the emulated kernels: declared
    mutations, fake shapes and strides against real outputs, AOT dispatch."""
    for args in opcheck_samples(dtype, "cpu")[name]:
        torch.library.opcheck(getattr(emulated_build, name).default, args)


@pytest.mark.slow
def test_emulated_compiled_unit(emu):
    """The cuda backend's wrappers and the contract's fakes under torch.compile(fullgraph=True)."""
    check_compiled_unit(emu._module, "cpu", torch.bfloat16)


_ASAN_SCRIPT = r"""
import sys, torch
from torch.utils.cpp_extension import load
csrc, build = sys.argv[1], sys.argv[2]
load(name="preact_fused_emu", sources=[f"{csrc}/bindings.cpp", f"{csrc}/emulate/kernels.cpp"],
     extra_include_paths=[f"{csrc}/emulate", csrc],
     extra_cflags=["-DPF_EMULATE", "-O1", "-ffp-contract=off", "-fsanitize=address,alignment",
                   "-fno-sanitize-recover=alignment", "-fno-omit-frame-pointer"],
     extra_ldflags=["-fsanitize=address,alignment"], build_directory=build, is_python_module=False, with_cuda=False)
from preact_fused import contract
contract.register_fakes("preact_fused_emu")
import preact_fused.cuda as cb
cb._ops = lambda: torch.ops.preact_fused_emu
from backend_checks import (ODD_CASES, WIDE_CASE, ConvCase, check_bn_backward, check_bn_fold, check_bn_stats,
                            check_conv_dgrad, check_conv_fwd, check_conv_wgrad, check_conv_wgrad_bn_backward,
                            check_empty_batch)
for case in ODD_CASES + [ConvCase(2, 64, 256, 8, 8, 1, 1), ConvCase(2, 32, 32, 32, 32, 3, 2), WIDE_CASE]:
    for dtype in (torch.float32, torch.bfloat16):
        for lay in ("channels_last", "nchw"):
            for bn in (True, False):
                check_conv_fwd(cb, case, dtype, "cpu", lay, "update" if bn else "none", bn, bn)
                check_conv_dgrad(cb, case, dtype, "cpu", lay, True, with_bn=bn)
                check_conv_wgrad(cb, case, dtype, "cpu", lay, True, with_bn=bn)
                check_conv_wgrad_bn_backward(cb, case, dtype, "cpu", lay, bn)
for dtype in (torch.float32, torch.bfloat16):
    check_bn_stats(cb, (3, 17, 9, 9), dtype, "cpu", "nchw")
    check_bn_backward(cb, ODD_CASES[1], dtype, "cpu", "channels_last", True, True)
    check_empty_batch(cb, dtype, "cpu")
    check_bn_fold(cb, 17, dtype, "cpu", "update_cumulative")
print("clean")
"""


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("PREACT_FUSED_ASAN") != "1",
                    reason="set PREACT_FUSED_ASAN=1 to run the emulated kernels under AddressSanitizer (~3 min)")
def test_emulated_kernels_under_address_sanitizer(tmp_path):
    """No out-of-bounds or misaligned access to global or shared memory by any kernel, on odd and
    larger shapes (a misaligned vector access faults on the GPU)."""
    libasan = subprocess.run(["c++", "-print-file-name=libasan.so"], capture_output=True, text=True).stdout.strip()
    if not os.path.isabs(libasan):
        pytest.skip("the host compiler has no AddressSanitizer runtime")
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(tests_dir)
    env = dict(os.environ, LD_PRELOAD=libasan, ASAN_OPTIONS="detect_leaks=0",
               PYTHONPATH=os.pathsep.join(filter(None, [tests_dir, root, os.environ.get("PYTHONPATH")])))
    out = subprocess.run([sys.executable, "-c", _ASAN_SCRIPT, CSRC, str(tmp_path)], capture_output=True, text=True,
                         env=env, timeout=1800)
    assert out.returncode == 0 and out.stdout.strip().endswith("clean"), out.stderr[-4000:]


# ---- the sm_90 build: registers and spills ---------------------------------------------------------

KERNEL_SOURCES = ["conv/fwd.cu", "conv/dgrad.cu", "conv/wgrad.cu", "bn/bn.cu"]
# The device flags of setup.py (ptxas report on).
NVCC_FLAGS = ["-O3", "-fmad=false", "-maxrregcount=255", "-std=c++17", "-gencode=arch=compute_90,code=sm_90",
              "-Xptxas=-v"]


def _ptxas_report(text: str) -> list[tuple[str, int, int, int]]:
    """(kernel, registers, spill store bytes, spill load bytes) per kernel of an nvcc -Xptxas=-v log."""
    import re
    rows, name, spill = [], None, (0, 0)
    for line in text.splitlines():
        m = re.search(r"Compiling entry function '([^']+)'", line)
        if m:
            name = m.group(1)
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            spill = (int(m.group(1)), int(m.group(2)))
        m = re.search(r"Used (\d+) registers", line)
        if m and name is not None:
            rows.append((name, int(m.group(1)), *spill))
            name, spill = None, (0, 0)
    return rows


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
def test_sm90_build_has_no_spills(tmp_path):
    """Every kernel compiled for sm_90 with setup.py's device flags: no register spills; the
    register counts are printed (pytest -s) for the record. Several minutes on two cores."""
    procs = []
    for src in KERNEL_SOURCES:
        out = tmp_path / (os.path.basename(src) + ".o")
        procs.append(subprocess.Popen(["nvcc", *NVCC_FLAGS, "-I", CSRC, "-c", os.path.join(CSRC, src), "-o", str(out)],
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    rows = []
    for src, proc in zip(KERNEL_SOURCES, procs):
        log, _ = proc.communicate(timeout=1800)
        assert proc.returncode == 0, f"nvcc {src} failed:\n{log[-4000:]}"
        rows += [(src, *row) for row in _ptxas_report(log)]
    assert len(rows) >= 50, f"expected every kernel instantiation in the report, got {len(rows)}"
    for src, name, regs, stores, loads in rows:
        print(f"{src:14s} {regs:4d} registers  spill {stores}/{loads}  {name}")
    spilling = [(name, stores, loads) for _, name, _, stores, loads in rows if stores or loads]
    assert not spilling, f"register spills: {spilling}"
