"""Drop-in modules and models (reference backend) against the unfused torch modules.

float64 comparisons use 1e-9 relative; fp32 training over several SGD steps 1e-4; bf16/fp16 forward
within 5e-2 of the float64 result (the unfused path in the same dtype is held to the same bound).
"""
import copy
import subprocess
import sys

import pytest
import torch
from torch import nn

import preact_fused
from preact_fused import BNReLUConv2d, PreActBasicBlock, PreActBottleneck, count_saved_bytes, preact_resnet
from preact_fused.backend import BackendUnavailable, resolve

F64 = torch.float64


def rel(a, b):
    return (a - b).abs().max().item() / max(b.abs().max().item(), 1e-30)


def unfused_twin(module: BNReLUConv2d) -> nn.Sequential:
    twin = nn.Sequential(copy.deepcopy(module.bn), nn.ReLU(), copy.deepcopy(module.conv))
    return twin


OPTIONS = [
    dict(),
    dict(momentum=None),
    dict(affine=False),
    dict(track_running_stats=False),
    dict(bias=True),
    dict(stride=2, padding=1),
]


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_bn_relu_conv_matches_sequential(options, memory_format):
    torch.manual_seed(0)
    options = {"stride": 1, "padding": 1, **options}
    fused = BNReLUConv2d(17, 3, 3, dtype=F64, **options)
    with torch.no_grad():
        if fused.bn.affine:
            fused.bn.weight.uniform_(0.5, 1.5)
            fused.bn.bias.normal_()
    twin = unfused_twin(fused)
    assert list(fused.state_dict()) == [f"bn.{k}" for k in twin[0].state_dict()] + [f"conv.{k}" for k in twin[2].state_dict()]
    for step in range(3):  # running statistics evolve across steps (momentum=None averages them)
        x = (torch.randn(2, 17, 9, 9, dtype=F64) * 2 + 1).to(memory_format=memory_format)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = fused(xa), twin(xb)
        assert rel(ya, yb) < 1e-9
        assert ya.is_contiguous(memory_format=memory_format)
        dy = torch.randn_like(ya)
        ya.backward(dy)
        yb.backward(dy)
        assert rel(xa.grad, xb.grad) < 1e-9
        for (name, pa), pb in zip(fused.named_parameters(), twin.parameters()):
            assert rel(pa.grad, pb.grad) < 1e-9, name
    for (name, ba), bb in zip(fused.named_buffers(), twin.buffers()):
        assert torch.allclose(ba.to(F64), bb.to(F64), rtol=1e-12, atol=0), name
    fused.eval()
    twin.eval()
    x = torch.randn(1, 17, 7, 7, dtype=F64).requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    ya, yb = fused(x), twin(x2)
    assert rel(ya, yb) < 1e-9
    ya.sum().backward()
    yb.sum().backward()
    assert rel(x.grad, x2.grad) < 1e-9


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_low_precision_forward(dtype):
    torch.manual_seed(1)
    fused = BNReLUConv2d(16, 8, 3, padding=1)
    twin = unfused_twin(fused)
    x = torch.randn(2, 16, 8, 8)
    expected = unfused_twin(fused).double()(x.double())
    fused.to(dtype)
    twin.to(dtype)
    y = fused(x.to(dtype))
    assert y.dtype == dtype
    bound = 1e-5 if dtype == torch.float32 else 5e-2
    assert rel(y.double(), expected) < bound
    assert rel(twin(x.to(dtype)).double(), expected) < bound
    y.float().sum().backward()
    assert fused.conv.weight.grad.dtype == dtype and torch.isfinite(fused.conv.weight.grad.float()).all()


@pytest.mark.parametrize("block", [PreActBasicBlock, PreActBottleneck])
@pytest.mark.parametrize("stride", [1, 2])
def test_blocks_match_unfused(block, stride):
    torch.manual_seed(2)
    fused = block(16, 8, stride=stride, fused=True).double()
    eager = block(16, 8, stride=stride, fused=False).double()
    eager.load_state_dict(fused.state_dict())
    x = torch.randn(2, 16, 9, 9, dtype=F64)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = fused(xa), eager(xb)
    assert rel(ya, yb) < 1e-9
    ya.backward(torch.ones_like(ya))
    yb.backward(torch.ones_like(yb))
    assert rel(xa.grad, xb.grad) < 1e-9
    for (name, pa), pb in zip(fused.named_parameters(), eager.parameters()):
        assert rel(pa.grad, pb.grad) < 1e-9, name
    for (name, ba), bb in zip(fused.named_buffers(), eager.buffers()):
        assert torch.equal(ba, bb) or rel(ba.double(), bb.double()) < 1e-12, name


@pytest.mark.parametrize("frozen", [("conv1.weight",), ("conv2.weight",), ("conv1.weight", "conv2.weight", "bn1.weight",
                                                                          "bn1.bias")], ids=str)
def test_frozen_weights_match_unfused(frozen):
    """A frozen conv weight: the BN backward after it runs as its own bn_backward (no wgrad to fuse it in)."""
    torch.manual_seed(3)
    fused = PreActBottleneck(16, 4, fused=True).double()
    eager = PreActBottleneck(16, 4, fused=False).double()
    eager.load_state_dict(fused.state_dict())
    for block in (fused, eager):
        for name, p in block.named_parameters():
            p.requires_grad_(name not in frozen)
    x = torch.randn(2, 16, 5, 5, dtype=F64)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    dy = torch.randn(2, 16, 5, 5, dtype=F64)
    fused(xa).backward(dy)
    eager(xb).backward(dy)
    assert rel(xa.grad, xb.grad) < 1e-9
    for (name, pa), pb in zip(fused.named_parameters(), eager.parameters()):
        assert (pa.grad is None) == (name in frozen) and (pa.grad is None or rel(pa.grad, pb.grad) < 1e-9), name


def test_forward_with_stats_uses_producer_statistics():
    """forward_with_stats(x, stats) takes the statistics of x from them and returns those of y."""
    from preact_fused import contract, reference
    torch.manual_seed(3)
    block = PreActBottleneck(16, 4, fused=True).double()
    x = torch.randn(2, 16, 7, 7, dtype=F64)
    y_tensor = block(x)
    y_pair, stats = block.forward_with_stats(x, reference.bn_stats(x))
    assert rel(y_pair, y_tensor) < 1e-12
    assert stats.shape == (4, block.conv3.out_channels)
    mean = stats[contract.PIVOT] + stats[contract.OFFSET]
    assert rel(mean, y_pair.mean((0, 2, 3))) < 1e-10
    assert rel(stats[contract.M2] / stats[contract.COUNT], y_pair.var((0, 2, 3), unbiased=False)) < 1e-10


def _sgd_steps(model, batches, steps):
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    losses = []
    for x, target in batches[:steps]:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _small_cifar_net(fused):
    """A ResNet-20-style net (3 stages of 1 basic unit) from the same machinery as preact_resnet."""
    from preact_fused.models import PreActResNet, _CifarStem
    return PreActResNet(PreActBasicBlock, (1, 1, 1), (16, 32, 64), (1, 2, 2), 10, _CifarStem(16), fused, "reference")


@pytest.mark.parametrize("build,dtype,tol", [
    (_small_cifar_net, torch.float32, 1e-4),
    # 164 layers at batch 2 amplify fp32 rounding chaotically within a few steps: compare in float64.
    (lambda fused: preact_resnet(164, fused=fused), F64, 1e-8),
], ids=["resnet20-fp32", "resnet164-fp64"])
def test_fused_net_trains_like_unfused(build, dtype, tol):
    torch.manual_seed(4)
    fused, eager = build(True).to(dtype), build(False).to(dtype)
    eager.load_state_dict(fused.state_dict())
    batches = [(torch.randn(2, 3, 16, 16, dtype=dtype), torch.randint(0, 10, (2,))) for _ in range(3)]
    la, lb = _sgd_steps(fused, batches, 3), _sgd_steps(eager, batches, 3)
    assert max(abs(a - b) / abs(b) for a, b in zip(la, lb)) < tol
    for (name, pa), pb in zip(fused.state_dict().items(), eager.state_dict().values()):
        if pa.is_floating_point():
            assert rel(pa, pb) < 10 * tol, name
        else:
            assert torch.equal(pa, pb), name


def test_models_have_the_paper_sizes():
    params = {d: sum(p.numel() for p in preact_resnet(d).parameters()) for d in (110, 164, 1001)}
    assert params == {110: 1730522, 164: 1703258, 1001: 10327706}
    net = preact_resnet(200, num_classes=1000, dataset="imagenet", fused=False)
    assert sum(p.numel() for p in net.parameters()) == pytest.approx(64.7e6, rel=0.01)
    assert list(preact_resnet(164, fused=True).state_dict()) == list(preact_resnet(164, fused=False).state_dict())
    with pytest.raises(ValueError, match="depth"):
        preact_resnet(50)


def test_imagenet_fused_forward_matches():
    torch.manual_seed(5)
    fused = preact_resnet(200, num_classes=7, dataset="imagenet").double()
    eager = preact_resnet(200, num_classes=7, dataset="imagenet", fused=False).double()
    eager.load_state_dict(fused.state_dict())
    x = torch.randn(2, 3, 48, 48, dtype=F64)  # final map 2x2: BN over 8 values per channel
    assert rel(fused(x), eager(x)) < 1e-8


def test_resnet1001_saves_half_the_activation_bytes():
    torch.manual_seed(6)
    x = torch.randn(2, 3, 32, 32)
    fused = count_saved_bytes(preact_resnet(1001), x)
    eager = count_saved_bytes(preact_resnet(1001, fused=False), x)
    assert fused <= 0.52 * eager, (fused, eager)


def test_count_saved_bytes_leaves_the_model_unchanged():
    net = _small_cifar_net(True)
    before = copy.deepcopy(net.state_dict())
    assert count_saved_bytes(net, torch.randn(2, 3, 8, 8)) > 0
    for key, value in net.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_bad_input_gets_a_clear_error():
    module = BNReLUConv2d(3, 4, 3, padding=1)
    with pytest.raises(ValueError, match="4-D"):
        module(torch.randn(3, 8, 8))
    with pytest.raises(ValueError, match="input channels"):
        module(torch.randn(1, 5, 8, 8))
    with pytest.raises(TypeError, match="dtype"):
        module(torch.randn(1, 3, 8, 8, dtype=F64))
    with pytest.raises(TypeError, match="floating"):
        module(torch.ones(1, 3, 8, 8, dtype=torch.long))
    with pytest.raises(RuntimeError, match="on meta"):
        module(torch.randn(1, 3, 8, 8, device="meta"))
    with pytest.raises(ValueError, match="groups"):
        BNReLUConv2d.from_modules(nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(ValueError, match="dilation"):
        BNReLUConv2d.from_modules(nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3, dilation=2))
    with pytest.raises(ValueError, match="padding_mode"):
        BNReLUConv2d.from_modules(nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3, padding_mode="reflect"))


def test_backend_selection(monkeypatch):
    assert resolve("reference", "cpu").__name__ == "preact_fused.reference"
    with pytest.raises(ValueError, match="unknown"):
        resolve("fastest", "cpu")
    with pytest.raises(BackendUnavailable, match="cuda"):
        resolve("cuda", "cpu")
    monkeypatch.setenv("PREACT_FUSED_BACKEND", "cuda")
    with pytest.raises(BackendUnavailable):
        resolve("auto", "cpu")
    monkeypatch.setenv("PREACT_FUSED_BACKEND", "reference")
    assert resolve("auto", "cpu").__name__ == "preact_fused.reference"


def test_auto_falls_back_with_one_warning():
    code = (
        "import warnings, torch, preact_fused\n"
        "warnings.simplefilter('always')\n"
        "m = preact_fused.BNReLUConv2d(3, 4, 3, padding=1)\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    for _ in range(3): m(torch.randn(1, 3, 5, 5))\n"
        "print(sum('reference backend' in str(w.message) for w in caught))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PATH": "", "PREACT_FUSED_BACKEND": "auto"})
    assert out.stdout.strip() == "1"


def test_import_is_lean():
    """Importing the package neither initialises CUDA nor loads the compiled extension."""
    code = (
        "import sys, torch, preact_fused\n"
        "net = preact_fused.preact_resnet(110)\n"
        "assert not torch.cuda.is_initialized(), 'CUDA initialised on import'\n"
        "assert 'preact_fused._C' not in sys.modules, 'extension loaded on import'\n"
        "assert 'triton' not in sys.modules, 'triton imported on import'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_public_api():
    assert set(preact_fused.__all__) >= {"BNReLUConv2d", "PreActBasicBlock", "PreActBottleneck",
                                         "preact_resnet", "convert", "count_saved_bytes"}
