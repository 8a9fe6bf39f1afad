"""ResNet-1001 training benchmark: what fusion buys in speed and memory, side by side in one run.

    python -m benchmarks.resnet1001 [--batch 64 128] [--depth 1001] [--data-dir DIR] [--help]

Trains the full pre-activation ResNet-1001 (CIFAR shapes, 10 classes; SGD with momentum 0.9 and
weight decay 1e-4, learning rate 0.1 per 128 images scaled linearly with the batch, cross-entropy)
for a few steps in every variant below, all from the same initial weights and on the same batches
(synthetic CIFAR-shaped ones, or CIFAR-10 read from ``--data-dir``):

    eager            fp32  NCHW            plain torch modules
    eager_cl         fp32  channels_last
    checkpoint       fp32  channels_last   per-unit activation checkpointing (recomputes forward)
    fused_<backend>  fp32  channels_last   preact_fused, one row per backend: reference, triton, cuda
    eager_amp        bf16  channels_last   autocast
    compile_amp      bf16  channels_last   torch.compile of the eager model, autocast
    fused_amp        bf16  channels_last   preact_fused with the best available backend, autocast
    fused_amp_min    bf16  channels_last   fused_amp with memory="min": each unit recomputed in
                                           backward from its input, the only activation it saves

Per variant and batch: images/s (median over the timed steps after warm-up, with 20/80% quantiles;
CUDA events on a GPU, ``time.perf_counter`` on CPU), peak memory (``max_memory_allocated`` over the
timed steps on a GPU) and activation bytes saved for backward (every device), the largest batch that
fits (GPU: doubling then bisection, with out-of-memory recovery), the loss after all steps against
eager fp32 (a difference beyond tolerance prints DRIFT: a fused run that drifts is a bug) and the
roofline of ``benchmarks.roofline`` against the device's copy bandwidth and matmul rate measured at
start. Backends that cannot run here are skipped, with the reason.

Writes a table to stdout and, under ``benchmarks/results/<device>/`` (or ``--out``):
``resnet<depth>.json`` (this run), ``resnet<depth>.csv`` (rows appended, run after run) and the plots
``resnet<depth>_variants.png`` (images/s and memory per variant) and
``resnet<depth>_memory_vs_batch.png``. Exit status 1 when a variant failed or drifted.
"""
from __future__ import annotations

import argparse
import copy
import csv
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import preact_fused
from preact_fused.graphs import GraphedStep, graph_unsupported_reason
from preact_fused.runs import Progress, is_oom, largest_batch, release  # noqa: F401 (re-exported)

from . import (cuda_kernel_count, environment, fast_backend_reason, mark_invalid, output_dir, summarize,
               time_calls, write_json_atomic)
from .roofline import achieved, conv_layers, measure_machine, step_bytes, step_flops

FAST_BACKENDS = ("cuda", "triton")


@dataclass(frozen=True)
class Variant:
    """One way of running the training step."""
    name: str
    amp: bool = False             # bf16 autocast (else fp32)
    channels_last: bool = True
    fused: bool = False
    backend: str | None = None    # the fused backend; "best" = cuda > triton > reference
    compile: bool = False
    checkpoint: bool = False
    memory: str = "activations"   # the fused models' memory mode ("min": recompute units in backward)
    graphed: bool = False         # the whole step (forward, backward, SGD) as one CUDA graph
    compile_mode: str | None = None   # torch.compile(mode=...) (None: the default mode)

    @property
    def dtype(self) -> str:
        return "bf16" if self.amp else "fp32"

    @property
    def layout(self) -> str:
        return "channels_last" if self.channels_last else "NCHW"


_BASE = (
    Variant("eager", channels_last=False),
    Variant("eager_cl"),
    Variant("checkpoint", checkpoint=True),
    Variant("fused_reference", fused=True, backend="reference"),
    Variant("fused_triton", fused=True, backend="triton"),
    Variant("fused_cuda", fused=True, backend="cuda"),
    Variant("eager_amp", amp=True),
    Variant("compile_amp", amp=True, compile=True),
    Variant("compile_amp_max_autotune", amp=True, compile=True, compile_mode="max-autotune-no-cudagraphs"),
    Variant("compile_amp_reduce_overhead", amp=True, compile=True, compile_mode="reduce-overhead"),
    Variant("fused_amp", amp=True, fused=True, backend="best"),
    Variant("fused_amp_min", amp=True, fused=True, backend="best", memory="min"),
)
# Whole-step CUDA graphs of every path that allows them (not checkpointing, whose recomputation runs
# inside autograd's backward, and not torch.compile, whose reduce-overhead mode is its own graphs).
GRAPHED = ("eager", "eager_amp", "fused_reference", "fused_triton", "fused_cuda", "fused_amp", "fused_amp_min")


def _graphed(v: Variant) -> Variant:
    return Variant(f"{v.name}_graphed", amp=v.amp, channels_last=v.channels_last, fused=v.fused,
                   backend=v.backend, memory=v.memory, graphed=True)


VARIANTS = tuple(x for v in _BASE for x in ((v, _graphed(v)) if v.name in GRAPHED else (v,)))
REFERENCE = "eager"                                 # losses are compared to this variant's
PEERS = {"fp32": "eager_cl", "bf16": "eager_amp"}   # PyTorch's own path in each dtype
# Relative loss tolerance of a row at step s: max(2 x its peer's distance from eager fp32 at step s,
# LOSS_RTOL[dtype]). The peer's distance is how far an equally valid computation in that dtype strays
# in this very run. Only the first FLAGGED_STEPS steps are checked: step 0's loss is the forward of
# identical weights, which checks the forward kernels (the backward's are checked op by op against
# the reference by benchmarks.smoke). Later steps are reported, not flagged: ResNet-1001 at a small
# batch amplifies rounding chaotically from the first update on (measured on CPU at batch 2 in fp32:
# NCHW and channels_last eager runs, both exact, are 6e-4 apart at step 0 and 4e-3 after one step).
# The floor only matters when the peer lands unusually close to eager by chance: 2e-3 is half of
# bf16's relative rounding step (2^-8); 2e-4 is its fp32 counterpart. A graphed row is also compared
# with its un-graphed twin (same kernels, replayed) at every step: ``graph_rdiff``, same tolerance.
FLAGGED_STEPS = 1
LOSS_RTOL = {"fp32": 2e-4, "bf16": 2e-3}


class CheckpointedUnits(nn.Sequential):
    """The residual units, each under activation checkpointing: only unit inputs stay saved."""

    def forward(self, x):
        for unit in self:
            x = checkpoint(unit, x, use_reentrant=False)
        return x


def skip_reason(variant: Variant, device: torch.device, args) -> str | None:
    """Why ``variant`` does not run here, or None."""
    if variant.fused and variant.backend in FAST_BACKENDS:
        reason = fast_backend_reason(variant.backend, device)
        return None if reason is None else f"backend {variant.backend} unavailable: {reason}"
    if variant.graphed:
        reason = graph_unsupported_reason(device)
        if reason is not None:
            return reason
    if variant.compile and device.type == "cpu" and not args.compile_on_cpu:
        return (f"torch.compile of ResNet-{args.depth} takes many minutes to build on CPU "
                "(--compile-on-cpu runs it)")
    if variant.compile_mode == "reduce-overhead" and device.type != "cuda":
        return "torch.compile mode reduce-overhead captures CUDA graphs: it needs a CUDA device"
    return None


def best_backend(device: torch.device) -> str:
    """The fastest backend timed on ``device``: cuda > triton > reference."""
    return next((b for b in FAST_BACKENDS if fast_backend_reason(b, device) is None), "reference")


def make_batches(args, device: torch.device, batch: int, count: int):
    """``count`` batches (x [batch, 3, 32, 32] float32, y [batch] int64) on ``device``.

    Synthetic (standard normal images, uniform labels, fixed seed) unless ``--data-dir`` is given:
    then the first ``count * batch`` CIFAR-10 training images in file order, standardised (cycled
    when the set is smaller).
    """
    if args.data_dir:
        from preact_fused.data import load_cifar10, normalize
        images, labels = load_cifar10(args.data_dir, "train")
        index = torch.arange(count * batch) % images.shape[0]
        xs, ys = normalize(images[index]), labels[index]
    else:
        gen = torch.Generator().manual_seed(args.seed + batch)
        xs = torch.randn(count * batch, 3, 32, 32, generator=gen)
        ys = torch.randint(0, 10, (count * batch,), generator=gen)
    return [(x.to(device), y.to(device)) for x, y in zip(xs.split(batch), ys.split(batch))]


class Runner:
    """One variant's model, optimizer and training step, built from the shared initial weights."""

    def __init__(self, variant: Variant, args, state: dict, device: torch.device, batch: int):
        self.variant, self.device = variant, device
        self.backend = variant.backend
        if self.backend == "best":
            self.backend = best_backend(device)
        model = preact_fused.preact_resnet(args.depth, fused=variant.fused,
                                           backend=self.backend or "auto", memory=variant.memory)
        model.load_state_dict(state)
        model.to(device)
        if variant.channels_last:
            model.to(memory_format=torch.channels_last)
        if variant.checkpoint:
            model.blocks = CheckpointedUnits(*model.blocks)
        self.model = model
        self.forward = model
        if variant.compile:
            self.forward = (torch.compile(model, mode=variant.compile_mode) if variant.compile_mode
                            else torch.compile(model))
        self.opt = torch.optim.SGD(model.parameters(), lr=args.lr * batch / 128, momentum=0.9,
                                   weight_decay=1e-4)
        self.graph_warmup = args.graph_warmup
        self.graphed_step = self.new_graphed_step() if variant.graphed else None

    def prepare(self, x):
        return x.contiguous(memory_format=torch.channels_last) if self.variant.channels_last else x

    def autocast(self):
        # No cast cache under graph capture: cached casts would outlive the captured region.
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.variant.amp,
                              cache_enabled=not self.variant.graphed)

    def loss(self, x, y) -> torch.Tensor:
        if self.variant.compile_mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()   # a new step: earlier graph outputs may be reused
        with self.autocast():
            return F.cross_entropy(self.forward(self.prepare(x)), y)

    def new_graphed_step(self, warmup: int | None = None) -> GraphedStep:
        """A fresh whole-step graph (its first ``warmup`` calls are eager steps on a side stream)."""
        return GraphedStep(self.loss, self.opt, warmup=warmup or self.graph_warmup)

    def step(self, x, y) -> torch.Tensor:
        """One SGD step on (x [B, 3, 32, 32], y [B]); returns the loss (no host sync)."""
        if self.graphed_step is not None:
            return self.graphed_step(x, y)
        loss = self.loss(x, y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return loss.detach()

    def saved_bytes(self, x) -> int | None:
        """Activation bytes saved for backward by one forward on x.

        None for torch.compile: its partitioner picks what to save inside the compiled graph, and
        running it under saved-tensor hooks would only build another graph.
        """
        if self.variant.compile:
            return None
        with self.autocast():
            return preact_fused.count_saved_bytes(self.model, self.prepare(x))

    def fits(self, batch: int, probes: dict) -> bool:
        """Whether two training steps at ``batch`` fit in GPU memory; records their peak in ``probes``.

        A graphed variant captures a graph at that batch (one eager step, then capture + replay),
        so its figure includes the graph's memory pool."""
        ok = False
        step = self.new_graphed_step(warmup=1) if self.variant.graphed else self.step
        try:
            x = torch.randn(batch, 3, 32, 32, device=self.device)
            y = torch.randint(0, 10, (batch,), device=self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            for _ in range(2):
                step(x, y)
            torch.cuda.synchronize(self.device)
            probes[batch] = torch.cuda.max_memory_allocated(self.device)
            ok = True
        except RuntimeError as err:   # torch.cuda.OutOfMemoryError, or cuDNN / cuBLAS failing to allocate
            if not is_oom(err):
                raise
        x = y = step = None
        self.opt.zero_grad(set_to_none=True)
        release(self.device)
        return ok


def run_variant(variant: Variant, args, state, device, data, max_batch: bool) -> dict:
    """Train ``variant`` on ``data`` (warm-up + timed steps) and measure it; returns one row."""
    batch = data[0][0].shape[0]
    runner = Runner(variant, args, state, device, batch)
    losses = []

    def train(i, offset=0):
        losses.append(runner.step(*data[offset + i]))

    time_calls(train, args.warmup, device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    stats = summarize(time_calls(lambda i: train(i, args.warmup), args.steps, device))
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    row = {"variant": variant.name, "backend": runner.backend or ("inductor" if variant.compile else "eager"),
           "dtype": variant.dtype, "layout": variant.layout, "batch": batch, "steps": len(losses),
           "images_per_s": batch / stats["median"], "images_per_s_q20": batch / stats["q80"],
           "images_per_s_q80": batch / stats["q20"], "step_ms": 1e3 * stats["median"],
           "peak_alloc_bytes": peak, "saved_bytes": runner.saved_bytes(data[0][0]),
           "loss": losses[-1].item(), "losses": [v.item() for v in losses],
           "graphed": variant.graphed, "compile_mode": variant.compile_mode,
           "max_batch": None, "memory_probes": {}, "kernels_per_step": None}
    if args.count_kernels and device.type == "cuda":
        row["kernels_per_step"] = cuda_kernel_count(lambda: runner.step(*data[0]))["total"]
    if variant.graphed:
        row["graph_captures"] = runner.graphed_step.captures
        runner.graphed_step = None   # its memory pool must not count in the search below
        release(device)
    if max_batch:
        probes = row["memory_probes"]
        try:
            row["max_batch"] = largest_batch(lambda b: runner.fits(b, probes), args.max_batch_cap,
                                             start=batch, resolution=args.max_batch_resolution)
        except Exception as err:   # keep the measurements above
            row["max_batch_error"] = repr(err)
            print(f"\nmax batch search of {variant.name} failed: {err!r}", file=sys.stderr)
    return row


def check_losses(rows: list[dict]) -> None:
    """Compare every row's losses with eager fp32's at the same batch.

    Sets ``loss_rdiff`` (relative distance from eager fp32 after all steps, reported),
    ``loss_rtol`` (the tolerance at the flagged steps) and ``drift``: a distance beyond the tolerance
    at one of the first ``FLAGGED_STEPS`` steps, where the tolerance is the larger of
    ``LOSS_RTOL[dtype]`` and twice the distance of PyTorch's own path in that dtype (``PEERS``) at
    that step. The peers themselves are not flagged.
    """
    by_key = {(r["variant"], r["batch"]): r for r in rows if r.get("losses")}
    for row in rows:
        ref = by_key.get((REFERENCE, row["batch"]))
        if not row.get("losses") or ref is None:
            continue
        distances = _rdiffs(row, ref)
        row["loss_rdiff"], row["drift"] = distances[-1], False
        peer = by_key.get((PEERS[row["dtype"]], row["batch"]))
        peer_distances = _rdiffs(peer, ref) if peer else []
        rtols = [max(LOSS_RTOL[row["dtype"]], 2 * (peer_distances[s] if s < len(peer_distances) else 0.0))
                 for s in range(len(distances))]
        twin = by_key.get((row["variant"].removesuffix("_graphed"), row["batch"])) if row.get("graphed") else None
        if twin is not None:   # the same computation without the graph
            row["graph_rdiff"] = max(_rdiffs(row, twin))
            row["graph_mismatch"] = any(d > t for d, t in zip(_rdiffs(row, twin), rtols))
            row["drift"] = row["graph_mismatch"]
        if row["variant"] in (REFERENCE, *PEERS.values()):
            continue
        flagged = range(min(FLAGGED_STEPS, len(distances)))
        row["loss_rtol"] = max(rtols[s] for s in flagged)
        row["drift"] = row["drift"] or any(distances[s] > rtols[s] for s in flagged)


def _rdiffs(row: dict, ref: dict) -> list[float]:
    """Relative distance of ``row``'s loss from ``ref``'s at every step."""
    return [abs(a - b) / max(abs(b), 1e-6) for a, b in zip(row["losses"], ref["losses"])]


def add_roofline(rows: list[dict], net, machine) -> None:
    """Per row: FLOPs and bytes floor of the step, achieved TFLOP/s and fractions of both bounds."""
    for row in rows:
        if row.get("images_per_s") is None:
            continue
        dtype = torch.bfloat16 if row["dtype"] == "bf16" else torch.float32
        flops = step_flops(net, row["batch"])
        nbytes = step_bytes(net, row["batch"], 2 if row["dtype"] == "bf16" else 4)
        row.update(step_flops=flops, step_bytes_floor=nbytes,
                   **achieved(flops, nbytes, row["step_ms"] / 1e3, machine, dtype))


def _mb(value) -> str:
    return "-" if value is None else f"{value / 2**20:.0f}"


def format_table(rows: list[dict]) -> str:
    """The results as an aligned text table, one line per (batch, variant)."""
    head = ("variant", "backend", "dtype", "layout", "batch", "img/s", "q20-q80", "ms/step",
            "peak MiB", "saved MiB", "kernels", "max batch", "loss", "rel diff (tol)", "TFLOP/s", "%matmul", "%bytes")
    lines = [head]
    for r in rows:
        if r.get("error"):
            lines.append((r["variant"], r["backend"], r["dtype"], r["layout"], str(r["batch"]),
                          "FAILED: " + r["error"][:80]) + ("",) * (len(head) - 6))
            continue
        diff = "-" if r.get("loss_rdiff") is None else f"{r['loss_rdiff']:.1e}"
        if r.get("loss_rtol") is not None:
            diff += f" ({r['loss_rtol']:.0e})" + (" DRIFT" if r["drift"] else "")
        lines.append((
            r["variant"], r["backend"], r["dtype"], r["layout"], str(r["batch"]),
            f"{r['images_per_s']:.1f}", f"{r['images_per_s_q20']:.1f}-{r['images_per_s_q80']:.1f}",
            f"{r['step_ms']:.1f}", _mb(r["peak_alloc_bytes"]), _mb(r["saved_bytes"]),
            "-" if r.get("kernels_per_step") is None else str(r["kernels_per_step"]),
            "-" if r["max_batch"] is None else str(r["max_batch"]), f"{r['loss']:.5f}",
            diff,
            f"{r['tflops']:.3f}", f"{100 * r['matmul_frac']:.1f}", f"{100 * r['bytes_floor_frac']:.1f}"))
    widths = [max(len(line[i]) for line in lines if i < len(line)) for i in range(len(head))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines)


def target_lines(rows: list[dict]) -> list[str]:
    """The fused bf16 channels_last row against eager and torch.compile (the project's targets)."""
    out = []
    for batch in sorted({r["batch"] for r in rows}):
        get = {r["variant"]: r for r in rows if r["batch"] == batch and not r.get("error")}
        fused, eager, comp = get.get("fused_amp"), get.get("eager_amp"), get.get("compile_amp")
        if fused is None or eager is None:
            continue
        checks = [("images/s vs eager", fused["images_per_s"] / eager["images_per_s"], ">=", 1.5)]
        if comp is not None:
            checks.append(("images/s vs torch.compile", fused["images_per_s"] / comp["images_per_s"], ">=", 1.2))
        memory = "peak_alloc_bytes" if fused["peak_alloc_bytes"] is not None else "saved_bytes"
        if fused[memory] and eager[memory]:
            checks.append((f"{memory} vs eager", fused[memory] / eager[memory], "<=", 0.5))
        if fused["max_batch"] and eager["max_batch"]:
            checks.append(("max batch vs eager", fused["max_batch"] / eager["max_batch"], ">=", 2.0))
        for label, ratio, op, goal in checks:
            ok = ratio >= goal if op == ">=" else ratio <= goal
            out.append(f"target batch {batch}: fused_amp ({fused['backend']}) {label}: {ratio:.2f}x "
                       f"(goal {op} {goal}x) {'met' if ok else 'NOT met'}")
    return out


CSV_FIELDS = ["date", "device_name", "torch", "triton", "variant", "backend", "dtype", "layout", "batch",
              "graphed", "compile_mode", "steps", "images_per_s", "images_per_s_q20", "images_per_s_q80",
              "step_ms", "peak_alloc_bytes", "saved_bytes", "kernels_per_step", "max_batch", "loss", "loss_rdiff", "loss_rtol",
              "graph_rdiff", "drift", "step_flops", "step_bytes_floor", "tflops", "matmul_frac",
              "bytes_floor_frac", "invalid", "error"]


def write_records(out: Path, depth: int, record: dict, plots: bool = True, stem: str | None = None) -> list[Path]:
    """This run as JSON and CSV (both rewritten: called after every row, so a run cut off leaves what
    it measured) and, with ``plots``, the plots; returns the files."""
    out.mkdir(parents=True, exist_ok=True)
    stem = stem or f"resnet{depth}"
    json_path = out / f"{stem}.json"
    write_json_atomic(json_path, record)
    csv_path = out / f"{stem}.csv"
    env = record["environment"]
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for row in record["rows"]:
            writer.writerow({**{k: env[k] for k in ("date", "device_name", "torch", "triton")}, **row})
    return [json_path, csv_path, *(plot(out, stem, record) if plots else [])]


def plot(out: Path, stem: str, record: dict) -> list[Path]:
    """images/s and memory per variant (bars, one group per batch); memory against batch size."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plots (pip install matplotlib)")
        return []
    rows = [r for r in record["rows"] if not r.get("error")]
    if not rows:
        return []
    gpu = rows[0]["peak_alloc_bytes"] is not None
    memory, memory_label = (("peak_alloc_bytes", "peak allocated (MiB)") if gpu
                            else ("saved_bytes", "saved activations (MiB)"))
    title = f"ResNet-{record['config']['depth']} training on {record['environment']['device_name']}"
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    batches = sorted({r["batch"] for r in rows})
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    width = 0.8 / len(batches)
    for j, batch in enumerate(batches):
        get = {r["variant"]: r for r in rows if r["batch"] == batch}
        xs = [i + j * width for i in range(len(variants))]
        for ax, key in zip(axes, ("images_per_s", memory)):
            values = [(get[v][key] or 0) / (1 if key == "images_per_s" else 2**20) if v in get else 0
                      for v in variants]
            ax.bar(xs, values, width, label=f"batch {batch}")
    for ax, label in zip(axes, ("images/s (median)", memory_label)):
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(variants))], variants, rotation=35, ha="right")
        ax.set_ylabel(label)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    bars = out / f"{stem}_variants.png"
    fig.savefig(bars, dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for variant in variants:
        points = {r["batch"]: r[memory] for r in rows if r["variant"] == variant and r[memory]}
        for r in rows:
            if r["variant"] == variant:
                points.update({int(b): v for b, v in r["memory_probes"].items()})
        if points:
            bs = sorted(points)
            ax.plot(bs, [points[b] / 2**20 for b in bs], marker="o", label=variant)
    ax.set_xlabel("batch size")
    ax.set_ylabel(memory_label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    curve = out / f"{stem}_memory_vs_batch.png"
    fig.savefig(curve, dpi=110)
    plt.close(fig)
    return [bars, curve]


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown (unless None: the help says what that means); the module docstring as written."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def parse_args(argv=None, gpu: bool | None = None):
    if gpu is None:
        gpu = torch.cuda.is_available()
    names = [v.name for v in VARIANTS]
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.resnet1001", description=__doc__, formatter_class=_HelpFormatter,
        epilog="Defaults depend on the device: the CPU ones keep the run under 10 minutes on 2 cores.")
    p.add_argument("--depth", type=int, default=1001, choices=(110, 164, 1001),
                   help="pre-act ResNet depth (CIFAR); 1001 is the benchmark, 164 a quick check")
    p.add_argument("--batch", type=int, nargs="+", default=[128] if gpu else [2, 4, 8],
                   help="batch sizes to measure")
    p.add_argument("--warmup", type=int, default=5 if gpu else 1, help="untimed steps first")
    p.add_argument("--steps", type=int, default=20 if gpu else 4, help="timed steps (after warm-up)")
    p.add_argument("--lr", type=float, default=0.1,
                   help="SGD learning rate at batch 128, scaled linearly with the batch (lr * batch / 128)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial weights and synthetic data")
    p.add_argument("--variants", nargs="+", choices=names, default=None, metavar="NAME",
                   help=f"variants to run (default: all), of: {' '.join(names)}")
    p.add_argument("--skip", nargs="+", choices=names, default=[], metavar="NAME",
                   help="variants to leave out")
    p.add_argument("--data-dir", default=None,
                   help="CIFAR-10 python batches (cifar-10-batches-py) to train on (default: synthetic data)")
    p.add_argument("--device", default="cuda" if gpu else "cpu", help="torch device")
    p.add_argument("--max-batch-cap", type=int, default=4096 if gpu else 0,
                   help="search the largest fitting batch up to this (GPU only; 0 disables)")
    p.add_argument("--max-batch-variants", nargs="+", choices=names, default=None, metavar="NAME",
                   help="variants whose largest batch is searched (default: all; never torch.compile, "
                        "which recompiles for every size)")
    p.add_argument("--max-batch-resolution", type=int, default=16,
                   help="stop bisecting when the fitting and failing batches are this close")
    p.add_argument("--tf32", action="store_true",
                   help="allow TF32 in fp32 convs and matmuls (off: true fp32)")
    p.add_argument("--compile-on-cpu", action="store_true",
                   help="run torch.compile on CPU too (slow to build for deep nets)")
    p.add_argument("--threads", type=int, default=None if gpu else 1,
                   help="CPU threads for torch (GPU default: torch's choice). On CPU 1: with any other "
                        "work on the machine, OpenMP threads wait on each other and a step can take "
                        "100x longer; on an idle machine --threads 2 is faster")
    p.add_argument("--graph-warmup", type=int, default=3,
                   help="eager steps (on a side stream) before a *_graphed variant captures its step "
                        "(at most --warmup - 1: the capture is the next warm-up step)")
    p.add_argument("--count-kernels", action="store_true",
                   help="after the timed steps, one more step under the CUDA profiler: its kernel count per "
                        "variant (the kernels_per_step column; GPU only)")
    p.add_argument("--out", type=Path, default=None,
                   help="results folder (default: benchmarks/results/local/<device>, ignored by git)")
    p.add_argument("--commit-results", action="store_true",
                   help="write the committed record, benchmarks/results/<device>/ (and nothing local)")
    args = p.parse_args(argv)
    # The capture itself takes a step's time or more: it belongs in the warm-up, so the graph is
    # captured by the last warm-up step at the latest (with --warmup 1, in the first timed step).
    args.graph_warmup = max(1, min(args.graph_warmup, args.warmup - 1))
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    names = [v.name for v in VARIANTS]
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.backends.cudnn.allow_tf32 = args.tf32
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    torch.set_float32_matmul_precision("high" if args.tf32 else "highest")
    torch.backends.cudnn.benchmark = device.type == "cuda"
    env = environment(device)
    print(f"device: {env['device_name']} ({device}); torch {env['torch']}, triton {env['triton']}, "
          f"cuda {env['cuda']}; {env['cpu_threads']} CPU threads")
    print(f"precision: cudnn.allow_tf32={env['cudnn_allow_tf32']}, matmul.allow_tf32="
          f"{env['matmul_allow_tf32']}, float32_matmul_precision={env['float32_matmul_precision']}, "
          f"cudnn.benchmark={env['cudnn_benchmark']}")
    if device.type == "cpu":
        print("note: CPU timings on a shared machine are noisy; memory is saved-activation bytes")

    machine = measure_machine(device)
    print(f"machine: {machine.describe()}")

    torch.manual_seed(args.seed)
    initial = preact_fused.preact_resnet(args.depth, fused=False)
    state = copy.deepcopy(initial.state_dict())
    net = conv_layers(initial)
    del initial
    print(f"model: pre-act ResNet-{args.depth}, {net.params / 1e6:.2f} M parameters, "
          f"{step_flops(net, 1) / 1e9:.2f} GFLOP per image per training step; data: "
          f"{args.data_dir or 'synthetic'}; SGD lr {args.lr} x batch/128, momentum 0.9, wd 1e-4; "
          f"{args.warmup} warm-up + {args.steps} timed steps")

    chosen = [v for v in VARIANTS if v.name in (args.variants or names) and v.name not in args.skip]
    skipped = {}
    for variant in chosen:
        reason = skip_reason(variant, device, args)
        if reason is not None:
            skipped[variant.name] = reason
            print(f"SKIP {variant.name}: {reason}")
    runs = [v for v in chosen if v.name not in skipped]

    out = output_dir(args.out, args.commit_results, device)
    record = {"environment": env, "config": {**vars(args), "out": str(out)},
              "machine": {"copy_bytes_per_s": machine.copy_bytes_per_s,
                          "matmul_flops_per_s": {str(k): v for k, v in machine.matmul_flops_per_s.items()}},
              "model": {"depth": args.depth, "params": net.params, "convs": len(net.convs),
                        "step_flops_per_image": step_flops(net, 1)},
              "skipped": skipped, "rows": []}
    rows = record["rows"]
    progress = Progress(len(runs) * len(args.batch), unit="run")
    for batch in args.batch:
        data = make_batches(args, device, batch, args.warmup + args.steps)
        for variant in runs:
            progress.begin(f"{variant.name} @ {batch}")
            # Once per variant, at the largest batch; not for torch.compile (recompiles per size).
            max_batch = (device.type == "cuda" and args.max_batch_cap > 0 and not variant.compile
                         and variant.name in (args.max_batch_variants or names) and batch == max(args.batch))
            try:
                rows.append(run_variant(variant, args, state, device, data, max_batch))
            except Exception as err:   # report and go on: one broken variant must not hide the rest
                error = "out of memory" if is_oom(err) else repr(err)
                print(f"\nFAILED {variant.name} at batch {batch}: {error}", file=sys.stderr)
                rows.append({"variant": variant.name, "backend": variant.backend or "eager",
                             "dtype": variant.dtype, "layout": variant.layout, "batch": batch,
                             "error": error})
            release(device)
            row = rows[-1]
            mark_invalid([row])
            write_records(out, args.depth, record, plots=False)   # what is measured so far
            progress.end(f"{variant.name} at batch {batch}: " + (
                "FAILED" if row.get("error") else f"{row['images_per_s']:.1f} images/s"))
        del data
    progress.close()

    check_losses(rows)
    add_roofline(rows, net, machine)
    print()
    print(format_table(rows))
    print("columns: img/s median (q20-q80 over timed steps); peak MiB = max_memory_allocated over "
          "timed steps (GPU); saved MiB = activations saved for backward; rel diff = |loss - eager "
          "fp32 loss| / loss after all steps (DRIFT: beyond 2x PyTorch's own path in that dtype, at least "
          f"{LOSS_RTOL}, at one of the first {FLAGGED_STEPS} steps); %matmul = FLOPs / measured matmul rate / step time; "
          "%bytes = bytes floor / copy bandwidth / step time")
    drifted = [r for r in rows if r.get("drift")]
    for r in drifted:
        if r.get("graph_mismatch"):
            print(f"DRIFT !!! {r['variant']} at batch {r['batch']}: its losses differ from the un-graphed "
                  f"run's by up to {r['graph_rdiff']:.2e} relative")
        if r.get("loss_rtol") is not None and r["loss_rdiff"] > r["loss_rtol"]:
            print(f"DRIFT !!! {r['variant']} at batch {r['batch']}: loss {r['loss']:.6f} differs from eager "
                  f"fp32 by {r['loss_rdiff']:.2e} relative (tolerance {r['loss_rtol']:.1e})")
    if device.type == "cuda":   # the targets are set for a GPU (H200)
        for line in target_lines(rows):
            print(line)
    for name, reason in skipped.items():
        print(f"skipped {name}: {reason}")

    for r in rows:
        if r.get("invalid"):
            print(f"INVALID {r['variant']} at batch {r['batch']}: {r['invalid']}")
    for path in write_records(out, args.depth, record):
        print(f"wrote {path}")
    failed = [r for r in rows if r.get("error")]
    return 1 if failed or drifted else 0


if __name__ == "__main__":
    sys.exit(main())
