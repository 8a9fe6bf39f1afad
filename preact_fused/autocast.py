"""Autocast plumbing: the dtype a fused op computes in under ``torch.autocast``, and contexts that
turn autocast off (the fused ops choose their dtypes themselves) or restore a recorded state.

Under autocast the activations (x, the residual) are cast to the autocast dtype before the fused
Function and the ops run with autocast off: the convolutions compute in that dtype, the outputs and
what is saved are in it, statistics and weight gradients stay float32, and the float32 weights are
rounded to the activation dtype by the kernels as they load them (no saved copies).
"""
from __future__ import annotations

import contextlib

import torch


# Device types with an autocast mode, found once at import: torch.amp.is_autocast_available is a C
# function that torch.compile cannot trace in every supported torch release (2.11 breaks the graph
# on it), a set lookup it can.
_AUTOCAST_DEVICE_TYPES = frozenset(
    t for t in ("cpu", "cuda", "xpu", "mps", "hpu", "xla", "mtia", "maia", "ipu",
                torch._C._get_privateuse1_backend_name())
    if torch.amp.is_autocast_available(t))


def available(device_type: str) -> bool:
    """Whether ``device_type`` has an autocast mode."""
    return device_type in _AUTOCAST_DEVICE_TYPES


def compute_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast computes convolutions in on x's device, or None (autocast off, x float64)."""
    device_type = x.device.type
    if x.dtype == torch.float64 or not available(device_type):
        return None
    if not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def disabled(device_type: str):
    """A context with autocast disabled on ``device_type`` (the fused ops pick their dtypes themselves)."""
    if available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def current(device_type: str) -> tuple[str, bool, torch.dtype | None]:
    """The autocast state of ``device_type``: (device type, enabled, dtype), for :func:`restored`."""
    if not available(device_type):
        return device_type, False, None
    return device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)


def restored(recorded):
    """A context re-entering an autocast state recorded by :func:`current`."""
    device_type, enabled, dtype = recorded
    if not available(device_type):
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=dtype, enabled=enabled)
