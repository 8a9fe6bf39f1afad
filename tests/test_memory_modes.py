"""memory="min": units recomputed in backward give the default mode's gradients, bit for bit, update the
running statistics once, and save fewer bytes (counted with saved-tensor hooks)."""
import copy

import pytest
import torch
from torch import nn

from preact_fused import PreActBottleneck, count_saved_bytes, preact_resnet


pytestmark = pytest.mark.usefixtures("one_thread")


def _pair(fused, block="bottleneck", depth=11):
    torch.manual_seed(0)
    default = preact_resnet(depth, block=block, fused=fused, backend="reference")
    low = copy.deepcopy(default)
    low.memory = "min"
    return default, low


def _step(model, x, target):
    loss = nn.functional.cross_entropy(model(x), target)
    loss.backward()
    return loss.detach()


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("block,depth", [("bottleneck", 11), ("basic", 8)])
def test_min_memory_gives_identical_training(fused, block, depth):
    default, low = _pair(fused, block, depth)
    assert low.memory == "min" and all(b.memory == "min" for b in low.blocks)
    gen = torch.Generator().manual_seed(1)
    for _ in range(2):  # the second step sees running statistics and momentum-free SGD updates
        x = torch.randn(3, 3, 16, 16, generator=gen).requires_grad_()
        target = torch.randint(0, 10, (3,), generator=gen)
        xa, xb = x.detach().clone().requires_grad_(), x.detach().clone().requires_grad_()
        assert torch.equal(_step(default, xa, target), _step(low, xb, target))
        assert torch.equal(xa.grad, xb.grad)
        for (name, pa), pb in zip(default.named_parameters(), low.parameters()):
            assert torch.equal(pa.grad, pb.grad), name
        for (name, ba), bb in zip(default.named_buffers(), low.buffers()):
            assert torch.equal(ba, bb), name  # updated once, not again by the recomputation
        with torch.no_grad():
            for model in (default, low):
                for p in model.parameters():
                    p -= 0.1 * p.grad
                    p.grad = None
    default.eval()
    low.eval()
    x = torch.randn(2, 3, 16, 16, generator=gen)
    assert torch.equal(default(x), low(x))


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
def test_min_memory_saves_only_unit_inputs(fused):
    default, low = _pair(fused)
    x = torch.randn(2, 3, 16, 16)
    saved_default, saved_low = count_saved_bytes(default, x), count_saved_bytes(low, x)
    # A bottleneck unit keeps its input (4p channels) instead of that plus two p-channel maps (fused)
    # or six maps (unfused).
    assert saved_low < 0.75 * saved_default, (saved_low, saved_default)
    if fused:
        # Exactly: the image (stem), the three unit inputs, the head's input and pooled features
        # (fp32, batch 2), and four fp32 vectors (mean, invstd, scale, shift) per BatchNorm.
        maps = 3 * 16 * 16 + 16 * 16 * 16 + 64 * 16 * 16 + 128 * 8 * 8 + 256 * 4 * 4 + 256
        vectors = sum(bn.num_features for bn in low.modules() if isinstance(bn, nn.BatchNorm2d))
        assert saved_low == 2 * 4 * maps + 4 * 4 * vectors


def test_min_memory_in_eval_and_no_grad_is_plain():
    """No graph to keep: the recomputing path is skipped and the output is the same."""
    torch.manual_seed(2)
    block = PreActBottleneck(16, 4, memory="min", backend="reference")
    plain = copy.deepcopy(block)
    plain.memory = "activations"
    x = torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        assert torch.equal(block(x), plain(x))
    assert count_saved_bytes(block, x) < count_saved_bytes(plain, x)


def test_memory_mode_is_checked():
    with pytest.raises(ValueError, match="memory"):
        preact_resnet(110, memory="none")
    with pytest.raises(ValueError, match="memory"):
        preact_resnet(8, block="basic").memory = "low"
