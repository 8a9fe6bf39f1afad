"""Correctness smoke of the fused backends on the GPU, before any timing is trusted.

    python -m benchmarks.smoke --out DIR [--backends cuda triton] [--dtypes bfloat16 float32] [--batch 8]

For every ResNet-1001 triple (preact_fused/shapes.py), each backend's contract ops (bn_stats,
bn_fold, conv_fwd folding the triple's BN in its loader with residual and statistics, conv_dgrad,
bn_backward, conv_wgrad, and for conv1/conv2 conv_wgrad_bn_backward) run on random inputs and are compared with the reference backend in
float64 (the ground truth) and in the same dtype (PyTorch's own path: cuDNN). An output passes when
its error, max |out - ref64| / max |ref64|, is at most twice PyTorch's own error in that dtype, or
within a floor (fp32: 1e-4, exact fp32 with TF32 off; bf16: 2^-8, one rounding step), the rule of
DESIGN.md section 6.

Writes DIR/smoke.json after every (backend, dtype): per backend ``ok`` and a summary, and each
failed comparison. ``complete`` is true only at the end; a backend is ``ok`` only when all its
checks ran and passed. gpu_check.sh points the timing parts at this file (PREACT_FUSED_SMOKE): rows
of a backend that is not ``ok`` are marked invalid. Exit status 1 when a backend failed.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

import torch

from preact_fused import reference
from preact_fused.shapes import RESNET1001_TRIPLES, triple_roles

from . import fast_backend_reason, write_json_atomic

MODULES = {"triton": "preact_fused.triton", "cuda": "preact_fused.cuda"}
FLOOR = {torch.float32: 1e-4, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -10}
EPS = 1e-5


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.double()
    return ((out.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def triple_outputs(ops, triple, batch: int, dtype, device, seed: int = 0) -> dict[str, torch.Tensor]:
    """Every contract output of one triple computed by ``ops`` from the same seeded inputs in ``dtype``."""
    name, cin, cout, hw, k, stride = triple
    roles = triple_roles(name)
    pad = k // 2
    ho = (hw + 2 * pad - k) // stride + 1
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def rand(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=gen) * scale + shift)

    cl = torch.channels_last
    x = rand(batch, cin, hw, hw, scale=2.0, shift=0.5).to(device, dtype).contiguous(memory_format=cl)
    w = (rand(cout, cin, k, k) / k).to(device, torch.float64 if dtype == torch.float64 else torch.float32)
    dy = rand(batch, cout, ho, ho).to(device, dtype).contiguous(memory_format=cl)
    residual = rand(batch, cout, ho, ho).to(device, dtype).contiguous(memory_format=cl) if roles["with_residual"] else None
    vdtype = torch.float64 if dtype == torch.float64 else torch.float32
    gamma = (torch.rand(cin, generator=gen) + 0.5).to(device, vdtype)
    beta = rand(cin).to(device, vdtype)
    out = {}
    stats = ops.bn_stats(x)
    fold = ops.bn_fold(stats, gamma, beta, eps=EPS)
    out["bn_stats.mean"], out["bn_stats.var"] = stats[1] + stats[2], stats[3] / stats[0]
    out["bn_fold.invstd"], out["bn_fold.shift"] = fold[1], fold[3]
    bn = dict(stats=stats, gamma=gamma, beta=beta, eps=EPS) if roles["with_bn"] else {}
    y, y_stats, _ = ops.conv_fwd(x, w, stride, pad, **bn, residual=residual, want_stats=roles["want_stats"])
    out["conv_fwd.y"] = y
    if y_stats is not None:
        out["conv_fwd.stats_mean"] = y_stats[1] + y_stats[2]
    fold = fold if roles["with_bn"] else None
    g, sums = ops.conv_dgrad(dy, w, x, stride, pad, fold)
    out["conv_dgrad.g"] = g
    if roles["with_bn"]:
        out["conv_dgrad.sum_g"], out["conv_dgrad.sum_gx"] = sums[0], sums[1]
        out["bn_backward.dx"] = ops.bn_backward(g, x, fold, sums, x.numel() / cin, True)
    out["conv_wgrad.dw"] = ops.conv_wgrad(x, dy, w, stride, pad, fold)
    if roles["next_bn"]:  # dy as the backward of the next BN (input bn_x), from its masked gradient
        bn_x = rand(batch, cout, ho, ho).to(device, dtype).contiguous(memory_format=cl)
        next_fold = ops.bn_fold(ops.bn_stats(bn_x), eps=EPS)
        next_sums = rand(3, cout).to(device, vdtype)
        dw, dy_bn = ops.conv_wgrad_bn_backward(x, dy, w, stride, pad, fold, bn_x, next_fold, next_sums,
                                               bn_x.numel() / cout, True)
        out["conv_wgrad_bn_backward.dw"], out["conv_wgrad_bn_backward.dy"] = dw, dy_bn
    return out


def check(ops, triple, batch: int, dtype, device) -> list[dict]:
    """The failed comparisons of one triple ([] when all pass)."""
    got = triple_outputs(ops, triple, batch, dtype, device)
    truth = triple_outputs(reference, triple, batch, torch.float64, device)
    torch_own = triple_outputs(reference, triple, batch, dtype, device)
    failures = []
    for key, value in got.items():
        err, own = rel_err(value, truth[key]), rel_err(torch_own[key], truth[key])
        bound = max(2 * own, FLOOR[dtype])
        if not err <= bound:   # NaN fails too
            failures.append({"triple": triple[0], "output": key, "dtype": str(dtype).removeprefix("torch."),
                             "error": err, "torch_error": own, "bound": bound})
    return failures


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.smoke", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--backends", nargs="+", choices=list(MODULES), default=["cuda", "triton"])
    p.add_argument("--dtypes", nargs="+", choices=["bfloat16", "float32"], default=["bfloat16", "float32"])
    p.add_argument("--batch", type=int, default=8)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("the smoke checks the GPU kernels: it needs a CUDA GPU")
    device = torch.device("cuda")
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    record = {"complete": False, "batch": args.batch, "backends": {}}
    path = args.out / "smoke.json"
    for name in args.backends:
        reason = fast_backend_reason(name, device)
        if reason is not None:
            record["backends"][name] = {"ok": False, "summary": f"unavailable: {reason}", "failures": []}
            write_json_atomic(path, record)
            print(f"SKIP {name}: {reason}")
            continue
        ops = importlib.import_module(MODULES[name])
        if name == "triton":
            ops.set_fp32_precision("ieee")
        entry = record["backends"][name] = {"ok": False, "summary": "running", "failures": [], "checked": []}
        for dtype_name in args.dtypes:
            dtype = getattr(torch, dtype_name)
            for triple in RESNET1001_TRIPLES:
                try:
                    entry["failures"] += check(ops, triple, args.batch, dtype, device)
                except Exception as err:   # a crash is a failure of that backend
                    entry["failures"].append({"triple": triple[0], "dtype": dtype_name, "error": repr(err)[:300]})
            entry["checked"].append(dtype_name)
            write_json_atomic(path, record)
            print(f"{name} {dtype_name}: {len(entry['failures'])} failed comparisons so far", flush=True)
        entry["ok"] = not entry["failures"]
        entry["summary"] = ("all outputs within bounds" if entry["ok"] else
                            f"{len(entry['failures'])} outputs out of bounds, first: {entry['failures'][0]}")
        write_json_atomic(path, record)
        print(f"{name}: {'ok' if entry['ok'] else 'FAILED'} ({entry['summary'][:200]})", flush=True)
    record["complete"] = True
    write_json_atomic(path, record)
    return 0 if all(b["ok"] for b in record["backends"].values() if "unavailable" not in b["summary"]) else 1


if __name__ == "__main__":
    sys.exit(main())
