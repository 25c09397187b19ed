"""Conversion between images and sequences of flattened patches (MAE's ``patchify``)."""

import torch


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Split images ``[B, C, H, W]`` into patches ``[B, N, p*p*C]`` in row-major patch order.

    Each patch is flattened as ``(p, p, C)``, the layout of facebookresearch/mae.
    """
    batch, channels, height, width = images.shape
    if height % patch_size or width % patch_size:
        raise ValueError(f"image size {height}x{width} is not divisible by patch size {patch_size}")
    rows, cols = height // patch_size, width // patch_size
    x = images.reshape(batch, channels, rows, patch_size, cols, patch_size)
    x = torch.einsum("bchpwq->bhwpqc", x)
    return x.reshape(batch, rows * cols, patch_size * patch_size * channels)


def unpatchify(patches: torch.Tensor, patch_size: int, channels: int) -> torch.Tensor:
    """Inverse of :func:`patchify` for a square grid: ``[B, N, p*p*C]`` -> ``[B, C, H, W]``."""
    batch, num_patches, dim = patches.shape
    side = int(round(num_patches**0.5))
    if side * side != num_patches or dim != patch_size * patch_size * channels:
        raise ValueError(
            f"cannot unpatchify {tuple(patches.shape)} with patch size {patch_size} "
            f"and {channels} channels (needs a square grid and dim p*p*C)"
        )
    x = patches.reshape(batch, side, side, patch_size, patch_size, channels)
    x = torch.einsum("bhwpqc->bchpwq", x)
    return x.reshape(batch, channels, side * patch_size, side * patch_size)
