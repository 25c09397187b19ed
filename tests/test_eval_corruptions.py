"""ImageNet-C corruptions: the package as maect calls it, the size adaptation, determinism."""

import numpy as np
import pytest
import torch

from maect.data.datasets import make_synthetic
from maect.evaluation.corruptions import (
    CORRUPTIONS,
    RESCALED,
    CorruptedDataset,
    corrupt_image,
    image_seed,
    scale_factor,
)

imagecorruptions = pytest.importorskip("imagecorruptions")


def smooth_images(n: int, size: int = 28, channels: int = 1) -> list[torch.Tensor]:
    """Objects on a background (a lit disc and a bar on a gradient), like a small photo."""
    images = []
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    for i in range(n):
        cy, cx, r = size * (0.3 + 0.1 * i), size * (0.6 - 0.05 * i), size * (0.2 + 0.02 * i)
        disc = ((yy - cy) ** 2 + (xx - cx) ** 2 < r**2).float() * (180 - 20 * i)
        bar = ((xx - size * 0.25).abs() < size * 0.06).float() * 90
        image = 30 + 60 * xx / size + disc + bar
        image = image.clamp(0, 255).to(torch.uint8)[None].expand(channels, -1, -1)
        images.append((image * torch.tensor([1.0, 0.8, 0.6][:channels])[:, None, None]).byte())
    return images


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = (a.double() - b.double()).square().mean().item()
    return 10 * np.log10(255**2 / max(mse, 1e-10))


def test_at_224_rgb_it_is_the_package_seeded():
    """At the size ImageNet-C was made for, the result is imagecorruptions.corrupt's, with
    NumPy's global generator seeded (and the seed passed where the package takes one)."""
    image = smooth_images(1, 224, 3)[0]
    array = image.permute(1, 2, 0).numpy().copy()
    for name in ("gaussian_noise", "motion_blur", "frost", "impulse_noise", "jpeg_compression"):
        ours = corrupt_image(image, name, 3, seed=7)
        extra = {"seed": 7} if name == "impulse_noise" else {}
        np.random.seed(7)
        theirs = imagecorruptions.corrupt(array, 3, name, **extra)
        np.testing.assert_array_equal(ours.permute(1, 2, 0).numpy(), theirs, err_msg=name)


@pytest.mark.parametrize("channels", [1, 3])
def test_every_corruption_on_small_images_is_deterministic(channels):
    """All 15 at 28 px (under the package's 32-px minimum): shape, dtype, same seed -> same
    pixels, another seed -> other pixels for the random ones, and NumPy's state untouched."""
    image = smooth_images(1, 28, channels)[0]
    state = np.random.get_state()
    before = np.random.random()
    np.random.set_state(state)
    for name in CORRUPTIONS:
        out = corrupt_image(image, name, 5, seed=1)
        assert out.shape == image.shape and out.dtype == torch.uint8, name
        assert torch.equal(out, corrupt_image(image, name, 5, seed=1)), name
        assert not torch.equal(out, image), name
    assert np.random.random() == before  # the global generator was restored
    noisy = corrupt_image(image, "gaussian_noise", 3, seed=1)
    assert not torch.equal(noisy, corrupt_image(image, "gaussian_noise", 3, seed=2))


def test_severity_degrades_monotonically():
    """The PSNR to the clean image falls with the severity (mean over a few images; the five
    severities of an image share their random draws): from severity 1 to 5, and at every step
    but three where the ImageNet-C parameters themselves do not move the image farther from the
    clean one: glass blur 3 -> 4 (3 shuffle passes of displacement 2, then 2 passes of 3);
    frost 3 -> 4 (the same frost over the image at weight 0.7, then 0.65: a fainter image,
    which the PSNR does not count as worse where the frost is brighter than the image);
    pixelate 1 -> 2 at 28 px (28 -> 16 -> 28 px blocks straddle pixels, 28 -> 14 -> 28 px
    blocks are exact 2x2 means)."""
    not_monotone = {("glass_blur", 3), ("frost", 3), ("pixelate", 1)}
    images = smooth_images(4)
    for name in CORRUPTIONS:
        seeds = [image_seed(0, name, i) for i in range(len(images))]
        curve = [
            np.mean(
                [
                    psnr(corrupt_image(x, name, s, seed), x)
                    for x, seed in zip(images, seeds, strict=True)
                ]
            )
            for s in range(1, 6)
        ]
        for s in range(1, 5):
            if (name, s) not in not_monotone:
                assert curve[s - 1] >= curve[s] - 0.05, (name, s, curve)
        assert curve[0] > curve[4] + 1.0, (name, curve)


def test_rescaling_is_exact_without_a_corruption():
    """Spatial corruptions run on the image enlarged by round(224 / size) and reduced back by
    block means: enlarging then reducing gives the image back exactly."""
    assert scale_factor("defocus_blur", 28, 28) == 8
    assert scale_factor("defocus_blur", 32, 32) == 7
    assert scale_factor("defocus_blur", 224, 224) == scale_factor("gaussian_noise", 28, 28) == 1
    assert set(CORRUPTIONS) > RESCALED
    image = smooth_images(1, 28, 3)[0].numpy()
    big = image.repeat(8, axis=1).repeat(8, axis=2)
    back = big.reshape(3, 28, 8, 28, 8).mean(axis=(2, 4))
    np.testing.assert_array_equal(back, image)


def test_corrupted_dataset_is_deterministic_per_index():
    base = make_synthetic(6, train=False)
    a = CorruptedDataset(base, "shot_noise", 2, seed=3)
    b = CorruptedDataset(base, "shot_noise", 2, seed=3)
    assert torch.equal(a.load_image(4), b.load_image(4))
    assert not torch.equal(
        a.load_image(4), CorruptedDataset(base, "shot_noise", 2, 4).load_image(4)
    )
    clean = CorruptedDataset(base, None)
    assert torch.equal(clean.load_image(1), base.load_image(1))
    image, label, index = CorruptedDataset(base, "fog", 1, transform=lambda x: x.float())[2]
    assert image.dtype == torch.float32 and (label, index) == (int(base.labels[2]), 2)


def test_bad_arguments():
    image = smooth_images(1)[0]
    with pytest.raises(ValueError, match="unknown corruption 'rain'"):
        corrupt_image(image, "rain", 1, 0)
    with pytest.raises(ValueError, match="severity must be one of"):
        corrupt_image(image, "fog", 6, 0)
    with pytest.raises(ValueError, match="uint8"):
        corrupt_image(image.float(), "fog", 1, 0)
