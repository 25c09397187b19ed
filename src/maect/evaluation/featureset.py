"""The train and test features of one source: opened, split, viewed through the evaluation
transform and extracted (or read from the feature cache) once per ``maect evaluate`` call."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from maect.data.datasets import normalization_stats
from maect.data.transforms import EVAL_CROP_PCT, eval_transform
from maect.distributed import rank
from maect.evaluation._common import timed
from maect.evaluation.config import EvalConfig
from maect.evaluation.features import FeatureKey, cached_features, resolve_device, standardize
from maect.evaluation.sources import open_source
from maect.evaluation.splits import build_split


@dataclass
class FeatureSet:
    """Train and test features of one source, on the evaluation device, and their description
    (the ``features`` block of ``eval.json``)."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    info: dict[str, Any]


def load_features(source: str, cfg: EvalConfig, timing: dict[str, float]) -> FeatureSet | None:
    """Extract (or read from the cache) the train and test features of ``source``.

    Dataset, root and normalisation default to the run's ``config.yaml`` for a run directory.
    The seconds spent are added to ``timing["extract"]``. In a process group every rank must
    call: the ranks share the extraction, rank 0 gets the features, the others ``None``.
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
    parts = {
        split: build_split(cfg, name, root, split == "train", synthetic_size, img_size, channels)
        for split in ("train", "test")
    }
    first = parts["test"].dataset.load_image(0)
    if arch is None:  # pixels: the images as they are
        img_size, channels = first.shape[-1], first.shape[0]
    mean, std = normalization_stats(norm_name, channels)
    transform = eval_transform(img_size, first.shape[-1], channels, mean, std)
    description = (
        f"eval:img{img_size}:src{first.shape[-1]}:ch{channels}:crop{EVAL_CROP_PCT}"
        f":mean{list(mean)}:std{list(std)}"
    )
    pooling = cfg.pooling if arch else "flatten"
    layer = cfg.layer if arch else None
    device = resolve_device(cfg.device)

    def extract(split: str) -> tuple[torch.Tensor, torch.Tensor]:
        part = parts[split]
        part.dataset.transform = transform
        key = FeatureKey(
            weights=src.weights,
            dataset=name,
            root=str(Path(root).resolve()) if root else "",
            split=split,
            subset=part.subset,
            transform=description,
            pooling=pooling,
            layer=layer,
        )
        return cached_features(
            src.encoder,
            part.dataset,
            key,
            src.cache_dir if cfg.cache else None,
            batch_size=cfg.data.batch_size,
            device=device,
            num_workers=cfg.data.num_workers,
            progress=cfg.progress,
            shard=True,
        )

    (train_x, train_y), (test_x, test_y) = timed(
        timing, "extract", lambda: (extract("train"), extract("test"))
    )
    if rank() != 0:
        return None
    if cfg.standardize:
        train_x, test_x = standardize(train_x, test_x)
    info = {
        "source": source,
        "out": str(src.out),
        "weights": src.weights,
        "dataset": name,
        "pooling": pooling,
        "layer": layer,
        "standardize": cfg.standardize,
        "dim": int(train_x.shape[1]),
        "n_train": int(train_x.shape[0]),
        "n_test": int(test_x.shape[0]),
    }
    to = {"device": device}
    return FeatureSet(train_x.to(**to), train_y.to(**to), test_x.to(**to), test_y.to(**to), info)
