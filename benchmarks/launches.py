"""Kernel launches per pre-activation bottleneck unit and per ResNet-1001 training step, per backend.

    python -m benchmarks.launches [--backends eager reference triton cuda] [--out FILE.json]

Backends: ``eager`` (the unfused model, ``preact_resnet(..., fused=False)``), the fused model with
``reference``, ``triton`` and ``cuda``; on a GPU also ``compiled`` (the eager model under
``torch.compile``). A backend that cannot run here gets a row saying why.

Per-unit figures are marginal costs: a CIFAR bottleneck net is counted at two depths (default 29
and 38: 3 and 4 units per stage) and the difference divided by the 3 extra units (plain stride-1
units with an identity shortcut), so the stem, the head, the loss and the three projection units
cancel. ResNet-1001 (111 units per stage) = the fixed part (stem, head, loss, and what the three
projection units launch more than plain ones) + 333 x the per-unit cost. The counts do not depend
on the image size, nor on the batch except for the reference backend (its statistics take one tile
per image; checked: batch 1 at 8x8 and batch 2 at 16x16 give the same counts for the others).
Tiny inputs by default: batch 2, 8x8 on a CPU, 32x32 on a GPU; channels_last by default
(``--layout nchw`` for NCHW, where the fused backends add layout copies). Forward, backward and
the optimizer (SGD, momentum 0.9, weight decay, PyTorch's default implementation for the device; a
second step, so the momentum buffers exist) are counted separately; the step figures exclude the
optimizer.

How launches are counted
------------------------
On a GPU: the kernels (and memset/memcpy operations) the CUDA profiler records in each window
(``torch.profiler``, CUDA activity), after a warm-up step (Triton autotuning, cuDNN choices).

On a CPU (a proxy: what a CUDA build would launch), ``LaunchCounter``, a TorchDispatchMode:

1. An ATen op launches one kernel, except ops that launch none: views (``OpOverload.is_view``:
   view, _unsafe_view, as_strided, t, permute, expand, transpose, [un]squeeze, detach, alias,
   slice, select, split, unbind, ...), allocations (``ALLOCATIONS``: empty*, new_empty*, resize_,
   set_), metadata queries, and ops whose every tensor output has no element. ``zeros``, ``fill_``,
   ``copy_``, ``clone``, ``_to_copy``, ``add_`` each launch one.
   ``convolution_backward`` launches one kernel per gradient it computes (its ``output_mask``):
   cuDNN runs data and weight gradients as separate kernels, as the fused backends do.
2. Composite ops (those with a CompositeImplicitAutograd kernel, e.g. ``contiguous``, ``to``,
   ``reshape``) are decomposed with the counter active and count by what they run: ``contiguous``
   counts its ``clone`` only when it copies, ``to`` its ``_to_copy`` only when it converts.
3. Ops of other namespaces (the fused backends' custom ops ``preact_fused_triton::*``,
   ``preact_fused_emu::*``) launch nothing themselves: their implementation runs with the counter
   active (redispatched below the Python key), so the ATen ops they call, from Python or C++, count
   by rules 1-2 and their kernels by rule 4. The emulation build's NaN fill of every new output
   (``new_tensor`` in csrc/bindings.cpp, a check for unwritten elements) is not counted: a GPU build
   has none. (A dispatch mode is popped while it runs an op, so without the redispatch it would not
   see what a C++ op calls; the CPU profiler does record those, but at every nesting level at once,
   composites and their parts, which would need a second rule for the level that launches.)
4. Fused kernels: each Triton launch with a non-empty grid (``JITFunction.run`` and the
   interpreter's ``InterpretedFunction.run``, through which every launch passes; runs inside the
   autotuner's benchmarking are not counted, and neither are the ATen ops the interpreter itself
   issues to move arguments to the host), and each launch of the CUDA emulator (``emu::launch``'s
   counter, ``pf_emu_launches`` in csrc/emulate/kernels.cpp, read through ctypes).

Limits of the proxy: one ATen op is one kernel, where a GPU library may run several (cuDNN batch
norm, reductions in two passes) or ATen may fuse; on a GPU, CPU scalars launch nothing. Triton runs
under its interpreter (``TRITON_INTERPRET=1``, set by this script on a machine without a GPU) and
the CUDA backend under the emulator (csrc/emulate/, built with the host compiler by
``build_emulated_cuda``): the same launch logic as on a GPU, unless a launcher branches on the
device's properties (the emulator reports 132 SMs).
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import sys
from collections import Counter
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_leaves  # noqa: E402

import preact_fused  # noqa: E402
from preact_fused.backend import unavailable_reason  # noqa: E402

from . import RESULTS, backend_table, command_line, cuda_kernel_count, environment, write_json_atomic  # noqa: E402

BACKENDS = ("eager", "reference", "triton", "cuda")
GPU_BACKENDS = ("eager", "compiled", "reference", "triton", "cuda")
DEFAULT_OUT = RESULTS / "local" / "launches.json"
CSRC = Path(__file__).resolve().parent.parent / "csrc"
EMULATED_NAMESPACE = "preact_fused_emu"
RESNET1001_UNITS = 333  # 111 bottleneck units per stage, 3 stages
WINDOWS = ("forward", "backward", "optimizer")
LAYOUTS = {"channels_last": torch.channels_last, "nchw": torch.contiguous_format}

# No kernel: views the schema does not mark as aliases (the others: OpOverload.is_view), allocation
# and metadata ops.
VIEWS = frozenset({"_unsafe_view", "_reshape_alias", "lift_fresh"})
ALLOCATIONS = frozenset({"empty", "empty_like", "empty_strided", "empty_permuted", "new_empty",
                         "new_empty_strided", "resize_", "set_"})
METADATA = frozenset({"sym_size", "sym_stride", "sym_numel", "sym_storage_offset", "is_same_size",
                      "is_contiguous", "is_strides_like_format", "is_non_overlapping_and_dense",
                      "_has_compatible_shallow_copy_type", "_nested_tensor_size", "dim", "size", "stride",
                      "record_stream"})


# ---- the counter ------------------------------------------------------------------------------

_active: list["LaunchCounter"] = []  # the counters in force (innermost last); the Triton hook feeds them


class LaunchCounter(TorchDispatchMode):
    """Counts the kernel launches of what runs inside it (the rule of the module docstring).

    ``aten``: launches by ATen op name; ``kernels``: fused kernel launches by kernel (Triton) or op
    (emulated CUDA); ``total``: both together.
    """

    def __init__(self, emulator=None):
        super().__init__()
        self.aten: Counter = Counter()
        self.kernels: Counter = Counter()
        self._emulator = emulator  # ctypes function pf_emu_launches, or None
        self._quiet = 0            # > 0 inside a Triton launch: the interpreter's own ATen ops
        self._entered = 0          # re-entered (rules 2 and 3) while already active
        self._in_custom = 0        # inside a custom op: its emulated launches are counted by the outermost

    @property
    def total(self) -> int:
        return sum(self.aten.values()) + sum(self.kernels.values())

    def by_name(self) -> Counter:
        return Counter({f"aten.{k}": v for k, v in self.aten.items()}) + self.kernels

    def __enter__(self):
        _install_triton_hook()
        self._entered += 1
        if self._entered == 1:
            _active.append(self)
        return super().__enter__()

    def __exit__(self, *exc):
        self._entered -= 1
        if self._entered == 0:
            _active.remove(self)
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self._quiet:
            return func(*args, **kwargs)
        if func.namespace not in ("aten", "prims"):
            return self._custom(func, args, kwargs)
        if torch._C._dispatch_has_kernel_for_dispatch_key(func.name(), "CompositeImplicitAutograd"):
            with self:
                out = func.decompose(*args, **kwargs)
            if out is not NotImplemented:
                return out
        out = func(*args, **kwargs)
        if self._in_custom and self._emulator is not None and _is_poison(func, args):
            return out
        launches = _aten_launches(func, args, kwargs, out)
        if launches:
            self.aten[func.overloadpacket.__name__] += launches
        return out

    def _custom(self, func, args, kwargs):
        """A custom op: run its backend implementation with this counter active (rule 3)."""
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        if not tensors:  # e.g. profiler::_record_function_enter_new
            return func(*args, **kwargs)
        keys = torch._C._dispatch_keys(tensors[0]) & torch._C._after_autograd_keyset
        keys = keys.remove(torch._C.DispatchKey.ADInplaceOrView)
        outermost = self._in_custom == 0
        before = self._emulator(0) if self._emulator is not None else 0
        self._in_custom += 1
        try:
            with self:
                out = func.redispatch(keys, *args, **kwargs)
        finally:
            self._in_custom -= 1
        if self._emulator is not None and outermost:
            launched = self._emulator(0) - before
            if launched:
                self.kernels[f"{func.namespace}.{func.overloadpacket.__name__}"] += launched
        return out


def _is_poison(func, args) -> bool:
    """The emulation build's NaN fill of each new output (csrc/bindings.cpp ``new_tensor``): not in a GPU build."""
    return (func.overloadpacket.__name__ == "fill_" and len(args) > 1 and isinstance(args[1], float)
            and args[1] != args[1])


def _aten_launches(func, args, kwargs, out) -> int:
    """Kernels a CUDA build of ATen launches for one call of ``func`` (rule 1)."""
    name = func.overloadpacket.__name__
    if func.is_view or name in VIEWS or name in ALLOCATIONS or name in METADATA:
        return 0
    outputs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
    if func._schema.is_mutable:
        outputs += [a for a, arg in zip(args, func._schema.arguments)
                    if isinstance(a, torch.Tensor) and arg.alias_info is not None and arg.alias_info.is_write]
    if outputs and all(t.numel() == 0 for t in outputs):
        return 0
    if name == "convolution_backward":
        mask = kwargs.get("output_mask", args[-1] if args else None)
        return max(1, sum(bool(m) for m in mask))
    return 1


_hooked = {}


def _install_triton_hook() -> None:
    """Wrap Triton's launch entry points once (rule 4); a no-op where Triton is not installed."""
    if _hooked:
        return
    try:
        from triton.runtime import autotuner, jit
    except ImportError:
        _hooked["none"] = True
        return
    classes = [jit.JITFunction]
    try:
        from triton.runtime.interpreter import InterpretedFunction
        classes.append(InterpretedFunction)
    except ImportError:
        pass
    for cls in classes:
        original = cls.run

        def run(self, *args, _original=original, **kwargs):
            if kwargs.get("warmup") or not _active or _hooked.get("benchmarking"):
                return _original(self, *args, **kwargs)
            if _grid_size(self, kwargs.get("grid"), args, kwargs) > 0:
                for counter in _active:
                    counter.kernels[f"triton.{getattr(self.fn, '__name__', 'kernel')}"] += 1
            for counter in _active:
                counter._quiet += 1
            try:
                return _original(self, *args, **kwargs)
            finally:
                for counter in _active:
                    counter._quiet -= 1
        cls.run = run
        _hooked[cls] = original
    bench = autotuner.Autotuner._bench

    def _bench(self, *args, **kwargs):
        previous = _hooked.get("benchmarking", False)
        _hooked["benchmarking"] = True
        try:
            return bench(self, *args, **kwargs)
        finally:
            _hooked["benchmarking"] = previous
    autotuner.Autotuner._bench = _bench


def _grid_size(fn, grid, args, kwargs) -> int:
    """Programs in a launch's grid (1 when it cannot be evaluated here)."""
    try:
        if callable(grid):
            names = getattr(fn, "arg_names", [])
            grid = grid({**dict(zip(names, args)), **kwargs})
        size = 1
        for g in tuple(grid):
            size *= int(g)
        return size
    except Exception:
        return 1


# ---- the emulated CUDA backend ------------------------------------------------------------------

def _has_kernel(op: str, key: str) -> bool:
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(op, key)
    except RuntimeError:  # no such operator
        return False


def build_emulated_cuda(build_directory: str | None = None):
    """``torch.ops.preact_fused_emu``: csrc/ built for the host with the CUDA emulator, loaded once.

    The same sources and flags as the real extension's emulation tests (bindings.cpp +
    emulate/kernels.cpp with PF_EMULATE); the build is cached by torch (``TORCH_EXTENSIONS_DIR``)
    unless ``build_directory`` is given. Returns (ops, pf_emu_launches): the op namespace and the
    emulator's launch counter as a ctypes function. Raises RuntimeError when it cannot be built.
    """
    import shutil

    from torch.utils.cpp_extension import load

    if not _has_kernel(f"{EMULATED_NAMESPACE}::conv_fwd", "CPU"):
        if not (CSRC / "emulate" / "emu.h").is_file():
            raise RuntimeError(f"the CUDA emulator sources are not at {CSRC / 'emulate'}")
        if shutil.which("c++") is None:
            raise RuntimeError("no host C++ compiler (c++) to build the CUDA emulator")
        if build_directory is not None:
            os.makedirs(build_directory, exist_ok=True)
        load(name=EMULATED_NAMESPACE, sources=[str(CSRC / "bindings.cpp"), str(CSRC / "emulate" / "kernels.cpp")],
             extra_include_paths=[str(CSRC / "emulate"), str(CSRC)],
             extra_cflags=["-DPF_EMULATE", "-O1", "-ffp-contract=off"], build_directory=build_directory,
             is_python_module=False, with_cuda=False)
    library = emulator_library()
    try:
        counter = library.pf_emu_launches
    except AttributeError:
        raise RuntimeError("the loaded CUDA emulator has no launch counter (pf_emu_launches): rebuild it") from None
    counter.restype, counter.argtypes = ctypes.c_ulonglong, [ctypes.c_int]
    return getattr(torch.ops, EMULATED_NAMESPACE), counter


def emulator_library() -> ctypes.CDLL:
    """The loaded CUDA emulator build (after ``build_emulated_cuda``), for its ``extern "C"`` controls:
    ``pf_emu_launches(reset)`` and ``pf_emu_skip_kernels(skip)`` (csrc/emulate/kernels.cpp)."""
    libraries = [p for p in torch.ops.loaded_libraries if os.path.basename(p).startswith(EMULATED_NAMESPACE)]
    if not libraries:
        raise RuntimeError(f"the {EMULATED_NAMESPACE} ops are registered but their library is not known to torch.ops")
    library = ctypes.CDLL(libraries[0])
    library.pf_emu_skip_kernels.argtypes = [ctypes.c_int]
    return library


@contextlib.contextmanager
def emulated_cuda_backend(ops, devices=("cpu",)):
    """``backend="cuda"`` runs the emulated ops ``ops`` on CPU tensors (and on ``devices``) while inside."""
    import preact_fused.cuda as cuda_backend

    saved = cuda_backend._ops, cuda_backend.unavailable_reason
    original_reason = cuda_backend.unavailable_reason
    cuda_backend._ops = lambda: ops
    cuda_backend.unavailable_reason = (
        lambda device: None if torch.device(device).type in devices else original_reason(device))
    try:
        yield cuda_backend
    finally:
        cuda_backend._ops, cuda_backend.unavailable_reason = saved


# ---- counting a model -----------------------------------------------------------------------------

def _model(depth, backend, device, memory_format, compiled=False):
    fused = backend not in ("eager", "compiled")
    net = preact_fused.preact_resnet(depth, block="bottleneck", fused=fused,
                                     backend=backend if fused else "auto").to(device, memory_format=memory_format)
    return (torch.compile(net) if compiled else net), net


def _windows(net, opt, x, y, count):
    """{window: count(fn)} for one training step: forward (with the loss), backward, optimizer.

    The optimizer is counted at its second step on the same gradients: with momentum buffers, as
    in every step of a run but the first.
    """
    state = {}

    def forward():
        state["loss"] = torch.nn.functional.cross_entropy(net(x), y)

    def backward():
        state["loss"].backward()

    counts = {}
    for phase, fn in (("forward", forward), ("backward", backward), ("optimizer", opt.step)):
        if phase == "optimizer" and not opt.state:
            opt.step()
        counts[phase] = count(fn)
    opt.zero_grad(set_to_none=True)
    return counts


def count_step(backend: str, depth: int, *, batch: int = 2, image: int = 32, device="cpu", warmup: int = 1,
               layout: str = "channels_last", emulator=None) -> dict:
    """Launches of one training step of the bottleneck CIFAR net of ``depth``.

    Returns {window: {"total": n, "by_name": {name: n}}} for forward, backward and optimizer.
    """
    device = torch.device(device)
    torch.manual_seed(0)
    memory_format = LAYOUTS[layout]
    net, plain = _model(depth, backend, device, memory_format, compiled=backend == "compiled")
    opt = torch.optim.SGD(plain.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    x = torch.randn(batch, 3, image, image, device=device).contiguous(memory_format=memory_format)
    y = torch.randint(0, 10, (batch,), device=device)
    if device.type == "cuda":
        count = cuda_kernel_count
    else:
        def count(fn):
            with LaunchCounter(emulator) as counter:
                fn()
            return {"total": counter.total, "by_name": dict(counter.by_name())}
    for _ in range(warmup):  # momentum buffers, autotuning, compilation: counted steps are steady ones
        _windows(net, opt, x, y, lambda fn: fn())
    return _windows(net, opt, x, y, count)


def _per_unit(low: dict, high: dict, units: int) -> dict:
    by_name = Counter(high["by_name"])
    by_name.subtract(low["by_name"])
    return {"total": (high["total"] - low["total"]) / units,
            "by_name": {k: v / units for k, v in sorted(by_name.items()) if v}}


def measure(backend: str, *, depths=(29, 38), batch=2, image=32, device="cpu", warmup=1, layout="channels_last",
            direct_1001=False) -> dict:
    """One row of the table: per-unit and ResNet-1001 launches of ``backend``, or why it cannot run."""
    device = torch.device(device)
    row = {"backend": backend, "reason": None}
    try:
        emulator = None
        context = contextlib.nullcontext()
        if backend in ("eager", "compiled"):
            if backend == "compiled" and device.type != "cuda":
                raise RuntimeError("torch.compile'd eager is counted on a GPU only")
        elif backend == "cuda" and device.type != "cuda":
            ops, emulator = build_emulated_cuda()
            context = emulated_cuda_backend(ops)
        else:
            reason = unavailable_reason(backend, device)
            if reason is not None:
                raise RuntimeError(reason)
        with context:
            counts = {d: count_step(backend, d, batch=batch, image=image, device=device, warmup=warmup,
                                    layout=layout, emulator=emulator) for d in depths}
            if direct_1001:
                counts[1001] = count_step(backend, 1001, batch=batch, image=image, device=device, warmup=warmup,
                                          layout=layout)
    except Exception as err:  # noqa: BLE001 - any failure to run becomes the row's reason
        row["reason"] = f"{type(err).__name__}: {err}".strip()
        return row
    low, high = depths
    units = 3 * ((high - low) // 9)
    n_low = 3 * ((low - 2) // 9)
    row["counts"] = {str(d): {w: c["total"] for w, c in windows.items()} for d, windows in counts.items()}
    row["per_unit"] = {}
    for window in WINDOWS:
        unit = _per_unit(counts[low][window], counts[high][window], units)
        fixed = counts[low][window]["total"] - n_low * unit["total"]
        row["per_unit"][window] = unit["by_name"]
        row[f"unit_{window}"] = unit["total"]
        row[f"fixed_{window}"] = fixed
        row[f"resnet1001_{window}"] = fixed + RESNET1001_UNITS * unit["total"]
    row["unit_step"] = row["unit_forward"] + row["unit_backward"]
    row["resnet1001_step"] = row["resnet1001_forward"] + row["resnet1001_backward"]
    if direct_1001:
        row["resnet1001_step_measured"] = counts[1001]["forward"]["total"] + counts[1001]["backward"]["total"]
    return row


def _fmt(v) -> str:
    if v is None:
        return "-"
    return f"{v:.0f}" if float(v).is_integer() else f"{v:.2f}"


def table(rows: list[dict]) -> str:
    """The markdown table of ``rows`` (from ``measure``)."""
    def cells(r):
        note = f"measured at 1001: {r['resnet1001_step_measured']}" if "resnet1001_step_measured" in r else ""
        return [_fmt(r["unit_forward"]), _fmt(r["unit_backward"]), _fmt(r["unit_step"]),
                _fmt(r["fixed_forward"] + r["fixed_backward"]), _fmt(r["resnet1001_step"]),
                _fmt(r["resnet1001_optimizer"])], note

    return backend_table(["unit fwd", "unit bwd", "unit fwd+bwd", "fixed fwd+bwd", "ResNet-1001 step (fwd+bwd)",
                          "optimizer step (ResNet-1001)"], rows, cells)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    on_gpu = torch.cuda.is_available()
    parser.add_argument("--backends", nargs="+", default=list(GPU_BACKENDS if on_gpu else BACKENDS),
                        choices=GPU_BACKENDS, help="what to count (default: all; 'compiled' on a GPU only)")
    parser.add_argument("--depths", nargs=2, type=int, default=[29, 38], metavar=("LOW", "HIGH"),
                        help="two bottleneck CIFAR depths 9n+2 (default 29 38: 3 and 4 units per stage)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--image", type=int, default=32 if on_gpu else 8,
                        help="image height and width (default 32 on a GPU, 8 on a CPU: the Triton interpreter "
                             "and the emulator are slow, and the counts do not depend on it)")
    parser.add_argument("--layout", choices=sorted(LAYOUTS), default="channels_last",
                        help="memory format of the model and its input (default channels_last)")
    parser.add_argument("--warmup", type=int, default=1, help="uncounted steps before the counted one")
    parser.add_argument("--device", default="cuda" if on_gpu else "cpu")
    parser.add_argument("--direct-1001", action="store_true", default=None,
                        help="also count a real ResNet-1001 step (default on a GPU)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON file (default {DEFAULT_OUT})")
    args = parser.parse_args(argv)
    low, high = args.depths
    if low % 9 != 2 or high % 9 != 2 or high <= low or low < 11:
        parser.error("--depths: two bottleneck depths 9n+2 (n >= 1), the second larger")
    device = torch.device(args.device)
    direct = device.type == "cuda" if args.direct_1001 is None else args.direct_1001
    method = ("CUDA profiler: kernel and memset/memcpy events" if device.type == "cuda" else
              "CPU proxy: ATen ops that launch a kernel on a GPU + Triton (interpreter) and emulated CUDA "
              "kernel launches (benchmarks/launches.py docstring)")
    rows = []
    record = {"command": command_line("benchmarks.launches", argv),
              "environment": environment(device), "method": method,
              "config": {"depths": [low, high], "batch": args.batch, "image": args.image, "dtype": "float32",
                         "layout": args.layout,
                         "warmup": args.warmup, "resnet1001_units": RESNET1001_UNITS},
              "rows": rows}
    for backend in args.backends:
        rows.append(measure(backend, depths=(low, high), batch=args.batch, image=args.image, device=device,
                            warmup=args.warmup, layout=args.layout, direct_1001=direct))
        print(f"{backend}: " + ("done" if rows[-1]["reason"] is None else rows[-1]["reason"]), file=sys.stderr)
        write_json_atomic(args.out, record)  # after each backend: a run cut off keeps what it counted
    print(f"Kernel launches ({method}); batch {args.batch}, {args.image}x{args.image}, float32, {args.layout}, "
          f"per unit = (depth {high} - depth {low}) / {3 * ((high - low) // 9)} units")
    print(table(rows))
    print(f"wrote {args.out}")
    return rows


if __name__ == "__main__":
    main()
