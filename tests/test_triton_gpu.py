"""The Triton backend on a GPU: ResNet-1001 shapes in fp32 and bf16, every tile configuration,
torch.compile and CUDA graphs. Skipped without a GPU (marker ``cuda``).

Tolerances are those of tests/backend_checks.py (fp32 1e-4 with exact fp32 products, TF32 2e-3,
bf16 twice PyTorch's own bf16 error + 1e-3). The conformance suite (tests/test_conformance.py) runs
the odd sizes on the GPU as well. cuDNN's TF32 is pinned off so PyTorch's fp32 results
used as the bf16 yardstick are exact fp32.

The shape checks run with autotuning off (the first fitting configuration, see conv.AUTOTUNE): each
autotuned shape would time several configurations, and ``test_every_configuration`` checks every
configuration the autotuner may pick anyway.
"""
import pytest
import torch

from backend_checks import (RESNET1001_TRIPLES, ConvCase, check_bn_backward, check_bn_fold, check_bn_stats,
                            check_compiled_unit, check_conv_dgrad, check_conv_fwd, check_conv_wgrad,
                            check_conv_wgrad_bn_backward, check_on_second_device, check_reruns_identical, make_triple,
                            rel_error, resnet1001_case, to_backend)
from preact_fused import contract
from preact_fused.shapes import triple_roles

pytestmark = [pytest.mark.cuda, pytest.mark.usefixtures("exact_cudnn")]

DTYPES = [torch.float32, torch.bfloat16]
BATCHES = [64, 128]


@pytest.fixture(scope="module")
def ops():
    import preact_fused.triton as triton_ops

    return triton_ops


@pytest.fixture
def no_autotune(monkeypatch):
    from preact_fused.triton import conv

    monkeypatch.setattr(conv, "AUTOTUNE", False)


@pytest.mark.slow
@pytest.mark.usefixtures("no_autotune")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("triple", RESNET1001_TRIPLES, ids=lambda t: t[0])
def test_resnet1001_triple(ops, triple, batch, dtype):
    name, case, roles = triple[0], resnet1001_case(triple, batch), triple_roles(triple[0])
    with_bn = roles["with_bn"]
    mode = "none" if not with_bn else "fold" if name.endswith("shortcut") else "update"
    check_conv_fwd(ops, case, dtype, "cuda", "channels_last", mode, with_residual=roles["with_residual"],
                   want_stats=roles["want_stats"])
    check_conv_dgrad(ops, case, dtype, "cuda", "channels_last", True, with_bn=with_bn)
    check_conv_wgrad(ops, case, dtype, "cuda", "channels_last", True, with_bn=with_bn)
    if roles["next_bn"]:
        check_conv_wgrad_bn_backward(ops, case, dtype, "cuda", "channels_last", True)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(128, 64, 32, 32), (64, 256, 8, 8)], ids=str)
def test_resnet1001_statistics_and_bn_backward(ops, shape, dtype):
    check_bn_stats(ops, shape, dtype, "cuda", "channels_last")
    check_bn_stats(ops, shape, dtype, "cuda", "channels_last", offset=500.0)  # |mean| >= 1000 x std
    for mode in ("update", "update_cumulative", "running"):
        check_bn_fold(ops, shape[1], dtype, "cuda", mode)
    case = ConvCase(shape[0], shape[1], shape[1], shape[2], shape[3], 1, 1)
    check_bn_backward(ops, case, dtype, "cuda", "channels_last", training=True, with_residual=True)
    check_bn_backward(ops, case, dtype, "cuda", "nchw", training=False, with_residual=False)


def test_reruns_are_bit_identical(ops):
    check_reruns_identical(ops, torch.float32, "cuda")
    check_reruns_identical(ops, torch.bfloat16, "cuda")


class PinnedConfig:
    """The conv ops of the triton backend launched with one tile configuration."""

    def __init__(self, conv_config=None, wgrad_config=None):
        from preact_fused.triton import conv

        self.conv, self.conv_config, self.wgrad_config = conv, conv_config, wgrad_config

    def conv_fwd(self, x, weight, stride, padding, **kwargs):
        y, stats, fold = self.conv.conv_fwd(x, weight, stride, padding, **kwargs, config=self.conv_config)
        return contract.keep_format(y, x), contract.optional(stats), contract.optional(fold)

    def conv_dgrad(self, dy, weight, x, stride, padding, fold=None):
        g, sums = self.conv.conv_dgrad(dy, weight, x, stride, padding, fold, config=self.conv_config)
        return contract.keep_format(g, dy), contract.optional(sums)

    def conv_wgrad(self, x, dy, weight, stride, padding, fold=None):
        return self.conv.conv_wgrad(x, dy, weight, stride, padding, fold, config=self.wgrad_config)

    def __getattr__(self, name):  # bn_stats, bn_fold, bn_backward: the backend's own
        import preact_fused.triton as triton_ops

        return getattr(triton_ops, name)


def _config_ids(configs):
    return [f"{c.kwargs['BLOCK_M']}x{c.kwargs['BLOCK_N']}x{c.kwargs['BLOCK_K']}-w{c.num_warps}-s{c.num_stages}"
            for c in configs]


def _all_configs(name):
    """The GPU configuration list (empty where there is no GPU: the tests are skipped there, and
    importing the kernels at collection would fix their mode before the interpreter is chosen)."""
    if not torch.cuda.is_available():
        return []
    from preact_fused.triton import conv

    return getattr(conv, name)


# Channel counts that are not multiples of any tile (several tiles plus a remainder on both GEMM
# edges), a 3x3 stride-2 tap loop, and enough pixels for several wgrad splits.
CONFIG_CASE = ConvCase(16, 80, 48, 15, 15, 3, 2)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("config", _all_configs("CONV_CONFIGS"), ids=_config_ids(_all_configs("CONV_CONFIGS")))
def test_every_conv_configuration(config, dtype):
    pinned = PinnedConfig(conv_config=config)
    check_conv_fwd(pinned, CONFIG_CASE, dtype, "cuda", "channels_last", "update", True, True)
    check_conv_fwd(pinned, CONFIG_CASE, dtype, "cuda", "channels_last", "running", False, False)
    check_conv_dgrad(pinned, CONFIG_CASE, dtype, "cuda", "channels_last", True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("config", _all_configs("WGRAD_CONFIGS"), ids=_config_ids(_all_configs("WGRAD_CONFIGS")))
def test_every_wgrad_configuration(config, dtype):
    check_conv_wgrad(PinnedConfig(wgrad_config=config), CONFIG_CASE, dtype, "cuda", "channels_last", True)
    check_conv_wgrad(PinnedConfig(wgrad_config=config), CONFIG_CASE, dtype, "cuda", "nchw", True, with_bn=False)


@pytest.mark.usefixtures("no_autotune")
def test_tf32_option(ops):
    case = resnet1001_case(RESNET1001_TRIPLES[6], 64)
    ops.set_fp32_precision("tf32")
    try:
        check_conv_fwd(ops, case, torch.float32, "cuda", "channels_last", "update", False, True, tf32=True)
        check_conv_dgrad(ops, case, torch.float32, "cuda", "channels_last", True, tf32=True)
        check_conv_wgrad(ops, case, torch.float32, "cuda", "channels_last", True, tf32=True)
    finally:
        ops.set_fp32_precision("ieee")


def _step_inputs(dtype, seed=0):
    case = ConvCase(8, 64, 64, 16, 16, 3, 2)
    t = make_triple(case, seed)
    cl = (lambda v: to_backend(v, dtype, "cuda", "channels_last"))
    return (cl(t.x), t.w.to("cuda", torch.float32), t.gamma.to("cuda", torch.float32),
            t.beta.to("cuda", torch.float32), torch.zeros(64, device="cuda"), torch.ones(64, device="cuda"),
            cl(t.dy))


def _contract_step(ops, x, w, gamma, beta, running_mean, running_var, dy):
    stats = ops.bn_stats(x)
    y, y_stats, fold = ops.conv_fwd(x, w, 2, 1, stats=stats, gamma=gamma, beta=beta, running_mean=running_mean,
                                    running_var=running_var, update_running=True, want_stats=True)
    g, sums = ops.conv_dgrad(dy, w, x, 2, 1, fold)
    dw = ops.conv_wgrad(x, dy, w, 2, 1, fold)
    dx = ops.bn_backward(g, x, fold, sums, x.numel() // x.shape[1], True, None)
    return y, y_stats, dx, dw


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_graph_capture(ops, dtype):
    static = _step_inputs(dtype)
    _contract_step(ops, *[t.clone() for t in static])  # autotune and compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = _contract_step(ops, *static)
    fresh = _step_inputs(dtype, seed=1)
    for dst, src in zip(static, fresh):
        dst.copy_(src)
    graph.replay()
    expected = _contract_step(ops, *fresh)
    for a, b in zip(outputs + static[4:6], expected + fresh[4:6]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_torch_compile_of_the_ops(ops, dtype):
    torch._dynamo.reset()
    args = _step_inputs(dtype)
    explanation = torch._dynamo.explain(lambda *a: _contract_step(ops, *a))(*[t.clone() for t in args])
    assert explanation.graph_break_count == 0, explanation.break_reasons
    compiled = torch.compile(lambda *a: _contract_step(ops, *a), fullgraph=True)
    eager_args, compiled_args = [t.clone() for t in args], [t.clone() for t in args]
    for a, b in zip(_contract_step(ops, *eager_args), compiled(*compiled_args)):
        assert rel_error(b, a) < 1e-6
    assert rel_error(compiled_args[5], eager_args[5]) < 1e-6


def test_compiled_unit(ops):
    torch._dynamo.reset()
    check_compiled_unit(ops, "cuda")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_tensors_on_another_gpu(ops):
    check_on_second_device(ops)
