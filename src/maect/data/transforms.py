"""Per-sample transforms on uint8 image tensors (torchvision v2)."""

from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image
from timm.data import auto_augment, create_transform
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2 as T

EVAL_CROP_PCT = 0.875
SOLARIZE_THRESHOLD = 128  # on the uint8 scale


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


def random_resized_crop(img_size: int, scale: Sequence[float]) -> T.RandomResizedCrop:
    """The crop of every training view: area range ``scale``, aspect ratio 3/4-4/3, bicubic."""
    return T.RandomResizedCrop(
        img_size, scale=tuple(scale), interpolation=InterpolationMode.BICUBIC, antialias=True
    )


def mae_transform(
    img_size: int,
    channels: int,
    mean: Sequence[float],
    std: Sequence[float],
    scale: Sequence[float] = (0.2, 1.0),
    hflip: bool = True,
) -> T.Compose:
    """MAE pretraining augmentation: crop (scale 0.2-1, bicubic) + flip + normalise."""
    return augmented_view(img_size, channels, mean, std, scale, hflip)


class FitToSize:
    """Brings every image to ``size x size`` on its own, whatever the others' sizes: an image of
    exactly that size is kept as is (no resampling); one whose short side is smaller is resized
    (short side to ``size``) and centre-cropped; any other is resized (short side to
    ``size / 0.875``, the usual evaluation crop) and centre-cropped. Bicubic, antialiased."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.crop = T.CenterCrop(size)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        height, width = image.shape[-2:]
        if height == width == self.size:
            return image
        short = min(height, width)
        target = self.size if short < self.size else round(self.size / EVAL_CROP_PCT)
        resize = T.Resize(target, interpolation=InterpolationMode.BICUBIC, antialias=True)
        return self.crop(resize(image))


def eval_view(img_size: int, channels: int) -> T.Compose:
    """The uint8 part of :func:`eval_transform`: channels matched, brought to the model's size by
    :class:`FitToSize` (each image by its own size)."""
    return T.Compose([match_channels(channels), FitToSize(img_size)])


def eval_transform(
    img_size: int, channels: int, mean: Sequence[float], std: Sequence[float]
) -> T.Compose:
    """Deterministic evaluation view of any image: :func:`eval_view`, then normalised."""
    return T.Compose([eval_view(img_size, channels), to_normalized(mean, std)])


def pixel_ops(
    img_size: int,
    hflip: bool = True,
    jitter_p: float = 0.0,
    blur_p: float = 0.0,
    gray_p: float = 0.0,
    solarize_p: float = 0.0,
    jitter: Sequence[float] = (0.4, 0.4, 0.2, 0.1),
) -> list[T.Transform]:
    """The per-pixel random operations of a view after its crop, in order: flip, then (each with
    its probability) colour jitter (brightness, contrast, saturation, hue in random order),
    grayscale, Gaussian blur (sigma 0.1-2, kernel ~10 % of the image) and solarisation
    (threshold 128). They run per sample in the loader, or batched on the device
    (:mod:`maect.data.device_augment`, which reads these objects' probabilities and ranges)."""
    ops: list[T.Transform] = [T.RandomHorizontalFlip()] if hflip else []
    if jitter_p > 0:
        ops.append(T.RandomApply([T.ColorJitter(*jitter)], p=jitter_p))
    if gray_p > 0:
        ops.append(T.RandomGrayscale(p=gray_p))
    if blur_p > 0:
        ops.append(T.RandomApply([T.GaussianBlur(blur_kernel(img_size), (0.1, 2.0))], p=blur_p))
    if solarize_p > 0:
        ops.append(T.RandomSolarize(threshold=SOLARIZE_THRESHOLD, p=solarize_p))
    return ops


def blur_kernel(img_size: int) -> int:
    """Gaussian blur kernel size: the odd number nearest below 10 % of the image, at least 3."""
    return max(3, int(0.1 * img_size) // 2 * 2 + 1)


def augmented_view(
    img_size: int,
    channels: int,
    mean: Sequence[float],
    std: Sequence[float],
    scale: Sequence[float],
    hflip: bool = True,
    **pixel_kw,
) -> T.Compose:
    """One contrastive view: crop, then :func:`pixel_ops` (``pixel_kw``: ``jitter_p``,
    ``blur_p``, ``gray_p``, ``solarize_p``, ``jitter``), then normalisation. No pixel keywords
    gives MAE-CT's ``min`` view. Saturation and hue leave 1-channel images unchanged."""
    return T.Compose(
        [
            match_channels(channels),
            random_resized_crop(img_size, scale),
            *pixel_ops(img_size, hflip, **pixel_kw),
            to_normalized(mean, std),
        ]
    )


class MultiView:
    """Applies one transform per view to the same image and returns the tuple of views."""

    def __init__(self, *views: T.Transform) -> None:
        self.views = views

    def __call__(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(view(image) for view in self.views)


# Named view pairs: per-view keyword arguments of :func:`augmented_view`.
SIMCLR_JITTER = (0.8, 0.8, 0.8, 0.2)  # SimCLR's colour distortion at strength 1
VIEW_PAIRS: dict[str, tuple[dict, dict]] = {
    # MAE-CT_min: crop and flip only.
    "min": ({}, {}),
    # BYOL's asymmetric pair (MAE-CT_aug).
    "byol": (
        {"jitter_p": 0.8, "blur_p": 1.0, "gray_p": 0.2},
        {"jitter_p": 0.8, "blur_p": 0.1, "gray_p": 0.2, "solarize_p": 0.2},
    ),
    # SimCLR's symmetric pair (CAN, SimCLR).
    "simclr": (
        {"jitter_p": 0.8, "blur_p": 0.5, "gray_p": 0.2, "jitter": SIMCLR_JITTER},
        {"jitter_p": 0.8, "blur_p": 0.5, "gray_p": 0.2, "jitter": SIMCLR_JITTER},
    ),
}


def loader_views(views: Sequence[dict], *view_args: Any) -> T.Transform | MultiView:
    """The training transform that makes every view in the loader workers: one
    :func:`augmented_view` per entry of ``views`` (its pixel keywords), all of ``view_args``
    (``img_size, channels, mean, std, scale[, hflip]``); one view gives a tensor, several a
    tuple."""
    made = [augmented_view(*view_args, **kw) for kw in views]
    return made[0] if len(made) == 1 else MultiView(*made)


# Augmentation of MIM-Refiner's local views for each named pair (pixel keywords of
# :func:`pixel_ops`); the official byol pair's local views: jitter 0.8, blur 0.5, gray 0.2.
LOCAL_VIEWS: dict[str, dict] = {
    "min": {},
    "byol": {"jitter_p": 0.8, "blur_p": 0.5, "gray_p": 0.2},
    "simclr": VIEW_PAIRS["simclr"][0],
}


def multi_crop(
    name: str,
    img_size: int,
    local_size: int,
    local_views: int,
    channels: int,
    mean: Sequence[float],
    std: Sequence[float],
    scale: Sequence[float],
    local_scale: Sequence[float],
    hflip: bool = True,
) -> MultiView:
    """MIM-Refiner's views, all made in the loader: the named pair's two global views
    (``img_size``, crops of ``scale``) followed by ``local_views`` views of ``local_size`` pixels
    (crops of ``local_scale``) with the pair's local augmentation (:data:`LOCAL_VIEWS`)."""
    pair = [
        augmented_view(img_size, channels, mean, std, scale, hflip, **kw) for kw in VIEW_PAIRS[name]
    ]
    local = augmented_view(local_size, channels, mean, std, local_scale, hflip, **LOCAL_VIEWS[name])
    return MultiView(*pair, *[local] * local_views)


def posterize(img: Image.Image, bits_to_keep: int, **kwargs) -> Image.Image:
    """timm's posterize op with the behaviour it was written for: keeping 0 bits leaves a black
    image (Pillow >= 12 raises instead, which RandAugment reaches at magnitude 10)."""
    if bits_to_keep <= 0:
        return img.point(lambda _: 0)
    return auto_augment.posterize(img, bits_to_keep, **kwargs)


def finetune_transform(
    img_size: int,
    channels: int,
    mean: Sequence[float],
    std: Sequence[float],
    scale: Sequence[float] = (0.08, 1.0),
    hflip: bool = True,
    auto_augment_policy: str = "rand-m9-mstd0.5-inc1",
    reprob: float = 0.25,
) -> T.Compose:
    """Fine-tuning augmentation of facebookresearch/mae (DeiT's, built by timm's
    ``create_transform``): random resized crop (bicubic) + flip, RandAugment
    ``auto_augment_policy`` (empty: none; no colour jitter either way), normalisation, random
    erasing with probability ``reprob`` (per-pixel normal noise). timm's ops draw from Python's
    and NumPy's generators, which the training loader seeds per sample
    (:class:`maect.data.loader.SeededItems`)."""
    stages = create_transform(
        img_size,
        is_training=True,
        scale=tuple(scale),
        hflip=0.5 if hflip else 0.0,
        color_jitter=None,
        auto_augment=auto_augment_policy or None,
        interpolation="bicubic",
        mean=tuple(mean),
        std=tuple(std),
        re_prob=reprob,
        re_mode="pixel",
        re_count=1,
        separate=True,
    )
    for transform in stages[1].transforms:
        for op in getattr(transform, "ops", ()):
            if op.name.startswith("Posterize"):
                op.aug_fn = posterize
    return T.Compose([match_channels(channels), T.ToPILImage(), *stages])
