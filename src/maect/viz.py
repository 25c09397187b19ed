"""Image grids for reconstructions."""

from collections.abc import Sequence
from pathlib import Path

import torch
from torchvision.utils import make_grid, save_image


def denormalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Undo mean/std normalisation and clamp to ``[0, 1]``."""
    m = torch.tensor(mean, device=images.device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=images.device).view(1, -1, 1, 1)
    return (images.float() * s + m).clamp(0.0, 1.0)


def image_grid(
    rows: Sequence[torch.Tensor], mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """One grid image ``[3, H, W]``: each element of ``rows`` is a batch shown as one row."""
    stacked = torch.cat([denormalize(r.detach().cpu(), mean, std) for r in rows])
    return make_grid(stacked, nrow=len(rows[0]), padding=1, pad_value=1.0)


def save_grid(grid: torch.Tensor, path: Path) -> None:
    """Write a grid as PNG, creating the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(grid, str(path))
