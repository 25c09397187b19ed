"""Per-sample transforms on uint8 image tensors (torchvision v2)."""

from collections.abc import Sequence

import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2 as T

EVAL_CROP_PCT = 0.875


def match_channels(channels: int) -> T.Transform:
    """Replicate grayscale to RGB or convert RGB to grayscale so images fit the model."""

    def convert(image: torch.Tensor) -> torch.Tensor:
        if image.shape[0] == channels:
            return image
        if image.shape[0] == 1:
            return image.expand(channels, -1, -1)
        return T.functional.rgb_to_grayscale(image, num_output_channels=1)

    return T.Lambda(convert)


def to_normalized(mean: Sequence[float], std: Sequence[float]) -> T.Compose:
    """uint8 -> float in [0, 1] -> normalised by mean/std."""
    return T.Compose([T.ToDtype(torch.float32, scale=True), T.Normalize(list(mean), list(std))])


def crop_flip(img_size: int, scale: Sequence[float], hflip: bool) -> list[T.Transform]:
    """RandomResizedCrop (bicubic) and optional horizontal flip."""
    ops: list[T.Transform] = [
        T.RandomResizedCrop(
            img_size, scale=tuple(scale), interpolation=InterpolationMode.BICUBIC, antialias=True
        )
    ]
    if hflip:
        ops.append(T.RandomHorizontalFlip())
    return ops


def mae_transform(
    img_size: int,
    channels: int,
    mean: Sequence[float],
    std: Sequence[float],
    scale: Sequence[float] = (0.2, 1.0),
    hflip: bool = True,
) -> T.Compose:
    """MAE pretraining augmentation: crop (scale 0.2-1, bicubic) + flip + normalise."""
    return T.Compose(
        [match_channels(channels), *crop_flip(img_size, scale, hflip), to_normalized(mean, std)]
    )


def eval_transform(
    img_size: int, source_size: int, channels: int, mean: Sequence[float], std: Sequence[float]
) -> T.Compose:
    """Deterministic evaluation view: resize to ``img_size / 0.875`` + centre crop, unless the
    source already has the model's size (then no resampling at all)."""
    ops: list[T.Transform] = [match_channels(channels)]
    if source_size != img_size:
        resize = round(img_size / EVAL_CROP_PCT) if source_size > img_size else img_size
        ops += [
            T.Resize(resize, interpolation=InterpolationMode.BICUBIC, antialias=True),
            T.CenterCrop(img_size),
        ]
    return T.Compose([*ops, to_normalized(mean, std)])
