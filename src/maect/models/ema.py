"""Exponential moving averages of modules (target projector, encoder EMA)."""

import copy

import torch
from torch import nn


@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, momentum: float) -> None:
    """``target <- momentum * target + (1 - momentum) * online`` for parameters; buffers (e.g.
    BatchNorm statistics) are copied from ``online``."""
    target_params = list(target.parameters())
    online_params = [p.detach() for p in online.parameters()]
    torch._foreach_lerp_(target_params, online_params, 1.0 - momentum)
    for target_buffer, online_buffer in zip(target.buffers(), online.buffers(), strict=True):
        target_buffer.copy_(online_buffer)


def frozen_copy(module: nn.Module) -> nn.Module:
    """A deep copy with gradients disabled, used as the starting point of an EMA."""
    clone = copy.deepcopy(module)
    clone.requires_grad_(False)
    return clone
