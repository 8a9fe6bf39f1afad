"""Picks the backend that runs the kernel contracts: reference | triton | cuda.

Every backend is a module exposing the functions of the kernel contract (``preact_fused.contract``:
``conv_fwd``, ``bn_stats``, ``bn_fold``, ``conv_dgrad``, ``conv_wgrad``, ``bn_backward``,
``conv_wgrad_bn_backward``) and
``unavailable_reason(device) -> str | None`` (None when it can run on that device).

"auto" (the default; the environment variable ``PREACT_FUSED_BACKEND`` overrides it) prefers the
compiled CUDA extension, then Triton, then the reference, and warns once when it falls back on a
CUDA device. A backend named explicitly that cannot run is an error.
"""
from __future__ import annotations

import os
import warnings

import torch

BACKENDS = ("reference", "triton", "cuda")
_MODULES = {"reference": "preact_fused.reference", "triton": "preact_fused.triton",
            "cuda": "preact_fused.cuda"}
_warned: set[str] = set()


class BackendUnavailable(RuntimeError):
    """A backend named explicitly cannot run here; the message says why and how to fix it."""


def _load(name: str):
    # Plain import statements, not importlib: torch.compile traces them without a graph break, also
    # when a compiled model runs before any backend has been loaded (an import of a module already
    # imported is a lookup in sys.modules).
    if name == "reference":
        from . import reference as module
    elif name == "triton":
        from . import triton as module
    elif name == "cuda":
        from . import cuda as module
    else:
        raise KeyError(name)
    return module


def unavailable_reason(name: str, device: torch.device) -> str | None:
    """Why backend ``name`` cannot run on ``device``, or None when it can."""
    try:
        module = _load(name)
    except ImportError as err:
        return f"cannot import {_MODULES[name]}: {err}"
    return module.unavailable_reason(device)


def _requested(name: str) -> str:
    if name == "auto":
        name = os.environ.get("PREACT_FUSED_BACKEND", "auto").strip().lower() or "auto"
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"unknown preact_fused backend {name!r}; choose 'auto' or one of {BACKENDS}")
    return name


_resolved: dict[tuple, object] = {}


def resolve(name: str, device: torch.device):
    """The backend module to run on ``device`` for the setting ``name`` ("auto" or a backend).

    Resolved once per (setting, device) and remembered: the environment variable is read, and the
    extension and device probed, at the first call only (``reset()`` forgets the choices).
    """
    key = (name, device)
    module = _resolved.get(key)
    if module is None:
        module = _resolved[key] = _resolve(name, device)
    return module


def reset() -> None:
    """Forget the resolved backends (after changing PREACT_FUSED_BACKEND, or in tests)."""
    _resolved.clear()
    _warned.clear()


def _resolve(name: str, device: torch.device):
    name = _requested(name)
    device = torch.device(device)
    if name != "auto":
        reason = unavailable_reason(name, device)
        if reason is not None:
            raise BackendUnavailable(f"preact_fused backend {name!r} is unavailable on {device}: {reason}")
        return _load(name)
    if device.type != "cuda":
        message = f"preact_fused: no CUDA device ({device}), using the reference backend"
    else:
        reasons = []
        for candidate in ("cuda", "triton"):
            reason = unavailable_reason(candidate, device)
            if reason is None:
                return _load(candidate)
            reasons.append(f"{candidate}: {reason}")
        message = "preact_fused: no fast backend on this CUDA device, using the reference backend (" + "; ".join(reasons) + ")"
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=4)
    return _load("reference")


def name_of(module) -> str:
    """The short name ('reference', 'triton', 'cuda') of a backend module."""
    return next(key for key, value in _MODULES.items() if value == module.__name__)
