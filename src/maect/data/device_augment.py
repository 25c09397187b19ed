"""Batched view augmentation on the accelerator (``data.augment_on=device``).

The work of :func:`maect.data.transforms.augmented_view` is split in two:

- :class:`CropsForDevice` runs in the loader workers. Per view it makes the view's crop exactly as
  the per-sample path does (the same RandomResizedCrop on the decoded uint8 image, so the crop
  box and its pixels are those of ``augment_on=loader``) and draws the random parameters of the
  view's per-pixel operations (:func:`maect.data.transforms.pixel_ops`) with the same torchvision
  objects and in the same order, from the same per-sample seed: same seed, same draws. Items are
  ``{"pixels": uint8 [C, S, S], "params": float [NUM_PARAMS]}`` (a tuple of them for two views).
- :class:`BatchAugment` runs on the device after the batch is transferred: flip, colour jitter
  (per-sample order and factors), grayscale, Gaussian blur (per-sample sigma, separable) and
  solarisation applied to the whole batch in float32 with torchvision's formulas, then
  normalisation. No random numbers are drawn there, so a resumed run augments exactly as an
  uninterrupted one, and no value is read back to the host.

The per-sample path rounds to uint8 after every colour operation; the batched one stays in
float32, so the two agree to within a few uint8 levels (``tests/test_device_augment.py``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torchvision.transforms import v2 as T
from torchvision.transforms.v2 import functional as TF

from maect.data.transforms import (
    SOLARIZE_THRESHOLD,
    blur_kernel,
    match_channels,
    pixel_ops,
    random_resized_crop,
)

# Layout of one view's parameter vector; the defaults leave the image unchanged.
FLIP, BRIGHTNESS, CONTRAST, SATURATION, HUE = 0, 1, 2, 3, 4
ORDER = slice(5, 9)  # ColorJitter's permutation of (brightness, contrast, saturation, hue)
GRAY, SIGMA, SOLARIZE = 9, 10, 11
NUM_PARAMS = 12
IDENTITY = (0.0, 1.0, 1.0, 1.0, 0.0, 0.0, 1.0, 2.0, 3.0, 0.0, 0.0, 0.0)
JITTER_FACTORS = {
    "brightness_factor": BRIGHTNESS,
    "contrast_factor": CONTRAST,
    "saturation_factor": SATURATION,
    "hue_factor": HUE,
}


def draw_params(ops: Sequence[T.Transform], image: torch.Tensor) -> torch.Tensor:
    """The parameters the per-sample ``ops`` (from :func:`pixel_ops`) would use on ``image``,
    drawn from the torch generator exactly as their ``forward`` draws them (one ``torch.rand(1)``
    against ``p`` per random-apply, then the operation's own ``make_params``)."""
    params = torch.tensor(IDENTITY)
    for op in ops:
        inner = op.transforms[0] if isinstance(op, T.RandomApply) else op
        if torch.rand(1) >= op.p:
            continue
        if isinstance(inner, T.RandomHorizontalFlip):
            params[FLIP] = 1.0
        elif isinstance(inner, T.ColorJitter):
            drawn = inner.make_params([image])
            params[ORDER] = drawn["fn_idx"].float()
            for key, slot in JITTER_FACTORS.items():
                if drawn[key] is not None:
                    params[slot] = drawn[key]
        elif isinstance(inner, T.RandomGrayscale):
            params[GRAY] = 1.0
        elif isinstance(inner, T.GaussianBlur):
            params[SIGMA] = inner.make_params([image])["sigma"][0]
        elif isinstance(inner, T.RandomSolarize):
            params[SOLARIZE] = 1.0
        else:
            raise TypeError(f"no batched version of {type(inner).__name__}")
    return params


class CropsForDevice:
    """Worker half of device augmentation: each view's uint8 crop and its drawn parameters.

    Args:
        views: Pixel keywords of :func:`pixel_ops` per view (``{}``: crop and flip only).
        img_size: Side of the crops.
        channels: Channels the model takes.
        scale: RandomResizedCrop's area range.
        hflip: Whether views are flipped with probability 1/2.
    """

    def __init__(
        self,
        views: Sequence[dict],
        img_size: int,
        channels: int,
        scale: Sequence[float],
        hflip: bool = True,
    ) -> None:
        self.crop = T.Compose([match_channels(channels), random_resized_crop(img_size, scale)])
        self.views = [pixel_ops(img_size, hflip, **kw) for kw in views]

    def __call__(self, image: torch.Tensor) -> dict | tuple[dict, ...]:
        out = []
        for ops in self.views:
            crop = self.crop(image).contiguous()
            out.append({"pixels": crop, "params": draw_params(ops, crop)})
        return out[0] if len(out) == 1 else tuple(out)


class BatchAugment:
    """Device half of device augmentation: the drawn operations on a collated batch.

    Called with what the loader collated from :class:`CropsForDevice` items (a dict, or a list of
    dicts for several views) on the device; returns the normalised float32 views (a tensor, or a
    list of tensors), as ``augment_on=loader`` would have delivered them. All views go through
    the operations as one batch. Operations that no view uses (e.g. every colour operation for
    MAE) are skipped.
    """

    def __init__(
        self, views: Sequence[dict], img_size: int, mean: Sequence[float], std: Sequence[float]
    ) -> None:
        self.mean, self.std = list(mean), list(std)
        self.kernel = blur_kernel(img_size)
        used = {key for kw in views for key, p in kw.items() if key.endswith("_p") and p > 0}
        self.jitter, self.gray = "jitter_p" in used, "gray_p" in used
        self.blur, self.solarize = "blur_p" in used, "solarize_p" in used

    def __call__(self, views: dict | Sequence[dict]) -> torch.Tensor | list[torch.Tensor]:
        if isinstance(views, dict):
            return self.apply(views["pixels"], views["params"])
        out = self.apply(
            torch.cat([v["pixels"] for v in views]), torch.cat([v["params"] for v in views])
        )
        return list(out.split(len(views[0]["pixels"])))

    def apply(self, pixels: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """Normalised float32 ``[B, C, H, W]`` from uint8 crops and ``[B, NUM_PARAMS]``."""
        x = TF.to_dtype(pixels, torch.float32, scale=True)
        p = params.float()
        x = torch.where(per_sample(p[:, FLIP] > 0), x.flip(-1), x)
        if self.jitter:
            x = color_jitter(x, p)
        if self.gray and x.shape[1] == 3:
            x = torch.where(per_sample(p[:, GRAY] > 0), TF.rgb_to_grayscale(x, 3), x)
        if self.blur:
            x = gaussian_blur(x, p[:, SIGMA], self.kernel)
        if self.solarize:
            solarized = per_sample(p[:, SOLARIZE] > 0) & (x >= SOLARIZE_THRESHOLD / 255)
            x = torch.where(solarized, 1.0 - x, x)
        return TF.normalize(x, self.mean, self.std)


def per_sample(values: torch.Tensor) -> torch.Tensor:
    """``[B]`` -> ``[B, 1, 1, 1]`` (broadcast over an image batch)."""
    return values.view(-1, 1, 1, 1)


def color_jitter(x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """ColorJitter with per-sample factors and order: at each of the 4 positions of a sample's
    permutation, brightness, contrast and saturation are blends ``clamp(f x + (1 - f) y)`` with
    ``y`` = 0, the mean gray level or the gray image (torchvision's ``_blend``); hue shifts H in
    HSV space. A factor of 1 (hue 0) leaves the image exactly unchanged. Saturation and hue leave
    1-channel images unchanged, as in torchvision."""
    rgb = x.shape[1] == 3
    for position in range(4):
        op = p[:, ORDER][:, position].long()
        gray = TF.rgb_to_grayscale(x, 1) if rgb else x
        other = torch.where(
            per_sample(op == 1), gray.mean(dim=(1, 2, 3), keepdim=True), gray
        ) * per_sample(op != 0)
        factor = p[:, BRIGHTNESS:HUE].gather(1, op.clamp(max=2).unsqueeze(1)).squeeze(1)
        factor = torch.where((op == 3) | ((op == 2) & (not rgb)), torch.ones_like(factor), factor)
        ratio = per_sample(factor)
        x = (x * ratio + other * (1.0 - ratio)).clamp(0.0, 1.0)
        if rgb:
            shift = p[:, HUE] * (op == 3)
            x = torch.where(per_sample(shift != 0), adjust_hue(x, shift), x)
    return x


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """torchvision's hue adjustment (RGB -> HSV, H + shift mod 1, -> RGB) with a per-sample
    shift ``[B]``; uses torchvision's batched HSV conversions."""
    from torchvision.transforms.v2.functional._color import _hsv_to_rgb, _rgb_to_hsv

    h, s, v = _rgb_to_hsv(x).unbind(dim=1)
    h = (h + per_sample(shift)[:, 0]).remainder(1.0)
    return _hsv_to_rgb(torch.stack((h, s, v), dim=1))


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, kernel: int) -> torch.Tensor:
    """torchvision's Gaussian blur (``kernel`` taps, reflect padding) with a per-sample sigma
    ``[B]``, as two 1-D depthwise convolutions; sigma 0 leaves a sample unchanged."""
    batch, channels, height, width = x.shape
    lim = (kernel - 1) / (2.0 * math.sqrt(2.0))
    grid = torch.linspace(-lim, lim, kernel, device=x.device, dtype=x.dtype)
    safe = torch.where(sigma > 0, sigma, torch.ones_like(sigma)).to(x.dtype)
    weights = torch.softmax(-((grid / safe[:, None]) ** 2), dim=1)
    half = kernel // 2
    delta = (torch.arange(kernel, device=x.device) == half).to(x.dtype)
    weights = torch.where((sigma > 0)[:, None], weights, delta)
    weights = weights.repeat_interleave(channels, dim=0)  # [B * C, kernel]
    flat = F.pad(x.reshape(1, batch * channels, height, width), [half] * 4, mode="reflect")
    flat = F.conv2d(flat, weights.view(-1, 1, 1, kernel), groups=batch * channels)
    flat = F.conv2d(flat, weights.view(-1, 1, kernel, 1), groups=batch * channels)
    return flat.view(batch, channels, height, width)
