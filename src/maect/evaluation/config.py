"""Settings of ``maect evaluate``: the :class:`EvalConfig` dataclasses, parsing of
``dotted.key=value`` items and the checks that need no data."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any

import torch
import yaml

from maect.config import DATASETS, ConfigError, from_dict, parse_overrides
from maect.data.datasets import NORMALIZATION
from maect.evaluation.features import resolve_device
from maect.evaluation.linear import DEFAULT_LRS
from maect.evaluation.lowshot import DEFAULT_L2_SCALE
from maect.models.pooling import POOLINGS

PROTOCOLS = ("knn", "linear", "lowshot", "cluster")


@dataclass
class EvalDataConfig:
    """Evaluation data. ``None`` fields default to the run's ``config.yaml`` for a run directory,
    else to Fashion-MNIST in its default location.

    Attributes:
        name: Dataset (one of :data:`maect.config.DATASETS`).
        root: Dataset folder.
        download: Let torchvision download the dataset into ``root``.
        normalization: Dataset whose mean/std normalise the images; default: the dataset the
            run was trained on (else ``name``).
        train_subset: Class-balanced subset of the train split (the k-NN bank, probe training
            set and low-shot pool), for quick trials.
        test_subset: Class-balanced subset of the test split.
        batch_size: Images per forward pass of feature extraction.
        num_workers: Data loader workers of feature extraction.
    """

    name: str | None = None
    root: str | None = None
    download: bool = False
    normalization: str | None = None
    train_subset: int | None = None
    test_subset: int | None = None
    batch_size: int = 256
    num_workers: int = 0


@dataclass
class KNNEvalConfig:
    """Weighted k-NN (DINO): ``top1`` at ``k``, also reported for every value of ``ks`` (those
    larger than the train split are skipped)."""

    k: int = 20
    temperature: float = 0.07
    ks: list[int] = field(default_factory=lambda: [10, 20, 100, 200])


@dataclass
class LinearEvalConfig:
    """Linear probe on frozen features with an lr sweep selected on a held-out part of train."""

    epochs: int = 20
    batch_size: int = 256
    lrs: list[float] = field(default_factory=lambda: list(DEFAULT_LRS))
    val_fraction: float = 0.1
    refit: bool = True


@dataclass
class LowshotEvalConfig:
    """L2-regularised logistic regression on ``shots`` images per class and ``percents`` % of
    the train split, one split per seed (mean and std reported)."""

    shots: list[int] = field(default_factory=lambda: [1, 2, 5])
    percents: list[float] = field(default_factory=lambda: [1.0])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    l2_scale: float = DEFAULT_L2_SCALE


@dataclass
class ClusterEvalConfig:
    """k-means (k = number of classes, ``n_init`` restarts) on the features of ``split``."""

    n_init: int = 5
    split: str = "test"


@dataclass
class EvalConfig:
    """Settings of ``maect evaluate`` (every field can be given as ``dotted.key=value``).

    Attributes:
        data: Which images (see :class:`EvalDataConfig`).
        protocols: Subset of ``knn``, ``linear``, ``lowshot``, ``cluster``.
        pooling: ``cls``, ``mean`` (patch tokens) or ``cls+mean``.
        layer: Pool the output of this block (0-based, then the final norm); ``None``: the last.
        standardize: Standardise features with the train split's mean and std first.
        plot: Save a t-SNE plot of up to ``plot_points`` test features as ``embedding.png``.
        plot_points: Number of test points in the plot (a class-balanced subset).
        cache: Read and write features in the cache (``<run>/features`` or ``~/.cache/maect``).
        device: ``auto`` (GPU if available), ``cpu``, ``cuda``, ``cuda:1`` ...
        seed: Seed of the subsets, the probe, the clustering and the plot.
        out: Folder for ``eval.json`` and ``embedding.png`` (default: the run directory; for a
            checkpoint file ``<file>-eval/``; for pixels ``runs/pixels-<dataset>``).
        progress: Show progress bars.
    """

    data: EvalDataConfig = field(default_factory=EvalDataConfig)
    protocols: list[str] = field(default_factory=lambda: list(PROTOCOLS))
    pooling: str = "cls"
    layer: int | None = None
    standardize: bool = False
    knn: KNNEvalConfig = field(default_factory=KNNEvalConfig)
    linear: LinearEvalConfig = field(default_factory=LinearEvalConfig)
    lowshot: LowshotEvalConfig = field(default_factory=LowshotEvalConfig)
    cluster: ClusterEvalConfig = field(default_factory=ClusterEvalConfig)
    plot: bool = True
    plot_points: int = 2000
    cache: bool = True
    device: str = "auto"
    seed: int = 0
    out: str | None = None
    progress: bool = True


def _split_comma_lists(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    """Let list fields be written ``a,b,c`` (YAML reads that as a string) or as one value."""
    hints = typing.get_type_hints(cls)
    out = dict(data)
    for key, value in data.items():
        tp = hints.get(key)
        if tp is None:
            continue
        if dataclasses.is_dataclass(tp) and isinstance(value, dict):
            out[key] = _split_comma_lists(tp, value)
        elif typing.get_origin(tp) is list and isinstance(value, str):
            out[key] = [yaml.safe_load(v) for v in value.split(",") if v.strip()]
        elif typing.get_origin(tp) is list and not isinstance(value, list | dict):
            out[key] = [value]
    return out


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key} {message}")


def validate_eval_config(cfg: EvalConfig) -> EvalConfig:
    """Check value ranges and names; return ``cfg`` unchanged when valid."""
    d = cfg.data
    bad = [p for p in cfg.protocols if p not in PROTOCOLS]
    _require(not bad, "protocols", f"has unknown {bad}; choose from {', '.join(PROTOCOLS)}")
    _require(bool(cfg.protocols) or cfg.plot, "protocols", "is empty (and plot=false)")
    _require(
        d.name is None or d.name in DATASETS,
        "data.name",
        f"must be one of {', '.join(DATASETS)}, got '{d.name}'",
    )
    _require(
        d.normalization is None or d.normalization in NORMALIZATION,
        "data.normalization",
        f"must be one of {', '.join(NORMALIZATION)}, got '{d.normalization}'",
    )
    for key in ("train_subset", "test_subset"):
        value = getattr(d, key)
        _require(value is None or value >= 1, f"data.{key}", f"must be >= 1 or null, got {value}")
    _require(d.batch_size >= 1, "data.batch_size", f"must be >= 1, got {d.batch_size}")
    _require(d.num_workers >= 0, "data.num_workers", f"must be >= 0, got {d.num_workers}")
    _require(
        cfg.pooling in POOLINGS,
        "pooling",
        f"must be one of {', '.join(POOLINGS)}, got {cfg.pooling}",
    )
    _require(cfg.knn.k >= 1, "knn.k", f"must be >= 1, got {cfg.knn.k}")
    _require(all(k >= 1 for k in cfg.knn.ks), "knn.ks", f"must all be >= 1, got {cfg.knn.ks}")
    _require(cfg.knn.temperature > 0, "knn.temperature", f"must be > 0, got {cfg.knn.temperature}")
    _require(cfg.linear.epochs >= 1, "linear.epochs", f"must be >= 1, got {cfg.linear.epochs}")
    _require(
        cfg.linear.batch_size >= 2,
        "linear.batch_size",
        f"must be >= 2, got {cfg.linear.batch_size}",
    )
    _require(
        bool(cfg.linear.lrs) and min(cfg.linear.lrs) > 0,
        "linear.lrs",
        f"must be positive learning rates, got {cfg.linear.lrs}",
    )
    _require(
        0.0 < cfg.linear.val_fraction < 1.0,
        "linear.val_fraction",
        f"must be in (0, 1), got {cfg.linear.val_fraction}",
    )
    s = cfg.lowshot
    _require(all(n >= 1 for n in s.shots), "lowshot.shots", f"must all be >= 1, got {s.shots}")
    _require(
        all(0 < p <= 100 for p in s.percents),
        "lowshot.percents",
        f"must all be in (0, 100], got {s.percents}",
    )
    _require(bool(s.seeds), "lowshot.seeds", "must not be empty")
    _require(cfg.cluster.n_init >= 1, "cluster.n_init", f"must be >= 1, got {cfg.cluster.n_init}")
    _require(
        cfg.cluster.split in ("train", "test"),
        "cluster.split",
        f"must be train or test, got {cfg.cluster.split}",
    )
    _require(cfg.plot_points >= 10, "plot_points", f"must be >= 10, got {cfg.plot_points}")
    try:
        device = resolve_device(cfg.device)
    except RuntimeError as err:
        raise ConfigError(f"device: {err}") from None
    _require(
        device.type != "cuda" or torch.cuda.is_available(),
        "device",
        f"is {cfg.device} but no GPU is available",
    )
    return cfg


def load_eval_config(items: list[str] | None = None) -> EvalConfig:
    """Build an :class:`EvalConfig` from ``dotted.key=value`` items.

    ``data=NAME`` is shorthand for ``data.name=NAME``; list fields accept ``a,b,c``. Unknown keys,
    wrong types and invalid values raise :class:`~maect.config.ConfigError` naming the key.
    """
    items = [f"data.name={i[len('data=') :]}" if i.startswith("data=") else i for i in items or []]
    data = _split_comma_lists(EvalConfig, parse_overrides(items))
    return validate_eval_config(from_dict(EvalConfig, data))
