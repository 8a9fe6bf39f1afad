"""The autograd Function of a fused BN-ReLU-conv triple, and the BatchNorm bookkeeping around it.

Saved for backward: the pre-BN input x, the weight and per-channel vectors (mean, invstd, scale,
shift, gamma, beta). Not relu(bn(x)): dgrad and wgrad recompute it from x. The batch statistics are
computed outside the Function without autograd (from partials or ``bn_stats``); their gradient is
part of ``bn_backward``'s formula, so ``mean``/``invstd`` get none.

Two triples may share one BatchNorm (a projection shortcut reading the same activation): call
``batch_norm_params`` once (one running-stat update) and ``bn_relu_conv2d`` twice; autograd adds the
two dx and the two dgamma/dbeta, which is exact because the BN backward is linear in the masked
gradient.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from . import backend as _backend
from .reference import stats_dtype


class BNParams(NamedTuple):
    """Per-channel BatchNorm state for one forward: all [C], statistics dtype, no autograd history."""
    mean: torch.Tensor
    invstd: torch.Tensor
    scale: torch.Tensor
    shift: torch.Tensor
    gamma: torch.Tensor | None   # the module's weight (a Parameter) or None when affine=False
    beta: torch.Tensor | None    # the module's bias or None
    training: bool               # batch statistics (True) or running statistics (False)


def batch_norm_params(bn: nn.BatchNorm2d, x: torch.Tensor, partials, ops) -> BNParams:
    """Fold ``bn`` applied to x [N, C, H, W] into per-channel scale/shift, exactly as nn.BatchNorm2d.

    partials: statistics partials [3, T, C] of x from its producer, or None (then ``bn_stats``
    reads x). Updates the running statistics and ``num_batches_tracked`` like nn.BatchNorm2d does.
    """
    use_batch_stats = bn.training or bn.running_mean is None
    with torch.no_grad():
        if use_batch_stats:
            update = bn.training and bn.track_running_stats
            if update and bn.num_batches_tracked is not None:
                bn.num_batches_tracked.add_(1)
            if partials is None:
                partials = ops.bn_stats(x)
            mean, invstd, scale, shift = ops.bn_finalize(
                partials, bn.weight, bn.bias, bn.eps,
                bn.running_mean if update else None, bn.running_var if update else None,
                bn.momentum, bn.num_batches_tracked)
        else:
            dtype = stats_dtype(x.dtype)
            mean = bn.running_mean.to(dtype)
            invstd = torch.rsqrt(bn.running_var.to(dtype) + bn.eps)
            scale = invstd if bn.weight is None else bn.weight.to(dtype) * invstd
            shift = -mean * scale if bn.bias is None else bn.bias.to(dtype) - mean * scale
    return BNParams(mean, invstd, scale, shift, bn.weight, bn.bias, use_batch_stats)


class _FusedConv2d(torch.autograd.Function):
    """y = conv2d(P(x), w) [+ residual] with P = relu(bn(x)) (bn given) or identity (bn None)."""

    @staticmethod
    def forward(ctx, x, weight, gamma, beta, residual, bn: BNParams | None, stride, padding, want_stats, ops):
        scale, shift = (None, None) if bn is None else (bn.scale, bn.shift)
        y, partials = ops.conv_fwd(x, weight, stride, padding, scale, shift, residual, want_stats)
        if bn is None:
            ctx.save_for_backward(x, weight)
        else:
            ctx.save_for_backward(x, weight, bn.mean, bn.invstd, bn.scale, bn.shift)
        ctx.bn_training = None if bn is None else bn.training
        ctx.conv = (stride, padding)
        ctx.has_residual = residual is not None
        ctx.ops = ops
        if partials is not None:
            ctx.mark_non_differentiable(partials)
        return y, partials

    @staticmethod
    def backward(ctx, dy, _dpartials):
        ops, (stride, padding) = ctx.ops, ctx.conv
        x, weight, *vectors = ctx.saved_tensors
        mean, invstd, scale, shift = vectors if vectors else (None,) * 4
        dx = dgamma = dbeta = dw = None
        needs_x, needs_w, needs_gamma, needs_beta = ctx.needs_input_grad[:4]
        if needs_x or needs_gamma or needs_beta:
            g, sum_g, sum_gx = ops.conv_dgrad(dy, weight, x, stride, padding, scale, shift, mean)
            if scale is None:
                dx = g
            else:
                if needs_x:
                    dx = ops.bn_backward(g, x, mean, invstd, scale, sum_g, sum_gx, ctx.bn_training)
                dgamma = sum_gx * invstd if needs_gamma else None
                dbeta = sum_g if needs_beta else None
        if needs_w:
            dw = ops.conv_wgrad(x, dy, weight.shape, stride, padding, scale, shift).to(weight.dtype)
        d_residual = dy if ctx.has_residual and ctx.needs_input_grad[4] else None
        return dx, dw, dgamma, dbeta, d_residual, None, None, None, None, None


def bn_relu_conv2d(x, conv: nn.Conv2d, bn: BNParams | None, ops, residual=None, want_stats=False):
    """conv(relu(bn(x))) [+ residual] with bn folded into ``bn`` (None: conv(x), the identity loader).

    x: [N, Cin, H, W]; residual: [N, Cout, Ho, Wo] or None. Returns (y, partials of y or None).
    The conv's bias, if any, is added after the fused op (the statistics then exclude it: only
    the package's own models ask for statistics, and their convs have no bias).
    """
    stride, padding = conv_geometry(conv)
    gamma = beta = None
    if bn is not None:
        gamma, beta = bn.gamma, bn.beta
    y, partials = _FusedConv2d.apply(x, conv.weight, gamma, beta, residual, bn, stride, padding,
                                     want_stats, ops)
    if conv.bias is not None:
        if want_stats:
            raise ValueError("statistics of a conv output with bias are not supported")
        y = y + conv.bias.to(y.dtype)[:, None, None]
    return y, partials


def conv_geometry(conv: nn.Conv2d) -> tuple[int, int]:
    """(stride, padding) of a Conv2d the fused op supports; ValueError naming what it does not."""
    problems = []
    if conv.groups != 1:
        problems.append(f"groups={conv.groups}")
    if tuple(conv.dilation) != (1, 1):
        problems.append(f"dilation={tuple(conv.dilation)}")
    if conv.padding_mode != "zeros":
        problems.append(f"padding_mode={conv.padding_mode!r}")
    stride = tuple(conv.stride)
    if stride[0] != stride[1]:
        problems.append(f"stride={stride} (unequal)")
    padding = conv.padding
    if padding == "valid":
        padding = (0, 0)
    elif padding == "same":
        kh, kw = conv.kernel_size
        if stride != (1, 1) or kh % 2 == 0 or kw % 2 == 0:
            problems.append("padding='same' with even kernel or stride")
            padding = (0, 0)
        else:
            padding = (kh // 2, kw // 2)
    if padding[0] != padding[1]:
        problems.append(f"padding={tuple(padding)} (unequal)")
    if problems:
        raise ValueError("preact_fused supports plain convolutions only; unsupported: " + ", ".join(problems))
    return stride[0], padding[0]


def check_input(x: torch.Tensor, conv: nn.Conv2d) -> None:
    """Clear errors for inputs the fused op would otherwise get wrong."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"expected a tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"expected a 4-D input [N, C, H, W], got {x.dim()}-D of shape {tuple(x.shape)}")
    if x.shape[1] != conv.in_channels:
        raise ValueError(f"expected {conv.in_channels} input channels, got {x.shape[1]} (shape {tuple(x.shape)})")
    if not x.is_floating_point():
        raise TypeError(f"expected a floating-point input, got {x.dtype}")
    weight = conv.weight
    if x.device != weight.device:
        raise RuntimeError(f"input is on {x.device} but the parameters are on {weight.device}")
    if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
        raise TypeError(f"input dtype {x.dtype} does not match parameter dtype {weight.dtype}")


def resolve_ops(name: str, x: torch.Tensor):
    """The backend module for setting ``name`` and the device of x."""
    return _backend.resolve(name, x.device)
