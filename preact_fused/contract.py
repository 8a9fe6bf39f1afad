"""The kernel contract: the ops every backend implements, defined once.

A backend (``preact_fused.reference``, ``preact_fused.triton``, ``preact_fused.cuda``) is a module
exposing one Python function per entry of ``SCHEMAS``, with the schema's argument names, order and
defaults, plus ``unavailable_reason(device) -> str | None``. The fast backends register the ops as
``torch.library`` ops with exactly these schemas (the CUDA extension in csrc/bindings.cpp, the
Triton backend through :func:`define`); :func:`register_fakes` gives every namespace the same fake
(meta) implementations, so torch.compile traces them and CUDA graphs capture them.

Tensors
-------
* Activations (``x``, ``y``, ``dy``, ``g``, ``dx``, ``residual``): logical NCHW ``[N, C, H, W]`` in any
  memory format. The fast backends compute in NHWC and their ops return channels_last tensors; the
  backend's Python functions then give every activation output the memory format of its activation
  input (:func:`keep_format`: ``x`` for forward ops, ``dy`` for gradient ops).
* ``weight``: torch's ``[Cout, Cin, KH, KW]`` in any float dtype (the float32 master under autocast);
  kernels read it as it is and round each element to the activation dtype on load (the value
  ``weight.to(x.dtype)`` would give). No packing, no cast launch.
* Statistics summary ``stats``: ``[4, C]`` in the statistics dtype (:func:`stats_dtype`): per channel
  the element count, a pivot (one of the summarised values, or 0 if it is not finite), the mean
  minus the pivot, and M2 (sum
  of squared deviations from the mean). Producers reduce their per-tile summaries inside the
  producing launch (a fixed-order tree: deterministic, no float atomics). Summaries merge with
  :func:`merge_summaries`' formula; the pivot keeps the merged offsets small, so the variance is
  free of cancellation even when |mean| >> std.
* Folded BatchNorm ``fold``: ``[4, C]`` in the statistics dtype: mean, invstd, scale, shift with
  ``scale = gamma * invstd`` (``invstd`` without affine) and ``shift = beta - mean * scale``
  (computed as one fused multiply-add, ``fma(-mean, scale, beta)``), ``invstd = 1 / sqrt(var + eps)``
  correctly rounded, ``var = M2 / count`` (biased). The activation is ``P(x) = relu(x * scale +
  shift)`` computed as ``fma(x, scale, shift)`` in the statistics dtype, NaN kept (``z <= 0 -> 0``,
  otherwise ``z``), rounded to the activation dtype; zero padding comes after the activation.
* Weight gradient ``dW``: the weight's shape and memory format (:func:`weight_grad_like`), in the
  statistics dtype.
* Backward sums ``sums``: ``[3, C]`` statistics dtype: sum_g, sum_gx = sum(g * (x - mean)) and
  dgamma = sum_gx * invstd, summed in the producing launch (fixed order), ``g`` being the masked
  gradient ``dP * (fma(x, scale, shift) > 0 or NaN)`` before rounding.
* ``conv_wgrad_bn_backward`` is ``conv_wgrad`` whose output gradient ``dy`` is the ``bn_backward``
  (training or not, no residual gradient) of the BatchNorm that follows the conv: from that BN's
  masked gradient ``g``, its input ``bn_x`` (the conv's output), fold and sums. One launch computes
  ``dy`` (``bn_backward``'s values in ``bn_x``'s dtype), uses it for dW and stores it: the
  ``bn_backward`` launch of a chain's inner triples and one pass over ``dy`` are saved. ``x``,
  ``g`` and ``bn_x`` share one dtype (a chain's activations; the CUDA backend refuses others).
* Empty outputs: a summary, fold or sums that an op does not produce is an empty ``[0]`` tensor
  (torch.compile traces every output as a tensor); the Python functions return None instead.

The BatchNorm of a conv's input (``conv_fwd``, ``bn_fold``) comes in one of four forms:

============================  ==================================================================
``stats`` given               batch statistics: the fold is computed from the summary; with
                              ``update_running`` the running statistics are updated in place
                              (factor ``momentum``, or ``1 / num_batches_tracked`` when momentum
                              is None) and ``num_batches_tracked`` incremented, on the device
``fold`` given                a fold computed by an earlier op (a second conv reading one BN)
``running_mean`` only         running statistics (eval mode): the fold of running_mean/running_var
none of them                  no BatchNorm: the identity loader, P(x) = x (conv_fwd only)
============================  ==================================================================

Running-statistic update (PyTorch semantics): ``running_mean = (1 - f) running_mean + f mean``,
``running_var = (1 - f) running_var + f M2 / max(count - 1, 1)``, in the buffers' dtype.
"""
from __future__ import annotations

import torch

# One schema per op: names, argument order and outputs shared by every backend.
SCHEMAS = {
    "conv_fwd": (
        "conv_fwd(Tensor x, Tensor weight, int stride, int padding, Tensor? stats, Tensor? fold, "
        "Tensor? gamma, Tensor? beta, Tensor(a!)? running_mean, Tensor(b!)? running_var, "
        "Tensor(c!)? num_batches_tracked, float eps, float? momentum, bool update_running, "
        "Tensor? residual, bool want_stats) -> (Tensor, Tensor, Tensor)"),
    "bn_stats": "bn_stats(Tensor x) -> Tensor",
    "bn_fold": (
        "bn_fold(Tensor? stats, Tensor? gamma, Tensor? beta, Tensor(a!)? running_mean, "
        "Tensor(b!)? running_var, Tensor(c!)? num_batches_tracked, float eps, float? momentum, "
        "bool update_running) -> Tensor"),
    "conv_dgrad": (
        "conv_dgrad(Tensor dy, Tensor weight, Tensor x, int stride, int padding, Tensor? fold) "
        "-> (Tensor, Tensor)"),
    "conv_wgrad": (
        "conv_wgrad(Tensor x, Tensor dy, Tensor weight, int stride, int padding, Tensor? fold) -> Tensor"),
    "bn_backward": (
        "bn_backward(Tensor g, Tensor x, Tensor fold, Tensor sums, float count, bool training, "
        "Tensor? d_residual) -> Tensor"),
    "conv_wgrad_bn_backward": (
        "conv_wgrad_bn_backward(Tensor x, Tensor g, Tensor weight, int stride, int padding, Tensor? fold, "
        "Tensor bn_x, Tensor bn_fold, Tensor bn_sums, float count, bool training) -> (Tensor, Tensor)"),
}
OPS = tuple(SCHEMAS)
MUTATED = {"conv_fwd": ("running_mean", "running_var", "num_batches_tracked"),
           "bn_fold": ("running_mean", "running_var", "num_batches_tracked")}



def argument_names(op: str) -> list[str]:
    """The argument names of ``op``'s schema, in order (the signature of every backend's function)."""
    return [a.name for a in torch._C.parse_schema(f"ns::{SCHEMAS[op]}").arguments]


# Planes of the [4, C] tensors.
COUNT, PIVOT, OFFSET, M2 = range(4)
MEAN, INVSTD, SCALE, SHIFT = range(4)
SUM_G, SUM_GX, DGAMMA = range(3)


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of summaries, folds and sums for activations of ``dtype``: float32, or float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def conv_output_size(size: int, kernel: int, stride: int, padding: int) -> int:
    """Output extent of a convolution along one axis: (size + 2 padding - kernel) // stride + 1."""
    return (size + 2 * padding - kernel) // stride + 1


def conv_output_shape(x_shape, weight_shape, stride: int, padding: int) -> tuple[int, int, int, int]:
    """[N, Cout, Ho, Wo] of conv(x [N, Cin, H, W], weight [Cout, Cin, KH, KW])."""
    n, _, h, w = x_shape
    cout, _, kh, kw = weight_shape
    return n, cout, conv_output_size(h, kh, stride, padding), conv_output_size(w, kw, stride, padding)


def is_channels_last(t: torch.Tensor) -> bool:
    """Whether t is a channels_last tensor that is not also NCHW-contiguous."""
    return t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


def keep_format(out: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``out`` in the memory format of ``like``: channels_last stays channels_last, else NCHW."""
    if is_channels_last(like):
        return out.contiguous(memory_format=torch.channels_last)
    return out.contiguous()


def weight_grad_like(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A new dW for ``weight``: its shape and memory format (strides), so autograd accumulates it
    into a channels_last weight without a copy, in the statistics dtype of the activations ``x``."""
    return torch.empty_like(weight, dtype=stats_dtype(x.dtype), memory_format=torch.preserve_format)


def optional(t: torch.Tensor) -> torch.Tensor | None:
    """An op's optional output as None when it is the empty placeholder."""
    return None if t.numel() == 0 else t


def empty_placeholder(like: torch.Tensor) -> torch.Tensor:
    """The ``[0]`` tensor an op returns for an output it does not produce."""
    return like.new_empty((0,), dtype=stats_dtype(like.dtype))


# ---- the one statistics formula (plain torch: the reference backend and synchronised BN use it) ----

def summarize(rows: torch.Tensor) -> torch.Tensor:
    """The summary ``[4, C]`` of ``rows [M, C]`` (statistics dtype), pivot = the first row where finite (else 0).

    Two passes in the statistics dtype: the offset is the mean of ``rows - pivot``, M2 the sum of
    squared deviations from it. M = 0 gives (0, 0, 0, 0).
    """
    m, c = rows.shape
    if m == 0:
        return rows.new_zeros((4, c))
    pivot = torch.where(rows[0].isfinite(), rows[0], 0)  # inf and NaN stay in the offset, as in a mean
    shifted = rows - pivot
    offset = shifted.mean(0)
    m2 = ((shifted - offset) ** 2).sum(0)
    return torch.stack([torch.full_like(offset, m), pivot, offset, m2])


def merge_summaries(summaries: torch.Tensor) -> torch.Tensor:
    """Merge ``[T, 4, C]`` summaries into one ``[4, C]``, in order (Chan et al. with pivots).

    Merging b into a: n = n_a + n_b, delta = (p_b - p_a) + (d_b - d_a), d = (n_a d_a + n_b (d_b +
    (p_b - p_a))) / n (a weighted mean: an infinite offset stays infinite, as in a plain mean),
    M2 = M2_a + M2_b + delta^2 n_a n_b / n; the pivot stays a's. An empty summary is neutral.
    """
    out = summaries[0]
    for nxt in summaries[1:]:
        n_a, p_a, d_a, m2_a = out
        n_b, p_b, d_b, m2_b = nxt
        n = n_a + n_b
        delta = (p_b - p_a) + (d_b - d_a)
        frac = n_b / n.clamp_min(1)
        offset = (n_a * d_a + n_b * (d_b + (p_b - p_a))) / n.clamp_min(1)
        merged = torch.stack([n, p_a, offset, m2_a + m2_b + delta * delta * n_a * frac])
        out = torch.where(n_a > 0, torch.where(n_b > 0, merged, out), nxt)
    return out


def fold_from_summary(stats, gamma, beta, eps: float) -> torch.Tensor:
    """The fold ``[4, C]`` (mean, invstd, scale, shift) of batch statistics ``stats [4, C]``."""
    count, pivot, offset, m2 = stats
    return _fold(pivot + offset, m2 / count, gamma, beta, eps)


def fold_from_running(running_mean, running_var, gamma, beta, eps: float, dtype) -> torch.Tensor:
    """The fold ``[4, C]`` of running statistics (eval mode), in the statistics dtype ``dtype``."""
    return _fold(running_mean.to(dtype), running_var.to(dtype), gamma, beta, eps)


def _fold(mean, var, gamma, beta, eps):
    invstd = 1.0 / torch.sqrt(var + eps)
    scale = invstd if gamma is None else gamma.to(invstd.dtype) * invstd
    shift = -mean * scale if beta is None else torch.addcmul(beta.to(invstd.dtype), -mean, scale)
    return torch.stack([mean, invstd, scale, shift])


def update_running(stats, running_mean, running_var, num_batches_tracked, momentum) -> None:
    """The running-statistic update of one batch summary ``stats [4, C]`` (in place, no host sync).

    ``num_batches_tracked`` (a 0-dim tensor or None) is incremented first; with ``momentum`` None the
    factor is 1 / num_batches_tracked after the increment, as nn.BatchNorm2d does.
    """
    count, pivot, offset, m2 = stats
    if num_batches_tracked is not None:
        num_batches_tracked.add_(1)
    if momentum is None:
        factor = 1.0 / num_batches_tracked.to(stats.dtype)
    else:
        factor = momentum
    unbiased = m2 / (count - 1).clamp_min(1)
    running_mean.mul_(1 - factor).add_(((pivot + offset) * factor).to(running_mean.dtype))
    running_var.mul_(1 - factor).add_((unbiased * factor).to(running_var.dtype))


# ---- torch.library registration --------------------------------------------------------------------

def define(namespace: str, impls: dict, dispatch_keys=("CPU", "CUDA")) -> None:
    """Define the contract's ops in ``namespace`` with the implementations ``impls`` (name -> fn)."""
    lib = torch.library.Library(namespace, "DEF")
    _LIBRARIES.append(lib)
    for name, schema in SCHEMAS.items():
        lib.define(schema)
        for key in dispatch_keys:
            lib.impl(name, impls[name], key)
    register_fakes(namespace)


_LIBRARIES: list = []  # keeps the Library objects (and so the registrations) alive


def register_fakes(namespace: str) -> None:
    """The fake (meta) implementations of the contract's ops in ``namespace``."""
    cl = torch.channels_last

    def vector_out(like, c, produced):
        return like.new_empty((4, c) if produced else (0,), dtype=stats_dtype(like.dtype))

    @torch.library.register_fake(f"{namespace}::conv_fwd")
    def _conv_fwd(x, weight, stride, padding, stats, fold, gamma, beta, running_mean, running_var,
                  num_batches_tracked, eps, momentum, update_running, residual, want_stats):
        shape = conv_output_shape(x.shape, weight.shape, stride, padding)
        y = torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=cl)
        folds = fold is None and (stats is not None or running_mean is not None)
        return y, vector_out(x, shape[1], want_stats), vector_out(x, x.shape[1], folds)

    @torch.library.register_fake(f"{namespace}::bn_stats")
    def _bn_stats(x):
        return vector_out(x, x.shape[1], True)

    @torch.library.register_fake(f"{namespace}::bn_fold")
    def _bn_fold(stats, gamma, beta, running_mean, running_var, num_batches_tracked, eps, momentum,
                 update_running):
        ref = stats if stats is not None else running_mean
        return vector_out(ref, stats.shape[1] if stats is not None else running_mean.shape[0], True)

    @torch.library.register_fake(f"{namespace}::conv_dgrad")
    def _conv_dgrad(dy, weight, x, stride, padding, fold):
        g = torch.empty(tuple(x.shape), dtype=dy.dtype, device=dy.device, memory_format=cl)
        sums = dy.new_empty((3, x.shape[1]) if fold is not None else (0,), dtype=stats_dtype(dy.dtype))
        return g, sums

    @torch.library.register_fake(f"{namespace}::conv_wgrad")
    def _conv_wgrad(x, dy, weight, stride, padding, fold):
        return weight_grad_like(weight, x)

    @torch.library.register_fake(f"{namespace}::bn_backward")
    def _bn_backward(g, x, fold, sums, count, training, d_residual):
        return torch.empty(tuple(x.shape), dtype=x.dtype, device=x.device, memory_format=cl)

    @torch.library.register_fake(f"{namespace}::conv_wgrad_bn_backward")
    def _conv_wgrad_bn_backward(x, g, weight, stride, padding, fold, bn_x, bn_fold, bn_sums, count, training):
        dy = torch.empty(tuple(bn_x.shape), dtype=bn_x.dtype, device=bn_x.device, memory_format=cl)
        return weight_grad_like(weight, x), dy
