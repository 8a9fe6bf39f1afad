"""The compiled CUDA backend: the six kernel contracts of ``preact_fused.reference`` as torch ops.

The kernels live in the extension ``preact_fused._C`` (built from csrc/ by setup.py) and are
registered as ``torch.ops.preact_fused.<name>``; their schemas are in csrc/bindings.cpp. Importing
this module neither loads the extension nor initialises CUDA: the first call does. On that first
load this module adds, through ``torch.library``, the fake (meta) implementations that let
torch.compile trace the ops and the autograd formula of ``conv_fwd`` (so the op is differentiable
on its own; the package's models go through ``preact_fused.autograd`` instead).

Activations are logical NCHW tensors in any memory format; the ops compute in NHWC and return
channels_last tensors, which these wrappers turn into NCHW-contiguous ones when the input was not
channels_last (the reference's convention). Supported dtypes: float32 (exact fp32 math, no TF32),
bfloat16 and float16 (tensor cores, fp32 accumulation). Statistics are float32.
"""
from __future__ import annotations

import importlib
import threading

import torch

__all__ = ["conv_fwd", "bn_stats", "bn_finalize", "conv_dgrad", "conv_wgrad", "bn_backward"]

OPS = ("conv_fwd", "bn_stats", "bn_finalize", "conv_dgrad", "conv_wgrad", "bn_backward")
TILE_ROWS = 128  # rows per statistics tile: kTileRows in csrc/launch.h
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
BUILD_HINT = ("build it from the repository root with `pip install --no-build-isolation -e .` "
              "with nvcc on PATH or CUDA_HOME set to the CUDA toolkit, torch with CUDA installed, and "
              "PREACT_FUSED_SKIP_CUDA_BUILD unset")

_lock = threading.Lock()
_state: dict = {"module": None, "error": None}


class ExtensionUnavailable(RuntimeError):
    """The compiled extension is missing or does not match the running torch; says how to build it."""


def _load():
    """Import preact_fused._C once (registering the ops) and add the Python-side registrations."""
    if _state["module"] is not None:
        return _state["module"]
    with _lock:
        if _state["module"] is not None:
            return _state["module"]
        if _state["error"] is not None:
            raise ExtensionUnavailable(_state["error"])
        try:
            module = importlib.import_module("preact_fused._C")
        except ModuleNotFoundError:
            _state["error"] = f"the CUDA extension preact_fused._C is not built; {BUILD_HINT}"
        except (ImportError, OSError) as err:
            _state["error"] = (f"the CUDA extension preact_fused._C does not load ({err}); it was probably built "
                               f"against another torch or CUDA: rebuild it; {BUILD_HINT}")
        else:
            built = (module.torch_version_major, module.torch_version_minor)
            running = tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2])
            if built != running:
                _state["error"] = (f"the CUDA extension preact_fused._C was built against torch {built[0]}.{built[1]} "
                                   f"but torch {torch.__version__} is running: rebuild it; {BUILD_HINT}")
            else:
                _register_python_side()
                _state["module"] = module
        if _state["error"] is not None:
            raise ExtensionUnavailable(_state["error"])
        return _state["module"]


def is_built() -> bool:
    """Whether the extension loads (without touching any CUDA device)."""
    try:
        _load()
    except ExtensionUnavailable:
        return False
    return True


def unavailable_reason(device) -> str | None:
    """None when the compiled ops can run on ``device``; otherwise why not (and how to fix it)."""
    device = torch.device(device)
    if device.type != "cuda":
        return f"the cuda backend runs on CUDA devices only, not on {device.type}"
    try:
        _load()
    except ExtensionUnavailable as err:
        return str(err)
    if not torch.cuda.is_available():
        return "no CUDA device is available"
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        return f"needs a GPU of compute capability 8.0 or newer (bf16 mma.sync); {device} is {major}.{minor}"
    return None


def _ops():
    _load()
    return torch.ops.preact_fused


def _check_dtype(t: torch.Tensor, name: str) -> None:
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"preact_fused cuda backend: {name} has dtype {t.dtype}; supported dtypes are float32, "
                        "bfloat16 and float16 (backend='reference' runs float64)")


def _keep_format(out: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``out`` (channels_last from the op) in the memory format the reference returns for ``like``."""
    if like.is_contiguous(memory_format=torch.channels_last) and not like.is_contiguous():
        return out
    return out.contiguous()


# ---- the six contracts (signatures and meaning of preact_fused.reference) ------------------------

def conv_fwd(x, weight, stride: int, padding: int, scale=None, shift=None, residual=None, want_stats: bool = False):
    """(y [N, Cout, Ho, Wo] in x's dtype, partials [3, ceil(N*Ho*Wo/128), Cout] float32 or None)."""
    _check_dtype(x, "x")
    y, partials = _ops().conv_fwd(x, weight, int(stride), int(padding), scale, shift, residual, bool(want_stats))
    return _keep_format(y, x), (partials if want_stats else None)


def bn_stats(x):
    """Statistics partials [3, ceil(N*H*W/128), C] float32 of x [N, C, H, W]."""
    _check_dtype(x, "x")
    return _ops().bn_stats(x)


def bn_finalize(partials, weight, bias, eps: float, running_mean=None, running_var=None,
                momentum: float | None = 0.1, num_batches_tracked=None):
    """(mean, invstd, scale, shift) [C] float32; running statistics updated in place on the device."""
    return _ops().bn_finalize(partials, weight, bias, float(eps), running_mean, running_var,
                              None if momentum is None else float(momentum), num_batches_tracked)


def conv_dgrad(dy, weight, x, stride: int, padding: int, scale=None, shift=None, mean=None):
    """(g, sum_g, sum_gx) with the BN-ReLU mask, or (dx, None, None) for the identity loader."""
    _check_dtype(dy, "dy")
    g, sum_g, sum_gx = _ops().conv_dgrad(dy, weight, x, int(stride), int(padding), scale, shift, mean)
    g = _keep_format(g, dy)
    if scale is None:
        return g, None, None
    return g, sum_g, sum_gx


def conv_wgrad(x, dy, weight_shape, stride: int, padding: int, scale=None, shift=None):
    """dW [Cout, Cin, KH, KW] float32, P(x) recomputed from the pre-BN x; deterministic split-K."""
    _check_dtype(x, "x")
    return _ops().conv_wgrad(x, dy, [int(s) for s in weight_shape], int(stride), int(padding), scale, shift)


def bn_backward(g, x, mean, invstd, scale, sum_g, sum_gx, training: bool = True, d_residual=None):
    """dx = A*g + B*x + C [+ d_residual] in x's dtype (B = C = 0 when not training)."""
    _check_dtype(x, "x")
    dx = _ops().bn_backward(g, x, mean, invstd, scale, sum_g, sum_gx, bool(training), d_residual)
    return _keep_format(dx, x)


# ---- torch.library: fake implementations and conv_fwd's autograd ----------------------------------

def _conv_out(size, k, stride, padding):
    return (size + 2 * padding - k) // stride + 1


def _register_python_side(namespace: str = "preact_fused") -> None:
    """Fake implementations of the ops of ``namespace`` and conv_fwd's autograd.

    The extension's ops live in ``preact_fused``; the tests register the same for
    ``preact_fused_emu``, the kernels built for the CPU emulator, and opcheck them there.
    """
    cl = torch.channels_last

    @torch.library.register_fake(f"{namespace}::conv_fwd")
    def _conv_fwd_fake(x, weight, stride, padding, scale, shift, residual, want_stats):
        n, _, h, w = x.shape
        cout, _, kh, kw = weight.shape
        ho, wo = _conv_out(h, kh, stride, padding), _conv_out(w, kw, stride, padding)
        y = torch.empty((n, cout, ho, wo), dtype=x.dtype, device=x.device, memory_format=cl)
        tiles = (n * ho * wo + TILE_ROWS - 1) // TILE_ROWS if want_stats else 0
        return y, torch.empty((3, tiles, cout), dtype=torch.float32, device=x.device)

    @torch.library.register_fake(f"{namespace}::bn_stats")
    def _bn_stats_fake(x):
        n, c, h, w = x.shape
        return torch.empty((3, (n * h * w + TILE_ROWS - 1) // TILE_ROWS, c), dtype=torch.float32, device=x.device)

    @torch.library.register_fake(f"{namespace}::bn_finalize")
    def _bn_finalize_fake(partials, weight, bias, eps, running_mean, running_var, momentum, num_batches_tracked):
        c = partials.shape[2]
        return tuple(torch.empty((c,), dtype=torch.float32, device=partials.device) for _ in range(4))

    @torch.library.register_fake(f"{namespace}::conv_dgrad")
    def _conv_dgrad_fake(dy, weight, x, stride, padding, scale, shift, mean):
        g = torch.empty(tuple(x.shape), dtype=dy.dtype, device=dy.device, memory_format=cl)
        c = x.shape[1] if scale is not None else 0
        return (g, torch.empty((c,), dtype=torch.float32, device=dy.device),
                torch.empty((c,), dtype=torch.float32, device=dy.device))

    @torch.library.register_fake(f"{namespace}::conv_wgrad")
    def _conv_wgrad_fake(x, dy, weight_shape, stride, padding, scale, shift):
        return torch.empty(tuple(weight_shape), dtype=torch.float32, device=x.device)

    @torch.library.register_fake(f"{namespace}::bn_backward")
    def _bn_backward_fake(g, x, mean, invstd, scale, sum_g, sum_gx, training, d_residual):
        return torch.empty(tuple(x.shape), dtype=x.dtype, device=x.device, memory_format=cl)

    def setup_context(ctx, inputs, output):
        _conv_fwd_setup(ctx, inputs, output)
        ctx.ops = getattr(torch.ops, namespace)

    torch.library.register_autograd(f"{namespace}::conv_fwd", _conv_fwd_backward, setup_context=setup_context)


def _conv_fwd_setup(ctx, inputs, output):
    x, weight, stride, padding, scale, shift, residual, _want_stats = inputs
    ctx.save_for_backward(x, weight, scale, shift)
    ctx.conv = (stride, padding)
    ctx.has_residual = residual is not None


def _conv_fwd_backward(ctx, dy, _d_partials):
    """Gradients of y = conv(relu(x*scale + shift), w) [+ residual] in x, w, scale, shift, residual.

    With g = dP * (x*scale + shift > 0): dx = g*scale, dscale = sum(g*x), dshift = sum(g); these are
    conv_dgrad with mean = 0 and bn_backward in eval form (dx = A*g with A = scale).
    """
    x, weight, scale, shift = ctx.saved_tensors
    stride, padding = ctx.conv
    needs = ctx.needs_input_grad
    ops = ctx.ops
    dx = dw = dscale = dshift = d_residual = None
    if scale is None:
        if needs[0]:
            dx = ops.conv_dgrad(dy, weight, x, stride, padding, None, None, None)[0]
    elif needs[0] or needs[4] or needs[5]:
        zero = torch.zeros_like(scale)
        g, sum_g, sum_gx = ops.conv_dgrad(dy, weight, x, stride, padding, scale, shift, zero)
        if needs[0]:
            dx = ops.bn_backward(g, x, zero, zero, scale, sum_g, sum_gx, False, None)
        dscale, dshift = sum_gx.to(scale.dtype), sum_g.to(shift.dtype)
    if needs[1]:
        dw = ops.conv_wgrad(x, dy, list(weight.shape), stride, padding, scale, shift).to(weight.dtype)
    if ctx.has_residual and needs[6]:
        d_residual = dy
    return dx, dw, None, None, dscale, dshift, d_residual, None
