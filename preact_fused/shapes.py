"""The distinct BN-ReLU-conv triples of the CIFAR pre-activation ResNet-1001, in network order.

One list for the GPU test suites, the compile checks and the benchmarks. ResNet-1001: bottleneck
units, widths 16/32/64 (x4 expansion), 111 units per stage, 32x32 inputs, stride 2 in the 3x3 conv of
the first unit of stages 2 and 3 (and in its projection shortcut).
"""
from __future__ import annotations

# (name, Cin, Cout, input H = W, kernel, stride)
RESNET1001_TRIPLES = [
    ("stem", 3, 16, 32, 3, 1),
    ("s1.conv1.first", 16, 16, 32, 1, 1),
    ("s1.conv1", 64, 16, 32, 1, 1),
    ("s1.conv2", 16, 16, 32, 3, 1),
    ("s1.conv3", 16, 64, 32, 1, 1),
    ("s1.shortcut", 16, 64, 32, 1, 1),
    ("s2.conv1.first", 64, 32, 32, 1, 1),
    ("s2.conv2.first", 32, 32, 32, 3, 2),
    ("s2.shortcut", 64, 128, 32, 1, 2),
    ("s2.conv3", 32, 128, 16, 1, 1),
    ("s2.conv1", 128, 32, 16, 1, 1),
    ("s2.conv2", 32, 32, 16, 3, 1),
    ("s3.conv1.first", 128, 64, 16, 1, 1),
    ("s3.conv2.first", 64, 64, 16, 3, 2),
    ("s3.shortcut", 128, 256, 16, 1, 2),
    ("s3.conv3", 64, 256, 8, 1, 1),
    ("s3.conv1", 256, 64, 8, 1, 1),
    ("s3.conv2", 64, 64, 8, 3, 1),
]

# How often each triple occurs in one ResNet-1001 (111 units per stage; the stem is a plain conv).
RESNET1001_COUNTS = {
    "stem": 1, "s1.conv1.first": 1, "s1.conv1": 110, "s1.conv2": 111, "s1.conv3": 111, "s1.shortcut": 1,
    "s2.conv1.first": 1, "s2.conv2.first": 1, "s2.shortcut": 1, "s2.conv3": 111, "s2.conv1": 110,
    "s2.conv2": 110, "s3.conv1.first": 1, "s3.conv2.first": 1, "s3.shortcut": 1, "s3.conv3": 111,
    "s3.conv1": 110, "s3.conv2": 110,
}


def triple_roles(name: str) -> dict:
    """What the network does around a triple: a BN-ReLU before the conv (all but the stem), a
    residual added in the epilogue (a unit's last conv), the next BN's statistics emitted (all but
    the projection shortcuts, whose output is summed into the residual stream first), the backward
    of the next BN computed by the conv's wgrad (conv1 and conv2: the next triple of the unit reads
    their output; conv_wgrad_bn_backward), and the unit's first BN (conv1's: its backward is a
    standalone bn_backward, which the shortcut's gradient enters)."""
    first = ".conv1" in name
    return {"with_bn": name != "stem", "with_residual": name.endswith("conv3"),
            "want_stats": not name.endswith("shortcut"), "next_bn": first or ".conv2" in name, "first_bn": first}
