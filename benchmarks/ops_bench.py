"""Op benchmark: one BN-ReLU-conv triple, forward + backward, for every triple shape of ResNet-1001.

    python -m benchmarks.ops_bench [--batch 128] [--out DIR]     GPU: triton.testing.do_bench
    python -m benchmarks.ops_bench                               CPU: this file under pytest-benchmark
    pytest benchmarks/ops_bench.py --benchmark-only              CPU, pytest-benchmark's own report

Providers: ``eager`` (``nn.BatchNorm2d`` -> ``nn.ReLU`` -> ``nn.Conv2d``) and ``BNReLUConv2d`` with
each backend that runs here (reference, triton, cuda; the others are skipped with the reason). A
case is one training-mode forward and the backward of an upstream gradient dy into x and all
parameters. Activations are channels_last; bf16 under autocast (fp32 parameters) on a GPU, fp32 on
CPU. Shapes are the distinct (Cin, Cout, K, stride, H, W) of the network's triples (the stem, a
plain conv, is not one), each with the number of times it occurs; the residual add of a unit's last
conv is left out. Prints a table (median and quartiles, speed-up over eager, and the sum over the
network of count x median per provider) and writes ``ops.json`` (this run) and ``ops.csv`` (rows
appended) under ``benchmarks/results/local/<device>/`` (``--commit-results``: ``benchmarks/results/<device>/``)
or ``--out``.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from collections import Counter
from pathlib import Path

import torch
from torch import nn

import preact_fused
from preact_fused.backend import BACKENDS

from . import environment, fast_backend_reason, output_dir
from .roofline import Conv, conv_layers

CPU_BATCH = 8
PROVIDERS = ("eager", *BACKENDS)


def triple_shapes(depth: int = 1001) -> list[tuple[Conv, int]]:
    """The distinct BN-ReLU-conv shapes of a CIFAR pre-act ResNet, with their counts, in network order."""
    convs = [c for c in conv_layers(preact_fused.preact_resnet(depth, fused=False)).convs if c.input_grad]
    counts = Counter(_key(c) for c in convs)
    first = {}
    for c in convs:
        first.setdefault(_key(c), c)
    return [(c, counts[key]) for key, c in first.items()]


def _key(c: Conv) -> tuple:
    return c.cin, c.cout, c.k, c.stride, c.h, c.w


def shape_id(c: Conv) -> str:
    return f"{c.cin}to{c.cout}_k{c.k}_s{c.stride}_{c.h}x{c.w}"


def skip_reason(provider: str, device: torch.device) -> str | None:
    """Why ``provider`` is not timed on ``device``, or None."""
    return None if provider in ("eager", "reference") else fast_backend_reason(provider, device)


def make_case(shape: Conv, provider: str, batch: int, device: torch.device):
    """A closure running forward + backward of one triple: x [batch, Cin, H, W] -> y [batch, Cout, Ho, Wo]."""
    amp = device.type == "cuda"
    dtype = torch.bfloat16 if amp else torch.float32
    conv = dict(kernel_size=shape.k, stride=shape.stride, padding=shape.padding, bias=False)
    if provider == "eager":
        module = nn.Sequential(nn.BatchNorm2d(shape.cin), nn.ReLU(), nn.Conv2d(shape.cin, shape.cout, **conv))
    else:
        module = preact_fused.BNReLUConv2d(shape.cin, shape.cout, backend=provider, **conv)
    module = module.to(device).to(memory_format=torch.channels_last).train()
    fmt = torch.channels_last
    x = torch.randn(batch, shape.cin, shape.h, shape.w, device=device, dtype=dtype)
    x = x.contiguous(memory_format=fmt).requires_grad_()
    dy = torch.randn(batch, shape.cout, shape.ho, shape.wo, device=device, dtype=dtype).contiguous(memory_format=fmt)
    inputs = [x, *module.parameters()]

    def run():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            y = module(x)
        torch.autograd.grad(y, inputs, dy)

    return run


def pytest_generate_tests(metafunc):
    """pytest-benchmark on CPU: one case per (shape, provider), grouped by shape."""
    cases = [(shape, provider) for shape, _ in triple_shapes() for provider in PROVIDERS]
    metafunc.parametrize(("shape", "provider"), cases,
                         ids=[f"{shape_id(shape)}-{provider}" for shape, provider in cases])


def test_triple(benchmark, shape, provider):
    device = torch.device("cpu")
    reason = skip_reason(provider, device)
    if reason is not None:
        import pytest
        pytest.skip(reason)
    benchmark.group = shape_id(shape)
    benchmark(make_case(shape, provider, CPU_BATCH, device))


def bench_gpu(args, device: torch.device) -> list[dict]:
    """do_bench (median and quartiles, ms) of every (shape, provider) that runs on the GPU."""
    from triton.testing import do_bench

    rows = []
    for shape, count in triple_shapes(args.depth):
        for provider in args.providers:
            if skip_reason(provider, device) is not None:
                continue
            row = {"shape": shape_id(shape), "count": count, "provider": provider, "batch": args.batch,
                   "dtype": "bf16", "layout": "channels_last"}
            try:
                ms = do_bench(make_case(shape, provider, args.batch, device), warmup=args.warmup_ms,
                              rep=args.rep_ms, quantiles=[0.5, 0.25, 0.75])
                row.update(median_ms=ms[0], q25_ms=ms[1], q75_ms=ms[2])
                print(f"{row['shape']} {provider}: {ms[0]:.3f} ms", flush=True)   # partial results in logs
            except Exception as err:   # one failing provider must not hide the others
                row["error"] = repr(err)
                print(f"FAILED {provider} {shape_id(shape)}: {err!r}", file=sys.stderr)
            rows.append(row)
            torch.cuda.empty_cache()
    return rows


def bench_cpu(args) -> list[dict]:
    """This file under pytest-benchmark (median and quartiles, ms), for the shapes of ResNet-1001."""
    import tempfile

    import pytest

    torch.set_num_threads(args.threads)
    counts = {shape_id(shape): count for shape, count in triple_shapes()}
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "pytest-benchmark.json"
        select = " or ".join(args.providers)   # provider names appear in no shape id
        status = pytest.main([__file__, "--benchmark-only", "-q", "-p", "no:cacheprovider", "-k", select,
                              "--benchmark-columns=median,iqr,rounds", "--benchmark-sort=name",
                              f"--benchmark-json={report}"])
        if status not in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
            raise RuntimeError(f"pytest-benchmark run failed (exit {status})")
        records = json.loads(report.read_text())["benchmarks"] if report.exists() else []
    rows = []
    for record in records:
        shape, provider = record["param"].rsplit("-", 1)
        stats = record["stats"]
        rows.append({"shape": shape, "count": counts[shape], "provider": provider, "batch": CPU_BATCH,
                     "dtype": "fp32", "layout": "channels_last", "median_ms": 1e3 * stats["median"],
                     "q25_ms": 1e3 * stats["q1"], "q75_ms": 1e3 * stats["q3"]})
    order = {shape: i for i, shape in enumerate(counts)}
    return sorted(rows, key=lambda r: (order[r["shape"]], PROVIDERS.index(r["provider"])))


def add_speedups(rows: list[dict]) -> None:
    """``speedup_vs_eager``: eager's median over the row's, same shape."""
    eager = {r["shape"]: r["median_ms"] for r in rows if r["provider"] == "eager" and "median_ms" in r}
    for r in rows:
        if "median_ms" in r and r["shape"] in eager:
            r["speedup_vs_eager"] = eager[r["shape"]] / r["median_ms"]


def format_table(rows: list[dict]) -> str:
    head = ("shape", "count", "provider", "median ms", "q25-q75 ms", "vs eager")
    lines = [head]
    for r in rows:
        if "error" in r:
            lines.append((r["shape"], str(r["count"]), r["provider"], "FAILED", r["error"][:60], ""))
            continue
        speed = f"{r['speedup_vs_eager']:.2f}x" if "speedup_vs_eager" in r else "-"
        lines.append((r["shape"], str(r["count"]), r["provider"], f"{r['median_ms']:.3f}",
                      f"{r['q25_ms']:.3f}-{r['q75_ms']:.3f}", speed))
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines)


def totals(rows: list[dict]) -> dict:
    """Per provider: the sum over shapes of count x median, the triples' time in one training step."""
    out = {}
    for provider in dict.fromkeys(r["provider"] for r in rows):
        mine = [r for r in rows if r["provider"] == provider]
        if all("median_ms" in r for r in mine):
            out[provider] = sum(r["count"] * r["median_ms"] for r in mine)
    return out


def write_records(out: Path, env: dict, config: dict, rows: list[dict], total: dict) -> None:
    """``ops.json`` (this run) and ``ops.csv`` (rows appended) under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "ops.json").write_text(json.dumps({"environment": env, "config": config, "rows": rows,
                                              "totals_ms": total}, indent=1))
    fields = ["date", "device_name", "torch", "triton", "shape", "count", "provider", "batch", "dtype",
              "layout", "median_ms", "q25_ms", "q75_ms", "speedup_vs_eager", "error"]
    new = not (out / "ops.csv").exists()
    with open(out / "ops.csv", "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        if new:
            writer.writeheader()
        for row in rows:
            writer.writerow({**{k: env[k] for k in ("date", "device_name", "torch", "triton")}, **row})
    print(f"wrote {out / 'ops.json'}, {out / 'ops.csv'}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.ops_bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=128, help=f"batch on a GPU (CPU: {CPU_BATCH}; default 128)")
    p.add_argument("--depth", type=int, default=1001, choices=(110, 164, 1001),
                   help="network whose shapes to run on a GPU (CPU: 1001; default 1001)")
    p.add_argument("--providers", nargs="+", choices=PROVIDERS, default=list(PROVIDERS),
                   help="what to time (default: all that run here)")
    p.add_argument("--warmup-ms", type=int, default=25, help="do_bench warm-up per case (default 25)")
    p.add_argument("--rep-ms", type=int, default=100, help="do_bench measuring time per case (default 100)")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads on CPU (default 1: other work on the machine stalls more than one)")
    p.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results/local/<device>)")
    p.add_argument("--commit-results", action="store_true", help="write under benchmarks/results/<device>")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for provider in args.providers:
        reason = skip_reason(provider, device)
        if reason is not None:
            print(f"SKIP {provider}: {reason}")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        rows = bench_gpu(args, device)
        setting = f"batch {args.batch}, bf16 autocast"
    else:
        rows = bench_cpu(args)
        setting = f"batch {CPU_BATCH}, fp32, {args.threads} thread(s)"
        print("note: CPU timings on a shared machine are noisy")
    add_speedups(rows)
    env = environment(device)
    print(f"{env['device_name']}, torch {env['torch']}, triton {env['triton']}, {setting}, channels_last; "
          "forward + backward of one BN-ReLU-conv triple")
    print(format_table(rows))
    total = totals(rows)
    print(f"all triples of one ResNet-{args.depth} step (sum of count x median): "
          + ", ".join(f"{k} {v:.1f} ms" for k, v in total.items()))
    out = output_dir(args.out, args.commit_results, device)
    write_records(out, env, {**vars(args), "out": str(out)}, rows, total)
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
