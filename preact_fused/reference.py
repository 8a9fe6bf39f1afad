"""The kernel contracts in plain PyTorch: the ground truth every backend is tested against.

Runs on any device and in any floating dtype (float64 included). Every fast backend
(``preact_fused.triton``, ``preact_fused.cuda``) implements these six functions with the same
signatures and the same meaning; see DESIGN.md section 3.

Conventions shared by all backends
----------------------------------
* Activations are logical NCHW tensors ``[N, C, H, W]`` in any memory format; backends that work in
  NHWC make them channels_last themselves. Outputs keep the memory format of the activation input
  (``x`` for forward ops, ``dy`` for gradient ops).
* Weights are torch's ``[Cout, Cin, KH, KW]``; a backend packs them as it likes.
* ``scale`` / ``shift`` / ``mean`` / ``invstd``: ``[C]`` float32 (float64 when the activations are
  float64). ``scale is None`` selects the identity loader (a plain convolution).
* Statistics partials: float32 (float64 for float64 data) tensor ``[3, T, C]`` holding, per row tile
  ``t``, the element count, the mean and the sum of squared deviations (M2) of each channel. ``T`` is
  the backend's choice; ``bn_finalize`` merges any ``T`` with Chan's formula, never sum / sum-of-squares.
* The BN activation is ``relu(x * scale + shift)`` computed in the statistics dtype and rounded to the
  activation dtype before the convolution; the convolution's zero padding is applied after it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["conv_fwd", "bn_stats", "bn_finalize", "conv_dgrad", "conv_wgrad", "bn_backward"]


def unavailable_reason(device) -> None:
    """The reference runs wherever PyTorch does."""
    return None


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of statistics, scale and shift for activations of ``dtype``: float32, or float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def preact(x, scale, shift):
    """P(x): relu(x * scale + shift) rounded to x's dtype, or x itself for the identity loader."""
    if scale is None:
        return x
    z = x.to(scale.dtype) * scale[:, None, None] + shift[:, None, None]
    return torch.relu(z).to(x.dtype)


def _relu_mask(x, scale, shift):
    """The ReLU mask of the forward, recomputed with exactly the forward's arithmetic."""
    z = x.to(scale.dtype) * scale[:, None, None] + shift[:, None, None]
    return z > 0


def _keep_format(out, like):
    """``out`` in the memory format of ``like`` (channels_last stays channels_last)."""
    if like.dim() == 4 and like.is_contiguous(memory_format=torch.channels_last) and not like.is_contiguous():
        return out.contiguous(memory_format=torch.channels_last)
    return out.contiguous()


def _tile_stats(y, rows_per_tile: int | None = None):
    """Per-row-tile (count, mean, M2) of each channel of y ``[N, C, H, W]`` -> ``[3, T, C]``.

    A "row" is one NHWC pixel; tiles are consecutive runs of ``rows_per_tile`` pixels (the last may
    be shorter). The reference uses one tile per image unless told otherwise.
    """
    n, c, h, w = y.shape
    rows = y.to(stats_dtype(y.dtype)).permute(0, 2, 3, 1).reshape(n * h * w, c)
    per = rows_per_tile or h * w
    out = []
    for tile in rows.split(per):
        mean = tile.mean(0)
        m2 = ((tile - mean) ** 2).sum(0)
        out.append(torch.stack([torch.full_like(mean, tile.shape[0]), mean, m2]))
    return torch.stack(out, dim=1)


def conv_fwd(x, weight, stride: int, padding: int, scale=None, shift=None, residual=None,
             want_stats: bool = False):
    """y = conv2d(P(x), weight) [+ residual]; optionally the statistics partials of y as stored.

    x: [N, Cin, H, W]; weight: [Cout, Cin, KH, KW]; scale, shift: [Cin] or None;
    residual: [N, Cout, Ho, Wo] or None. Returns (y [N, Cout, Ho, Wo] in x's dtype,
    partials [3, T, Cout] or None).
    """
    y = F.conv2d(preact(x, scale, shift), weight.to(x.dtype), stride=stride, padding=padding)
    if residual is not None:
        y = y + residual
    y = _keep_format(y, x)
    return y, (_tile_stats(y) if want_stats else None)


def bn_stats(x):
    """Statistics partials [3, T, C] of x [N, C, H, W] (for a BN whose producer is not ours)."""
    return _tile_stats(x)


def bn_finalize(partials, weight, bias, eps: float, running_mean=None, running_var=None,
                momentum: float | None = 0.1, num_batches_tracked=None):
    """Merge partials, return (mean, invstd, scale, shift), each [C]; update running stats in place.

    partials: [3, T, C]; weight, bias: [C] (gamma, beta) or None for affine=False.
    running_mean, running_var: [C] buffers updated in place when given (biased-to-unbiased variance
    correction M/(M-1)); the update factor is ``momentum``, or 1/num_batches_tracked when momentum is
    None (num_batches_tracked: 0-dim tensor, already incremented by the caller). No host sync.
    """
    count, mean, m2 = partials.unbind(0)
    total = count.sum(0)
    merged_mean = (count * mean).sum(0) / total
    merged_m2 = (m2 + count * (mean - merged_mean) ** 2).sum(0)
    var = merged_m2 / total
    invstd = torch.rsqrt(var + eps)
    scale = invstd if weight is None else weight.to(invstd.dtype) * invstd
    shift = -merged_mean * scale if bias is None else bias.to(invstd.dtype) - merged_mean * scale
    if running_mean is not None:
        factor = momentum if momentum is not None else 1.0 / num_batches_tracked.to(var.dtype)
        with torch.no_grad():
            unbiased = var * total / (total - 1).clamp_min(1)
            running_mean.mul_(1 - factor).add_((merged_mean * factor).to(running_mean.dtype))
            running_var.mul_(1 - factor).add_((unbiased * factor).to(running_var.dtype))
    return merged_mean, invstd, scale, shift


def conv_dgrad(dy, weight, x, stride: int, padding: int, scale=None, shift=None, mean=None):
    """Gradient through the convolution, with the BN-ReLU mask and BN-backward sums in the epilogue.

    dy: [N, Cout, Ho, Wo]; weight: [Cout, Cin, KH, KW]; x: [N, Cin, H, W], the pre-BN input
    (its shape fixes H, W where stride 2 leaves them ambiguous). With scale/shift/mean ([Cin]):
    returns (g, sum_g, sum_gx) where g = dP(x) * (x*scale + shift > 0) [N, Cin, H, W] in dy's
    dtype, sum_g = sum(g) and sum_gx = sum(g * (x - mean)) [Cin] in the statistics dtype, both summed
    before g is rounded. With the identity loader (scale None): returns (dx, None, None).
    """
    da = torch.nn.grad.conv2d_input(x.shape, weight.to(dy.dtype), dy, stride=stride, padding=padding)
    if scale is None:
        return _keep_format(da, dy), None, None
    g, sum_g, sum_gx = masked_grad_and_sums(da, x, scale, shift, mean)
    return _keep_format(g.to(dy.dtype), dy), sum_g, sum_gx


def masked_grad_and_sums(da, x, scale, shift, mean):
    """g = da * (x*scale + shift > 0), sum_g, sum_gx: the BN-ReLU backward up to bn_backward.

    da, x: [N, C, H, W]; scale, shift, mean: [C]. g, sum_g and sum_gx in the statistics dtype.
    """
    g = da.to(scale.dtype) * _relu_mask(x, scale, shift)
    sum_g = g.sum((0, 2, 3))
    sum_gx = (g * (x.to(scale.dtype) - mean[:, None, None])).sum((0, 2, 3))
    return g, sum_g, sum_gx


def conv_wgrad(x, dy, weight_shape, stride: int, padding: int, scale=None, shift=None):
    """dW = sum over output positions of P(x) (x) dy, P recomputed from the pre-BN input x.

    x: [N, Cin, H, W]; dy: [N, Cout, Ho, Wo]; weight_shape: (Cout, Cin, KH, KW).
    Returns dW [Cout, Cin, KH, KW] in the statistics dtype (fp32 accumulation).
    """
    a = preact(x, scale, shift)
    acc = stats_dtype(dy.dtype)
    return torch.nn.grad.conv2d_weight(a.to(acc), weight_shape, dy.to(acc), stride=stride, padding=padding)


def bn_backward(g, x, mean, invstd, scale, sum_g, sum_gx, training: bool = True, d_residual=None):
    """dx = A*g + B*x + C [+ d_residual], the BatchNorm backward given the masked gradient g.

    g, x, d_residual: [N, C, H, W]; mean, invstd, scale, sum_g, sum_gx: [C].
    A = scale, B = -scale*invstd^2*sum_gx/M, C = -scale*sum_g/M - B*mean with M = N*H*W;
    in eval mode (running statistics, constants) B = C = 0. Returns dx in x's dtype.
    """
    a = scale
    if training:
        m = g.numel() // g.shape[1]
        b = -scale * invstd * invstd * sum_gx / m
        c = -scale * sum_g / m - b * mean
        dx = g.to(a.dtype) * a[:, None, None] + x.to(a.dtype) * b[:, None, None] + c[:, None, None]
    else:
        dx = g.to(a.dtype) * a[:, None, None]
    if d_residual is not None:
        dx = dx + d_residual.to(a.dtype)
    return _keep_format(dx.to(x.dtype), x)
