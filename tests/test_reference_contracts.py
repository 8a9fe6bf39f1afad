"""The reference backend against itself in float64, through the shared contract checks.

This exercises the checks that the triton and cuda backends run (tests/backend_checks.py), in
float32 and float64, on every layout; the reference's own correctness against plain torch
autograd is in test_reference.py.
"""
import pytest
import torch

from preact_fused import reference

from backend_checks import (LAYOUTS, ODD_CASES, check_bn_backward, check_bn_stats_finalize,
                            check_conv_dgrad, check_conv_fwd, check_conv_wgrad)

DTYPES = [torch.float32, torch.float64]


@pytest.mark.parametrize("case", ODD_CASES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout_name", LAYOUTS)
def test_conv_fwd(case, dtype, layout_name):
    check_conv_fwd(reference, case, dtype, "cpu", layout_name, with_bn=True, with_residual=True, want_stats=True)
    check_conv_fwd(reference, case, dtype, "cpu", layout_name, with_bn=False, with_residual=False, want_stats=False)


@pytest.mark.parametrize("case", ODD_CASES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout_name", LAYOUTS)
def test_conv_dgrad_wgrad(case, dtype, layout_name):
    for with_bn in (True, False):
        check_conv_dgrad(reference, case, dtype, "cpu", layout_name, with_bn)
        check_conv_wgrad(reference, case, dtype, "cpu", layout_name, with_bn)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout_name", LAYOUTS)
@pytest.mark.parametrize("momentum", [0.1, None])
def test_bn_stats_finalize(dtype, layout_name, momentum):
    check_bn_stats_finalize(reference, (3, 17, 9, 9), dtype, "cpu", layout_name, momentum=momentum)
    check_bn_stats_finalize(reference, (1, 3, 7, 7), dtype, "cpu", layout_name, affine=False)


@pytest.mark.parametrize("case", ODD_CASES[:3], ids=str)
@pytest.mark.parametrize("layout_name", LAYOUTS)
@pytest.mark.parametrize("training", [True, False])
def test_bn_backward(case, layout_name, training):
    for dtype in DTYPES:
        check_bn_backward(reference, case, dtype, "cpu", layout_name, training, with_residual=True)
        check_bn_backward(reference, case, dtype, "cpu", layout_name, training, with_residual=False)


def test_bf16_checks_use_same_dtype_bound():
    case = ODD_CASES[1]
    check_conv_fwd(reference, case, torch.bfloat16, "cpu", "channels_last", True, True, True)
    check_conv_dgrad(reference, case, torch.bfloat16, "cpu", "nchw", True)
    check_conv_wgrad(reference, case, torch.bfloat16, "cpu", "nchw", True)
