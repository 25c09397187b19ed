"""The 15 common corruptions of ImageNet-C at 5 severities, deterministic and for any image size.

The corruption functions are those of the ``imagecorruptions`` package (Michaelis et al.'s
re-implementation of Hendrycks & Dietterich's ImageNet-C code), installed from its maintained
fork ``imagecorruptions-imaug`` (same module name): the original release (1.1.2, 2020) no longer
imports with current setuptools (``pkg_resources``) and breaks on NumPy 2 (``fog``) and
scikit-image >= 0.19 (``glass_blur``). What the package lacks is written here:

- **Determinism.** The package draws from NumPy's global generator (and, for ``glass_blur`` and
  ``impulse_noise``, from a ``seed`` argument). :func:`corrupt_image` seeds both from one integer
  and restores the global state afterwards, so the same image, corruption, severity and seed
  give the same pixels. :func:`image_seed` derives that integer from (seed, corruption, image
  index) and not from the severity: the five severities of one image share their random draws
  (the same noise pattern, frost crop, fog map, scaled), so accuracy against severity is not
  blurred by independent draws.
- **Small images.** ``corrupt()`` refuses images under 32 px, and the ImageNet-C parameters of
  the spatial corruptions (blur radii, glass-blur displacement, snow flakes, frost texture,
  elastic field) are in pixels of a 224-px image: on a 28-px image the same radius would wipe it
  out. So :data:`RESCALED` corruptions run on the image enlarged (nearest) by the integer factor
  ``round(224 / min(H, W))`` and are reduced back by averaging each factor x factor block (an
  exact inverse of the enlargement): a blur covers the same fraction of the image as in
  ImageNet-C. The others act per pixel (noise, brightness, contrast, JPEG's 8-px blocks,
  pixelate's 1.7-4-px blocks) or relative to the image (fog's fractal) and run at the image's own
  size, where their strength per pixel is the ImageNet-C one (enlarging first would average the
  noise and the blocks away). Images of 224 px and more are corrupted as they are.
- **One channel.** The package works on RGB: a grayscale image is corrupted as its RGB replica
  and channel 0 of the result is kept. The three channels stay equal for every corruption but
  the noises (drawn per channel: one channel keeps their per-pixel strength, an average would
  weaken them) and frost (a colour texture; channels differ by at most a few levels).
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable, Iterator

import numpy as np
import torch

from maect.data.datasets import ImageDataset

# ImageNet-C's 15 common corruptions, in its order (noise, blur, weather, digital).
CORRUPTIONS = (
    "gaussian_noise",
    "shot_noise",
    "impulse_noise",
    "defocus_blur",
    "glass_blur",
    "motion_blur",
    "zoom_blur",
    "snow",
    "frost",
    "fog",
    "brightness",
    "contrast",
    "elastic_transform",
    "pixelate",
    "jpeg_compression",
)
SEVERITIES = (1, 2, 3, 4, 5)
FAMILIES = {
    "noise": CORRUPTIONS[0:3],
    "blur": CORRUPTIONS[3:7],
    "weather": CORRUPTIONS[7:10],
    "digital": CORRUPTIONS[10:15],
}
REFERENCE_SIZE = 224  # the image size the ImageNet-C parameters were chosen for
# Corruptions whose parameters are in pixels of a REFERENCE_SIZE image: run on the enlarged image.
RESCALED = frozenset(
    {"defocus_blur", "glass_blur", "motion_blur", "zoom_blur", "snow", "frost", "elastic_transform"}
)
_SEED_ARGUMENT = frozenset({"glass_blur", "impulse_noise"})  # take their own ``seed=`` too


def image_seed(seed: int, corruption: str, index: int) -> int:
    """The seed of one image's corruption: a 32-bit hash of (seed, corruption, index).

    The severity is deliberately not part of it (module doc)."""
    text = f"{seed}:{corruption}:{index}".encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:4], "little")


@contextlib.contextmanager
def _numpy_seeded(seed: int) -> Iterator[None]:
    """NumPy's global generator seeded with ``seed`` inside the block, restored after it."""
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)


def scale_factor(corruption: str, height: int, width: int) -> int:
    """How much a ``height`` x ``width`` image is enlarged before ``corruption`` (module doc)."""
    if corruption not in RESCALED:
        return 1
    return max(1, round(REFERENCE_SIZE / min(height, width)))


def corrupt_image(image: torch.Tensor, corruption: str, severity: int, seed: int) -> torch.Tensor:
    """``image`` with one ImageNet-C corruption at one severity, deterministic in ``seed``.

    Args:
        image: uint8 ``[C, H, W]`` with 1 or 3 channels, any size.
        corruption: One of :data:`CORRUPTIONS`.
        severity: 1 to 5.
        seed: Seed of the corruption's random draws (see :func:`image_seed`).

    Returns:
        The corrupted image, uint8 ``[C, H, W]`` like ``image``.

    Raises:
        ValueError: For an unknown corruption, a severity outside 1-5 or an image that is not
            uint8 ``[1 or 3, H, W]``.
    """
    from imagecorruptions import corruption_dict
    from PIL import Image

    if corruption not in CORRUPTIONS:
        raise ValueError(f"unknown corruption '{corruption}'; choose from {', '.join(CORRUPTIONS)}")
    if severity not in SEVERITIES:
        raise ValueError(f"severity must be one of {SEVERITIES}, got {severity}")
    if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] not in (1, 3):
        raise ValueError(
            f"image must be uint8 [1 or 3, H, W], got {image.dtype} {tuple(image.shape)}"
        )
    channels, height, width = image.shape
    rgb = image.expand(3, -1, -1).permute(1, 2, 0).numpy()
    factor = scale_factor(corruption, height, width)
    if factor > 1:
        rgb = rgb.repeat(factor, axis=0).repeat(factor, axis=1)
    extra = {"seed": seed} if corruption in _SEED_ARGUMENT else {}
    with _numpy_seeded(seed):
        out = corruption_dict[corruption](
            Image.fromarray(np.ascontiguousarray(rgb)), severity, **extra
        )
    out = np.asarray(out).astype(np.uint8)  # as imagecorruptions.corrupt(): floats truncated
    if out.ndim == 2:
        out = np.stack([out] * 3, axis=-1)
    if factor > 1:
        blocks = out.reshape(height, factor, width, factor, 3).astype(np.float64)
        out = np.rint(blocks.mean(axis=(1, 3))).astype(np.uint8)
    result = torch.from_numpy(np.ascontiguousarray(out)).permute(2, 0, 1)
    return result[:1].contiguous() if channels == 1 else result.contiguous()


class CorruptedDataset(ImageDataset):
    """The images of ``base`` seen through ``view`` (the uint8 evaluation view), then corrupted.

    Image ``i`` is corrupted with :func:`image_seed` ``(seed, corruption, i)``, so the same
    dataset, index, corruption, severity and seed always give the same pixels, in any process
    and with any number of loader workers. ``corruption=None`` gives the clean view (the same
    images, for the clean accuracy). ``transform`` (e.g. the normalisation) applies after the
    corruption; labels are those of ``base``.
    """

    def __init__(
        self,
        base: ImageDataset,
        corruption: str | None,
        severity: int = 0,
        seed: int = 0,
        view: Callable[[torch.Tensor], torch.Tensor] | None = None,
        transform: Callable | None = None,
    ) -> None:
        if corruption is not None and corruption not in CORRUPTIONS:
            raise ValueError(f"unknown corruption '{corruption}'")
        if corruption is not None and severity not in SEVERITIES:
            raise ValueError(f"severity must be one of {SEVERITIES}, got {severity}")
        super().__init__(base.labels, transform)
        self.base = base
        self.corruption = corruption
        self.severity = severity
        self.seed = seed
        self.view = view
        self.num_classes = base.num_classes
        self.channels = base.channels

    def load_image(self, index: int) -> torch.Tensor | None:
        image = self.base.load_image(index)
        if image is None:
            return None
        if self.view is not None:
            image = self.view(image)
        if self.corruption is None:
            return image
        seed = image_seed(self.seed, self.corruption, index)
        return corrupt_image(image, self.corruption, self.severity, seed)
