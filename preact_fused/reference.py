"""The kernel contract (``preact_fused.contract``) in plain PyTorch: the ground truth of the tests.

Runs on any device and in any floating dtype, float64 included. The statistics, folds and sums use
the contract's own torch formulas (``contract.summarize``, ``fold_from_summary``, ...), so the
definition of each quantity exists once; the convolutions are torch's.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import contract
from .contract import INVSTD, MEAN, SCALE, SHIFT, keep_format, stats_dtype

__all__ = list(contract.OPS)


def unavailable_reason(device) -> None:
    """The reference runs wherever PyTorch does."""
    return None


def bn_z(x, fold):
    """z = fma(x, scale, shift) per channel in the statistics dtype: the ReLU's input."""
    return torch.addcmul(fold[SHIFT][:, None, None], x.to(fold.dtype), fold[SCALE][:, None, None])


def preact(x, fold):
    """P(x): relu(z) (PyTorch's ReLU: NaN kept) rounded to x's dtype; x itself without a fold.

    x: [N, C, H, W]; fold: [4, C] or None (the identity loader).
    """
    if fold is None:
        return x
    return torch.relu(bn_z(x, fold)).to(x.dtype)


def _rows(t):
    """[N, C, H, W] -> [N*H*W, C] in the statistics dtype (NHWC order of rows)."""
    return t.to(stats_dtype(t.dtype)).permute(0, 2, 3, 1).reshape(-1, t.shape[1])


def bn_stats(x):
    """The summary [4, C] of x [N, C, H, W] (count, pivot, offset, M2)."""
    return contract.summarize(_rows(x))


def bn_fold(stats=None, gamma=None, beta=None, running_mean=None, running_var=None, num_batches_tracked=None,
            eps: float = 1e-5, momentum: float | None = 0.1, update_running: bool = False):
    """The fold [4, C] of batch statistics ``stats`` (updating the running ones when asked) or of the
    running statistics (``stats`` None)."""
    if stats is None:
        return contract.fold_from_running(running_mean, running_var, gamma, beta, eps, stats_dtype(running_mean.dtype))
    if update_running:
        with torch.no_grad():
            contract.update_running(stats, running_mean, running_var, num_batches_tracked, momentum)
    return contract.fold_from_summary(stats, gamma, beta, eps)


def conv_fwd(x, weight, stride: int, padding: int, stats=None, fold=None, gamma=None, beta=None,
             running_mean=None, running_var=None, num_batches_tracked=None, eps: float = 1e-5,
             momentum: float | None = 0.1, update_running: bool = False, residual=None, want_stats: bool = False):
    """(y, stats of y or None, fold used or None): y = conv2d(P(x), weight) [+ residual].

    x: [N, Cin, H, W]; weight: [Cout, Cin, KH, KW]; residual: [N, Cout, Ho, Wo]. The BatchNorm of x
    comes as ``stats``, ``fold`` or running statistics (see the contract); the returned fold is the
    one computed here (None when ``fold`` was given or there is no BatchNorm).
    """
    new_fold = None
    if fold is None and (stats is not None or running_mean is not None):
        fold = new_fold = bn_fold(stats, gamma, beta, running_mean, running_var, num_batches_tracked, eps,
                                  momentum, update_running)
    y = F.conv2d(preact(x, fold), weight.to(x.dtype), stride=stride, padding=padding)
    if residual is not None:
        y = y + residual
    y = keep_format(y, x)
    return y, (bn_stats(y) if want_stats else None), new_fold


def conv_dgrad(dy, weight, x, stride: int, padding: int, fold=None):
    """(g, sums) or (dx, None): the gradient through the convolution, masked by the BN-ReLU.

    dy: [N, Cout, Ho, Wo]; x: [N, Cin, H, W], the pre-BN input (it fixes H, W). With ``fold``:
    g = dP masked by the ReLU [N, Cin, H, W] in dy's dtype and sums [3, Cin] (sum_g, sum_gx, dgamma),
    summed before g is rounded. Without: the plain input gradient.
    """
    da = torch.nn.grad.conv2d_input(x.shape, weight.to(dy.dtype), dy, stride=stride, padding=padding)
    if fold is None:
        return keep_format(da, dy), None
    g, sums = masked_grad_and_sums(da, x, fold)
    return keep_format(g.to(dy.dtype), dy), sums


def masked_grad_and_sums(da, x, fold):
    """g = PyTorch's ReLU backward of da at z (0 where z <= 0; NaN z passes), in the statistics
    dtype, and its sums [3, C]: the BN-ReLU backward up to bn_backward."""
    g = torch.ops.aten.threshold_backward(da.to(fold.dtype), bn_z(x, fold), 0)
    sum_g = g.sum((0, 2, 3))
    sum_gx = (g * (x.to(fold.dtype) - fold[MEAN][:, None, None])).sum((0, 2, 3))
    return g, torch.stack([sum_g, sum_gx, sum_gx * fold[INVSTD]])


def conv_wgrad(x, dy, weight, stride: int, padding: int, fold=None):
    """dW (weight's shape and memory format, statistics dtype): sum over output positions of P(x) (x) dy."""
    acc = stats_dtype(dy.dtype)
    a = preact(x, fold).to(acc)
    dw = torch.nn.grad.conv2d_weight(a, tuple(weight.shape), dy.to(acc), stride=stride, padding=padding)
    return contract.weight_grad_like(weight, x).copy_(dw)


def conv_wgrad_bn_backward(x, g, weight, stride: int, padding: int, fold, bn_x, bn_fold, bn_sums, count: float,
                           training: bool = True):
    """(dW, dy): conv_wgrad of dy = bn_backward(g, bn_x, bn_fold, bn_sums, count, training), and dy."""
    dy = bn_backward(g, bn_x, bn_fold, bn_sums, count, training)
    return conv_wgrad(x, dy, weight, stride, padding, fold), dy


def bn_backward(g, x, fold, sums, count: float, training: bool = True, d_residual=None):
    """dx = scale g + B x + C [+ d_residual] in x's dtype and format.

    B = -scale invstd^2 sum_gx / count, C = -scale sum_g / count - B mean (training); B = C = 0 with
    running statistics. g, x, d_residual: [N, C, H, W]; fold: [4, C]; sums: [3, C].
    """
    mean, invstd, scale, _ = fold
    dx = g.to(fold.dtype) * scale[:, None, None]
    if training:
        b = -scale * invstd * invstd * sums[contract.SUM_GX] / count
        c = -scale * sums[contract.SUM_G] / count - b * mean
        dx = dx + x.to(fold.dtype) * b[:, None, None] + c[:, None, None]
    if d_residual is not None:
        dx = dx + d_residual.to(fold.dtype)
    return keep_format(dx.to(x.dtype), x)
