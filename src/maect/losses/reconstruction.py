"""Masked-patch reconstruction (MAE) and visible-patch noise prediction (CAN) losses."""

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


def noise_prediction_mse(
    pred: torch.Tensor, noise: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """CAN's denoising loss: mean squared error per patch against the added noise, averaged over
    the *visible* patches (``mask`` 0), the complement of the patches :func:`masked_mse` scores.

    Args:
        pred: ``[B, N, P]`` decoder predictions.
        noise: ``[B, N, P]`` patchified noise target (CAN uses the unit-variance ε, not σ·ε).
        mask: ``[B, N]`` MAE mask, 1 = masked (not counted), 0 = visible (counted).
    """
    return masked_mse(pred, noise, 1.0 - mask.float())
