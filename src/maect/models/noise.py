"""Noise-level conditioning of CAN's decoder: a sinusoidal embedding of σ, then a small MLP."""

import torch
from torch import nn

from maect.models.vit import init_mae_weights


def sinusoidal_embedding(
    values: torch.Tensor, dim: int, max_period: float = 10000.0
) -> torch.Tensor:
    """Sine-cosine embedding of scalars, the Transformer / diffusion-timestep convention.

    Channel ``i < dim / 2`` is ``sin(v * ω_i)`` and channel ``dim / 2 + i`` is ``cos(v * ω_i)`` with
    ``ω_i = max_period ** (-i / (dim / 2))``. Computed in float32 on the device of ``values``.

    Args:
        values: ``[B]`` scalars (e.g. rescaled noise levels).
        dim: Embedding width (even).
        max_period: Longest wavelength.

    Returns:
        ``[B, dim]`` float32 embedding.
    """
    if dim % 2:
        raise ValueError(f"sinusoidal embedding needs an even dimension, got {dim}")
    half = dim // 2
    exponent = torch.arange(half, device=values.device, dtype=torch.float32) / half
    angles = values.float().unsqueeze(-1) * max_period ** (-exponent)
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)


class NoiseLevelEmbedding(nn.Module):
    """CAN's noise-level embedding ``MLP(sinusoid(σ / σ_max · scale))``, MLP = Linear–ReLU–Linear.

    σ is rescaled before the sinusoid because raw levels (σ ≤ 0.1) barely move its phases: mapped to
    ``[0, scale]`` (``scale`` = 1000 spans the range of diffusion timesteps), levels that differ by
    a fraction of σ_max give clearly different embeddings.

    Args:
        dim: Sinusoid width, MLP hidden width and output width (the decoder width).
        sigma_max: Largest noise standard deviation, > 0; levels lie in ``[0, sigma_max]``.
        scale: Value that ``sigma_max`` is mapped to before the sinusoid.
    """

    def __init__(self, dim: int, sigma_max: float, scale: float = 1000.0) -> None:
        super().__init__()
        if sigma_max <= 0:
            raise ValueError(f"sigma_max must be > 0, got {sigma_max}")
        self.dim = dim
        self.sigma_max = sigma_max
        self.scale = scale
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(inplace=True), nn.Linear(dim, dim))
        self.apply(init_mae_weights)

    def forward(self, sigma: torch.Tensor) -> torch.Tensor:
        """Embed per-sample noise levels ``[B]`` into ``[B, dim]``."""
        levels = sinusoidal_embedding(sigma / self.sigma_max * self.scale, self.dim)
        return self.mlp(levels.to(self.mlp[0].weight.dtype))
