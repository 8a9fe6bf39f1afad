"""Drop-in modules: BNReLUConv2d and the pre-activation residual blocks.

Each module holds plain ``nn.BatchNorm2d`` / ``nn.Conv2d`` children, so its state_dict is that of the
unfused modules; only ``forward`` differs. A block's ``forward_with_stats(x, stats)`` also takes the
statistics summary of its input from the producer and returns that of its output (contract.py), so
the package's models chain units without any BN re-reading its input; ``forward(x)`` is the plain
module call. An empty batch runs the unfused modules (exactly PyTorch's behaviour, nothing to fuse).

Memory modes of the blocks: ``memory="activations"`` (default) saves one tensor per triple (its
pre-BN input); ``memory="min"`` saves only the unit's input and runs the unit again in backward
(see ``autograd.recompute``), with the running statistics updated once.
"""
from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn

from .backend import resolve
from .batchnorm import uses_batch_stats
from .functions import Chain, recompute, run_chain
from .validation import check_input, conv_geometry

MEMORY_MODES = ("activations", "min")


def check_memory_mode(memory: str) -> str:
    if memory not in MEMORY_MODES:
        raise ValueError(f"memory must be one of {MEMORY_MODES}, got {memory!r}")
    return memory


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

    def forward(self, x):
        check_input(x, self.conv, batch_stats=uses_batch_stats(self.bn))
        if x.numel() == 0:
            return self.conv(F.relu(self.bn(x)))
        y = run_chain(Chain(((self.bn, self.conv),)), x, None, resolve(self.backend, x.device))[0]
        if self.conv.bias is not None:
            y = y + self.conv.bias.to(y.dtype)[:, None, None]
        return y

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

    def chain(self) -> Chain:
        """The unit as one fused chain: the triples, the projection (a sibling of the first conv) or
        the identity shortcut."""
        if self.shortcut is None:
            return Chain(tuple(self._triples()), (), "input")
        return Chain(tuple(self._triples()), (self.shortcut,), "sibling")

    def forward(self, x):
        return self.forward_with_stats(x, None, want_stats=False)[0]

    def forward_with_stats(self, x, stats, want_stats=True):
        """(y, summary of y or None): the unit on x given the summary ``stats`` of x (or None)."""
        if not self.fused or x.numel() == 0:
            run = self._eager_unit
        else:
            check_input(x, self._triples()[0][1])
            ops = resolve(self.backend, x.device)
            chain = self.chain()

            def run(x, stats, given):
                y, y_stats, _, used = run_chain(chain, x, stats, ops, want_stats and given is None, given)
                return y, y_stats, used
        if self.memory == "min" and self._recomputes(x):
            return recompute(run, x, stats, list(self.parameters()))
        y, y_stats, _ = run(x, stats, None)
        return y, y_stats

    def _recomputes(self, x) -> bool:
        """Whether this forward builds a graph worth recomputing (not under no_grad / inference)."""
        return torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters()))

    def _eager_unit(self, x, stats, given):
        """The unfused unit as a ``recompute`` run; the recomputation updates throw-away copies of the buffers.

        (Copies swapped in and out rather than values copied back: the batch norms of the recomputed
        graph save the running statistics, which must not change version under them.)
        """
        if given is None:
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
