"""What a converted model runs: BatchNorms that defer their work to the convolutions reading them.

``convert`` installs two instance-level ``forward`` overrides and leaves everything else of the
model (its class, its own forward code, hooks, parameters, buffers) as it was:

- a BatchNorm at the head of a chain (``DeferredBatchNorm``) returns its input x wrapped as a
  ``DeferredActivation``: a tensor subclass aliasing x that stands for bn(x), and for relu(bn(x))
  once a ReLU (``nn.ReLU``, ``F.relu``, ``torch.relu``, ``x.relu()``, in-place variants) has been
  applied to it, or at once for a combined norm+activation module;
- a convolution of the chain (``FusedConvForward``) that receives an activated one runs the fused
  op on x: one BN statistics pass and running-statistics update per BN call, shared by every conv
  reading it (a projection shortcut), relu(bn(x)) never stored.

Everything else that touches a ``DeferredActivation`` (a path the analysis did not see: another
branch of ``if self.training``, a hook, a print) gets the real value: bn(x) or relu(bn(x)) is
computed then by the module's own forward, once, so results are exact whatever path runs; only the
memory saving is lost for that call. Identity-like calls (``nn.Identity``, dropout with p=0 or in
eval mode) and metadata queries (shape, dtype, device) pass the deferred value through.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from torch.utils._pytree import tree_map

from .backend import resolve
from .batchnorm import uses_batch_stats
from .functions import Chain, run_chain
from .validation import check_input

_RELU_OUT_OF_PLACE = {F.relu, torch.relu, torch.Tensor.relu}
_RELU_IN_PLACE = {torch.relu_, F.relu_, torch.Tensor.relu_}
_DROPOUTS = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d}
# Answered from x itself: bn(x) and relu(bn(x)) have x's metadata.
_METADATA = {torch.Tensor.dim, torch.Tensor.size, torch.Tensor.numel, torch.Tensor.is_floating_point,
             torch.Tensor.shape.__get__, torch.Tensor.ndim.__get__, torch.Tensor.dtype.__get__,
             torch.Tensor.device.__get__, torch.Tensor.is_cuda.__get__, torch.Tensor.layout.__get__}


def _fused_conv(x, bn: nn.BatchNorm2d, conv: nn.Conv2d, backend: str, used):
    """(conv(relu(bn(x))), used) by the fused op; the only use of the fused math in a converted model.

    used: the BN as folded for this x by an earlier conv of the same chain ([UsedFold]), or None:
    then it is folded here, which updates the BN's running statistics (once per BN call). The two
    convs' BN backwards then add up through autograd, which is exact (the BN backward is linear).
    """
    # A parametrised weight (spectral_norm, weight_norm) is computed once, as Conv2d.forward does:
    # spectral_norm's power iteration advances on every computation.
    with parametrize.cached() if parametrize.is_parametrized(conv) else contextlib.nullcontext():
        check_input(x, conv, batch_stats=used is None and uses_batch_stats(bn))
        y, _, _, used = run_chain(Chain(((bn, conv),)), x, None, resolve(backend, x.device), given=used)
        if conv.bias is not None:
            y = y + conv.bias.to(y.dtype)[:, None, None]
        return y, used


@contextlib.contextmanager
def _spare_buffers(bn: nn.Module):
    """Run ``bn`` on copies of its buffers: its output without a second running-statistics update."""
    saved = dict(bn._buffers)
    bn._buffers.update({name: b.clone() for name, b in saved.items() if b is not None})
    try:
        yield
    finally:
        bn._buffers.update(saved)


class _BatchNormCall:
    """One call of a deferred BN on x: what has been computed from it so far."""

    def __init__(self, x: torch.Tensor, bn: nn.BatchNorm2d, name: str, combined: bool, backend: str):
        self.x, self.bn, self.name, self.combined, self.backend = x, bn, name, combined, backend
        # An in-place change of x before the fused conv reads it shows in x's version counter.
        # torch.compile cannot guard on that counter: compiled code relies on the static check
        # alone (chain_search refuses a BN whose input is modified in place in the traced graph).
        self.version = None if torch.compiler.is_compiling() else x._version
        self.params = None           # the BN folded by a fused conv (statistics updated)
        self.normalized = None       # bn(x), computed by the module's forward
        self.activated = None        # relu(bn(x)), likewise
        self.stats_updated = False   # the running statistics have had this call's update

    def _check_unmodified(self):
        if self.version is not None and self.x._version != self.version:
            raise RuntimeError(
                f"the input of BatchNorm {self.name!r} was modified in place after the BatchNorm read it; "
                f"a converted model computes that BatchNorm later, in the conv reading it. Exclude it "
                f"with convert(model, filter_fn=...) or avoid the in-place operation.")

    def _run_module(self):
        """The module's own forward on x; a repeated update of the running statistics is avoided."""
        self._check_unmodified()
        forward = type(self.bn).forward
        if not self.stats_updated:
            self.stats_updated = True
            return forward(self.bn, self.x)
        with _spare_buffers(self.bn):
            return forward(self.bn, self.x)

    def value(self, activated: bool) -> torch.Tensor:
        """The real bn(x) (activated False; never asked of a combined module) or relu(bn(x))."""
        if activated:
            if self.activated is None:
                self.activated = self._run_module() if self.combined else F.relu(self.value(False))
            return self.activated
        if self.normalized is None:
            self.normalized = self._run_module()
        return self.normalized

    @property
    def materialized(self) -> bool:
        return self.normalized is not None or self.activated is not None

    def conv(self, conv: nn.Conv2d) -> torch.Tensor:
        """conv(relu(bn(x))): fused unless the activation has already been computed for another use."""
        if self.materialized or self.x.numel() == 0:  # an empty batch: PyTorch's own modules, exactly
            return type(conv).forward(conv, self.value(True))
        self._check_unmodified()
        y, self.params = _fused_conv(self.x, self.bn, conv, self.backend, self.params)
        self.stats_updated = True
        return y


class DeferredActivation(torch.Tensor):
    """bn(x) (or relu(bn(x)) when ``_activated``) not computed yet; an alias of x for everything else.

    Any torch operation on it other than a ReLU, a pass-through or a metadata query sees the real
    value instead (computed on first need, then reused).
    """

    _call: _BatchNormCall
    _activated: bool

    @staticmethod
    def wrap(call: _BatchNormCall, activated: bool) -> "DeferredActivation":
        out = call.x.as_subclass(DeferredActivation)
        out._call, out._activated = call, activated
        return out

    def _value(self) -> torch.Tensor:
        return self._call.value(self._activated)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        first = args[0] if args else None
        if isinstance(first, DeferredActivation) and not first._call.materialized:
            if func in _METADATA:
                return func(first._call.x, *args[1:], **kwargs)
            in_place = func in _RELU_IN_PLACE or (func is F.relu and kwargs.get("inplace", False))
            if in_place:
                first._activated = True
                return first
            if func in _RELU_OUT_OF_PLACE:
                return DeferredActivation.wrap(first._call, True)
            if func in _DROPOUTS and _is_identity_dropout(args, kwargs):
                return first
        args, kwargs = tree_map(lambda a: a._value() if isinstance(a, DeferredActivation) else a, (args, kwargs))
        return func(*args, **kwargs)


def _is_identity_dropout(args, kwargs) -> bool:
    """Whether F.dropout*(input, p, training, inplace) with these arguments returns its input's values."""
    p = args[1] if len(args) > 1 else kwargs.get("p", 0.5)
    training = args[2] if len(args) > 2 else kwargs.get("training", True)
    return p == 0 or not training


class DeferredBatchNorm:
    """``forward`` of a BN heading a chain: returns its input as a ``DeferredActivation``.

    combined: the module is a norm+activation module (its output is already relu(bn(x))).
    An input that is not a plain 4-D tensor runs the module's own forward.
    """

    def __init__(self, bn: nn.BatchNorm2d, name: str, combined: bool, backend: str):
        self.bn, self.name, self.combined, self.backend = bn, name, combined, backend

    def __call__(self, x):
        if type(x) is not torch.Tensor or x.dim() != 4:
            return type(self.bn).forward(self.bn, x)
        call = _BatchNormCall(x, self.bn, self.name, self.combined, self.backend)
        return DeferredActivation.wrap(call, self.combined)


class FusedConvForward:
    """``forward`` of a conv of a chain: the fused op when its input is a deferred relu(bn(x))."""

    def __init__(self, conv: nn.Conv2d):
        self.conv = conv

    def __call__(self, x):
        if isinstance(x, DeferredActivation) and x._activated:
            return x._call.conv(self.conv)
        return type(self.conv).forward(self.conv, x)


def install(bn: nn.BatchNorm2d, name: str, combined: bool, convs: list[nn.Conv2d], backend: str) -> None:
    """Make ``bn`` defer its work to ``convs`` (instance ``forward`` overrides; nothing else changes)."""
    bn.forward = DeferredBatchNorm(bn, name, combined, backend)
    for conv in convs:
        conv.forward = FusedConvForward(conv)


def is_installed(module: nn.Module) -> bool:
    return isinstance(module.__dict__.get("forward"), (DeferredBatchNorm, FusedConvForward))


def uninstall(model: nn.Module) -> None:
    """Remove every override ``install`` put in ``model``: its modules run their own forward again."""
    for module in model.modules():
        if is_installed(module):
            del module.__dict__["forward"]
