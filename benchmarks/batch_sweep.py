"""ResNet-1001 throughput and memory against batch size: where each variant stands at each batch.

    python -m benchmarks.batch_sweep [--variants eager_amp fused_amp ...] [--cap 4096] [--out DIR]

Per variant (GPU only; the variants of ``benchmarks.resnet1001``): batch 128, 256, 512, ... while a
training step fits, each timed (``--warmup`` untimed then ``--steps`` timed steps, CUDA events;
``max_memory_allocated`` over the timed steps), then the largest batch that fits (the doubling +
bisection of ``preact_fused.runs.largest_batch``, to ``--resolution`` images). The first variant
(``--reference``, default eager_amp) sets the headline batch: its largest one. Every other variant is
also timed there, so the headline figures are each variant's images/s at the largest batch eager
fits and each variant's largest batch.

Writes ``sweep.json`` and ``sweep.csv`` after every measurement (a run cut off leaves what it
measured) and ``sweep.png`` (images/s and peak memory against batch, one line per variant) at the
end, under benchmarks/results/local/<device>/ (``--commit-results``: benchmarks/results/<device>/;
``--out DIR``). The weights, data and optimizer are those of the main benchmark; losses are not
compared here (``benchmarks.resnet1001`` does that).
"""
from __future__ import annotations

import argparse
import copy
import csv
import sys
from pathlib import Path

import torch

import preact_fused
from preact_fused.runs import Progress, is_oom, largest_batch, release

from . import environment, mark_invalid, output_dir, summarize, time_calls, write_json_atomic
from .resnet1001 import VARIANTS, Runner, skip_reason

DEFAULT_VARIANTS = ("eager_amp", "fused_amp", "fused_amp_graphed", "fused_amp_min", "eager_amp_graphed")
FIELDS = ["variant", "backend", "dtype", "layout", "graphed", "batch", "images_per_s", "step_ms",
          "peak_alloc_bytes", "max_batch", "headline", "invalid", "error"]


def powers(start: int, cap: int) -> list[int]:
    """start, 2 start, 4 start, ... up to cap."""
    out, b = [], start
    while b <= cap:
        out.append(b)
        b *= 2
    return out


def time_batch(runner: Runner, batch: int, warmup: int, steps: int) -> dict:
    """Images/s and peak memory of ``runner`` at ``batch`` (fresh random data and, when graphed, a
    fresh graph captured at that batch). Raises on out-of-memory (the caller records it)."""
    device = runner.device
    step = runner.new_graphed_step(warmup=max(1, warmup - 1)) if runner.variant.graphed else runner.step
    try:
        x = torch.randn(batch, 3, 32, 32, device=device)
        y = torch.randint(0, 10, (batch,), device=device)
        for _ in range(warmup):
            step(x, y)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        stats = summarize(time_calls(lambda i: step(x, y), steps, device))
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    finally:
        x = y = step = None
        runner.opt.zero_grad(set_to_none=True)
        release(device)
    return {"images_per_s": batch / stats["median"], "step_ms": 1e3 * stats["median"], "peak_alloc_bytes": peak}


def sweep_variant(variant, args, state, device, headline_batch: int | None, emit) -> int | None:
    """Time ``variant`` at the powers of two from --start, find its largest batch, time it at the
    headline batch; ``emit(row)`` receives each row as it is measured. Returns the largest batch."""
    runner = Runner(variant, args, state, device, args.start)
    base = {"variant": variant.name, "backend": runner.backend or "eager", "dtype": variant.dtype,
            "layout": variant.layout, "graphed": variant.graphed}
    timed, last_fit, first_fail = set(), 0, None

    def measure(batch, **extra):
        row = {**base, "batch": batch, **extra}
        try:
            row.update(time_batch(runner, batch, args.warmup, args.steps))
            ok = True
        except Exception as err:
            if not is_oom(err):
                row["error"] = repr(err)
                emit(row)
                raise
            row["error"], ok = "out of memory", False
            release(device)
        timed.add(batch)
        emit(row)
        return ok

    for batch in powers(args.start, args.cap):
        if not measure(batch):
            first_fail = batch
            break
        last_fit = batch
    # The largest batch: bisection between the last power of two that fit and the first that did not.
    if first_fail is None:
        max_batch = last_fit
    else:
        probes = {}
        max_batch = largest_batch(lambda b: b <= last_fit or (b < first_fail and runner.fits(b, probes)),
                                  cap=first_fail - 1, start=max(last_fit, 1), resolution=args.resolution)
    emit({**base, "batch": max_batch, "max_batch": max_batch})
    if headline_batch and headline_batch not in timed and headline_batch <= max_batch:
        measure(headline_batch, headline=True)
    return max_batch


def headline(rows: list[dict], reference: str, headline_batch: int | None) -> dict:
    """Each variant's images/s at the headline batch (with its ratio to the reference's) and its
    largest batch."""
    out = {"reference": reference, "batch": headline_batch, "variants": {}}
    for r in rows:
        entry = out["variants"].setdefault(r["variant"], {})
        if r.get("max_batch") is not None:
            entry["max_batch"] = r["max_batch"]
        if r["batch"] == headline_batch and r.get("images_per_s") and not r.get("invalid"):
            entry["images_per_s"] = r["images_per_s"]
            entry["peak_alloc_bytes"] = r.get("peak_alloc_bytes")
    ref = out["variants"].get(reference, {}).get("images_per_s")
    for entry in out["variants"].values():
        if ref and entry.get("images_per_s"):
            entry["vs_reference"] = entry["images_per_s"] / ref
    return out


def plot(path: Path, record: dict) -> Path | None:
    """images/s and peak memory against batch, one line per variant."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return None
    rows = [r for r in record["rows"] if r.get("images_per_s") and not r.get("invalid")]
    if not rows:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for variant in dict.fromkeys(r["variant"] for r in rows):
        mine = sorted((r for r in rows if r["variant"] == variant), key=lambda r: r["batch"])
        bs = [r["batch"] for r in mine]
        axes[0].plot(bs, [r["images_per_s"] for r in mine], marker="o", label=variant)
        axes[1].plot(bs, [(r["peak_alloc_bytes"] or 0) / 2**30 for r in mine], marker="o", label=variant)
    for ax, label in zip(axes, ("images/s (median)", "peak allocated (GiB)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"ResNet-{record['config']['depth']} training on {record['environment']['device_name']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write(out: Path, record: dict) -> None:
    write_json_atomic(out / "sweep.json", record)
    with open(out / "sweep.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(record["rows"])


def parse_args(argv=None):
    names = [v.name for v in VARIANTS]
    p = argparse.ArgumentParser(prog="python -m benchmarks.batch_sweep", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="+", choices=names, default=list(DEFAULT_VARIANTS), metavar="NAME",
                   help="variants in order (the first is measured first); default: %(default)s")
    p.add_argument("--reference", default=None, choices=names,
                   help="the variant whose largest batch is the headline batch (default: the first)")
    p.add_argument("--depth", type=int, default=1001, choices=(110, 164, 1001))
    p.add_argument("--start", type=int, default=128, help="first batch (then doubled)")
    p.add_argument("--cap", type=int, default=4096, help="largest batch tried")
    p.add_argument("--resolution", type=int, default=64, help="bisection stops this close to the limit")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per batch (graphed: capture included)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per batch")
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/local/<device>")
    p.add_argument("--commit-results", action="store_true", help="write under benchmarks/results/<device>")
    args = p.parse_args(argv)
    # Attributes Runner reads from the main benchmark's arguments.
    args.graph_warmup = max(1, args.warmup - 1)
    args.data_dir, args.compile_on_cpu, args.max_batch_resolution = None, False, args.resolution
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type != "cuda" or not torch.cuda.is_available():
        print("the batch sweep needs a CUDA GPU (batch sizes are limited by GPU memory)", file=sys.stderr)
        return 2
    torch.backends.cudnn.benchmark = True
    env = environment(device)
    out = output_dir(args.out, args.commit_results, device)
    torch.manual_seed(args.seed)
    initial = preact_fused.preact_resnet(args.depth, fused=False)
    state = copy.deepcopy(initial.state_dict())
    del initial
    reference = args.reference or args.variants[0]
    order = [reference] + [v for v in args.variants if v != reference]
    variants = {v.name: v for v in VARIANTS}
    record = {"environment": env, "config": {**vars(args), "out": str(out)}, "skipped": {}, "rows": [],
              "headline": None, "note": "rows are written as they are measured"}
    headline_batch = None
    progress = Progress(len(order), unit="variant")

    def emit(row):
        mark_invalid([row])
        record["rows"].append(row)
        record["headline"] = headline(record["rows"], reference, headline_batch)
        write(out, record)
        text = (f"max batch {row['max_batch']}" if "max_batch" in row and row.get("max_batch") is not None
                else row.get("error") or f"{row['images_per_s']:.0f} images/s, "
                f"{(row['peak_alloc_bytes'] or 0) / 2**30:.1f} GiB")
        print(f"{row['variant']} @ {row['batch']}: {text}", flush=True)

    status = 0
    for name in order:
        variant = variants[name]
        reason = skip_reason(variant, device, args)
        if reason is not None:
            record["skipped"][name] = reason
            print(f"SKIP {name}: {reason}")
            progress.end(f"{name}: skipped")
            continue
        progress.begin(name)
        try:
            largest = sweep_variant(variant, args, state, device, headline_batch, emit)
        except Exception as err:   # one broken variant must not hide the rest
            print(f"FAILED {name}: {err!r}", file=sys.stderr)
            status, largest = 1, None
        if name == reference and largest:
            headline_batch = largest
        progress.end(f"{name}: largest batch {largest}")
    progress.close()
    record["headline"] = headline(record["rows"], reference, headline_batch)
    write(out, record)
    png = plot(out / "sweep.png", record)
    print(f"headline (batch {headline_batch}, the largest {reference} fits):")
    for name, entry in record["headline"]["variants"].items():
        ips, ratio = entry.get("images_per_s"), entry.get("vs_reference")
        speed = "-" if ips is None else f"{ips:8.0f} images/s" + ("" if ratio is None else f" ({ratio:.2f}x)")
        print(f"  {name:28} {speed}  largest batch {entry.get('max_batch', '-')}")
    print(f"wrote {out / 'sweep.json'}, {out / 'sweep.csv'}" + (f", {png}" if png else ""))
    return status


if __name__ == "__main__":
    sys.exit(main())
