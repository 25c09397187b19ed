"""Masked-patch reconstruction loss (MAE)."""

import torch


def pixel_targets(patches: torch.Tensor, normalize: bool, eps: float = 1e-6) -> torch.Tensor:
    """Reconstruction targets: raw patches, or patches normalised by their own mean and variance."""
    if not normalize:
        return patches
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, keepdim=True)
    return (patches - mean) / (var + eps) ** 0.5


def masked_mse(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Mean squared error per patch, averaged over the patches where ``weight`` is 1.

    Args:
        pred: ``[B, N, P]`` predictions.
        target: ``[B, N, P]`` targets.
        weight: ``[B, N]`` 0/1 weights (the MAE mask: 1 = masked = counted).
    """
    per_patch = (pred.float() - target.float()).pow(2).mean(dim=-1)
    weight = weight.float()
    return (per_patch * weight).sum() / weight.sum().clamp_min(1.0)
