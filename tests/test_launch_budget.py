"""The launch budget of a fused pre-activation unit, counted at the contract level.

The fused path's Python (the unit's autograd Function, the BatchNorm bookkeeping, the blocks) must
call exactly 3 contract ops forward and 7 backward for a bottleneck unit with an identity shortcut
(3 dgrad; the last triple's wgrad; the first two triples' wgrad computing the BN backward of the
triple after them, conv_wgrad_bn_backward; the first triple's bn_backward), and launch nothing else:
no ATen op that does work runs between the ops (allocations and views do no work). Each fast
backend's tests check that one op is one kernel launch, so a unit is 10 launches.
"""
from __future__ import annotations

import collections
import types

import pytest
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


# (unit, input shape, convs, triples, ATen ops that do work in the backward glue)
UNITS = {
    "bottleneck": (lambda: PreActBottleneck(16, 4), (2, 16, 5, 5), 3, 3, {}),
    # a projection unit adds only the shortcut conv, and one add: the first BN's sums [3, C] of its
    # two consumers
    "projection": (lambda: PreActBottleneck(8, 4, stride=2), (2, 8, 5, 5), 4, 3, {"add": 1}),
    "basic": (lambda: PreActBasicBlock(8, 8), (1, 8, 5, 5), 2, 2, {}),
}


@pytest.mark.parametrize("unit", list(UNITS))
def test_unit_calls_each_contract_op_once_per_conv_and_nothing_else(unit, monkeypatch):
    make, shape, convs, triples, expected_backward_glue = UNITS[unit]
    torch.manual_seed(0)
    block = make().double()
    forward, forward_glue, backward, backward_glue = _unit_counts(block, torch.randn(*shape, dtype=torch.float64),
                                                                  monkeypatch)
    inner = triples - 1  # BNs whose backward the wgrad of the triple before them computes
    assert forward == {"conv_fwd": convs}
    assert backward == {"conv_dgrad": convs, "conv_wgrad": convs - inner, "conv_wgrad_bn_backward": inner,
                        "bn_backward": convs - inner}
    assert forward_glue == {}
    assert backward_glue == expected_backward_glue, backward_glue
