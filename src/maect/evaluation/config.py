"""Settings of ``maect evaluate``: the :class:`EvalConfig` dataclasses, parsing of
``dotted.key=value`` items and the checks that need no data."""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any

import torch
import yaml

from maect.config import (
    DATASETS,
    ConfigError,
    from_dict,
    parse_overrides,
    require,
    require_choice,
)
from maect.data.datasets import NORMALIZATION
from maect.evaluation.corruptions import CORRUPTIONS, SEVERITIES
from maect.evaluation.features import resolve_device
from maect.evaluation.linear import DEFAULT_LRS
from maect.evaluation.lowshot import DEFAULT_L2_SCALE
from maect.models.pooling import POOLINGS

PROTOCOLS = ("knn", "linear", "lowshot", "cluster", "robustness")
DEFAULT_PROTOCOLS = ("knn", "linear", "lowshot", "cluster")
LAYER_PROTOCOLS = ("knn", "linear", "lowshot", "cluster")  # those that run per block
ALL_LAYERS = "all"


@dataclass
class EvalDataConfig:
    """Evaluation data. ``None`` fields default to the run's ``config.yaml`` for a run directory,
    else to Fashion-MNIST in its default location.

    Attributes:
        name: Dataset: fashion-mnist, cifar10, cifar100, stl10, imagefolder, synthetic or shards.
        root: Dataset folder.
        download: Let torchvision download the dataset into ``root``.
        normalization: Dataset whose mean/std normalise the images; default: the dataset the
            run was trained on (else ``name``).
        train_subset: Class-balanced subset of the train split (the k-NN bank, probe training
            set and low-shot pool), for quick trials.
        test_subset: Class-balanced subset of the test split.
        batch_size: Images per forward pass of feature extraction.
        num_workers: Data loader workers of feature extraction (and corruption generation).
        test_folder: A separate class-per-folder test set (ImageNet-A/-R/-Sketch layout) in
            place of the dataset's test split; its classes must be (or ``class_map`` must map
            them onto) training classes, and every protocol then scores among those classes.
        class_map: YAML/JSON file mapping ``test_folder`` class names to training class names
            (or indices); unmapped names must equal a training class name.
    """

    name: str | None = None
    root: str | None = None
    download: bool = False
    normalization: str | None = None
    train_subset: int | None = None
    test_subset: int | None = None
    batch_size: int = 256
    num_workers: int = 0
    test_folder: str | None = None
    class_map: str | None = None


@dataclass
class EvalModelConfig:
    """The encoder.

    Attributes:
        num_heads: Head count of a checkpoint whose weights do not say it and whose width is
            outside the standard table (as ``num_heads`` of ``maect.load_encoder``).
    """

    num_heads: int | None = None


@dataclass
class KNNEvalConfig:
    """Weighted k-NN (DINO): ``top1`` at ``k``, also reported for every value of ``ks`` (those
    larger than the train split are skipped).

    Attributes:
        k: Neighbours that vote (the headline ``top1``).
        temperature: Vote weight ``exp(cosine / temperature)``.
        ks: Further neighbour counts, each reported as ``top1@k<k>``.
    """

    k: int = 20
    temperature: float = 0.07
    ks: list[int] = field(default_factory=lambda: [10, 20, 100, 200])


@dataclass
class LinearEvalConfig:
    """Linear probe on frozen features with an lr sweep selected on a held-out part of train.

    Attributes:
        epochs: Training epochs, of the sweep and of the refit.
        batch_size: Features per SGD step (the last partial batch of an epoch is dropped).
        lrs: Absolute learning rates of the sweep (one head each, not scaled by batch size).
        val_fraction: Fraction of each class of train held out to choose the lr.
        refit: Train a fresh head on all of train at the chosen lr.
    """

    epochs: int = 20
    batch_size: int = 256
    lrs: list[float] = field(default_factory=lambda: list(DEFAULT_LRS))
    val_fraction: float = 0.1
    refit: bool = True


@dataclass
class LowshotEvalConfig:
    """L2-regularised logistic regression on ``shots`` images per class and ``percents`` % of
    the train split, one split per seed (mean and std reported).

    Attributes:
        shots: Images per class of the few-shot splits.
        percents: Percentages of the train split (class-stratified).
        seeds: One random split per seed.
        l2_scale: Regularisation strength times the split's size (lambda = l2_scale / N).
    """

    shots: list[int] = field(default_factory=lambda: [1, 2, 5])
    percents: list[float] = field(default_factory=lambda: [1.0])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    l2_scale: float = DEFAULT_L2_SCALE


@dataclass
class ClusterEvalConfig:
    """k-means (k = number of classes, ``n_init`` restarts) on the features of ``split``.

    Attributes:
        n_init: k-means restarts (the lowest inertia is kept).
        split: The split clustered: train or test.
        silhouette_samples: Points the silhouette is computed on (a seeded sample; null: all).
    """

    n_init: int = 5
    split: str = "test"
    silhouette_samples: int | None = 10_000


@dataclass
class RobustnessEvalConfig:
    """Accuracy of the linear probe (trained on clean train features) on the ImageNet-C
    corruptions of a class-balanced ``test_subset`` of the test split: ``len(corruptions) x
    len(severities)`` feature passes over it (75 for all), so keep it small on a CPU.
    ``baseline``: an ``eval.json`` (or its run directory) with a robustness result to compute
    the mCE against.

    Attributes:
        corruptions: ImageNet-C corruptions to apply (default: all 15).
        severities: Severities to apply, from 1 to 5.
        test_subset: Class-balanced test images corrupted (null: the whole test split).
        baseline: An eval.json (or its run directory) whose robustness result is the mCE's
            reference (null: no mCE).
    """

    corruptions: list[str] = field(default_factory=lambda: list(CORRUPTIONS))
    severities: list[int] = field(default_factory=lambda: list(SEVERITIES))
    test_subset: int | None = 200
    baseline: str | None = None


@dataclass
class EvalConfig:
    """Settings of ``maect evaluate`` (every field can be given as ``dotted.key=value``).

    Attributes:
        data: Which images (see :class:`EvalDataConfig`).
        model: The encoder (see :class:`EvalModelConfig`).
        protocols: Subset of ``knn``, ``linear``, ``lowshot``, ``cluster`` (the default) and
            ``robustness``.
        pooling: ``cls``, ``mean`` (patch tokens) or ``cls+mean``.
        layer: Pool the output of this block (0-based, then the final norm); ``None``: the last.
        layers: Per-block analysis: ``all`` or a list of blocks (0-based, negative from the
            end) whose features (each through the final norm, like ``layer``) come from one
            forward pass; ``layer_protocols`` run on each.
        layer_protocols: Protocols run per block (``knn`` by default; ``linear``, ``lowshot``,
            ``cluster`` on request).
        standardize: Standardise features with the train split's mean and std first.
        knn: Weighted k-NN (see :class:`KNNEvalConfig`).
        linear: Linear probe (see :class:`LinearEvalConfig`).
        lowshot: Low-shot logistic regression (see :class:`LowshotEvalConfig`).
        cluster: k-means clustering (see :class:`ClusterEvalConfig`).
        robustness: ImageNet-C corruptions (see :class:`RobustnessEvalConfig`).
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
    model: EvalModelConfig = field(default_factory=EvalModelConfig)
    protocols: list[str] = field(default_factory=lambda: list(DEFAULT_PROTOCOLS))
    pooling: str = "cls"
    layer: int | None = None
    layers: list[int] | str | None = None
    layer_protocols: list[str] = field(default_factory=lambda: ["knn"])
    standardize: bool = False
    knn: KNNEvalConfig = field(default_factory=KNNEvalConfig)
    linear: LinearEvalConfig = field(default_factory=LinearEvalConfig)
    lowshot: LowshotEvalConfig = field(default_factory=LowshotEvalConfig)
    cluster: ClusterEvalConfig = field(default_factory=ClusterEvalConfig)
    robustness: RobustnessEvalConfig = field(default_factory=RobustnessEvalConfig)
    plot: bool = True
    plot_points: int = 2000
    cache: bool = True
    device: str = "auto"
    seed: int = 0
    out: str | None = None
    progress: bool = True


def _is_list(tp: Any) -> bool:
    """Whether annotation ``tp`` is a list or an optional list (``list[int] | None``)."""
    options = typing.get_args(tp) if typing.get_origin(tp) is types.UnionType else (tp,)
    return any(typing.get_origin(option) is list for option in options)


def _split_comma_lists(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    """Let list fields be written ``a,b,c`` (YAML reads that as a string) or as one value
    (``layers=all``, a field that also takes a string, keeps a word without a comma)."""
    hints = typing.get_type_hints(cls)
    out = dict(data)
    for key, value in data.items():
        tp = hints.get(key)
        if tp is None:
            continue
        takes_str = typing.get_origin(tp) is types.UnionType and str in typing.get_args(tp)
        if dataclasses.is_dataclass(tp) and isinstance(value, dict):
            out[key] = _split_comma_lists(tp, value)
        elif not _is_list(tp) or value is None or isinstance(value, list | dict):
            continue
        elif isinstance(value, str) and (value.count(",") or not takes_str):
            out[key] = [yaml.safe_load(v) for v in value.split(",") if v.strip()]
        elif not isinstance(value, str):
            out[key] = [value]
    return out


def validate_eval_config(cfg: EvalConfig) -> EvalConfig:
    """Check value ranges and names; return ``cfg`` unchanged when valid."""
    d = cfg.data
    bad = [p for p in cfg.protocols if p not in PROTOCOLS]
    require(not bad, "protocols", f"has unknown {bad}; choose from {', '.join(PROTOCOLS)}")
    require(
        bool(cfg.protocols) or cfg.plot or cfg.layers is not None,
        "protocols",
        "is empty (and plot=false, no layers)",
    )
    require(
        cfg.layers is None or cfg.layers == ALL_LAYERS or isinstance(cfg.layers, list),
        "layers",
        f"must be '{ALL_LAYERS}' or a list of block indices, got '{cfg.layers}'",
    )
    require(cfg.layers != [], "layers", "must name at least one block")
    bad = [p for p in cfg.layer_protocols if p not in LAYER_PROTOCOLS]
    require(
        not bad and bool(cfg.layer_protocols),
        "layer_protocols",
        f"must be some of {', '.join(LAYER_PROTOCOLS)}, got {cfg.layer_protocols}",
    )
    m = cfg.model
    require(
        m.num_heads is None or m.num_heads >= 1,
        "model.num_heads",
        f"must be >= 1 or null, got {m.num_heads}",
    )
    if d.name is not None:
        require_choice(d.name, DATASETS, "data.name")
    if d.normalization is not None:
        require_choice(d.normalization, NORMALIZATION, "data.normalization")
    for key in ("train_subset", "test_subset"):
        value = getattr(d, key)
        require(value is None or value >= 1, f"data.{key}", f"must be >= 1 or null, got {value}")
    require(d.batch_size >= 1, "data.batch_size", f"must be >= 1, got {d.batch_size}")
    require(d.num_workers >= 0, "data.num_workers", f"must be >= 0, got {d.num_workers}")
    require(
        cfg.pooling in POOLINGS,
        "pooling",
        f"must be one of {', '.join(POOLINGS)}, got {cfg.pooling}",
    )
    require(cfg.knn.k >= 1, "knn.k", f"must be >= 1, got {cfg.knn.k}")
    require(all(k >= 1 for k in cfg.knn.ks), "knn.ks", f"must all be >= 1, got {cfg.knn.ks}")
    require(cfg.knn.temperature > 0, "knn.temperature", f"must be > 0, got {cfg.knn.temperature}")
    require(cfg.linear.epochs >= 1, "linear.epochs", f"must be >= 1, got {cfg.linear.epochs}")
    require(
        cfg.linear.batch_size >= 2,
        "linear.batch_size",
        f"must be >= 2, got {cfg.linear.batch_size}",
    )
    require(
        bool(cfg.linear.lrs) and min(cfg.linear.lrs) > 0,
        "linear.lrs",
        f"must be positive learning rates, got {cfg.linear.lrs}",
    )
    require(
        0.0 < cfg.linear.val_fraction < 1.0,
        "linear.val_fraction",
        f"must be in (0, 1), got {cfg.linear.val_fraction}",
    )
    s = cfg.lowshot
    require(all(n >= 1 for n in s.shots), "lowshot.shots", f"must all be >= 1, got {s.shots}")
    require(
        all(0 < p <= 100 for p in s.percents),
        "lowshot.percents",
        f"must all be in (0, 100], got {s.percents}",
    )
    require(bool(s.seeds), "lowshot.seeds", "must not be empty")
    require(cfg.cluster.n_init >= 1, "cluster.n_init", f"must be >= 1, got {cfg.cluster.n_init}")
    require(
        cfg.cluster.split in ("train", "test"),
        "cluster.split",
        f"must be train or test, got {cfg.cluster.split}",
    )
    require(
        cfg.cluster.silhouette_samples is None or cfg.cluster.silhouette_samples >= 2,
        "cluster.silhouette_samples",
        f"must be >= 2 or null, got {cfg.cluster.silhouette_samples}",
    )
    r = cfg.robustness
    bad = [c for c in r.corruptions if c not in CORRUPTIONS]
    require(
        not bad and bool(r.corruptions),
        "robustness.corruptions",
        f"has unknown {bad}; choose from {', '.join(CORRUPTIONS)}",
    )
    require(
        bool(r.severities) and all(v in SEVERITIES for v in r.severities),
        "robustness.severities",
        f"must be values from 1 to 5, got {r.severities}",
    )
    require(
        r.test_subset is None or r.test_subset >= 1,
        "robustness.test_subset",
        f"must be >= 1 or null, got {r.test_subset}",
    )
    require(
        d.class_map is None or d.test_folder is not None,
        "data.class_map",
        "maps the classes of data.test_folder, which is not set",
    )
    require(cfg.plot_points >= 10, "plot_points", f"must be >= 10, got {cfg.plot_points}")
    try:
        device = resolve_device(cfg.device)
    except RuntimeError as err:
        raise ConfigError(f"device: {err}") from None
    require(
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
