"""Checks of one backend's six kernel contracts against the reference backend in float64.

Shared by the tests of every backend (reference, triton, cuda): a backend is the module passed as
``ops``. Inputs are fresh random tensors with odd sizes; outputs allocated by the backend are
poisoned (NaN) beforehand so an unwritten element shows; activations come NCHW, channels_last or
non-contiguous.

Tolerance, relative to the largest magnitude of the float64 result (DESIGN.md section 6):
float64 1e-10, float32 1e-4 (exact fp32), TF32 2e-3; bfloat16 / float16: at most twice the error of
PyTorch's own same-dtype computation (the reference backend run in that dtype) plus 1e-3.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from preact_fused import reference

RTOL = {torch.float64: 1e-10, torch.float32: 1e-4, "tf32": 2e-3}


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

# A tensor with many statistics tiles (18,432 rows: 144 of the CUDA backend's, 576 of the Triton
# interpreter's), so bn_finalize's threads stride over several tiles each, and 9 channels that
# leave a partial channel block.
MANY_TILES = (2, 9, 96, 96)

from preact_fused.shapes import RESNET1001_TRIPLES  # noqa: E402,F401 (every ResNet-1001 triple)


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
    """actual vs the float64 result; for bf16/fp16 against twice the error of ``same_dtype``."""
    assert actual.shape == expected64.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected64.shape)}"
    assert torch.isfinite(actual).all(), f"{name}: non-finite values (unwritten output?)"
    err = rel_error(actual, expected64)
    if dtype in (torch.bfloat16, torch.float16):
        bound = 2 * rel_error(same_dtype, expected64) + 1e-3
    else:
        bound = RTOL["tf32" if tf32 and dtype == torch.float32 else dtype]
    assert err <= bound, f"{name}: relative error {err:.3e} > {bound:.1e} ({dtype})"


def make_inputs(case: ConvCase, dtype, device, seed=0):
    """Random float64 CPU inputs of a case: x, w, BN vectors, residual, dy (dict of tensors)."""
    g = torch.Generator().manual_seed(seed)
    ho = (case.h + 2 * case.padding - case.k) // case.stride + 1
    wo = (case.w + 2 * case.padding - case.k) // case.stride + 1

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    x = rand(case.n, case.cin, case.h, case.w) * 2 + 0.5
    mean = x.mean((0, 2, 3))
    invstd = torch.rsqrt(x.var((0, 2, 3), unbiased=False) + 1e-5)
    gamma, beta = rand(case.cin) * 0.5 + 1, rand(case.cin) * 0.5
    scale = gamma * invstd
    return {
        "x": x, "w": rand(case.cout, case.cin, case.k, case.k) / case.k, "mean": mean, "invstd": invstd,
        "gamma": gamma, "beta": beta, "scale": scale, "shift": beta - mean * scale,
        "residual": rand(case.n, case.cout, ho, wo), "dy": rand(case.n, case.cout, ho, wo),
    }


def cast(inputs, dtype, device, layout_name="nchw"):
    """The inputs for a backend: activations in dtype + layout, vectors in the statistics dtype."""
    sdt = reference.stats_dtype(dtype)
    out = {}
    for key, t in inputs.items():
        if t.dim() == 4 and key != "w":
            out[key] = layout(t.to(device=device, dtype=dtype), layout_name)
        elif key == "w":
            out[key] = t.to(device=device, dtype=dtype)
        else:
            out[key] = t.to(device=device, dtype=sdt)
    return out


def merged_stats(partials):
    """(count, mean, M2) per channel merged from partials [3, T, C] in float64."""
    p = partials.to(torch.float64).cpu()
    count, mean, m2 = p.unbind(0)
    total = count.sum(0)
    merged_mean = (count * mean).sum(0) / total
    return total, merged_mean, (m2 + count * (mean - merged_mean) ** 2).sum(0)


def check_conv_fwd(ops, case, dtype, device, layout_name, with_bn, with_residual, want_stats, tf32=False):
    inputs = make_inputs(case, dtype, device)
    t = cast(inputs, dtype, device, layout_name)
    bn = (t["scale"], t["shift"]) if with_bn else (None, None)
    bn64 = (inputs["scale"], inputs["shift"]) if with_bn else (None, None)
    with poisoned_allocations(device):
        y, partials = ops.conv_fwd(t["x"], t["w"], case.stride, case.padding, *bn,
                                   t["residual"] if with_residual else None, want_stats)
    y64, p64 = reference.conv_fwd(inputs["x"], inputs["w"], case.stride, case.padding, *bn64,
                                  inputs["residual"] if with_residual else None, want_stats)
    same = reference.conv_fwd(t["x"], t["w"], case.stride, case.padding, *bn,
                              t["residual"] if with_residual else None, False)[0]
    assert_close("conv_fwd y", y, y64, dtype, same, tf32)
    if layout_name == "channels_last":
        assert y.is_contiguous(memory_format=torch.channels_last), "conv_fwd: output lost channels_last"
    if not want_stats:
        assert partials is None
        return
    # Statistics are of y as stored: compare with the float64 statistics of the returned y.
    assert partials.dim() == 3 and partials.shape[0] == 3 and partials.shape[2] == case.cout
    count, mean, m2 = merged_stats(partials)
    _, mean_y, m2_y = merged_stats(reference.bn_stats(y.to(torch.float64).cpu()))
    assert torch.all(count == y.numel() // case.cout), "conv_fwd stats: counts do not add up to N*Ho*Wo"
    assert_close("conv_fwd stats mean", mean, mean_y, torch.float32)
    assert_close("conv_fwd stats M2", m2, m2_y, torch.float32)


def check_bn_stats_finalize(ops, shape, dtype, device, layout_name, offset=0.0, momentum=0.1, affine=True):
    g = torch.Generator().manual_seed(1)
    n, c, h, w = shape
    x64 = torch.randn(shape, generator=g, dtype=torch.float64) * 0.5 + offset + torch.arange(c, dtype=torch.float64)[:, None, None]
    x = layout(x64.to(device=device, dtype=dtype), layout_name)
    x64 = x.to(torch.float64).cpu()  # statistics of the values as stored
    sdt = reference.stats_dtype(dtype)
    gamma = (torch.rand(c, generator=g, dtype=torch.float64) + 0.5) if affine else None
    beta = torch.randn(c, generator=g, dtype=torch.float64) if affine else None
    rm, rv = torch.randn(c, generator=g, dtype=torch.float64), torch.rand(c, generator=g, dtype=torch.float64) + 0.5
    nbt = torch.tensor(3, dtype=torch.long)
    to_dev = (lambda v: None if v is None else v.to(device=device, dtype=sdt))
    rm_dev, rv_dev = to_dev(rm), to_dev(rv)
    with poisoned_allocations(device):
        partials = ops.bn_stats(x)
        mean, invstd, scale, shift = ops.bn_finalize(partials, to_dev(gamma), to_dev(beta), 1e-5, rm_dev, rv_dev,
                                                     momentum, nbt.to(device))
    ref = reference.bn_finalize(reference.bn_stats(x64), gamma, beta, 1e-5, rm, rv, momentum, nbt)
    for name, a, r in zip(("mean", "invstd", "scale", "shift"), (mean, invstd, scale, shift), ref):
        assert_close(f"bn_finalize {name}", a, r, torch.float32 if dtype != torch.float64 else dtype)
    assert_close("running_mean", rm_dev, rm, torch.float32 if dtype != torch.float64 else dtype)
    assert_close("running_var", rv_dev, rv, torch.float32 if dtype != torch.float64 else dtype)


def check_conv_dgrad(ops, case, dtype, device, layout_name, with_bn, tf32=False):
    inputs = make_inputs(case, dtype, device)
    t = cast(inputs, dtype, device, layout_name)
    keys = ("scale", "shift", "mean")
    bn = tuple(t[k] for k in keys) if with_bn else (None,) * 3
    bn64 = tuple(inputs[k] for k in keys) if with_bn else (None,) * 3
    with poisoned_allocations(device):
        g, sum_g, sum_gx = ops.conv_dgrad(t["dy"], t["w"], t["x"], case.stride, case.padding, *bn)
    g64, sg64, sgx64 = reference.conv_dgrad(inputs["dy"], inputs["w"], inputs["x"], case.stride, case.padding, *bn64)
    same = reference.conv_dgrad(t["dy"], t["w"], t["x"], case.stride, case.padding, *bn)
    assert_close("conv_dgrad g", g, g64, dtype, same[0], tf32)
    if layout_name == "channels_last":
        assert g.is_contiguous(memory_format=torch.channels_last), "conv_dgrad: output lost channels_last"
    if not with_bn:
        assert sum_g is None and sum_gx is None
        return
    assert_close("conv_dgrad sum_g", sum_g, sg64, dtype, same[1], tf32)
    assert_close("conv_dgrad sum_gx", sum_gx, sgx64, dtype, same[2], tf32)


def check_conv_wgrad(ops, case, dtype, device, layout_name, with_bn, tf32=False):
    inputs = make_inputs(case, dtype, device)
    t = cast(inputs, dtype, device, layout_name)
    bn = (t["scale"], t["shift"]) if with_bn else (None, None)
    bn64 = (inputs["scale"], inputs["shift"]) if with_bn else (None, None)
    shape = tuple(inputs["w"].shape)
    with poisoned_allocations(device):
        dw = ops.conv_wgrad(t["x"], t["dy"], shape, case.stride, case.padding, *bn)
    dw64 = reference.conv_wgrad(inputs["x"], inputs["dy"], shape, case.stride, case.padding, *bn64)
    same = reference.conv_wgrad(t["x"], t["dy"], shape, case.stride, case.padding, *bn)
    assert_close("conv_wgrad dw", dw, dw64, dtype, same, tf32)


def check_bn_backward(ops, case, dtype, device, layout_name, training, with_residual):
    inputs = make_inputs(case, dtype, device)
    t = cast(inputs, dtype, device, layout_name)
    g = torch.Generator().manual_seed(2)
    g64 = torch.randn(inputs["x"].shape, generator=g, dtype=torch.float64)
    d_res64 = torch.randn(inputs["x"].shape, generator=g, dtype=torch.float64)
    sums64 = (g64.sum((0, 2, 3)), (g64 * (inputs["x"] - inputs["mean"][:, None, None])).sum((0, 2, 3)))
    grad = layout(g64.to(device=device, dtype=dtype), layout_name)
    d_res = layout(d_res64.to(device=device, dtype=dtype), layout_name) if with_residual else None
    sums = tuple(s.to(device=device, dtype=reference.stats_dtype(dtype)) for s in sums64)
    args = (t["mean"], t["invstd"], t["scale"])
    with poisoned_allocations(device):
        dx = ops.bn_backward(grad, t["x"], *args, *sums, training, d_res)
    dx64 = reference.bn_backward(g64, inputs["x"], inputs["mean"], inputs["invstd"], inputs["scale"], *sums64,
                                 training, d_res64 if with_residual else None)
    same = reference.bn_backward(grad, t["x"], *args, *sums, training, d_res)
    assert_close("bn_backward dx", dx, dx64, dtype, same)


def check_on_second_device(ops):
    """Every contract with its tensors on cuda:1 while cuda:0 is the current device (needs 2 GPUs):
    the kernels must run where the tensors are, on that device's stream."""
    case = ODD_CASES[1]
    with torch.cuda.device(0):
        check_conv_fwd(ops, case, torch.float32, "cuda:1", "channels_last", True, True, True)
        check_conv_dgrad(ops, case, torch.float32, "cuda:1", "channels_last", True)
        check_conv_wgrad(ops, case, torch.float32, "cuda:1", "channels_last", True)
        check_bn_stats_finalize(ops, (3, 17, 9, 9), torch.float32, "cuda:1", "channels_last")
        check_bn_backward(ops, case, torch.float32, "cuda:1", "channels_last", training=True, with_residual=True)


def opcheck_samples(dtype, device):
    """Arguments for torch.library.opcheck of each op of the CUDA extension's schema, by op name.

    Every optional input both given and None, statistics partials (from the reference), the running
    statistics updated in place with a momentum and with ``momentum=None``, and conv_fwd with
    inputs that require grad (its registered autograd).
    """
    case = ConvCase(2, 16, 24, 9, 9, 3, 2)
    t = cast(make_inputs(case, dtype, device), dtype, device, "channels_last")
    x, w, dy = t["x"], t["w"], t["dy"]
    scale, shift, mean, invstd = t["scale"], t["shift"], t["mean"], t["invstd"]
    partials = reference.bn_stats(x)
    c = x.shape[1]
    grad_inputs = [v.detach().clone().requires_grad_() for v in (x, w, scale, shift, t["residual"])]

    def running():
        return torch.zeros(c, device=device), torch.ones(c, device=device)

    return {
        "conv_fwd": [(x, w, 2, 1, scale, shift, t["residual"], True), (x, w, 2, 1, None, None, None, False),
                     (*grad_inputs[:2], 2, 1, *grad_inputs[2:], False)],
        "bn_stats": [(x,)],
        "bn_finalize": [(partials, t["gamma"], t["beta"], 1e-5, *running(), 0.1, None),
                        (partials, None, None, 1e-5, *running(), None, torch.tensor(3, device=device))],
        "conv_dgrad": [(dy, w, x, 2, 1, scale, shift, mean), (dy, w, x, 2, 1, None, None, None)],
        "conv_wgrad": [(x, dy, list(w.shape), 2, 1, scale, shift), (x, dy, list(w.shape), 2, 1, None, None)],
        "bn_backward": [(x, x, mean, invstd, scale, mean, invstd, True, x),
                        (x, x, mean, invstd, scale, mean, invstd, False, None)],
    }


def check_compiled_unit(ops, device):
    """Two fused convs joined by bn_finalize, under torch.compile(fullgraph=True): no graph break
    (the backend's wrappers and its ops' fakes trace) and the eager result, bit for bit."""
    case = ConvCase(4, 32, 32, 16, 16, 3, 1)
    t = cast(make_inputs(case, torch.bfloat16, device), torch.bfloat16, device, "channels_last")

    def unit(x, w, scale, shift, residual):
        y, partials = ops.conv_fwd(x, w, 1, 1, scale, shift, residual, True)
        mean, invstd, s2, b2 = ops.bn_finalize(partials, None, None, 1e-5)
        return ops.conv_fwd(y, w, 1, 1, s2, b2, None, False)[0]

    args = (t["x"], t["w"], t["scale"], t["shift"], t["residual"])
    compiled = torch.compile(unit, fullgraph=True, dynamic=False)
    assert torch.equal(compiled(*args), unit(*args))


def check_conv_fwd_autograd(ops, device):
    """The gradients of ops.conv_fwd (its own registered autograd) against the reference's autograd
    in float64: x, w, scale, shift and residual, odd sizes, stride 2."""
    case = ConvCase(2, 17, 5, 9, 9, 3, 2)
    inputs = make_inputs(case, torch.float64, "cpu")
    leaves64 = {k: inputs[k].clone().requires_grad_() for k in ("x", "w", "scale", "shift", "residual")}
    leaves = {k: v.detach().to(device, torch.float32).requires_grad_() for k, v in leaves64.items()}
    for leaf_set, fn in ((leaves64, reference.conv_fwd), (leaves, ops.conv_fwd)):
        y, _ = fn(leaf_set["x"], leaf_set["w"], 2, 1, leaf_set["scale"], leaf_set["shift"], leaf_set["residual"])
        (y * inputs["dy"].to(y.device, y.dtype)).sum().backward()
    for k in leaves:
        got, want = leaves[k].grad.double().cpu(), leaves64[k].grad
        assert (got - want).abs().max() <= 1e-4 * want.abs().max(), k
