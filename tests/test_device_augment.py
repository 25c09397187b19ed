"""Device augmentation (``data.augment_on=device``) against the per-sample torchvision path.

Same seed: the same crop (bit-identical pixels) and the same parameters, so the views agree up to
the per-sample path's rounding to uint8 after each colour operation. Independent seeds: crop
scale / aspect ratio / flip and colour statistics of the outputs have the same distributions
(two-sample KS and chi-square tests), and the drawn parameters follow torchvision's
specification (factor ranges, permutation, rates).
"""

from __future__ import annotations

import itertools

import pytest
import torch
from scipy import stats
from torch.utils.data import default_collate

from maect.config import ConfigError, load_config
from maect.data.device_augment import (
    BRIGHTNESS,
    CONTRAST,
    FLIP,
    GRAY,
    HUE,
    ORDER,
    SATURATION,
    SIGMA,
    SOLARIZE,
    BatchAugment,
    CropsForDevice,
)
from maect.data.loader import build_loader
from maect.data.transforms import VIEW_PAIRS, loader_views
from maect.engine import training_dataset
from maect.methods import METHOD_CLASSES
from tests.conftest import TINY_OVERRIDES

ALPHA = 1e-3  # p-value below which a distribution test fails (a false alarm 1 run in 1000)
SCALE = (0.2, 1.0)


def _colourful(height: int, width: int) -> torch.Tensor:
    """A smooth RGB image with every hue and a range of saturations (uint8 [3, H, W])."""
    yy, xx = torch.meshgrid(
        torch.linspace(0, 1, height), torch.linspace(0, 1, width), indexing="ij"
    )
    rgb = torch.stack([xx, yy, 0.5 + 0.5 * torch.sin(6.0 * xx * yy)])
    return (rgb * 255).round().to(torch.uint8)


def _loader_views(views, image, size, channels, seeds, mean, std) -> list[torch.Tensor]:
    """The per-sample path: each view's batch over ``seeds``."""
    transform = loader_views(views, size, channels, mean, std, SCALE)
    out = []
    for seed in seeds:
        torch.manual_seed(seed)
        made = transform(image)
        out.append(made if isinstance(made, tuple) else (made,))
    return [torch.stack(column) for column in zip(*out, strict=True)]


def _device_items(views, image, size, channels, seeds) -> list:
    """What the loader workers hand over with ``augment_on=device``, one item per seed."""
    crops = CropsForDevice(views, size, channels, SCALE)
    out = []
    for seed in seeds:
        torch.manual_seed(seed)
        out.append(crops(image))
    return out


def _device_views(views, image, size, channels, seeds, mean, std) -> list[torch.Tensor]:
    """The device path: worker items collated, then :class:`BatchAugment`."""
    items = _device_items(views, image, size, channels, seeds)
    batched = BatchAugment(views, size, mean, std)(default_collate(items))
    return batched if isinstance(batched, list) else [batched]


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("pair", ["min", "byol", "simclr"])
def test_same_seed_gives_the_per_sample_views(pair, channels):
    mean, std = (0.5, 0.4, 0.3)[:channels], (0.25, 0.2, 0.3)[:channels]
    args = VIEW_PAIRS[pair], _colourful(40, 48), 32, channels, range(48), mean, std
    loaded, batched = _loader_views(*args), _device_views(*args)
    for a, b in zip(loaded, batched, strict=True):
        assert a.shape == b.shape == (48, channels, 32, 32) and b.dtype == torch.float32
        levels = (a - b).abs() * torch.tensor(std).view(1, -1, 1, 1) * 255  # uint8 levels
        if pair == "min":
            assert torch.equal(a, b)  # crop, flip and normalisation are the same operations
        else:  # the per-sample path rounds to uint8 after each of up to 7 colour operations
            assert levels.max() <= 8 and levels.mean() <= 2, (levels.max(), levels.mean())


def _crop_geometry(views: torch.Tensor) -> torch.Tensor:
    """(area fraction, log aspect ratio, flipped) of crops of the coordinate image below."""
    side = views.shape[-1]
    x, y = views[:, 0] * 255, views[:, 1] * 255  # source column and row of each output pixel
    span = side / (side - 1)  # first to last pixel centre -> full crop extent
    width = (x[:, :, -1] - x[:, :, 0]).mean(1).abs() * span
    height = (y[:, -1, :] - y[:, 0, :]).mean(1) * span
    flipped = x[:, :, -1].mean(1) < x[:, :, 0].mean(1)
    return torch.stack([width * height / 256**2, (width / height).log(), flipped.float()], 1)


def test_crop_scale_ratio_and_flip_have_the_same_distributions():
    # each pixel of a 256 x 256 source holds its own column (red) and row (green)
    ramp = torch.arange(256, dtype=torch.uint8)
    image = torch.stack(
        [ramp.expand(256, 256), ramp[:, None].expand(256, 256), ramp.expand(256, 256)]
    )
    n, unit = 1500, ((0.0,) * 3, (1.0,) * 3)
    loaded = _loader_views([{}], image, 32, 3, range(n), *unit)
    batched = _device_views([{}], image, 32, 3, range(n, 2 * n), *unit)
    a, b = _crop_geometry(loaded[0]), _crop_geometry(batched[0])
    assert a[:, 0].min() > 0.15 and a[:, 0].max() <= 1.05  # recovered scales lie in 0.2-1
    for column in (0, 1):
        assert stats.ks_2samp(a[:, column], b[:, column]).pvalue > ALPHA
    flips = [[int(x[:, 2].sum()), n - int(x[:, 2].sum())] for x in (a, b)]
    assert stats.chi2_contingency(flips).pvalue > ALPHA


def _colour_statistics(views: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-view brightness, contrast, saturation, hue and grayscale of [0, 1] RGB views."""
    hsv = views.max(1).values, views.min(1).values
    saturation = ((hsv[0] - hsv[1]) / hsv[0].clamp(min=1e-6)).mean((1, 2))
    r, g, b = views.unbind(1)
    hue_angle = torch.atan2(3**0.5 * (g - b), 2 * r - g - b).mean((1, 2))
    return {
        "brightness": views.mean((1, 2, 3)),
        "contrast": views.std((1, 2, 3)),
        "saturation": saturation,
        "hue": hue_angle,
        "gray": (hsv[0] - hsv[1]).amax((1, 2)) < 1e-6,
    }


@pytest.mark.parametrize("pair", ["byol", "simclr"])
def test_colour_statistics_have_the_same_distributions(pair):
    image = _colourful(24, 24)
    n, unit = 1000, ((0.0,) * 3, (1.0,) * 3)
    loaded = _loader_views(VIEW_PAIRS[pair], image, 24, 3, range(n), *unit)
    batched = _device_views(VIEW_PAIRS[pair], image, 24, 3, range(n, 2 * n), *unit)
    for view in range(2):
        a, b = _colour_statistics(loaded[view]), _colour_statistics(batched[view])
        for name in ("brightness", "contrast", "saturation", "hue"):
            assert stats.ks_2samp(a[name], b[name]).pvalue > ALPHA, (view, name)
        grays = [[int(x["gray"].sum()), n - int(x["gray"].sum())] for x in (a, b)]
        assert stats.chi2_contingency(grays).pvalue > ALPHA, (view, grays)


def _rate_ok(hits: torch.Tensor, p: float) -> bool:
    return stats.binomtest(int(hits.sum()), len(hits), p).pvalue > ALPHA


def _uniform_ok(values: torch.Tensor, low: float, high: float) -> bool:
    return stats.kstest(values.numpy(), "uniform", args=(low, high - low)).pvalue > ALPHA


@pytest.mark.parametrize("pair", ["byol", "simclr"])
def test_drawn_parameters_follow_torchvision_specification(pair):
    n = 3000
    items = _device_items(VIEW_PAIRS[pair], _colourful(24, 24), 24, 3, range(n))
    for view, spec in enumerate(VIEW_PAIRS[pair]):
        p = torch.stack([item[view]["params"] for item in items])
        brightness, contrast, saturation, hue = spec.get("jitter", (0.4, 0.4, 0.2, 0.1))
        jittered = (p[:, BRIGHTNESS] != 1) | (p[:, HUE] != 0)
        assert _rate_ok(p[:, FLIP], 0.5)
        assert _rate_ok(jittered, spec["jitter_p"])
        assert _rate_ok(p[:, GRAY], spec["gray_p"])
        assert _rate_ok(p[:, SIGMA] > 0, spec["blur_p"])
        assert _rate_ok(p[:, SOLARIZE], spec.get("solarize_p", 0.0))
        j = p[jittered]
        assert _uniform_ok(j[:, BRIGHTNESS], max(0.0, 1 - brightness), 1 + brightness)
        assert _uniform_ok(j[:, CONTRAST], max(0.0, 1 - contrast), 1 + contrast)
        assert _uniform_ok(j[:, SATURATION], max(0.0, 1 - saturation), 1 + saturation)
        assert _uniform_ok(j[:, HUE], -hue, hue)
        assert _uniform_ok(p[p[:, SIGMA] > 0][:, SIGMA], 0.1, 2.0)
        orders = [tuple(int(v) for v in row) for row in j[:, ORDER]]
        counts = [orders.count(perm) for perm in itertools.permutations(range(4))]
        assert sum(counts) == len(orders) and stats.chisquare(counts).pvalue > ALPHA


@pytest.mark.parametrize("method", ["mae", "can"])
def test_first_training_batch_matches_the_loader_path(method):
    """Through the real loader (sampler seeds, collate) and the method's batch hook."""
    batches = {}
    for where in ("loader", "device"):
        cfg = load_config(f"{method}/fmnist_vit_t", [*TINY_OVERRIDES, f"data.augment_on={where}"])
        module = METHOD_CLASSES[method](cfg)
        dataset = training_dataset(cfg)
        dataset.transform = module.train_transform()
        loader = build_loader(dataset, 8, 0, shuffle=True, drop_last=True, seed=3)
        batches[where] = module.on_after_batch_transfer(next(iter(loader)), 0)
    loaded, batched = batches["loader"]["image"], batches["device"]["image"]
    assert type(loaded) is type(batched)
    assert torch.equal(batches["loader"]["index"], batches["device"]["index"])
    for a, b in zip(*(x if isinstance(x, list) else [x] for x in (loaded, batched)), strict=True):
        assert a.shape == b.shape
        torch.testing.assert_close(b, a, atol=0.1, rtol=0)  # within a few uint8 levels


def test_augment_on_is_validated():
    with pytest.raises(ConfigError, match="data.augment_on"):
        load_config("mae/fmnist_vit_t", ["data.augment_on=gpu"])
