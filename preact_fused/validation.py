"""Argument and input checks of the fused ops: clear errors where a kernel would give a wrong answer."""
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


def check_input(x: torch.Tensor, conv: nn.Conv2d) -> None:
    """Clear errors for inputs the fused op would otherwise get wrong."""
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




def check_batch_stats(x: torch.Tensor) -> None:
    """PyTorch's error for batch statistics of a single value per channel (N*H*W == 1)."""
    if x.numel() == x.shape[1]:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {x.size()}")


def check_output_size(x: torch.Tensor, conv: nn.Conv2d, stride: int, padding: int) -> None:
    """PyTorch's error for a convolution whose output would be empty (kernel larger than the padded input)."""
    kh, kw = conv.kernel_size
    h, w = x.shape[2] + 2 * padding, x.shape[3] + 2 * padding
    if h < kh or w < kw:
        raise RuntimeError(f"Calculated padded input size per channel: ({h} x {w}). Kernel size: ({kh} x {kw}). "
                           "Kernel size can't be greater than actual input size")
