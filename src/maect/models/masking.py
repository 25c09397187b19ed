"""Per-sample random masking of token sequences (MAE)."""

from dataclasses import dataclass

import torch


@dataclass
class Masking:
    """Result of :func:`random_masking`.

    Attributes:
        visible: Kept tokens ``[B, K, D]`` in the order given by ``ids_keep``.
        mask: ``[B, N]`` with 1 at masked positions and 0 at visible ones (original order).
        ids_keep: Indices of the kept tokens ``[B, K]``.
        ids_restore: Permutation ``[B, N]`` that puts ``[visible, masked]`` back in original order.
    """

    visible: torch.Tensor
    mask: torch.Tensor
    ids_keep: torch.Tensor
    ids_restore: torch.Tensor


def num_visible(num_tokens: int, mask_ratio: float) -> int:
    """Number of tokens kept: ``round(N * (1 - ratio))``, at least one."""
    return max(1, round(num_tokens * (1.0 - mask_ratio)))


def random_masking(
    tokens: torch.Tensor, mask_ratio: float, generator: torch.Generator | None = None
) -> Masking:
    """Keep a random subset of tokens per sample: argsort of uniform noise, no Python loops.

    Args:
        tokens: ``[B, N, D]`` token sequence (without CLS).
        mask_ratio: Fraction of tokens to drop, in ``[0, 1)``.
        generator: Optional generator for reproducible masks.
    """
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    batch, length, dim = tokens.shape
    keep = num_visible(length, mask_ratio)
    if keep == length:  # nothing to drop: keep the original order (exact, and no shuffle cost)
        ids_shuffle = torch.arange(length, device=tokens.device).expand(batch, -1)
    else:
        noise = torch.rand(batch, length, device=tokens.device, generator=generator)
        ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :keep]
    visible = torch.gather(tokens, 1, ids_keep.unsqueeze(-1).expand(-1, -1, dim))
    mask = torch.ones(batch, length, device=tokens.device, dtype=tokens.dtype)
    mask[:, :keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return Masking(visible=visible, mask=mask, ids_keep=ids_keep, ids_restore=ids_restore)
