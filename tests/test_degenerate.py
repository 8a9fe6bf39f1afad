"""Degenerate and hostile inputs on every backend: the fused modules behave exactly like PyTorch's
unfused ones, or fail with a clear error.

Each case runs on every backend the machine can run (``fused_backend``: reference; Triton under the
CPU interpreter without a GPU; the CUDA kernels under the CPU emulator without a GPU), against the
float64 unfused twin (tests/module_checks.py states the tolerances).
"""
from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from preact_fused import BNReLUConv2d, backend as backends, convert, preact_resnet
from preact_fused.validation import check_batch_stats, conv_output_size

from module_checks import RTOL, backend_dtype, compare, twin_of

pytestmark = pytest.mark.usefixtures("one_thread", "exact_cudnn")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def module(backend, cin=5, cout=4, k=3, seed=0, **options):
    """A BNReLUConv2d on DEVICE in the backend's dtype, with a non-trivial affine and running state."""
    torch.manual_seed(seed)
    m = BNReLUConv2d(cin, cout, k, backend=backend, device=DEVICE, dtype=backend_dtype(backend),
                     **{"padding": k // 2, **options})
    with torch.no_grad():
        if m.bn.affine:
            m.bn.weight.uniform_(0.5, 1.5)
            m.bn.bias.normal_()
        if m.bn.track_running_stats:
            m.bn.running_mean.normal_()
            m.bn.running_var.uniform_(0.5, 2)
            m.bn.num_batches_tracked.fill_(3)
    return m


def rand(*shape, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(device=DEVICE, dtype=dtype)


# ---- the drop-in module's signature ---------------------------------------------------------------

def test_takes_the_arguments_of_conv2d_and_batchnorm2d():
    """nn.Conv2d's positional arguments (in_channels .. padding_mode), nn.BatchNorm2d's as keywords."""
    m = BNReLUConv2d(6, 8, 3, 2, 1, 1, 1, True, "zeros", eps=1e-3, momentum=None, affine=False,
                     track_running_stats=False, device="cpu", dtype=torch.float64, backend="reference")
    conv, bn = m.conv, m.bn
    assert (conv.stride, conv.padding, conv.dilation, conv.groups, conv.padding_mode) == ((2, 2), (1, 1), (1, 1), 1,
                                                                                          "zeros")
    assert conv.bias is not None and conv.weight.dtype == torch.float64
    assert (bn.eps, bn.momentum, bn.affine, bn.track_running_stats) == (1e-3, None, False, False)
    assert list(m.state_dict()) == ["conv.weight", "conv.bias"]
    assert list(BNReLUConv2d(4, 4, 1).state_dict()) == [
        "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var", "bn.num_batches_tracked", "conv.weight"]


@pytest.mark.parametrize("options, named", [
    ({"dilation": 2}, "dilation=(2, 2)"), ({"groups": 2}, "groups=2"),
    ({"padding_mode": "reflect"}, "padding_mode='reflect'"), ({"stride": (1, 2)}, "stride=(1, 2) (unequal)"),
    ({"padding": (0, 1)}, "padding=(0, 1) (unequal)"), ({"dilation": 2, "groups": 4}, "groups=4, dilation=(2, 2)"),
])
def test_unsupported_convolutions_are_refused_clearly(options, named):
    with pytest.raises(ValueError, match=re.escape(f"preact_fused supports plain convolutions only; unsupported: {named}")):
        BNReLUConv2d(64, 128, 3, **{"padding": 1, **options})


# ---- NaN and inf -----------------------------------------------------------------------------------

@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_non_finite_pixel_propagates(fused_backend, request, training, value):
    """PyTorch's ReLU keeps NaN: one bad pixel spreads exactly as in the unfused modules (in training
    through the batch statistics to every output and gradient; in eval through the conv window)."""
    m = module(fused_backend).train(training)
    dtype = backend_dtype(fused_backend)
    x = rand(2, 5, 6, 7, dtype=dtype)
    x[1, 2, 3, 4] = value
    compare(m, x, rand(2, 4, 6, 7, dtype=dtype, seed=2), dtype)


def test_nan_pixel_gives_a_nan_loss(fused_backend, request):
    """A whole pre-activation ResNet: the loss of a batch with one NaN pixel is NaN, as unfused."""
    torch.manual_seed(0)
    dtype = backend_dtype(fused_backend)
    net = preact_resnet(8, num_classes=3, block="basic", backend=fused_backend).to(DEVICE, dtype)
    plain = preact_resnet(8, num_classes=3, block="basic", fused=False).to(DEVICE, dtype)
    plain.load_state_dict(net.state_dict())
    x = rand(2, 3, 8, 8, dtype=dtype)
    x[0, 1, 2, 3] = float("nan")
    target = torch.tensor([0, 2], device=DEVICE)
    losses = [F.cross_entropy(model(x), target) for model in (net, plain)]
    assert losses[1].isnan() and losses[0].isnan(), f"fused loss {losses[0].item()} vs unfused {losses[1].item()}"


# ---- empty batch -----------------------------------------------------------------------------------

@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_empty_batch(fused_backend, request, training, momentum):
    """N == 0: an empty output; in training the running statistics stay as they were while
    num_batches_tracked counts the batch; zero parameter gradients (validation.py's docstring)."""
    m = module(fused_backend, momentum=momentum).train(training)
    dtype = backend_dtype(fused_backend)
    before = m.bn.running_mean.clone(), m.bn.running_var.clone()
    actual, expected = compare(m, rand(0, 5, 6, 7, dtype=dtype), rand(0, 4, 6, 7, dtype=dtype), dtype)
    assert actual.y.shape == (0, 4, 6, 7)
    assert torch.equal(m.bn.running_mean, before[0]) and torch.equal(m.bn.running_var, before[1])
    assert m.bn.num_batches_tracked.item() == expected.buffers["bn.num_batches_tracked"].item() == 3 + training


# ---- one value per channel -------------------------------------------------------------------------

ONE_VALUE = "Expected more than 1 value per channel when training, got input size torch.Size([1, 5, 1, 1])"


@pytest.mark.parametrize("options", [{}, {"track_running_stats": False}], ids=["train", "untracked-eval"])
def test_one_value_per_channel_is_refused(fused_backend, options):
    """N*H*W == 1 with batch statistics: PyTorch's ValueError, and the running statistics untouched."""
    m = module(fused_backend, **options)
    if options:
        m.eval()  # no running statistics: batch statistics in eval mode too
    before = {k: v.clone() for k, v in m.bn.state_dict().items() if k.startswith("running")}
    actual, expected = compare(m, rand(1, 5, 1, 1, dtype=backend_dtype(fused_backend)), None,
                               backend_dtype(fused_backend))
    assert actual.error == (ValueError, ONE_VALUE) == expected.error
    for key, value in before.items():
        assert torch.equal(m.bn.state_dict()[key], value), key


def test_one_value_per_channel_in_eval_mode_runs(fused_backend):
    """With running statistics (eval mode) a single pixel is fine, as in PyTorch."""
    m = module(fused_backend).eval()
    dtype = backend_dtype(fused_backend)
    compare(m, rand(1, 5, 1, 1, dtype=dtype), rand(1, 4, 1, 1, dtype=dtype), dtype)


def test_one_value_per_channel_through_convert(fused_backend, request):
    """``convert`` of BN -> ReLU -> conv refuses one value per channel too."""
    plain = nn.Sequential(nn.BatchNorm2d(5), nn.ReLU(), nn.Conv2d(5, 4, 3, padding=1, bias=False))
    plain = plain.to(DEVICE, backend_dtype(fused_backend))
    fused = convert(plain, backend=fused_backend)
    assert len(fused.fusion_report.fused) == 1
    with pytest.raises(ValueError, match=re.escape(ONE_VALUE)):
        fused(rand(1, 5, 1, 1, dtype=backend_dtype(fused_backend)))


def test_check_batch_stats_message_is_pytorchs():
    for shape in [(1, 3, 1, 1), (1, 1, 1, 1)]:
        x = torch.zeros(shape)
        with pytest.raises(ValueError) as ours:
            check_batch_stats(x)
        with pytest.raises(ValueError) as theirs:
            F.batch_norm(x, None, None, training=True)
        assert str(ours.value) == str(theirs.value)
    check_batch_stats(torch.zeros(2, 3, 1, 1))
    check_batch_stats(torch.zeros(0, 3, 1, 1))


# ---- empty convolution output ----------------------------------------------------------------------

@pytest.mark.parametrize("hw, k, padding", [((2, 2), 3, 0), ((1, 1), 3, 0), ((1, 8), 3, 0), ((4, 2), 5, 1)])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_empty_convolution_output_is_refused(fused_backend, training, hw, k, padding):
    """The zero-padded input smaller than the kernel: PyTorch's RuntimeError, nothing computed."""
    m = module(fused_backend, k=k, padding=padding).train(training)
    before = {k: v.clone() for k, v in m.bn.state_dict().items()}
    actual, expected = compare(m, rand(2, 5, *hw, dtype=backend_dtype(fused_backend)), None,
                               backend_dtype(fused_backend))
    assert actual.error[0] is RuntimeError and "Kernel size can't be greater than actual input size" in actual.error[1]
    for key, value in before.items():
        assert torch.equal(m.bn.state_dict()[key], value), key


@pytest.mark.parametrize("hw, k, stride", [((1, 1), 3, 1), ((1, 1), 5, 2), ((1, 5), 3, 3), ((2, 3), 5, 1)])
def test_inputs_smaller_than_the_kernel_with_padding(fused_backend, hw, k, stride):
    """Padding makes room: the output matches PyTorch (1x1 inputs with 3x3 and 5x5 kernels included)."""
    m = module(fused_backend, k=k, stride=stride)
    dtype = backend_dtype(fused_backend)
    x = rand(3, 5, *hw, dtype=dtype)
    ho, wo = conv_output_size(*hw, (k, k), stride, k // 2)
    compare(m, x, rand(3, 4, ho, wo, dtype=dtype), dtype)


def test_conv_output_size_matches_conv2d():
    for h, w, k, s, p in [(7, 6, 3, 2, 1), (1, 1, 3, 1, 1), (5, 9, 5, 3, 0), (2, 2, 3, 1, 0), (1, 4, 5, 1, 1)]:
        x, weight = torch.zeros(1, 1, h, w), torch.zeros(1, 1, k, k)
        try:
            expected = tuple(F.conv2d(x, weight, stride=s, padding=p).shape[2:])
        except RuntimeError as err:
            with pytest.raises(RuntimeError) as ours:
                conv_output_size(h, w, (k, k), s, p)
            assert str(ours.value) == str(err)
        else:
            assert conv_output_size(h, w, (k, k), s, p) == expected


# ---- double backward -------------------------------------------------------------------------------

def test_double_backward_is_exact_or_refused(fused_backend):
    """create_graph=True: second-order gradients equal PyTorch's, or a clear error refuses them."""
    m = module(fused_backend)
    dtype = backend_dtype(fused_backend)
    x, dy, v = rand(2, 5, 6, 7, dtype=dtype), rand(2, 4, 6, 7, dtype=dtype, seed=2), rand(2, 5, 6, 7, dtype=dtype, seed=3)

    def second_order(model, dtype):
        xg = x.to(dtype).requires_grad_()
        params = list(model.parameters())
        y = model(xg)
        first = torch.autograd.grad(y, [xg, *params], dy.to(dtype), create_graph=True)
        # A scalar of the first-order gradients: <dx, v> + sum of the parameter gradients squared.
        scalar = (first[0] * v.to(dtype)).sum() + sum((g ** 2).sum() for g in first[1:])
        return torch.autograd.grad(scalar, [xg, *params], allow_unused=True)

    expected = second_order(twin_of(m), torch.float64)
    try:
        actual = second_order(m, dtype)
    except RuntimeError as err:
        assert re.search(r"(?i)double backward|second.order|create_graph|twice|once_differentiable", str(err)), err
        return
    for i, (a, e) in enumerate(zip(actual, expected)):
        a = torch.zeros_like(e) if a is None else a
        e = torch.zeros_like(a) if e is None else e
        err = (a.double() - e).abs().max().item()
        assert err <= RTOL[dtype] * e.abs().max().item(), f"second-order gradient {i}: error {err:.3e}"


# ---- statistics at a large mean --------------------------------------------------------------------

@pytest.mark.parametrize("ratio", [1e3, 1e4])
def test_variance_accuracy_at_large_mean(fused_backend, request, ratio):
    """bn_stats + bn_fold in fp32 on channels whose mean is ``ratio`` times their std: the
    variance (the running_var update at momentum 1, unbiased) within 10x the error of torch.var on
    the same fp32 tensor, and never worse than 4 fp32 ulps (4.8e-7) relative."""
    ops = backends.resolve(fused_backend, torch.device(DEVICE))
    std = torch.tensor([0.01, 1.0, 3.0, 100.0], dtype=torch.float64)[:, None, None]
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(8, 4, 32, 32, generator=g, dtype=torch.float64) * std + ratio * std).float()
    exact = x.double().var((0, 2, 3))  # of the values as stored
    running_mean, running_var = torch.zeros(4, device=DEVICE), torch.ones(4, device=DEVICE)
    ops.bn_fold(ops.bn_stats(x.to(DEVICE)), running_mean=running_mean, running_var=running_var, eps=1e-5,
                momentum=1.0, update_running=True)
    err = ((running_var.cpu().double() - exact).abs() / exact).max().item()
    torch_err = ((x.var((0, 2, 3)).double() - exact).abs() / exact).max().item()
    bound = max(10 * torch_err, 4 * torch.finfo(torch.float32).eps)
    assert err <= bound, f"variance relative error {err:.2e} > {bound:.2e} (torch.var: {torch_err:.2e})"


# ---- Triton row indices ----------------------------------------------------------------------------

@pytest.mark.parametrize("op", ["conv_fwd", "conv_dgrad", "conv_wgrad"])
def test_triton_refuses_row_indices_past_int32(op):
    """Past 2**31 pixels the Triton kernels' int32 row indices would wrap: the wrappers refuse with a
    clear error before launching. Checked on meta tensors: shapes only, nothing allocated."""
    triton_ops = pytest.importorskip("preact_fused.triton")
    if triton_ops.unavailable_reason(DEVICE) is not None:
        pytest.skip(triton_ops.unavailable_reason(DEVICE))
    n, h, w = 2 ** 15 + 1, 256, 256  # 2**31 + 2**16 pixels, input and output (1x1, stride 1)
    x, dy = torch.empty(n, 2, h, w, device="meta"), torch.empty(n, 3, h, w, device="meta")
    weight, fold = torch.empty(3, 2, 1, 1, device="meta"), torch.empty(4, 2, device="meta")
    calls = {"conv_fwd": lambda: triton_ops.conv_fwd(x, weight, 1, 0, fold=fold),
             "conv_dgrad": lambda: triton_ops.conv_dgrad(dy, weight, x, 1, 0, fold),
             "conv_wgrad": lambda: triton_ops.conv_wgrad(x, dy, weight, 1, 0, fold)}
    with pytest.raises((ValueError, RuntimeError), match=r"(?i)pixels|rows|2\*\*31|int32"):
        calls[op]()
