"""Property-based tests: BNReLUConv2d is nn.Sequential(BatchNorm2d, ReLU, Conv2d) with the same state.

Hypothesis draws a shape (N 1..4, Cin 1..40, Cout 1..24, H and W 1..10 independently, so H != W and
H = 1 come up; kernel 1/3/5, stride 1/2/3, padding 0..k//2), a layout (NCHW, channels_last, a
non-contiguous view), the BatchNorm options (momentum 0.1/None/0/1, affine, track_running_stats,
train/eval, a random running state and num_batches_tracked), a conv bias, and the input's scale
(10^-3..10^3) and offset (up to 4 scales). Each example runs one forward and backward of the fused
module on every backend the machine can run (``fused_backend``) and of its float64 twin, and
compares the output and its layout, every gradient, the running statistics and
num_batches_tracked (tests/module_checks.py: float64 1e-9, float32 1e-4 relative to the largest
magnitude). Drawn shapes that PyTorch refuses (one value per channel in training, a kernel larger
than the padded input) must be refused with PyTorch's exception and message.

CI: a fixed seed (derandomized) and EXAMPLES per backend (the Triton interpreter is slow, so it
draws fewer and smaller inputs). ``PREACT_FUSED_PROPERTY_EXAMPLES=N``: N examples per backend with
a random seed (Hypothesis prints a failing example and how to reproduce it).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from preact_fused import BNReLUConv2d

from backend_checks import LAYOUTS, layout
from module_checks import backend_dtype, compare

pytestmark = pytest.mark.usefixtures("one_thread", "exact_cudnn")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ON_GPU = DEVICE == "cuda"
EXAMPLES = {"reference": 300, "cuda": 150, "triton": 35}
LONG_RUN = os.environ.get("PREACT_FUSED_PROPERTY_EXAMPLES")
MAX_HW = {"triton": 10 if ON_GPU else 7}  # the interpreter runs every program of a launch in Python


@dataclass(frozen=True)
class Case:
    n: int
    cin: int
    cout: int
    h: int
    w: int
    k: int
    stride: int
    padding: int
    layout: str
    momentum: float | None
    affine: bool
    track_running_stats: bool
    bias: bool
    training: bool
    tracked_batches: int
    scale: float
    offset: float
    seed: int


@st.composite
def cases(draw, max_hw: int) -> Case:
    k = draw(st.sampled_from([1, 3, 5]))
    padding = draw(st.integers(0, k // 2))
    # One example in ten may be smaller than the kernel (refused); the others have an output.
    low = 1 if draw(st.integers(0, 9)) == 0 else max(1, k - 2 * padding)
    scale = 10.0 ** draw(st.integers(-3, 3))
    return Case(
        n=draw(st.integers(1, 4)), cin=draw(st.integers(1, 40)), cout=draw(st.integers(1, 24)),
        h=draw(st.integers(low, max_hw)), w=draw(st.integers(low, max_hw)), k=k,
        stride=draw(st.sampled_from([1, 2, 3])), padding=padding,
        layout=draw(st.sampled_from(LAYOUTS)), momentum=draw(st.sampled_from([0.1, None, 0.0, 1.0])),
        affine=draw(st.booleans()), track_running_stats=draw(st.booleans()), bias=draw(st.booleans()),
        training=draw(st.booleans()), tracked_batches=draw(st.integers(0, 5)), scale=scale,
        offset=draw(st.floats(-4, 4, allow_nan=False)) * scale, seed=draw(st.integers(0, 2 ** 31 - 1)))


def build(case: Case, backend: str) -> BNReLUConv2d:
    """The module of a case, its parameters and running state drawn from the case's seed."""
    torch.manual_seed(case.seed)
    module = BNReLUConv2d(case.cin, case.cout, case.k, stride=case.stride, padding=case.padding, bias=case.bias,
                          momentum=case.momentum, affine=case.affine, track_running_stats=case.track_running_stats,
                          backend=backend, device=DEVICE, dtype=backend_dtype(backend))
    with torch.no_grad():
        if case.affine:
            module.bn.weight.normal_()
            module.bn.bias.normal_()
        if case.track_running_stats:
            module.bn.running_mean.normal_(case.offset, case.scale)
            module.bn.running_var.uniform_(0.5, 2).mul_(case.scale ** 2)
            module.bn.num_batches_tracked.fill_(case.tracked_batches)
    return module.train(case.training)


def inputs(case: Case, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(x in the case's layout, dy) on DEVICE; dy has the output's shape, or an arbitrary one when
    the convolution has no output (PyTorch refuses it before any backward). Another random stream
    than the module's: an input equal to a running mean would put a ReLU exactly at its tie."""
    g = torch.Generator().manual_seed(case.seed + 1)
    x = torch.randn(case.n, case.cin, case.h, case.w, generator=g, dtype=torch.float64) * case.scale + case.offset
    ho = max((case.h + 2 * case.padding - case.k) // case.stride + 1, 1)
    wo = max((case.w + 2 * case.padding - case.k) // case.stride + 1, 1)
    dy = torch.randn(case.n, case.cout, ho, wo, generator=g, dtype=torch.float64)
    return layout(x.to(DEVICE, dtype), case.layout), dy.to(DEVICE, dtype)


def property_settings(backend: str) -> settings:
    common = dict(deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
    if LONG_RUN:
        return settings(max_examples=int(LONG_RUN), derandomize=False, **common)
    return settings(max_examples=EXAMPLES[backend], derandomize=True, **common)


def test_fused_module_matches_unfused(fused_backend):
    dtype = backend_dtype(fused_backend)

    @property_settings(fused_backend)
    @given(case=cases(MAX_HW.get(fused_backend, 10)))
    def check(case: Case):
        module = build(case, fused_backend)
        x, dy = inputs(case, dtype)
        compare(module, x, dy, dtype)

    check()
