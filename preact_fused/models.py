"""Pre-activation ResNets (He et al. 2016): CIFAR 110/164/1001 and ImageNet 200.

``fused=False`` builds the same network from plain torch modules with identical state_dict keys,
so a checkpoint loads into either. In the fused network the stem conv emits the statistics summary
of its output and every unit hands (tensor, summary) to the next; the head BN uses them too.

``memory="min"`` recomputes every unit from its input in backward (only unit inputs are saved);
``sync_bn=True`` makes every BatchNorm an ``nn.SyncBatchNorm`` (statistics of the global batch across
the ranks of a process group; the fused path synchronises them itself, on CPU and GPU alike).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .backend import resolve
from .functions import Chain, bn_relu, run_chain
from .nn import PreActBasicBlock, PreActBottleneck, check_memory_mode

CIFAR_DEPTHS = {110: (PreActBasicBlock, 18), 164: (PreActBottleneck, 18), 1001: (PreActBottleneck, 111)}
# Any CIFAR depth of the paper's family, given the unit type: 6n+2 (basic) or 9n+2 (bottleneck).
CIFAR_BLOCKS = {"basic": (PreActBasicBlock, 6), "bottleneck": (PreActBottleneck, 9)}
IMAGENET_DEPTHS = {200: (PreActBottleneck, (3, 24, 36, 3))}


class PreActResNet(nn.Module):
    """stem conv -> stages of pre-activation units -> BN-ReLU -> global avgpool -> linear.

    Input [N, 3, H, W] (NCHW or channels_last); output logits [N, num_classes].
    """

    def __init__(self, block, blocks_per_stage, widths, strides, num_classes, stem, fused, backend,
                 memory="activations"):
        super().__init__()
        self.fused = fused
        self.backend = backend
        self.stem = stem
        in_planes = stem.out_channels
        stages = []
        for width, count, stride in zip(widths, blocks_per_stage, strides):
            for i in range(count):
                stages.append(block(in_planes, width, stride if i == 0 else 1, fused, backend, memory))
                in_planes = width * block.expansion
        self.blocks = nn.Sequential(*stages)
        self.bn = nn.BatchNorm2d(in_planes)
        self.fc = nn.Linear(in_planes, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    @property
    def memory(self) -> str:
        """The units' memory mode, "activations" or "min"; settable."""
        return self.blocks[0].memory

    @memory.setter
    def memory(self, mode: str) -> None:
        check_memory_mode(mode)
        for block in self.blocks:
            block.memory = mode

    def forward(self, x):
        if self.fused and x.numel() > 0:
            ops = resolve(self.backend, x.device)
            h, stats = self.stem.fused_forward(x, ops)
            for block in self.blocks:
                h, stats = block.forward_with_stats(h, stats)
            # The head BN-ReLU feeds a pooling, not a conv: folded like the others, saving h alone.
            a = bn_relu(h, self.bn, stats, ops)
        else:
            a = F.relu(self.bn(self.blocks(self.stem(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(a, 1), 1))


class _CifarStem(nn.Conv2d):
    """conv3x3(3 -> 16): no BN before it; the fused path emits the statistics of its output."""

    def __init__(self, out_channels):
        super().__init__(3, out_channels, 3, padding=1, bias=False)

    def fused_forward(self, x, ops):
        """(y, summary of y): the stem conv emitting the statistics of its output."""
        y, stats, _, _ = run_chain(Chain(((None, self),)), x, None, ops, want_stats=True)
        return y, stats


class _ImageNetStem(nn.Module):
    """conv7x7/2 (3 -> 64) -> maxpool 3x3/2; the first unit's BN reads the pooled map itself."""

    def __init__(self, out_channels):
        super().__init__()
        self.conv = nn.Conv2d(3, out_channels, 7, stride=2, padding=3, bias=False)
        self.out_channels = out_channels

    def forward(self, x):
        return F.max_pool2d(self.conv(x), 3, stride=2, padding=1)

    def fused_forward(self, x, ops):
        """(pooled map, None): the first unit's BN reads the pooled map itself."""
        y = run_chain(Chain(((None, self.conv),)), x, None, ops)[0]
        return F.max_pool2d(y, 3, stride=2, padding=1), None


def preact_resnet(depth: int, num_classes: int = 10, dataset: str = "cifar", fused: bool = True,
                  backend: str = "auto", *, memory: str = "activations", block: str | None = None,
                  sync_bn: bool = False, process_group=None) -> PreActResNet:
    """A pre-activation ResNet as in the paper.

    dataset="cifar": depth 110 (basic units), 164 or 1001 (bottleneck units); widths 16/32/64
    (x4 for bottlenecks), stride 2 entering stages 2 and 3, 32x32 inputs. With ``block`` named
    ("basic" or "bottleneck") any depth of the family: 6n+2 basic (20, 32, 56, ...) or 9n+2
    bottleneck (11, 29, ...), n units per stage.
    dataset="imagenet": depth 200 (bottleneck units 3/24/36/3, widths 64..512 x4).
    memory: "activations" (one saved tensor per triple) or "min" (units recomputed in backward).
    sync_bn: use ``nn.SyncBatchNorm`` (over ``process_group``, default the whole world) everywhere.
    """
    check_memory_mode(memory)
    if dataset == "cifar":
        if block is not None:
            if block not in CIFAR_BLOCKS:
                raise ValueError(f"block must be one of {sorted(CIFAR_BLOCKS)}, got {block!r}")
            unit, per = CIFAR_BLOCKS[block]
            if depth < per + 2 or (depth - 2) % per:
                raise ValueError(f"CIFAR pre-act ResNet depth with {block} units must be {per}n+2 "
                                 f"(n >= 1), got {depth}")
            count = (depth - 2) // per
        elif depth in CIFAR_DEPTHS:
            unit, count = CIFAR_DEPTHS[depth]
        else:
            raise ValueError(f"CIFAR pre-act ResNet depth must be one of {sorted(CIFAR_DEPTHS)}, got {depth} "
                             "(name block='basic' or 'bottleneck' for other depths of the family)")
        model = PreActResNet(unit, (count,) * 3, (16, 32, 64), (1, 2, 2), num_classes,
                             _CifarStem(16), fused, backend, memory)
    elif dataset == "imagenet":
        if depth not in IMAGENET_DEPTHS:
            raise ValueError(f"ImageNet pre-act ResNet depth must be one of {sorted(IMAGENET_DEPTHS)}, got {depth}")
        if block not in (None, "bottleneck"):
            raise ValueError(f"ImageNet pre-act ResNet-{depth} uses bottleneck units, got block={block!r}")
        unit, counts = IMAGENET_DEPTHS[depth]
        model = PreActResNet(unit, counts, (64, 128, 256, 512), (1, 2, 2, 2), num_classes,
                             _ImageNetStem(64), fused, backend, memory)
    else:
        raise ValueError(f"dataset must be 'cifar' or 'imagenet', got {dataset!r}")
    if sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model, process_group)
    return model
