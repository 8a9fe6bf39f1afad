"""Whole training steps as CUDA graphs: forward, backward and the optimizer step captured once, replayed.

A ResNet-1001 step launches a few thousand kernels; at batch 128 launching them from Python can take
as long as running them. ``GraphedStep`` captures the whole step (the model's forward, the loss,
backward and ``optimizer.step()``) into one ``torch.cuda.CUDAGraph`` and replays it, so the host
issues one launch per step::

    step = GraphedStep(lambda x, y: F.cross_entropy(model(x), y), optimizer)
    for x, y in batches:
        loss = step(x, y)          # the first ``warmup`` calls run eagerly, then capture + replay

The protocol is the one of PyTorch's "whole-network capture" (``torch.cuda.graph`` documentation):

* warm-up: the first ``warmup`` (default 3) calls are ordinary training steps run on a side stream.
  They are real steps of the run (the weights move as they would without graphs), and they let
  everything that happens once happen outside the graph: the optimizer's momentum buffers are
  created, cuDNN's algorithm search (``cudnn.benchmark``) and Triton's autotuning run, lazy
  initialisations allocate.
* capture: on the next call the inputs are copied into static buffers, gradients are set to None
  and one step is captured (capture records kernels, it does not run them); the graph is then
  replayed for that call's step. Backward allocates the gradients inside the graph's memory pool;
  each replay overwrites them in place (nothing is zeroed inside the graph, which is right because
  they were None when captured: backward assigns instead of accumulating).
* replay: every later call copies its inputs into the static buffers and replays; the returned loss
  is a copy (the static loss is overwritten by the next replay).

The optimizer's step must be free of host synchronisation. ``torch.optim.SGD`` is (it has no step
counter and its momentum buffers exist after the warm-up) but it has no ``capturable`` option: its
learning rate, momentum and weight decay are Python floats baked into the captured kernels. A
learning-rate schedule therefore triggers a new capture: before each replay the parameter groups'
hyperparameters are compared with those captured, and a change (the paper's schedule makes three:
the end of the warm-up and the two divisions by 10) captures the step again. The arithmetic stays
torch's own SGD, bit for bit the un-graphed update, which a hand-written update reading the rate
from a device tensor would not be (a separate multiply rounds differently from ``add_(alpha=)``).
Optimizers with a ``capturable`` option (Adam, AdamW, ...) get it switched on.
``torch.amp.GradScaler`` (fp16) synchronises on every step and cannot be captured; bf16 autocast
can (use ``torch.autocast(..., cache_enabled=False)`` inside the loss function). Input shapes are
fixed at capture: a call with other shapes raises ``ValueError`` (e.g. a smaller last batch: drop it).

``emulate=True`` replaces the CUDA graph by a recorder that re-runs the captured function on the
static buffers (any device): it exercises everything but the graph itself, for tests on a CPU.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

__all__ = ["GraphedStep", "graph_unsupported_reason"]


def graph_unsupported_reason(device: torch.device | str) -> str | None:
    """Why whole-step CUDA graphs cannot run on ``device``, or None."""
    device = torch.device(device)
    if device.type != "cuda":
        return f"CUDA graphs need a CUDA device (this run: {device.type})"
    if not torch.cuda.is_available():
        return "CUDA graphs need a CUDA device (torch.cuda.is_available() is False)"
    return None


class _EmulatedGraph:
    """Stands in for ``torch.cuda.CUDAGraph`` off a GPU: ``capture`` records the function (and runs
    it), ``replay`` runs it again and writes its output into the captured output tensor. Inputs come
    from the same static buffers as a real graph's. Before each replay ``reset`` runs: a real replay
    overwrites the gradients its backward allocated, a re-run would accumulate into them."""

    def __init__(self, reset):
        self.fn, self.out, self.reset = None, None, reset
        self.replays = 0

    def capture(self, fn):
        self.fn = fn
        self.out = fn()
        return self.out

    def replay(self):
        self.replays += 1
        self.reset()
        self.out.copy_(self.fn())


class GraphedStep:
    """A training step ``loss = loss_fn(*inputs); loss.backward(); optimizer.step()``, replayed as one
    CUDA graph after ``warmup`` eager steps. Call it like the step: ``loss = step(*inputs)``.

    ``loss_fn(*inputs)`` must return a scalar tensor and, after warm-up, launch the same kernels on
    every call (no data-dependent Python control flow, no host syncs such as ``.item()``).
    ``before_step`` (optional) runs after backward and before ``optimizer.step()`` inside the graph
    (e.g. gradient clipping, averaging). The optimizer's state and the model's parameters and
    buffers are updated in place by every replay, so the model can be evaluated or checkpointed
    between steps as usual; do not replace its tensors (``load_state_dict`` copies in place and is
    fine; ``model.to(...)`` after capture is not).
    """

    def __init__(self, loss_fn: Callable[..., torch.Tensor], optimizer: torch.optim.Optimizer,
                 warmup: int = 3, before_step: Callable[[], None] | None = None, emulate: bool = False):
        if warmup < 1:
            raise ValueError("GraphedStep needs at least one warm-up step (the optimizer's state and "
                             "lazy initialisations must exist before capture)")
        self.loss_fn, self.optimizer, self.warmup = loss_fn, optimizer, warmup
        self.before_step, self.emulate = before_step, emulate
        self.steps = 0                     # calls so far (warm-up included)
        self.graph = None
        self.static_inputs: list[torch.Tensor] | None = None
        self.static_loss: torch.Tensor | None = None
        self.captures = 0                  # how many times the step was captured
        self.captured_hyperparameters = None
        for group in optimizer.param_groups:   # Adam(W) and friends: keep their step on the device
            if "capturable" in group:
                group["capturable"] = True

    @property
    def captured(self) -> bool:
        return self.graph is not None

    # -- one step without a graph ---------------------------------------------------------------------
    def _eager_step(self, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss_fn(*inputs)
        loss.backward()
        if self.before_step is not None:
            self.before_step()
        self.optimizer.step()
        return loss.detach()

    def _captured_body(self) -> torch.Tensor:
        loss = self.loss_fn(*self.static_inputs)
        loss.backward()
        if self.before_step is not None:
            self.before_step()
        self.optimizer.step()
        return loss.detach()

    # -- the call ---------------------------------------------------------------------------------------
    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        if self.steps < self.warmup:
            loss = self._warmup_step(inputs)
        else:
            if self.graph is not None and self._hyperparameters() != self.captured_hyperparameters:
                self.release()                      # e.g. the learning rate changed: capture again
            if self.graph is None:
                self._capture(inputs)
                self.captures += 1
                if not self.emulate:                # a real capture ran nothing: run the step now
                    self.graph.replay()
            else:
                self._load(inputs)
                self.graph.replay()
            loss = self.static_loss.clone()
        self.steps += 1
        return loss

    def _hyperparameters(self) -> list:
        """The parameter groups' scalar settings (lr, momentum, ...), as the graph would bake them in."""
        return [{k: v for k, v in group.items() if k != "params" and isinstance(v, (int, float, bool))}
                for group in self.optimizer.param_groups]

    def release(self) -> None:
        """Drop the graph and its static buffers (the next call captures again)."""
        self.graph = self.static_inputs = self.static_loss = None

    def _side_stream(self, device: torch.device):
        if self.emulate or device.type != "cuda":
            return None
        return torch.cuda.Stream(device)

    def _warmup_step(self, inputs) -> torch.Tensor:
        device = inputs[0].device if inputs else torch.device("cpu")
        side = self._side_stream(device)
        if side is None:
            return self._eager_step(inputs)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            loss = self._eager_step(inputs)
        torch.cuda.current_stream(device).wait_stream(side)
        return loss

    def _load(self, inputs) -> None:
        if len(inputs) != len(self.static_inputs):
            raise ValueError(f"GraphedStep captured {len(self.static_inputs)} inputs, got {len(inputs)}")
        for static, new in zip(self.static_inputs, inputs):
            if static.shape != new.shape or static.dtype != new.dtype:
                raise ValueError(f"GraphedStep: input {tuple(new.shape)} {new.dtype} differs from the captured "
                                 f"{tuple(static.shape)} {static.dtype} (a graph replays fixed shapes)")
            static.copy_(new)

    def _capture(self, inputs) -> None:
        # Static buffers keep the inputs' memory format (channels_last stays channels_last).
        self.static_inputs = [t.detach().clone() for t in inputs]
        self.optimizer.zero_grad(set_to_none=True)
        self.captured_hyperparameters = self._hyperparameters()
        if self.emulate:   # the recorder runs the step while recording it
            self.graph = _EmulatedGraph(lambda: self.optimizer.zero_grad(set_to_none=True))
            self.static_loss = self.graph.capture(self._captured_body)
            return
        device = self.static_inputs[0].device
        torch.cuda.synchronize(device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.static_loss = self._captured_body()
        self.graph = graph
