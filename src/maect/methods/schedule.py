"""Learning-rate schedule and parameter groups."""

import math
from collections.abc import Collection, Iterable

from torch import nn


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> float:
    """Multiplier at ``step``: linear warmup from 0 to 1, then cosine down to ``min_ratio``."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def no_weight_decay(name: str, param: nn.Parameter) -> bool:
    """Biases and other 1-D parameters (norm weights) get no weight decay; the CLS and mask tokens
    do, as in facebookresearch/mae (timm's ``add_weight_decay``), its CAN port and MAE-CT's
    ``OptimizerWrapper``. (The fixed position embeddings are not trained.)"""
    return param.ndim <= 1 or name.endswith(".bias")


def decay_groups(
    named_params: Iterable[tuple[str, nn.Parameter]],
    weight_decay: float,
    lr_scale: float = 1.0,
    exempt: Collection[str] = (),
) -> list[dict]:
    """Split trainable parameters into a weight-decay group and a no-decay group (biases, 1-D
    parameters and the names in ``exempt``)."""
    decay, no_decay = [], []
    for name, param in named_params:
        if not param.requires_grad:
            continue
        skip = name in exempt or no_weight_decay(name, param)
        (no_decay if skip else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": weight_decay, "lr_scale": lr_scale},
        {"params": no_decay, "weight_decay": 0.0, "lr_scale": lr_scale},
    ]
    return [g for g in groups if g["params"]]


def layer_decay_groups(
    encoder: nn.Module,
    depth: int,
    layer_decay: float,
    weight_decay: float,
    exempt: Collection[str] = (),
) -> list[dict]:
    """Groups for the trainable encoder parameters with layer-wise lr decay.

    Block ``j`` (0-based) gets ``layer_decay ** (depth - j)`` (the top block ``layer_decay``); the
    final norm and anything above the blocks get 1; the embeddings ``layer_decay ** (depth + 1)``.
    ``exempt`` names parameters without weight decay besides biases and 1-D parameters.
    """
    by_scale: dict[float, list[tuple[str, nn.Parameter]]] = {}
    for name, param in encoder.named_parameters():
        if name.startswith("blocks."):
            scale = layer_decay ** (depth - int(name.split(".")[1]))
        elif name.startswith(("patch_embed", "cls_token", "pos_embed")):
            scale = layer_decay ** (depth + 1)
        else:
            scale = 1.0
        by_scale.setdefault(scale, []).append((name, param))
    groups: list[dict] = []
    for scale, named in sorted(by_scale.items()):
        groups += decay_groups(named, weight_decay, lr_scale=scale, exempt=exempt)
    return groups
