"""Drop-in modules: BNReLUConv2d and the pre-activation residual blocks.

Each module holds plain ``nn.BatchNorm2d`` / ``nn.Conv2d`` children, so its state_dict is that of the
unfused modules; only ``forward`` differs. Blocks accept either a tensor or a ``(tensor, partials)``
pair, where partials are the statistics of the tensor produced by its producer (DESIGN.md section 3),
and return the same kind: models built by this package chain pairs so no BN re-reads its input.

Memory modes of the blocks: ``memory="activations"`` (default) saves one tensor per triple (its
pre-BN input); ``memory="min"`` saves only the unit's input and runs the unit again in backward
(see ``autograd.recompute``), with the running statistics updated once.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from .autograd import batch_norm_params, bn_relu_conv2d, recompute, resolve_ops
from .validation import check_input, conv_geometry

MEMORY_MODES = ("activations", "min")


def check_memory_mode(memory: str) -> str:
    if memory not in MEMORY_MODES:
        raise ValueError(f"memory must be one of {MEMORY_MODES}, got {memory!r}")
    return memory


def _uses_batch_stats(bn: nn.BatchNorm2d) -> bool:
    return bn.training or bn.running_mean is None


class BNReLUConv2d(nn.Module):
    """conv(relu(bn(x))) in one fused op; numerically ``nn.Sequential(bn, nn.ReLU(), conv)``.

    Takes nn.Conv2d's arguments (``bias`` defaults to False) and, as keywords, nn.BatchNorm2d's (of
    ``in_channels`` features) and ``backend``. Convolutions the fused op does not implement (groups,
    dilation, a padding mode other than zeros, unequal strides or paddings) are refused with a
    ValueError naming them. Input [N, Cin, H, W] (NCHW or channels_last, kept); output
    [N, Cout, Ho, Wo]. Saves only x for backward (not relu(bn(x))). state_dict keys: ``bn.*``, ``conv.*``.
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1,
                 bias=False, padding_mode="zeros", *, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, device=None, dtype=None, backend="auto"):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding, dilation=dilation,
                         groups=groups, bias=bias, padding_mode=padding_mode, **factory)
        conv_geometry(conv)
        self.bn = nn.BatchNorm2d(in_channels, eps=eps, momentum=momentum, affine=affine,
                                 track_running_stats=track_running_stats, **factory)
        self.conv = conv
        self.backend = backend

    @classmethod
    def from_modules(cls, bn: nn.BatchNorm2d, conv: nn.Conv2d, backend="auto") -> "BNReLUConv2d":
        """Wrap existing modules, sharing their parameters and buffers (no copies)."""
        conv_geometry(conv)
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module.bn, module.conv, module.backend = bn, conv, backend
        return module

    def reset_parameters(self) -> None:
        self.bn.reset_parameters()
        self.conv.reset_parameters()

    def fused(self, x, partials=None, residual=None, want_stats=False):
        """(y, partials of y or None): the op with the statistics of x passed in and out."""
        check_input(x, self.conv, batch_stats=_uses_batch_stats(self.bn))
        ops = resolve_ops(self.backend, x)
        params = batch_norm_params(self.bn, x, partials, ops)
        return bn_relu_conv2d(x, self.conv, params, ops, residual=residual, want_stats=want_stats)

    def forward(self, x):
        return self.fused(x)[0]

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}"


class _PreActBlock(nn.Module):
    """A chain of BN-ReLU-conv triples plus a shortcut; subclasses define the convs.

    ``bns[i]`` precedes ``convs[i]``; the shortcut (a 1x1 projection or identity) reads the first
    pre-activation, and the last conv's output gets the shortcut added.
    """

    expansion = 1

    def __init__(self, in_planes, planes, stride, fused, backend, memory="activations"):
        super().__init__()
        self.fused = fused
        self.backend = backend
        self.memory = check_memory_mode(memory)
        out_planes = planes * self.expansion
        self.shortcut = None
        if stride != 1 or in_planes != out_planes:
            self.shortcut = nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)

    def _triples(self):
        raise NotImplementedError

    def forward(self, inp):
        pair = isinstance(inp, tuple)
        x, partials = inp if pair else (inp, None)
        if self.memory == "min" and self._recomputes(x):
            run = self._fused_unit if self.fused else self._eager_unit
            y, partials = recompute(functools.partial(run, want_stats=pair), x, partials, list(self.parameters()))
            return (y, partials) if pair else y
        if self.fused:
            y, partials = self._fused_forward(x, partials, want_stats=pair)
            return (y, partials) if pair else y
        y = self._eager_forward(x)
        return (y, None) if pair else y

    def _recomputes(self, x) -> bool:
        """Whether this forward builds a graph worth recomputing (not under no_grad / inference)."""
        return torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters()))

    def _eager_unit(self, x, partials, bn_params, want_stats):
        """The unfused unit for ``recompute``; the recomputation updates throw-away copies of the buffers.

        (Copies swapped in and out rather than values copied back: the batch norms of the recomputed
        graph save the running statistics, which must not change version under them.)
        """
        if bn_params is None:
            return self._eager_forward(x), None, []
        originals = [(m, name, b) for m in self.modules() for name, b in m._buffers.items() if b is not None]
        for m, name, b in originals:
            m._buffers[name] = b.clone()
        try:
            return self._eager_forward(x), None, []
        finally:
            for m, name, b in originals:
                m._buffers[name] = b

    def _eager_forward(self, x):
        (bn, conv), *rest = self._triples()
        a = F.relu(bn(x))
        shortcut = x if self.shortcut is None else self.shortcut(a)
        h = conv(a)
        for bn, conv in rest:
            h = conv(F.relu(bn(h)))
        return h + shortcut

    def _fused_forward(self, x, partials, want_stats):
        h, partials, _ = self._fused_unit(x, partials, None, want_stats)
        return h, partials

    def _fused_unit(self, x, partials, bn_params, want_stats):
        """(y, partials of y, the BNParams used). Given ``bn_params``, uses them: no statistics."""
        triples = self._triples()
        check_input(x, triples[0][1])
        ops = resolve_ops(self.backend, x)
        given = bn_params is not None
        used = []

        def fold(i, bn, h, partials):
            used.append(bn_params[i] if given else batch_norm_params(bn, h, partials, ops))
            return used[-1]

        def stats_for(bn):
            return not given and _uses_batch_stats(bn)

        (bn, conv), *rest = triples
        params = fold(0, bn, x, partials)
        shortcut = x if self.shortcut is None else bn_relu_conv2d(x, self.shortcut, params, ops)[0]
        stats_next = rest[0][0] if rest else None
        h, partials = bn_relu_conv2d(x, conv, params, ops, want_stats=stats_for(stats_next))
        for i, (bn, conv) in enumerate(rest):
            params = fold(i + 1, bn, h, partials)
            last = i == len(rest) - 1
            h, partials = bn_relu_conv2d(
                h, conv, params, ops, residual=shortcut if last else None,
                want_stats=(want_stats and not given) if last else stats_for(rest[i + 1][0]))
        return h, partials, used

    def extra_repr(self) -> str:
        return f"fused={self.fused}, backend={self.backend!r}, memory={self.memory!r}"


class PreActBasicBlock(_PreActBlock):
    """Basic pre-activation unit (ResNet-110): BN-ReLU-conv3x3(stride) -> BN-ReLU-conv3x3, + shortcut."""

    expansion = 1

    def __init__(self, in_planes, planes, stride=1, fused=True, backend="auto", memory="activations"):
        super().__init__(in_planes, planes, stride, fused, backend, memory)
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)

    def _triples(self):
        return [(self.bn1, self.conv1), (self.bn2, self.conv2)]


class PreActBottleneck(_PreActBlock):
    """Bottleneck pre-activation unit (ResNet-164/1001/200): 1x1 -> 3x3(stride) -> 1x1 (x4), + shortcut."""

    expansion = 4

    def __init__(self, in_planes, planes, stride=1, fused=True, backend="auto", memory="activations"):
        super().__init__(in_planes, planes, stride, fused, backend, memory)
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)

    def _triples(self):
        return [(self.bn1, self.conv1), (self.bn2, self.conv2), (self.bn3, self.conv3)]
