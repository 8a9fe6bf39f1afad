"""Fused ops under torch.autocast: compute in bf16 / fp16, statistics and parameters in fp32.

Tolerance (DESIGN.md section 6): the fused path's error against float64 is at most twice PyTorch's own
unfused path under the same autocast: per tensor (max-norm) for one block's output and gradients; for
a network, whose low-precision rounding propagates chaotically through the layers, over all parameter
gradients together (2-norm).
"""
import copy

import pytest
import torch
from torch import nn

from preact_fused import PreActBasicBlock, PreActBottleneck, count_saved_bytes, preact_resnet

LOW = [torch.bfloat16, torch.float16]


pytestmark = pytest.mark.usefixtures("one_thread")


def err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def _run(block, x, dtype):
    """Output, input gradient, parameter gradients of ``block`` on x, under autocast when dtype given."""
    x = x.detach().clone().requires_grad_()
    with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        y = block(x)
    (y.double() ** 2).sum().backward()
    return y, x.grad, [p.grad for p in block.parameters()]


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("unit,stride", [(PreActBottleneck, 2), (PreActBasicBlock, 1)])
def test_fused_block_under_autocast(unit, stride, dtype):
    torch.manual_seed(0)
    fused = unit(16, 8, stride=stride, backend="reference")
    with torch.no_grad():
        for m in fused.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.5)
    eager = copy.deepcopy(fused)
    for m in eager.modules():
        if isinstance(m, unit):
            m.fused = False
    ref = copy.deepcopy(eager).double()
    # Inside a network a unit's input is the previous conv's output, already in the compute dtype.
    x = (torch.randn(4, 16, 9, 9) * 2 + 1).to(dtype)
    y, gx, gp = _run(fused, x, dtype)
    y_eager, gx_eager, gp_eager = _run(eager, x, dtype)
    y_ref, gx_ref, gp_ref = _run(ref, x.double(), None)
    assert y.dtype == dtype and gx.dtype == dtype
    assert all(g.dtype == torch.float32 for g in gp)
    assert all(b.dtype != dtype for b in fused.buffers())
    floor = 1e-3 if dtype == torch.bfloat16 else 1e-4
    assert err(y, y_ref) <= 2 * err(y_eager, y_ref) + floor
    assert err(gx, gx_ref) <= 2 * err(gx_eager, gx_ref) + floor
    for (name, _), g, g_eager, g_ref in zip(fused.named_parameters(), gp, gp_eager, gp_ref):
        assert err(g, g_ref) <= 2 * err(g_eager, g_ref) + floor, name
    for (name, b), b_ref in zip(fused.named_buffers(), ref.buffers()):
        if b.is_floating_point():  # statistics of bf16 maps, accumulated in fp32
            assert err(b, b_ref) < 2e-2, name


def grad_err(grads, ref):
    """Relative 2-norm error of all parameter gradients together."""
    a = torch.cat([grads[k].double().flatten() for k in ref])
    b = torch.cat([ref[k].double().flatten() for k in ref])
    return ((a - b).norm() / b.norm()).item()


def _unfused(net):
    eager = copy.deepcopy(net)
    for block in eager.blocks:
        block.fused = False
    eager.fused = False
    return eager


def _loss_and_grads(net, x, target, dtype, scaler=None):
    with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        loss = nn.functional.cross_entropy(net(x), target)
    (scaler.scale(loss) if scaler else loss).backward()
    scale = scaler.get_scale() if scaler else 1.0
    return loss.item(), {name: p.grad / scale for name, p in net.named_parameters()}


@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_fused_net_under_autocast(dtype):
    torch.manual_seed(1)
    net = preact_resnet(11, block="bottleneck", backend="reference")
    eager, ref = _unfused(net), _unfused(net).double()
    x = torch.randn(2, 3, 16, 16)  # the stem's input is fp32 under autocast
    target = torch.randint(0, 10, (2,))
    loss, grads = _loss_and_grads(net, x, target, dtype)
    loss_eager, grads_eager = _loss_and_grads(eager, x, target, dtype)
    loss_ref, grads_ref = _loss_and_grads(ref, x.double(), target, None)
    floor = 1e-3 if dtype == torch.bfloat16 else 1e-4
    assert abs(loss - loss_ref) <= 2 * abs(loss_eager - loss_ref) + floor * abs(loss_ref)
    assert all(g.dtype == torch.float32 for g in grads.values())
    assert grad_err(grads, grads_ref) <= 2 * grad_err(grads_eager, grads_ref) + floor


def test_fused_net_bf16_saves_bf16_activations():
    torch.manual_seed(1)
    net = preact_resnet(11, block="bottleneck", backend="reference")
    x = torch.randn(2, 3, 16, 16)
    fp32_bytes = count_saved_bytes(net, x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16_bytes = count_saved_bytes(net, x)
    # The saved maps halve; the per-channel fp32 vectors do not.
    assert 0.45 * fp32_bytes < bf16_bytes < 0.56 * fp32_bytes, (bf16_bytes, fp32_bytes)


def test_min_memory_under_autocast_recomputes_in_the_same_dtype():
    torch.manual_seed(2)
    default = preact_resnet(11, block="bottleneck", backend="reference")
    low = copy.deepcopy(default)
    low.memory = "min"
    x = torch.randn(2, 3, 16, 16)
    target = torch.randint(0, 10, (2,))
    for net in (default, low):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = nn.functional.cross_entropy(net(x), target)
        loss.backward()  # outside autocast, as recommended: the recomputation restores it
    for (name, a), b in zip(default.named_parameters(), low.parameters()):
        assert torch.equal(a.grad, b.grad), name


def test_fp16_with_grad_scaler():
    torch.manual_seed(3)
    net = preact_resnet(8, block="basic", backend="reference")
    eager, ref = _unfused(net), _unfused(net).double()
    x = torch.randn(4, 3, 16, 16)
    target = torch.randint(0, 10, (4,))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    _, grads = _loss_and_grads(net, x, target, torch.float16, scaler)
    _, grads_eager = _loss_and_grads(eager, x, target, torch.float16)
    _, grads_ref = _loss_and_grads(ref, x.double(), target, None)
    assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads.values())
    assert grad_err(grads, grads_ref) <= 2 * grad_err(grads_eager, grads_ref) + 1e-4
    before = [p.detach().clone() for p in net.parameters()]
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() == 2.0 ** 10  # no overflow: the scale is kept, the step taken
    assert all(not torch.equal(a, p) for a, p in zip(before, net.parameters()))
