"""The autograd Functions of the fused path.

``FusedChain`` runs a chain of BN-ReLU-conv triples, a whole pre-activation unit at once: triple i
reads the output of triple i - 1, "sibling" convs read the first triple's activation (a projection
shortcut, or several convs of a converted model sharing one BN), and a residual (the chain input or
the first sibling's output) is added to the last output. One Function for the unit means one
backward in which every op is called explicitly: the residual gradient enters the first BN's
``bn_backward`` (no autograd add), dgamma/dbeta are views of the sums ``conv_dgrad`` reduced, and
nothing is materialised for outputs without gradient. The BN backward of an inner triple is computed
by the next triple's wgrad, in its own launch (``conv_wgrad_bn_backward``), which also stores it for
that triple's dgrad. A bottleneck unit costs 3 launches forward (each conv folds its BN in its
prologue and emits the next BN's statistics in its epilogue) and 7 backward (dgrad and wgrad per
triple, the first triple's bn_backward).

Saved for backward: the input of every triple (pre-BN: not relu(bn(x))), the per-channel folds and
the weights. The BatchNorm statistics are computed by the ops without autograd; their gradient is
part of ``bn_backward``'s formula (DESIGN.md section 1). Two ops reading one BN (conv1 and the
projection) add their masked gradients through ``bn_backward``'s ``d_residual`` and their sums, which
is exact because the BN backward is linear in (g, sums).

``FusedBNReLU`` is a BN-ReLU feeding no conv (a network's head). ``Recompute`` runs a unit again in
backward (memory mode "min"). None of them is twice differentiable: a backward with
``create_graph=True`` (the first step of a double backward) raises a clear error.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from . import autocast as _autocast
from . import distributed as _dist
from .batchnorm import batch_stats, fold_args, uses_batch_stats
from .contract import DGAMMA, SUM_G, optional
from .reference import masked_grad_and_sums, preact
from .validation import check_batch_stats, conv_geometry, conv_output_size

DOUBLE_BACKWARD = ("preact_fused: double backward (create_graph=True through a fused op, as a gradient "
                   "penalty does) is not supported; use the unfused modules (fused=False, or the original "
                   "model before convert) for it")


def _once_differentiable(backward):
    """The backward computed without a graph, refusing create_graph=True with a clear error.

    (Marking the gradients as non-differentiable, as torch.autograd.function.once_differentiable
    does, is not enough: they are then cut from the inputs, so a second differentiation with
    ``allow_unused=True`` would silently give zeros instead of an error.)
    """
    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        if torch.is_grad_enabled():  # the engine runs backward with grad mode on under create_graph
            raise RuntimeError(DOUBLE_BACKWARD)
        return backward(ctx, *grads)
    return wrapper


@dataclass(frozen=True)
class Chain:
    """What a FusedChain computes: ``triples`` [(bn or None, conv)], ``siblings`` (convs reading the
    first triple's activation) and ``residual``: None, "input" or "sibling" (siblings[0]'s output)."""
    triples: tuple
    siblings: tuple = ()
    residual: str | None = None

    def __post_init__(self):
        # (stride, padding) of every conv, checked once: triples first, then siblings.
        convs = [conv for _, conv in self.triples] + list(self.siblings)
        object.__setattr__(self, "geometry", tuple(conv_geometry(conv) for conv in convs))

    def parameters(self) -> list[torch.Tensor]:
        """The parameters the chain differentiates, in a fixed order (the Function's inputs; read
        once per call, so a weight computed by a parametrisation is computed once)."""
        params = []
        for bn, conv in self.triples:
            params.append(conv.weight)
            if bn is not None:
                params += [p for p in (bn.weight, bn.bias) if p is not None]
        return params + [conv.weight for conv in self.siblings]


class UsedFold(NamedTuple):
    """The BatchNorm of one triple as a forward applied it: the fold [4, C] (None without BN) and
    its mode (None without BN, else (batch statistics?, synchronisation (group, global count) or None))."""
    fold: torch.Tensor | None
    mode: tuple | None


def _split(chain: Chain, params) -> tuple[list[tuple], list]:
    """``params`` (in ``Chain.parameters`` order) as [(weight, gamma, beta) per triple], [sibling weights]."""
    it = iter(params)
    triples = []
    for bn, _ in chain.triples:
        weight = next(it)
        gamma = next(it) if bn is not None and bn.weight is not None else None
        beta = next(it) if bn is not None and bn.bias is not None else None
        triples.append((weight, gamma, beta))
    return triples, list(it)


def _cast_like(grad, param):
    return None if grad is None else grad.to(param.dtype)


class FusedChain(torch.autograd.Function):
    """(y, stats of y, *sibling outputs) = the chain on x; see ``run_chain``."""

    @staticmethod
    def forward(ctx, chain: Chain, ops, x, stats, want_stats, given, used, *params):
        triples, n = chain.triples, len(chain.triples)
        triple_params, sibling_weights = _split(chain, params)
        inputs, applied = [], []
        h, siblings_out = x, []
        for i, (bn, conv) in enumerate(triples):
            stride, padding = chain.geometry[i]
            conv_output_size(h.shape[2], h.shape[3], conv.kernel_size, stride, padding)
            if bn is None:
                bn_kwargs, mode = {}, None
            elif given is not None:
                bn_kwargs, mode = {"fold": given[i].fold}, given[i].mode
            else:
                if uses_batch_stats(bn):
                    check_batch_stats(h)
                statistics = batch_stats(bn, h, stats, ops)
                bn_kwargs = fold_args(bn, statistics, update=True)
                bn_kwargs.update(gamma=triple_params[i][1], beta=triple_params[i][2])
                mode = (uses_batch_stats(bn), statistics.sync)
            last = i == n - 1
            if last:
                want = want_stats
            else:
                nxt = triples[i + 1][0]
                want = nxt is not None and given is None and uses_batch_stats(nxt)
            residual = None
            if last and chain.residual == "input":
                residual = x
            elif last and chain.residual == "sibling":
                residual = siblings_out[0]
            y, stats, fold = ops.conv_fwd(h, triple_params[i][0], stride, padding, **bn_kwargs, residual=residual,
                                          want_stats=want)
            fold = bn_kwargs.get("fold", fold)
            inputs.append(h)
            applied.append(UsedFold(fold, mode))
            if i == 0:
                for j, sibling in enumerate(chain.siblings):
                    s_stride, s_padding = chain.geometry[n + j]
                    siblings_out.append(ops.conv_fwd(x, sibling_weights[j], s_stride, s_padding, fold=fold)[0])
            h = y
        used.extend(applied)
        ctx.save_for_backward(*inputs, *[u.fold for u in applied if u.fold is not None], *params)
        ctx.chain, ctx.ops = chain, ops
        ctx.modes = [u.mode for u in applied]
        ctx.has_fold = [u.fold is not None for u in applied]
        ctx.set_materialize_grads(False)
        if stats is None:  # an empty tensor, not None: torch.compile traces every output as a tensor
            stats = h.new_empty(0, dtype=torch.float32)
        ctx.mark_non_differentiable(stats)
        return (h, stats, *siblings_out)

    @staticmethod
    @_once_differentiable
    def backward(ctx, dy, _d_stats, *rest):
        with _autocast.disabled(dy.device.type if dy is not None else "cpu"):
            return (None, None) + _chain_backward(ctx, dy, rest)


def _chain_backward(ctx, dy, d_siblings):
    chain, ops = ctx.chain, ctx.ops
    n = len(chain.triples)
    saved = ctx.saved_tensors
    n_folds = sum(ctx.has_fold)
    inputs, fold_iter = saved[:n], iter(saved[n:n + n_folds])
    folds = [next(fold_iter) if has else None for has in ctx.has_fold]
    triple_params, sibling_weights = _split(chain, saved[n + n_folds:])
    # needs_input_grad of the parameters, split like them: (weight, gamma or None, beta or None)
    needs_params, needs_siblings = _split(chain, ctx.needs_input_grad[7:])
    needs_x = ctx.needs_input_grad[2]

    grads = [[None, None, None] for _ in chain.triples]  # (dW, dgamma, dbeta) per triple
    sibling_dw = [None] * len(chain.siblings)
    d = dy
    # The gradient into triple i's conv, when it is bn_backward(*pending) of triple i + 1's BN, not
    # yet computed: triple i's wgrad computes it in its own launch (conv_wgrad_bn_backward).
    pending = None
    if chain.residual == "sibling":
        d_siblings = (dy,) + tuple(d_siblings[1:])
    for i in reversed(range(n)):
        bn = chain.triples[i][0]
        h, fold = inputs[i], folds[i]
        weight = triple_params[i][0]
        stride, padding = chain.geometry[i]
        if d is None and pending is None:
            continue
        needs_w, needs_gamma, needs_beta = needs_params[i]
        upstream = i > 0 or needs_x or needs_gamma or needs_beta or any(needs_siblings)
        if needs_w and pending is not None:
            grads[i][0], d = ops.conv_wgrad_bn_backward(h, pending[0], weight, stride, padding, fold, *pending[1:])
        elif pending is not None and upstream:
            d = ops.bn_backward(*pending, None)
        elif needs_w:
            grads[i][0] = ops.conv_wgrad(h, d, weight, stride, padding, fold)
        pending = None
        if not upstream:
            d = None
            continue
        g, sums = ops.conv_dgrad(d, weight, h, stride, padding, fold)
        if bn is None:
            d = g if i > 0 or chain.residual != "input" else g + dy
            continue
        count = h.numel() / h.shape[1]
        pairs = [(g, sums)]
        if i == 0:
            for j, sibling in enumerate(chain.siblings):
                if d_siblings[j] is None:
                    continue
                s_stride, s_padding = chain.geometry[n + j]
                if needs_siblings[j]:
                    sibling_dw[j] = ops.conv_wgrad(h, d_siblings[j], sibling_weights[j], s_stride,
                                                   s_padding, fold)
                pairs.append(ops.conv_dgrad(d_siblings[j], sibling_weights[j], h, s_stride, s_padding, fold))
        training, sync = ctx.modes[i]

        def sums_dx(sums_part):
            if training and sync is not None:
                return _dist.global_sums(sums_part, count, sync[1], sync[0])
            return sums_part

        if i > 0:  # one masked gradient and no residual gradient: the next triple's wgrad takes it
            pending = (g, h, fold, sums_dx(sums), count, training)
            d = None
        else:
            d = dy if chain.residual == "input" else None  # the residual gradient enters the first BN's
            for g_part, sums_part in reversed(pairs):
                d = ops.bn_backward(g_part, h, fold, sums_dx(sums_part), count, training, d)
        total = pairs[0][1]
        for _, more in pairs[1:]:
            total = total + more
        grads[i][1:] = total[DGAMMA], total[SUM_G]
    dx = d if needs_x else None

    out = [dx, None, None, None, None]
    for params, needs, grad in zip(triple_params, needs_params, grads):
        out += [_cast_like(g, p) if need else None for p, need, g in zip(params, needs, grad) if p is not None]
    out += [_cast_like(dw, w) for dw, w in zip(sibling_dw, sibling_weights)]
    return tuple(out)


def run_chain(chain: Chain, x, stats, ops, want_stats=False, given=None):
    """Run ``chain`` on x [N, C, H, W] with the summary ``stats`` of x (or None: computed from x).

    Returns (y, stats of y or None, [sibling outputs], [UsedFold per triple]). ``given``: the
    UsedFolds of an earlier run (memory mode "min"'s recomputation): used instead of statistics,
    nothing updated. Under autocast x (and so the residual) is cast to the autocast dtype and the
    ops run with autocast off.
    """
    params = chain.parameters()
    used: list[UsedFold] = []
    dtype = _autocast.compute_dtype(x)
    if dtype is None:
        outputs = FusedChain.apply(chain, ops, x, stats, want_stats, given, used, *params)
    else:
        with _autocast.disabled(x.device.type):
            outputs = FusedChain.apply(chain, ops, x.to(dtype), stats, want_stats, given, used, *params)
    return outputs[0], (optional(outputs[1]) if want_stats else None), list(outputs[2:]), used


class FusedBNReLU(torch.autograd.Function):
    """a = relu(bn(x)) for a BN-ReLU that feeds no conv (a network's head): saves x and the fold."""

    @staticmethod
    def forward(ctx, x, fold, training, sync, ops, gamma, beta):
        ctx.save_for_backward(x, fold)
        ctx.training, ctx.sync, ctx.ops = training, sync, ops
        return preact(x, fold)

    @staticmethod
    @_once_differentiable
    def backward(ctx, da):
        x, fold = ctx.saved_tensors
        dx = None
        with _autocast.disabled(da.device.type):
            g, sums = masked_grad_and_sums(da, x, fold)
            if ctx.needs_input_grad[0]:
                count = x.numel() / x.shape[1]
                sums_dx = sums
                if ctx.training and ctx.sync is not None:
                    sums_dx = _dist.global_sums(sums, count, ctx.sync[1], ctx.sync[0])
                dx = ctx.ops.bn_backward(g, x, fold, sums_dx, count, ctx.training, None)
        dgamma = sums[DGAMMA] if ctx.needs_input_grad[5] else None
        dbeta = sums[SUM_G] if ctx.needs_input_grad[6] else None
        return dx, None, None, None, None, dgamma, dbeta


def bn_relu(x, bn: nn.BatchNorm2d, stats, ops):
    """relu(bn(x)) for x [N, C, H, W] with the summary ``stats`` of x (or None), saving x alone.

    Follows the statistics rules of the fused convs (running-stat update, eval mode, synchronised BN).
    """
    if uses_batch_stats(bn):
        check_batch_stats(x)
    given = batch_stats(bn, x, stats, ops)
    with torch.no_grad():
        fold = ops.bn_fold(**fold_args(bn, given, update=True))
    return FusedBNReLU.apply(x, fold, uses_batch_stats(bn), given.sync, ops, bn.weight, bn.bias)


class Recompute(torch.autograd.Function):
    """(y, stats) = run(x, stats, None), saving x and the folds only (memory mode "min").

    ``run(x, stats, given)`` computes one unit and returns (y, stats of y or None, [UsedFold]); given
    the UsedFolds of the forward (the backward's recomputation) it must apply them instead of
    statistics, so the running statistics are updated once and the recomputed activations are the
    forward's, bit for bit. ``params`` are the unit's parameters: their gradients come back through
    this Function, so DistributedDataParallel and optimizers see ordinary leaves.
    """

    @staticmethod
    def forward(ctx, run, x, stats, *params):
        ctx.run, ctx.params = run, params
        ctx.autocast = _autocast.current(x.device.type)
        y, y_stats, used = run(x, stats, None)
        ctx.modes = [u.mode for u in used]
        ctx.has_fold = [u.fold is not None for u in used]
        ctx.save_for_backward(x, *[u.fold for u in used if u.fold is not None])
        if y_stats is None:
            y_stats = y.new_empty(0, dtype=torch.float32)
        ctx.mark_non_differentiable(y_stats)
        return y, y_stats

    @staticmethod
    @_once_differentiable
    def backward(ctx, dy, _d_stats):
        x, *saved = ctx.saved_tensors
        fold_iter = iter(saved)
        given = [UsedFold(next(fold_iter) if has else None, mode) for has, mode in zip(ctx.has_fold, ctx.modes)]
        needs_x, needs_params = ctx.needs_input_grad[1], ctx.needs_input_grad[3:]
        x = x.detach().requires_grad_(needs_x)
        with torch.enable_grad(), _autocast.restored(ctx.autocast):
            y, _, _ = ctx.run(x, None, given)
        inputs = ([x] if needs_x else []) + [p for p, needed in zip(ctx.params, needs_params) if needed]
        grads = iter(torch.autograd.grad(y, inputs, dy, allow_unused=True))
        dx = next(grads) if needs_x else None
        dparams = [next(grads) if needed else None for needed in needs_params]
        return (None, dx, None, *dparams)


def recompute(run, x, stats, params):
    """Run a unit keeping only its input for backward, where it is run again (memory mode "min").

    run(x, stats, given) -> (y, stats of y or None, [UsedFold]): see ``Recompute``. Returns (y,
    stats of y or None). The unit must be deterministic given its input and folds (no dropout).
    """
    y, y_stats = Recompute.apply(run, x, stats, *params)
    return y, optional(y_stats)



