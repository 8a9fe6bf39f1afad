"""convert(): differently written models, converted and compared with an unconverted copy in float64.

Tolerance: 1e-9 relative (float64, reference backend). That the fused op ran is checked in the
autograd graph of the output (one fused-conv node per fused conv).
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from preact_fused import convert, preact_resnet
from preact_fused.convert import revert

F64 = torch.float64


def rel(a, b):
    return (a - b).abs().max().item() / max(b.abs().max().item(), 1e-30)


class FunctionalRelu(nn.Module):
    """BN module -> F.relu / torch.relu / .relu_() -> conv, twice, then an unfusable tail."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv1 = nn.Conv2d(8, 8, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 6, 1, bias=True)
        self.bn3 = nn.BatchNorm2d(6)
        self.dilated = nn.Conv2d(6, 6, 3, padding=2, dilation=2)

    def forward(self, x):
        h = self.conv1(F.relu(self.bn1(self.stem(x))))
        h = self.conv2(torch.relu(self.bn2(h)))
        return self.dilated(self.bn3(h).relu_())


class BatchNormAct2d(nn.BatchNorm2d):
    """A combined norm + activation module, written the way model zoos write it."""

    def __init__(self, num_features, act=True):
        super().__init__(num_features)
        self.drop = nn.Identity()
        self.act = nn.ReLU(inplace=True) if act else nn.Identity()

    def forward(self, x):
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                         self.training, self.momentum, self.eps)
        return self.act(self.drop(x))


class CombinedNormAct(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 17, 3, padding=1, bias=False)
        self.norm_act1 = BatchNormAct2d(17)
        self.conv1 = nn.Conv2d(17, 9, 3, padding=1, bias=False)
        self.norm2 = BatchNormAct2d(9, act=False)   # no ReLU: must stay unfused
        self.conv2 = nn.Conv2d(9, 4, 1, bias=False)

    def forward(self, x):
        return self.conv2(self.norm2(self.conv1(self.norm_act1(self.stem(x)))))


class SharedPreActivation(nn.Module):
    """One BN-ReLU feeding the residual conv and a projection shortcut conv (nn.ReLU module)."""

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(3)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False)
        self.shortcut = nn.Conv2d(3, 8, 1, stride=2, bias=False)
        self.head = nn.Sequential(nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 5, 3, padding=1, bias=False))

    def forward(self, x):
        a = self.relu(self.bn(x))
        return self.head(self.conv(a) + self.shortcut(a))


class Untraceable(nn.Module):
    """A fusable part, a gate with nothing to fuse, and a part that torch.fx cannot trace."""

    def __init__(self):
        super().__init__()
        self.ok = SharedPreActivation()
        self.gate = Gate()
        self.branchy = Branchy()

    def forward(self, x):
        return self.branchy(self.gate(self.ok(x)))


class Gate(nn.Module):
    def forward(self, x):
        return x if x.sum() > 0 else -x  # data-dependent control flow


class Branchy(nn.Module):
    """Data-dependent control flow around a chain of its own."""

    def __init__(self):
        super().__init__()
        self.inner = nn.Sequential(nn.BatchNorm2d(5), nn.ReLU(), nn.Conv2d(5, 5, 1))

    def forward(self, x):
        return self.inner(x) if x.mean() > -1e9 else x


def fused_conv_nodes(output: torch.Tensor) -> int:
    """How many fused-conv nodes the autograd graph of ``output`` holds."""
    seen, stack, count = set(), [output.grad_fn], 0
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        count += "FusedChain" in type(fn).__name__
        stack += [next_fn for next_fn, _ in fn.next_functions]
    return count


def _compare(model, converted, x, steps=2):
    """Outputs, gradients and buffers of model and converted over a few SGD steps."""
    opt_a = torch.optim.SGD(model.parameters(), lr=0.1)
    opt_b = torch.optim.SGD(converted.parameters(), lr=0.1)
    for _ in range(steps):
        for opt, net in ((opt_a, model), (opt_b, converted)):
            opt.zero_grad()
            net(x).square().mean().backward()
            opt.step()
        assert rel(converted(x), model(x)) < 1e-9
    for (name, a), b in zip(converted.state_dict().items(), model.state_dict().values()):
        assert torch.allclose(a.to(F64), b.to(F64), rtol=1e-9, atol=1e-12), name


@pytest.mark.parametrize("cls,fused,skipped", [
    (FunctionalRelu, [("bn1", ("conv1",)), ("bn2", ("conv2",))], ["bn3"]),
    (CombinedNormAct, [("norm_act1", ("conv1",))], []),
    (SharedPreActivation, [("bn", ("conv", "shortcut")), ("head.0", ("head.2",))], []),
])
def test_convert_matches_original(cls, fused, skipped):
    torch.manual_seed(0)
    model = cls().double()
    twin = copy.deepcopy(model)
    x = torch.randn(2, 3, 9, 9, dtype=F64)
    converted = convert(model)
    assert converted is model and type(converted) is cls
    assert converted.fusion_report.fused == fused
    assert [name for name, _ in converted.fusion_report.skipped] == skipped
    assert list(converted.state_dict()) == list(twin.state_dict())
    assert fused_conv_nodes(converted(x)) == sum(len(convs) for _, convs in fused)
    twin(x)  # the same running-statistics update
    _compare(twin, converted, x)


def test_existing_optimizer_keeps_working():
    torch.manual_seed(1)
    model = SharedPreActivation().double()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    converted = convert(model)
    before = model.conv.weight.detach().clone()
    converted(torch.randn(1, 3, 8, 8, dtype=F64)).sum().backward()
    opt.step()
    assert not torch.equal(before, converted.conv.weight)
    assert converted.conv.weight is model.conv.weight


def test_shared_bn_updates_running_stats_once():
    torch.manual_seed(2)
    model = SharedPreActivation().double()
    twin = copy.deepcopy(model)
    converted = convert(model)
    x = torch.randn(2, 3, 9, 9, dtype=F64)
    converted(x)
    twin(x)
    assert converted.bn.num_batches_tracked.item() == twin.bn.num_batches_tracked.item() == 1
    assert rel(converted.bn.running_var, twin.bn.running_var) < 1e-12


def test_filter_fn_leaves_rejected_chains():
    converted = convert(SharedPreActivation(), filter_fn=lambda name, conv: name != "shortcut")
    assert converted.fusion_report.fused == [("head.0", ("head.2",))]
    assert converted.fusion_report.skipped == [("bn", "filter_fn rejected shortcut")]


def test_unfused_resnet_converts_to_the_fused_computation():
    torch.manual_seed(3)
    model = preact_resnet(164, fused=False).double()
    twin = copy.deepcopy(model)
    converted = convert(model)
    report = converted.fusion_report
    assert sum(len(convs) for _, convs in report.fused) == 18 * 3 * 3 + 3  # every triple + 3 shortcuts
    assert [name for name, _ in report.skipped] == ["bn"]  # the head feeds a pooling
    assert str(report).startswith("fused 162 BN-ReLU chain(s) into 165 conv(s)")
    x = torch.randn(2, 3, 8, 8, dtype=F64)
    out = converted(x)
    assert fused_conv_nodes(out) == 165
    assert rel(out, twin(x)) < 1e-9


def test_untraceable_part_is_reported_and_searched_on_its_own():
    torch.manual_seed(4)
    model = Untraceable().double()
    twin = copy.deepcopy(model)
    report = convert(model).fusion_report
    assert report.fused == [("ok.bn", ("ok.conv", "ok.shortcut")), ("ok.head.0", ("ok.head.2",)),
                            ("branchy.inner.0", ("branchy.inner.2",))]
    assert [name for name, _ in report.untraced] == ["branchy"]
    assert "TraceError" in report.untraced[0][1] and "memory_efficient" in report.untraced[0][1]
    x = torch.randn(2, 3, 9, 9, dtype=F64)
    out = model(x)
    assert fused_conv_nodes(out) == 4
    assert rel(out, twin(x)) < 1e-9


def test_convert_again_and_revert():
    torch.manual_seed(5)
    model = SharedPreActivation().double()
    x = torch.randn(2, 3, 9, 9, dtype=F64)
    convert(model, filter_fn=lambda name, conv: name != "shortcut")
    assert fused_conv_nodes(model(x)) == 1
    assert convert(model).fusion_report.fused == [("bn", ("conv", "shortcut")), ("head.0", ("head.2",))]
    assert fused_conv_nodes(model(x)) == 3
    revert(model)
    assert fused_conv_nodes(model(x)) == 0 and not hasattr(model, "fusion_report")
