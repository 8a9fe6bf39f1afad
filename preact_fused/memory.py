"""Activation memory, measured: bytes saved for backward by one training-mode forward pass."""
from __future__ import annotations

import torch
from torch import nn


def count_saved_bytes(model: nn.Module, *inputs) -> int:
    """Bytes of the unique storages autograd saves for backward in one training-mode forward.

    The model's own parameters and buffers are left out (they are alive anyway): what remains is
    the activation memory. The model's buffers (BatchNorm running statistics) and the train/eval
    mode of every module are restored afterwards, so counting does not change the model.
    """
    own = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    seen: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in own:
            seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    modes = [(module, module.training) for module in model.modules()]
    model.train()
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(*inputs)
    finally:
        for module, training in modes:
            module.training = training
        with torch.no_grad():
            for name, b in model.named_buffers():
                b.copy_(buffers[name])
    return sum(seen.values())
