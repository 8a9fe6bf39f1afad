"""preact_fused: fused BatchNorm-ReLU-conv kernels for pre-activation residual networks.

Public API only; importing the package never initialises CUDA nor loads the compiled extension.
"""
from .backend import BackendUnavailable
from .convert import convert
from .memory import count_saved_bytes
from .models import preact_resnet
from .nn import BNReLUConv2d, PreActBasicBlock, PreActBottleneck

__all__ = ["BNReLUConv2d", "PreActBasicBlock", "PreActBottleneck", "preact_resnet", "convert",
           "count_saved_bytes", "BackendUnavailable"]
__version__ = "0.1.0"
