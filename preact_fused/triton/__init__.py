"""The Triton backend: the seven ops of ``preact_fused.contract`` as Triton kernels, one launch per op.

conv.py      implicit-GEMM forward / dgrad (one kernel, compile-time loader and epilogue switches:
             the BN fold in the loader, residual, output statistics, dgrad's ReLU mask and sums)
             and wgrad (split pixel reduction summed in-launch; optionally computing its dy as the
             next BN's backward, conv_wgrad_bn_backward), any KxK, stride 1 or 2, zero padding
stats.py     bn_stats (summary of a tensor) and bn_fold (fold, running statistics)
bn_grad.py   bn_backward: dx = scale*g + B*x + C [+ d_residual], elementwise (its formula shared with wgrad)
ops.py       torch.library ops (namespace ``preact_fused_triton``) and the contract's functions
launch.py    launches prepared once per problem (arguments, grid, configuration, output layouts),
             and on a GPU the compiled kernel launched directly after the first launch
common.py    the fold, the BN-ReLU activation, tap geometry, the in-launch reduction tree, semaphores

Runs on CUDA devices, and on the CPU under the Triton interpreter (``TRITON_INTERPRET=1`` set before
this package is imported; float32 only there). float32 uses exact fp32 products unless
``set_fp32_precision("tf32")`` is called or ``PREACT_FUSED_TF32=1`` is set.
"""
from __future__ import annotations

import torch

from .common import INTERPRET
from .ops import (bn_backward, bn_fold, bn_stats, conv_dgrad, conv_fwd, conv_wgrad, conv_wgrad_bn_backward,
                  fp32_precision, set_fp32_precision)

__all__ = ["conv_fwd", "bn_stats", "bn_fold", "conv_dgrad", "conv_wgrad", "bn_backward", "conv_wgrad_bn_backward",
           "unavailable_reason", "set_fp32_precision", "fp32_precision"]


def unavailable_reason(device) -> str | None:
    """None when the Triton kernels can run on ``device``, else why not."""
    device = torch.device(device)
    if device.type == "cuda":
        return None if torch.cuda.is_available() else "CUDA is not available to PyTorch"
    if device.type == "cpu":
        if INTERPRET:
            return None
        return ("Triton kernels run on the CPU only under the interpreter: set TRITON_INTERPRET=1 before "
                "preact_fused.triton is imported")
    return f"Triton kernels run on CUDA devices (or the CPU under TRITON_INTERPRET=1), not {device.type}"
