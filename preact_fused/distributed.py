"""Synchronised BatchNorm for the fused path, and the process-group plumbing of multi-GPU training.

SyncBatchNorm semantics (``nn.SyncBatchNorm``, exactly): in training, every rank normalises with the
statistics of the global batch (the concatenation of all ranks' local batches), the running
statistics see the global mean and the unbiased global variance, and the backward uses the global
sums. Gradients of gamma and beta stay local: DistributedDataParallel averages them like any other
parameter gradient.

How the fused path does it, with the kernel contract unchanged:

* Forward. Each rank's statistics summary ``[4, C]`` (contract.py) is all-gathered and the
  ``[world, 4, C]`` summaries merged in rank order (``contract.merge_summaries``): exact (no
  E[x^2] - E[x]^2 cancellation), deterministic, and the message has the same shape on every rank
  whatever the local batch size. The conv that reads the BN then folds the global summary.
* Backward. ``conv_dgrad`` yields the local sums (sum_g, sum_gx about the global mean, dgamma).
  dgamma / dbeta come from the local sums; dx needs the global ones, so they are all-reduced.
  ``bn_backward`` divides by the count it is given (the local one); passing ``sum * M_local /
  M_global`` instead is exact algebra, as B and C depend on the sums only through ``sum / M``.

A BatchNorm is synchronised when it is an ``nn.SyncBatchNorm`` in training mode and its process group
(``bn.process_group``, or the default group) spans more than one rank; ``preact_resnet(sync_bn=True)``
or ``nn.SyncBatchNorm.convert_sync_batchnorm`` give a model such modules, and ``convert`` keeps them.
Gloo (CPU) and NCCL (GPU) both serve the two collectives used.
"""
from __future__ import annotations

import os
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import nn

from .contract import merge_summaries


def sync_group(bn: nn.Module):
    """The process group to synchronise ``bn``'s batch statistics over, or None (local statistics)."""
    if not isinstance(bn, nn.SyncBatchNorm) or not bn.training:
        return None
    if not (dist.is_available() and dist.is_initialized()):
        return None
    group = bn.process_group if bn.process_group is not None else dist.group.WORLD
    return group if dist.get_world_size(group) > 1 else None


def gather_summaries(stats: torch.Tensor, group) -> torch.Tensor:
    """The summary [4, C] of the global batch: every rank's summary gathered and merged in rank order."""
    summaries = [torch.empty_like(stats) for _ in range(dist.get_world_size(group))]
    dist.all_gather(summaries, stats.contiguous(), group=group)
    return merge_summaries(torch.stack(summaries))


def global_sums(sums: torch.Tensor, local_count: float, global_count: torch.Tensor, group) -> torch.Tensor:
    """The backward sums [3, C] all-reduced over ``group``, scaled by local_count / global_count.

    ``bn_backward`` computes ``sum / count`` with the local count; the scaled sums make that
    ``global_sum / global_count``, the SyncBatchNorm backward.
    """
    sums = sums.clone()
    dist.all_reduce(sums, group=group)
    return sums * (local_count / global_count.to(sums.dtype))


class DistInfo(NamedTuple):
    """Where this process sits in a (possibly single-process) run."""
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def launched_by_torchrun() -> bool:
    """True when the environment variables of ``torchrun`` (or ``torch.distributed.launch``) are set."""
    return all(key in os.environ for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))


def setup(device: str = "auto", backend: str | None = None) -> DistInfo:
    """Join the process group ``torchrun`` describes (if any) and pick this rank's device.

    device: "auto" (CUDA when available, else CPU), "cpu" or "cuda". Under torchrun with CUDA each
    rank takes ``cuda:LOCAL_RANK``. backend: process-group backend; default NCCL on CUDA, Gloo on CPU.
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("--device cuda requested but torch sees no CUDA device")
    if not launched_by_torchrun() or int(os.environ["WORLD_SIZE"]) == 1:
        dev = torch.device(device)
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        return DistInfo(0, 1, 0, dev)
    rank, world, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    if device.startswith("cuda"):
        if local >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK {local} but only {torch.cuda.device_count()} CUDA devices are visible")
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    if not dist.is_initialized():
        kwargs = {"device_id": dev} if dev.type == "cuda" else {}
        dist.init_process_group(backend or ("nccl" if dev.type == "cuda" else "gloo"), **kwargs)
    return DistInfo(rank, world, local, dev)


def teardown() -> None:
    """Leave the process group if this process joined one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def average_gradients(model: nn.Module, group=None) -> None:
    """Average the parameter gradients over the ranks of ``group``, as DDP does, in one all-reduce.

    For CPU multi-process runs: DistributedDataParallel refuses ``nn.SyncBatchNorm`` in CPU modules,
    although the fused path synchronises them on CPU. Call after ``backward``, before the step.
    """
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=group)
    flat /= dist.get_world_size(group)
    for g, reduced in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(reduced.view_as(g))


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum of ``values`` over all ranks (a no-op in a single-process run)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        values = values.clone()
        dist.all_reduce(values)
    return values
