"""convert(model): a torch.fx rewrite of BatchNorm2d -> ReLU -> Conv2d chains into fused ops.

Recognised chains: a BatchNorm2d module, then a ReLU written as a module (``nn.ReLU``), a functional
call (``F.relu``, ``torch.relu``, ``x.relu()``, in-place variants included) or folded into one
combined norm+activation module (a BatchNorm2d subclass holding an ``act`` / ``activation``
``nn.ReLU``, the way model zoos write ``BatchNormAct2d``), then one or more Conv2d modules reading the
activation. When one BN-ReLU feeds several convs (a projection shortcut), they are fused together so
the BN's statistics and running-stat update happen once.

The rewritten graph calls :func:`fused_bn_relu_convs` with the original module objects, so the
state_dict keys, the Parameter objects (an existing optimizer keeps working) and the buffers are
unchanged. Chains that cannot be fused are left as they were and listed with the reason.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .backend import resolve
from .functions import bn_relu_convs
from .validation import check_input, conv_geometry

_RELU_FUNCTIONS = {F.relu, torch.relu, torch.relu_, getattr(F, "relu_", None)} - {None}
_RELU_METHODS = {"relu", "relu_"}
_PLAIN_BATCH_NORMS = (nn.BatchNorm2d, nn.SyncBatchNorm)


class ConversionError(RuntimeError):
    """The model cannot be converted; the message names the part that failed."""


@dataclass
class FusionReport:
    """What ``convert`` did: ``fused`` (BN name, conv names) chains and ``skipped`` (name, reason)."""
    fused: list[tuple[str, tuple[str, ...]]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"fused {len(self.fused)} BN-ReLU chain(s) into {sum(len(c) for _, c in self.fused)} conv(s)"]
        lines += [f"  {bn} -> relu -> {', '.join(convs)}" for bn, convs in self.fused]
        lines += [f"  left unfused: {name}: {reason}" for name, reason in self.skipped]
        return "\n".join(lines)


def _combined_activation(module: nn.Module) -> nn.Module | None:
    """The ReLU of a combined norm+activation module (BatchNorm2d subclass), or None."""
    if type(module) in _PLAIN_BATCH_NORMS or not isinstance(module, nn.BatchNorm2d):
        return None
    act = getattr(module, "act", getattr(module, "activation", None))
    drop = getattr(module, "drop", None)
    if isinstance(act, nn.ReLU) and (drop is None or isinstance(drop, nn.Identity)):
        return act
    return None


class _Tracer(fx.Tracer):
    """Keeps BatchNorm2d subclasses whole and remembers which module was being traced on failure."""

    def __init__(self):
        super().__init__()
        self.path: list[str] = []

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, nn.BatchNorm2d) or super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        self.path.append(self.path_of_module(m) or type(m).__name__)
        result = super().call_module(m, forward, args, kwargs)
        self.path.pop()
        return result


def fused_bn_relu_convs(x, bn: nn.BatchNorm2d, *convs: nn.Conv2d, backend: str = "auto"):
    """conv(relu(bn(x))) for each conv in ``convs``, one BN statistics pass and running-stat update.

    x: [N, C, H, W]. Returns one tensor per conv (a tuple when there are several).
    """
    check_input(x, convs[0])
    if x.numel() == 0:
        a = F.relu(bn(x))
        outputs = tuple(conv(a) for conv in convs)
    else:
        outputs = tuple(bn_relu_convs(x, bn, convs, resolve(backend, x.device)))
    return outputs[0] if len(outputs) == 1 else outputs


def _module(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    return gm.get_submodule(node.target) if node.op == "call_module" else None


def _relu_input(gm: fx.GraphModule, node: fx.Node) -> fx.Node | None:
    """The input of a ReLU node (module, function or method form), or None if node is not a ReLU."""
    if node.op == "call_module" and isinstance(_module(gm, node), nn.ReLU):
        return node.args[0]
    if node.op == "call_function" and node.target in _RELU_FUNCTIONS:
        return node.args[0] if node.args else node.kwargs.get("input")
    if node.op == "call_method" and node.target in _RELU_METHODS:
        return node.args[0]
    return None


def _bn_relu_source(gm: fx.GraphModule, act: fx.Node):
    """(bn node, nodes to remove) if ``act`` is relu(bn(x)) by a BatchNorm2d module, else a reason."""
    module = _module(gm, act)
    if module is not None and _combined_activation(module) is not None:
        return act, [act]
    bn = _relu_input(gm, act)
    if not isinstance(bn, fx.Node):
        return None
    bn_module = _module(gm, bn)
    if type(bn_module) not in _PLAIN_BATCH_NORMS:
        return None
    if len(bn.users) != 1:
        return "the BatchNorm output is also used without the ReLU"
    return bn, [act, bn]


def _convertible_conv(gm: fx.GraphModule, node: fx.Node, act: fx.Node):
    module = _module(gm, node)
    if type(module) is not nn.Conv2d or node.args[:1] != (act,) or len(node.args) != 1 or node.kwargs:
        return None, "the activation is used by something other than a Conv2d module"
    try:
        conv_geometry(module)
    except ValueError as err:
        return None, str(err)
    return module, None


def convert(model: nn.Module, filter_fn: Callable[[str, nn.Conv2d], bool] | None = None,
            backend: str = "auto") -> fx.GraphModule:
    """Rewrite BatchNorm2d -> ReLU -> Conv2d chains of ``model`` into fused ops.

    filter_fn(conv_name, conv) -> bool selects which convs may be fused (all convs reading one
    BN-ReLU must be accepted, since the BN runs once). Returns a GraphModule sharing the model's
    parameters and buffers, with the same state_dict keys; ``.fusion_report`` (a FusionReport)
    lists what was fused and what was left unfused and why. Raises ConversionError naming the
    submodule torch.fx could not trace.
    """
    tracer = _Tracer()
    try:
        graph = tracer.trace(model)
    except Exception as err:  # fx raises many kinds; report where, not a deep traceback
        where = tracer.path[-1] if tracer.path else type(model).__name__
        raise ConversionError(
            f"cannot convert {type(model).__name__}: torch.fx failed to trace {where!r} "
            f"({type(err).__name__}: {err}). Convert the traceable submodules instead, e.g. "
            f"model.{where} = convert(model.{where}) for a part without data-dependent control flow."
        ) from None
    gm = fx.GraphModule(model, graph, class_name=type(model).__name__)
    report = FusionReport()
    for act in list(gm.graph.nodes):
        if act.graph is None:  # erased by an earlier rewrite
            continue
        source = _bn_relu_source(gm, act)
        if source is None:
            continue
        if isinstance(source, str):
            report.skipped.append((str(act.target), source))
            continue
        bn, removable = source
        users = list(act.users)
        checked = [(user, *_convertible_conv(gm, user, act)) for user in users]
        reason = next((why for _, _, why in checked if why), None)
        if reason is None and filter_fn is not None:
            reason = next((f"filter_fn rejected {u.target}" for u, m, _ in checked if not filter_fn(u.target, m)), None)
        if not users or reason:
            report.skipped.append((str(bn.target), reason or "the activation has no users"))
            continue
        _rewrite(gm, bn, act, [u for u, _, _ in checked], removable, backend)
        report.fused.append((str(bn.target), tuple(str(u.target) for u in users)))
    gm.graph.lint()
    gm.recompile()
    gm.fusion_report = report
    return gm


def _rewrite(gm, bn, act, convs, removable, backend):
    """Replace ``convs`` reading relu(bn(x)) by one fused_bn_relu_convs call; erase the old nodes."""
    graph = gm.graph
    with graph.inserting_before(convs[0] if len(convs) == 1 else _first(graph, convs)):
        bn_attr = graph.get_attr(bn.target)
        conv_attrs = [graph.get_attr(c.target) for c in convs]
        fused = graph.call_function(fused_bn_relu_convs, (bn.args[0], bn_attr, *conv_attrs), {"backend": backend})
        outputs = [fused] if len(convs) == 1 else [graph.call_function(operator.getitem, (fused, i)) for i in range(len(convs))]
    for conv, out in zip(convs, outputs):
        conv.replace_all_uses_with(out)
        graph.erase_node(conv)
    for node in removable:
        graph.erase_node(node)


def _first(graph: fx.Graph, nodes: list[fx.Node]) -> fx.Node:
    wanted = set(nodes)
    return next(n for n in graph.nodes if n in wanted)
