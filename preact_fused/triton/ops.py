"""The Triton kernels as the contract's torch.library ops (namespace ``preact_fused_triton``) and the
contract's Python functions.

The ops have exactly the schemas of ``contract.SCHEMAS`` (defined through ``contract.define``) and
the contract's fake implementations, so ``torch.compile`` traces through the fused modules without
graph breaks and CUDA graphs capture them: outputs are allocated inside the ops and no op reads a
value back to the host. Each op is ONE kernel launch and no other GPU work: inputs are read in place
through their strides and dtypes (no copy, no cast, no weight packing), reductions happen inside the
launch (no partials summed afterwards, no memset: the semaphores reset themselves). Ops return
channels_last activations; the Python functions below give an activation output the memory format
of its activation input (contract.keep_format) and None for an output the op did not produce.

fp32 precision: exact fp32 dot products by default. TF32 tensor cores are used for fp32 when
``set_fp32_precision("tf32")`` was called or the environment variable ``PREACT_FUSED_TF32=1`` is set;
the setting is read by the op implementations, it is not an op argument. bf16/fp16 always use
tensor cores with fp32 accumulation.
"""
from __future__ import annotations

import os

import torch

from .. import contract
from . import bn_grad as _bn_grad
from . import conv as _conv
from . import stats as _stats
from .common import check_activation, on_device_of

__all__ = [*contract.OPS, "set_fp32_precision", "fp32_precision"]

NAMESPACE = "preact_fused_triton"
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


def _tf32() -> bool:
    return _fp32_precision == "tf32"


# ---------------------------------------------------------------------------------------------
# Op implementations (schema order; what torch.ops.preact_fused_triton.<name> runs)


def _conv_fwd_impl(x, weight, stride, padding, stats, fold, gamma, beta, running_mean, running_var,
                   num_batches_tracked, eps, momentum, update_running, residual, want_stats):
    check_activation(x, "x")
    with on_device_of(x):
        return _conv.conv_fwd(x, weight, stride, padding, stats, fold, gamma, beta, running_mean, running_var,
                              num_batches_tracked, eps, momentum, update_running, residual, want_stats, _tf32())


def _bn_stats_impl(x):
    check_activation(x, "x")
    with on_device_of(x):
        return _stats.bn_stats(x)


def _bn_fold_impl(stats, gamma, beta, running_mean, running_var, num_batches_tracked, eps, momentum,
                  update_running):
    ref = stats if stats is not None else running_mean
    with on_device_of(ref):
        return _stats.bn_fold(stats, gamma, beta, running_mean, running_var, num_batches_tracked, eps, momentum,
                              update_running)


def _conv_dgrad_impl(dy, weight, x, stride, padding, fold):
    check_activation(dy, "dy")
    with on_device_of(dy):
        return _conv.conv_dgrad(dy, weight, x, stride, padding, fold, _tf32())


def _conv_wgrad_impl(x, dy, weight, stride, padding, fold):
    check_activation(x, "x")
    with on_device_of(x):
        return _conv.conv_wgrad(x, dy, weight, stride, padding, fold, _tf32())


def _conv_wgrad_bn_backward_impl(x, g, weight, stride, padding, fold, bn_x, bn_fold, bn_sums, count, training):
    check_activation(x, "x")
    check_activation(g, "g")
    check_activation(bn_x, "bn_x")
    with on_device_of(x):
        return _conv.conv_wgrad_bn_backward(x, g, weight, stride, padding, fold, bn_x, bn_fold, bn_sums, count,
                                            training, _tf32())


def _bn_backward_impl(g, x, fold, sums, count, training, d_residual):
    check_activation(x, "x")
    with on_device_of(x):
        return _bn_grad.bn_backward(g, x, fold, sums, count, training, d_residual)


IMPLS = {"conv_fwd": _conv_fwd_impl, "bn_stats": _bn_stats_impl, "bn_fold": _bn_fold_impl,
         "conv_dgrad": _conv_dgrad_impl, "conv_wgrad": _conv_wgrad_impl, "bn_backward": _bn_backward_impl,
         "conv_wgrad_bn_backward": _conv_wgrad_bn_backward_impl}
contract.define(NAMESPACE, IMPLS)
_library_ops = getattr(torch.ops, NAMESPACE)


class _Ops:
    """``torch.ops.preact_fused_triton`` as the contract functions below call it.

    In plain eager execution on real tensors (nothing tracing, no dispatch mode, not meta) an op's
    implementation is called directly: the dispatcher's round trip back into Python costs more host
    time than the launch itself at ResNet-1001's sizes, and the result is the same. torch.compile,
    fake tensors and dispatch modes (FakeTensorMode, counters) go through the registered op.
    """

    def __getattr__(self, name):
        impl, op = IMPLS[name], getattr(_library_ops, name)

        def call(first, *args):
            # is_compiling first: torch.compile folds it to True and traces the op, never the C call
            if (not torch.compiler.is_compiling() and first is not None and first.device.type != "meta"
                    and torch._C._len_torch_dispatch_stack() == 0):
                return impl(first, *args)
            return op(first, *args)

        setattr(self, name, call)
        return call


_ops = _Ops()


# ---------------------------------------------------------------------------------------------
# The contract's Python functions (arguments and defaults of preact_fused.reference)


def conv_fwd(x, weight, stride: int, padding: int, stats=None, fold=None, gamma=None, beta=None,
             running_mean=None, running_var=None, num_batches_tracked=None, eps: float = 1e-5,
             momentum: float | None = 0.1, update_running: bool = False, residual=None, want_stats: bool = False):
    """(y, stats of y or None, fold computed here or None): y = conv2d(P(x), weight) [+ residual]."""
    check_activation(x, "x")
    n, _, ho, wo = contract.conv_output_shape(x.shape, weight.shape, stride, padding)
    _conv.check_rows(n * ho * wo, "conv_fwd")
    y, y_stats, new_fold = _ops.conv_fwd(x, weight, stride, padding, stats, fold, gamma, beta, running_mean,
                                         running_var, num_batches_tracked, eps, momentum, update_running,
                                         residual, want_stats)
    return contract.keep_format(y, x), contract.optional(y_stats), contract.optional(new_fold)


def bn_stats(x):
    """The summary [4, C] of x [N, C, H, W] (count, pivot, offset, M2)."""
    check_activation(x, "x")
    return _ops.bn_stats(x)


def bn_fold(stats=None, gamma=None, beta=None, running_mean=None, running_var=None, num_batches_tracked=None,
            eps: float = 1e-5, momentum: float | None = 0.1, update_running: bool = False):
    """The fold [4, C] of ``stats`` (updating the running statistics when asked) or of the running ones."""
    return _ops.bn_fold(stats, gamma, beta, running_mean, running_var, num_batches_tracked, eps, momentum,
                        update_running)


def conv_dgrad(dy, weight, x, stride: int, padding: int, fold=None):
    """(g, sums [3, Cin]) with ``fold``, else (dx, None): the gradient through the convolution."""
    check_activation(dy, "dy")
    _conv.check_rows(x.shape[0] * x.shape[2] * x.shape[3], "conv_dgrad")
    g, sums = _ops.conv_dgrad(dy, weight, x, stride, padding, fold)
    return contract.keep_format(g, dy), contract.optional(sums)


def conv_wgrad(x, dy, weight, stride: int, padding: int, fold=None):
    """dW [Cout, Cin, KH, KW] fp32 (weight's memory format) = sum over output positions of P(x) (x) dy."""
    check_activation(x, "x")
    _conv.check_rows(dy.shape[0] * dy.shape[2] * dy.shape[3], "conv_wgrad")
    return _ops.conv_wgrad(x, dy, weight, stride, padding, fold)


def conv_wgrad_bn_backward(x, g, weight, stride: int, padding: int, fold, bn_x, bn_fold, bn_sums, count: float,
                           training: bool = True):
    """(dW, dy): conv_wgrad of dy = bn_backward(g, bn_x, bn_fold, bn_sums, count, training), and dy
    (bn_x's dtype and format), one launch."""
    check_activation(x, "x")
    _conv.check_rows(g.shape[0] * g.shape[2] * g.shape[3], "conv_wgrad_bn_backward")
    dw, dy = _ops.conv_wgrad_bn_backward(x, g, weight, stride, padding, fold, bn_x, bn_fold, bn_sums, float(count),
                                         training)
    return dw, contract.keep_format(dy, bn_x)


def bn_backward(g, x, fold, sums, count: float, training: bool = True, d_residual=None):
    """dx = scale g + B x + C [+ d_residual] in x's dtype and format."""
    check_activation(x, "x")
    dx = _ops.bn_backward(g, x, fold, sums, float(count), training, d_residual)
    return contract.keep_format(dx, x)
