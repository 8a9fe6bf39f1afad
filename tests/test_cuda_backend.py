"""The compiled CUDA backend on a GPU against torch in float64, with the contract checks of
tests/backend_checks.py (the ones every backend passes in tests/test_conformance.py, and the
emulated kernels on CPU in tests/test_cuda_build.py).

Needs a GPU (marker ``cuda``; skipped without one) and the built extension. Every op in float32
(exact fp32: 1e-4 relative), bfloat16 and float16 (twice PyTorch's own error), on odd shapes in
every layout and BatchNorm form, and on the convolutions of a ResNet-1001 (preact_fused/shapes.py)
at batch 64 and 128; the in-launch trees with many tiles; one launch per op (profiler); bitwise
reruns; torch.library.opcheck; torch.compile and CUDA-graph capture; and a few training steps of a
fused ResNet-1001 against the reference.
"""
import pytest
import torch
import torch.nn.functional as F

import preact_fused
import preact_fused.cuda as ops
from preact_fused.shapes import RESNET1001_TRIPLES, triple_roles

from backend_checks import (BN_MODES, LAYOUTS, MANY_TILES, MANY_TILES_CASE, ODD_CASES, WIDE_BN_CASE, ConvCase,
                            check_bn_backward, check_bn_fold, check_bn_fold_low_precision_running, check_bn_stats,
                            check_compiled_unit, check_conv_dgrad, check_conv_fwd, check_conv_wgrad, check_conv_wgrad_bn_backward,
                            check_empty_batch, check_nan_propagates, check_on_second_device, check_reruns_identical,
                            make_triple, opcheck_samples, resnet1001_case, to_backend)

pytestmark = pytest.mark.cuda

DEVICE = "cuda"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
BATCHES = [64, 128]


def bn_case(shape) -> ConvCase:
    """A ConvCase whose input is ``shape`` [N, C, H, W], for the BatchNorm checks (1x1, C -> C)."""
    n, c, h, w = shape
    return ConvCase(n, c, c, h, w, 1, 1)


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
    for mode in BN_MODES:
        for with_residual, want_stats in ((True, True), (False, False), (True, False), (False, True)):
            check_conv_fwd(ops, case, dtype, DEVICE, layout_name, mode, with_residual, want_stats)


@pytest.mark.parametrize("case", ODD_CASES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout_name", LAYOUTS)
def test_conv_dgrad_wgrad_odd(case, dtype, layout_name):
    for training, with_bn in ((True, True), (False, True), (True, False)):
        check_conv_dgrad(ops, case, dtype, DEVICE, layout_name, training, with_bn=with_bn)
        check_conv_wgrad(ops, case, dtype, DEVICE, layout_name, training, with_bn=with_bn)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout_name", LAYOUTS)
def test_bn_ops(dtype, layout_name):
    check_bn_stats(ops, (3, 17, 9, 9), dtype, DEVICE, layout_name)
    check_bn_stats(ops, (1, 3, 7, 7), dtype, DEVICE, layout_name)
    check_bn_stats(ops, (4, 64, 16, 16), dtype, DEVICE, layout_name, offset=1000.0)
    for case in (bn_case((1, 3, 7, 7)), bn_case((3, 17, 9, 9)), WIDE_BN_CASE):
        for training in (True, False):
            check_bn_backward(ops, case, dtype, DEVICE, layout_name, training, with_residual=True)
            check_bn_backward(ops, case, dtype, DEVICE, layout_name, training, with_residual=False)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bn_fold(dtype):
    for mode in ("update", "update_cumulative", "stats", "running"):
        check_bn_fold(ops, 17, dtype, DEVICE, mode)
    check_bn_fold(ops, 300, dtype, DEVICE, "update", affine=False)
    check_bn_fold(ops, 17, dtype, DEVICE, "running", affine=False)
    check_bn_fold_low_precision_running(ops, DEVICE, torch.bfloat16)


# ---- ResNet-1001 shapes, batch 64 and 128; many tiles -------------------------------------------

@pytest.mark.parametrize("triple", RESNET1001_TRIPLES, ids=lambda t: t[0])
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout_name", ["channels_last", "nchw"])
def test_resnet1001_convs(triple, batch, dtype, layout_name):
    name, case, roles = triple[0], resnet1001_case(triple, batch), triple_roles(triple[0])
    with_bn = roles["with_bn"]  # the stem has no BN before it
    mode = "none" if not with_bn else "fold" if name.endswith("shortcut") else "update"
    check_conv_fwd(ops, case, dtype, DEVICE, layout_name, mode, roles["with_residual"], roles["want_stats"])
    check_conv_dgrad(ops, case, dtype, DEVICE, layout_name, True, with_bn=with_bn)
    check_conv_wgrad(ops, case, dtype, DEVICE, layout_name, True, with_bn=with_bn)
    if roles["next_bn"]:
        check_conv_wgrad_bn_backward(ops, case, dtype, DEVICE, layout_name, True)


@pytest.mark.parametrize("shape", [(128, 64, 32, 32), (128, 256, 8, 8), (128, 16, 32, 32)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_resnet1001_bn(shape, dtype):
    check_bn_stats(ops, shape, dtype, DEVICE, "channels_last")
    check_bn_backward(ops, bn_case(shape), dtype, DEVICE, "channels_last", True, with_residual=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_many_tiles_nan_empty_and_reruns(dtype):
    check_conv_fwd(ops, MANY_TILES_CASE, dtype, DEVICE, "channels_last", "update", True, True)
    check_conv_dgrad(ops, MANY_TILES_CASE, dtype, DEVICE, "channels_last", True)
    check_conv_wgrad(ops, MANY_TILES_CASE, dtype, DEVICE, "channels_last", True)
    check_bn_stats(ops, MANY_TILES, dtype, DEVICE, "channels_last")
    check_empty_batch(ops, dtype, DEVICE)
    for _ in range(3):  # arrival orders differ from run to run on a GPU; the results may not
        check_reruns_identical(ops, dtype, DEVICE)
    check_nan_propagates(ops, torch.float32, DEVICE)


def _channels_last_inputs(case, dtype):
    """x, dy (channels_last, ``dtype``), the float32 weight and the summary of x, on the GPU."""
    t = make_triple(case)
    x = to_backend(t.x, dtype, DEVICE, "channels_last")
    dy = to_backend(t.dy, dtype, DEVICE, "channels_last")
    w = to_backend(t.w, dtype, DEVICE).to(torch.float32)
    return x, dy, w, ops.bn_stats(x)


def test_one_kernel_launch_per_op():
    """Each op call is exactly one kernel (CUDA profiler): no packing, casting, zeroing or
    reducing kernels beside it, for inputs already channels_last in the op's dtype."""
    from torch.profiler import ProfilerActivity, profile
    x, dy, w, st = _channels_last_inputs(ConvCase(8, 64, 64, 16, 16, 3, 1), torch.bfloat16)
    rm, rv, nbt = torch.zeros(64, device=DEVICE), torch.ones(64, device=DEVICE), torch.tensor(0, device=DEVICE)
    _, _, fold = ops.conv_fwd(x, w, 1, 1, stats=st)
    calls = {
        "conv_fwd": lambda: ops.conv_fwd(x, w, 1, 1, stats=st, running_mean=rm, running_var=rv,
                                         num_batches_tracked=nbt, update_running=True, residual=x, want_stats=True),
        "bn_stats": lambda: ops.bn_stats(x),
        "bn_fold": lambda: ops.bn_fold(st, None, None, rm, rv, nbt, 1e-5, None, True),
        "conv_dgrad": lambda: ops.conv_dgrad(dy, w, x, 1, 1, fold),
        "conv_wgrad": lambda: ops.conv_wgrad(x, dy, w, 1, 1, fold),
        "bn_backward": lambda: ops.bn_backward(dy, x, fold, torch.zeros(3, 64, device=DEVICE), 2048.0, True, dy),
    }
    for name, call in calls.items():
        call()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            call()
            torch.cuda.synchronize()
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        assert len(kernels) == 1, (name, [e.name for e in kernels])


# ---- torch.library: opcheck, torch.compile, CUDA graphs ----------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", ops.OPS)
def test_opcheck(name, dtype):
    op = getattr(torch.ops.preact_fused, name).default
    for args in opcheck_samples(dtype, DEVICE)[name]:
        torch.library.opcheck(op, args)


def test_torch_compile_fullgraph():
    check_compiled_unit(ops, DEVICE, torch.bfloat16)


def test_cuda_graph_capture():
    x, _, w, st = _channels_last_inputs(ConvCase(8, 64, 16, 32, 32, 1, 1), torch.bfloat16)
    rm, rv, nbt = torch.zeros(64, device=DEVICE), torch.ones(64, device=DEVICE), torch.tensor(1, device=DEVICE)

    def step():
        y, y_stats, fold = ops.conv_fwd(x, w, 1, 0, stats=st, running_mean=rm, running_var=rv,
                                        num_batches_tracked=nbt, momentum=0.1, update_running=True, want_stats=True)
        fold2 = ops.bn_fold(y_stats, None, None, None, None, None, 1e-5, 0.1, False)
        g, sums = ops.conv_dgrad(y, w, x, 1, 0, fold)
        dw = ops.conv_wgrad(x, y, w, 1, 0, fold)
        return y, y_stats, fold2, g, sums, dw

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # warm-up outside the graph
    torch.cuda.current_stream().wait_stream(stream)
    eager = step()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    for _ in range(2):
        graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(captured, eager):
        assert torch.equal(a, b)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_tensors_on_another_gpu():
    """Every op with its tensors on cuda:1 while cuda:0 is current: the kernels run where the
    tensors are, on that device's stream (and with that device's counter workspace)."""
    check_on_second_device(ops)
    with torch.cuda.device(0):
        check_bn_fold(ops, 17, torch.float32, "cuda:1", "update")


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
