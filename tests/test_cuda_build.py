"""The CUDA extension on a machine without a GPU: built, loadable, registered, and its kernels emulated.

CI builds the extension (``pip install --no-build-isolation -e .`` with nvcc and a CUDA build of
torch) on CPU-only machines; these tests check what can be checked there: the library loads
without a GPU and without initialising CUDA, each schema is the contract's (preact_fused/contract.py),
the fake (meta) implementations give the shapes and strides the kernels produce, and a missing
build or an unsupported dtype gives an error that says what to do. Last, the kernel sources
themselves run on the CPU under a small emulator (csrc/emulate/: blocks one after another, the
threads of a block as fibers in forward, reverse or shuffled order between barriers) against the
reference (preact_fused/reference.py) in float64, one emulated kernel launch per op call.

The contract checks (``check_*``) take the backend module and a device, so the GPU tests
(tests/test_cuda_backend.py) run the same ones on the real kernels.
"""
from __future__ import annotations

import contextlib
import inspect
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch

import preact_fused.cuda as cuda_backend
from preact_fused import contract, reference

# ---- the contract checks -------------------------------------------------------------------------


@dataclass(frozen=True)
class ConvCase:
    n: int
    cin: int
    cout: int
    h: int
    w: int
    k: int
    stride: int

    @property
    def padding(self) -> int:
        return self.k // 2

    @property
    def out_hw(self) -> tuple[int, int]:
        return (contract.conv_output_size(self.h, self.k, self.stride, self.padding),
                contract.conv_output_size(self.w, self.k, self.stride, self.padding))

    def __str__(self) -> str:
        return f"n{self.n}-c{self.cin}x{self.cout}-{self.h}x{self.w}-k{self.k}s{self.stride}"


# Odd sizes: C in {3, 17, 64}, H=W in {7, 8, 9}, stride 1 and 2, 1x1 and 3x3, batch 1 and 3.
ODD_CASES = [
    ConvCase(1, 3, 17, 7, 7, 3, 1),
    ConvCase(3, 17, 3, 9, 9, 3, 2),
    ConvCase(1, 17, 64, 8, 8, 1, 1),
    ConvCase(3, 64, 17, 9, 9, 1, 2),
    ConvCase(3, 64, 64, 7, 7, 3, 2),
    ConvCase(1, 3, 3, 8, 8, 3, 1),
]
# 18,432 rows: 144 row tiles of 128 (at least a wave of 132 multiprocessors, so 128-row tiles),
# 5 groups of 32 tiles in the in-launch trees, the last one partial.
MANY_TILES = ConvCase(2, 16, 16, 96, 96, 1, 1)
LAYOUTS = ("nchw", "channels_last", "noncontiguous")
# The BatchNorm forms of conv_fwd's loader (contract.py): summary (with and without the running
# update, momentum and cumulative), an earlier fold, running statistics, none.
BN_FORMS = ("stats", "stats_update", "stats_cumulative", "fold", "running", "none")
RTOL = {torch.float32: 1e-4}


def layout(t: torch.Tensor, name: str) -> torch.Tensor:
    """t [N, C, H, W] in the named memory layout (same values)."""
    if name == "nchw":
        return t.contiguous()
    if name == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if name == "noncontiguous":  # every other column of a wider tensor
        wide = torch.zeros(*t.shape[:3], 2 * t.shape[3], dtype=t.dtype, device=t.device)
        wide[..., ::2] = t
        return wide[..., ::2]
    raise ValueError(name)


@contextlib.contextmanager
def poisoned_allocations(device):
    """On CUDA, the caching allocator's free memory NaN-filled, so an unwritten output shows. (The
    emulated ops fill every output they allocate with NaN themselves.)"""
    if torch.device(device).type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        block = torch.empty(min(free // 4, 1 << 30) // 4, dtype=torch.float32, device=device)
        block.fill_(float("nan"))
        del block
    yield


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    expected = expected.detach().to(torch.float64).cpu()
    diff = (actual.detach().to(torch.float64).cpu() - expected).abs().max().item() if expected.numel() else 0.0
    return diff / max(expected.abs().max().item() if expected.numel() else 0.0, 1e-30)


def assert_close(name, actual, expected64, dtype, same_dtype=None):
    """actual vs the float64 result: fp32 within 1e-4 of the largest magnitude; bf16 / fp16 within
    twice the error of the reference run in that dtype (``same_dtype``) plus 1e-3."""
    assert tuple(actual.shape) == tuple(expected64.shape), f"{name}: shape {tuple(actual.shape)} != {tuple(expected64.shape)}"
    assert torch.isfinite(actual).all(), f"{name}: non-finite values (unwritten output?)"
    err = rel_error(actual, expected64)
    bound = RTOL[torch.float32] if dtype == torch.float32 else 2 * rel_error(same_dtype, expected64) + 1e-3
    assert err <= bound, f"{name}: relative error {err:.3e} > {bound:.1e} ({dtype})"


def make_inputs(case: ConvCase, dtype, seed=0):
    """Random inputs of a case. Activations: float64 values representable in dtype; weight: float32
    (the master weight); BN vectors and the summary of x: float32."""
    g = torch.Generator().manual_seed(seed)
    ho, wo = case.out_hw

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    def act(t):
        return t.to(dtype).to(torch.float64)

    x = act(rand(case.n, case.cin, case.h, case.w) * 2 + 0.5)
    return {
        "x": x, "w": (rand(case.cout, case.cin, case.k, case.k) / case.k).float(),
        "gamma": (rand(case.cin) * 0.5 + 1).float(), "beta": (rand(case.cin) * 0.5).float(),
        "running_mean": (rand(case.cin) * 0.5).float(), "running_var": (torch.rand(case.cin, generator=g) + 0.5).float(),
        "residual": act(rand(case.n, case.cout, ho, wo)), "dy": act(rand(case.n, case.cout, ho, wo)),
        "stats": reference.bn_stats(x.to(dtype)),
    }


def _weight(w, dtype, device, layout_name):
    """The weight an op gets: the float32 master, or (with the non-contiguous activations) a
    channels_last weight in the activation dtype (read as it is, like any float dtype / layout)."""
    if layout_name == "noncontiguous":
        return w.to(device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
    return w.to(device)


def _dev(t, device, dtype=None, layout_name=None):
    t = t.to(device=device, dtype=dtype or t.dtype)
    return layout(t, layout_name) if layout_name is not None else t


def bn_arguments(form, t, device):
    """conv_fwd's BN keyword arguments of a form, on device (fresh running buffers each call)."""
    if form == "none":
        return {}
    if form == "fold":
        return {"fold": reference.bn_fold(t["stats"], t["gamma"], t["beta"]).to(device)}
    running = {"running_mean": t["running_mean"].clone().to(device), "running_var": t["running_var"].clone().to(device)}
    if form == "running":
        return {"gamma": t["gamma"].to(device), "beta": t["beta"].to(device), **running}
    kw = {"stats": t["stats"].to(device), "gamma": t["gamma"].to(device), "beta": t["beta"].to(device)}
    if form == "stats":
        return kw
    return {**kw, **running, "num_batches_tracked": torch.tensor(5, device=device), "update_running": True,
            "momentum": None if form == "stats_cumulative" else 0.1}


def _cpu64(kw):
    return {k: (v.cpu().double() if isinstance(v, torch.Tensor) and v.is_floating_point() else
                (v.cpu() if isinstance(v, torch.Tensor) else v)) for k, v in kw.items()}


def check_conv_fwd(ops, case, dtype, device, layout_name="channels_last", form="stats", with_residual=True,
                   want_stats=True):
    """conv_fwd against the float64 reference: y, the summary of y as stored, the fold it
    computed, the running statistics it updated."""
    t = make_inputs(case, dtype)
    x = _dev(t["x"], device, dtype, layout_name)
    res = _dev(t["residual"], device, dtype, layout_name) if with_residual else None
    kw = bn_arguments(form, t, device)
    with poisoned_allocations(device):
        y, y_stats, fold = ops.conv_fwd(x, _weight(t["w"], dtype, device, layout_name), case.stride, case.padding,
                                        **kw, residual=res, want_stats=want_stats)
    kw64 = _cpu64(bn_arguments(form, t, "cpu"))
    y64, _, fold64 = reference.conv_fwd(t["x"], t["w"].double(), case.stride, case.padding, **kw64,
                                        residual=t["residual"] if with_residual else None)
    same = reference.conv_fwd(x.cpu(), t["w"], case.stride, case.padding, **bn_arguments(form, t, "cpu"),
                              residual=None if res is None else res.cpu())[0]
    assert_close("conv_fwd y", y, y64, dtype, same)
    assert y.dtype == dtype and y.is_contiguous(memory_format=torch.channels_last) == contract.is_channels_last(x)
    if form in ("none", "fold"):
        assert fold is None
    else:
        assert fold.dtype == torch.float32 and fold.shape == (4, case.cin)
        assert_close("conv_fwd fold", fold, fold64, torch.float32)
    if form in ("stats_update", "stats_cumulative"):
        for name in ("running_mean", "running_var"):
            assert_close(f"conv_fwd {name}", kw[name], kw64[name], torch.float32)
        assert kw["num_batches_tracked"].item() == 6
    elif "running_mean" in kw:
        assert torch.equal(kw["running_mean"].cpu(), t["running_mean"]), "running statistics changed"
    if not want_stats:
        assert y_stats is None
        return y
    check_summary("conv_fwd stats", y_stats, y)
    return y


def check_summary(name, stats, t):
    """A summary [4, C] of t as stored: exact count, the first NHWC row as pivot, mean and M2."""
    assert stats.dtype == torch.float32 and stats.shape == (4, t.shape[1])
    want = reference.bn_stats(t.detach().cpu().double())
    got = stats.cpu().double()
    assert torch.equal(got[contract.COUNT], want[contract.COUNT]), f"{name}: counts"
    assert torch.equal(got[contract.PIVOT], want[contract.PIVOT]), f"{name}: pivot is not the first row"
    mean = lambda s: s[contract.PIVOT] + s[contract.OFFSET]
    scale = want[contract.M2].div(want[contract.COUNT]).sqrt().max().item() + mean(want).abs().max().item()
    assert (mean(got) - mean(want)).abs().max().item() <= 1e-5 * scale, f"{name}: mean"
    assert_close(f"{name} M2", got[contract.M2], want[contract.M2], torch.float32)


def check_bn_stats(ops, shape, dtype, device, layout_name="channels_last", offset=0.0):
    g = torch.Generator().manual_seed(1)
    c = shape[1]
    x64 = torch.randn(shape, generator=g, dtype=torch.float64) * 0.5 + offset + torch.arange(c, dtype=torch.float64)[:, None, None]
    x = layout(x64.to(device=device, dtype=dtype), layout_name)
    with poisoned_allocations(device):
        stats = ops.bn_stats(x)
    check_summary("bn_stats", stats, x)
    return stats


def check_bn_fold(ops, c, device, stats_form=True, update=True, momentum=0.1, affine=True):
    """bn_fold of a summary (with the running update) or of the running statistics."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, c, 5, 5, generator=g) * 0.7 + 3
    t = {"stats": reference.bn_stats(x), "gamma": torch.rand(c, generator=g) + 0.5 if affine else None,
         "beta": torch.randn(c, generator=g) if affine else None, "running_mean": torch.randn(c, generator=g),
         "running_var": torch.rand(c, generator=g) + 0.5, "num_batches_tracked": torch.tensor(2)}
    kw = {k: (None if v is None else v.clone().to(device)) for k, v in t.items()}
    kw64 = _cpu64({k: (None if v is None else v.clone()) for k, v in t.items()})
    if not stats_form:
        kw["stats"] = kw64["stats"] = None
    args = dict(eps=1e-5, momentum=momentum, update_running=update)
    with poisoned_allocations(device):
        fold = ops.bn_fold(**kw, **args)
    fold64 = reference.bn_fold(**kw64, **args)
    assert fold.shape == (4, c) and fold.dtype == torch.float32
    assert_close("bn_fold", fold, fold64, torch.float32)
    if stats_form and update:
        assert_close("bn_fold running_mean", kw["running_mean"], kw64["running_mean"], torch.float32)
        assert_close("bn_fold running_var", kw["running_var"], kw64["running_var"], torch.float32)
        assert kw["num_batches_tracked"].item() == 3
    else:
        assert torch.equal(kw["running_mean"].cpu(), t["running_mean"])
        assert kw["num_batches_tracked"].item() == 2


def _fold_of(t):
    return reference.bn_fold(t["stats"], t["gamma"], t["beta"])


def check_conv_dgrad(ops, case, dtype, device, layout_name="channels_last", with_fold=True):
    t = make_inputs(case, dtype)
    fold = _fold_of(t) if with_fold else None
    dy = _dev(t["dy"], device, dtype, layout_name)
    x = _dev(t["x"], device, dtype, layout_name)
    with poisoned_allocations(device):
        g, sums = ops.conv_dgrad(dy, _weight(t["w"], dtype, device, layout_name), x, case.stride, case.padding,
                                 None if fold is None else fold.to(device))
    fold64 = None if fold is None else fold.double()
    g64, sums64 = reference.conv_dgrad(t["dy"], t["w"].double(), t["x"], case.stride, case.padding, fold64)
    same = reference.conv_dgrad(dy.cpu(), t["w"], x.cpu(), case.stride, case.padding, fold)
    assert_close("conv_dgrad g", g, g64, dtype, same[0])
    assert g.dtype == dtype and g.is_contiguous(memory_format=torch.channels_last) == contract.is_channels_last(dy)
    if fold is None:
        assert sums is None
        return g, None
    assert sums.shape == (3, case.cin) and sums.dtype == torch.float32
    for i, name in enumerate(("sum_g", "sum_gx", "dgamma")):
        bound = same[1][i] if dtype != torch.float32 else None
        assert_close(f"conv_dgrad {name}", sums[i], sums64[i], dtype, bound)
    return g, sums


def check_conv_wgrad(ops, case, dtype, device, layout_name="channels_last", with_fold=True):
    t = make_inputs(case, dtype)
    fold = _fold_of(t) if with_fold else None
    x = _dev(t["x"], device, dtype, layout_name)
    dy = _dev(t["dy"], device, dtype, layout_name)
    weight = t["w"].float().to(device)
    if layout_name == "channels_last":  # dW comes back in the weight's memory format
        weight = weight.contiguous(memory_format=torch.channels_last)
    with poisoned_allocations(device):
        dw = ops.conv_wgrad(x, dy, weight, case.stride, case.padding, None if fold is None else fold.to(device))
    dw64 = reference.conv_wgrad(t["x"], t["dy"], t["w"], case.stride, case.padding,
                                None if fold is None else fold.double())
    same = reference.conv_wgrad(x.cpu(), dy.cpu(), t["w"], case.stride, case.padding, fold)
    assert dw.dtype == torch.float32 and dw.stride() == weight.stride()
    assert_close("conv_wgrad dw", dw, dw64, dtype, same)
    return dw


def check_bn_backward(ops, shape, dtype, device, layout_name="channels_last", training=True, with_residual=True):
    gen = torch.Generator().manual_seed(2)
    x64 = (torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + 0.5).to(dtype).double()
    g64 = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype).double()
    r64 = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype).double()
    c = shape[1]
    stats = reference.bn_stats(x64.float())
    fold = reference.bn_fold(stats, torch.rand(c, generator=gen) + 0.5, torch.randn(c, generator=gen))
    _, sums = reference.masked_grad_and_sums(g64, x64, fold.double())
    sums = sums.float()
    count = float(x64.numel() // c)
    dev = lambda t: layout(t.to(device=device, dtype=dtype), layout_name)
    with poisoned_allocations(device):
        dx = ops.bn_backward(dev(g64), dev(x64), fold.to(device), sums.to(device), count, training,
                             dev(r64) if with_residual else None)
    dx64 = reference.bn_backward(g64, x64, fold.double(), sums.double(), count, training,
                                 r64 if with_residual else None)
    same = reference.bn_backward(g64.to(dtype), x64.to(dtype), fold, sums, count, training,
                                 r64.to(dtype) if with_residual else None)
    assert dx.dtype == dtype
    assert_close("bn_backward dx", dx, dx64, dtype, same)


def check_nan_propagation(ops, device, dtype=torch.float32):
    """A NaN in x: P(x) keeps it (NaN outputs wherever the reference has them, the rest right);
    the dgrad mask passes it (g = da there) and sum_gx becomes NaN, as in the reference."""
    case = ConvCase(2, 17, 8, 9, 9, 3, 1)
    t = make_inputs(case, dtype)
    t["x"][0, 3, 4, 5] = float("nan")
    t["x"][1, 16, 0, 0] = float("nan")
    fold = _fold_of(t)
    x = _dev(t["x"], device, dtype, "channels_last")
    y, _, _ = ops.conv_fwd(x, t["w"].to(device), 1, 1, fold=fold.to(device))
    y64, _, _ = reference.conv_fwd(t["x"], t["w"].double(), 1, 1, fold=fold.double())
    nan = torch.isnan(y64)
    assert nan.any() and torch.equal(torch.isnan(y.cpu()), nan)
    assert_close("conv_fwd y (finite part)", y.cpu()[~nan], y64[~nan], torch.float32)
    dy = _dev(t["dy"], device, dtype, "channels_last")
    g, sums = ops.conv_dgrad(dy, t["w"].to(device), x, 1, 1, fold.to(device))
    g64, sums64 = reference.conv_dgrad(t["dy"], t["w"].double(), t["x"], 1, 1, fold.double())
    assert_close("conv_dgrad g (NaN in x)", g, g64, torch.float32)
    assert torch.equal(torch.isnan(sums.cpu()), torch.isnan(sums64))
    assert_close("conv_dgrad sum_g (NaN in x)", sums[0], sums64[0], torch.float32)


def check_reruns_bit_identical(ops, device, dtype):
    """Every op twice on the same inputs: bitwise equal outputs (fixed-order reductions only)."""
    case = MANY_TILES
    t = make_inputs(case, dtype)
    fold = _fold_of(t).to(device)
    x = _dev(t["x"], device, dtype, "channels_last")
    dy = _dev(t["dy"], device, dtype, "channels_last")
    w = t["w"].to(device)
    calls = [
        lambda: ops.conv_fwd(x, w, 1, 0, stats=t["stats"].to(device), gamma=t["gamma"].to(device), want_stats=True),
        lambda: (ops.bn_stats(x),),
        lambda: ops.conv_dgrad(dy, w, x, 1, 0, fold),
        lambda: (ops.conv_wgrad(x, dy, w, 1, 0, fold),),
    ]
    for call in calls:
        first, second = call(), call()
        for a, b in zip(first, second):
            assert (a is None and b is None) or torch.equal(a, b)


def check_empty_batch(ops, device, dtype):
    """Zero-element inputs: no crash, empty activations, zero summaries / sums / dW."""
    x = torch.zeros(0, 5, 6, 6, device=device, dtype=dtype)
    w = torch.randn(4, 5, 3, 3, device=device)
    fold = torch.stack([torch.zeros(5), torch.ones(5), torch.ones(5), torch.zeros(5)]).to(device)
    y, y_stats, _ = ops.conv_fwd(x, w, 1, 1, fold=fold, want_stats=True)
    assert y.shape == (0, 4, 6, 6) and torch.equal(y_stats.cpu(), torch.zeros(4, 4))
    assert torch.equal(ops.bn_stats(x).cpu(), torch.zeros(4, 5))
    dy = torch.zeros(0, 4, 6, 6, device=device, dtype=dtype)
    g, sums = ops.conv_dgrad(dy, w, x, 1, 1, fold)
    assert g.shape == x.shape and torch.equal(sums.cpu(), torch.zeros(3, 5))
    assert torch.equal(ops.conv_wgrad(x, dy, w, 1, 1, fold).cpu(), torch.zeros(4, 5, 3, 3))
    assert ops.bn_backward(x, x, fold, torch.zeros(3, 5, device=device), 0.0, True).shape == x.shape


def opcheck_samples(dtype, device):
    """Arguments for torch.library.opcheck of each op, by name: every optional input both given and
    None, every BN form, running statistics updated in place with a momentum and cumulatively."""
    case = ConvCase(2, 16, 24, 9, 9, 3, 2)
    t = make_inputs(case, dtype)
    x = _dev(t["x"], device, dtype, "channels_last")
    dy = _dev(t["dy"], device, dtype, "channels_last")
    res = _dev(t["residual"], device, dtype, "channels_last")
    w = t["w"].to(device)
    st, gamma, beta = t["stats"].to(device), t["gamma"].to(device), t["beta"].to(device)
    fold = _fold_of(t).to(device)
    c = case.cin

    def running():
        return torch.zeros(c, device=device), torch.ones(c, device=device), torch.tensor(3, device=device)

    sums = torch.randn(3, c, device=device)
    return {
        "conv_fwd": [(x, w, 2, 1, st, None, gamma, beta, *running(), 1e-5, 0.1, True, res, True),
                     (x, w, 2, 1, st, None, None, None, *running(), 1e-5, None, True, None, False),
                     (x, w, 2, 1, None, fold, None, None, None, None, None, 1e-5, 0.1, False, res, True),
                     (x, w, 2, 1, None, None, gamma, beta, *running(), 1e-5, 0.1, False, None, True),
                     (x, w, 2, 1, None, None, None, None, None, None, None, 1e-5, 0.1, False, None, False)],
        "bn_stats": [(x,)],
        "bn_fold": [(st, gamma, beta, *running(), 1e-5, 0.1, True), (st, None, None, *running(), 1e-5, None, True),
                    (None, gamma, beta, *running(), 1e-5, 0.1, False)],
        "conv_dgrad": [(dy, w, x, 2, 1, fold), (dy, w, x, 2, 1, None)],
        "conv_wgrad": [(x, dy, list(w.shape), 2, 1, fold), (x, dy, list(w.shape), 2, 1, None)],
        "bn_backward": [(x, x, fold, sums, 162.0, True, x), (x, x, fold, sums, 162.0, False, None)],
    }


def check_compiled_unit(ops, device):
    """Two fused convs joined by their statistics (the second folds the first's summary),
    under torch.compile(fullgraph=True): no graph break, the eager result bit for bit."""
    case = ConvCase(4, 32, 32, 16, 16, 3, 1)
    t = make_inputs(case, torch.bfloat16)
    x = _dev(t["x"], device, torch.bfloat16, "channels_last")
    res = _dev(t["residual"], device, torch.bfloat16, "channels_last")

    def unit(x, w, stats, residual):
        y, y_stats, _ = ops.conv_fwd(x, w, 1, 1, stats=stats, residual=residual, want_stats=True)
        out, _, fold = ops.conv_fwd(y, w, 1, 1, stats=y_stats)
        g, sums = ops.conv_dgrad(out, w, y, 1, 1, fold)
        return out, g, sums

    args = (x, t["w"].to(device), t["stats"].to(device), res)
    compiled = torch.compile(unit, fullgraph=True, dynamic=False)
    for a, b in zip(compiled(*args), unit(*args)):
        assert torch.equal(a, b)


# ---- the extension: build, load, schemas -----------------------------------------------------------

def _build_expected() -> str | None:
    """Why the extension may legitimately be absent here, or None when it must have been built."""
    if os.environ.get("PREACT_FUSED_SKIP_CUDA_BUILD", "").strip().lower() in ("1", "true", "yes", "on"):
        return "PREACT_FUSED_SKIP_CUDA_BUILD is set: pure-Python install"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} has no CUDA support: pure-Python install"
    if shutil.which("nvcc") is None and not os.environ.get("CUDA_HOME"):
        return "no nvcc on PATH and no CUDA_HOME: pure-Python install"
    return None


@pytest.fixture(scope="module")
def ext():
    if not cuda_backend.is_built():
        reason = _build_expected()
        if reason is not None:
            pytest.skip(f"CUDA extension not built ({reason})")
        pytest.fail(f"nvcc and a CUDA build of torch are present but: {cuda_backend._state['error']}")
    return cuda_backend._load()


def _run(code: str, **env) -> str:
    full_env = dict(os.environ, **env)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_import_is_lean():
    """Importing the package (and the cuda backend module) neither loads the library nor CUDA."""
    code = ("import sys, torch, preact_fused, preact_fused.cuda, preact_fused.backend\n"
            "print('preact_fused._C' in sys.modules, torch.cuda.is_initialized())")
    assert _run(code) == "False False"


def test_extension_file_exists(ext):
    assert os.path.isfile(ext.__file__), ext.__file__
    assert os.path.dirname(ext.__file__) == os.path.dirname(cuda_backend.__file__)


def test_loads_without_a_gpu(ext):
    """Loading the library needs no GPU and does not initialise CUDA."""
    code = ("import torch, preact_fused.cuda as c\n"
            "c._load()\n"
            "print(hasattr(torch.ops.preact_fused, 'conv_fwd'), torch.cuda.is_initialized())")
    assert _run(code, CUDA_VISIBLE_DEVICES="") == "True False"


def test_built_against_running_torch(ext):
    running = tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2])
    assert (ext.torch_version_major, ext.torch_version_minor) == running
    if torch.version.cuda is not None:
        assert ext.cuda_runtime_version // 1000 == int(torch.version.cuda.split(".")[0])


@pytest.mark.parametrize("name", cuda_backend.OPS)
def test_schema_registered(ext, name):
    op = getattr(torch.ops.preact_fused, name).default
    assert str(op._schema) == f"preact_fused::{contract.SCHEMAS[name]}"
    for key in ("CUDA", "Meta"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"preact_fused::{name}", key), (name, key)
    assert not torch._C._dispatch_has_kernel_for_dispatch_key(f"preact_fused::{name}", "Autograd"), name


@pytest.mark.parametrize("name", cuda_backend.OPS)
def test_python_signatures_are_the_references(name):
    assert inspect.signature(getattr(cuda_backend, name)) == inspect.signature(getattr(reference, name))


def _meta(shape, dtype=torch.bfloat16, channels_last=True):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty(shape, dtype=dtype, device="meta", memory_format=fmt)


def check_fakes(ops):
    """The fakes of namespace ``ops`` (contract.register_fakes) on meta tensors."""
    x, w = _meta((3, 17, 9, 9)), torch.empty(5, 17, 3, 3, device="meta")
    s4 = torch.empty(4, 17, device="meta")
    vec = torch.empty(17, device="meta")
    y, y_stats, fold = ops.conv_fwd(x, w, 2, 1, s4, None, vec, vec, None, None, None, 1e-5, 0.1, False, None, True)
    assert y.shape == (3, 5, 5, 5) and y.is_contiguous(memory_format=torch.channels_last) and y.dtype == torch.bfloat16
    assert y_stats.shape == (4, 5) and fold.shape == (4, 17) and fold.dtype == torch.float32
    _, y_stats, fold = ops.conv_fwd(x, w, 2, 1, None, s4, None, None, None, None, None, 1e-5, 0.1, False, None, False)
    assert y_stats.shape == (0,) and fold.shape == (0,)
    assert ops.bn_stats(x).shape == (4, 17)
    assert ops.bn_fold(s4, vec, vec, vec, vec, None, 1e-5, 0.1, True).shape == (4, 17)
    dy = _meta((3, 5, 5, 5))
    g, sums = ops.conv_dgrad(dy, w, x, 2, 1, s4)
    assert g.shape == x.shape and g.is_contiguous(memory_format=torch.channels_last) and sums.shape == (3, 17)
    assert ops.conv_dgrad(dy, w, x, 2, 1, None)[1].shape == (0,)
    dw = ops.conv_wgrad(x, dy, _meta((5, 17, 3, 3)), 2, 1, s4)
    assert dw.shape == (5, 17, 3, 3) and dw.dtype == torch.float32
    assert ops.bn_backward(x, x, s4, s4[:3], 243.0, True, x).shape == x.shape


def test_fake_shapes_and_strides(ext):
    check_fakes(torch.ops.preact_fused)


def test_no_autograd_formula_on_the_ops(ext):
    """The ops are plain kernels; autograd lives in preact_fused.functions, not on the ops."""
    assert not hasattr(cuda_backend, "_conv_fwd_backward")


def test_unavailable_reasons(ext):
    assert "CUDA devices only" in cuda_backend.unavailable_reason(torch.device("cpu"))
    if not torch.cuda.is_available():
        assert cuda_backend.unavailable_reason(torch.device("cuda")) == "no CUDA device is available"


def test_missing_build_says_how_to_build(monkeypatch):
    def missing(name):
        raise ModuleNotFoundError(f"No module named {name!r}")

    monkeypatch.setattr(cuda_backend, "_state", {"module": None, "error": None})
    monkeypatch.setattr(cuda_backend.importlib, "import_module", missing)
    reason = cuda_backend.unavailable_reason(torch.device("cuda"))
    assert "not built" in reason and "pip install --no-build-isolation -e ." in reason
    with pytest.raises(cuda_backend.ExtensionUnavailable, match="pip install --no-build-isolation"):
        cuda_backend.conv_fwd(torch.zeros(1, 1, 1, 1), torch.zeros(1, 1, 1, 1), 1, 0)


def test_mismatched_build_says_rebuild(monkeypatch):
    class Stale:
        torch_version_major, torch_version_minor, cuda_runtime_version = 1, 0, 11000

    monkeypatch.setattr(cuda_backend, "_state", {"module": None, "error": None})
    monkeypatch.setattr(cuda_backend.importlib, "import_module", lambda name: Stale)
    reason = cuda_backend.unavailable_reason(torch.device("cuda"))
    assert "built against torch 1.0" in reason and "rebuild" in reason


def test_float64_is_a_clear_error():
    x = torch.zeros(1, 2, 3, 3, dtype=torch.float64)
    with pytest.raises(TypeError, match="float32, bfloat16 and float16"):
        cuda_backend.conv_fwd(x, torch.zeros(2, 2, 1, 1, dtype=torch.float64), 1, 0)



# ---- the kernels themselves, on the CPU ----------------------------------------------------------
# csrc/ compiled with the host compiler against the emulator of csrc/emulate/ (blocks in turn,
# threads as cooperative fibers, mma.sync / ldmatrix / shuffles per the PTX ISA, int atomics and
# fences): the kernels' index arithmetic, tiling, masks, epilogues, in-launch trees and split-K
# checked against the reference. Not covered: hardware behaviour (timing, races the fibers cannot
# show, the memory model behind __threadfence).

CSRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc")
EMU_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Larger than the odd cases: several row tiles, column tiles of 64, stride 2, split-K.
EMU_RESNET_CASES = [ConvCase(2, 3, 16, 32, 32, 3, 1), ConvCase(2, 16, 16, 32, 32, 3, 1),
                    ConvCase(2, 32, 32, 32, 32, 3, 2), ConvCase(2, 128, 256, 16, 16, 1, 2),
                    ConvCase(2, 64, 256, 8, 8, 1, 1)]
# Wider than the 16-byte vectors and tiles in every direction: 520 input channels (a 4 KB fold
# table), 1030 channels for bn_backward (12 KB of coefficients).
WIDE_CASE = ConvCase(1, 520, 24, 3, 3, 1, 1)


# The emulated build itself is the session fixture ``emulated_build`` of tests/conftest.py.


def emulated_launches() -> int:
    """Kernel launches of the emulated build so far (csrc/emulate/emu_runtime.h)."""
    return torch.ops.preact_fused_emu_debug.launches()


class _Counted:
    """preact_fused.cuda's wrappers, asserting that every op call is exactly one kernel launch
    (none for an op on an empty batch)."""

    def __init__(self, module):
        self._module = module

    def __getattr__(self, name):
        fn = getattr(self._module, name)
        if name not in contract.OPS:
            return fn

        def counted(*args, **kwargs):
            before = emulated_launches()
            out = fn(*args, **kwargs)
            launched = emulated_launches() - before
            tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor) and a.dim() == 4]
            if any(t.numel() == 0 for t in tensors):  # an empty batch: at most the fold's launch
                assert launched <= 1, f"{name}: {launched} kernel launches"
            else:
                assert launched == 1, f"{name}: {launched} kernel launches"
            return out

        return counted


@pytest.fixture
def emu(emulated_build, monkeypatch):
    """preact_fused.cuda's wrappers running the emulated kernels on CPU tensors, one launch per call."""
    monkeypatch.setattr(cuda_backend, "_ops", lambda: emulated_build)
    return _Counted(cuda_backend)


@pytest.mark.slow
def test_emulated_schemas_are_the_contracts(emulated_build):
    for name, schema in contract.SCHEMAS.items():
        assert str(getattr(emulated_build, name).default._schema) == f"preact_fused_emu::{schema}"
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"preact_fused_emu::{name}", "CPU")
        assert not torch._C._dispatch_has_kernel_for_dispatch_key(f"preact_fused_emu::{name}", "Autograd")
    check_fakes(emulated_build)


@pytest.mark.slow
def test_emulated_bad_geometry_is_a_clear_error(emu):
    """The bindings refuse what the kernels cannot index, before any launch."""
    x, w = torch.randn(1, 4, 5, 5), torch.randn(6, 4, 3, 3)
    with pytest.raises(RuntimeError, match="at least one input channel"):
        emu._module.conv_fwd(torch.randn(1, 0, 5, 5), torch.randn(6, 0, 3, 3), 1, 1)
    with pytest.raises(RuntimeError, match="at least one input channel"):
        emu._module.conv_wgrad(torch.randn(1, 0, 5, 5), torch.randn(1, 6, 5, 5), torch.randn(6, 0, 3, 3), 1, 1)
    with pytest.raises(RuntimeError, match="empty convolution output"):
        emu._module.conv_fwd(x[..., :2, :2], w, 1, 0)
    with pytest.raises(RuntimeError, match="stride must be >= 1"):
        emu._module.conv_fwd(x, w, 0, 1)
    with pytest.raises(RuntimeError, match="momentum=None needs num_batches_tracked"):
        emu._module.conv_fwd(x, w, 1, 1, stats=reference.bn_stats(x), running_mean=torch.zeros(4),
                             running_var=torch.ones(4), momentum=None, update_running=True)


@pytest.mark.slow
@pytest.mark.parametrize("case", ODD_CASES, ids=str)
@pytest.mark.parametrize("dtype", EMU_DTYPES, ids=str)
def test_emulated_conv_fwd(emu, case, dtype):
    variants = [("stats_update", True, True), ("none", False, False), ("fold", False, True),
                ("running", True, False), ("stats_cumulative", False, True), ("stats", True, True)]
    for i, (form, with_residual, want_stats) in enumerate(variants):
        check_conv_fwd(emu, case, dtype, "cpu", LAYOUTS[i % 3], form, with_residual, want_stats)


@pytest.mark.slow
@pytest.mark.parametrize("case", ODD_CASES, ids=str)
@pytest.mark.parametrize("dtype", EMU_DTYPES, ids=str)
def test_emulated_conv_dgrad_wgrad(emu, case, dtype):
    for i, with_fold in enumerate((True, False)):
        check_conv_dgrad(emu, case, dtype, "cpu", LAYOUTS[2 - i], with_fold)
        check_conv_wgrad(emu, case, dtype, "cpu", LAYOUTS[i], with_fold)


@pytest.mark.slow
@pytest.mark.parametrize("case", EMU_RESNET_CASES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_emulated_resnet_convs(emu, case, dtype):
    with_bn = case.cin != 3
    check_conv_fwd(emu, case, dtype, "cpu", "channels_last", "stats" if with_bn else "none", with_bn, True)
    check_conv_dgrad(emu, case, dtype, "cpu", "channels_last", with_bn)
    check_conv_wgrad(emu, case, dtype, "cpu", "channels_last", with_bn)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", EMU_DTYPES, ids=str)
def test_emulated_many_tiles_and_wide_channels(emu, dtype):
    """128-row tiles and several groups (the last partial) in every in-launch tree; a fold table
    and a coefficient table wider than a few KB; weights in another dtype than the activations."""
    check_conv_fwd(emu, MANY_TILES, dtype, "cpu", "channels_last", "stats_update", True, True)
    check_conv_dgrad(emu, MANY_TILES, dtype, "cpu", "channels_last", True)
    check_bn_stats(emu, (2, 9, 96, 96), dtype, "cpu", "channels_last")
    check_conv_fwd(emu, WIDE_CASE, dtype, "cpu", "nchw", "stats_update", True, True)
    check_conv_dgrad(emu, WIDE_CASE, dtype, "cpu", "nchw", True)
    check_conv_wgrad(emu, WIDE_CASE, dtype, "cpu", "nchw", True)
    check_bn_backward(emu, (1, 1030, 2, 3), dtype, "cpu", "channels_last", True, True)


@pytest.mark.slow
def test_emulated_wgrad_splits(emulated_build):
    """The split-K plans of the cases above (kEmulatedSMs = 132 multiprocessors): several splits
    for the small and the large ones, one where a single chunk of pixels is all there is."""
    splits = torch.ops.preact_fused_emu_debug.wgrad_splits
    assert splits(torch.empty(3, 17, 9, 9), [3, 17, 3, 3], 2, 1) == 3      # 75 pixels, 5 chunks of 16
    assert splits(torch.empty(2, 16, 96, 96), [16, 16, 1, 1], 1, 0) > 100
    assert splits(torch.empty(1, 3, 3, 3), [4, 3, 3, 3], 1, 1) == 1


@pytest.mark.slow
@pytest.mark.parametrize("order", ["reverse", "shuffle"])
@pytest.mark.parametrize("dtype", EMU_DTYPES, ids=str)
def test_emulated_kernels_in_other_thread_orders(emu, dtype, order, monkeypatch):
    """Every kernel with the threads of a block run in reverse and in shuffled order between
    barriers (PF_EMU_ORDER, csrc/emulate/emu.h): a shared-memory race that the forward order hides
    gives wrong results in one of them. Odd shapes and shapes with several tiles, groups and splits."""
    monkeypatch.setenv("PF_EMU_ORDER", order)
    for case in (ODD_CASES[1], ODD_CASES[-1], EMU_RESNET_CASES[2], MANY_TILES):
        with_bn = case.cin != 3
        check_conv_fwd(emu, case, dtype, "cpu", "channels_last", "stats_update" if with_bn else "none", with_bn, True)
        check_conv_dgrad(emu, case, dtype, "cpu", "channels_last", with_bn)
        check_conv_wgrad(emu, case, dtype, "cpu", "channels_last", with_bn)
    check_bn_stats(emu, (3, 17, 9, 9), dtype, "cpu", "nchw")
    check_bn_stats(emu, (2, 9, 96, 96), dtype, "cpu", "channels_last")
    check_bn_fold(emu, 17, "cpu", momentum=None)
    check_bn_backward(emu, (3, 17, 9, 9), dtype, "cpu", "channels_last", True, True)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", EMU_DTYPES, ids=str)
@pytest.mark.parametrize("layout_name", LAYOUTS)
def test_emulated_bn(emu, dtype, layout_name):
    check_bn_stats(emu, (3, 17, 9, 9), dtype, "cpu", layout_name)
    check_bn_stats(emu, (1, 3, 7, 7), dtype, "cpu", layout_name)
    check_bn_stats(emu, (4, 64, 16, 16), dtype, "cpu", layout_name, offset=1000.0)
    for shape in ((1, 3, 7, 7), (3, 17, 9, 9), (1, 64, 8, 8)):
        for training in (True, False):
            check_bn_backward(emu, shape, dtype, "cpu", layout_name, training, with_residual=True)
            check_bn_backward(emu, shape, dtype, "cpu", layout_name, training, with_residual=False)


@pytest.mark.slow
def test_emulated_bn_fold(emu):
    for momentum in (0.1, None):
        check_bn_fold(emu, 17, "cpu", momentum=momentum)
    check_bn_fold(emu, 300, "cpu", affine=False)
    check_bn_fold(emu, 17, "cpu", update=False)
    check_bn_fold(emu, 17, "cpu", stats_form=False)


@pytest.mark.slow
def test_emulated_bn_fold_running_buffers_in_bf16(emu):
    """Running statistics in bfloat16 (a model converted with .to(bfloat16)): read and updated in
    their dtype by the kernel, as the reference's in-place ops round."""
    g = torch.Generator().manual_seed(4)
    stats = reference.bn_stats(torch.randn(2, 8, 5, 5, generator=g) + 2)
    rm, rv = torch.randn(8, generator=g).bfloat16(), (torch.rand(8, generator=g) + 0.5).bfloat16()
    rm2, rv2 = rm.clone(), rv.clone()
    fold = emu.bn_fold(stats, None, None, rm, rv, None, 1e-5, 0.1, True)
    want = reference.bn_fold(stats, None, None, rm2, rv2, None, 1e-5, 0.1, True)
    assert_close("fold", fold, want, torch.float32)
    assert torch.equal(rm, rm2) and torch.equal(rv, rv2)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", EMU_DTYPES, ids=str)
def test_emulated_reruns_are_bit_identical(emu, dtype):
    check_reruns_bit_identical(emu, "cpu", dtype)


@pytest.mark.slow
def test_emulated_nan_propagation(emu):
    check_nan_propagation(emu, "cpu")


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_emulated_empty_batch(emu, dtype):
    check_empty_batch(emu, "cpu", dtype)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", cuda_backend.OPS)
def test_emulated_opcheck(emulated_build, name, dtype):
    """torch.library.opcheck of the contract's schemas and fakes with the emulated kernels: declared
    mutations, fake shapes and strides against real outputs, AOT dispatch."""
    for args in opcheck_samples(dtype, "cpu")[name]:
        torch.library.opcheck(getattr(emulated_build, name).default, args)


@pytest.mark.slow
def test_emulated_compiled_unit(emu):
    """The cuda backend's wrappers and the contract's fakes under torch.compile(fullgraph=True)."""
    check_compiled_unit(emu._module, "cpu")


_ASAN_SCRIPT = r"""
import sys, torch
from torch.utils.cpp_extension import load
csrc, build = sys.argv[1], sys.argv[2]
load(name="preact_fused_emu", sources=[f"{csrc}/bindings.cpp", f"{csrc}/emulate/kernels.cpp"],
     extra_include_paths=[f"{csrc}/emulate", csrc],
     extra_cflags=["-DPF_EMULATE", "-O1", "-ffp-contract=off", "-fsanitize=address,alignment",
                   "-fno-sanitize-recover=alignment", "-fno-omit-frame-pointer"],
     extra_ldflags=["-fsanitize=address,alignment"], build_directory=build, is_python_module=False, with_cuda=False)
from preact_fused import contract
contract.register_fakes("preact_fused_emu")
import preact_fused.cuda as cb
cb._ops = lambda: torch.ops.preact_fused_emu
from test_cuda_build import *
for case in ODD_CASES + [ConvCase(2, 64, 256, 8, 8, 1, 1), ConvCase(2, 32, 32, 32, 32, 3, 2), WIDE_CASE]:
    for dtype in (torch.float32, torch.bfloat16):
        for lay in ("channels_last", "nchw"):
            for bn in (True, False):
                check_conv_fwd(cb, case, dtype, "cpu", lay, "stats_update" if bn else "none", bn, bn)
                check_conv_dgrad(cb, case, dtype, "cpu", lay, bn)
                check_conv_wgrad(cb, case, dtype, "cpu", lay, bn)
for dtype in (torch.float32, torch.bfloat16):
    check_bn_stats(cb, (3, 17, 9, 9), dtype, "cpu", "nchw")
    check_bn_backward(cb, (3, 17, 9, 9), dtype, "cpu", "channels_last", True, True)
    check_empty_batch(cb, "cpu", dtype)
check_bn_fold(cb, 17, "cpu", momentum=None)
print("clean")
"""


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("PREACT_FUSED_ASAN") != "1",
                    reason="set PREACT_FUSED_ASAN=1 to run the emulated kernels under AddressSanitizer (~3 min)")
def test_emulated_kernels_under_address_sanitizer(tmp_path):
    """No out-of-bounds or misaligned access to global or shared memory by any kernel, on odd and
    larger shapes (a misaligned vector access faults on the GPU)."""
    libasan = subprocess.run(["c++", "-print-file-name=libasan.so"], capture_output=True, text=True).stdout.strip()
    if not os.path.isabs(libasan):
        pytest.skip("the host compiler has no AddressSanitizer runtime")
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(tests_dir)
    env = dict(os.environ, LD_PRELOAD=libasan, ASAN_OPTIONS="detect_leaks=0",
               PYTHONPATH=os.pathsep.join(filter(None, [tests_dir, root, os.environ.get("PYTHONPATH")])))
    out = subprocess.run([sys.executable, "-c", _ASAN_SCRIPT, CSRC, str(tmp_path)], capture_output=True, text=True,
                         env=env, timeout=1800)
    assert out.returncode == 0 and out.stdout.strip().endswith("clean"), out.stderr[-4000:]


# ---- the sm_90 build: registers and spills ---------------------------------------------------------

KERNEL_SOURCES = ["conv/fwd.cu", "conv/dgrad.cu", "conv/wgrad.cu", "bn/bn.cu"]
# The device flags of setup.py (ptxas report on).
NVCC_FLAGS = ["-O3", "-fmad=false", "-maxrregcount=255", "-std=c++17", "-gencode=arch=compute_90,code=sm_90",
              "-Xptxas=-v"]


def _ptxas_report(text: str) -> list[tuple[str, int, int, int]]:
    """(kernel, registers, spill store bytes, spill load bytes) per kernel of an nvcc -Xptxas=-v log."""
    import re
    rows, name, spill = [], None, (0, 0)
    for line in text.splitlines():
        m = re.search(r"Compiling entry function '([^']+)'", line)
        if m:
            name = m.group(1)
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            spill = (int(m.group(1)), int(m.group(2)))
        m = re.search(r"Used (\d+) registers", line)
        if m and name is not None:
            rows.append((name, int(m.group(1)), *spill))
            name, spill = None, (0, 0)
    return rows


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
def test_sm90_build_has_no_spills(tmp_path):
    """Every kernel compiled for sm_90 with setup.py's device flags: no register spills; the
    register counts are printed (pytest -s) for the record. Several minutes on two cores."""
    procs = []
    for src in KERNEL_SOURCES:
        out = tmp_path / (os.path.basename(src) + ".o")
        procs.append(subprocess.Popen(["nvcc", *NVCC_FLAGS, "-I", CSRC, "-c", os.path.join(CSRC, src), "-o", str(out)],
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    rows = []
    for src, proc in zip(KERNEL_SOURCES, procs):
        log, _ = proc.communicate(timeout=1800)
        assert proc.returncode == 0, f"nvcc {src} failed:\n{log[-4000:]}"
        rows += [(src, *row) for row in _ptxas_report(log)]
    assert len(rows) >= 50, f"expected every kernel instantiation in the report, got {len(rows)}"
    for src, name, regs, stores, loads in rows:
        print(f"{src:14s} {regs:4d} registers  spill {stores}/{loads}  {name}")
    spilling = [(name, stores, loads) for _, name, _, stores, loads in rows if stores or loads]
    assert not spilling, f"register spills: {spilling}"
