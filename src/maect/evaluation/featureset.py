"""The features of one source: opened, split, viewed through the evaluation transform and
extracted (or read from the feature cache) once per ``maect evaluate`` call.

One forward pass per split gives the main features and those of every block ``layers`` asks
for; ``protocols=robustness`` adds one pass per (corruption, severity) over a class-balanced
subset of the test split. Every setting the split sizes can refute is checked before the first
image is encoded.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torchvision.transforms import v2 as T

from maect.config import ConfigError
from maect.data.datasets import SubsetDataset, normalization_stats
from maect.data.subset import balanced_subset
from maect.data.transforms import EVAL_CROP_PCT, eval_view, to_normalized
from maect.distributed import rank
from maect.evaluation._common import timed
from maect.evaluation.config import ALL_LAYERS, EvalConfig
from maect.evaluation.corruptions import CorruptedDataset
from maect.evaluation.features import (
    FeatureKey,
    cached_features,
    cached_layer_features,
    resolve_device,
    standardize,
)
from maect.evaluation.robustness import read_baseline
from maect.evaluation.sources import Source, open_source
from maect.evaluation.splits import (
    Split,
    build_folder_test_split,
    build_split,
    check_against_splits,
)

CORRUPTION_VERSION = "c1"  # in the cache key of corrupted features: bump when corruptions change


@dataclass
class CorruptedFeatures:
    """Features of a class-balanced test subset, clean and under every corruption and severity.

    Attributes:
        clean_x: Features of the subset uncorrupted.
        y: Its labels.
        corrupted: ``corrupted[corruption][severity]``: features of the corrupted subset.
        info: ``n_test`` and ``seed`` of the subset (stored in ``eval.json``).
        baseline: The ``robustness`` block of ``robustness.baseline`` (for the mCE), if given.
    """

    clean_x: torch.Tensor
    y: torch.Tensor
    corrupted: dict[str, dict[int, torch.Tensor]]
    info: dict[str, Any]
    baseline: dict[str, Any] | None = None

    def to(self, device: torch.device) -> CorruptedFeatures:
        """The features moved to ``device``."""
        corrupted = {
            c: {s: x.to(device) for s, x in per.items()} for c, per in self.corrupted.items()
        }
        return dataclasses.replace(
            self, clean_x=self.clean_x.to(device), y=self.y.to(device), corrupted=corrupted
        )

    def standardized(self, train_x: torch.Tensor) -> CorruptedFeatures:
        """Every matrix standardised with the statistics of ``train_x`` (the clean train
        features the probe is trained on)."""
        _, clean_x, *rest = standardize(train_x, self.clean_x, *_flat(self.corrupted))
        values = iter(rest)
        corrupted = {c: {s: next(values) for s in per} for c, per in self.corrupted.items()}
        return dataclasses.replace(self, clean_x=clean_x, corrupted=corrupted)


def _flat(nested: dict[str, dict[int, torch.Tensor]]) -> list[torch.Tensor]:
    return [x for per in nested.values() for x in per.values()]


@dataclass
class FeatureSet:
    """Train and test features of one source, on the evaluation device, and their description
    (the ``features`` block of ``eval.json``).

    Attributes:
        classes: The training classes the test set covers, when it covers a subset of them
            (``data.test_folder``): the protocols then score among these only.
        blocks: ``{block: (train_x, test_x)}`` for the per-block analysis (``layers``).
        robustness: Features for ``protocols=robustness``.
    """

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    info: dict[str, Any]
    classes: torch.Tensor | None = None
    blocks: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    robustness: CorruptedFeatures | None = None

    def block(self, index: int) -> FeatureSet:
        """The features of one block of the per-block analysis, as a :class:`FeatureSet`."""
        train_x, test_x = self.blocks[index]
        info = {**self.info, "layer": index, "dim": int(train_x.shape[1])}
        return dataclasses.replace(
            self, train_x=train_x, test_x=test_x, info=info, blocks={}, robustness=None
        )


def resolve_layers(cfg: EvalConfig, src: Source) -> list[int]:
    """The blocks of the per-block analysis (``layers``), 0-based and sorted.

    Raises:
        ConfigError: For pixels, or for a block outside the encoder's depth.
    """
    if cfg.layers is None:
        return []
    if src.encoder is None:
        raise ConfigError("layers: the per-block analysis needs an encoder, not pixels")
    depth = len(src.encoder.blocks)
    if cfg.layers == ALL_LAYERS:
        return list(range(depth))
    bad = [i for i in cfg.layers if not -depth <= i < depth]
    if bad:
        raise ConfigError(f"layers: block {bad[0]} is out of range for {depth} blocks")
    return sorted({i % depth for i in cfg.layers})


def _check_layer(cfg: EvalConfig, src: Source) -> int | None:
    """``layer`` (the block of the main features), checked against the encoder's depth."""
    if src.encoder is None or cfg.layer is None:
        return None
    depth = len(src.encoder.blocks)
    if not -depth <= cfg.layer < depth:
        raise ConfigError(f"layer={cfg.layer} is out of range for an encoder with {depth} blocks")
    return cfg.layer


def _read_baseline(cfg: EvalConfig) -> dict[str, Any] | None:
    """The baseline's ``robustness`` block, checked to cover every corruption and severity."""
    r = cfg.robustness
    if "robustness" not in cfg.protocols or r.baseline is None:
        return None
    try:
        block = read_baseline(r.baseline)
    except ValueError as err:
        raise ConfigError(f"robustness.baseline: {err}") from None
    for corruption in r.corruptions:
        have = block["top1"].get(corruption, {})
        if any(str(s) not in have for s in r.severities):
            raise ConfigError(
                f"robustness.baseline: {r.baseline} has no result for {corruption} at "
                f"severities {r.severities}"
            )
    return block


def load_features(source: str, cfg: EvalConfig, timing: dict[str, float]) -> FeatureSet | None:
    """Extract (or read from the cache) the features ``cfg`` needs of ``source``.

    Dataset, root and normalisation default to the run's ``config.yaml`` for a run directory.
    The seconds spent go to ``timing["extract"]`` (and ``timing["extract_robustness"]``). In a
    process group every rank must call: the ranks share the extraction, rank 0 gets the
    features, the others ``None``.
    """
    src = open_source(source, cfg)
    run_data = src.run_cfg.data if src.run_cfg is not None else None
    name = cfg.data.name or (run_data.name if run_data else "fashion-mnist")
    root = cfg.data.root if cfg.data.root is not None else (run_data.root if run_data else None)
    norm_name = cfg.data.normalization or (run_data.name if run_data else name)
    synthetic_size = run_data.synthetic_size if run_data else 512
    arch = src.encoder.patch_embed if src.encoder is not None else None
    img_size = arch.img_size[0] if arch else 28  # for pixels: the synthetic size, else unused
    channels = arch.proj.in_channels if arch else 1
    train = build_split(cfg, name, root, True, synthetic_size, img_size, channels)
    classes = None
    if cfg.data.test_folder is None:
        test = build_split(cfg, name, root, False, synthetic_size, img_size, channels)
    else:
        test, classes = build_folder_test_split(cfg, train, name)
    bank = train.dataset.labels
    if classes is not None:
        bank = bank[torch.isin(bank, classes)]
    check_against_splits(cfg, train.dataset.labels, test.dataset.labels, len(bank))
    layer = _check_layer(cfg, src)
    blocks = resolve_layers(cfg, src)
    baseline = _read_baseline(cfg)

    if arch is None:  # pixels: every image brought to the size of the first readable one
        first = next(
            (
                im
                for i in range(len(test.dataset))
                if (im := test.dataset.load_image(i)) is not None
            ),
            None,
        )
        if first is None:
            raise ConfigError("the test split holds no readable image")
        img_size, channels = first.shape[-1], first.shape[0]
    mean, std = normalization_stats(norm_name, channels)
    view = eval_view(img_size, channels)
    normalize = to_normalized(mean, std)
    description = (
        f"eval:img{img_size}:fit:ch{channels}:crop{EVAL_CROP_PCT}:mean{list(mean)}:std{list(std)}"
    )
    pooling = cfg.pooling if arch else "flatten"
    device = resolve_device(cfg.device)
    cache_dir = src.cache_dir if cfg.cache else None
    extract = {
        "batch_size": cfg.data.batch_size,
        "device": device,
        "num_workers": cfg.data.num_workers,
        "progress": cfg.progress,
        "shard": True,
    }
    test_name = "folder" if cfg.data.test_folder else name
    test_root = cfg.data.test_folder or root

    def key(split: str, part: Split, layer: int | None, transform: str = description) -> FeatureKey:
        dataset, folder = (name, root) if split == "train" else (test_name, test_root)
        return FeatureKey(
            weights=src.weights,
            dataset=dataset,
            root=str(Path(folder).resolve()) if folder else "",
            split=split,
            subset=part.subset,
            transform=transform,
            pooling=pooling,
            layer=layer,
        )

    def features(split: str, part: Split) -> tuple[list[torch.Tensor], torch.Tensor]:
        part.dataset.transform = T.Compose([view, normalize])
        keys = [key(split, part, layer), *(key(split, part, b) for b in blocks)]
        return cached_layer_features(src.encoder, part.dataset, keys, cache_dir, **extract)

    (train_xs, train_y), (test_xs, test_y) = timed(
        timing, "extract", lambda: (features("train", train), features("test", test))
    )
    robust = None
    if "robustness" in cfg.protocols:
        robust = timed(
            timing,
            "extract_robustness",
            lambda: _corrupted_features(cfg, src, test, view, normalize, key, extract),
        )
    if rank() != 0:
        return None

    (train_x, *train_block_x), (test_x, *test_block_x) = train_xs, test_xs
    if robust is not None:
        robust.baseline = baseline
    if cfg.standardize:  # every feature matrix with the statistics of its own train features
        if robust is not None:
            robust = robust.standardized(train_x)
        train_x, test_x = standardize(train_x, test_x)
        for i, (tr, te) in enumerate(zip(train_block_x, test_block_x, strict=True)):
            train_block_x[i], test_block_x[i] = standardize(tr, te)
    info = {
        "source": source,
        "out": str(src.out),
        "weights": src.weights,
        "arch": dataclasses.asdict(src.encoder.arch) if src.encoder is not None else None,
        "dataset": name,
        "pooling": pooling,
        "layer": layer,
        "standardize": cfg.standardize,
        "dim": int(train_x.shape[1]),
        "n_train": int(train_x.shape[0]),
        "n_test": int(test_x.shape[0]),
    }
    if cfg.data.test_folder is not None:
        info.update(test_folder=cfg.data.test_folder, test_classes=int(classes.numel()))
    to = {"device": device}
    return FeatureSet(
        train_x.to(**to),
        train_y.to(**to),
        test_x.to(**to),
        test_y.to(**to),
        info,
        classes=classes.to(**to) if classes is not None else None,
        blocks={
            b: (tr.to(**to), te.to(**to))
            for b, tr, te in zip(blocks, train_block_x, test_block_x, strict=True)
        },
        robustness=robust.to(device) if robust is not None else None,
    )


def _corrupted_features(
    cfg: EvalConfig,
    src: Source,
    test: Split,
    view: Callable[[torch.Tensor], torch.Tensor],
    normalize: Callable[[torch.Tensor], torch.Tensor],
    key: Callable[..., FeatureKey],
    extract: dict[str, Any],
) -> CorruptedFeatures:
    """Features of a class-balanced ``robustness.test_subset`` of the test split, clean and
    under every corruption and severity (each cached under its own key)."""
    r = cfg.robustness
    base = test.dataset
    if r.test_subset is not None and r.test_subset < len(base):
        base = SubsetDataset(base, balanced_subset(base.labels, r.test_subset, cfg.seed))
    part = Split(base, f"{test.subset}+robustness:{r.test_subset}:seed{cfg.seed}")
    cache_dir = src.cache_dir if cfg.cache else None

    def features(corruption: str | None, severity: int) -> tuple[torch.Tensor, torch.Tensor]:
        dataset = CorruptedDataset(base, corruption, severity, cfg.seed, view, normalize)
        name = "clean" if corruption is None else f"{corruption}:{severity}"
        transform = f"{key('test', part, None).transform}:{CORRUPTION_VERSION}:{name}"
        k = key("test", part, cfg.layer if src.encoder is not None else None, transform)
        return cached_features(src.encoder, dataset, k, cache_dir, **extract)

    clean_x, y = features(None, 0)
    corrupted = {c: {s: features(c, s)[0] for s in r.severities} for c in r.corruptions}
    return CorruptedFeatures(clean_x, y, corrupted, {"n_test": int(y.numel()), "seed": cfg.seed})
