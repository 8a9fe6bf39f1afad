"""The Triton backend's prepared launches (preact_fused/triton/launch.py): one plan per problem, the
call's own tensors in every launch, a new plan where Triton would specialise differently, and the
direct launch of a compiled kernel exactly as Triton's own launcher makes it.

Without a GPU the kernels run under the Triton interpreter; the direct launch is checked against
Triton's ``CompiledKernel`` launcher code on a stand-in kernel object (a GPU runs it for real in
every other test). Expected values come from the reference backend in float64; the interpreter's
float32 results agree to 1e-5 (relative).
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

pytest.importorskip("triton")

import preact_fused.triton as triton_ops  # noqa: E402
from preact_fused import reference  # noqa: E402
from preact_fused.triton import launch  # noqa: E402

from backend_checks import rel_error  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
F32 = torch.float32
TOL = 1e-5

pytestmark = [
    pytest.mark.triton_interp,
    pytest.mark.usefixtures("exact_cudnn"),
    pytest.mark.skipif(triton_ops.unavailable_reason(DEVICE) is not None,
                       reason=f"triton backend unavailable: {triton_ops.unavailable_reason(DEVICE)}"),
]


@pytest.fixture
def plans(monkeypatch):
    """The plans made inside the test (none kept from other tests)."""
    fresh = {}
    monkeypatch.setattr(launch, "_plans", fresh)
    return fresh


def _rand(*shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def _cl(t):
    return t.to(DEVICE, F32).contiguous(memory_format=torch.channels_last)


def _misaligned(t):
    """t's values and strides in a view that starts 4 bytes into its storage (not 16-byte aligned)."""
    storage = torch.empty(t.untyped_storage().nbytes() // t.element_size() + 1, dtype=t.dtype, device=t.device)
    view = storage[1:].as_strided(t.shape, t.stride())
    view.copy_(t)
    assert view.data_ptr() % 16 != 0
    return view


def _expected_conv(x, w, stats, residual):
    x64, w64 = x.double().cpu(), w.double().cpu()
    fold = reference.bn_fold(stats.double().cpu())
    y, _, _ = reference.conv_fwd(x64, w64, 2, 1, fold=fold, residual=residual.double().cpu())
    return y


def test_a_problem_is_prepared_once_and_each_layout_or_alignment_again(plans):
    """Calls of one problem share a plan and still get new outputs computed from their own inputs;
    another memory format or a misaligned view of the same shape is another problem (Triton
    specialises on strides and on 16-byte alignment), each exact."""
    w = _rand(6, 5, 3, 3, seed=9).to(DEVICE, F32)

    def run(x, residual):
        stats = triton_ops.bn_stats(x)
        y, _, _ = triton_ops.conv_fwd(x, w, 2, 1, stats=stats, residual=residual)
        assert rel_error(y, _expected_conv(x, w, stats, residual)) < TOL
        return y

    inputs = [(_cl(_rand(2, 5, 9, 9, seed=s)), _cl(_rand(2, 6, 5, 5, seed=s + 1))) for s in (1, 3)]
    first, second = (run(*pair) for pair in inputs)
    assert len(plans) == 2  # bn_stats and conv_fwd
    assert first.data_ptr() != second.data_ptr() and not torch.equal(first, second)
    x, residual = inputs[1]
    run(x.contiguous(), residual)  # NCHW input: other strides
    assert len(plans) == 4
    run(_misaligned(x), _misaligned(residual))
    assert len(plans) == 6


def test_a_plan_takes_each_tensor_from_its_own_argument(plans):
    """A plan first made for a call passing one tensor as three arguments (g, x and the residual
    gradient of bn_backward) reads three different tensors on the next call."""
    x = _cl(_rand(2, 7, 5, 5, seed=1) + 0.5)
    fold = reference.bn_fold(reference.bn_stats(x.double().cpu())).to(DEVICE, F32)
    sums = _rand(3, 7, seed=2).to(DEVICE, F32)
    count = 2 * 5 * 5
    triton_ops.bn_backward(x, x, fold, sums, count, True, x)
    g, x2, d_residual = (_cl(_rand(2, 7, 5, 5, seed=s)) for s in (3, 4, 5))
    dx = triton_ops.bn_backward(g, x2, fold, sums, count, True, d_residual)
    expected = reference.bn_backward(g.double().cpu(), x2.double().cpu(), fold.double().cpu(), sums.double().cpu(),
                                     count, True, d_residual.double().cpu())
    assert len(plans) == 1 and rel_error(dx, expected) < TOL


class _StandIn:
    """A compiled kernel's launch-facing attributes, recording each launch's arguments."""

    def __init__(self, fail=False):
        from triton.compiler.compiler import CompiledKernel

        self.launches, self.fail = [], fail
        self.function, self.packed_metadata, self.src, self.name = object(), ("metadata",), None, "_stand_in_kernel"
        self.launch_metadata = CompiledKernel.launch_metadata.__get__(self)
        self.tritons_runner = CompiledKernel.__getitem__.__get__(self)

    def _init_handles(self):
        pass

    @property
    def run(self):
        def launcher(*args):
            if self.fail:
                raise TypeError("function takes exactly 60 arguments")
            self.launches.append(args)
        return launcher


def test_a_direct_launch_is_tritons_own(monkeypatch):
    """``_Compiled`` calls the kernel's launcher with the arguments Triton's own ``CompiledKernel``
    launcher (``kernel[grid](*args)``) passes: grid, stream, function, metadata, launch hooks, then
    every kernel argument in order; with no launch hook installed, no launch metadata and no hooks
    (Triton passes its empty hook chains, which call nothing)."""
    from triton import knobs

    args = [torch.zeros(3), 7, 0.5, None, "ieee"]

    def both():
        kernel = _StandIn()
        kernel.tritons_runner((4, 2, 1))(*args, stream=11)
        launch._Compiled(kernel)((4, 2, 1), 11, args)
        return kernel.launches

    tritons, ours = both()
    assert ours[:6] == tritons[:6] and ours[6:9] == (None, None, None) and ours[9:] == tritons[9:]
    assert len(ours) == 9 + len(args)
    chain = knobs.HookChain()
    chain.add(lambda metadata: None)
    monkeypatch.setattr(knobs.runtime, "launch_enter_hook", chain)
    tritons, ours = both()
    assert ours[:6] == tritons[:6] and ours[7] is tritons[7] is chain and ours[8] is None and ours[9:] == tritons[9:]
    assert ours[6].data == tritons[6].data and ours[6].data["name"] == "_stand_in_kernel"


class _StandInFunction:
    """A jit function: ``fn[grid](*args, **options)`` records the launch and returns ``compiled``."""
    arg_names = ["x_ptr", "n"]

    def __init__(self, compiled):
        self.compiled, self.launches = compiled, []

    def __getitem__(self, grid):
        def launch_(*args, **options):
            self.launches.append((grid, args, options))
            return self.compiled
        return launch_


def test_a_refused_direct_launch_falls_back_with_one_warning(monkeypatch):
    """A launcher that refuses the direct call's arguments (a Triton whose launcher differs) makes
    every later launch go through Triton's own launcher, after one warning."""
    import triton

    monkeypatch.setattr(launch, "_direct_launches", True)
    fn = _StandInFunction(_StandIn(fail=True))
    plan = launch.Plan(fn, {"x_ptr": launch.Slot(0), "n": 3}, (), lambda meta: (2,), triton.Config({}, num_warps=4))
    a, b, c = torch.zeros(3), torch.ones(3), torch.full((3,), 2.0)
    plan((a,), torch.device("cpu"), None)
    with pytest.warns(RuntimeWarning, match="directly failed"):
        plan((b,), torch.device("cpu"), None)
    plan((c,), torch.device("cpu"), None)
    assert len(fn.launches) == 3 and all(args[0] is t for (_, args, _), t in zip(fn.launches, (a, b, c)))
    assert fn.launches[0][0] == (2, 1, 1)
    assert fn.launches[0][2] == {"num_warps": 4, "num_stages": 3} and not launch._direct_launches
