"""Kernel launches prepared once per problem: the host work of a launch done on its first call.

A launch's arguments are the call's tensors (its inputs and its new outputs) and everything else:
sizes, strides, flags, placeholders for pointers the kernel does not dereference, the semaphores, the
tile configuration, the grid. Everything else depends only on the problem: the shapes, strides,
dtypes and 16-byte alignment of the tensors, the op's other arguments, the device and its current
stream. So each op builds a ``Plan`` once per problem (``launch`` keeps them by key) and a call only
allocates its outputs and launches with its own tensors. At ResNet-1001's sizes the preparation
costs more host time than most of the kernels take on a GPU.

On a GPU a plan also keeps the compiled kernel that Triton's launcher returns on the plan's first
launch, and later launches call it as that launcher does once it has bound the arguments (the
compiled kernel's ``run`` with the grid, stream, function, metadata and launch hooks, then every
argument in order). Triton's per-launch argument binding, specialisation and cache lookup then run
once per problem. This is exact because the key holds every fact Triton specialises a compiled
kernel on: integer arguments by value (they are sizes and strides, in the key), the dtype and the
16-byte alignment of every pointer (new outputs come aligned from the allocator; placeholders are
the plan's own).
"""
from __future__ import annotations

import warnings

import torch

# Plans kept at most (a cache of problems; a model has a few dozen).
_MAX_PLANS = 4096
_plans: dict[tuple, Plan] = {}


class Slot(int):
    """A kernel argument that is the call's tensor of this index (inputs first, then outputs)."""


def pointer(tensors, index: int, dummy: torch.Tensor):
    """The kernel argument for ``tensors[index]``: its Slot; ``dummy`` when the tensor is absent; a
    one-element tensor of its dtype when it is empty (pointers the kernel does not dereference; the
    dtype is what the kernel is specialised for)."""
    t = tensors[index]
    if t is None:
        return dummy
    return Slot(index) if t.numel() else t.new_empty(1)


def resolved(kwargs: dict, tensors) -> dict:
    """``kwargs`` with each Slot replaced by the call's tensor it names."""
    return {k: tensors[v] if type(v) is Slot else v for k, v in kwargs.items()}


def _described(tensors) -> tuple:
    """The part of a problem's key its tensors give: shape, strides, dtype, 16-byte alignment."""
    return tuple([None if t is None else (t.shape, t.stride(), t.dtype, t.data_ptr() % 16 == 0) for t in tensors])


_raw_stream = None


def current_stream(device: torch.device) -> int | None:
    """The raw handle of ``device``'s current CUDA stream (Triton's launcher reads the same one);
    None for other devices."""
    global _raw_stream
    if device.type != "cuda":
        return None
    if _raw_stream is None:
        from triton.runtime.driver import driver
        _raw_stream = driver.active.get_current_stream
    return _raw_stream(device.index)


def launch(problem: tuple, build, inputs: tuple, device: torch.device) -> list[torch.Tensor]:
    """Launch the plan of ``problem`` (built by ``build()`` on its first call) on ``inputs``; the
    outputs it allocated.

    problem: the op's name and every argument the plan depends on besides the tensors (which
    ``inputs`` describe); build: () -> Plan; inputs: the op's tensors (None for an absent one), in
    the order of the plan's Slots; device: where the outputs go (the inputs' device).
    """
    stream = current_stream(device)
    key = (problem, device, stream, _described(inputs))
    plan = _plans.get(key)
    if plan is None:
        plan = build()
        if plan.keep:
            if len(_plans) >= _MAX_PLANS:
                _plans.clear()
            _plans[key] = plan
    return plan(inputs, device, stream)


class Plan:
    """One kernel's launch for one problem: every argument except the call's tensors, the grid, the
    options, and the layouts of the outputs a call allocates.

    fn: the ``@triton.jit`` function (its interpreted form under the interpreter); kwargs: every
    argument of ``fn`` by name, a ``Slot`` for each of the call's tensors, without the block sizes
    of the configuration; outputs: example tensors of the outputs (shapes, strides, dtypes; indexed
    after the inputs; None for an output this problem does not have); grid: the program grid of a
    configuration's block sizes, (meta) -> tuple; config: the ``triton.Config`` (block sizes, warps,
    stages), or None when ``tune`` chooses it on the first call: tune(arguments by name) launches
    the kernel and returns the configuration; keep: whether the plan may serve later calls (False
    for a configuration chosen as a stopgap).
    """

    def __init__(self, fn, kwargs: dict, outputs, grid, config=None, tune=None, keep: bool = True):
        self._fn, self._kwargs, self._grid_of, self._tune, self.keep = fn, kwargs, grid, tune, keep
        self._outputs = [None if t is None else (tuple(t.shape), t.stride(), t.dtype) for t in outputs]
        self._compiled = None
        if config is not None:
            self._configure(config)

    def _configure(self, config) -> None:
        kwargs = {**self._kwargs, **config.kwargs}
        self._values = [kwargs[name] for name in self._fn.arg_names]
        self._slots = [(pos, v) for pos, v in enumerate(self._values) if type(v) is Slot]
        self._grid = (tuple(self._grid_of(config.kwargs)) + (1, 1))[:3]
        self._options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
        self._tune = None

    def __call__(self, inputs: tuple, device: torch.device, stream: int | None) -> list[torch.Tensor]:
        outputs = [None if spec is None else torch.empty_strided(spec[0], spec[1], dtype=spec[2], device=device)
                   for spec in self._outputs]
        tensors = (*inputs, *outputs)
        if self._tune is not None:  # the first call of the problem times the configurations
            self._configure(self._tune(resolved(self._kwargs, tensors)))
            return outputs
        args = self._values.copy()
        for pos, index in self._slots:
            args[pos] = tensors[index]
        if self._compiled is not None and _direct_launches:
            try:
                self._compiled(self._grid, stream, args)
                return outputs
            except TypeError as err:  # arguments refused before any launch: a Triton this code does not know
                _stop_direct_launches(err)
        compiled = self._fn[self._grid](*args, **self._options)
        if compiled is not None and _direct_launches:  # a GPU launch (the interpreter returns nothing)
            try:
                self._compiled = _Compiled(compiled)
            except AttributeError as err:
                _stop_direct_launches(err)
        return outputs


_direct_launches = True


def _stop_direct_launches(err: Exception) -> None:
    """Launch through Triton's own launcher from now on, with one warning."""
    global _direct_launches
    _direct_launches = False
    import triton

    warnings.warn(f"preact_fused: launching compiled Triton kernels directly failed under Triton "
                  f"{triton.__version__} ({type(err).__name__}: {err}); every launch now goes through "
                  f"Triton's launcher (slower on the host, same results)", RuntimeWarning, stacklevel=3)


class _Compiled:
    """A compiled kernel launched as Triton's own launcher launches it, after its argument binding."""

    def __init__(self, kernel):
        from triton import knobs

        self._kernel, self._hooks = kernel, knobs.runtime
        self._run, self._function, self._metadata = kernel.run, kernel.function, kernel.packed_metadata

    def __call__(self, grid, stream, args) -> None:
        enter, leave = _hook(self._hooks.launch_enter_hook), _hook(self._hooks.launch_exit_hook)
        metadata = None if enter is None else self._kernel.launch_metadata(grid, stream, *args)
        self._run(grid[0], grid[1], grid[2], stream, self._function, self._metadata, metadata, enter, leave, *args)


def _hook(hook):
    """A launch hook, or None for none: Triton's hook chains are never None, and an empty one calls
    nothing (the launcher then skips building the launch metadata and calling the chains)."""
    return None if hook is None or getattr(hook, "calls", True) == [] else hook
