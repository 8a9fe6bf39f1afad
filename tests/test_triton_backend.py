"""The Triton backend beyond the conformance suite (tests/test_conformance.py checks its numerics):
one kernel launch per op and no other work, the schemas, the in-launch reduction trees (several
groups, a partial last group, several column blocks; wgrad with several splits), bit-identical
reruns, empty inputs, weights in any layout and dtype, autotuning, torch.library and torch.compile.

Without a GPU the kernels run under the Triton interpreter (TRITON_INTERPRET=1, set before Triton
is imported; small fixed tiles, reduction groups of 4 tiles, wgrad in 3 splits); with one they run
on it. bf16 convolutions and the ResNet-1001 shapes are in test_triton_gpu.py.
"""
import collections
import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

pytest.importorskip("triton")

import torch.nn.functional as F  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes  # noqa: E402

import preact_fused.triton as triton_ops  # noqa: E402
from preact_fused import contract, reference  # noqa: E402
from preact_fused.triton import common, conv, launch, ops  # noqa: E402

from backend_checks import (check_compiled_unit, opcheck_samples, poisoned_allocations,  # noqa: E402
                            rel_error)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
F32, F16 = torch.float32, torch.float16

pytestmark = [
    pytest.mark.triton_interp,
    pytest.mark.usefixtures("exact_cudnn"),
    pytest.mark.skipif(triton_ops.unavailable_reason(DEVICE) is not None,
                       reason=f"triton backend unavailable: {triton_ops.unavailable_reason(DEVICE)}"),
]


def _rand(*shape, seed=0, scale=1.0, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64) * scale + offset


def _cl(t, dtype=F32):
    return t.to(device=DEVICE, dtype=dtype).contiguous(memory_format=torch.channels_last)


def _vec(t):
    return t.to(device=DEVICE, dtype=F32)


def _bn_inputs(c, seed=1):
    return _rand(c, seed=seed, scale=0.5, offset=1.0), _rand(c, seed=seed + 1, scale=0.5)


# ---- the schemas and the functions ---------------------------------------------------------------

@pytest.mark.parametrize("name", contract.OPS)
def test_op_schemas_are_the_contract(name):
    op = getattr(torch.ops.preact_fused_triton, name).default
    expected = torch._C.parse_schema(f"preact_fused_triton::{contract.SCHEMAS[name]}")
    assert str(op._schema) == str(expected)


# ---- one launch per op, no other work ------------------------------------------------------------

# ATen ops that launch no kernel: allocation, views and metadata.
_NO_WORK = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "view", "_unsafe_view",
            "as_strided", "t", "permute", "expand", "transpose", "unsqueeze", "squeeze", "detach", "alias",
            "slice", "select", "lift_fresh", "is_same_size"}


class _Work(TorchDispatchMode):
    """Counts ATen ops that do work (the Triton launches themselves are counted apart)."""

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types_, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name not in _NO_WORK:
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))


@pytest.fixture
def launches(monkeypatch):
    """Counts Triton kernel launches by kernel name (ATen work of the interpreter's launcher excluded)."""
    from triton.runtime.jit import JITFunction

    counted = collections.Counter()
    classes = [JITFunction]
    if common.INTERPRET:
        from triton.runtime.interpreter import InterpretedFunction
        classes.append(InterpretedFunction)
    for cls in classes:
        original = cls.run

        def run(self, *args, _original=original, **kwargs):
            counted[getattr(self, "__name__", None) or self.fn.__name__] += 1
            with _disable_current_modes():
                return _original(self, *args, **kwargs)
        monkeypatch.setattr(cls, "run", run)
    direct = launch._Compiled.__call__  # on a GPU, a plan's later launches bypass JITFunction.run

    def run_compiled(self, *args):
        counted[self._kernel.name] += 1
        return direct(self, *args)
    monkeypatch.setattr(launch._Compiled, "__call__", run_compiled)
    return counted


def _one_of_each():
    """Inputs of every op in each of its forms, channels_last and in the right dtype (no copies due)."""
    n, cin, cout, h = 2, 5, 7, 6
    x = _cl(_rand(n, cin, h, h, offset=0.5))
    w = _rand(cout, cin, 3, 3, seed=2).to(DEVICE, F32)
    dy = _cl(_rand(n, cout, 3, 3, seed=3))
    res = _cl(_rand(n, cout, 3, 3, seed=4))
    gamma, beta = (_vec(v) for v in _bn_inputs(cin))
    stats = reference.bn_stats(x)
    fold = reference.bn_fold(stats, gamma, beta)
    sums = torch.randn(3, cin, device=DEVICE)
    next_fold = reference.bn_fold(reference.bn_stats(res))  # a BN after the conv (input res)
    next_sums = torch.randn(3, cout, device=DEVICE)

    def running():
        return dict(running_mean=torch.zeros(cin, device=DEVICE), running_var=torch.ones(cin, device=DEVICE),
                    num_batches_tracked=torch.tensor(2, device=DEVICE))

    return {
        "conv_fwd/stats": ("conv_fwd", (x, w, 2, 1, stats, None, gamma, beta, *running().values(), 1e-5, None, True,
                                        res, True)),
        "conv_fwd/fold": ("conv_fwd", (x, w, 2, 1, None, fold, None, None, None, None, None, 1e-5, 0.1, False,
                                       None, True)),
        "conv_fwd/running": ("conv_fwd", (x, w, 2, 1, None, None, gamma, beta, *list(running().values())[:2], None,
                                          1e-5, 0.1, False, res, False)),
        "conv_fwd/plain": ("conv_fwd", (x, w, 2, 1, None, None, None, None, None, None, None, 1e-5, 0.1, False,
                                        None, False)),
        "bn_stats": ("bn_stats", (x,)),
        "bn_fold/update": ("bn_fold", (stats, gamma, beta, *running().values(), 1e-5, 0.1, True)),
        "bn_fold/running": ("bn_fold", (None, gamma, beta, *list(running().values())[:2], None, 1e-5, 0.1, False)),
        "conv_dgrad/bn": ("conv_dgrad", (dy, w, x, 2, 1, fold)),
        "conv_dgrad/plain": ("conv_dgrad", (dy, w, x, 2, 1, None)),
        "conv_wgrad/bn": ("conv_wgrad", (x, dy, w, 2, 1, fold)),
        "conv_wgrad/plain": ("conv_wgrad", (x, dy, w.contiguous(memory_format=torch.channels_last), 2, 1, None)),
        "conv_wgrad_bn_backward/training": ("conv_wgrad_bn_backward", (x, dy, w, 2, 1, fold, res, next_fold,
                                                                       next_sums, 18.0, True)),
        "conv_wgrad_bn_backward/eval": ("conv_wgrad_bn_backward", (x, dy, w, 2, 1, None, res, next_fold, next_sums,
                                                                   18.0, False)),
        "bn_backward/training": ("bn_backward", (x, x, fold, sums, 72.0, True, x)),
        "bn_backward/eval": ("bn_backward", (x, x, fold, sums, 72.0, False, None)),
    }


@pytest.mark.parametrize("form", list(_one_of_each()))
def test_each_op_is_one_launch_and_nothing_else(form, launches):
    name, args = _one_of_each()[form]
    impl = ops.IMPLS[name]
    impl(*args)  # the first call of a problem may tune (a remembered choice) and allocate the semaphores
    launches.clear()
    work = _Work()
    with work:
        impl(*args)
    assert sum(launches.values()) == 1, dict(launches)
    assert not work.ops, f"{form}: ATen work beside the kernel: {dict(work.ops)}"
    launches.clear()
    getattr(torch.ops.preact_fused_triton, name)(*args)
    assert sum(launches.values()) == 1, dict(launches)


# ---- reduction trees -----------------------------------------------------------------------------

def _assert_summary(stats, of):
    of = of.detach().to(torch.float64).cpu()
    s = stats.to(torch.float64).cpu()
    var, mean = torch.var_mean(of, (0, 2, 3), unbiased=False)
    assert torch.equal(s[0], torch.full_like(mean, of.numel() // of.shape[1]))
    assert rel_error(s[1] + s[2], mean) < 1e-5
    assert rel_error(s[3] / s[0], var) < 1e-5


def _semaphores_are_zero():
    return all(int(buf.abs().sum()) == 0 for buf in common._SEMAPHORES.values())


# Row counts giving several reduction groups and a partial last one on the interpreter's tiles
# (32-row conv tiles, 16-row bn_stats tiles, groups of 4), two column blocks (C > 32 / > 16).
@pytest.mark.parametrize("dtype", [F32, F16], ids=str)
def test_conv_statistics_over_many_tile_groups(dtype):
    n, cin, cout, h = 2, 9, 40, 12  # 288 rows: 9 tiles in 3 groups, the last partial
    x = _cl(_rand(n, cin, h, h, offset=3.0), dtype)
    w = _rand(cout, cin, 1, 1, seed=2).to(DEVICE, F32)
    res = _cl(_rand(n, cout, h, h, seed=3, offset=100.0), dtype)  # |mean| >> std
    gamma, beta = (_vec(v) for v in _bn_inputs(cin))
    stats = triton_ops.bn_stats(x)
    with poisoned_allocations(DEVICE):
        y, y_stats, fold = triton_ops.conv_fwd(x, w, 1, 0, stats=stats, gamma=gamma, beta=beta, residual=res,
                                               want_stats=True)
    _assert_summary(y_stats, y)
    _assert_summary(stats, x)
    y64, _, fold64 = reference.conv_fwd(x.double(), w.double(), 1, 0, stats=stats.double(), gamma=gamma.double(),
                                        beta=beta.double(), residual=res.double())
    assert rel_error(fold, fold64) < 1e-5
    assert rel_error(y, y64) < (1e-5 if dtype == F32 else 2e-3)
    assert _semaphores_are_zero()


@pytest.mark.parametrize("dtype", [F32, F16], ids=str)
def test_dgrad_sums_over_many_tile_groups(dtype):
    n, cin, cout, h = 2, 40, 6, 12  # 288 rows, Cin = 40: two column blocks
    x = _cl(_rand(n, cin, h, h, offset=0.5), dtype)
    w = _rand(cout, cin, 3, 3, seed=2).to(DEVICE, F32)
    dy = _cl(_rand(n, cout, h, h, seed=3), dtype)
    fold = reference.bn_fold(reference.bn_stats(x), *(_vec(v) for v in _bn_inputs(cin)))
    with poisoned_allocations(DEVICE):
        g, sums = triton_ops.conv_dgrad(dy, w, x, 1, 1, fold)
    g64, sums64 = reference.conv_dgrad(dy.double(), w.double(), x.double(), 1, 1, fold.double())
    tol = 1e-5 if dtype == F32 else 2e-3
    assert rel_error(g, g64) < tol
    for q in range(3):
        assert rel_error(sums[q], sums64[q]) < tol
    assert _semaphores_are_zero()


def test_bn_stats_over_many_tile_groups():
    x = _cl(_rand(2, 17, 9, 9, offset=50.0))  # 162 rows: 11 tiles, 3 groups, two column blocks
    with poisoned_allocations(DEVICE):
        stats = triton_ops.bn_stats(x)
    _assert_summary(stats, x)
    assert torch.equal(stats[1].cpu(), x[0, :, 0, 0].cpu())  # pivot: the first row
    assert _semaphores_are_zero()


@pytest.mark.parametrize("layout_name", ["channels_last", "nchw", "noncontiguous"])
def test_wgrad_in_several_splits(layout_name):
    n, cin, cout, h = 3, 17, 5, 9
    pixels = n * h * h
    tiles = 9 * common.cdiv(cin, 32) * common.cdiv(cout, 32)
    chunk, splits = conv._wgrad_split(pixels, tiles, torch.device(DEVICE))
    assert splits > 1 or not common.INTERPRET
    x64, dy64 = _rand(n, cin, h, h, offset=0.5), _rand(n, cout, h, h, seed=3)
    x, dy = _layout(x64, layout_name), _layout(dy64, layout_name)
    fold = reference.bn_fold(reference.bn_stats(x), *(_vec(v) for v in _bn_inputs(cin)))
    # a channels_last weight: dW comes back in its memory format (no copy when autograd accumulates it)
    w = torch.empty(cout, cin, 3, 3, device=DEVICE).contiguous(memory_format=torch.channels_last)
    with poisoned_allocations(DEVICE):
        dw = triton_ops.conv_wgrad(x, dy, w, 1, 1, fold)
    assert dw.stride() == w.stride()
    dw64 = reference.conv_wgrad(x.double(), dy.double(), w.double(), 1, 1, fold.double())
    assert rel_error(dw, dw64) < 1e-5
    assert torch.equal(triton_ops.conv_wgrad(x, dy, w, 1, 1, fold), dw)
    assert _semaphores_are_zero()


def _layout(t64, name, dtype=F32):
    t = t64.to(DEVICE, dtype)
    if name == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if name == "nchw":
        return t.contiguous()
    wide = torch.zeros(*t.shape[:3], 2 * t.shape[3], dtype=dtype, device=DEVICE)
    wide[..., ::2] = t
    return wide[..., ::2]


def test_reruns_are_bit_identical_across_tile_groups():
    x = _cl(_rand(2, 9, 12, 12, offset=0.5))
    w = _rand(40, 9, 3, 3, seed=2).to(DEVICE, F32)
    dy = _cl(_rand(2, 40, 12, 12, seed=3))
    gamma, beta = (_vec(v) for v in _bn_inputs(9))

    def run():
        stats = triton_ops.bn_stats(x)
        y, y_stats, fold = triton_ops.conv_fwd(x, w, 1, 1, stats=stats, gamma=gamma, beta=beta, want_stats=True)
        g, sums = triton_ops.conv_dgrad(dy, w, x, 1, 1, fold)
        dw = triton_ops.conv_wgrad(x, dy, w, 1, 1, fold)
        return stats, y, y_stats, fold, g, sums, dw

    for a, b in zip(run(), run()):
        assert torch.equal(a, b)


# ---- the fold written by one program, running statistics ------------------------------------------

@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("buffer_dtype", [F32, torch.bfloat16], ids=str)
def test_conv_fold_and_running_update_written_once(momentum, buffer_dtype):
    n, cin, cout, h = 3, 40, 40, 7  # several programs on both grid axes
    x = _cl(_rand(n, cin, h, h, offset=0.5))
    w = _rand(cout, cin, 3, 3, seed=2).to(DEVICE, F32)
    gamma, beta = (_vec(v) for v in _bn_inputs(cin))
    stats = triton_ops.bn_stats(x)
    rm, rv = _rand(cin, seed=5).to(DEVICE, buffer_dtype), (_rand(cin, seed=6).abs() + 0.5).to(DEVICE, buffer_dtype)
    nbt = torch.tensor(4, device=DEVICE)
    rm_ref, rv_ref, nbt_ref = rm.clone(), rv.clone(), nbt.clone()
    y, _, fold = triton_ops.conv_fwd(x, w, 1, 1, stats=stats, gamma=gamma, beta=beta, running_mean=rm, running_var=rv,
                                     num_batches_tracked=nbt, momentum=momentum, update_running=True)
    ref_fold = reference.bn_fold(stats, gamma, beta, rm_ref, rv_ref, nbt_ref, 1e-5, momentum, True)
    assert int(nbt) == 5 == int(nbt_ref)
    assert rel_error(fold, ref_fold) < 1e-6
    tol = 1e-5 if buffer_dtype == F32 else 1e-2
    assert rel_error(rm, rm_ref) < tol and rel_error(rv, rv_ref) < tol
    # the same fold from bn_fold, bit for bit
    assert torch.equal(triton_ops.bn_fold(stats, gamma, beta), fold)


# ---- inputs in any layout and dtype, read in place -------------------------------------------------

@pytest.mark.parametrize("dtype", [F32, F16], ids=str)
def test_weights_in_any_layout_and_dtype(dtype):
    """channels_last (what model.to(channels_last) makes of a conv weight) and bf16 weights with
    another activation dtype: read through strides and rounded on load, as weight.to(x.dtype)."""
    x = _cl(_rand(1, 17, 7, 7, offset=0.5), dtype)
    w64 = _rand(3, 17, 3, 3, seed=2)
    fold = reference.bn_fold(reference.bn_stats(x), *(_vec(v) for v in _bn_inputs(17)))
    dy = _cl(_rand(1, 3, 4, 4, seed=3), dtype)
    for w in (w64.to(DEVICE, F32).contiguous(memory_format=torch.channels_last), w64.to(DEVICE, torch.bfloat16)):
        y, _, _ = triton_ops.conv_fwd(x, w, 2, 1, fold=fold)
        y64, _, _ = reference.conv_fwd(x.double(), w.to(dtype).double(), 2, 1, fold=fold.double())
        assert rel_error(y, y64) < (1e-5 if dtype == F32 else 2e-3)
        g, _ = triton_ops.conv_dgrad(dy, w, x, 2, 1, fold)
        g64, _ = reference.conv_dgrad(dy.double(), w.to(dtype).double(), x.double(), 2, 1, fold.double())
        assert rel_error(g, g64) < (1e-5 if dtype == F32 else 2e-3)


def test_mixed_dtype_residual_and_gradient():
    """A float32 residual for fp16 activations, an fp16 dy for fp32 x in wgrad: cast on load."""
    x = _cl(_rand(2, 5, 7, 7, offset=0.5), F16)
    w = _rand(6, 5, 1, 1, seed=2).to(DEVICE, F32)
    res = _cl(_rand(2, 6, 7, 7, seed=3))
    y, _, _ = triton_ops.conv_fwd(x, w, 1, 0, residual=res)
    y64 = F.conv2d(x.double(), w.to(F16).double()) + res.double()
    assert rel_error(y, y64) < 2e-3 and y.dtype == F16


# ---- empty inputs --------------------------------------------------------------------------------

def test_empty_inputs_give_empty_or_neutral_outputs():
    x = _cl(torch.zeros(0, 5, 7, 7, dtype=torch.float64))
    w = torch.randn(6, 5, 3, 3, device=DEVICE)
    gamma, beta = (_vec(v) for v in _bn_inputs(5))
    stats = triton_ops.bn_stats(x)
    assert stats.shape == (4, 5) and torch.equal(stats.cpu(), torch.zeros(4, 5))
    fold = reference.bn_fold(reference.bn_stats(_cl(_rand(2, 5, 7, 7))), gamma, beta)
    y, y_stats, _ = triton_ops.conv_fwd(x, w, 2, 1, fold=fold, want_stats=True)
    assert y.shape == (0, 6, 4, 4) and y_stats.shape == (4, 6) and torch.equal(y_stats[0].cpu(), torch.zeros(6))
    dy = _cl(torch.zeros(0, 6, 4, 4, dtype=torch.float64))
    g, sums = triton_ops.conv_dgrad(dy, w, x, 2, 1, fold)
    assert g.shape == x.shape and torch.equal(sums.cpu(), torch.zeros(3, 5))
    dw = triton_ops.conv_wgrad(x, dy, w, 2, 1, fold)
    assert torch.equal(dw.cpu(), torch.zeros(6, 5, 3, 3))
    assert triton_ops.bn_backward(g, x, fold, sums, 1.0, True, None).shape == x.shape
    assert _semaphores_are_zero()


# ---- tile choice ---------------------------------------------------------------------------------

def test_explicit_and_default_configurations(monkeypatch):
    """The launch paths beside autotuning: a given configuration, and the first fitting one (AUTOTUNE off)."""
    x = _cl(_rand(3, 17, 9, 9, offset=0.5))
    w = _rand(3, 17, 3, 3, seed=2).to(DEVICE, F32)
    dy = _cl(_rand(3, 3, 5, 5, seed=3))
    res = _cl(_rand(3, 3, 5, 5, seed=4))
    stats = triton_ops.bn_stats(x)
    fold = triton_ops.bn_fold(stats)

    def run(conv_config=None, wgrad_config=None):
        y, y_stats, f = conv.conv_fwd(x, w, 2, 1, stats=stats, residual=res, want_stats=True, config=conv_config)
        g, sums = conv.conv_dgrad(dy, w, x, 2, 1, fold, config=conv_config)
        dw = conv.conv_wgrad(x, dy, w, 2, 1, fold, config=wgrad_config)
        return y, y_stats, f, g, sums, dw

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
    (counts that are not multiples of 16: reduction 32, free rows 64); 16-bit operands: no reduction
    cap (they carry PRECISION "tf32", which must not cap them as TF32); tensor cores: free reduction
    blocks (wgrad's pixels) of at least 32."""
    import triton

    configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k})
               for m in (16, 64, 128) for n in (16, 32, 64, 128) for k in (16, 32, 64)]

    # 16-bit operands carry PRECISION "tf32" (ignored by tl.dot for them), as dot_precision gives
    operand = torch.empty(1, dtype=torch.float32 if precision else torch.bfloat16)

    def blocks(fit, **args):
        kept = fit(configs, {"PRECISION": precision or common.dot_precision(operand.dtype, False), "a_ptr": operand,
                             "x_ptr": operand, **args})
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
    would synchronise) the first fitting configuration runs untimed and nothing is remembered.
    The running statistics are updated once per call, tuning or not."""
    from triton.runtime.autotuner import Autotuner

    tuned = []
    original = Autotuner.run

    def counted(self, *args, **kwargs):
        tuned.append(self.fn.__name__)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Autotuner, "run", counted)
    monkeypatch.setattr(conv, "_chosen", {})
    monkeypatch.setattr(launch, "_plans", {})
    x = _cl(_rand(3, 17, 9, 9, offset=0.5))
    w = _rand(3, 17, 3, 3, seed=2).to(DEVICE, F32)
    stats = triton_ops.bn_stats(x)
    nbt = torch.tensor(0, device=DEVICE)

    def forward():
        return conv.conv_fwd(x, w, 2, 1, stats=stats, running_mean=torch.zeros(17, device=DEVICE),
                             running_var=torch.ones(17, device=DEVICE), num_batches_tracked=nbt,
                             update_running=True, want_stats=True)

    monkeypatch.setattr(conv, "_capturing", lambda device: True)
    captured = forward()
    assert tuned == [] and conv._chosen == {}
    monkeypatch.setattr(conv, "_capturing", lambda device: False)
    first, again = forward(), forward()
    assert tuned == ["_conv_kernel"] and len(conv._chosen) == 1
    assert int(nbt) == 3
    for a, b, c in zip(captured, first, again):
        assert torch.equal(a, b) and torch.equal(b, c)


# ---- settings and errors -------------------------------------------------------------------------

def test_unavailable_reason():
    assert triton_ops.unavailable_reason(DEVICE) is None
    assert "not meta" in triton_ops.unavailable_reason("meta")


def test_fp32_precision_setting():
    assert triton_ops.fp32_precision() == "ieee"
    with pytest.raises(ValueError):
        triton_ops.set_fp32_precision("fp16")
    x = _cl(_rand(1, 3, 7, 7, offset=0.5))
    w = _rand(17, 3, 3, 3, seed=2).to(DEVICE, F32)
    triton_ops.set_fp32_precision("tf32")
    try:
        y, _, _ = triton_ops.conv_fwd(x, w, 1, 1)
    finally:
        triton_ops.set_fp32_precision("ieee")
    assert rel_error(y, F.conv2d(x.double(), w.double(), padding=1)) < 2e-3


def test_float64_is_rejected_clearly():
    x = torch.zeros(1, 3, 4, 4, dtype=torch.float64, device=DEVICE)
    with pytest.raises(TypeError, match="backend='reference'"):
        triton_ops.conv_fwd(x, torch.zeros(3, 3, 1, 1, dtype=torch.float64, device=DEVICE), 1, 0)


def test_cumulative_momentum_needs_num_batches_tracked():
    x = _cl(_rand(1, 3, 4, 4))
    stats = triton_ops.bn_stats(x)
    with pytest.raises(ValueError, match="num_batches_tracked"):
        triton_ops.bn_fold(stats, running_mean=torch.zeros(3, device=DEVICE), running_var=torch.ones(3, device=DEVICE),
                           momentum=None, update_running=True)


# ---- torch.library and torch.compile ---------------------------------------------------------------

def _opcheck_cases():
    return [(name, i) for name, samples in opcheck_samples(F32, "cpu").items() for i in range(len(samples))]


@pytest.mark.parametrize("name,index", _opcheck_cases(), ids=lambda v: str(v))
def test_opcheck(name, index):
    args = opcheck_samples(F32, DEVICE)[name][index]
    torch.library.opcheck(getattr(torch.ops.preact_fused_triton, name), args)


def test_fake_outputs_are_channels_last():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        x = mode.from_tensor(torch.randn(2, 5, 7, 7))
        w = mode.from_tensor(torch.randn(4, 5, 3, 3))
        fold = mode.from_tensor(torch.randn(4, 5))
        y, stats, no_fold = torch.ops.preact_fused_triton.conv_fwd(x, w, 2, 1, None, fold, None, None, None, None,
                                                                   None, 1e-5, 0.1, False, None, True)
        g, sums = torch.ops.preact_fused_triton.conv_dgrad(y, w, x, 2, 1, fold)
    assert y.shape == (2, 4, 4, 4) and y.is_contiguous(memory_format=torch.channels_last)
    assert stats.shape == (4, 4) and no_fold.shape == (0,)
    assert g.shape == x.shape and g.is_contiguous(memory_format=torch.channels_last)
    assert sums.shape == (3, 5)


def _contract_step(x, w, gamma, beta, running_mean, running_var, dy):
    """One forward and backward of a BN-ReLU-conv triple through the six contract functions."""
    stats = triton_ops.bn_stats(x)
    y, y_stats, fold = triton_ops.conv_fwd(x, w, 2, 1, stats=stats, gamma=gamma, beta=beta,
                                           running_mean=running_mean, running_var=running_var, update_running=True,
                                           want_stats=True)
    g, sums = triton_ops.conv_dgrad(dy, w, x, 2, 1, fold)
    dw = triton_ops.conv_wgrad(x, dy, w, 2, 1, fold)
    dx = triton_ops.bn_backward(g, x, fold, sums, x.numel() // x.shape[1], True, None)
    return y, y_stats, dx, dw, triton_ops.bn_fold(stats, gamma, beta)


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


def test_compiled_unit_matches_eager():
    torch._dynamo.reset()
    check_compiled_unit(triton_ops, DEVICE, dtype=F32 if DEVICE == "cpu" else torch.bfloat16)
