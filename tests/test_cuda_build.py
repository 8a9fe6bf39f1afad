"""The CUDA extension on a machine without a GPU: built, loadable, registered, and its kernels emulated.

CI builds the extension (``pip install --no-build-isolation -e .`` with nvcc and a CUDA build of
torch) on CPU-only machines; these tests check what can be checked there: the library loads
without a GPU and without initialising CUDA, each schema matches the reference's signature, the
fake (meta) implementations give the shapes and strides the CUDA kernels produce, and a missing
build or an unsupported dtype gives an error that says what to do. Last, the kernel sources
themselves run on the CPU under a small emulator (csrc/emulate/) against the reference.
"""
import inspect
import os
import shutil
import subprocess
import sys

import pytest
import torch

import preact_fused.cuda as cuda_backend
from preact_fused import reference

from backend_checks import (LAYOUTS, MANY_TILES, ODD_CASES, ConvCase, check_bn_backward, check_bn_stats_finalize,
                            check_compiled_unit, check_conv_dgrad, check_conv_fwd, check_conv_fwd_autograd,
                            check_conv_wgrad, opcheck_samples)

SCHEMAS = {
    "conv_fwd": "preact_fused::conv_fwd(Tensor x, Tensor weight, int stride, int padding, Tensor? scale, "
                "Tensor? shift, Tensor? residual, bool want_stats) -> (Tensor, Tensor)",
    "bn_stats": "preact_fused::bn_stats(Tensor x) -> Tensor",
    "bn_finalize": "preact_fused::bn_finalize(Tensor partials, Tensor? weight, Tensor? bias, float eps, "
                   "Tensor(a!)? running_mean, Tensor(b!)? running_var, float? momentum, "
                   "Tensor? num_batches_tracked) -> (Tensor, Tensor, Tensor, Tensor)",
    "conv_dgrad": "preact_fused::conv_dgrad(Tensor dy, Tensor weight, Tensor x, int stride, int padding, "
                  "Tensor? scale, Tensor? shift, Tensor? mean) -> (Tensor, Tensor, Tensor)",
    "conv_wgrad": "preact_fused::conv_wgrad(Tensor x, Tensor dy, int[] weight_shape, int stride, int padding, "
                  "Tensor? scale, Tensor? shift) -> Tensor",
    "bn_backward": "preact_fused::bn_backward(Tensor g, Tensor x, Tensor mean, Tensor invstd, Tensor scale, "
                   "Tensor sum_g, Tensor sum_gx, bool training, Tensor? d_residual) -> Tensor",
}


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
    assert str(op._schema) == SCHEMAS[name]
    for key in ("CUDA", "Meta"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"preact_fused::{name}", key), (name, key)


@pytest.mark.parametrize("name", cuda_backend.OPS)
def test_schema_matches_reference_signature(ext, name):
    op = getattr(torch.ops.preact_fused, name).default
    schema_args = [a.name for a in op._schema.arguments]
    assert schema_args == list(inspect.signature(getattr(reference, name)).parameters)
    assert list(inspect.signature(getattr(cuda_backend, name)).parameters) == schema_args


def test_autograd_registered_for_conv_fwd(ext):
    assert torch._C._dispatch_has_kernel_for_dispatch_key("preact_fused::conv_fwd", "Autograd")


def _cl(shape, dtype=torch.bfloat16):
    return torch.empty(shape, dtype=dtype, device="meta", memory_format=torch.channels_last)


def _assert_like(t, shape, dtype, channels_last):
    assert tuple(t.shape) == shape and t.dtype == dtype
    if channels_last:
        assert t.is_contiguous(memory_format=torch.channels_last)
    else:
        assert t.is_contiguous()


def test_fake_shapes_and_strides(ext):
    """The fake implementations (used by torch.compile) give what the CUDA kernels allocate."""
    ops = torch.ops.preact_fused
    x, w = _cl((3, 17, 9, 9)), torch.empty(5, 17, 3, 3, device="meta", dtype=torch.bfloat16)
    vec = torch.empty(17, device="meta")
    y, partials = ops.conv_fwd(x, w, 2, 1, vec, vec, None, True)
    _assert_like(y, (3, 5, 5, 5), torch.bfloat16, True)
    _assert_like(partials, (3, (3 * 5 * 5 + 127) // 128, 5), torch.float32, False)
    assert ops.conv_fwd(x, w, 2, 1, None, None, None, False)[1].shape == (3, 0, 5)
    _assert_like(ops.bn_stats(_cl((2, 17, 70, 3))), (3, (2 * 70 * 3 + 127) // 128, 17), torch.float32, False)
    outs = ops.bn_finalize(torch.empty(3, 4, 17, device="meta"), vec, vec, 1e-5, vec, vec, None,
                           torch.empty((), dtype=torch.long, device="meta"))
    assert [tuple(o.shape) for o in outs] == [(17,)] * 4
    dy = _cl((3, 5, 5, 5))
    g, sum_g, sum_gx = ops.conv_dgrad(dy, w, x, 2, 1, vec, vec, vec)
    _assert_like(g, (3, 17, 9, 9), torch.bfloat16, True)
    assert sum_g.shape == sum_gx.shape == (17,) and sum_g.dtype == torch.float32
    assert ops.conv_dgrad(dy, w, x, 2, 1, None, None, None)[1].shape == (0,)
    _assert_like(ops.conv_wgrad(x, dy, [5, 17, 3, 3], 2, 1, vec, vec), (5, 17, 3, 3), torch.float32, False)
    _assert_like(ops.bn_backward(x, x, vec, vec, vec, vec, vec, True, x), (3, 17, 9, 9), torch.bfloat16, True)


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
# threads as cooperative fibers, mma.sync / ldmatrix / shuffles per the PTX ISA): the kernels'
# index arithmetic, tiling, masks, epilogues and split-K checked against the reference with the
# shared contract checks. Not covered: hardware behaviour (timing, races the fibers cannot show).

CSRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc")
EMU_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Larger than the odd cases: several row tiles, column tiles of 64, stride 2, split-K.
EMU_RESNET_CASES = [ConvCase(2, 3, 16, 32, 32, 3, 1), ConvCase(2, 16, 16, 32, 32, 3, 1),
                    ConvCase(2, 32, 32, 32, 32, 3, 2), ConvCase(2, 128, 256, 16, 16, 1, 2),
                    ConvCase(2, 64, 256, 8, 8, 1, 1)]


@pytest.mark.slow
def test_emulated_bad_geometry_is_a_clear_error(emu):
    """The bindings refuse what the kernels cannot index, before any launch."""
    x, w = torch.randn(1, 4, 5, 5), torch.randn(6, 4, 3, 3)
    with pytest.raises(RuntimeError, match="at least one input channel"):
        emu.conv_fwd(torch.randn(1, 0, 5, 5), torch.randn(6, 0, 3, 3), 1, 1)
    with pytest.raises(RuntimeError, match="at least one input channel"):
        emu.conv_wgrad(torch.randn(1, 0, 5, 5), torch.randn(1, 6, 5, 5), (6, 0, 3, 3), 1, 1)
    with pytest.raises(RuntimeError, match="empty convolution output"):
        emu.conv_fwd(x[..., :2, :2], w, 1, 0)
    with pytest.raises(RuntimeError, match="stride must be >= 1"):
        emu.conv_fwd(x, w, 0, 1)


@pytest.mark.slow
@pytest.mark.parametrize("case", ODD_CASES, ids=str)
@pytest.mark.parametrize("dtype", EMU_DTYPES, ids=str)
def test_emulated_conv_fwd(emu, case, dtype):
    for i, (with_bn, with_residual, want_stats) in enumerate([(True, True, True), (False, False, False),
                                                                (True, False, False), (False, True, True)]):
        check_conv_fwd(emu, case, dtype, "cpu", LAYOUTS[i % 3], with_bn, with_residual, want_stats)


@pytest.mark.slow
@pytest.mark.parametrize("case", ODD_CASES, ids=str)
@pytest.mark.parametrize("dtype", EMU_DTYPES, ids=str)
def test_emulated_conv_dgrad_wgrad(emu, case, dtype):
    for i, with_bn in enumerate((True, False)):
        check_conv_dgrad(emu, case, dtype, "cpu", LAYOUTS[i], with_bn)
        check_conv_wgrad(emu, case, dtype, "cpu", LAYOUTS[i + 1], with_bn)


@pytest.mark.slow
@pytest.mark.parametrize("case", EMU_RESNET_CASES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_emulated_resnet_convs(emu, case, dtype):
    with_bn = case.cin != 3
    check_conv_fwd(emu, case, dtype, "cpu", "channels_last", with_bn, with_bn, True)
    check_conv_dgrad(emu, case, dtype, "cpu", "channels_last", with_bn)
    check_conv_wgrad(emu, case, dtype, "cpu", "channels_last", with_bn)


@pytest.mark.slow
@pytest.mark.parametrize("order", ["reverse", "shuffle"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_emulated_kernels_in_other_thread_orders(emu, dtype, order, monkeypatch):
    """Every kernel with the threads of a block run in reverse and in shuffled order between
    barriers (PF_EMU_ORDER, csrc/emulate/emu.h): a shared-memory race that the forward order hides
    gives wrong results in one of them. Odd shapes and shapes with several tiles and splits."""
    monkeypatch.setenv("PF_EMU_ORDER", order)
    for case in (ODD_CASES[1], ODD_CASES[-1], EMU_RESNET_CASES[2], EMU_RESNET_CASES[4]):
        with_bn = case.cin != 3
        check_conv_fwd(emu, case, dtype, "cpu", "channels_last", with_bn, with_bn, True)
        check_conv_dgrad(emu, case, dtype, "cpu", "channels_last", with_bn)
        check_conv_wgrad(emu, case, dtype, "cpu", "channels_last", with_bn)
    check_bn_stats_finalize(emu, (3, 17, 9, 9), dtype, "cpu", "nchw", momentum=None)
    check_bn_stats_finalize(emu, MANY_TILES, dtype, "cpu", "channels_last")
    check_bn_backward(emu, ODD_CASES[1], dtype, "cpu", "channels_last", True, with_residual=True)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout_name", LAYOUTS)
def test_emulated_bn(emu, dtype, layout_name):
    for momentum in (0.1, None):
        check_bn_stats_finalize(emu, (3, 17, 9, 9), dtype, "cpu", layout_name, momentum=momentum)
    check_bn_stats_finalize(emu, (1, 3, 7, 7), dtype, "cpu", layout_name, affine=False)
    check_bn_stats_finalize(emu, (4, 64, 16, 16), dtype, "cpu", layout_name, offset=1000.0)
    check_bn_stats_finalize(emu, MANY_TILES, dtype, "cpu", layout_name)
    for case in ODD_CASES[:3]:
        for training in (True, False):
            check_bn_backward(emu, case, dtype, "cpu", layout_name, training, with_residual=True)
            check_bn_backward(emu, case, dtype, "cpu", layout_name, training, with_residual=False)


@pytest.mark.slow
def test_emulated_conv_fwd_autograd(emu):
    """conv_fwd's registered backward (preact_fused.cuda) through the emulated dgrad / wgrad /
    bn_backward, against the reference's autograd in float64."""
    check_conv_fwd_autograd(emu, "cpu")


@pytest.mark.slow
def test_emulated_compiled_unit(emu):
    """The cuda backend's wrappers and fakes under torch.compile(fullgraph=True), emulated kernels."""
    check_compiled_unit(emu, "cpu")


_ASAN_SCRIPT = r"""
import sys, torch
from torch.utils.cpp_extension import load
csrc, build = sys.argv[1], sys.argv[2]
load(name="preact_fused_emu", sources=[f"{csrc}/bindings.cpp", f"{csrc}/emulate/kernels.cpp"],
     extra_include_paths=[f"{csrc}/emulate", csrc],
     extra_cflags=["-DPF_EMULATE", "-O1", "-ffp-contract=off", "-fsanitize=address,alignment",
                   "-fno-sanitize-recover=alignment", "-fno-omit-frame-pointer"],
     extra_ldflags=["-fsanitize=address,alignment"], build_directory=build, is_python_module=False, with_cuda=False)
import preact_fused.cuda as cb
cb._ops = lambda: torch.ops.preact_fused_emu
from backend_checks import *
for case in ODD_CASES + [ConvCase(2, 64, 256, 8, 8, 1, 1), ConvCase(2, 32, 32, 32, 32, 3, 2)]:
    for dtype in (torch.float32, torch.bfloat16):
        for lay in ("channels_last", "nchw"):
            for bn in (True, False):
                check_conv_fwd(cb, case, dtype, "cpu", lay, bn, bn, bn)
                check_conv_dgrad(cb, case, dtype, "cpu", lay, bn)
                check_conv_wgrad(cb, case, dtype, "cpu", lay, bn)
for dtype in (torch.float32, torch.bfloat16):
    check_bn_stats_finalize(cb, (3, 17, 9, 9), dtype, "cpu", "nchw", momentum=None)
    check_bn_backward(cb, ODD_CASES[1], dtype, "cpu", "channels_last", True, True)
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
    env = dict(os.environ, LD_PRELOAD=libasan, ASAN_OPTIONS="detect_leaks=0",
               PYTHONPATH=os.pathsep.join(filter(None, [tests_dir, os.environ.get("PYTHONPATH")])))
    out = subprocess.run([sys.executable, "-c", _ASAN_SCRIPT, CSRC, str(tmp_path)], capture_output=True, text=True,
                         env=env, timeout=1800)
    assert out.returncode == 0 and out.stdout.strip().endswith("clean"), out.stderr[-4000:]


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", cuda_backend.OPS)
def test_emulated_opcheck(emulated_build, name, dtype):
    """torch.library.opcheck of the extension's schemas, fakes and conv_fwd's autograd (registered by
    preact_fused.cuda for any namespace) with the emulated kernels: declared mutations, fake shapes
    and strides against real outputs, autograd registration, AOT dispatch."""
    for args in opcheck_samples(dtype, "cpu")[name]:
        torch.library.opcheck(getattr(emulated_build, name).default, args)


@pytest.mark.slow
def test_emulated_kernel_ops_triple(emu):
    """benchmarks.kernel_ops' closures with the cuda backend's wrappers (emulated kernels): every
    timed call runs, and the fused forward matches the reference backend's."""
    from benchmarks.kernel_ops import Triple, measure

    def triple(ops):
        torch.manual_seed(0)
        return Triple(ops, "s1.conv3", 16, 64, 8, 1, 1, 2, torch.float32, device="cpu")

    row = measure(triple(emu), lambda fn: (fn(), 1.0)[1])
    assert all(v == 1.0 for v in row.values())
    y, _ = triple(emu).fused_forward()
    want, _ = triple(reference).fused_forward()
    assert (y - want).abs().max() <= 1e-4 * want.abs().max()
