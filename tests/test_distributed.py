"""Synchronised BatchNorm in the fused path: two Gloo ranks behave like one process on the whole batch.

Each rank runs a small fused pre-act ResNet whose BatchNorms are ``nn.SyncBatchNorm`` on half of
every batch, gradients averaged over the ranks as DDP does (``average_gradients``: DDP itself refuses
SyncBatchNorm in CPU modules); the reference is one process, plain BatchNorm, the concatenated batch.
Same loss, gradients (the average of the per-rank mean losses is the mean over the global batch),
running statistics and weights after SGD steps, within fp32 rounding. DistributedDataParallel proper
is checked with the recomputing memory mode, whose backward runs collectives and nested autograd.
"""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from preact_fused import convert, preact_resnet
from preact_fused.distributed import average_gradients

WORLD = 2
BATCH = 4  # global; 2 per rank
STEPS = 2
TOL = 2e-5


pytestmark = pytest.mark.usefixtures("one_thread")


def _small_net(sync_bn: bool, memory: str = "activations") -> nn.Module:
    torch.manual_seed(0)
    return preact_resnet(11, block="bottleneck", backend="reference", memory=memory, sync_bn=sync_bn)


def _converted_net(sync_bn: bool) -> nn.Module:
    """An eager net with (Sync)BatchNorm -> ReLU -> conv chains, fused by ``convert``."""
    torch.manual_seed(1)
    norm = nn.SyncBatchNorm if sync_bn else nn.BatchNorm2d
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), norm(8), nn.ReLU(),
                        nn.Conv2d(8, 8, 3, stride=2, padding=1, bias=False), norm(8), nn.ReLU(),
                        nn.Conv2d(8, 10, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return convert(net, backend="reference")


BUILDERS = {
    "resnet-activations": lambda sync: _small_net(sync),
    "resnet-min": lambda sync: _small_net(sync, memory="min"),
    "convert": _converted_net,
}


def _batches():
    gen = torch.Generator().manual_seed(2)
    return [(torch.randn(BATCH, 3, 8, 8, generator=gen) * 2 + 0.5, torch.randint(0, 10, (BATCH,), generator=gen))
            for _ in range(STEPS)]


def _train(model, batches, rank=0, world=1):
    """SGD steps on this rank's slice of every batch: (losses, grads of the last step, state_dict).

    A hand-written update (torch.optim's first step imports torch._dynamo: seconds per process).
    """
    losses = []
    for x, target in batches:
        per = x.shape[0] // world
        x, target = x[rank * per:(rank + 1) * per], target[rank * per:(rank + 1) * per]
        model.zero_grad()
        loss = nn.functional.cross_entropy(model(x), target)
        loss.backward()
        if world > 1 and not isinstance(model, DistributedDataParallel):
            average_gradients(model)
        with torch.no_grad():
            for p in model.parameters():
                p -= 0.1 * p.grad
        losses.append(loss.detach())
    module = model.module if isinstance(model, DistributedDataParallel) else model
    grads = {name: p.grad.clone() for name, p in module.named_parameters()}
    return torch.stack(losses), grads, {k: v.clone() for k, v in module.state_dict().items()}


def _worker(rank, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    try:
        results = {}
        for name, build in BUILDERS.items():
            losses, grads, state = _train(build(True), _batches(), rank, WORLD)
            dist.all_reduce(losses)
            results[name] = (losses / WORLD, grads, state)
        for memory in ("activations", "min"):  # local BN statistics: DDP accepts the modules on CPU
            results[f"ddp-{memory}"] = _train(DistributedDataParallel(_small_net(False, memory)), _batches(),
                                              rank, WORLD)
        if rank == 0:
            torch.save(results, os.path.join(out_dir, "ranks.pt"))
    finally:
        dist.destroy_process_group()
    # The work is done and saved: leave without the interpreter's teardown, during which a rank has
    # been seen to abort now and then ("terminate called without an active exception", no Python
    # frame left), which spawn would report as a failure.
    os._exit(0)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with Gloo is not available")
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(str(out / "store"), str(out)), nprocs=WORLD, join=True)
    return torch.load(out / "ranks.pt")


@pytest.mark.parametrize("name", list(BUILDERS))
def test_two_ranks_match_one_process_on_the_whole_batch(two_ranks, name):
    losses, grads, state = two_ranks[name]
    ref_losses, ref_grads, ref_state = _train(BUILDERS[name](False), _batches())
    assert torch.allclose(losses, ref_losses, rtol=TOL, atol=0), (losses, ref_losses)
    assert grads.keys() == ref_grads.keys()
    for key, grad in grads.items():
        ref = ref_grads[key]
        assert (grad - ref).abs().max() <= TOL * ref.abs().max(), key
    for key, value in state.items():
        ref = ref_state[key]
        if value.is_floating_point():
            assert (value - ref).abs().max() <= TOL * ref.abs().max(), key
        else:
            assert torch.equal(value, ref), key


def test_ddp_with_recomputed_units(two_ranks):
    """memory="min" under DistributedDataParallel: the same training as the default mode."""
    losses, grads, state = two_ranks["ddp-min"]
    ref_losses, ref_grads, ref_state = two_ranks["ddp-activations"]
    assert torch.equal(losses, ref_losses)
    for key in ref_grads:
        assert torch.equal(grads[key], ref_grads[key]), key
    for key in ref_state:
        assert torch.equal(state[key], ref_state[key]), key


def test_sync_batchnorm_without_process_group_is_local():
    """No process group initialised: a SyncBatchNorm model is an ordinary model (single process)."""
    torch.manual_seed(3)
    x = torch.randn(2, 3, 8, 8)
    sync, plain = _small_net(True), _small_net(False)
    assert any(isinstance(m, nn.SyncBatchNorm) for m in sync.modules())
    assert torch.equal(sync(x), plain(x))
