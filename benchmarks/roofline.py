"""Roofline of one training step of a CIFAR pre-activation ResNet: FLOPs, minimum bytes, the machine.

What one SGD step (forward, backward, optimizer update) of batch N must compute and move, counted
from the model's modules, and the two machine rates it is held against (measured at start).

FLOPs (multiply and add count 2; elementwise work is not counted)
-----------------------------------------------------------------
* conv forward: ``2 * N * Ho * Wo * Cout * Cin * K * K`` (zero-padding taps included);
* conv backward: the same again for wgrad, and again for dgrad unless the conv reads the images
  (the stem: no gradient is needed for the input);
* linear: ``2 * N * in * out`` forward, twice that backward (dgrad + wgrad).

Minimum bytes (the fused design with every kernel of a pass merged: each tensor crosses memory once)
----------------------------------------------------------------------------------------------------
``e`` = bytes of an activation element (4 fp32, 2 bf16); parameters, gradients and optimizer state
are fp32 (4 bytes, AMP keeps fp32 master weights). For a conv with input x [N, Cin, H, W], output
y [N, Cout, Ho, Wo] and weight w [Cout, Cin, K, K]:

* forward: read x (BN-ReLU applied in the loader, statistics from the producer's epilogue),
  write y, read w; plus read the shortcut when the conv's epilogue adds it (the unit's last conv);
* backward: read dy and x (the mask and P(x) recomputed from x, DESIGN.md section 2), write dx,
  read w, write dw; the stem neither reads w nor writes dx (no input gradient);
* each unit's input has two consumers (its first triple and the shortcut): the second gradient
  contribution is read once more, by the kernel that writes the first (``bn_backward``'s
  d_residual), so a unit adds ``e * N * Cin * H * W`` in backward;
* head (BN-ReLU, average pool, linear, loss): forward read h, write the pooled [N, C], read it and
  W, b, write the logits [N, classes]; loss reads the logits and writes their gradient; backward
  reads d_logits, pooled and W, writes dW, db and d_pooled, then reads d_pooled and h and writes dh;
* optimizer (SGD with momentum and weight decay): read p, grad, momentum; write momentum, p:
  ``5 * 4`` bytes per parameter;
* ignored: per-channel vectors (BN statistics, partials, gamma/beta reads and gradients, running
  statistics) and the images' and labels' transfer.

Nothing here runs the model; ``conv_layers`` walks its modules (stem, blocks, bn, fc).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from . import summarize, time_calls

PARAM_BYTES = 4


@dataclass(frozen=True)
class Conv:
    """One convolution of the network, per image: input [cin, h, w] -> output [cout, ho, wo]."""
    name: str
    cin: int
    cout: int
    k: int
    stride: int
    padding: int
    h: int
    w: int
    residual: bool = False     # its epilogue adds the unit's shortcut
    input_grad: bool = True    # backward computes dx (False for the stem, which reads the images)

    @property
    def ho(self) -> int:
        return (self.h + 2 * self.padding - self.k) // self.stride + 1

    @property
    def wo(self) -> int:
        return (self.w + 2 * self.padding - self.k) // self.stride + 1

    @property
    def x_elems(self) -> int:
        return self.cin * self.h * self.w

    @property
    def y_elems(self) -> int:
        return self.cout * self.ho * self.wo

    @property
    def w_elems(self) -> int:
        return self.cout * self.cin * self.k * self.k

    @property
    def macs(self) -> int:
        """Multiply-adds of the forward, per image."""
        return self.ho * self.wo * self.w_elems


@dataclass(frozen=True)
class Network:
    """The layers a step touches: convs in order, unit inputs [C*H*W per image], head, parameters."""
    convs: tuple[Conv, ...]
    unit_inputs: tuple[int, ...]     # elements per image of each unit's input
    head_channels: int
    head_hw: int                     # H*W of the head's input
    classes: int
    params: int


def _conv(name, conv: nn.Conv2d, h, w, **flags) -> Conv:
    return Conv(name, conv.in_channels, conv.out_channels, conv.kernel_size[0], conv.stride[0],
                conv.padding[0], h, w, **flags)


def conv_layers(model: nn.Module, image_hw: tuple[int, int] = (32, 32)) -> Network:
    """The convs of a CIFAR pre-act ResNet (fused or not) and the shapes they see for one image.

    The model needs a conv ``stem``, an iterable ``blocks`` of units with ``conv1``, ``conv2``, ...
    and ``shortcut`` (a 1x1 conv or None), a head ``bn`` and ``fc``: what ``preact_resnet`` builds.
    """
    if not isinstance(model.stem, nn.Conv2d):
        raise ValueError("the roofline counts CIFAR pre-act ResNets (a single conv stem)")
    h, w = image_hw
    stem = _conv("stem", model.stem, h, w, input_grad=False)
    convs, units = [stem], []
    h, w, c = stem.ho, stem.wo, stem.cout
    for i, block in enumerate(model.blocks):
        units.append(c * h * w)
        names = [f"conv{j}" for j in range(1, 10) if hasattr(block, f"conv{j}")]
        if block.shortcut is not None:
            convs.append(_conv(f"blocks.{i}.shortcut", block.shortcut, h, w))
        for j, name in enumerate(names):
            conv = _conv(f"blocks.{i}.{name}", getattr(block, name), h, w, residual=j == len(names) - 1)
            convs.append(conv)
            h, w, c = conv.ho, conv.wo, conv.cout
    return Network(tuple(convs), tuple(units), model.fc.in_features, h * w, model.fc.out_features,
                   sum(p.numel() for p in model.parameters()))


def step_flops(net: Network, batch: int) -> int:
    """FLOPs of one training step (forward + backward) at ``batch`` images; see the module docstring."""
    conv = sum(2 * c.macs * (3 if c.input_grad else 2) for c in net.convs)
    linear = 2 * net.head_channels * net.classes * 3
    return batch * (conv + linear)


def step_bytes(net: Network, batch: int, act_bytes: int) -> int:
    """Minimum bytes one training step moves at ``batch`` images; see the module docstring.

    act_bytes: bytes per activation element (4 for fp32, 2 for bf16).
    """
    e, p, n = act_bytes, PARAM_BYTES, batch
    total = 0
    for c in net.convs:
        total += e * n * (c.x_elems + c.y_elems + (c.y_elems if c.residual else 0))   # forward
        total += p * c.w_elems
        total += e * n * (c.y_elems + c.x_elems + (c.x_elems if c.input_grad else 0))  # backward
        total += p * c.w_elems * (2 if c.input_grad else 1)
    total += e * n * sum(net.unit_inputs)                                   # gradient sums
    h, pooled, logits = n * net.head_channels * net.head_hw, n * net.head_channels, n * net.classes
    fc = net.head_channels * net.classes + net.classes
    total += e * (h + 2 * pooled + logits) + p * fc                         # head forward
    total += e * 2 * logits                                                 # loss
    total += e * (logits + 2 * pooled) + p * (net.head_channels * net.classes + fc)   # fc backward
    total += e * (pooled + 2 * h)                                           # head BN backward
    total += 5 * p * net.params                                             # SGD momentum update
    return total


@dataclass(frozen=True)
class Machine:
    """Measured rates: copy bandwidth (bytes/s, read + write) and matmul FLOP/s per dtype."""
    copy_bytes_per_s: float
    matmul_flops_per_s: dict

    def describe(self) -> str:
        rates = ", ".join(f"{str(k).replace('torch.', '')} {v / 1e12:.2f} TFLOP/s"
                          for k, v in self.matmul_flops_per_s.items())
        return f"copy {self.copy_bytes_per_s / 1e9:.1f} GB/s, matmul {rates}"


def _copy_seconds(device: torch.device, elems: int, reps: int) -> float:
    """Median time of copying ``elems`` float32 values from one tensor to another."""
    src = torch.empty(elems, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    dst.copy_(src)
    return summarize(time_calls(lambda _: dst.copy_(src), reps, device))["median"]


def _matmul_seconds(device: torch.device, size: int, dtype: torch.dtype, reps: int) -> float:
    """Median time of one [size, size] @ [size, size] matmul in ``dtype``."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    a @ b
    return summarize(time_calls(lambda _: a @ b, reps, device))["median"]


def measure_machine(device: torch.device, dtypes=(torch.float32, torch.bfloat16)) -> Machine:
    """Copy bandwidth (a large tensor copy) and matmul rate (square matmuls) of ``device``, medians.

    GPU: 1 GiB copy, 8192^3 matmuls; CPU: 64 MiB copy, 1024^3 matmuls. The float32 rate obeys the
    TF32 setting in force (``torch.backends.cuda.matmul.allow_tf32``).
    """
    gpu = device.type == "cuda"
    elems, size, reps = ((1 << 28) if gpu else (1 << 24)), (8192 if gpu else 1024), (20 if gpu else 5)
    copy = 2 * 4 * elems / _copy_seconds(device, elems, reps)
    return Machine(copy, {dtype: 2 * size ** 3 / _matmul_seconds(device, size, dtype, reps) for dtype in dtypes})


def achieved(flops: int, nbytes: int, seconds: float, machine: Machine, dtype: torch.dtype) -> dict:
    """A step's achieved TFLOP/s, its share of the matmul rate, and how close it is to the bytes floor.

    ``bytes_floor_frac`` = (bytes floor / copy bandwidth) / step time: 1.0 would be a step as fast as
    moving its minimum bytes at copy speed. ``roofline_frac`` uses the larger of the two bounds.
    """
    flop_bound = flops / machine.matmul_flops_per_s[dtype]
    byte_bound = nbytes / machine.copy_bytes_per_s
    return {"tflops": flops / seconds / 1e12, "matmul_frac": flop_bound / seconds,
            "bytes_floor_frac": byte_bound / seconds, "roofline_frac": max(flop_bound, byte_bound) / seconds}
