"""convert() on real model zoos (timm, torchvision; random weights, nothing downloaded).

Each converted model is trained beside an unconverted copy: float64, batch 2, SGD with momentum,
the same random draws
(drop-path, stochastic depth) for both; outputs, input and parameter gradients, parameters and
running statistics must agree to 1e-9 relative, in train and in eval mode. The fused op running is
checked in the autograd graph (one fused-conv node per fused conv).

Training-mode inputs are just large enough that every BN normalises over at least 8 values: a BN
over 2 values (the 1x1 final map of a 32x32 input) amplifies rounding differences far beyond 1e-9.
Eval mode (running statistics) is well conditioned at 32x32.
"""
import copy
import io

import pytest
import torch
from torch import nn

from preact_fused import convert
from test_convert import fused_conv_nodes

timm = pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")

F64 = torch.float64
TOL = 1e-9


def close(a, b, what, tol=TOL):
    assert (a is None) == (b is None), what
    if a is not None:
        err = (a - b).abs().max().item()
        assert err <= tol * b.abs().max().item() + 1e-13, f"{what}: {err:.3e}"


def run(model, x, seed):
    """Output, input gradient, parameter gradients of one training step's forward/backward."""
    torch.manual_seed(seed)
    x = x.clone().requires_grad_()
    out = model(x)
    fused = fused_conv_nodes(out)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    (out * weight).sum().backward()
    return out.detach(), x.grad, {n: p.grad for n, p in model.named_parameters()}, fused


def train_side_by_side(original, converted, x, steps, train):
    """SGD steps on both models with identical data and random draws; returns the fused-node counts."""
    original.train(train)
    converted.train(train)
    opts = [torch.optim.SGD(m.parameters(), lr=0.02, momentum=0.9) for m in (original, converted)]
    counts = []
    for step in range(steps):
        for opt in opts:
            opt.zero_grad()
        (out_a, dx_a, grads_a, _), (out_b, dx_b, grads_b, fused) = (run(m, x, step) for m in (original, converted))
        close(out_b, out_a, "output")
        close(dx_b, dx_a, "input gradient")
        assert list(grads_b) == list(grads_a)
        for name in grads_a:
            close(grads_b[name], grads_a[name], f"gradient of {name}")
        for opt in opts:
            opt.step()
        counts.append(fused)
    state_a, state_b = original.state_dict(), converted.state_dict()
    assert list(state_b) == list(state_a)
    for name in state_a:
        close(state_b[name].to(F64), state_a[name].to(F64), name)
    return counts


def fused_convs(model):
    return sum(len(convs) for _, convs in model.fusion_report.fused)


def resnetv2_50():
    return timm.create_model("resnetv2_50", pretrained=False, drop_path_rate=0.2).double()


# name: (builder, training-mode input size, fused convs); EfficientNet (nothing to fuse) has its own test
BUILDERS = {
    "timm-resnetv2_50": (resnetv2_50, 48, 52),
    "torchvision-resnet50": (lambda: torchvision.models.resnet50(weights=None).double(), 48, 32),
    "torchvision-densenet121": (lambda: torchvision.models.densenet121(weights=None).double(), 64, 119),
}


@pytest.mark.parametrize("name", list(BUILDERS))
def test_trains_like_the_original(name):
    """One SGD step in training mode, then one in eval mode."""
    build, size, expected_convs = BUILDERS[name]
    torch.manual_seed(0)
    original = build()
    converted = convert(copy.deepcopy(original))
    assert fused_convs(converted) == expected_convs
    x = torch.randn(2, 3, size, size, dtype=F64)
    assert train_side_by_side(original, converted, x, steps=1, train=True) == [expected_convs]
    x = torch.randn(2, 3, 32, 32, dtype=F64)
    assert train_side_by_side(original, converted, x, steps=1, train=False) == [expected_convs]


def test_drop_path_follows_the_mode_at_call_time():
    """Converted in train mode, eval is deterministic; converted in eval mode, training drops paths.

    (32x32: the training-mode comparison is held to 1e-7, see the module docstring.)
    """
    torch.manual_seed(1)
    original = resnetv2_50()
    x = torch.randn(2, 3, 32, 32, dtype=F64)
    converted_in_train = convert(copy.deepcopy(original).train())
    converted_in_eval = convert(copy.deepcopy(original).eval())
    original.eval()
    converted_in_train.eval()
    with torch.no_grad():
        expected = original(x)
        close(converted_in_train(x), expected, "eval output")
        close(converted_in_train(x), expected, "repeated eval output")
    original.train()
    converted_in_eval.train()
    with torch.no_grad():
        torch.manual_seed(7)
        expected = original(x)
        torch.manual_seed(7)
        close(converted_in_eval(x), expected, "train output with drop-path", tol=1e-7)
        torch.manual_seed(8)
        assert (converted_in_eval(x) - expected).abs().max() > 1e-3  # other paths dropped


def test_efficientnet_converted_in_train_mode_evaluates_and_trains_like_the_original():
    """Nothing to fuse: the model runs its own code, stochastic depth included, in either mode.

    The comparison is bitwise, so float32 serves (float64 depthwise convs are very slow on CPU).
    """
    torch.manual_seed(2)
    original = torchvision.models.efficientnet_b0(weights=None)
    converted = convert(copy.deepcopy(original).train())
    assert converted.fusion_report.fused == []
    x = torch.randn(2, 3, 16, 16)
    original.eval()
    converted.eval()
    with torch.no_grad():
        expected = original(x)
        assert torch.equal(converted(x), expected) and torch.equal(converted(x), expected)
    original.train()
    converted.train()
    (out_a, dx_a, grads_a, _), (out_b, dx_b, grads_b, _) = (run(m, x, 0) for m in (original, converted))
    assert torch.equal(out_a, out_b) and torch.equal(dx_a, dx_b)
    assert all(torch.equal(grads_a[name], grads_b[name]) for name in grads_a)


def test_save_load_round_trip_and_deepcopy_keep_the_fusion():
    torch.manual_seed(3)
    original = resnetv2_50().eval()
    converted = convert(copy.deepcopy(original))
    buffer = io.BytesIO()
    torch.save(converted, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    copied = copy.deepcopy(converted)
    x = torch.randn(2, 3, 32, 32, dtype=F64)
    expected = original(x)
    for model in (loaded, copied):
        assert type(model) is type(original)
        assert model.fusion_report == converted.fusion_report
        out = model(x)
        assert fused_conv_nodes(out) == 52
        close(out, expected, "output")


def test_optimizer_state_and_checkpoints_interchange():
    """A checkpoint (model + optimizer) of an unconverted run continues identically after convert."""
    torch.manual_seed(4)
    original = resnetv2_50()
    converted = convert(copy.deepcopy(original))
    assert [n for n, _ in converted.named_parameters()] == [n for n, _ in original.named_parameters()]
    assert [n for n, _ in converted.named_buffers()] == [n for n, _ in original.named_buffers()]
    x = torch.randn(2, 3, 48, 48, dtype=F64)
    opt_a = torch.optim.SGD(original.parameters(), lr=0.02, momentum=0.9)
    opt_a.zero_grad()
    run(original, x, 0)
    opt_a.step()
    converted.load_state_dict(original.state_dict(), strict=True)
    opt_b = torch.optim.SGD(converted.parameters(), lr=0.02, momentum=0.9)
    opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))  # as from a file: no shared buffers
    for opt, model in ((opt_a, original), (opt_b, converted)):
        opt.zero_grad()
        run(model, x, 1)
        opt.step()
    for (name, a), b in zip(original.state_dict().items(), converted.state_dict().values()):
        close(b.to(F64), a.to(F64), name)


def test_model_methods_and_attributes_are_kept():
    model = convert(timm.create_model("resnetv2_50", pretrained=False, num_classes=7))
    assert type(model).__name__ == "ResNetV2"
    assert model.get_classifier() is model.head.fc and model.num_classes == 7
    assert model.pretrained_cfg["architecture"] == "resnetv2_50"
    x = torch.randn(2, 3, 32, 32)
    assert model.forward_features(x).shape == (2, 2048, 1, 1)


def test_densenet_memory_efficient_advice_works():
    """Untraceable checkpointed layers are reported with a recipe; following it fuses them, and the
    fusion runs inside the checkpointed function (checked on a small torchvision DenseNet)."""
    report = convert(torchvision.models.densenet121(weights=None, memory_efficient=True)).fusion_report
    assert len(report.untraced) == 58 and report.untraced[0][0] == "features.denseblock1.denselayer1"
    assert "memory_efficient" in report.untraced[0][1]
    assert len(report.fused) == 3  # the transitions

    torch.manual_seed(5)
    original = torchvision.models.DenseNet(growth_rate=8, block_config=(2, 2), num_init_features=16,
                                           bn_size=2, memory_efficient=True).double()
    converted = copy.deepcopy(original)
    layers = [m for m in converted.modules() if hasattr(m, "memory_efficient")]
    for layer in layers:
        layer.memory_efficient = False
    convert(converted)
    for layer in layers:
        layer.memory_efficient = True
    assert converted.fusion_report.untraced == [] and fused_convs(converted) == 9
    x = torch.randn(2, 3, 32, 32, dtype=F64)
    assert train_side_by_side(original, converted, x, steps=2, train=True) == [9, 9]


def test_nothing_fusable_leaves_forward_untouched():
    model = torchvision.models.mobilenet_v2(weights=None)
    convert(model)
    assert model.fusion_report.fused == [] and model.fusion_report.skipped == []
    assert not any("forward" in m.__dict__ for m in model.modules() if isinstance(m, nn.Module))
