"""Kernel-level GPU timings of the fused BN-ReLU-conv triple, per backend, against eager cuDNN.

For every distinct triple of the CIFAR ResNet-1001 (preact_fused/shapes.py, RESNET1001_TRIPLES),
channels_last, default bf16 and batch 128, the median (``triton.testing.do_bench``) of

  fused forward   conv_fwd folding the input's statistics in its loader (running-stat update;
                  residual and statistics epilogue where the network has them): one launch
  fused backward  as a unit's backward runs the triple: conv_dgrad (ReLU mask + BN sums), then
                  conv_wgrad, which for conv1 and conv2 also computes the next triple's BN backward
                  (conv_wgrad_bn_backward), and for conv1 the standalone bn_backward of its own BN
                  (the others' BN backward is in the wgrad before them: per-triple figures shift
                  BN backward work from conv2/conv3 to conv1/conv2, network totals count each once)
  eager forward   F.batch_norm (training) + relu + conv2d [+ residual]
  eager backward  autograd through the same (dx, dw, dgamma, dbeta)

for each fused backend (``triton``, ``cuda``: the contract ops called directly, no autograd), and each of its ops alone; and for cuDNN's own fusion of the triple (``cudnn`` rows,
``benchmarks/cudnn_peer.py``: the frontend's graph API, fp16 only, whatever ``--dtype``; a pattern
cuDNN cannot build on this GPU gets a row saying why; ``--no-cudnn`` leaves it out). The minimum-bytes time is the time to move, at the measured
copy bandwidth (a 1 GiB device-to-device copy), the bytes no implementation can avoid: forward x
and y (+ residual), backward dy, x and dx. Network totals weight each triple by its count in
ResNet-1001; with both backends, the CUDA backend's time is also given relative to Triton's.

Rows are written to ``kernel_ops.csv`` and ``kernel_ops.json`` after every triple, under
benchmarks/results/local/<device>/ (``--commit-results``: benchmarks/results/<device>/; or ``--out``),
with device, versions, dtype, layout, batch and TF32 setting on every row; a table is printed.

    python -m benchmarks.kernel_ops [--backends triton cuda] [--batch 128] [--dtype bfloat16]
                                    [--only s1.conv2 s3.conv1] [--out DIR]
"""
from __future__ import annotations

import argparse
import csv
import datetime
import importlib
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from preact_fused.shapes import RESNET1001_COUNTS as COUNTS
from preact_fused.shapes import RESNET1001_TRIPLES, triple_roles

from . import cudnn_peer, mark_invalid, output_dir, write_json_atomic
from . import fast_backend_reason

BACKENDS = ("triton", "cuda")
MODULES = {"triton": "preact_fused.triton", "cuda": "preact_fused.cuda"}
OPS = ("conv_fwd", "conv_dgrad", "bn_backward", "conv_wgrad", "conv_wgrad_bn_backward")
EPS = 1e-5


def copy_bandwidth() -> float:
    """Measured device-to-device copy bandwidth in bytes/s (read + write of a 1 GiB buffer)."""
    import triton.testing

    src = torch.empty(1 << 29, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), return_mode="median")
    return 2 * src.numel() * src.element_size() / (ms * 1e-3)


class Triple:
    """Inputs of one BN-ReLU-conv triple and its four timed closures."""

    def __init__(self, ops, name, cin, cout, hw, k, stride, batch, dtype, device="cuda"):
        self.name, self.stride, self.padding = name, stride, k // 2
        roles = triple_roles(name)
        self.with_bn, self.with_residual = roles["with_bn"], roles["with_residual"]
        self.want_stats = roles["want_stats"]
        self.next_bn = roles["next_bn"]          # the wgrad computes the next BN's backward
        self.own_bn_backward = roles["first_bn"]  # the unit's first BN: a standalone bn_backward
        ho = (hw + 2 * self.padding - k) // stride + 1
        cl = torch.channels_last

        def act(*shape):
            return torch.randn(*shape, device=device, dtype=dtype).to(memory_format=cl)

        self.ops = ops
        self.x = act(batch, cin, hw, hw) * 2 + 0.5
        self.dy = act(batch, cout, ho, ho)
        self.residual = act(batch, cout, ho, ho) if self.with_residual else None
        # float32 master weights, as under autocast: the fused kernels round them as they load them
        self.weight = torch.randn(cout, cin, k, k, device=device) / k
        self.gamma = torch.rand(cin, device=device) + 0.5
        self.beta = torch.randn(cin, device=device)
        self.running = (torch.zeros(cin, device=device), torch.ones(cin, device=device),
                        torch.zeros((), dtype=torch.long, device=device))
        self.stats = ops.bn_stats(self.x)
        self.fold = ops.bn_fold(self.stats, self.gamma, self.beta, eps=EPS) if self.with_bn else None
        self.count = self.x.numel() / cin
        self.g, self.sums = ops.conv_dgrad(self.dy, self.weight, self.x, stride, self.padding, self.fold)
        if self.next_bn:  # the next BN: its input (this conv's output), fold and sums; dy is its masked gradient
            self.next_x = act(batch, cout, ho, ho) * 2 + 0.5
            self.next_fold = ops.bn_fold(ops.bn_stats(self.next_x), eps=EPS)
            self.next_sums = torch.randn(3, cout, device=device)
            self.next_count = self.next_x.numel() / cout
        # Eager: module-like leaves so autograd computes dx, dw, dgamma, dbeta.
        self.eager_x = self.x.detach().clone().requires_grad_()
        self.eager_w = self.weight.detach().to(dtype).requires_grad_()
        self.eager_gamma = self.gamma.clone().requires_grad_()  # float32 parameters, as under autocast
        self.eager_beta = self.beta.clone().requires_grad_()
        self.eager_running = tuple(t.clone() for t in self.running[:2])

    # -- fused (the backend's contract ops) -------------------------------------------------------
    def fused_forward(self):
        """The triple's forward as a fused unit runs it: one conv_fwd folding the batch statistics
        (running-stat update included) and emitting the output's."""
        bn = {}
        if self.with_bn:
            rm, rv, nbt = self.running
            bn = dict(stats=self.stats, gamma=self.gamma, beta=self.beta, running_mean=rm, running_var=rv,
                      num_batches_tracked=nbt, eps=EPS, momentum=0.1, update_running=True)
        return self.ops.conv_fwd(self.x, self.weight, self.stride, self.padding, **bn, residual=self.residual,
                                 want_stats=self.want_stats)

    def conv_fwd(self):
        """conv_fwd with a given fold (a second conv of one BN)."""
        return self.ops.conv_fwd(self.x, self.weight, self.stride, self.padding, fold=self.fold,
                                 residual=self.residual, want_stats=self.want_stats)

    def conv_dgrad(self):
        return self.ops.conv_dgrad(self.dy, self.weight, self.x, self.stride, self.padding, self.fold)

    def bn_backward(self):
        if not self.with_bn:
            return None
        return self.ops.bn_backward(self.g, self.x, self.fold, self.sums, self.count, True)

    def conv_wgrad(self):
        return self.ops.conv_wgrad(self.x, self.dy, self.weight, self.stride, self.padding, self.fold)

    def conv_wgrad_bn_backward(self):
        if not self.next_bn:
            return None
        return self.ops.conv_wgrad_bn_backward(self.x, self.dy, self.weight, self.stride, self.padding, self.fold,
                                               self.next_x, self.next_fold, self.next_sums, self.next_count, True)

    def fused_backward(self):
        self.conv_dgrad()
        if self.next_bn:
            self.conv_wgrad_bn_backward()
        else:
            self.conv_wgrad()
        if self.own_bn_backward:
            self.bn_backward()

    # -- eager (cuDNN) -------------------------------------------------------------------------
    def eager_graph(self):
        a = self.eager_x
        if self.with_bn:
            a = F.relu(F.batch_norm(a, *self.eager_running, self.eager_gamma, self.eager_beta, True, 0.1, EPS))
        y = F.conv2d(a, self.eager_w, stride=self.stride, padding=self.padding)
        return y + self.residual if self.with_residual else y

    def eager_forward(self):
        with torch.no_grad():
            return self.eager_graph()

    def eager_backward_closure(self):
        y = self.eager_graph()
        leaves = [self.eager_x, self.eager_w] + ([self.eager_gamma, self.eager_beta] if self.with_bn else [])
        return lambda: torch.autograd.grad(y, leaves, self.dy, retain_graph=True)

    def min_bytes(self) -> tuple[int, int]:
        """Unavoidable bytes: forward x + y (+ residual); backward dy + x + dx."""
        nx = self.x.numel() * self.x.element_size()
        ny = self.dy.numel() * self.dy.element_size()
        return nx + ny * (2 if self.with_residual else 1), ny + 2 * nx


def measure(t: Triple, bench) -> dict:
    """Medians (ms) of the backend's ops alone and of the fused forward and backward of triple t."""
    runs = {"bn_backward": t.with_bn, "conv_wgrad_bn_backward": t.next_bn}
    row = {f"{op}_ms": bench(getattr(t, op)) if runs.get(op, True) else 0.0 for op in OPS}
    row["fused_fwd_ms"] = bench(t.fused_forward)
    row["fused_bwd_ms"] = bench(t.fused_backward)
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.kernel_ops", description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS),
                        help="fused backends to time (default: those that run here)")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--only", nargs="*", help="triple names to run (default: all)")
    parser.add_argument("--tf32", action="store_true", help="float32: TF32 in Triton and cuDNN (default: exact)")
    parser.add_argument("--cudnn", action=argparse.BooleanOptionalAction, default=True,
                        help="time cuDNN's fused patterns (fp16) beside the backends")
    parser.add_argument("--out", type=Path, default=None,
                        help="results folder (default benchmarks/results/local/<device>)")
    parser.add_argument("--commit-results", action="store_true", help="write under benchmarks/results/<device>")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    import triton
    import triton.testing

    device = torch.device("cuda")
    backends = {}
    for name in args.backends:
        reason = fast_backend_reason(name, device)
        if reason is None:
            backends[name] = importlib.import_module(MODULES[name])
        else:
            print(f"SKIP {name}: {reason}")
    peer_reason = cudnn_peer.unavailable_reason() if args.cudnn else "--no-cudnn"
    if peer_reason is not None:
        print(f"SKIP cudnn: {peer_reason}")
    if not backends and peer_reason is not None:
        raise SystemExit("no fused backend runs here")
    if "triton" in backends:
        backends["triton"].set_fp32_precision("tf32" if args.tf32 else "ieee")
    dtype = getattr(torch, args.dtype)
    torch.backends.cudnn.allow_tf32 = args.tf32
    torch.backends.cudnn.benchmark = True
    bandwidth = copy_bandwidth()
    common = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"), "device": torch.cuda.get_device_name(),
        "torch": torch.__version__, "triton": triton.__version__, "dtype": args.dtype, "layout": "channels_last",
        "batch": args.batch, "tf32": args.tf32, "copy_GBps": round(bandwidth / 1e9, 1),
    }

    def bench(fn):
        return triton.testing.do_bench(fn, return_mode="median")

    rows = []
    out = output_dir(args.out, args.commit_results, device)
    handle = None
    if peer_reason is None:
        import cudnn
        handle = cudnn.create_handle()
        cudnn.set_stream(handle=handle, stream=torch.cuda.current_stream().cuda_stream)
    print(f"{common['device']}, {args.dtype}, channels_last, batch {args.batch}, copy {bandwidth / 1e9:.0f} GB/s")
    print(f"{'triple':16} {'backend':7} {'fused fwd':>9} {'fused bwd':>9} {'eager fwd':>9} {'eager bwd':>9} "
          f"{'speedup':>7} {'min-bytes':>9} {'x min':>6}   (ms)")
    for name, cin, cout, hw, k, stride in RESNET1001_TRIPLES:
        if args.only and name not in args.only:
            continue
        eager = None
        for backend, ops in backends.items():
            t = Triple(ops, name, cin, cout, hw, k, stride, args.batch, dtype)
            if eager is None:  # the same eager figures for every backend of this triple
                eager = {"eager_fwd_ms": bench(t.eager_forward), "eager_bwd_ms": bench(t.eager_backward_closure())}
            row = {**common, "triple": name, "backend": backend, "cin": cin, "cout": cout, "hw": hw, "k": k,
                   "stride": stride, "count": COUNTS[name], **measure(t, bench), **eager}
            fwd_bytes, bwd_bytes = t.min_bytes()
            row["min_bytes_ms"] = (fwd_bytes + bwd_bytes) / bandwidth * 1e3
            fused = row["fused_fwd_ms"] + row["fused_bwd_ms"]
            row["speedup"] = (row["eager_fwd_ms"] + row["eager_bwd_ms"]) / fused
            row["x_min_bytes"] = fused / row["min_bytes_ms"]
            rows.append(row)
            print(f"{name:16} {backend:7} {row['fused_fwd_ms']:9.4f} {row['fused_bwd_ms']:9.4f} "
                  f"{row['eager_fwd_ms']:9.4f} {row['eager_bwd_ms']:9.4f} {row['speedup']:7.2f} "
                  f"{row['min_bytes_ms']:9.4f} {row['x_min_bytes']:6.2f}", flush=True)
            del t
            torch.cuda.empty_cache()
        if peer_reason is None:
            rows.append(peer_row(common, (name, cin, cout, hw, k, stride), args.batch, handle, bench, eager, bandwidth))
        write_results(out, mark_invalid(rows))   # what is measured so far

    totals = network_totals(rows)
    for backend, total in totals.items():
        print(f"network, {backend} (triples weighted by count): fused {total['fused_ms']:.2f} ms, eager "
              f"{total['eager_ms']:.2f} ms, speedup {total['speedup']:.2f}, "
              f"{total['x_min_bytes']:.2f}x the minimum-bytes time")
    if "triton" in totals and "cuda" in totals:
        print(f"network: cuda / triton time {totals['cuda']['fused_ms'] / totals['triton']['fused_ms']:.2f}")
    write_results(out, rows)
    print(f"wrote {len(rows)} rows to {out / 'kernel_ops.csv'} and kernel_ops.json")
    return 0


def network_totals(rows: list[dict]) -> dict:
    """Per backend: fused and eager time of one network step's triples (count x median), their ratio,
    and the fused time over the minimum-bytes time."""
    totals = {}
    for backend in dict.fromkeys(r["backend"] for r in rows):
        mine = [r for r in rows if r["backend"] == backend]
        if any(r.get("fused_fwd_ms") is None or r.get("invalid") or "eager_fwd_ms" not in r for r in mine):
            continue   # a triple without a time (cuDNN could not build it) or an invalid backend

        def total(key):
            return sum(r[key] * r["count"] for r in mine)

        fused = total("fused_fwd_ms") + total("fused_bwd_ms")
        eager = total("eager_fwd_ms") + total("eager_bwd_ms")
        totals[backend] = {"fused_ms": fused, "eager_ms": eager, "speedup": eager / fused,
                           "x_min_bytes": fused / total("min_bytes_ms")}
    return totals


def peer_row(common: dict, triple, batch: int, handle, bench, eager: dict | None, bandwidth: float) -> dict:
    """cuDNN's fused forward and backward of one triple, or a row saying why it could not be built."""
    name, cin, cout, hw, k, stride = triple
    row = {**common, "triple": name, "backend": "cudnn", "dtype": "float16", "cin": cin, "cout": cout,
           "hw": hw, "k": k, "stride": stride, "count": COUNTS[name], **(eager or {})}
    try:
        peer = cudnn_peer.CudnnTriple(name, cin, cout, hw, k, stride, batch, handle=handle)
    except Exception as err:   # inputs or the handle: the whole triple fails
        row["unsupported"] = f"{type(err).__name__}: {err}"
    else:
        row["cudnn_patterns"] = "; ".join(f"{s}={p}" for s, p in peer.patterns.items())
        reason = peer.runnable()
        if reason is not None:
            row["unsupported"] = reason
        else:
            row["fused_fwd_ms"], row["fused_bwd_ms"] = bench(peer.forward), bench(peer.backward)
            fwd_bytes = (peer.x.numel() + peer.y.numel() * (2 if peer.with_residual else 1)) * 2
            bwd_bytes = (peer.dy.numel() + 2 * peer.x.numel()) * 2
            row["min_bytes_ms"] = (fwd_bytes + bwd_bytes) / bandwidth * 1e3
            fused = row["fused_fwd_ms"] + row["fused_bwd_ms"]
            if eager:
                row["speedup"] = (eager["eager_fwd_ms"] + eager["eager_bwd_ms"]) / fused
            row["x_min_bytes"] = fused / row["min_bytes_ms"]
        del peer
        torch.cuda.empty_cache()
    if "unsupported" in row:
        print(f"{name:16} cudnn   cannot build: {row['unsupported'][:150]}", flush=True)
    else:
        print(f"{name:16} cudnn   {row['fused_fwd_ms']:9.4f} {row['fused_bwd_ms']:9.4f} (fp16; "
              f"{row['cudnn_patterns'][:100]})", flush=True)
    return row


def write_results(out: Path, rows: list[dict]) -> None:
    """kernel_ops.json and kernel_ops.csv (rewritten: a run cut off leaves what it measured)."""
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "kernel_ops.json", {"rows": rows})
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with open(out / "kernel_ops.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


if __name__ == "__main__":
    sys.exit(main())
