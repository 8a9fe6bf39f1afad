"""convert() inside training code: pickling, state, hooks, parametrisations, pass-throughs, paths
the analysis did not see, and torch.compile. Small models, float64, reference backend."""
import copy
import pickle
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrizations

from preact_fused import convert, count_saved_bytes
from test_convert import SharedPreActivation, fused_conv_nodes, rel

F64 = torch.float64


def close(a, b) -> bool:
    """a == b to 1e-9 relative, or to 1e-12 absolute where b is zero up to rounding (the gradient of
    a conv bias that a BatchNorm follows)."""
    return (a - b).abs().max().item() <= 1e-9 * b.abs().max().item() + 1e-12


def step_both(original, converted, x, steps=2, lr=0.1):
    """SGD steps on both; outputs, input and parameter gradients, then the state_dicts, to 1e-9."""
    opts = [torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9) for m in (original, converted)]
    for _ in range(steps):
        results = []
        for model, opt in zip((original, converted), opts):
            opt.zero_grad()
            xi = x.clone().requires_grad_()
            out = model(xi)
            out.sin().sum().backward()
            results.append((out.detach(), xi.grad, [p.grad for p in model.parameters()]))
            opt.step()
        (out_a, dx_a, g_a), (out_b, dx_b, g_b) = results
        assert close(out_b, out_a) and close(dx_b, dx_a)
        assert [g is None for g in g_a] == [g is None for g in g_b]
        assert all(close(b, a) for a, b in zip(g_a, g_b) if a is not None)
    for (name, a), b in zip(original.state_dict().items(), converted.state_dict().values()):
        assert close(b.to(F64), a.to(F64)), name


def pair(model):
    torch.manual_seed(0)
    model = model.double()
    return model, convert(copy.deepcopy(model))


def test_pickle_and_deepcopy_keep_model_and_report():
    model, converted = pair(SharedPreActivation())
    x = torch.randn(2, 3, 9, 9, dtype=F64)
    for clone in (pickle.loads(pickle.dumps(converted)), copy.deepcopy(converted)):
        assert clone.fusion_report == converted.fusion_report
        twin = copy.deepcopy(model)
        assert fused_conv_nodes(clone(x)) == 3
        twin(x)  # the same running-statistics update
        step_both(twin, clone, x)


class WithSpareParts(nn.Module):
    """A submodule and a buffer that forward never uses, registered between the used ones."""

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(3)
        self.unused = nn.Linear(4, 4)
        self.register_buffer("scale_table", torch.arange(5.0))
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        return self.conv(F.relu(self.bn(x)))


def test_every_parameter_buffer_and_submodule_kept_in_order():
    model, converted = pair(WithSpareParts())
    assert converted.fusion_report.fused == [("bn", ("conv",))]
    assert [n for n, _ in converted.named_parameters()] == [n for n, _ in model.named_parameters()]
    assert [n for n, _ in converted.named_buffers()] == [n for n, _ in model.named_buffers()]
    assert [n for n, _ in converted.named_modules()] == [n for n, _ in model.named_modules()]
    converted.load_state_dict(model.state_dict(), strict=True)


def test_hook_on_a_bn_leaves_it_unfused_and_the_hook_fires():
    model, converted = pair(WithSpareParts())
    seen = []
    model = copy.deepcopy(model)
    model.bn.register_forward_hook(lambda m, i, o: seen.append(o.sum().item()))
    converted = convert(copy.deepcopy(model))
    assert converted.fusion_report.fused == []
    assert converted.fusion_report.skipped == [
        ("bn", "the BatchNorm has forward hooks (they would see a not yet computed output)")]
    x = torch.randn(2, 3, 5, 5, dtype=F64)
    assert rel(converted(x), model(x)) < 1e-9
    assert len(seen) == 2 and abs(seen[0] - seen[1]) < 1e-9


def test_hooks_on_a_fused_conv_fire_and_see_real_values():
    model, converted = pair(WithSpareParts())
    records = {}
    for name, net in (("original", model), ("converted", converted)):
        net.conv.register_forward_pre_hook(lambda m, args, name=name: records.setdefault(name, []).append(args[0].sum()))
        net.conv.register_forward_hook(lambda m, args, out, name=name: records[name].append(out.sum()))
    x = torch.randn(2, 3, 5, 5, dtype=F64)
    step_both(model, converted, x, steps=1)
    assert len(records["converted"]) == 2
    assert all(rel(b, a) < 1e-9 for a, b in zip(records["original"], records["converted"]))


class Reparametrised(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(3)
        self.conv1 = torch.nn.utils.weight_norm(nn.Conv2d(3, 6, 3, padding=1))  # a forward pre-hook
        self.bn2 = nn.BatchNorm2d(6)
        self.conv2 = parametrizations.spectral_norm(nn.Conv2d(6, 4, 1))        # a parametrisation
        self.bn3 = nn.BatchNorm2d(4)
        self.conv3 = parametrizations.weight_norm(nn.Conv2d(4, 4, 3, padding=1))

    def forward(self, x):
        x = self.conv1(F.relu(self.bn1(x)))
        x = self.conv2(F.relu(self.bn2(x)))
        return self.conv3(F.relu(self.bn3(x)))


def test_weight_norm_and_spectral_norm_use_the_weight_of_each_call():
    """Fused with the weight the hook / parametrisation computes at call time: exact after SGD steps
    (the weight changes) and after .double() (its dtype changes)."""
    torch.manual_seed(1)
    model = Reparametrised()
    torch.manual_seed(1)
    converted = convert(Reparametrised())  # (a weight_norm module cannot be deep-copied)
    assert len(converted.fusion_report.fused) == 3
    model.double()
    converted.double()
    torch.manual_seed(2)
    x = torch.randn(2, 3, 6, 6, dtype=F64)
    assert fused_conv_nodes(converted(x)) == 3
    model(x)  # the same running-statistics and power-iteration updates
    step_both(model, converted, x, steps=3)


class PassThroughs(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(3)
        self.relu = nn.ReLU(inplace=True)
        self.between = nn.Identity()
        self.conv1 = nn.Conv2d(3, 5, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(5)
        self.drop = nn.Dropout(p=0.0)
        self.conv2 = nn.Conv2d(5, 5, 1)
        self.bn3 = nn.BatchNorm2d(5)

    def forward(self, x):
        x = self.conv1(self.between(self.relu(self.bn1(x))))
        x = self.conv2(self.drop(F.relu(self.bn2(x))))
        return F.adaptive_avg_pool2d(F.relu(self.bn3(x)), 1)


def test_pass_throughs_do_not_block_fusion_and_skips_name_the_bn():
    model, converted = pair(PassThroughs())
    report = converted.fusion_report
    assert report.fused == [("bn1", ("conv1",)), ("bn2", ("conv2",))]
    assert report.skipped == [("bn3", "the activation is used by adaptive_avg_pool2d, not only by Conv2d modules")]
    x = torch.randn(2, 3, 6, 6, dtype=F64)
    assert fused_conv_nodes(converted(x)) == 2
    model(x)
    step_both(model, converted, x)


class Switchable(nn.Module):
    """Paths selected by flags at call time: the analysis sees only the default one."""

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(3)
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.also_read_activation = False
        self.modify_input = False

    def forward(self, x):
        h = self.bn(x)
        if self.modify_input:
            x.mul_(2)
        a = F.relu(h)
        y = self.conv(a)
        if self.also_read_activation:
            y = y + a.mean() + h.square().mean()
        return y


def test_a_path_the_analysis_did_not_see_gets_the_real_values():
    model, converted = pair(Switchable())
    assert converted.fusion_report.fused == [("bn", ("conv",))]
    model.also_read_activation = converted.also_read_activation = True
    x = torch.randn(2, 3, 5, 5, dtype=F64)
    step_both(model, converted, x, steps=2)  # running statistics included: updated once per call
    assert model.bn.num_batches_tracked.item() == converted.bn.num_batches_tracked.item() == 2


def test_input_modified_in_place_after_the_bn():
    model = Switchable().double()
    model.modify_input = True
    assert convert(copy.deepcopy(model)).fusion_report.skipped == [
        ("bn", "its input is modified in place after the BatchNorm reads it")]
    converted = convert(Switchable().double())
    converted.modify_input = True
    with pytest.raises(RuntimeError, match="input of BatchNorm 'bn' was modified in place"):
        converted(torch.randn(2, 3, 5, 5, dtype=F64))


def test_count_saved_bytes_restores_every_module_mode():
    model = PassThroughs().double()
    model.bn2.eval()
    modes = [m.training for m in model.modules()]
    assert count_saved_bytes(model, torch.randn(2, 3, 6, 6, dtype=F64)) > 0
    assert [m.training for m in model.modules()] == modes


def test_compiled_before_the_first_eager_call_has_no_graph_break():
    """In a fresh process (no backend loaded yet), torch.compile traces a converted model whole."""
    script = (
        "import sys, torch\n"
        "sys.path.insert(0, 'tests')\n"
        "from test_convert import SharedPreActivation\n"
        "from preact_fused import convert\n"
        "model = convert(SharedPreActivation(), backend='reference')\n"
        "explanation = torch._dynamo.explain(model)(torch.randn(2, 3, 8, 8))\n"
        "print(explanation.graph_break_count, [str(r.reason)[:300] for r in explanation.break_reasons])\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                         cwd=str(__import__("pathlib").Path(__file__).parents[1]))
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[0] == "0", out.stdout
