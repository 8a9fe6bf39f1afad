"""The Triton kernels as torch.library ops (namespace ``preact_fused_triton``) and the six contracts.

Each kernel family is one custom op with a fake (meta) implementation, so ``torch.compile`` traces
through the fused modules without graph breaks and the ops can be captured in CUDA graphs: outputs
are allocated inside the ops, no op reads a value back to the host. Ops always return channels_last
activations (the fake implementations say so); the contract functions below then give an output the
memory format of its activation input, exactly as ``preact_fused.reference`` does.

fp32 precision: exact fp32 dot products by default. TF32 tensor cores are used for fp32 when
``set_fp32_precision("tf32")`` was called or the environment variable ``PREACT_FUSED_TF32=1`` is set
(the contract checks then allow 2e-3 instead of 1e-4). bf16/fp16 always use tensor cores with fp32
accumulation.
"""
import os
from typing import Optional, Sequence

import torch
import triton
from torch import Tensor

from . import bn_grad as _bn_grad
from . import conv as _conv
from . import stats as _stats
from .common import STATS_ROWS, check_activation, empty_nhwc, on_device_of

__all__ = ["conv_fwd", "bn_stats", "bn_finalize", "conv_dgrad", "conv_wgrad", "bn_backward",
           "set_fp32_precision", "fp32_precision"]

_FP32_PRECISIONS = ("ieee", "tf32")
_fp32_precision = "tf32" if os.environ.get("PREACT_FUSED_TF32") == "1" else "ieee"


def set_fp32_precision(precision: str) -> None:
    """'ieee' (default: exact fp32 products) or 'tf32' (tensor cores) for float32 convolutions."""
    global _fp32_precision
    if precision not in _FP32_PRECISIONS:
        raise ValueError(f"fp32 precision must be one of {_FP32_PRECISIONS}, got {precision!r}")
    _fp32_precision = precision


def fp32_precision() -> str:
    """The current float32 dot-product precision, 'ieee' or 'tf32'."""
    return _fp32_precision


def _out_hw(x: Tensor, weight: Tensor, stride: int, padding: int):
    kh, kw = weight.shape[2], weight.shape[3]
    return (x.shape[2] + 2 * padding - kh) // stride + 1, (x.shape[3] + 2 * padding - kw) // stride + 1


# ---------------------------------------------------------------------------------------------
# torch.library ops


@torch.library.custom_op("preact_fused_triton::conv_fwd", mutates_args=())
def _conv_fwd_op(x: Tensor, weight: Tensor, stride: int, padding: int, scale: Optional[Tensor],
                 shift: Optional[Tensor], residual: Optional[Tensor], want_stats: bool,
                 tf32: bool) -> tuple[Tensor, Tensor]:
    with on_device_of(x):
        return _conv.conv_fwd(x, weight, stride, padding, scale, shift, residual, want_stats, tf32)


@_conv_fwd_op.register_fake
def _(x, weight, stride, padding, scale, shift, residual, want_stats, tf32):
    ho, wo = _out_hw(x, weight, stride, padding)
    cout = weight.shape[0]
    tiles = triton.cdiv(x.shape[0] * ho * wo, STATS_ROWS) if want_stats else 0
    return (empty_nhwc(x.shape[0], cout, ho, wo, x),
            x.new_empty((3, tiles, cout), dtype=torch.float32))


@torch.library.custom_op("preact_fused_triton::bn_stats", mutates_args=())
def _bn_stats_op(x: Tensor) -> Tensor:
    with on_device_of(x):
        return _stats.bn_stats(x)


@_bn_stats_op.register_fake
def _(x):
    n, c, h, w = x.shape
    return x.new_empty((3, triton.cdiv(n * h * w, _stats.TILE_ROWS), c), dtype=torch.float32)


@torch.library.custom_op("preact_fused_triton::bn_finalize", mutates_args=("running_mean", "running_var"))
def _bn_finalize_op(partials: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
                    running_mean: Optional[Tensor], running_var: Optional[Tensor], momentum: Optional[float],
                    num_batches_tracked: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    with on_device_of(partials):
        return _stats.bn_finalize(partials, weight, bias, eps, running_mean, running_var, momentum,
                                  num_batches_tracked)


@_bn_finalize_op.register_fake
def _(partials, weight, bias, eps, running_mean, running_var, momentum, num_batches_tracked):
    return tuple(partials.new_empty((partials.shape[2],), dtype=torch.float32) for _ in range(4))


@torch.library.custom_op("preact_fused_triton::conv_dgrad", mutates_args=())
def _conv_dgrad_op(dy: Tensor, weight: Tensor, x: Tensor, stride: int, padding: int, scale: Optional[Tensor],
                   shift: Optional[Tensor], mean: Optional[Tensor], tf32: bool) -> tuple[Tensor, Tensor]:
    with on_device_of(dy):
        return _conv.conv_dgrad(dy, weight, x, stride, padding, scale, shift, mean, tf32)


@_conv_dgrad_op.register_fake
def _(dy, weight, x, stride, padding, scale, shift, mean, tf32):
    n, cin, h, w = x.shape
    return empty_nhwc(n, cin, h, w, dy), dy.new_empty((2, cin), dtype=torch.float32)


@torch.library.custom_op("preact_fused_triton::conv_wgrad", mutates_args=())
def _conv_wgrad_op(x: Tensor, dy: Tensor, weight_shape: Sequence[int], stride: int, padding: int,
                   scale: Optional[Tensor], shift: Optional[Tensor], tf32: bool) -> Tensor:
    with on_device_of(x):
        return _conv.conv_wgrad(x, dy, tuple(weight_shape), stride, padding, scale, shift, tf32)


@_conv_wgrad_op.register_fake
def _(x, dy, weight_shape, stride, padding, scale, shift, tf32):
    return x.new_empty(tuple(weight_shape), dtype=torch.float32)


@torch.library.custom_op("preact_fused_triton::bn_backward", mutates_args=())
def _bn_backward_op(g: Tensor, x: Tensor, mean: Optional[Tensor], invstd: Optional[Tensor], scale: Tensor,
                    sum_g: Optional[Tensor], sum_gx: Optional[Tensor], training: bool,
                    d_residual: Optional[Tensor]) -> Tensor:
    with on_device_of(x):
        return _bn_grad.bn_backward(g, x, mean, invstd, scale, sum_g, sum_gx, training, d_residual)


@_bn_backward_op.register_fake
def _(g, x, mean, invstd, scale, sum_g, sum_gx, training, d_residual):
    n, c, h, w = x.shape
    return empty_nhwc(n, c, h, w, x)


# ---------------------------------------------------------------------------------------------
# The six contracts (signatures and meaning of preact_fused.reference)


def _keep_format(out: Tensor, like: Tensor) -> Tensor:
    """out (channels_last) in like's memory format: channels_last stays, anything else becomes NCHW."""
    if like.is_contiguous(memory_format=torch.channels_last) and not like.is_contiguous():
        return out
    return out.contiguous()


def _tf32() -> bool:
    return _fp32_precision == "tf32"


def conv_fwd(x, weight, stride: int, padding: int, scale=None, shift=None, residual=None,
             want_stats: bool = False):
    """y = conv2d(P(x), weight) [+ residual]; optionally the statistics partials of y as stored.

    x: [N, Cin, H, W]; weight: [Cout, Cin, KH, KW]; scale, shift: [Cin] fp32 or None;
    residual: [N, Cout, Ho, Wo] or None. Returns (y [N, Cout, Ho, Wo] in x's dtype and format,
    partials [3, cdiv(N*Ho*Wo, STATS_ROWS), Cout] fp32 or None).
    """
    check_activation(x, "x")
    y, partials = _conv_fwd_op(x, weight, stride, padding, scale, shift, residual, want_stats, _tf32())
    return _keep_format(y, x), (partials if want_stats else None)


def bn_stats(x):
    """Statistics partials [3, T, C] fp32 of x [N, C, H, W] (T = cdiv(N*H*W, stats.TILE_ROWS))."""
    check_activation(x, "x")
    return _bn_stats_op(x)


def bn_finalize(partials, weight, bias, eps: float, running_mean=None, running_var=None,
                momentum: float | None = 0.1, num_batches_tracked=None):
    """Merge partials [3, T, C] -> (mean, invstd, scale, shift) [C] fp32; running stats updated in place."""
    return _bn_finalize_op(partials, weight, bias, eps, running_mean, running_var, momentum, num_batches_tracked)


def conv_dgrad(dy, weight, x, stride: int, padding: int, scale=None, shift=None, mean=None):
    """(g [N, Cin, H, W], sum_g [Cin], sum_gx [Cin]) with the BN mask, or (dx, None, None) without BN."""
    check_activation(dy, "dy")
    g, sums = _conv_dgrad_op(dy, weight, x, stride, padding, scale, shift, mean, _tf32())
    g = _keep_format(g, dy)
    if scale is None:
        return g, None, None
    return g, sums[0], sums[1]


def conv_wgrad(x, dy, weight_shape, stride: int, padding: int, scale=None, shift=None):
    """dW [Cout, Cin, KH, KW] fp32 = sum over output positions of P(x) (x) dy."""
    check_activation(x, "x")
    return _conv_wgrad_op(x, dy, list(weight_shape), stride, padding, scale, shift, _tf32())


def bn_backward(g, x, mean, invstd, scale, sum_g, sum_gx, training: bool = True, d_residual=None):
    """dx = A*g + B*x + C [+ d_residual] in x's dtype and format (see reference.bn_backward)."""
    check_activation(x, "x")
    dx = _bn_backward_op(g, x, mean, invstd, scale, sum_g, sum_gx, training, d_residual)
    return _keep_format(dx, x)
