"""The compiled CUDA backend against the reference (float64 on CPU), through the shared checks.

Needs a GPU (marker ``cuda``; skipped without one) and the built extension. Every op in float32
(exact fp32: 1e-4 relative) and bfloat16 (twice PyTorch's own bf16 error), on the odd shapes of
tests/backend_checks.py in every layout and on the convolutions of a ResNet-1001 at batch 64 and
128 (NCHW and channels_last); torch.library.opcheck on each op; torch.compile and CUDA-graph
capture; and a few training steps of a fused ResNet-1001 against the reference backend.
"""
import pytest
import torch
import torch.nn.functional as F

import preact_fused
import preact_fused.cuda as ops
from preact_fused import reference

from backend_checks import (LAYOUTS, ODD_CASES, RESNET1001_TRIPLES, ConvCase, cast, check_bn_backward,
                            check_bn_stats_finalize, check_compiled_unit, check_conv_dgrad, check_conv_fwd,
                            check_conv_fwd_autograd, check_conv_wgrad, check_on_second_device, make_inputs,
                            opcheck_samples, resnet1001_case)

pytestmark = pytest.mark.cuda

DEVICE = "cuda"
DTYPES = [torch.float32, torch.bfloat16]
# Every distinct BN-ReLU-conv triple of ResNet-1001 at batch 64 and 128.
RESNET_CASES = [resnet1001_case(t, n) for n in (64, 128) for t in RESNET1001_TRIPLES]


@pytest.fixture(autouse=True)
def _exact_fp32_torch():
    """No TF32 in PyTorch's own convolutions (the bf16 bounds are computed with them)."""
    if torch.cuda.is_available():
        reason = ops.unavailable_reason(torch.device(DEVICE))
        if reason is not None:
            pytest.fail(f"cuda backend unavailable on this GPU machine: {reason}")
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


# ---- odd shapes, every layout, every variant ---------------------------------------------------

@pytest.mark.parametrize("case", ODD_CASES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout_name", LAYOUTS)
def test_conv_fwd_odd(case, dtype, layout_name):
    for with_bn in (True, False):
        for with_residual in (True, False):
            for want_stats in (True, False):
                check_conv_fwd(ops, case, dtype, DEVICE, layout_name, with_bn, with_residual, want_stats)


@pytest.mark.parametrize("case", ODD_CASES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout_name", LAYOUTS)
def test_conv_dgrad_wgrad_odd(case, dtype, layout_name):
    for with_bn in (True, False):
        check_conv_dgrad(ops, case, dtype, DEVICE, layout_name, with_bn)
        check_conv_wgrad(ops, case, dtype, DEVICE, layout_name, with_bn)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout_name", LAYOUTS)
@pytest.mark.parametrize("momentum", [0.1, None])
def test_bn_stats_finalize(dtype, layout_name, momentum):
    check_bn_stats_finalize(ops, (3, 17, 9, 9), dtype, DEVICE, layout_name, momentum=momentum)
    check_bn_stats_finalize(ops, (1, 3, 7, 7), dtype, DEVICE, layout_name, affine=False)
    # |mean| >> std: the per-tile two-pass statistics and the Chan merge must not cancel.
    check_bn_stats_finalize(ops, (4, 64, 16, 16), dtype, DEVICE, layout_name, offset=1000.0, momentum=momentum)


@pytest.mark.parametrize("case", ODD_CASES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout_name", LAYOUTS)
@pytest.mark.parametrize("training", [True, False])
def test_bn_backward(case, dtype, layout_name, training):
    check_bn_backward(ops, case, dtype, DEVICE, layout_name, training, with_residual=True)
    check_bn_backward(ops, case, dtype, DEVICE, layout_name, training, with_residual=False)


# ---- ResNet-1001 shapes, batch 64 and 128 ------------------------------------------------------

@pytest.mark.parametrize("case", RESNET_CASES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout_name", ["channels_last", "nchw"])
def test_resnet1001_convs(case, dtype, layout_name):
    with_bn = case.cin != 3  # the stem has no BN before it
    check_conv_fwd(ops, case, dtype, DEVICE, layout_name, with_bn, with_residual=case.cin != 3, want_stats=True)
    check_conv_dgrad(ops, case, dtype, DEVICE, layout_name, with_bn)
    check_conv_wgrad(ops, case, dtype, DEVICE, layout_name, with_bn)


@pytest.mark.parametrize("shape", [(64, 64, 32, 32), (128, 256, 8, 8), (128, 16, 32, 32)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_resnet1001_bn(shape, dtype):
    check_bn_stats_finalize(ops, shape, dtype, DEVICE, "channels_last")
    case = ConvCase(shape[0], shape[1], shape[1], shape[2], shape[3], 1, 1)
    check_bn_backward(ops, case, dtype, DEVICE, "channels_last", True, with_residual=True)


def test_dgrad_and_wgrad_are_deterministic():
    case = ConvCase(64, 16, 16, 32, 32, 3, 1)
    t = cast(make_inputs(case, torch.bfloat16, DEVICE), torch.bfloat16, DEVICE, "channels_last")
    runs = [(ops.conv_dgrad(t["dy"], t["w"], t["x"], 1, 1, t["scale"], t["shift"], t["mean"]),
             ops.conv_wgrad(t["x"], t["dy"], tuple(t["w"].shape), 1, 1, t["scale"], t["shift"])) for _ in range(2)]
    (g0, sg0, sgx0), w0 = runs[0]
    (g1, sg1, sgx1), w1 = runs[1]
    assert torch.equal(g0, g1) and torch.equal(sg0, sg1) and torch.equal(sgx0, sgx1) and torch.equal(w0, w1)


# ---- torch.library: opcheck, torch.compile, CUDA graphs ----------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", ops.OPS)
def test_opcheck(name, dtype):
    op = getattr(torch.ops.preact_fused, name).default
    for args in opcheck_samples(dtype, DEVICE)[name]:
        torch.library.opcheck(op, args)


def test_torch_compile_fullgraph():
    check_compiled_unit(ops, DEVICE)


def test_cuda_graph_capture():
    case = ConvCase(8, 64, 16, 32, 32, 1, 1)
    t = cast(make_inputs(case, torch.bfloat16, DEVICE), torch.bfloat16, DEVICE, "channels_last")
    rm, rv, nbt = torch.zeros(16, device=DEVICE), torch.ones(16, device=DEVICE), torch.tensor(1, device=DEVICE)

    def step():
        y, partials = ops.conv_fwd(t["x"], t["w"], 1, 0, t["scale"], t["shift"], None, True)
        mean, invstd, scale, shift = ops.bn_finalize(partials, None, None, 1e-5, rm, rv, None, nbt)
        g, sum_g, sum_gx = ops.conv_dgrad(y, t["w"], t["x"], 1, 0, t["scale"], t["shift"], t["mean"])
        dw = ops.conv_wgrad(t["x"], y, tuple(t["w"].shape), 1, 0, t["scale"], t["shift"])
        return y, scale, g, sum_g, dw

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # warm-up outside the graph
    torch.cuda.current_stream().wait_stream(stream)
    eager = step()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(captured, eager):
        assert torch.equal(a, b)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_tensors_on_another_gpu():
    check_on_second_device(ops)


def test_conv_fwd_autograd_matches_reference():
    check_conv_fwd_autograd(ops, DEVICE)


# ---- a fused ResNet-1001 trained a few steps ----------------------------------------------------

def test_resnet1001_training_matches_reference():
    torch.manual_seed(0)
    ref = preact_fused.preact_resnet(1001, backend="reference").to(DEVICE)
    fast = preact_fused.preact_resnet(1001, backend="cuda").to(DEVICE)
    fast.load_state_dict(ref.state_dict())
    models = [m.to(memory_format=torch.channels_last) for m in (ref, fast)]
    opts = [torch.optim.SGD(m.parameters(), lr=0.02, momentum=0.9) for m in models]
    gen = torch.Generator(device=DEVICE).manual_seed(1)
    x = torch.randn(16, 3, 32, 32, device=DEVICE, generator=gen).contiguous(memory_format=torch.channels_last)
    target = torch.randint(0, 10, (16,), device=DEVICE, generator=gen)
    for step in range(3):
        losses = []
        for model, opt in zip(models, opts):
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x), target)
            loss.backward()
            losses.append(loss.item())
        if step == 0:
            for (name, p_ref), p_fast in zip(ref.named_parameters(), fast.parameters()):
                scale = p_ref.grad.abs().max().item()
                assert (p_fast.grad - p_ref.grad).abs().max().item() <= 5e-3 * scale + 1e-8, name
        for opt in opts:
            opt.step()
        assert abs(losses[1] - losses[0]) <= 1e-3 * abs(losses[0]), (step, losses)
    for (name, b_ref), b_fast in zip(ref.named_buffers(), fast.buffers()):
        if b_ref.is_floating_point():
            assert torch.allclose(b_fast, b_ref, rtol=1e-3, atol=1e-4), name
        else:
            assert torch.equal(b_fast, b_ref), name
