"""The Triton backend against the reference: the shared contract checks, statistics, torch.library, training.

Without a GPU the kernels run under the Triton interpreter (TRITON_INTERPRET=1, set here before
Triton is imported; float32 only, small fixed tiles); with one they run on it. Every odd case of
tests/backend_checks.py runs in every layout somewhere below, with and without BN, residual and
statistics, outputs poisoned. bf16 and the ResNet-1001 shapes are in test_triton_gpu.py.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

pytest.importorskip("triton")

import preact_fused.triton as triton_ops  # noqa: E402
from preact_fused.models import PreActResNet, _CifarStem  # noqa: E402
from preact_fused.nn import BNReLUConv2d, PreActBasicBlock, PreActBottleneck  # noqa: E402

from backend_checks import (LAYOUTS, MANY_TILES, ODD_CASES, ConvCase, check_bn_backward,  # noqa: E402
                            check_bn_stats_finalize, cast, check_conv_dgrad, check_conv_fwd, check_conv_wgrad,
                            make_inputs, merged_stats, rel_error)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
F32 = torch.float32
# The interpreter computes float16 dot products (numpy has them) but not bfloat16 ones: the convs
# are checked here in float32 and float16 (the low-precision loads, casts and rounding before the
# statistics are those of bfloat16), the kernels without a dot in all three dtypes. bfloat16
# convolutions are checked on a GPU (tests/test_triton_gpu.py).
CONV_DTYPES = [F32, torch.float16]
ALL_DTYPES = [F32, torch.float16, torch.bfloat16]

pytestmark = [
    pytest.mark.triton_interp,
    pytest.mark.usefixtures("exact_cudnn"),
    pytest.mark.skipif(triton_ops.unavailable_reason(DEVICE) is not None,
                       reason=f"triton backend unavailable: {triton_ops.unavailable_reason(DEVICE)}"),
]


# (with_bn, with_residual, want_stats) pairs per layout: over the three layouts every case runs all
# six combinations of loader, residual and statistics.
FWD_VARIANTS = {
    "nchw": [(True, True, True), (False, False, False)],
    "channels_last": [(True, False, True), (False, True, False)],
    "noncontiguous": [(True, True, False), (False, False, True)],
}


@pytest.mark.parametrize("dtype", CONV_DTYPES, ids=str)
@pytest.mark.parametrize("layout_name", LAYOUTS)
@pytest.mark.parametrize("case", ODD_CASES, ids=str)
def test_conv_fwd(case, layout_name, dtype):
    for with_bn, with_residual, want_stats in FWD_VARIANTS[layout_name]:
        check_conv_fwd(triton_ops, case, dtype, DEVICE, layout_name, with_bn, with_residual, want_stats)


@pytest.mark.parametrize("dtype", CONV_DTYPES, ids=str)
@pytest.mark.parametrize("layout_name", LAYOUTS)
@pytest.mark.parametrize("case", ODD_CASES, ids=str)
def test_conv_dgrad(case, layout_name, dtype):
    check_conv_dgrad(triton_ops, case, dtype, DEVICE, layout_name, with_bn=True)
    check_conv_dgrad(triton_ops, case, dtype, DEVICE, layout_name, with_bn=False)


@pytest.mark.parametrize("dtype", CONV_DTYPES, ids=str)
@pytest.mark.parametrize("layout_name", LAYOUTS)
@pytest.mark.parametrize("case", ODD_CASES, ids=str)
def test_conv_wgrad(case, layout_name, dtype):
    check_conv_wgrad(triton_ops, case, dtype, DEVICE, layout_name, with_bn=True)
    check_conv_wgrad(triton_ops, case, dtype, DEVICE, layout_name, with_bn=False)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("layout_name", LAYOUTS)
@pytest.mark.parametrize("momentum", [0.1, None])
def test_bn_stats_finalize(layout_name, momentum, dtype):
    check_bn_stats_finalize(triton_ops, (3, 17, 9, 9), dtype, DEVICE, layout_name, momentum=momentum)
    check_bn_stats_finalize(triton_ops, (1, 3, 7, 7), dtype, DEVICE, layout_name, affine=False)


def test_bn_finalize_of_many_tiles():
    check_bn_stats_finalize(triton_ops, MANY_TILES, F32, DEVICE, "channels_last")


@pytest.mark.parametrize("layout_name", LAYOUTS)
@pytest.mark.parametrize("case", ODD_CASES[:3], ids=str)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_bn_backward(case, layout_name, training, dtype):
    check_bn_backward(triton_ops, case, dtype, DEVICE, layout_name, training, with_residual=True)
    check_bn_backward(triton_ops, case, dtype, DEVICE, layout_name, training, with_residual=False)


def _naive_variance(y: torch.Tensor) -> torch.Tensor:
    """E[y^2] - E[y]^2 per channel in float32: what the partials avoid."""
    y = y.to(F32)
    return (y * y).mean((0, 2, 3)) - y.mean((0, 2, 3)) ** 2


@pytest.mark.parametrize("layout_name", LAYOUTS)
def test_bn_stats_accurate_when_mean_is_1000x_std(layout_name):
    # Channel values 0.5 * randn + 500 + c: |mean| >= 1000 x std.
    check_bn_stats_finalize(triton_ops, (3, 17, 9, 9), F32, DEVICE, layout_name, offset=500.0)


def test_conv_stats_accurate_when_mean_is_1000x_std():
    """Statistics of a conv output whose residual shifts it to |mean| = 1000 x std."""
    case = ConvCase(3, 17, 64, 9, 9, 3, 1)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(case.n, case.cin, case.h, case.w, generator=g, dtype=F32).to(DEVICE)
    w = (torch.randn(case.cout, case.cin, 3, 3, generator=g, dtype=F32) * 0.05).to(DEVICE)
    residual = torch.full((case.n, case.cout, case.h, case.w), 1000.0, device=DEVICE)
    y, partials = triton_ops.conv_fwd(x, w, 1, 1, None, None, residual, True)
    y64 = y.to(torch.float64).cpu()
    var64 = y64.var((0, 2, 3), unbiased=False)
    assert y64.mean() / var64.sqrt().max() > 1000
    count, mean, m2 = merged_stats(partials)
    assert rel_error(m2 / count, var64) < 1e-4
    assert rel_error(mean, y64.mean((0, 2, 3))) < 1e-6
    # The naive formula loses the variance at this offset: the test would catch it.
    assert rel_error(_naive_variance(y), var64) > 1e-2


def test_explicit_and_default_configurations(monkeypatch):
    """The launch paths beside autotuning: a given configuration, and the first fitting one (AUTOTUNE off)."""
    from preact_fused.triton import conv

    case = ODD_CASES[1]
    t = cast(make_inputs(case, F32, DEVICE), F32, DEVICE, "channels_last")
    bn = (t["scale"], t["shift"])

    def run(conv_config=None, wgrad_config=None):
        y, partials = conv.conv_fwd(t["x"], t["w"], case.stride, case.padding, *bn, t["residual"], True,
                                    config=conv_config)
        g, sums = conv.conv_dgrad(t["dy"], t["w"], t["x"], case.stride, case.padding, *bn, t["mean"],
                                  config=conv_config)
        dw = conv.conv_wgrad(t["x"], t["dy"], t["w"].shape, case.stride, case.padding, *bn, config=wgrad_config)
        return y, partials, g, sums, dw

    autotuned = run()
    pinned = run(conv.CONV_CONFIGS[-1], conv.WGRAD_CONFIGS[-1])
    monkeypatch.setattr(conv, "AUTOTUNE", False)
    default = run()
    for a, b, c in zip(autotuned, pinned, default):
        assert rel_error(b, a) < 1e-5 and rel_error(c, a) < 1e-5


@pytest.mark.parametrize("precision", ["ieee", "tf32", None])
def test_tile_prune(precision):
    """The GPU tile rules (conv.py): channel blocks fitted to the channel counts; register limits by
    precision (exact fp32: reduction 16, free rows 64; TF32: reduction 32) and by channel alignment
    (counts that are not multiples of 16: reduction 32, free rows 64); tensor cores: free reduction
    blocks (wgrad's pixels) of at least 32."""
    import triton

    from preact_fused.triton import conv

    configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k})
               for m in (16, 64, 128) for n in (16, 32, 64, 128) for k in (16, 32, 64)]

    def blocks(fit, **args):
        kept = fit(configs, {"PRECISION": precision, **args})
        return {name: sorted({c.kwargs[name] for c in kept}) for name in ("BLOCK_M", "BLOCK_N", "BLOCK_K")}

    max_k = {"ieee": 16, "tf32": 32}.get(precision, 64)
    free_m = [16, 64] if precision == "ieee" else [16, 64, 128]
    assert blocks(conv._CONV_FIT, N_out=256, K_ch=64) == {"BLOCK_M": free_m, "BLOCK_N": [128], "BLOCK_K": [max_k]}
    assert blocks(conv._CONV_FIT, N_out=16, K_ch=3) == {"BLOCK_M": [16, 64], "BLOCK_N": [16], "BLOCK_K": [16]}
    assert blocks(conv._CONV_FIT, N_out=17, K_ch=100) == {"BLOCK_M": [16, 64], "BLOCK_N": [32],
                                                          "BLOCK_K": [min(max_k, 32)]}
    pixels = [16] if precision == "ieee" else [32] if precision == "tf32" else [32, 64]
    assert blocks(conv._WGRAD_FIT, Cin=64, Cout=256) == {"BLOCK_M": [64], "BLOCK_N": [128], "BLOCK_K": pixels}
    assert blocks(conv._WGRAD_FIT, Cin=33, Cout=256)["BLOCK_K"] == ([16] if precision == "ieee" else [32])


def test_autotuning_once_per_problem_and_never_while_capturing(monkeypatch):
    """The autotuner runs on a problem's first launch only; while a CUDA graph is captured (timing
    would synchronise) the first fitting configuration runs untimed and nothing is remembered."""
    from triton.runtime.autotuner import Autotuner

    from preact_fused.triton import conv

    tuned = []
    original = Autotuner.run

    def counted(self, *args, **kwargs):
        tuned.append(self.fn.__name__)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Autotuner, "run", counted)
    monkeypatch.setattr(conv, "_chosen", {})
    case = ODD_CASES[1]
    t = cast(make_inputs(case, F32, DEVICE), F32, DEVICE, "channels_last")

    def forward():
        return conv.conv_fwd(t["x"], t["w"], case.stride, case.padding, t["scale"], t["shift"], None, True)

    monkeypatch.setattr(conv, "_capturing", lambda args: True)
    captured = forward()
    assert tuned == [] and conv._chosen == {}
    monkeypatch.setattr(conv, "_capturing", lambda args: False)
    first, again = forward(), forward()
    assert tuned == ["_conv_kernel"] and len(conv._chosen) == 1
    for a, b, c in zip(captured, first, again):
        assert torch.equal(a, b) and torch.equal(b, c)


def test_unavailable_reason():
    assert triton_ops.unavailable_reason(DEVICE) is None
    assert "not meta" in triton_ops.unavailable_reason("meta")


def test_fp32_precision_setting():
    assert triton_ops.fp32_precision() == "ieee"
    with pytest.raises(ValueError):
        triton_ops.set_fp32_precision("fp16")
    triton_ops.set_fp32_precision("tf32")
    try:
        check_conv_fwd(triton_ops, ODD_CASES[0], F32, DEVICE, "channels_last", True, True, True, tf32=True)
    finally:
        triton_ops.set_fp32_precision("ieee")


def test_float64_is_rejected_clearly():
    x = torch.zeros(1, 3, 4, 4, dtype=torch.float64, device=DEVICE)
    with pytest.raises(TypeError, match="backend='reference'"):
        triton_ops.conv_fwd(x, torch.zeros(3, 3, 1, 1, dtype=torch.float64, device=DEVICE), 1, 0)


def _opcheck_samples():
    g = torch.Generator().manual_seed(4)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(DEVICE)

    x = rand(2, 5, 5, 5).to(memory_format=torch.channels_last)
    w, dy = rand(3, 5, 3, 3), rand(2, 3, 3, 3)
    scale, shift, mean, invstd = rand(5), rand(5), rand(5), rand(5).abs()
    ops = torch.ops.preact_fused_triton
    return {
        "conv_fwd_bn_residual_stats": (ops.conv_fwd, (x, w, 2, 1, scale, shift, rand(2, 3, 3, 3), True, False)),
        "conv_fwd_plain": (ops.conv_fwd, (x, w, 2, 1, None, None, None, False, False)),
        "bn_stats": (ops.bn_stats, (x,)),
        "bn_finalize": (ops.bn_finalize, (triton_ops.bn_stats(x), rand(5), rand(5), 1e-5, rand(5), rand(5).abs(),
                                          None, torch.tensor(2, device=DEVICE))),
        "conv_dgrad": (ops.conv_dgrad, (dy, w, x, 2, 1, scale, shift, mean, False)),
        "conv_wgrad": (ops.conv_wgrad, (x, dy, [3, 5, 3, 3], 2, 1, scale, shift, False)),
        "bn_backward": (ops.bn_backward, (x, x, mean, invstd, scale, rand(5), rand(5), True, x)),
    }


@pytest.mark.parametrize("name", ["conv_fwd_bn_residual_stats", "conv_fwd_plain", "bn_stats", "bn_finalize",
                                  "conv_dgrad", "conv_wgrad", "bn_backward"])
def test_opcheck(name):
    op, args = _opcheck_samples()[name]
    torch.library.opcheck(op, args)


def test_fake_outputs_are_channels_last():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        x = mode.from_tensor(torch.randn(2, 5, 7, 7))
        w = mode.from_tensor(torch.randn(4, 5, 3, 3))
        y, partials = torch.ops.preact_fused_triton.conv_fwd(x, w, 2, 1, None, None, None, True, False)
        g, sums = torch.ops.preact_fused_triton.conv_dgrad(y, w, x, 2, 1, None, None, None, False)
    assert y.shape == (2, 4, 4, 4) and y.is_contiguous(memory_format=torch.channels_last)
    assert partials.shape[0] == 3 and partials.shape[2] == 4
    assert g.shape == x.shape and g.is_contiguous(memory_format=torch.channels_last)
    assert sums.shape == (2, 5)


def _contract_step(x, w, gamma, beta, running_mean, running_var, dy):
    """One forward and backward of a BN-ReLU-conv triple through the six contract functions."""
    partials = triton_ops.bn_stats(x)
    mean, invstd, scale, shift = triton_ops.bn_finalize(partials, gamma, beta, 1e-5, running_mean, running_var)
    y, y_partials = triton_ops.conv_fwd(x, w, 2, 1, scale, shift, None, True)
    g, sum_g, sum_gx = triton_ops.conv_dgrad(dy, w, x, 2, 1, scale, shift, mean)
    dw = triton_ops.conv_wgrad(x, dy, w.shape, 2, 1, scale, shift)
    dx = triton_ops.bn_backward(g, x, mean, invstd, scale, sum_g, sum_gx, True, None)
    return y, y_partials, dx, dw


def test_compiled_contract_ops_have_no_graph_breaks():
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 5, 7, 7, generator=g).to(DEVICE, memory_format=torch.channels_last)
    args = (x, torch.randn(4, 5, 3, 3, generator=g).to(DEVICE), torch.rand(5, generator=g).to(DEVICE) + 0.5,
            torch.randn(5, generator=g).to(DEVICE), torch.zeros(5, device=DEVICE), torch.ones(5, device=DEVICE),
            torch.randn(2, 4, 4, 4, generator=g).to(DEVICE, memory_format=torch.channels_last))
    explanation = torch._dynamo.explain(_contract_step)(*[a.clone() for a in args])
    assert explanation.graph_break_count == 0, explanation.break_reasons
    eager_args = [a.clone() for a in args]
    compiled_args = [a.clone() for a in args]
    eager = _contract_step(*eager_args)
    compiled = torch.compile(_contract_step, backend="aot_eager", fullgraph=True)(*compiled_args)
    for a, b in zip(eager + tuple(eager_args[4:6]), compiled + tuple(compiled_args[4:6])):
        assert torch.equal(a, b)
    assert compiled[0].is_contiguous(memory_format=torch.channels_last)


def test_compiled_block_has_no_graph_breaks():
    torch._dynamo.reset()
    block = PreActBottleneck(16, 4, stride=2, backend="triton").to(DEVICE)
    x = torch.randn(2, 16, 8, 8, device=DEVICE).to(memory_format=torch.channels_last)
    explanation = torch._dynamo.explain(block)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons


def _tiny_resnet(block, backend):
    """A CIFAR-style pre-act ResNet: bottleneck depth 11 (widths 4/8/16 -> 16/32/64 channels) or basic depth 14."""
    torch.manual_seed(0)
    blocks = (1, 1, 1) if block is PreActBottleneck else (2, 2, 2)
    return PreActResNet(block, blocks, (4, 8, 16), (1, 2, 2), 10, _CifarStem(16), True, backend).to(DEVICE)


@pytest.mark.parametrize("block", [PreActBottleneck, PreActBasicBlock], ids=["bottleneck11", "basic14"])
def test_training_matches_reference(block):
    models = {name: _tiny_resnet(block, name) for name in ("reference", "triton")}
    models["triton"].load_state_dict(models["reference"].state_dict())
    optims = {name: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for name, m in models.items()}
    g = torch.Generator().manual_seed(5)
    for step in range(2):
        x = torch.randn(2, 3, 8, 8, generator=g).to(DEVICE, memory_format=torch.channels_last)
        target = torch.randint(0, 10, (2,), generator=g).to(DEVICE)
        losses = {}
        for name, model in models.items():
            optims[name].zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x), target)
            loss.backward()
            optims[name].step()
            losses[name] = loss.detach()
        assert rel_error(losses["triton"], losses["reference"]) < 1e-5, f"step {step}: loss"
        ref_params = dict(models["reference"].named_parameters())
        for pname, param in models["triton"].named_parameters():
            assert rel_error(param.grad, ref_params[pname].grad) < 1e-4, f"step {step}: grad of {pname}"
    ref_buffers = dict(models["reference"].named_buffers())
    for bname, buf in models["triton"].named_buffers():
        if buf.is_floating_point():
            assert rel_error(buf, ref_buffers[bname]) < 1e-5, f"running stat {bname}"
        else:
            assert torch.equal(buf, ref_buffers[bname]), bname


def test_bn_relu_conv_module_momentum_none_matches_reference():
    """The drop-in module with the cumulative running average (momentum=None), eval mode included."""
    torch.manual_seed(1)
    modules = {name: BNReLUConv2d(17, 8, 3, padding=1, momentum=None, backend=name).to(DEVICE)
               for name in ("reference", "triton")}
    modules["triton"].load_state_dict(modules["reference"].state_dict())
    for _ in range(2):
        x = (torch.randn(3, 17, 7, 7) * 2 + 1).to(DEVICE)
        outs = {name: m(x) for name, m in modules.items()}
        assert rel_error(outs["triton"], outs["reference"]) < 1e-4
    for module in modules.values():
        module.eval()
    x = torch.randn(3, 17, 7, 7).to(DEVICE)
    assert rel_error(modules["triton"](x), modules["reference"](x)) < 1e-4
    assert rel_error(modules["triton"].bn.running_var, modules["reference"].bn.running_var) < 1e-5
