"""Checks of the fused ops' inputs and arguments, raising what PyTorch's unfused modules raise.

PyTorch's behaviour is the specification; where the fused ops cannot follow it (a convolution they
do not implement) they refuse with a ValueError naming what is unsupported.

Degenerate inputs, as ``nn.Sequential(nn.BatchNorm2d, nn.ReLU, nn.Conv2d)`` treats them (torch 2.14):

* One value per channel (N*H*W == 1) with batch statistics (training, or ``track_running_stats=False``):
  ValueError "Expected more than 1 value per channel when training, got input size torch.Size([...])"
  (``check_batch_stats``), before any running statistic changes.
* An empty batch (N == 0) in training: the output is empty, [0, Cout, Ho, Wo]; ``running_mean`` and
  ``running_var`` are left untouched (with any momentum, None included), but ``num_batches_tracked``
  is still incremented by one; the gradients of the parameters are zeros. In eval mode the output is
  empty and nothing changes.
* A convolution with an empty output (the zero-padded input smaller than the kernel): RuntimeError
  "Calculated padded input size per channel: (Hp x Wp). Kernel size: (KH x KW). Kernel size can't be
  greater than actual input size" (``conv_output_size``).
"""
from __future__ import annotations

import torch
from torch import nn


def conv_geometry(conv: nn.Conv2d) -> tuple[int, int]:
    """(stride, padding) of a Conv2d the fused op supports; ValueError naming what it does not."""
    problems = []
    if conv.groups != 1:
        problems.append(f"groups={conv.groups}")
    if tuple(conv.dilation) != (1, 1):
        problems.append(f"dilation={tuple(conv.dilation)}")
    if conv.padding_mode != "zeros":
        problems.append(f"padding_mode={conv.padding_mode!r}")
    stride = tuple(conv.stride)
    if stride[0] != stride[1]:
        problems.append(f"stride={stride} (unequal)")
    padding = conv.padding
    if padding == "valid":
        padding = (0, 0)
    elif padding == "same":
        kh, kw = conv.kernel_size
        if stride != (1, 1) or kh % 2 == 0 or kw % 2 == 0:
            problems.append("padding='same' with even kernel or stride")
            padding = (0, 0)
        else:
            padding = (kh // 2, kw // 2)
    if padding[0] != padding[1]:
        problems.append(f"padding={tuple(padding)} (unequal)")
    if problems:
        raise ValueError("preact_fused supports plain convolutions only; unsupported: " + ", ".join(problems))
    return stride[0], padding[0]


def conv_output_size(h: int, w: int, kernel: tuple[int, int], stride: int, padding: int) -> tuple[int, int]:
    """(Ho, Wo) of a convolution of an [.., h, w] input; RuntimeError as F.conv2d's for an empty output."""
    kh, kw = kernel
    hp, wp = h + 2 * padding, w + 2 * padding
    if hp < kh or wp < kw:
        raise RuntimeError(f"Calculated padded input size per channel: ({hp} x {wp}). Kernel size: ({kh} x {kw}). "
                           "Kernel size can't be greater than actual input size")
    return (hp - kh) // stride + 1, (wp - kw) // stride + 1


def check_batch_stats(x: torch.Tensor) -> None:
    """ValueError, as nn.BatchNorm2d's, when x [N, C, H, W] has one value per channel (N*H*W == 1).

    For a BatchNorm using batch statistics: its variance would be that of a single value.
    """
    n, _, h, w = x.shape
    if n * h * w == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {x.size()}")


def check_input(x: torch.Tensor, conv: nn.Conv2d, batch_stats: bool = False) -> None:
    """Clear errors for inputs the fused op would otherwise get wrong, before anything is computed.

    batch_stats: the BatchNorm before ``conv`` uses batch statistics (training, or no running
    statistics), so one value per channel is refused, as PyTorch does (and before the convolution's
    check, in PyTorch's order).
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"expected a tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"expected a 4-D input [N, C, H, W], got {x.dim()}-D of shape {tuple(x.shape)}")
    if x.shape[1] != conv.in_channels:
        raise ValueError(f"expected {conv.in_channels} input channels, got {x.shape[1]} (shape {tuple(x.shape)})")
    if not x.is_floating_point():
        raise TypeError(f"expected a floating-point input, got {x.dtype}")
    weight = conv.weight
    if x.device != weight.device:
        raise RuntimeError(f"input is on {x.device} but the parameters are on {weight.device}")
    if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
        raise TypeError(f"input dtype {x.dtype} does not match parameter dtype {weight.dtype}")
    if batch_stats:
        check_batch_stats(x)
    stride, padding = conv_geometry(conv)
    conv_output_size(x.shape[2], x.shape[3], conv.kernel_size, stride, padding)
