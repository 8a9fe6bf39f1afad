"""The launch budget of a fused pre-activation unit, counted at the contract level.

The fused path's Python (the unit's autograd Function, the BatchNorm bookkeeping, the blocks) must
call exactly 3 contract ops forward and 9 backward for a bottleneck unit with an identity shortcut,
and launch nothing else: no ATen op that does work runs between the ops (allocations and views do
no work). Each fast backend's tests check that one op is one kernel launch, so a unit is 12 launches.
"""
from __future__ import annotations

import collections
import types

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from preact_fused import contract, reference
from preact_fused.nn import PreActBasicBlock, PreActBottleneck

# ATen ops that launch no kernel: allocation, views and metadata.
NO_WORK = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "view", "_unsafe_view",
           "as_strided", "t", "permute", "expand", "transpose", "unsqueeze", "squeeze", "detach", "alias",
           "slice", "select", "split", "unbind", "lift_fresh", "_to_copy_noop", "is_same_size"}


class _GlueOps(TorchDispatchMode):
    """Counts the ATen ops that do work outside the contract ops (``inside`` > 0 while one runs)."""

    def __init__(self):
        super().__init__()
        self.inside = 0
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types_, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if self.inside == 0 and name not in NO_WORK:
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))


def counting_backend(glue: _GlueOps):
    """The reference backend with every contract call counted, and glue counting paused inside."""
    calls = collections.Counter()

    def wrap(name):
        fn = getattr(reference, name)

        def counted(*args, **kwargs):
            calls[name] += 1
            glue.inside += 1
            try:
                return fn(*args, **kwargs)
            finally:
                glue.inside -= 1
        return counted

    module = types.SimpleNamespace(**{name: wrap(name) for name in contract.OPS})
    module.unavailable_reason = reference.unavailable_reason
    return module, calls


def _unit_counts(block, x, monkeypatch):
    glue = _GlueOps()
    ops, calls = counting_backend(glue)
    monkeypatch.setattr("preact_fused.nn.resolve", lambda name, device: ops)
    stats = reference.bn_stats(x)
    x = x.detach().requires_grad_()
    with glue:
        y, y_stats = block.forward_with_stats(x, stats)
    forward, forward_glue = dict(calls), dict(glue.ops)
    calls.clear()
    glue.ops.clear()
    dy = torch.randn_like(y)
    with glue:
        y.backward(dy)
    return forward, forward_glue, dict(calls), dict(glue.ops)


def test_bottleneck_unit_is_3_ops_forward_9_backward(monkeypatch):
    torch.manual_seed(0)
    block = PreActBottleneck(16, 4).double()
    forward, forward_glue, backward, backward_glue = _unit_counts(block, torch.randn(2, 16, 5, 5, dtype=torch.float64),
                                                                  monkeypatch)
    assert forward == {"conv_fwd": 3}
    assert backward == {"conv_dgrad": 3, "conv_wgrad": 3, "bn_backward": 3}
    assert forward_glue == {} and backward_glue == {}, (forward_glue, backward_glue)


def test_projection_unit_adds_only_the_shortcut_conv(monkeypatch):
    torch.manual_seed(0)
    block = PreActBottleneck(8, 4, stride=2).double()
    forward, forward_glue, backward, backward_glue = _unit_counts(block, torch.randn(2, 8, 5, 5, dtype=torch.float64),
                                                                  monkeypatch)
    assert forward == {"conv_fwd": 4}
    assert backward == {"conv_dgrad": 4, "conv_wgrad": 4, "bn_backward": 4}
    assert forward_glue == {}
    assert backward_glue == {"add": 1}, backward_glue  # the first BN's sums [3, C] of its two consumers


def test_basic_unit_is_2_ops_forward_6_backward(monkeypatch):
    torch.manual_seed(0)
    block = PreActBasicBlock(8, 8).double()
    forward, forward_glue, backward, backward_glue = _unit_counts(block, torch.randn(1, 8, 5, 5, dtype=torch.float64),
                                                                  monkeypatch)
    assert forward == {"conv_fwd": 2}
    assert backward == {"conv_dgrad": 2, "conv_wgrad": 2, "bn_backward": 2}
    assert forward_glue == {} and backward_glue == {}, (forward_glue, backward_glue)
