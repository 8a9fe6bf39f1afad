"""convert(model): fuse the BatchNorm2d -> ReLU -> Conv2d chains of an existing model, in place.

The chains are found by a torch.fx trace (``chain_search``), used for analysis only. The fusion is
then attached to the chain's modules (``deferred``): the BN hands its input on unevaluated and the
conv reading it runs the fused op. The model keeps its class, its own forward code, its methods
and attributes, every submodule, parameter and buffer in the original order (state_dict,
optimizer state and checkpoints interchange with an unconverted copy), and it pickles,
``torch.save``s and deep-copies like any model. Control flow in forward (``self.training``, flags,
hooks) runs when the model is called, as before; a call that takes a path the analysis did not see
computes the BN the ordinary way: results are exact on every path.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from torch import nn

from . import deferred
from .chain_search import find_chains

_CHECKPOINT_ADVICE = (
    "chains inside its forward are left unfused (its children were searched on their own). If a "
    "setting selects the untraceable path, e.g. torchvision DenseNet's memory_efficient=True "
    "(checkpointing), set it off for convert and back on after: the fusion belongs to the modules, "
    "so it also runs inside the checkpointed function")


@dataclass
class FusionReport:
    """What ``convert`` did.

    fused: (BN name, conv names) of each fused chain; skipped: (BN name, reason) of each BN-ReLU left
    unfused; untraced: (module name, reason) of each module torch.fx could not trace.
    """
    fused: list[tuple[str, tuple[str, ...]]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    untraced: list[tuple[str, str]] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"fused {len(self.fused)} BN-ReLU chain(s) into {sum(len(c) for _, c in self.fused)} conv(s)"]
        lines += [f"  {bn} -> relu -> {', '.join(convs)}" for bn, convs in self.fused]
        lines += [f"  left unfused: {name}: {reason}" for name, reason in self.skipped]
        lines += [f"  not traced: {name}: {reason}" for name, reason in self.untraced]
        return "\n".join(lines)


def convert(model: nn.Module, filter_fn: Callable[[str, nn.Conv2d], bool] | None = None,
            backend: str = "auto") -> nn.Module:
    """Fuse the BatchNorm2d -> ReLU -> Conv2d chains of ``model`` in place and return it.

    filter_fn(conv_name, conv) -> bool selects which convs may be fused (every conv reading one
    BN-ReLU must be accepted, since the BN runs once). ``model.fusion_report`` (a FusionReport)
    lists what was fused, what was left unfused and why. Converting again first undoes the previous
    conversion (see ``revert``). Modules with forward hooks on the BN are left unfused; hooks on a
    conv run as before (a hook that reads the conv's input gets relu(bn(x)), computed for it).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert expects an nn.Module, got {type(model).__name__}")
    deferred.uninstall(model)
    search = find_chains(model, filter_fn)
    report = FusionReport(skipped=list(search.skipped),
                          untraced=[(name, f"torch.fx cannot trace it ({reason}); {_CHECKPOINT_ADVICE}")
                                    for name, reason in search.untraced])
    for chain in search.chains:
        deferred.install(chain.bn, chain.bn_name, chain.combined, list(chain.convs), backend)
        report.fused.append((chain.bn_name, chain.conv_names))
    model.fusion_report = report
    return model


def revert(model: nn.Module) -> nn.Module:
    """Undo ``convert`` in place: every module runs its own forward again. Returns ``model``."""
    deferred.uninstall(model)
    model.__dict__.pop("fusion_report", None)
    return model
