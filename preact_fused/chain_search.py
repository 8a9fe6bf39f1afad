"""Finds BatchNorm2d -> ReLU -> Conv2d chains in a model by torch.fx tracing (analysis only).

The traced graph is read, never run: ``convert`` attaches the fusion to the modules themselves.
A chain is a BatchNorm2d module whose output feeds only a ReLU (an ``nn.ReLU`` module, ``F.relu``,
``torch.relu``, ``x.relu()``, in-place variants; or the ReLU folded into a combined norm+activation
module, the way model zoos write ``BatchNormAct2d``), whose output reaches only Conv2d modules, directly
or through pass-through modules (``nn.Identity``, dropout with p=0). Every call of that BN in the
graph must be such a chain.

Tracing stops at modules with nothing to fuse (no BatchNorm2d, no Conv2d inside): they stay single
calls in the graph, whatever their forward does. A module whose forward torch.fx cannot trace (data
dependent control flow, ...) is kept as a single call too and its children are searched on their own.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .validation import conv_geometry

_RELU_FUNCTIONS = {F.relu, torch.relu, torch.relu_, F.relu_}
_RELU_METHODS = {"relu", "relu_"}
# SyncBatchNorm is not a BatchNorm2d subclass; subclasses of these are combined modules or plain.
_BATCH_NORMS = (nn.BatchNorm2d, nn.SyncBatchNorm)
_DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)
_IN_PLACE_OPERATORS = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
                       operator.imod, operator.ipow, operator.imatmul, operator.iand, operator.ior,
                       operator.ixor, operator.ilshift, operator.irshift}
_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


@dataclass
class Chain:
    """A fusable chain: BN ``bn_name`` (combined: a norm+activation module) read by ``conv_names``."""
    bn_name: str
    bn: nn.BatchNorm2d
    combined: bool
    conv_names: tuple[str, ...]
    convs: tuple[nn.Conv2d, ...]


@dataclass
class Search:
    """What ``find_chains`` found: ``chains``, ``skipped`` (BN name, reason), ``untraced`` (module, reason)."""
    chains: list[Chain] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    untraced: list[tuple[str, str]] = field(default_factory=list)


def combined_activation(module: nn.Module) -> bool:
    """Whether ``module`` is a BatchNorm2d subclass computing relu(bn(x)): an ``act`` / ``activation``
    ``nn.ReLU`` and no dropout (``drop`` absent or ``nn.Identity``)."""
    if type(module) in _BATCH_NORMS or not isinstance(module, _BATCH_NORMS):
        return False
    act = getattr(module, "act", getattr(module, "activation", None))
    drop = getattr(module, "drop", None)
    return isinstance(act, nn.ReLU) and (drop is None or isinstance(drop, nn.Identity))


def _worth_tracing(root: nn.Module) -> set[int]:
    """ids of the modules holding a BatchNorm2d or Conv2d (themselves included)."""
    found: set[int] = set()

    def visit(module: nn.Module) -> bool:
        hit = isinstance(module, (*_BATCH_NORMS, nn.Conv2d))
        for child in module.children():
            hit = visit(child) or hit
        if hit:
            found.add(id(module))
        return hit

    visit(root)
    return found


class _Tracer(fx.Tracer):
    """Keeps BN and conv modules whole, does not enter modules with nothing to fuse, and turns a
    submodule that fails to trace into a single call (remembered in ``untraced``)."""

    def __init__(self, root: nn.Module):
        super().__init__()
        self.worth = _worth_tracing(root)
        self.untraced: dict[str, str] = {}

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return (isinstance(m, (*_BATCH_NORMS, nn.Conv2d)) or id(m) not in self.worth
                or qualname in self.untraced or super().is_leaf_module(m, qualname))

    def call_module(self, m, forward, args, kwargs):
        name = self.path_of_module(m)
        if self.is_leaf_module(m, name):
            return super().call_module(m, forward, args, kwargs)
        last, stack = self.graph._root.prev, self.module_stack.copy()
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception as err:  # fx and the module's code raise many kinds; the module becomes a leaf
            while self.graph._root.prev is not last:
                self.graph.erase_node(self.graph._root.prev)
            self.module_stack = stack
            self.untraced[name] = f"{type(err).__name__}: {err}"
            return super().call_module(m, forward, args, kwargs)


def find_chains(model: nn.Module, filter_fn: Callable[[str, nn.Conv2d], bool] | None = None) -> Search:
    """The chains of ``model`` (in graph order), the BN-ReLU pairs left out and why, and the
    modules torch.fx could not trace. filter_fn(conv_name, conv) -> bool may reject convs."""
    search = Search()
    _search(model, "", filter_fn, search)
    return search


def _search(module: nn.Module, prefix: str, filter_fn, search: Search) -> None:
    if isinstance(module, (*_BATCH_NORMS, nn.Conv2d)):
        return  # no chain inside
    tracer = _Tracer(module)
    if id(module) not in tracer.worth:
        return
    try:
        graph = tracer.trace(module)
    except Exception as err:  # the module's own forward: search its children instead
        search.untraced.append((prefix.rstrip(".") or type(module).__name__, f"{type(err).__name__}: {err}"))
        for name, child in module.named_children():
            _search(child, f"{prefix}{name}.", filter_fn, search)
        return
    _read_graph(module, graph, prefix, filter_fn, search)
    for name, reason in tracer.untraced.items():
        search.untraced.append((prefix + name, reason))
        for child_name, child in module.get_submodule(name).named_children():
            _search(child, f"{prefix}{name}.{child_name}.", filter_fn, search)


def _read_graph(root: nn.Module, graph: fx.Graph, prefix: str, filter_fn, search: Search) -> None:
    """Chains of one traced graph: each BN module decided once, over all its calls."""
    calls: dict[int, list[fx.Node]] = {}
    for node in graph.nodes:
        if node.op == "call_module" and isinstance(root.get_submodule(node.target), _BATCH_NORMS):
            calls.setdefault(id(root.get_submodule(node.target)), []).append(node)
    for nodes in calls.values():
        bn = root.get_submodule(nodes[0].target)
        name = prefix + nodes[0].target
        sites = [_site(root, node, prefix, filter_fn) for node in nodes]
        if all(site is None for site in sites):
            continue  # no ReLU after this BN: not a candidate
        reason = _module_reason(bn, "BatchNorm") or next(
            (site if site is not None else "the BatchNorm output is also used without a ReLU"
             for site in sites if not isinstance(site, list)), None)
        if reason is not None:
            search.skipped.append((name, reason))
            continue
        convs = {id(conv): (conv_name, conv) for site in sites for conv_name, conv in site}
        search.chains.append(Chain(name, bn, combined_activation(bn), tuple(n for n, _ in convs.values()),
                                   tuple(c for _, c in convs.values())))


def _module_reason(module: nn.Module, kind: str) -> str | None:
    """Why ``module`` must keep running its own forward, or None."""
    hooks = [name.strip("_").replace("_", " ") for name in _HOOK_DICTS if getattr(module, name, None)]
    if hooks:
        return f"the {kind} has {', '.join(hooks)} (they would see a not yet computed output)"
    if "forward" in module.__dict__:
        return f"the {kind}'s forward is overridden on the instance"
    return None


def _site(root, bn_node: fx.Node, prefix: str, filter_fn):
    """One call of a BN: [(conv name, conv), ...] it feeds, a reason it cannot be fused, or None
    when no ReLU follows it (not a chain)."""
    bn = root.get_submodule(bn_node.target)
    if combined_activation(bn):
        act = bn_node
    else:
        relus = [user for user in bn_node.users if _is_relu(root, user, bn_node)]
        if not relus:
            return None
        if len(bn_node.users) != 1:
            return "the BatchNorm output is also used without the ReLU"
        act = relus[0]
    x = bn_node.args[0] if bn_node.args else None
    if isinstance(x, fx.Node) and any(_in_place(root, user, x) for user in x.users):
        return "its input is modified in place after the BatchNorm reads it"
    consumers = _consumers(root, act)
    if not consumers:
        return "the activation has no users"
    found = []
    for node in consumers:
        module = root.get_submodule(node.target) if node.op == "call_module" else None
        if not isinstance(module, nn.Conv2d):
            return f"the activation is used by {_describe(node)}, not only by Conv2d modules"
        conv_name = prefix + node.target
        reason = _conv_reason(module, node)
        if reason is None and filter_fn is not None and not filter_fn(conv_name, module):
            reason = f"filter_fn rejected {conv_name}"
        if reason is not None:
            return reason if reason.startswith("filter_fn") else f"conv {conv_name!r}: {reason}"
        found.append((conv_name, module))
    return found


def _conv_reason(conv: nn.Conv2d, node: fx.Node) -> str | None:
    if type(conv).forward is not nn.Conv2d.forward:
        return f"{type(conv).__name__} has its own forward"
    if len(node.args) != 1 or node.kwargs:
        return "called with extra arguments"
    if "forward" in conv.__dict__:
        return "its forward is overridden on the instance"
    try:
        conv_geometry(conv)
    except ValueError as err:
        return str(err)
    return None


def _consumers(root, act: fx.Node) -> list[fx.Node]:
    """The users of ``act``, looking through pass-through modules (each used for ``act`` alone)."""
    out = []
    for user in act.users:
        module = root.get_submodule(user.target) if user.op == "call_module" else None
        passes = isinstance(module, nn.Identity) or (isinstance(module, _DROPOUTS) and module.p == 0)
        if passes and user.args == (act,) and not user.kwargs:
            out += _consumers(root, user)
        else:
            out.append(user)
    return out


def _is_relu(root, node: fx.Node, source: fx.Node) -> bool:
    """Whether ``node`` is relu(source): module, function or method form."""
    if node.op == "call_module":
        return isinstance(root.get_submodule(node.target), nn.ReLU) and node.args == (source,)
    if node.op == "call_function" and node.target in _RELU_FUNCTIONS:
        return (node.args[:1] or (node.kwargs.get("input"),)) == (source,)
    return node.op == "call_method" and node.target in _RELU_METHODS and node.args == (source,)


def _in_place(root, node: fx.Node, x: fx.Node) -> bool:
    """Whether ``node`` may modify its argument ``x`` in place."""
    if node.op == "call_method":
        return node.target.endswith("_") and not node.target.startswith("_") and node.args[:1] == (x,)
    if node.op == "call_function":
        name = getattr(node.target, "__name__", "")
        in_place = node.target in _IN_PLACE_OPERATORS or bool(node.kwargs.get("inplace")) \
            or (name.endswith("_") and not name.startswith("_"))
        return in_place and node.args[:1] == (x,)
    if node.op == "call_module":
        return bool(getattr(root.get_submodule(node.target), "inplace", False)) and node.args[:1] == (x,)
    return False


def _describe(node: fx.Node) -> str:
    if node.op == "call_module":
        return repr(node.target)
    if node.op == "output":
        return "the output"
    return getattr(node.target, "__name__", str(node.target))
