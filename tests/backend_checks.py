"""The conformance checks of the kernel contract (preact_fused/contract.py), for any backend.

One definition of every check, run by tests/test_conformance.py on every backend the machine can run
(reference; Triton, under the interpreter without a GPU; the CUDA kernels, under the emulator without
a GPU) and by the backends' own test files where they need more. A backend is the module passed as
``ops``.

The expected values never come from the reference backend: they are computed here in float64 with
torch's own modules and autograd (F.batch_norm, F.relu, F.conv2d and their gradients), so the
reference is checked like any other backend. Inputs are fresh random tensors with odd sizes;
tensors the backend allocates are poisoned (NaN) first, so an element left unwritten shows;
activations come NCHW, channels_last or non-contiguous.

Tolerance, relative to the largest magnitude of the float64 result (DESIGN.md section 6): float64
1e-10, float32 1e-4 (exact fp32 products), TF32 2e-3; bfloat16 / float16: twice the error of
PyTorch's own computation in that dtype (eager torch ops on the same rounded inputs) plus 1e-3.
Statistics (float32 in every backend): 1e-5 relative; 1e-10 in float64.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from preact_fused import contract
from preact_fused.contract import COUNT, INVSTD, M2, MEAN, OFFSET, PIVOT, SCALE, SHIFT, stats_dtype
from preact_fused.shapes import RESNET1001_TRIPLES  # noqa: F401 (every ResNet-1001 triple)

RTOL = {torch.float64: 1e-10, torch.float32: 1e-4, "tf32": 2e-3}
STATS_RTOL = {torch.float64: 1e-10, torch.float32: 1e-5}
EPS = 1e-5


@dataclass(frozen=True)
class ConvCase:
    n: int
    cin: int
    cout: int
    h: int
    w: int
    k: int
    stride: int

    @property
    def padding(self) -> int:
        return self.k // 2

    def __str__(self) -> str:
        return f"n{self.n}-c{self.cin}x{self.cout}-{self.h}x{self.w}-k{self.k}s{self.stride}"


# Odd sizes: C in {3, 17, 64}, H=W in {7, 8, 9}, stride 1 and 2, 1x1 and 3x3, batch 1 and 3.
ODD_CASES = [
    ConvCase(1, 3, 17, 7, 7, 3, 1),
    ConvCase(3, 17, 3, 9, 9, 3, 2),
    ConvCase(1, 17, 64, 8, 8, 1, 1),
    ConvCase(3, 64, 17, 9, 9, 1, 2),
    ConvCase(3, 64, 64, 7, 7, 3, 2),
    ConvCase(1, 3, 3, 8, 8, 3, 1),
]

LAYOUTS = ("nchw", "channels_last", "noncontiguous")

# The BatchNorm forms of a conv's input (contract.py): batch statistics with a running-stat update
# (momentum, or momentum None), batch statistics alone, a given fold, running statistics, none.
BN_MODES = ("update", "update_cumulative", "stats", "fold", "running", "none")

# A tensor with many statistics tiles (18,432 rows), so the in-launch reduction of every backend has
# several groups and a partial last one, and 9 channels that leave a partial channel block.
MANY_TILES = (2, 9, 96, 96)

# A convolution with many row tiles (18,432 output rows: 144 tiles of 128, several groups of every
# in-launch tree, the last one partial; wgrad split over many chunks of pixels).
MANY_TILES_CASE = ConvCase(2, 16, 16, 96, 96, 1, 1)
# Wider than the vectors and tiles in every direction: 520 input channels (a 4 KB fold table); and a
# BatchNorm of 1030 channels (12 KB of bn_backward coefficients, for check_bn_backward).
WIDE_CASE = ConvCase(1, 520, 24, 3, 3, 1, 1)
WIDE_BN_CASE = ConvCase(1, 1030, 1, 2, 3, 1, 1)


def resnet1001_case(triple, batch: int) -> ConvCase:
    """The ConvCase of a RESNET1001_TRIPLES entry at ``batch``."""
    _, cin, cout, hw, k, stride = triple
    return ConvCase(batch, cin, cout, hw, hw, k, stride)


def layout(t: torch.Tensor, name: str) -> torch.Tensor:
    """t [N, C, H, W] in the named memory layout (same values)."""
    if name == "nchw":
        return t.contiguous()
    if name == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if name == "noncontiguous":  # every other column of a wider tensor
        wide = torch.zeros(*t.shape[:3], 2 * t.shape[3], dtype=t.dtype, device=t.device)
        wide[..., ::2] = t
        return wide[..., ::2]
    raise ValueError(name)


@contextlib.contextmanager
def poisoned_allocations(device):
    """New tensors from torch.empty* are NaN-filled; on CUDA the caching allocator is NaN-filled too."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        block = torch.empty(min(free // 4, 1 << 30) // 4, dtype=torch.float32, device=device)
        block.fill_(float("nan"))
        del block
    originals = {name: getattr(torch, name) for name in ("empty", "empty_like", "empty_strided")}

    def poisoning(fn):
        def wrapper(*args, **kwargs):
            out = fn(*args, **kwargs)
            return out.fill_(float("nan")) if out.is_floating_point() else out.fill_(-(1 << 30))
        return wrapper

    for name, fn in originals.items():
        setattr(torch, name, poisoning(fn))
    try:
        yield
    finally:
        for name, fn in originals.items():
            setattr(torch, name, fn)


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    expected = expected.to(torch.float64).cpu()
    diff = (actual.detach().to(torch.float64).cpu() - expected).abs().max().item()
    return diff / max(expected.abs().max().item(), 1e-30)


def assert_close(name, actual, expected64, dtype, same_dtype=None, tf32=False):
    """actual vs the float64 result; bf16/fp16 against twice the error of ``same_dtype`` (PyTorch's own)."""
    assert actual.shape == expected64.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected64.shape)}"
    assert torch.isfinite(actual).all(), f"{name}: non-finite values (unwritten output?)"
    err = rel_error(actual, expected64)
    if dtype in (torch.bfloat16, torch.float16):
        bound = 2 * rel_error(same_dtype, expected64) + 1e-3
    else:
        bound = RTOL["tf32" if tf32 and dtype == torch.float32 else dtype]
    assert err <= bound, f"{name}: relative error {err:.3e} > {bound:.1e} ({dtype})"


def assert_stats_close(name, actual, expected64, dtype):
    """Statistics-dtype vectors: 1e-5 relative (float32), 1e-10 (float64)."""
    assert actual.shape == expected64.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected64.shape)}"
    assert torch.isfinite(actual).all(), f"{name}: non-finite values (unwritten output?)"
    err = rel_error(actual, expected64)
    bound = STATS_RTOL[stats_dtype(dtype)]
    assert err <= bound, f"{name}: relative error {err:.3e} > {bound:.1e}"


# ---- inputs -------------------------------------------------------------------------------------

@dataclass
class Triple:
    """One BN-ReLU-conv triple in float64 on the CPU, with every expected value from torch autograd."""
    case: ConvCase
    x: torch.Tensor
    w: torch.Tensor
    gamma: torch.Tensor
    beta: torch.Tensor
    running_mean: torch.Tensor
    running_var: torch.Tensor
    residual: torch.Tensor
    dy: torch.Tensor

    def bn(self, training: bool):
        """(mean, var) the BN normalises with: the batch's (biased variance) or the running ones."""
        if training:
            var, mean = torch.var_mean(self.x, (0, 2, 3), unbiased=False)
            return mean, var
        return self.running_mean, self.running_var

    def fold(self, training: bool) -> torch.Tensor:
        mean, var = self.bn(training)
        invstd = 1 / torch.sqrt(var + EPS)
        scale = self.gamma * invstd
        return torch.stack([mean, invstd, scale, self.beta - mean * scale])

    def activation(self, training: bool, x=None) -> torch.Tensor:
        """relu(batch_norm(x)) by torch's own ops."""
        mean, var = self.bn(training)
        x = self.x if x is None else x
        return F.relu(F.batch_norm(x, mean.to(x.dtype), var.to(x.dtype), self.gamma.to(x.dtype),
                                   self.beta.to(x.dtype), False, 0.0, EPS))

    def grads(self, training: bool):
        """torch autograd of y = conv(relu(bn(x))): (g = dL/d bn(x), dx, dw, dgamma, dbeta)."""
        x = self.x.clone().requires_grad_()
        w = self.w.clone().requires_grad_()
        gamma, beta = self.gamma.clone().requires_grad_(), self.beta.clone().requires_grad_()
        mean, var = self.bn(training)
        if training:
            z = F.batch_norm(x, None, None, gamma, beta, True, 0.0, EPS)
        else:
            z = F.batch_norm(x, mean, var, gamma, beta, False, 0.0, EPS)
        z.retain_grad()
        y = F.conv2d(F.relu(z), w, stride=self.case.stride, padding=self.case.padding)
        y.backward(self.dy)
        return z.grad, x.grad, w.grad, gamma.grad, beta.grad


def make_triple(case: ConvCase, seed=0, offset=0.5, spread=2.0) -> Triple:
    """Random float64 CPU tensors of a case."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    _, _, ho, wo = contract.conv_output_shape((case.n, case.cin, case.h, case.w), (case.cout, case.cin, case.k, case.k),
                                              case.stride, case.padding)
    x = rand(case.n, case.cin, case.h, case.w) * spread + offset
    return Triple(case, x, rand(case.cout, case.cin, case.k, case.k) / case.k, rand(case.cin) * 0.5 + 1,
                  rand(case.cin) * 0.5, rand(case.cin) * 0.3 + offset, torch.rand(case.cin, generator=g,
                  dtype=torch.float64) * 2 + spread ** 2 / 2, rand(case.n, case.cout, ho, wo),
                  rand(case.n, case.cout, ho, wo))


def to_backend(t: torch.Tensor, dtype, device, layout_name="nchw"):
    """An activation for a backend: dtype, device and layout (vectors: the statistics dtype)."""
    if t.dim() == 4:
        return layout(t.to(device=device, dtype=dtype), layout_name)
    return t.to(device=device, dtype=stats_dtype(dtype))


def summary64(t: torch.Tensor):
    """(count, mean, biased variance) per channel of t [N, C, H, W] in float64."""
    t = t.detach().to(torch.float64).cpu()
    var, mean = torch.var_mean(t, (0, 2, 3), unbiased=False)
    return torch.full_like(mean, t.numel() // t.shape[1]), mean, var


def check_summary(name, stats, of, dtype):
    """A contract summary [4, C] against the float64 statistics of the tensor ``of`` (as stored)."""
    assert stats is not None and stats.shape == (4, of.shape[1]), f"{name}: summary shape {None if stats is None else tuple(stats.shape)}"
    assert stats.dtype == stats_dtype(dtype), f"{name}: summary dtype {stats.dtype}"
    count, mean, var = summary64(of)
    s = stats.to(torch.float64).cpu()
    assert torch.equal(s[COUNT], count), f"{name}: counts {s[COUNT]} != {count}"
    assert_stats_close(f"{name} mean", s[PIVOT] + s[OFFSET], mean, dtype)
    assert_stats_close(f"{name} var", s[M2] / s[COUNT], var, dtype)


# ---- the checks --------------------------------------------------------------------------------

def _bn_arguments(mode, t: Triple, dtype, device):
    """(op keyword arguments, expected fold or None, expected (running_mean, running_var, nbt) or None)."""
    sdt = stats_dtype(dtype)
    vec = (lambda v: v.to(device=device, dtype=sdt))
    if mode == "none":
        return {}, None, None
    x_stored = to_backend(t.x, dtype, "cpu").to(torch.float64)  # statistics of x as the backend sees it
    stored = Triple(**{**t.__dict__, "x": x_stored})
    training = mode != "running"
    fold = stored.fold(training)
    if mode == "fold":
        return {"fold": vec(fold)}, None, None
    kwargs = {"gamma": vec(t.gamma), "beta": vec(t.beta), "eps": EPS}
    if mode == "running":
        return {**kwargs, "running_mean": vec(t.running_mean), "running_var": vec(t.running_var)}, fold, None
    kwargs["stats"] = to_backend(_summary_of(x_stored), dtype, device)
    if mode == "stats":
        return kwargs, fold, None
    momentum = 0.1 if mode == "update" else None
    nbt = torch.tensor(4, dtype=torch.long)
    factor = momentum if momentum is not None else 1 / (int(nbt) + 1)
    count, mean, var = summary64(x_stored)
    expected = ((1 - factor) * t.running_mean + factor * mean,
                (1 - factor) * t.running_var + factor * var * count / (count - 1), int(nbt) + 1)
    kwargs.update(running_mean=vec(t.running_mean), running_var=vec(t.running_var),
                  num_batches_tracked=nbt.to(device), momentum=momentum, update_running=True)
    return kwargs, fold, expected


def _summary_of(x64):
    """A float64 contract summary of x (pivot: the first element of each channel)."""
    rows = x64.permute(0, 2, 3, 1).reshape(-1, x64.shape[1])
    pivot = rows[0]
    var, mean = torch.var_mean(rows, 0, unbiased=False)
    return torch.stack([torch.full_like(mean, rows.shape[0]), pivot, mean - pivot, var * rows.shape[0]])


def _check_running(kwargs, expected, dtype):
    if expected is None:
        return
    rm, rv, nbt = expected
    assert_stats_close("running_mean", kwargs["running_mean"], rm, dtype)
    assert_stats_close("running_var", kwargs["running_var"], rv, dtype)
    assert int(kwargs["num_batches_tracked"]) == nbt, "num_batches_tracked not incremented once"


def check_conv_fwd(ops, case, dtype, device, layout_name, mode, with_residual, want_stats, tf32=False):
    t = make_triple(case)
    kwargs, fold64, running = _bn_arguments(mode, t, dtype, device)
    x = to_backend(t.x, dtype, device, layout_name)
    residual = to_backend(t.residual, dtype, device, layout_name) if with_residual else None
    with poisoned_allocations(device):
        y, stats, fold = ops.conv_fwd(x, to_backend(t.w, dtype, device).to(torch.float32 if dtype != torch.float64
                                      else dtype), case.stride, case.padding, **kwargs, residual=residual,
                                      want_stats=want_stats)
    x64 = x.to(torch.float64).cpu()
    a64 = x64 if mode == "none" else Triple(**{**t.__dict__, "x": x64}).activation(mode != "running")
    if mode == "fold":
        a64 = F.relu(x64 * fold64_of(kwargs)[SCALE][:, None, None] + fold64_of(kwargs)[SHIFT][:, None, None])
    y64 = F.conv2d(a64, t.w, stride=case.stride, padding=case.padding)
    if with_residual:
        y64 = y64 + residual.to(torch.float64).cpu()
    same = _same_dtype_conv(x, t, mode, kwargs, case, dtype, residual)
    assert_close("conv_fwd y", y, y64, dtype, same, tf32)
    if layout_name == "channels_last":
        assert y.is_contiguous(memory_format=torch.channels_last), "conv_fwd: output lost channels_last"
    if want_stats:
        check_summary("conv_fwd stats", stats, y, dtype)
    else:
        assert stats is None, "conv_fwd: statistics returned without want_stats"
    if fold64 is None:
        assert fold is None, f"conv_fwd: a fold returned in mode {mode}"
    else:
        for plane, name in ((MEAN, "mean"), (INVSTD, "invstd"), (SCALE, "scale"), (SHIFT, "shift")):
            assert_stats_close(f"conv_fwd fold {name}", fold[plane], fold64[plane], dtype)
    _check_running(kwargs, running, dtype)


def fold64_of(kwargs):
    return kwargs["fold"].to(torch.float64).cpu()


def _same_dtype_conv(x, t, mode, kwargs, case, dtype, residual):
    """PyTorch's own forward in ``dtype``: batch_norm (as eager runs it in that dtype), relu, conv2d."""
    if dtype not in (torch.bfloat16, torch.float16):
        return None
    xc = x.cpu()
    a = xc
    if mode != "none":
        fold = kwargs["fold"].cpu() if mode == "fold" else Triple(**{**t.__dict__, "x": xc.double()}).fold(mode != "running")
        a = F.relu(xc * fold[SCALE].to(dtype)[:, None, None] + fold[SHIFT].to(dtype)[:, None, None])
    y = F.conv2d(a, t.w.to(dtype), stride=case.stride, padding=case.padding)
    return y if residual is None else y + residual.cpu()


def check_bn_stats(ops, shape, dtype, device, layout_name, offset=0.0, spread=0.5):
    """The summary of a tensor whose channels have means ``offset + c`` and standard deviation ``spread``."""
    g = torch.Generator().manual_seed(1)
    n, c, h, w = shape
    x64 = torch.randn(shape, generator=g, dtype=torch.float64) * spread + offset + torch.arange(c, dtype=torch.float64)[:, None, None]
    x = layout(x64.to(device=device, dtype=dtype), layout_name)
    with poisoned_allocations(device):
        stats = ops.bn_stats(x)
    check_summary("bn_stats", stats, x, dtype)


def check_bn_fold(ops, c, dtype, device, mode, affine=True):
    """bn_fold in each of its forms: batch statistics (with or without an update) or running statistics."""
    case = ConvCase(3, c, 1, 5, 7, 1, 1)
    t = make_triple(case)
    kwargs, fold64, running = _bn_arguments(mode, t, dtype, device)
    if not affine:
        kwargs.update(gamma=None, beta=None)
        t = Triple(**{**t.__dict__, "gamma": torch.ones(c, dtype=torch.float64), "beta": torch.zeros(c, dtype=torch.float64)})
        _, fold64, _ = _bn_arguments(mode, t, dtype, device)
    with poisoned_allocations(device):
        fold = ops.bn_fold(**kwargs)
    for plane, name in ((MEAN, "mean"), (INVSTD, "invstd"), (SCALE, "scale"), (SHIFT, "shift")):
        assert_stats_close(f"bn_fold {name}", fold[plane], fold64[plane], dtype)
    _check_running(kwargs, running, dtype)


def check_conv_dgrad(ops, case, dtype, device, layout_name, training, tf32=False, with_bn=True):
    """g and the sums against torch autograd (g = dL/d bn(x), dbeta, dgamma); without BN the input gradient."""
    t = make_triple(case)
    x = to_backend(t.x, dtype, device, layout_name)
    t = Triple(**{**t.__dict__, "x": x.to(torch.float64).cpu()})
    dy = to_backend(t.dy, dtype, device, layout_name)
    t = Triple(**{**t.__dict__, "dy": dy.to(torch.float64).cpu()})
    w = to_backend(t.w, dtype, device).to(torch.float32 if dtype != torch.float64 else dtype)
    fold = to_backend(t.fold(training), dtype, device) if with_bn else None
    with poisoned_allocations(device):
        g, sums = ops.conv_dgrad(dy, w, x, case.stride, case.padding, fold)
    if layout_name == "channels_last":
        assert g.is_contiguous(memory_format=torch.channels_last), "conv_dgrad: output lost channels_last"
    if not with_bn:
        dx64 = torch.nn.grad.conv2d_input(t.x.shape, t.w, t.dy, stride=case.stride, padding=case.padding)
        same = _same_dtype_dgrad(dy, t, case, dtype)
        assert_close("conv_dgrad dx", g, dx64, dtype, same, tf32)
        assert sums is None, "conv_dgrad: sums returned without a BN"
        return
    g64, _, _, dgamma64, dbeta64 = t.grads(training)
    same = None
    if dtype in (torch.bfloat16, torch.float16):
        mask = t.activation(training) > 0
        same = _same_dtype_dgrad(dy, t, case, dtype) * mask
    assert_close("conv_dgrad g", g, g64, dtype, same, tf32)
    sums_dtype = torch.float32 if dtype != torch.float64 else dtype
    assert sums.shape == (3, case.cin) and sums.dtype == stats_dtype(dtype)
    invstd64 = t.fold(training)[INVSTD]
    same_sums = None
    if same is not None:
        same_sums = torch.stack([same.double().sum((0, 2, 3)), (same.double() * (t.x - t.fold(training)[MEAN][:, None, None])).sum((0, 2, 3))])
    assert_close("conv_dgrad sum_g", sums[contract.SUM_G], dbeta64, dtype if same is not None else sums_dtype,
                 None if same_sums is None else same_sums[0], tf32)
    assert_close("conv_dgrad sum_gx", sums[contract.SUM_GX], dgamma64 / invstd64, dtype if same is not None else sums_dtype,
                 None if same_sums is None else same_sums[1], tf32)
    assert_close("conv_dgrad dgamma", sums[contract.DGAMMA], dgamma64, dtype if same is not None else sums_dtype,
                 None if same_sums is None else same_sums[1] * invstd64, tf32)


def _same_dtype_dgrad(dy, t, case, dtype):
    if dtype not in (torch.bfloat16, torch.float16):
        return None
    return torch.nn.grad.conv2d_input(t.x.shape, t.w.to(dtype), dy.cpu(), stride=case.stride, padding=case.padding)


def check_conv_wgrad(ops, case, dtype, device, layout_name, training, tf32=False, with_bn=True):
    """dW against torch autograd (through the BN-ReLU when given, the plain conv otherwise)."""
    t = make_triple(case)
    x = to_backend(t.x, dtype, device, layout_name)
    dy = to_backend(t.dy, dtype, device, layout_name)
    t = Triple(**{**t.__dict__, "x": x.to(torch.float64).cpu(), "dy": dy.to(torch.float64).cpu()})
    fold = to_backend(t.fold(training), dtype, device) if with_bn else None
    shape = tuple(t.w.shape)
    # the weight's memory format alternates with the layout: dW must come back in it
    weight = t.w.to(device=device, dtype=torch.float32 if dtype != torch.float64 else dtype)
    if layout_name == "channels_last":
        weight = weight.contiguous(memory_format=torch.channels_last)
    with poisoned_allocations(device):
        dw = ops.conv_wgrad(x, dy, weight, case.stride, case.padding, fold)
    assert dw.dtype == stats_dtype(dtype), f"conv_wgrad: dW dtype {dw.dtype}"
    assert dw.stride() == weight.stride(), f"conv_wgrad: dW strides {dw.stride()} != the weight's {weight.stride()}"
    a64 = t.activation(training) if with_bn else t.x
    dw64 = torch.nn.grad.conv2d_weight(a64, shape, t.dy, stride=case.stride, padding=case.padding)
    same = None
    if dtype in (torch.bfloat16, torch.float16):
        a = t.activation(training, x.cpu()) if with_bn else x.cpu()
        same = torch.nn.grad.conv2d_weight(a, shape, dy.cpu(), stride=case.stride, padding=case.padding)
    assert_close("conv_wgrad dw", dw, dw64, dtype, same, tf32)


def check_conv_wgrad_bn_backward(ops, case, dtype, device, layout_name, training):
    """conv_wgrad_bn_backward against torch autograd: dy = the backward of the BatchNorm that follows
    the conv (from its masked gradient g, its input, fold and sums) and dW of the conv through its
    own BN-ReLU; and bit for bit what the backend's bn_backward followed by its conv_wgrad give."""
    t = make_triple(case)
    x = to_backend(t.x, dtype, device, layout_name)
    t = Triple(**{**t.__dict__, "x": x.to(torch.float64).cpu()})
    n, _, ho, wo = t.dy.shape
    # the next triple: its BN reads this conv's output
    nxt = make_triple(ConvCase(n, case.cout, 5, ho, wo, 1, 1), seed=1)
    bn_x = to_backend(nxt.x, dtype, device, LAYOUTS[(LAYOUTS.index(layout_name) + 1) % len(LAYOUTS)])
    nxt = Triple(**{**nxt.__dict__, "x": bn_x.to(torch.float64).cpu()})
    g64, dy64, _, dgamma64, dbeta64 = nxt.grads(training)
    g = to_backend(g64, dtype, device, layout_name)
    bn_fold = to_backend(nxt.fold(training), dtype, device)
    bn_sums = to_backend(torch.stack([dbeta64, dgamma64 / nxt.fold(training)[INVSTD], dgamma64]), dtype, device)
    count = nxt.x.numel() / nxt.x.shape[1]
    fold = to_backend(t.fold(training), dtype, device)
    shape = tuple(t.w.shape)
    weight = t.w.to(device=device, dtype=torch.float32 if dtype != torch.float64 else dtype)
    with poisoned_allocations(device):
        dw, dy = ops.conv_wgrad_bn_backward(x, g, weight, case.stride, case.padding, fold, bn_x, bn_fold, bn_sums,
                                            count, training)
    dw64 = torch.nn.grad.conv2d_weight(t.activation(training), shape, dy64, stride=case.stride, padding=case.padding)
    same_dy = same_dw = None
    if dtype in (torch.bfloat16, torch.float16):  # eager's BN backward and weight gradient in that dtype
        xs = bn_x.cpu().requires_grad_()
        mean, var = nxt.bn(training)
        z = F.batch_norm(xs, None if training else mean.to(dtype), None if training else var.to(dtype),
                         nxt.gamma.to(dtype), nxt.beta.to(dtype), training, 0.0, EPS)
        z.backward(g.cpu())
        same_dy = xs.grad
        same_dw = torch.nn.grad.conv2d_weight(t.activation(training, x.cpu()), shape, same_dy, stride=case.stride,
                                              padding=case.padding)
    assert_close("conv_wgrad_bn_backward dy", dy, dy64, dtype, same_dy)
    assert_close("conv_wgrad_bn_backward dw", dw, dw64, dtype, same_dw)
    assert dy.dtype == dtype and dw.dtype == stats_dtype(dtype)
    assert contract.is_channels_last(dy) == contract.is_channels_last(bn_x), "conv_wgrad_bn_backward: dy not in bn_x's format"
    unfused_dy = ops.bn_backward(g, bn_x, bn_fold, bn_sums, count, training)
    assert torch.equal(dy, unfused_dy), "conv_wgrad_bn_backward: dy differs from the backend's bn_backward"
    assert torch.equal(dw, ops.conv_wgrad(x, unfused_dy, weight, case.stride, case.padding, fold)), \
        "conv_wgrad_bn_backward: dW differs from the backend's conv_wgrad of its bn_backward"


def check_bn_backward(ops, case, dtype, device, layout_name, training, with_residual):
    """dx = bn_backward(g, x, fold, sums) against torch autograd's dx (plus a residual gradient)."""
    t = make_triple(case)
    x = to_backend(t.x, dtype, device, layout_name)
    t = Triple(**{**t.__dict__, "x": x.to(torch.float64).cpu()})
    g64, dx64, _, dgamma64, dbeta64 = t.grads(training)
    fold64 = t.fold(training)
    sums64 = torch.stack([dbeta64, dgamma64 / fold64[INVSTD], dgamma64])
    g = to_backend(g64, dtype, device, layout_name)
    d_res64 = torch.randn(t.x.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    d_res = to_backend(d_res64, dtype, device, layout_name) if with_residual else None
    count = t.x.numel() / t.x.shape[1]
    with poisoned_allocations(device):
        dx = ops.bn_backward(g, x, to_backend(fold64, dtype, device), to_backend(sums64, dtype, device), count,
                             training, d_res)
    expected = dx64 + (d_res64 if with_residual else 0)
    same = None
    if dtype in (torch.bfloat16, torch.float16):  # eager's BN backward in that dtype
        xs = x.cpu().requires_grad_()
        mean, var = t.bn(training)
        z = F.batch_norm(xs, None if training else mean.to(dtype), None if training else var.to(dtype),
                         t.gamma.to(dtype), t.beta.to(dtype), training, 0.0, EPS)
        z.backward(g.cpu())
        same = xs.grad + (d_res.cpu() if with_residual else 0)
    assert_close("bn_backward dx", dx, expected, dtype, same)
    if layout_name == "channels_last":
        assert dx.is_contiguous(memory_format=torch.channels_last), "bn_backward: output lost channels_last"


def check_weight_in_activation_dtype(ops, case, dtype, device, layout_name="channels_last"):
    """conv_fwd (a fold) and conv_dgrad with a weight in the activation dtype and channels_last (not
    the float32 master): read as it is, as ``weight.to(x.dtype)`` gives; dW in the weight's format."""
    t = make_triple(case)
    x = to_backend(t.x, dtype, device, layout_name)
    dy = to_backend(t.dy, dtype, device, layout_name)
    w = t.w.to(device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
    t = Triple(**{**t.__dict__, "x": x.to(torch.float64).cpu(), "dy": dy.to(torch.float64).cpu(),
                  "w": w.to(torch.float64).cpu().contiguous()})
    fold64 = t.fold(True)
    fold = to_backend(fold64, dtype, device)
    with poisoned_allocations(device):
        y, _, _ = ops.conv_fwd(x, w, case.stride, case.padding, fold=fold)
        g, _ = ops.conv_dgrad(dy, w, x, case.stride, case.padding, None)
        dw = ops.conv_wgrad(x, dy, w, case.stride, case.padding, fold)
    a64 = F.relu(t.x * fold64[SCALE][:, None, None] + fold64[SHIFT][:, None, None])
    y64 = F.conv2d(a64, t.w, stride=case.stride, padding=case.padding)
    same = None
    if dtype in (torch.bfloat16, torch.float16):
        a = F.relu(x.cpu() * fold64[SCALE].to(dtype)[:, None, None] + fold64[SHIFT].to(dtype)[:, None, None])
        same = F.conv2d(a, w.cpu(), stride=case.stride, padding=case.padding)
    assert_close("conv_fwd y (weight in the activation dtype)", y, y64, dtype, same)
    dx64 = torch.nn.grad.conv2d_input(t.x.shape, t.w, t.dy, stride=case.stride, padding=case.padding)
    assert_close("conv_dgrad dx (weight in the activation dtype)", g, dx64, dtype, _same_dtype_dgrad(dy, t, case, dtype))
    assert dw.dtype == stats_dtype(dtype) and dw.stride() == w.stride(), "conv_wgrad: dW not in the weight's format"


def check_empty_batch(ops, dtype, device):
    """Zero-element inputs (N = 0): no crash; empty activations; zero summaries, sums and dW."""
    case = ConvCase(0, 5, 4, 6, 6, 3, 1)
    sdt = stats_dtype(dtype)
    x = to_backend(torch.zeros(0, 5, 6, 6, dtype=torch.float64), dtype, device)
    dy = to_backend(torch.zeros(0, 4, 6, 6, dtype=torch.float64), dtype, device)
    w = to_backend(make_triple(case).w, dtype, device).to(torch.float32 if dtype != torch.float64 else dtype)
    fold = to_backend(torch.stack([torch.zeros(5), torch.ones(5), torch.ones(5), torch.zeros(5)]).double(), dtype, device)
    zeros = (lambda *shape: torch.zeros(*shape, dtype=sdt))
    y, y_stats, _ = ops.conv_fwd(x, w, 1, 1, fold=fold, want_stats=True)
    assert y.shape == (0, 4, 6, 6) and y.dtype == dtype, f"conv_fwd: {tuple(y.shape)} {y.dtype}"
    assert torch.equal(y_stats.cpu(), zeros(4, 4)), f"conv_fwd: summary of an empty batch {y_stats}"
    assert torch.equal(ops.bn_stats(x).cpu(), zeros(4, 5)), "bn_stats: summary of an empty batch not zero"
    g, sums = ops.conv_dgrad(dy, w, x, 1, 1, fold)
    assert g.shape == x.shape and torch.equal(sums.cpu(), zeros(3, 5)), "conv_dgrad: empty batch"
    dw = ops.conv_wgrad(x, dy, w, 1, 1, fold)
    assert torch.equal(dw.cpu(), zeros(4, 5, 3, 3)), "conv_wgrad: dW of an empty batch not zero"
    dx = ops.bn_backward(x, x, fold, torch.zeros(3, 5, dtype=sdt, device=device), 0.0, True, None)
    assert dx.shape == x.shape, "bn_backward: empty batch"


def check_bn_fold_low_precision_running(ops, device, buffer_dtype=torch.bfloat16):
    """Running statistics in a low-precision dtype (a model converted with .to(bfloat16)): bn_fold
    reads and updates them in their dtype (contract.update_running's formula, to within two of that
    dtype's rounding steps), the fold from a float32 summary and from the buffers."""
    case = ConvCase(2, 8, 1, 5, 5, 1, 1)
    t = make_triple(case, seed=4, offset=2.0, spread=1.0)
    summary = _summary_of(t.x).float()
    rm0, rv0 = t.running_mean.to(buffer_dtype), t.running_var.to(buffer_dtype)
    rm, rv = rm0.clone().to(device), rv0.clone().to(device)
    nbt = torch.tensor(2, device=device)
    with poisoned_allocations(device):
        fold = ops.bn_fold(summary.to(device), None, None, rm, rv, nbt, EPS, 0.1, True)
    assert rm.dtype == buffer_dtype and rv.dtype == buffer_dtype, "running statistics changed dtype"
    assert int(nbt) == 3, "num_batches_tracked not incremented once"
    _, mean, var = summary64(t.x)
    invstd = 1 / torch.sqrt(var + EPS)
    expected = torch.stack([mean, invstd, invstd, -mean * invstd])
    for plane, name in ((MEAN, "mean"), (INVSTD, "invstd"), (SCALE, "scale"), (SHIFT, "shift")):
        assert_stats_close(f"bn_fold {name}", fold[plane], expected[plane], torch.float32)
    want_m, want_v = rm0.clone(), rv0.clone()
    contract.update_running(summary, want_m, want_v, None, 0.1)
    step = torch.finfo(buffer_dtype).eps
    for name, got, want in (("running_mean", rm, want_m), ("running_var", rv, want_v)):
        err = (got.cpu().double() - want.double()).abs().max().item()
        assert err <= 2 * step * want.double().abs().max().item(), f"{name} in {buffer_dtype}: error {err:.3e}"
    fold = ops.bn_fold(None, None, None, rm, rv, None, EPS, 0.1, False)
    rm64, rv64 = rm.cpu().double(), rv.cpu().double()
    invstd = 1 / torch.sqrt(rv64 + EPS)
    expected = torch.stack([rm64, invstd, invstd, -rm64 * invstd])
    for plane, name in ((MEAN, "mean"), (INVSTD, "invstd"), (SCALE, "scale"), (SHIFT, "shift")):
        assert_stats_close(f"bn_fold (running, {buffer_dtype}) {name}", fold[plane], expected[plane], torch.float32)


def check_nan_propagates(ops, dtype, device):
    """One NaN pixel: the conv outputs it reaches are NaN as in PyTorch (ReLU keeps NaN), in eval
    mode (a fold) and in training (statistics: the whole channel), and dgrad passes it through."""
    case = ConvCase(1, 3, 5, 7, 7, 3, 1)
    t = make_triple(case)
    x64 = t.x.clone()
    x64[0, 1, 3, 3] = float("nan")
    x = to_backend(x64, dtype, device)
    w = to_backend(t.w, dtype, device).to(torch.float32 if dtype != torch.float64 else dtype)
    fold = to_backend(t.fold(False), dtype, device)
    y, _, _ = ops.conv_fwd(x, w, 1, 1, fold=fold)
    a64 = F.relu(F.batch_norm(x64, t.running_mean, t.running_var, t.gamma, t.beta, False, 0.0, EPS))
    y64 = F.conv2d(a64, t.w, padding=1)
    assert torch.equal(torch.isnan(y.cpu()), torch.isnan(y64)), "conv_fwd (fold): NaN not propagated as PyTorch"
    stats = ops.bn_stats(x)
    assert torch.isnan(stats.cpu()[:, 1]).any(), "bn_stats: NaN swallowed"
    y, _, fold_out = ops.conv_fwd(x, w, 1, 1, stats=stats, gamma=to_backend(t.gamma, dtype, device),
                                  beta=to_backend(t.beta, dtype, device))
    expected = F.conv2d(F.relu(F.batch_norm(x64, None, None, t.gamma, t.beta, True, 0.0, EPS)), t.w, padding=1)
    assert torch.equal(torch.isnan(y.cpu()), torch.isnan(expected)), "conv_fwd (stats): NaN not propagated"
    dy = to_backend(t.dy, dtype, device)
    g, sums = ops.conv_dgrad(dy, w, x, 1, 1, fold)
    da = torch.nn.grad.conv2d_input(x64.shape, t.w, dy.double().cpu(), padding=1)
    # PyTorch's ReLU backward passes the gradient where its input is NaN (NaN <= 0 is false).
    assert rel_error(g.cpu()[0, 1, 3, 3], da[0, 1, 3, 3]) < 1e-3, "conv_dgrad: the ReLU mask dropped a NaN input's gradient"
    assert torch.isnan(sums.cpu()[contract.SUM_GX, 1]), "conv_dgrad: NaN missing from sum_gx"


def check_reruns_identical(ops, dtype, device):
    """Every op run twice on the same inputs: bit-identical outputs (fixed-order reductions)."""
    case = ConvCase(2, 17, 9, 9, 9, 3, 2)
    t = make_triple(case)
    x, dy = to_backend(t.x, dtype, device, "channels_last"), to_backend(t.dy, dtype, device, "channels_last")
    w = to_backend(t.w, dtype, device).to(torch.float32)
    fold = to_backend(t.fold(True), dtype, device)
    stats = ops.bn_stats(x)

    def run():
        y, y_stats, _ = ops.conv_fwd(x, w, 2, 1, stats=stats, gamma=to_backend(t.gamma, dtype, device),
                                     want_stats=True)
        g, sums = ops.conv_dgrad(dy, w, x, 2, 1, fold)
        dw = ops.conv_wgrad(x, dy, w, 2, 1, fold)
        dx = ops.bn_backward(g, x, fold, sums, x.numel() / x.shape[1], True, x)
        return y, y_stats, ops.bn_stats(x), g, sums, dw, dx

    for first, second in zip(run(), run()):
        assert torch.equal(first, second), "a rerun differs"


def check_statistics_accuracy(ops, ratio, device):
    """bn_stats + the fold on float32 data whose mean is ``ratio`` times its std: the variance as
    accurate as torch.var on the same tensor (within 10x, or 1e-6 relative)."""
    g = torch.Generator().manual_seed(5)
    x64 = torch.randn(4, 3, 32, 32, generator=g, dtype=torch.float64) + ratio
    x = x64.to(device=device, dtype=torch.float32)
    stored = x.to(torch.float64).cpu()
    var64 = stored.var((0, 2, 3), unbiased=False)
    torch_err = rel_error(x.cpu().var((0, 2, 3), unbiased=False), var64)
    stats = ops.bn_stats(x)
    fold = ops.bn_fold(stats=stats, eps=0.0)
    var = 1 / fold[INVSTD].double().cpu() ** 2
    err = rel_error(var, var64)
    assert err <= max(10 * torch_err, 1e-6), f"variance at mean/std {ratio:g}: {err:.2e} (torch.var: {torch_err:.2e})"


def opcheck_samples(dtype, device):
    """Arguments for torch.library.opcheck of each contract op, by op name: every optional input
    both given and None, every BatchNorm form, the running statistics updated in place."""
    case = ConvCase(2, 16, 24, 9, 9, 3, 2)
    t = make_triple(case)
    x, dy = to_backend(t.x, dtype, device, "channels_last"), to_backend(t.dy, dtype, device, "channels_last")
    res = to_backend(t.residual, dtype, device, "channels_last")
    w = to_backend(t.w, dtype, device).to(torch.float32)
    fold = to_backend(t.fold(True), dtype, device)
    stats = to_backend(_summary_of(x.double().cpu()), dtype, device)
    vec = (lambda v: to_backend(v, dtype, device))
    gamma, beta = vec(t.gamma), vec(t.beta)
    sums = torch.randn(3, case.cin, device=device)
    # the BN after the conv (input ``res``, dy's shape), for conv_wgrad_bn_backward
    dy_fold = to_backend(contract.fold_from_summary(_summary_of(res.double().cpu()), None, None, EPS), dtype, device)
    dy_sums = torch.randn(3, case.cout, device=device)

    def running():
        return vec(t.running_mean), vec(t.running_var), torch.tensor(3, device=device)

    return {
        "conv_fwd": [(x, w, 2, 1, stats, None, gamma, beta, *running(), EPS, 0.1, True, res, True),
                     (x, w, 2, 1, stats, None, None, None, *running(), EPS, None, True, None, False),
                     (x, w, 2, 1, None, fold, None, None, None, None, None, EPS, 0.1, False, None, True),
                     (x, w, 2, 1, None, None, gamma, beta, vec(t.running_mean), vec(t.running_var), None, EPS, 0.1,
                      False, res, False),
                     (x, w, 2, 1, None, None, None, None, None, None, None, EPS, 0.1, False, None, False)],
        "bn_stats": [(x,)],
        "bn_fold": [(stats, gamma, beta, *running(), EPS, 0.1, True),
                    (None, gamma, beta, vec(t.running_mean), vec(t.running_var), None, EPS, 0.1, False)],
        "conv_dgrad": [(dy, w, x, 2, 1, fold), (dy, w, x, 2, 1, None)],
        "conv_wgrad": [(x, dy, w, 2, 1, fold), (x, dy, w.contiguous(memory_format=torch.channels_last), 2, 1, None)],
        "bn_backward": [(x, x, fold, sums, 162.0, True, x), (x, x, fold, sums, 162.0, False, None)],
        "conv_wgrad_bn_backward": [(x, dy, w, 2, 1, fold, res, dy_fold, dy_sums, 50.0, True),
                                   (x, dy, w, 2, 1, None, res, dy_fold, dy_sums, 50.0, False)],
    }


def check_compiled_unit(ops, device, dtype=torch.bfloat16):
    """Two fused convs, the second folding the first's statistics, under torch.compile(fullgraph=True):
    no graph break (the backend's wrappers and its ops' fakes trace) and the eager result, bit for bit."""
    case = ConvCase(4, 32, 32, 16, 16, 3, 1)
    t = make_triple(case)
    x = to_backend(t.x, dtype, device, "channels_last")
    res = to_backend(t.residual, dtype, device, "channels_last")
    w = to_backend(t.w, dtype, device).to(torch.float32)
    fold = to_backend(t.fold(True), dtype, device)

    def unit(x, w, fold, residual):
        y, stats, _ = ops.conv_fwd(x, w, 1, 1, fold=fold, residual=residual, want_stats=True)
        return ops.conv_fwd(y, w, 1, 1, stats=stats)[0]

    args = (x, w, fold, res)
    compiled = torch.compile(unit, fullgraph=True, dynamic=False)
    assert torch.equal(compiled(*args), unit(*args))


def check_on_second_device(ops):
    """Every op with its tensors on cuda:1 while cuda:0 is current (needs 2 GPUs): the kernels must
    run where the tensors are, on that device's stream."""
    case = ODD_CASES[1]
    with torch.cuda.device(0):
        check_conv_fwd(ops, case, torch.float32, "cuda:1", "channels_last", "update", True, True)
        check_conv_dgrad(ops, case, torch.float32, "cuda:1", "channels_last", True)
        check_conv_wgrad(ops, case, torch.float32, "cuda:1", "channels_last", True)
        check_bn_stats(ops, (3, 17, 9, 9), torch.float32, "cuda:1", "channels_last")
        check_bn_backward(ops, case, torch.float32, "cuda:1", "channels_last", training=True, with_residual=True)
