"""A fused BNReLUConv2d against its unfused twin, nn.Sequential(BatchNorm2d, ReLU, Conv2d) with the same state.

Shared by test_properties.py and test_degenerate.py. The twin runs in float64 on the same values;
the fused module in its backend's dtype (float64 on the reference backend, float32 on Triton and
CUDA). Tolerance: 1e-9 (float64) or 1e-4 (float32, exact) of the largest magnitude of the twin's
tensor, or, where that is larger, 4x the error of the twin itself run in the fused module's dtype
(a gradient that cancels to nearly zero has the rounding of its terms); NaN and inf must sit where
the twin has them; num_batches_tracked is exact. Where the
twin raises, the fused module must raise the same exception type with the same message.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

RTOL = {torch.float64: 1e-9, torch.float32: 1e-4}


def backend_dtype(backend: str) -> torch.dtype:
    return torch.float64 if backend == "reference" else torch.float32


def twin_of(module: nn.Module) -> nn.Sequential:
    """nn.Sequential(bn, ReLU, conv) with copies of the module's state, in float64."""
    return nn.Sequential(copy.deepcopy(module.bn), nn.ReLU(), copy.deepcopy(module.conv)).double()


@dataclass
class Outcome:
    """What one forward + backward did: the error raised, or the output, the gradients and the buffers."""
    error: tuple[type, str] | None = None
    y: torch.Tensor | None = None
    grads: dict | None = None
    buffers: dict | None = None


def run(model: nn.Module, x: torch.Tensor, dy: torch.Tensor | None) -> Outcome:
    """model(x) (x keeps its layout), then backward of dy when given; buffers as they end up."""
    x = x.detach().requires_grad_()
    try:
        y = model(x)
        if dy is not None:
            y.backward(dy.to(y.dtype))
    except (RuntimeError, ValueError, TypeError) as err:
        return Outcome(error=(type(err), str(err)), buffers=_buffers(model))
    grads = {"x": x.grad, **{_name(n): p.grad for n, p in model.named_parameters()}}
    return Outcome(y=y.detach(), grads=grads, buffers=_buffers(model))


_TWIN_CHILDREN = {"0": "bn", "2": "conv"}


def _name(name: str) -> str:
    """bn.* / conv.* for both the fused module and the twin (whose children are 0 and 2)."""
    head, _, rest = name.partition(".")
    return f"{_TWIN_CHILDREN.get(head, head)}.{rest}"


def _buffers(model: nn.Module) -> dict:
    return {_name(n): b.detach().clone() for n, b in model.named_buffers()}


def assert_close(name: str, actual: torch.Tensor | None, expected: torch.Tensor | None, dtype: torch.dtype,
                 same: torch.Tensor | None = None) -> None:
    """actual vs expected (float64) within RTOL[dtype] of its magnitude, or 4x the error of ``same``
    (PyTorch's result in dtype)."""
    if expected is None or actual is None:
        assert actual is None and expected is None, f"{name}: {actual} vs {expected}"
        return
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if not actual.is_floating_point():
        assert torch.equal(actual.cpu(), expected.cpu()), f"{name}: {actual} != {expected}"
        return
    a, e = actual.detach().cpu().double(), expected.detach().cpu().double()
    for what, mask_a, mask_e in (("NaN", a.isnan(), e.isnan()), ("inf", a.isinf(), e.isinf())):
        assert torch.equal(mask_a, mask_e), (f"{name}: {int(mask_a.sum())} {what} where PyTorch has "
                                             f"{int(mask_e.sum())}, not at the same positions")
    finite = e.isfinite()
    assert torch.equal(a[e.isinf()], e[e.isinf()]), f"{name}: inf of the other sign"
    if not finite.any():
        return
    err = (a[finite] - e[finite]).abs().max().item()
    bound = RTOL[dtype] * e[finite].abs().max().item()
    if same is not None:
        bound = max(bound, 4 * (same.detach().cpu().double()[finite] - e[finite]).abs().max().item())
    assert err <= bound, f"{name}: error {err:.3e} > {bound:.3e} ({dtype}, {RTOL[dtype]:.0e} of the magnitude)"


def assert_matches(fused: Outcome, twin: Outcome, dtype: torch.dtype, same: Outcome | None = None) -> None:
    """The fused outcome is the twin's: same error, or same output, layout (of a non-empty output),
    gradients and buffers. (After an error the buffers are not compared: PyTorch counts the batch
    in num_batches_tracked before refusing one value per channel; the fused module refuses first.)
    ``same``: the twin's outcome in dtype, for the tolerance."""
    if twin.error is not None or fused.error is not None:
        assert fused.error == twin.error, f"fused: {fused.error}; PyTorch: {twin.error}"
        return
    same = same if same is not None and same.error is None else None
    assert_close("output", fused.y, twin.y, dtype, same and same.y)
    if twin.y.numel():
        for fmt in (torch.contiguous_format, torch.channels_last):
            assert fused.y.is_contiguous(memory_format=fmt) == twin.y.is_contiguous(memory_format=fmt), \
                f"output layout: {fused.y.stride()} vs PyTorch's {twin.y.stride()}"
    assert fused.grads.keys() == twin.grads.keys()
    for key in twin.grads:
        assert_close(f"grad {key}", fused.grads[key], twin.grads[key], dtype, same and same.grads[key])
    assert fused.buffers.keys() == twin.buffers.keys()
    for key in twin.buffers:
        assert_close(key, fused.buffers[key], twin.buffers[key], dtype, same and same.buffers[key])


def compare(module: nn.Module, x: torch.Tensor, dy: torch.Tensor | None, dtype: torch.dtype) -> tuple[Outcome, Outcome]:
    """Run the twin (float64, and in dtype when that is not float64; made before the module runs)
    and the module on x (in dtype and its layout); assert they match. Returns (module's, twin's)."""
    twin = twin_of(module).train(module.training)
    same = None
    if dtype != torch.float64:
        same = run(twin_of(module).to(dtype).train(module.training), x, dy)
    expected = run(twin, x.double(), None if dy is None else dy.double())
    actual = run(module, x, dy)
    assert_matches(actual, expected, dtype, same)
    return actual, expected
