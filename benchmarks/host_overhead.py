"""Host time of one ResNet-1001 training step with kernels that do no work, fused vs eager.

    python -m benchmarks.host_overhead [--backends eager reference triton cuda] [--device meta|cpu]
                                       [--steps 5] [--depths 29 1001] [--out FILE.json]

What it measures: the Python and dispatcher time between kernels, the part of a step a GPU cannot
hide when its kernels are short. The whole step (forward with the loss, backward; no optimizer) runs
with every kernel replaced by (nearly) nothing, in one of two ways; every backend, eager included,
runs the same way, with the same model code, autograd engine, channels_last float32 tensors:

``--device meta`` (default): every op computes only the shapes, dtypes and strides of its outputs.
  * eager (``preact_resnet(..., fused=False)``) and the ``reference`` backend run ATen's meta
    kernels;
  * ``triton`` runs its custom ops' fake implementations (``register_fake`` of
    ``preact_fused_triton::*``) instead of the kernels;
  * ``cuda`` runs the fakes preact_fused.cuda registers for ``preact_fused::*`` (the compiled
    extension; where it is not built, the same fakes of the CPU emulator's ``preact_fused_emu::*``).
  Bias: most of ATen's meta kernels are Python (a profile of the eager step is mostly
  ``torch._prims_common``, ``torch._refs`` and symbolic-shape checks), far slower than the C++
  host code of the CUDA kernels they stand for, which inflates eager and the reference backend
  much more than the fused backends (whose fakes are a few lines each); Triton's own launcher
  (argument binding, specialization, cache lookup) and the CUDA driver's launch cost are not
  included. ``--device cpu`` is the closer figure for eager.
``--device cpu``: real CPU tensors of batch 2 and 1x1 images, one thread: ATen's C++ CPU kernels run
  (host code like a CUDA kernel's, plus a little arithmetic), Triton launches return at once (its
  kernels run under the interpreter on a CPU, and are skipped). The ``cuda`` backend runs its real
  C++ bindings built for the host against the CUDA emulator, with the emulated kernels skipped
  (``pf_emu_skip_kernels``): what remains is its host path, plus the NaN fill the emulation build
  gives each new output (an over-estimate).

The backends' device checks (``unavailable_reason``) are told that meta is fine while the step runs;
nothing else is patched. Reported: the median over ``--steps`` timed steps (after a warm-up step) of
forward, backward and both, per ResNet-1001 step and per unit (the marginal cost: the step time of
ResNet-1001 minus that of the depth-29 bottleneck net, over their difference of 324 units). A
backend that cannot run gets a row saying why.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import os
import sys
from pathlib import Path
from time import perf_counter

import torch
import torch.nn.functional as F

import preact_fused
from preact_fused import backend as _backend
from preact_fused import contract

from . import RESULTS, backend_table, command_line, environment, summarize, write_json_atomic

BACKENDS = ("eager", "reference", "triton", "cuda")
DEFAULT_OUT = RESULTS / "local" / "host_overhead.json"
RESNET1001_UNITS = 333
META = torch.device("meta")
SIZES = {"meta": (2, 32), "cpu": (2, 1)}  # (batch, image side): on cpu 1x1 images keep the kernels' work tiny


@contextlib.contextmanager
def _no_op_triton_launches():
    """Triton launches return at once (no kernel runs) while inside: for ``--device cpu``."""
    from triton.runtime.interpreter import InterpretedFunction

    original = InterpretedFunction.run
    InterpretedFunction.run = lambda self, *args, **kwargs: None
    try:
        yield
    finally:
        InterpretedFunction.run = original


@contextlib.contextmanager
def _enabled(backend: str, device: torch.device):
    """``backend`` runs on ``device`` while inside: meta (the ops' fakes) or cpu (tiny real tensors)."""
    if backend == "eager" or (backend == "reference"):
        yield
        return
    if device.type == "cpu" and backend == "cuda":  # the real bindings, emulated kernels skipped
        from .launches import build_emulated_cuda, emulated_cuda_backend, emulator_library
        ops, _ = build_emulated_cuda()
        library = emulator_library()
        library.pf_emu_skip_kernels(1)
        try:
            with emulated_cuda_backend(ops):
                yield
        finally:
            library.pf_emu_skip_kernels(0)
        return
    if device.type == "cpu":
        reason = _backend.unavailable_reason(backend, device)
        if reason is not None:
            raise RuntimeError(reason)
        with _no_op_triton_launches():
            yield
        return
    module = _backend._load(backend)
    original = module.unavailable_reason
    saved = [(module, "unavailable_reason", original)]
    if backend == "cuda":
        import preact_fused.cuda as cuda_backend
        if not cuda_backend.is_built():
            from .launches import EMULATED_NAMESPACE, build_emulated_cuda
            ops, _ = build_emulated_cuda()
            if not _has_fake(f"{EMULATED_NAMESPACE}::conv_fwd"):
                contract.register_fakes(EMULATED_NAMESPACE)
            saved.append((cuda_backend, "_ops", cuda_backend._ops))
            cuda_backend._ops = lambda: ops
    elif backend == "triton":
        missing = [n for n in contract.OPS if not _has_fake(f"preact_fused_triton::{n}")]
        if missing:
            raise RuntimeError(f"no fake (meta) implementation for preact_fused_triton::{', '.join(missing)}")
    module.unavailable_reason = lambda device: None if torch.device(device).type == "meta" else original(device)
    try:
        yield
    finally:
        for obj, name, value in saved:
            setattr(obj, name, value)


def _has_fake(op: str) -> bool:
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(op, "Meta")
    except RuntimeError:
        return False


def time_steps(backend: str, depth: int, steps: int, device=META) -> dict:
    """{"forward", "backward", "step"}: seconds of each timed step of the depth-``depth`` net on ``device``."""
    device = torch.device(device)
    batch, image = SIZES[device.type]
    fused = backend != "eager"
    torch.manual_seed(0)
    with torch.device(device):
        net = preact_fused.preact_resnet(depth, block="bottleneck", fused=fused,
                                         backend=backend if fused else "auto")
    net = net.to(memory_format=torch.channels_last)
    x = torch.randn(batch, 3, image, image, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.zeros(batch, dtype=torch.long, device=device)
    times = {"forward": [], "backward": [], "step": []}
    gc_was_enabled = gc.isenabled()
    try:
        for i in range(steps + 1):
            for p in net.parameters():
                p.grad = None
            gc.collect()
            gc.disable()
            start = perf_counter()
            loss = F.cross_entropy(net(x), y)
            middle = perf_counter()
            loss.backward()
            end = perf_counter()
            if gc_was_enabled:
                gc.enable()
            if i:  # the first step is a warm-up (caches, lazy imports)
                times["forward"].append(middle - start)
                times["backward"].append(end - middle)
                times["step"].append(end - start)
            del loss
    finally:
        if gc_was_enabled:
            gc.enable()
    return times


def _units(depth: int) -> int:
    return 3 * ((depth - 2) // 9)


def measure(backend: str, steps: int = 5, depths=(29, 1001), device=META) -> dict:
    """One row: median host seconds per ResNet-1001 step and per unit, or why ``backend`` cannot run.

    depths: two bottleneck depths (9n+2); per unit = the difference of their medians over the
    difference of their unit counts; the ResNet-1001 step is measured when the larger depth is 1001,
    else extrapolated (the smaller net's time + the per-unit time x the units it lacks).
    """
    row = {"backend": backend, "reason": None}
    try:
        device = torch.device(device)
        with _enabled(backend, device):
            timed = {d: time_steps(backend, d, steps, device) for d in depths}
    except Exception as err:  # noqa: BLE001 - any failure becomes the row's reason
        row["reason"] = f"{type(err).__name__}: {err}".strip()
        return row
    small, large = depths
    units = _units(large) - _units(small)
    row["resnet1001_measured"] = large == 1001
    for window in ("forward", "backward", "step"):
        low, high = summarize(timed[small][window]), summarize(timed[large][window])
        unit = (high["median"] - low["median"]) / units
        row[f"unit_{window}_s"] = unit
        if large == 1001:
            row[f"resnet1001_{window}_s"] = high
        else:
            extra = (RESNET1001_UNITS - _units(small)) * unit
            row[f"resnet1001_{window}_s"] = {k: v + extra for k, v in low.items()}
    row["times_s"] = {str(d): t for d, t in timed.items()}
    return row


def table(rows: list[dict]) -> str:
    """The markdown table of ``rows`` (from ``measure``)."""
    eager = next((r for r in rows if r["backend"] == "eager" and r["reason"] is None), None)

    def cells(r):
        step = r["resnet1001_step_s"]
        ratio = f"{r['unit_step_s'] / eager['unit_step_s']:.2f}x" if eager else "-"
        return [f"{step['median'] * 1e3:.1f}", f"{step['q20'] * 1e3:.1f}-{step['q80'] * 1e3:.1f}",
                f"{r['resnet1001_forward_s']['median'] * 1e3:.1f}", f"{r['resnet1001_backward_s']['median'] * 1e3:.1f}",
                f"{r['unit_step_s'] * 1e6:.0f}", ratio], ""

    return backend_table(["step fwd+bwd (ms)", "q20-q80 (ms)", "forward (ms)", "backward (ms)", "per unit (us)",
                          "per unit vs eager"], rows, cells)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per model (median; default 5)")
    parser.add_argument("--depths", nargs=2, type=int, default=[29, 1001], metavar=("SMALL", "LARGE"),
                        help="two bottleneck depths 9n+2 for the per-unit difference (default 29 1001; a "
                             "larger depth other than 1001 extrapolates the ResNet-1001 step)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON file (default {DEFAULT_OUT})")
    parser.add_argument("--device", choices=("meta", "cpu"), default="meta",
                        help="meta (default): the ops' meta kernels and fakes; cpu: real tensors of batch 2, "
                             "1x1 images, Triton launches skipped (eager, reference, triton only)")
    args = parser.parse_args(argv)
    small, large = args.depths
    if small % 9 != 2 or large % 9 != 2 or large <= small or small < 11:
        parser.error("--depths: two bottleneck depths 9n+2 (n >= 1), the second larger")
    if args.device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton on the CPU (its launches skipped)
        torch.set_num_threads(1)  # the host side of a GPU step is one thread
    rows = []
    for backend in args.backends:
        rows.append(measure(backend, args.steps, depths=(small, large), device=args.device))
        print(f"{backend}: " + ("done" if rows[-1]["reason"] is None else rows[-1]["reason"]), file=sys.stderr)
    units = _units(large) - _units(small)
    how = "measured" if large == 1001 else f"extrapolated from depths {small} and {large}"
    print(f"Host time of a ResNet-1001 training step (forward + backward, no optimizer) on {args.device}: "
          f"median of {args.steps} steps, ResNet-1001 {how}; "
          f"per unit = (depth {large} - depth {small}) / {units} units")
    print(table(rows))
    batch, image = SIZES[args.device]
    record = {"command": command_line("benchmarks.host_overhead", argv),
              "environment": environment(torch.device(args.device)),
              "method": f"{args.device} device (see benchmarks/host_overhead.py)",
              "config": {"steps": args.steps, "depths": [small, large], "batch": batch, "image": image,
                         "layout": "channels_last",
                         "dtype": "float32", "torch_threads": torch.get_num_threads()},
              "rows": rows}
    write_json_atomic(args.out, record)
    print(f"wrote {args.out}")
    return rows


if __name__ == "__main__":
    main()
