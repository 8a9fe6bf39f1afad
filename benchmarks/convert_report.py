"""What ``preact_fused.convert`` does to real model zoos: a markdown table for the README.

    python -m benchmarks.convert_report [--size 64] [--batch 2]

For each model (random weights, nothing downloaded; timm and torchvision where installed): the
BN-ReLU chains fused / found (found = fused + left unfused; ``fusion_report`` says why), and the
activation memory of one training step, ``count_saved_bytes`` of the converted model over that of
the original (CPU, float32, the reference backend).
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import warnings

import torch

from preact_fused import convert, count_saved_bytes


def _models():
    """(name, builder) of each model the installed zoos provide."""
    found = []
    if importlib.util.find_spec("timm") is not None:
        import timm
        for name in ("resnetv2_50", "resnetv2_50d", "densenet121", "dpn68", "dla34"):
            found.append((f"timm {name}", lambda name=name: timm.create_model(name, pretrained=False)))
    if importlib.util.find_spec("torchvision") is not None:
        import torchvision
        for name in ("resnet18", "resnet50", "wide_resnet50_2", "densenet121", "mobilenet_v2", "efficientnet_b0"):
            found.append((f"torchvision {name}", lambda name=name: getattr(torchvision.models, name)(weights=None)))
    return found


def report_row(name: str, model: torch.nn.Module, x: torch.Tensor) -> str:
    converted = convert(copy.deepcopy(model))
    report = converted.fusion_report
    found = len(report.fused) + len(report.skipped)
    ratio = count_saved_bytes(converted, x) / count_saved_bytes(model, x)
    return f"| {name} | {len(report.fused)} / {found} | {ratio:.3f} |"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=64, help="input height and width (default 64)")
    parser.add_argument("--batch", type=int, default=2, help="batch size (default 2)")
    args = parser.parse_args(argv)
    models = _models()
    if not models:
        raise SystemExit("neither timm nor torchvision is installed (pip install timm torchvision)")
    warnings.filterwarnings("ignore", message="preact_fused: no CUDA device")
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, args.size, args.size)
    print(f"`count_saved_bytes`, one training step, CPU, fp32, batch {args.batch}, {args.size}x{args.size}:\n")
    print("| model | chains fused / found | saved activations, converted / original |")
    print("| --- | --- | --- |")
    for name, build in models:
        print(report_row(name, build(), x), flush=True)


if __name__ == "__main__":
    main()
