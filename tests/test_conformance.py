"""The one conformance suite: every backend the machine can run against torch in float64.

Backends: the reference (float64, float32, bfloat16); Triton (under the interpreter without a GPU:
float32 and float16 convolutions — the interpreter has no bfloat16 dot product — and every dtype for
the BN ops); the CUDA kernels (under the emulator without a GPU, in the three thread orders of
csrc/emulate/emu.h; float32, bfloat16, float16). With a GPU, Triton and the compiled CUDA extension
run on it in every dtype. The checks themselves are in tests/backend_checks.py.
"""
from __future__ import annotations

import inspect

import pytest
import torch

from preact_fused import contract, reference

import backend_checks as checks
from backend_checks import BN_MODES, LAYOUTS, MANY_TILES, MANY_TILES_CASE, ODD_CASES, WIDE_BN_CASE, WIDE_CASE

HAS_GPU = torch.cuda.is_available()
F64, F32, BF16, F16 = torch.float64, torch.float32, torch.bfloat16, torch.float16


def _triton():
    pytest.importorskip("triton")
    import preact_fused.triton as ops
    device = "cuda" if HAS_GPU else "cpu"
    reason = ops.unavailable_reason(device)
    if reason is not None:
        pytest.skip(f"triton backend unavailable: {reason}")
    conv = [F32, BF16, F16] if HAS_GPU else [F32, F16]
    return ops, device, conv, [F32, BF16, F16]


class Backend:
    def __init__(self, name, ops, device, conv_dtypes, bn_dtypes):
        self.name, self.ops, self.device = name, ops, device
        self.conv_dtypes, self.bn_dtypes = conv_dtypes, bn_dtypes

    def __repr__(self):
        return self.name


# The ids are not "cuda": a test id that is a bare "cuda" is the keyword of the ``cuda`` marker
# (tests/conftest.py), which skips the test without a GPU; the emulated kernels must run here.
@pytest.fixture(params=["reference", "triton", "cuda"], ids=["reference", "triton", "cuda-kernels"])
def backend(request, exact_cudnn):
    name = request.param
    if name == "reference":
        return Backend(name, reference, "cuda" if HAS_GPU else "cpu", [F64, F32, BF16], [F64, F32, BF16])
    if name == "triton":
        return Backend(name, *_triton())
    if HAS_GPU:
        from preact_fused import cuda as ops
        reason = ops.unavailable_reason("cuda")
        if reason is not None:
            pytest.skip(reason)
        return Backend(name, ops, "cuda", [F32, BF16, F16], [F32, BF16, F16])
    return Backend("cuda-emulated", request.getfixturevalue("emu"), "cpu", [F32, BF16, F16],
                   [F32, BF16, F16])


def _dtypes(backend, which):
    return getattr(backend, which)


# Over the layouts every case runs every BN form with and without residual and statistics.
def _fwd_variants(i):
    for j in range(2):
        k = 2 * i + j
        yield LAYOUTS[k % 3], BN_MODES[k % len(BN_MODES)], k % 2 == 0, (k // 2) % 2 == 0


@pytest.mark.parametrize("case_index", range(len(ODD_CASES)))
def test_conv_fwd(backend, case_index):
    case = ODD_CASES[case_index]
    for dtype in backend.conv_dtypes:
        for layout_name, mode, residual, want_stats in _fwd_variants(case_index):
            checks.check_conv_fwd(backend.ops, case, dtype, backend.device, layout_name, mode, residual, want_stats)


@pytest.mark.parametrize("case_index", range(len(ODD_CASES)))
def test_conv_dgrad_wgrad(backend, case_index):
    case = ODD_CASES[case_index]
    layout_name = LAYOUTS[case_index % 3]
    training = case_index % 2 == 0
    for dtype in backend.conv_dtypes:
        checks.check_conv_dgrad(backend.ops, case, dtype, backend.device, layout_name, training,
                                with_bn=case_index != 5)
        checks.check_conv_wgrad(backend.ops, case, dtype, backend.device, layout_name, training,
                                with_bn=case_index != 5)


@pytest.mark.parametrize("case_index", range(len(ODD_CASES)))
def test_conv_wgrad_bn_backward(backend, case_index):
    case = ODD_CASES[case_index]
    for dtype in backend.conv_dtypes:
        checks.check_conv_wgrad_bn_backward(backend.ops, case, dtype, backend.device, LAYOUTS[case_index % 3],
                                            training=case_index % 2 == 1)


@pytest.mark.parametrize("layout_name", LAYOUTS)
def test_bn_stats(backend, layout_name):
    for dtype in backend.bn_dtypes:
        checks.check_bn_stats(backend.ops, (3, 17, 9, 9), dtype, backend.device, layout_name, offset=2.0)


def test_bn_stats_many_tiles(backend):
    checks.check_bn_stats(backend.ops, MANY_TILES, F32, backend.device, "channels_last")


@pytest.mark.parametrize("mode", ["update", "update_cumulative", "stats", "running"])
def test_bn_fold(backend, mode):
    for dtype in backend.bn_dtypes:
        checks.check_bn_fold(backend.ops, 17, dtype, backend.device, mode, affine=mode != "stats")


@pytest.mark.parametrize("training", [True, False])
def test_bn_backward(backend, training):
    for dtype in backend.bn_dtypes:
        for i, case in enumerate((ODD_CASES[1], ODD_CASES[4])):
            checks.check_bn_backward(backend.ops, case, dtype, backend.device, LAYOUTS[i + training], training,
                                     with_residual=i == 0)


def test_nan_propagates(backend):
    checks.check_nan_propagates(backend.ops, F32, backend.device)


def test_reruns_are_bit_identical(backend):
    checks.check_reruns_identical(backend.ops, F32, backend.device)


@pytest.mark.parametrize("ratio", [1e3, 1e4])
def test_statistics_accuracy_at_large_mean(backend, ratio):
    checks.check_statistics_accuracy(backend.ops, ratio, backend.device)


def test_conv_many_tiles(backend):
    """A convolution of 144 row tiles: several groups of every in-launch tree, the last partial."""
    if backend.name == "triton" and not HAS_GPU:
        pytest.skip("about 20 s under the Triton interpreter; tests/test_triton_gpu.py runs larger shapes on a GPU")
    case, dtype, ops, device = MANY_TILES_CASE, backend.conv_dtypes[-1], backend.ops, backend.device
    checks.check_conv_fwd(ops, case, dtype, device, "channels_last", "update", True, True)
    checks.check_conv_dgrad(ops, case, dtype, device, "channels_last", True)
    checks.check_conv_wgrad(ops, case, dtype, device, "channels_last", True)


def test_wide_channels(backend):
    """520 input channels (a 4 KB fold table) and a BatchNorm of 1030 channels."""
    dtype, ops, device = backend.conv_dtypes[-1], backend.ops, backend.device
    checks.check_conv_fwd(ops, WIDE_CASE, dtype, device, "nchw", "update", True, True)
    checks.check_conv_dgrad(ops, WIDE_CASE, dtype, device, "nchw", True)
    checks.check_conv_wgrad(ops, WIDE_CASE, dtype, device, "nchw", True)
    checks.check_bn_backward(ops, WIDE_BN_CASE, backend.bn_dtypes[-1], device, "channels_last", True, True)


def test_weight_in_activation_dtype(backend):
    for dtype in backend.conv_dtypes:
        checks.check_weight_in_activation_dtype(backend.ops, ODD_CASES[1], dtype, backend.device, "noncontiguous")


def test_empty_batch(backend):
    for dtype in backend.conv_dtypes:
        checks.check_empty_batch(backend.ops, dtype, backend.device)


def test_bn_fold_with_bfloat16_running_buffers(backend):
    checks.check_bn_fold_low_precision_running(backend.ops, backend.device, torch.bfloat16)


def test_ops_match_the_contract_signatures(backend):
    """Every backend exposes the contract's functions (argument names and order of its schemas)."""
    for name in contract.OPS:
        expected = contract.argument_names(name)
        actual = list(inspect.signature(getattr(backend.ops, name)).parameters)
        assert actual == expected, f"{backend}: {name}{tuple(actual)} != {tuple(expected)}"
