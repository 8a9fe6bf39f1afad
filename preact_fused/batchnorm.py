"""How an ``nn.BatchNorm2d`` enters the fused ops: its statistics mode and the op arguments for it.

A BatchNorm in front of a fused conv is never run as a module: its parameters and buffers are passed
to the conv's op, which folds the statistics in its prologue and updates the running statistics
(contract.py). This module decides, from the module's state at call time, which of the contract's
forms applies (batch statistics with or without a running-stat update, or running statistics) and
builds the arguments; synchronised BatchNorm gathers the ranks' summaries first.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from . import distributed as _dist


class BatchStats(NamedTuple):
    """The statistics a BatchNorm normalises one input with: the contract's ``stats`` argument.

    stats: the summary [4, C] (batch statistics) or None (running statistics); sync: the process
    group and the global per-channel count [C] when the statistics are those of a global batch.
    """
    stats: torch.Tensor | None
    sync: tuple | None = None


def uses_batch_stats(bn: nn.BatchNorm2d) -> bool:
    """Whether ``bn`` normalises with the batch's statistics (training, or no running statistics)."""
    return bn.training or bn.running_mean is None


def updates_running(bn: nn.BatchNorm2d) -> bool:
    """Whether a forward of ``bn`` updates its running statistics and ``num_batches_tracked``."""
    return bn.training and bn.track_running_stats and bn.running_mean is not None


def batch_stats(bn: nn.BatchNorm2d, x: torch.Tensor, stats, ops) -> BatchStats:
    """The statistics ``bn`` uses for x [N, C, H, W]: the summary ``stats`` of x from its producer
    (or ``ops.bn_stats(x)`` when None), the global one for a synchronised BN, None in eval mode."""
    if not uses_batch_stats(bn):
        return BatchStats(None)
    if stats is None:
        stats = ops.bn_stats(x)
    group = _dist.sync_group(bn)
    if group is None:
        return BatchStats(stats)
    stats = _dist.gather_summaries(stats, group)
    return BatchStats(stats, (group, stats[0]))


def fold_args(bn: nn.BatchNorm2d, given: BatchStats, update: bool) -> dict:
    """The BatchNorm keyword arguments of ``conv_fwd`` / ``bn_fold`` for ``bn`` with ``given`` statistics.

    update: whether this op is the one that updates the running statistics (False for a second op
    of the same BatchNorm, and for the recomputation of memory mode "min").
    """
    update = update and updates_running(bn)
    return dict(stats=given.stats, gamma=bn.weight, beta=bn.bias,
                running_mean=bn.running_mean if (update or given.stats is None) else None,
                running_var=bn.running_var if (update or given.stats is None) else None,
                num_batches_tracked=bn.num_batches_tracked if update else None,
                eps=bn.eps, momentum=bn.momentum, update_running=update)
