"""Pre-activation ResNets (He et al. 2016): CIFAR 110/164/1001 and ImageNet 200.

``fused=False`` builds the same network from plain torch modules with identical state_dict keys,
so a checkpoint loads into either. In the fused network the stem conv emits the statistics of its
output and every unit hands (tensor, statistics partials) to the next; the head BN uses them too.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .autograd import bn_relu_conv2d, resolve_ops
from .nn import PreActBasicBlock, PreActBottleneck

CIFAR_DEPTHS = {110: (PreActBasicBlock, 18), 164: (PreActBottleneck, 18), 1001: (PreActBottleneck, 111)}
IMAGENET_DEPTHS = {200: (PreActBottleneck, (3, 24, 36, 3))}


class PreActResNet(nn.Module):
    """stem conv -> stages of pre-activation units -> BN-ReLU -> global avgpool -> linear.

    Input [N, 3, H, W] (NCHW or channels_last); output logits [N, num_classes].
    """

    def __init__(self, block, blocks_per_stage, widths, strides, num_classes, stem, fused, backend):
        super().__init__()
        self.fused = fused
        self.backend = backend
        self.stem = stem
        in_planes = stem.out_channels
        stages = []
        for width, count, stride in zip(widths, blocks_per_stage, strides):
            for i in range(count):
                stages.append(block(in_planes, width, stride if i == 0 else 1, fused, backend))
                in_planes = width * block.expansion
        self.blocks = nn.Sequential(*stages)
        self.bn = nn.BatchNorm2d(in_planes)
        self.fc = nn.Linear(in_planes, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        if self.fused:
            ops = resolve_ops(self.backend, x)
            h, partials = self.stem.fused(x, ops)
            h = self.blocks((h, partials))[0]
        else:
            h = self.blocks(self.stem(x))
        # The head BN-ReLU is eager in both variants: it feeds a pooling, not a conv (one small map).
        a = F.relu(self.bn(h))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(a, 1), 1))


class _CifarStem(nn.Conv2d):
    """conv3x3(3 -> 16): no BN before it; the fused path emits the statistics of its output."""

    def __init__(self, out_channels):
        super().__init__(3, out_channels, 3, padding=1, bias=False)

    def fused(self, x, ops):
        return bn_relu_conv2d(x, self, None, ops, want_stats=True)


class _ImageNetStem(nn.Module):
    """conv7x7/2 (3 -> 64) -> maxpool 3x3/2; the first unit's BN reads the pooled map itself."""

    def __init__(self, out_channels):
        super().__init__()
        self.conv = nn.Conv2d(3, out_channels, 7, stride=2, padding=3, bias=False)
        self.out_channels = out_channels

    def forward(self, x):
        return F.max_pool2d(self.conv(x), 3, stride=2, padding=1)

    def fused(self, x, ops):
        y, _ = bn_relu_conv2d(x, self.conv, None, ops)
        return F.max_pool2d(y, 3, stride=2, padding=1), None


def preact_resnet(depth: int, num_classes: int = 10, dataset: str = "cifar", fused: bool = True,
                  backend: str = "auto") -> PreActResNet:
    """A pre-activation ResNet as in the paper.

    dataset="cifar": depth 110 (basic units), 164 or 1001 (bottleneck units); widths 16/32/64
    (x4 for bottlenecks), stride 2 entering stages 2 and 3, 32x32 inputs.
    dataset="imagenet": depth 200 (bottleneck units 3/24/36/3, widths 64..512 x4).
    """
    if dataset == "cifar":
        if depth not in CIFAR_DEPTHS:
            raise ValueError(f"CIFAR pre-act ResNet depth must be one of {sorted(CIFAR_DEPTHS)}, got {depth}")
        block, count = CIFAR_DEPTHS[depth]
        return PreActResNet(block, (count,) * 3, (16, 32, 64), (1, 2, 2), num_classes,
                            _CifarStem(16), fused, backend)
    if dataset == "imagenet":
        if depth not in IMAGENET_DEPTHS:
            raise ValueError(f"ImageNet pre-act ResNet depth must be one of {sorted(IMAGENET_DEPTHS)}, got {depth}")
        block, counts = IMAGENET_DEPTHS[depth]
        return PreActResNet(block, counts, (64, 128, 256, 512), (1, 2, 2, 2), num_classes,
                            _ImageNetStem(64), fused, backend)
    raise ValueError(f"dataset must be 'cifar' or 'imagenet', got {dataset!r}")
