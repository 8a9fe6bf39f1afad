"""The compiled CUDA backend: the kernel contract (``preact_fused.contract``) as torch ops.

The kernels live in the extension ``preact_fused._C`` (built from csrc/ by setup.py) and are
registered as ``torch.ops.preact_fused.<name>`` with exactly the schemas of ``contract.SCHEMAS``.
Importing this module neither loads the extension nor initialises CUDA: the first call does. On
that first load the contract's fake (meta) implementations are registered for the namespace
(``contract.register_fakes``), so torch.compile traces the ops and CUDA graphs capture them.

Each op is one kernel launch. Activations are logical NCHW tensors in any memory format; the ops
compute in NHWC and return channels_last tensors, which these wrappers give the memory format of
the activation input (``contract.keep_format``); outputs an op does not produce come back as None
(``contract.optional``). Supported dtypes: float32 (exact fp32 math, no TF32), bfloat16 and
float16 (tensor cores, fp32 accumulation); summaries, folds, sums and dW are float32.
"""
from __future__ import annotations

import importlib
import threading

import torch

from . import contract
from .contract import keep_format, optional

__all__ = list(contract.OPS)

OPS = contract.OPS
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
                contract.register_fakes("preact_fused")
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


# ---- the contract's ops (signatures and meaning of preact_fused.reference) ------------------------

def conv_fwd(x, weight, stride: int, padding: int, stats=None, fold=None, gamma=None, beta=None,
             running_mean=None, running_var=None, num_batches_tracked=None, eps: float = 1e-5,
             momentum: float | None = 0.1, update_running: bool = False, residual=None, want_stats: bool = False):
    """(y, summary [4, Cout] of y or None, fold [4, Cin] computed here or None): one launch."""
    _check_dtype(x, "x")
    y, y_stats, new_fold = _ops().conv_fwd(
        x, weight, int(stride), int(padding), stats, fold, gamma, beta, running_mean, running_var,
        num_batches_tracked, float(eps), None if momentum is None else float(momentum), bool(update_running),
        residual, bool(want_stats))
    return keep_format(y, x), optional(y_stats), optional(new_fold)


def bn_stats(x):
    """The summary [4, C] float32 (count, pivot, offset, M2) of x [N, C, H, W]: one launch."""
    _check_dtype(x, "x")
    return _ops().bn_stats(x)


def bn_fold(stats=None, gamma=None, beta=None, running_mean=None, running_var=None, num_batches_tracked=None,
            eps: float = 1e-5, momentum: float | None = 0.1, update_running: bool = False):
    """The fold [4, C] (mean, invstd, scale, shift) of ``stats`` or of the running statistics; the
    running statistics updated in place on the device when asked. One launch."""
    return _ops().bn_fold(stats, gamma, beta, running_mean, running_var, num_batches_tracked, float(eps),
                          None if momentum is None else float(momentum), bool(update_running))


def conv_dgrad(dy, weight, x, stride: int, padding: int, fold=None):
    """(g, sums [3, Cin]) with the BN-ReLU mask of ``fold``, or (dx, None) without: one launch."""
    _check_dtype(dy, "dy")
    g, sums = _ops().conv_dgrad(dy, weight, x, int(stride), int(padding), fold)
    return keep_format(g, dy), optional(sums)


def conv_wgrad(x, dy, weight, stride: int, padding: int, fold=None):
    """dW [Cout, Cin, KH, KW] float32 in weight's memory format, P(x) recomputed from the pre-BN x;
    split-K reduced in the launch."""
    _check_dtype(x, "x")
    return _ops().conv_wgrad(x, dy, weight, int(stride), int(padding), fold)


def conv_wgrad_bn_backward(x, g, weight, stride: int, padding: int, fold, bn_x, bn_fold, bn_sums, count: float,
                           training: bool = True):
    """(dW, dy): conv_wgrad of dy = bn_backward(g, bn_x, bn_fold, bn_sums, count, training), computed
    in the launch's dy loader and stored (bn_x's format); x, g and bn_x of one dtype. One launch."""
    _check_dtype(x, "x")
    dw, dy = _ops().conv_wgrad_bn_backward(x, g, weight, int(stride), int(padding), fold, bn_x, bn_fold, bn_sums,
                                           float(count), bool(training))
    return dw, keep_format(dy, bn_x)


def bn_backward(g, x, fold, sums, count: float, training: bool = True, d_residual=None):
    """dx = scale g + B x + C [+ d_residual] in x's dtype and format (B = C = 0 when not training)."""
    _check_dtype(x, "x")
    dx = _ops().bn_backward(g, x, fold, sums, float(count), bool(training), d_residual)
    return keep_format(dx, x)
