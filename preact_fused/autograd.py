"""The autograd Function of a fused BN-ReLU-conv triple, and the BatchNorm bookkeeping around it.

Saved for backward: the pre-BN input x, the weight and per-channel vectors (mean, invstd, scale,
shift, gamma, beta). Not relu(bn(x)): dgrad and wgrad recompute it from x. The batch statistics are
computed outside the Function without autograd (from partials or ``bn_stats``); their gradient is
part of ``bn_backward``'s formula, so ``mean``/``invstd`` get none.

Two triples may share one BatchNorm (a projection shortcut reading the same activation): call
``batch_norm_params`` once (one running-stat update) and ``bn_relu_conv2d`` twice; autograd adds the
two dx and the two dgamma/dbeta, which is exact because the BN backward is linear in the masked
gradient.

Mixed precision: under ``torch.autocast`` the activations (x, the residual) are cast to the autocast
dtype before the Function and the ops run with autocast off, so the convolutions compute in that
dtype, the output and what is saved (x) are in it, while statistics, scale/shift and the weight
gradient stay float32 and the parameters are cast on the fly (float32 masters, no saved copies).

Synchronised BatchNorm (``nn.SyncBatchNorm`` in a multi-rank process group): ``batch_norm_params``
gathers the statistics of all ranks and the backward all-reduces the BN sums; see
``preact_fused.distributed``.

Memory mode "min": ``recompute`` runs a whole unit without saving anything but its input and the
per-channel BN vectors, and runs it again in backward with those vectors (no second running-stat
update, bit-identical statistics).
"""
from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch
from torch import nn

from . import backend as _backend
from . import distributed as _dist
from .reference import masked_grad_and_sums, preact, stats_dtype
from .validation import check_input, conv_geometry  # noqa: F401 (re-exported)


class BNParams(NamedTuple):
    """Per-channel BatchNorm state for one forward: all [C], statistics dtype, no autograd history."""
    mean: torch.Tensor
    invstd: torch.Tensor
    scale: torch.Tensor
    shift: torch.Tensor
    gamma: torch.Tensor | None   # the module's weight (a Parameter) or None when affine=False
    beta: torch.Tensor | None    # the module's bias or None
    training: bool               # batch statistics (True) or running statistics (False)
    process_group: object = None  # synchronised BN: the group whose global batch the statistics cover
    count: torch.Tensor | None = None  # synchronised BN: global element count per channel [C]


def batch_norm_params(bn: nn.BatchNorm2d, x: torch.Tensor, partials, ops) -> BNParams:
    """Fold ``bn`` applied to x [N, C, H, W] into per-channel scale/shift, exactly as nn.BatchNorm2d.

    partials: statistics partials [3, T, C] of x from its producer, or None (then ``bn_stats``
    reads x). Updates the running statistics and ``num_batches_tracked`` like nn.BatchNorm2d does.
    An ``nn.SyncBatchNorm`` in training, in a process group of several ranks, uses the statistics of
    the global batch (all ranks' partials gathered; every rank must call this for that BN).
    """
    use_batch_stats = bn.training or bn.running_mean is None
    group = count = None
    with torch.no_grad():
        if use_batch_stats:
            update = bn.training and bn.track_running_stats
            if update and bn.num_batches_tracked is not None:
                bn.num_batches_tracked.add_(1)
            if partials is None:
                partials = ops.bn_stats(x)
            group = _dist.sync_group(bn)
            if group is not None:
                partials = _dist.gather_partials(partials, group)
                count = partials[0].sum(0)
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
    return BNParams(mean, invstd, scale, shift, bn.weight, bn.bias, use_batch_stats, group, count)


class _FusedConv2d(torch.autograd.Function):
    """y = conv2d(P(x), w) [+ residual] with P = relu(bn(x)) (bn given) or identity (bn None)."""

    @staticmethod
    def forward(ctx, x, weight, gamma, beta, residual, bn: BNParams | None, stride, padding, want_stats, ops):
        scale, shift = (None, None) if bn is None else (bn.scale, bn.shift)
        y, partials = ops.conv_fwd(x, weight.to(x.dtype), stride, padding, scale, shift, residual, want_stats)
        if bn is None:
            ctx.save_for_backward(x, weight)
        else:
            ctx.save_for_backward(x, weight, bn.mean, bn.invstd, bn.scale, bn.shift)
        ctx.bn_training = None if bn is None else bn.training
        ctx.sync = None if bn is None or bn.process_group is None else (bn.process_group, bn.count)
        ctx.conv = (stride, padding)
        ctx.has_residual = residual is not None
        ctx.ops = ops
        if partials is None:  # an empty tensor, not None: torch.compile traces every output as a tensor
            partials = y.new_empty(0, dtype=torch.float32)
        ctx.mark_non_differentiable(partials)
        return y, partials

    @staticmethod
    def backward(ctx, dy, _dpartials):
        with _autocast_off(dy.device.type):
            return _FusedConv2d._backward(ctx, dy)

    @staticmethod
    def _backward(ctx, dy):
        ops, (stride, padding) = ctx.ops, ctx.conv
        x, weight, *vectors = ctx.saved_tensors
        mean, invstd, scale, shift = vectors if vectors else (None,) * 4
        dx = dgamma = dbeta = dw = None
        needs_x, needs_w, needs_gamma, needs_beta = ctx.needs_input_grad[:4]
        if needs_x or needs_gamma or needs_beta:
            g, sum_g, sum_gx = ops.conv_dgrad(dy, weight.to(dy.dtype), x, stride, padding, scale, shift, mean)
            if scale is None:
                dx = g
            else:
                dx, dgamma, dbeta = _bn_grads(ctx, g, x, mean, invstd, scale, sum_g, sum_gx,
                                              needs_x, needs_gamma, needs_beta)
        if needs_w:
            dw = ops.conv_wgrad(x, dy, weight.shape, stride, padding, scale, shift).to(weight.dtype)
        d_residual = dy if ctx.has_residual and ctx.needs_input_grad[4] else None
        return dx, dw, dgamma, dbeta, d_residual, None, None, None, None, None


def _bn_grads(ctx, g, x, mean, invstd, scale, sum_g, sum_gx, needs_x, needs_gamma, needs_beta):
    """(dx, dgamma, dbeta) from the masked gradient g [N, C, H, W] and its sums [C].

    dgamma / dbeta come from the local sums (DDP averages them); dx from the global ones when the
    BN is synchronised (``ctx.sync``) and uses batch statistics (``ctx.bn_training``).
    """
    dgamma = sum_gx * invstd if needs_gamma else None
    dbeta = sum_g if needs_beta else None
    dx = None
    if needs_x:
        if ctx.sync is not None and ctx.bn_training:
            sum_g, sum_gx = _dist.global_sums(sum_g, sum_gx, g.numel() // g.shape[1], ctx.sync[1], ctx.sync[0])
        dx = ctx.ops.bn_backward(g.to(x.dtype), x, mean, invstd, scale, sum_g, sum_gx, ctx.bn_training)
    return dx, dgamma, dbeta


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
    dtype = _autocast_dtype(x)
    if dtype is None:
        y, partials = _FusedConv2d.apply(x, conv.weight, gamma, beta, residual, bn, stride, padding,
                                         want_stats, ops)
    else:
        x = x.to(dtype)
        residual = None if residual is None else residual.to(dtype)
        with _autocast_off(x.device.type):
            y, partials = _FusedConv2d.apply(x, conv.weight, gamma, beta, residual, bn, stride, padding,
                                             want_stats, ops)
    if conv.bias is not None:
        if want_stats:
            raise ValueError("statistics of a conv output with bias are not supported")
        y = y + conv.bias.to(y.dtype)[:, None, None]
    return y, (partials if want_stats else None)


def resolve_ops(name: str, x: torch.Tensor):
    """The backend module for setting ``name`` and the device of x."""
    return _backend.resolve(name, x.device)


# Device types with an autocast mode, found once at import: torch.amp.is_autocast_available is a C
# function that torch.compile cannot trace in every supported torch release (2.11 breaks the graph
# on it), a set lookup it can.
_AUTOCAST_DEVICE_TYPES = frozenset(
    t for t in ("cpu", "cuda", "xpu", "mps", "hpu", "xla", "mtia", "maia", "ipu",
                torch._C._get_privateuse1_backend_name())
    if torch.amp.is_autocast_available(t))


def _autocast_available(device_type: str) -> bool:
    return device_type in _AUTOCAST_DEVICE_TYPES


def _autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast computes convolutions in on x's device, or None (autocast off, x float64)."""
    device_type = x.device.type
    if x.dtype == torch.float64 or not _autocast_available(device_type):
        return None
    if not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def _autocast_off(device_type: str):
    """A context with autocast disabled on ``device_type`` (the fused ops pick their dtypes themselves)."""
    if _autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def _autocast_state(device_type: str) -> tuple[str, bool, torch.dtype | None]:
    if not _autocast_available(device_type):
        return device_type, False, None
    return device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)


def _autocast_restored(state):
    device_type, enabled, dtype = state
    if not _autocast_available(device_type):
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=dtype, enabled=enabled)


class _FusedBNReLU(torch.autograd.Function):
    """a = relu(x*scale + shift) for a BN-ReLU that feeds no conv (a network's head): saves x only."""

    @staticmethod
    def forward(ctx, x, gamma, beta, bn: BNParams, ops):
        ctx.save_for_backward(x, bn.mean, bn.invstd, bn.scale, bn.shift)
        ctx.bn_training = bn.training
        ctx.sync = None if bn.process_group is None else (bn.process_group, bn.count)
        ctx.ops = ops
        return preact(x, bn.scale, bn.shift)

    @staticmethod
    def backward(ctx, da):
        x, mean, invstd, scale, shift = ctx.saved_tensors
        needs_x, needs_gamma, needs_beta = ctx.needs_input_grad[:3]
        with _autocast_off(da.device.type):
            g, sum_g, sum_gx = masked_grad_and_sums(da, x, scale, shift, mean)
            dx, dgamma, dbeta = _bn_grads(ctx, g, x, mean, invstd, scale, sum_g, sum_gx,
                                          needs_x, needs_gamma, needs_beta)
        return dx, dgamma, dbeta, None, None


def bn_relu(x, bn: BNParams, ops):
    """relu(bn(x)) with bn folded into ``bn`` (from ``batch_norm_params``), in x's dtype.

    x: [N, C, H, W]. For the BN-ReLU in front of a pooling (a network's head): saves x alone, and
    follows the same statistics rules (synchronised BN included) as the fused convolutions.
    """
    return _FusedBNReLU.apply(x, bn.gamma, bn.beta, bn, ops)


class _Recompute(torch.autograd.Function):
    """(y, partials) = run(x, partials, None), saving x and the per-channel BN vectors only.

    ``run(x, partials, bn_params)`` computes one unit and returns (y, partials of y or None, the list
    of BNParams it used); given ``bn_params`` (the backward's recomputation) it must use them instead
    of computing statistics, so the running statistics are updated once and the recomputed batch
    statistics are the forward's, bit for bit. ``params`` are the unit's parameters: their gradients
    come back through this Function, so DistributedDataParallel and optimizers see ordinary leaves.
    """

    @staticmethod
    def forward(ctx, run, x, partials, *params):
        ctx.run, ctx.params = run, params
        ctx.autocast = _autocast_state(x.device.type)
        y, y_partials, bn_params = run(x, partials, None)
        vectors = [t for p in bn_params for t in (p.mean, p.invstd, p.scale, p.shift)]
        ctx.bn_meta = [(p.gamma, p.beta, p.training, p.process_group, p.count) for p in bn_params]
        ctx.save_for_backward(x, *vectors)
        if y_partials is not None:
            ctx.mark_non_differentiable(y_partials)
        return y, y_partials

    @staticmethod
    def backward(ctx, dy, _dpartials):
        x, *vectors = ctx.saved_tensors
        bn_params = [BNParams(*vectors[4 * i:4 * i + 4], *meta) for i, meta in enumerate(ctx.bn_meta)]
        needs_x, needs_params = ctx.needs_input_grad[1], ctx.needs_input_grad[3:]
        x = x.detach().requires_grad_(needs_x)
        with torch.enable_grad(), _autocast_restored(ctx.autocast):
            y, _, _ = ctx.run(x, None, bn_params)
        inputs = ([x] if needs_x else []) + [p for p, needed in zip(ctx.params, needs_params) if needed]
        grads = iter(torch.autograd.grad(y, inputs, dy, allow_unused=True))
        dx = next(grads) if needs_x else None
        dparams = [next(grads) if needed else None for needed in needs_params]
        return (None, dx, None, *dparams)


def recompute(run, x, partials, params):
    """Run a unit keeping only its input for backward, where it is run again (memory mode "min").

    run(x, partials, bn_params) -> (y, partials of y or None, list of BNParams): see ``_Recompute``.
    x: the unit input [N, C, H, W]; partials: its statistics [3, T, C] or None; params: the unit's
    parameters. Returns (y, partials of y or None). The unit must be deterministic given its input
    and BN vectors (no dropout): nothing restores random-number state for the recomputation.
    """
    return _Recompute.apply(run, x, partials, *params)
