"""``maect evaluate``: frozen-feature protocols on a run, a checkpoint or raw pixels.

``evaluate(source, cfg)`` loads the encoder, extracts (or reads cached) train and test features
once, runs the selected protocols (k-NN, linear probe, low-shot, clustering), saves a t-SNE plot
and writes ``eval.json``::

    {"knn": {"top1": ..}, "linear": {"top1": ..},
     "lowshot": {"1": .., "2": .., "5": .., "1pct": ..},
     "cluster": {"acc": .., "nmi": .., "ami": .., "ari": ..},
     "features": {"pooling": .., "n_train": .., ...}, "timing": {"extract": s, "knn": s, ...},
     "config": {...}}

Accuracies and clustering scores are in percent; timings in seconds.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import time
import typing
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml

from maect.checkpoints import load_encoder
from maect.config import (
    DATASETS,
    ConfigError,
    RunConfig,
    config_from_yaml,
    from_dict,
    parse_overrides,
)
from maect.data.datasets import (
    CLASS_NAMES,
    NORMALIZATION,
    ImageDataset,
    SubsetDataset,
    build_dataset,
    normalization_stats,
)
from maect.data.subset import balanced_subset
from maect.data.transforms import EVAL_CROP_PCT, eval_transform
from maect.distributed import rank, world_size
from maect.evaluation.clustering import clustering_scores
from maect.evaluation.features import (
    FeatureKey,
    atomic_write,
    cached_features,
    default_cache_dir,
    resolve_device,
    standardize,
    weights_fingerprint,
)
from maect.evaluation.knn import knn_accuracy
from maect.evaluation.linear import DEFAULT_LRS, linear_probe
from maect.evaluation.lowshot import DEFAULT_L2_SCALE, lowshot_eval
from maect.models.pooling import POOLINGS

log = logging.getLogger(__name__)

PROTOCOLS = ("knn", "linear", "lowshot", "cluster")
PIXELS = "pixels"


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


# --------------------------------------------------------------------------- configuration


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


# --------------------------------------------------------------------------- sources and data


@dataclass
class _Source:
    """What is evaluated: the encoder (``None`` for pixels) and where its outputs go."""

    encoder: torch.nn.Module | None
    weights: str
    run_cfg: RunConfig | None
    out: Path
    cache_dir: Path


def _open_source(source: str, cfg: EvalConfig) -> _Source:
    cache_dir = default_cache_dir(None)
    if source == PIXELS:
        out = Path(cfg.out or Path("runs") / f"pixels-{cfg.data.name or 'fashion-mnist'}")
        return _Source(None, PIXELS, None, out, cache_dir)
    path = Path(source)
    encoder = load_encoder(path)
    weights = weights_fingerprint(path)
    if path.is_dir():
        config = path / "config.yaml"
        run_cfg = config_from_yaml(config) if config.is_file() else None
        return _Source(encoder, weights, run_cfg, Path(cfg.out or path), default_cache_dir(path))
    out = Path(cfg.out or path.with_name(f"{path.stem}-eval"))
    return _Source(encoder, weights, None, out, cache_dir)


@dataclass
class _Split:
    dataset: ImageDataset
    subset: str


def _build_split(
    cfg: EvalConfig,
    name: str,
    root: str | None,
    train: bool,
    synthetic_size: int,
    img_size: int,
    channels: int,
) -> _Split:
    """The train or test split, cut to its class-balanced subset when one is configured."""
    d = cfg.data
    downloads = d.download and world_size() > 1  # rank 0 downloads, the others then read
    if downloads and rank() != 0:
        dist.barrier()
    dataset = build_dataset(
        name,
        root,
        train=train,
        download=d.download,
        synthetic_size=synthetic_size,
        img_size=img_size,
        channels=channels,
    )
    if downloads and rank() == 0:
        dist.barrier()
    unlabeled = int((dataset.labels < 0).sum())
    if unlabeled:
        split = "train" if train else "test"
        raise ConfigError(
            f"data.name={name}: {unlabeled} of {len(dataset)} {split} images have no label; "
            "every protocol needs labelled train and test splits (pretrain on unlabelled images, "
            "evaluate on a labelled dataset)"
        )
    size = d.train_subset if train else d.test_subset
    if size is None or size >= len(dataset):
        return _Split(dataset, "all")
    indices = balanced_subset(dataset.labels, size, cfg.seed)
    return _Split(SubsetDataset(dataset, indices), f"balanced:{size}:seed{cfg.seed}")


def _timed(timing: dict[str, float], name: str, fn: Callable[[], Any]) -> Any:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    timing[name] = round(time.perf_counter() - start, 3)
    return result


# --------------------------------------------------------------------------- evaluation


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
    src = _open_source(source, cfg)
    run_data = src.run_cfg.data if src.run_cfg is not None else None
    name = cfg.data.name or (run_data.name if run_data else "fashion-mnist")
    root = cfg.data.root if cfg.data.root is not None else (run_data.root if run_data else None)
    norm_name = cfg.data.normalization or (run_data.name if run_data else name)
    synthetic_size = run_data.synthetic_size if run_data else 512
    arch = src.encoder.patch_embed if src.encoder is not None else None
    img_size = arch.img_size[0] if arch else 28  # for pixels: the synthetic size, else unused
    channels = arch.proj.in_channels if arch else 1
    parts = {
        split: _build_split(cfg, name, root, split == "train", synthetic_size, img_size, channels)
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

    (train_x, train_y), (test_x, test_y) = _timed(
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


@contextlib.contextmanager
def _single_thread_on_cpu(device: torch.device) -> Iterator[None]:
    """Run the block on one intra-op thread when ``device`` is the CPU.

    The linear probe's steps are many small ops on a ``[256, D]`` batch; their intra-op thread
    synchronisation costs more than it saves. On a busy 2-core machine one thread made the probe
    about 10x faster (1.6 s vs 14-18 s on a 12k x 784 problem); it was never slower.
    """
    if device.type != "cpu":
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _linear(data: tuple[torch.Tensor, ...], cfg: EvalConfig) -> dict[str, Any]:
    with _single_thread_on_cpu(data[0].device):
        return linear_probe(
            *data,
            lrs=cfg.linear.lrs,
            epochs=cfg.linear.epochs,
            batch_size=cfg.linear.batch_size,
            val_fraction=cfg.linear.val_fraction,
            refit=cfg.linear.refit,
            seed=cfg.seed,
        )


def run_protocols(f: FeatureSet, cfg: EvalConfig, timing: dict[str, float]) -> dict[str, Any]:
    """Run ``cfg.protocols`` on ``f``; each one's seconds go to ``timing[protocol]``."""
    n_train = f.train_x.shape[0]
    if "knn" in cfg.protocols and cfg.knn.k > n_train:
        raise ConfigError(f"knn.k={cfg.knn.k} exceeds the {n_train} train samples")
    ks = [k for k in cfg.knn.ks if k <= n_train]
    data = (f.train_x, f.train_y, f.test_x, f.test_y)
    runners: dict[str, Callable[[], dict[str, Any]]] = {
        "knn": lambda: {
            **knn_accuracy(*data, k=cfg.knn.k, temperature=cfg.knn.temperature, ks=ks),
            "k": cfg.knn.k,
            "temperature": cfg.knn.temperature,
        },
        "linear": lambda: _linear(data, cfg),
        "lowshot": lambda: lowshot_eval(
            *data,
            shots=cfg.lowshot.shots,
            percents=cfg.lowshot.percents,
            seeds=cfg.lowshot.seeds,
            l2_scale=cfg.lowshot.l2_scale,
        ),
        "cluster": lambda: clustering_scores(
            *(data[:2] if cfg.cluster.split == "train" else data[2:]),
            n_init=cfg.cluster.n_init,
            seed=cfg.seed,
        ),
    }
    result = {}
    for protocol in PROTOCOLS:
        if protocol in cfg.protocols:
            result[protocol] = _timed(timing, protocol, runners[protocol])
            log.info("%s done in %.1f s", protocol, timing[protocol])
    return result


def evaluate(source: str | Path, cfg: EvalConfig | None = None) -> dict[str, Any] | None:
    """Run the protocols of ``cfg`` on ``source`` and write ``eval.json`` (+ ``embedding.png``).

    In a joined process group (``torchrun ... maect evaluate``) every rank must call it: the
    ranks share the feature extraction, rank 0 alone runs the protocols and writes the outputs.

    Args:
        source: A run directory, a checkpoint file :func:`maect.load_encoder` accepts, or
            ``"pixels"`` (raw normalised pixels, flattened: the baseline row).
        cfg: Settings; ``None`` uses the defaults.

    Returns:
        The ``eval.json`` content (see the module docstring); ``None`` on ranks other than 0.
    """
    cfg = validate_eval_config(cfg or EvalConfig())
    started = time.perf_counter()
    timing: dict[str, float] = {}
    features = load_features(str(source), cfg, timing)
    if features is None:  # not rank 0 of a process group: it helped extract
        return None
    result = run_protocols(features, cfg, timing)
    out = Path(features.info["out"])
    if cfg.plot:
        info = features.info
        title = f"{source} ({info['dataset']} test, {info['pooling']})"
        path = out / "embedding.png"
        _timed(
            timing,
            "plot",
            lambda: save_embedding_plot(
                features.test_x,
                features.test_y,
                path,
                cfg.plot_points,
                cfg.seed,
                title,
                CLASS_NAMES.get(info["dataset"], ()),
            ),
        )
    timing["total"] = round(time.perf_counter() - started, 3)
    result.update(
        features=features.info,
        timing=timing,
        config=dataclasses.asdict(cfg),
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    write_json(result, out / "eval.json")
    print(format_table(result))
    print(f"wrote {out / 'eval.json'}")
    return result


def write_json(data: dict[str, Any], path: Path) -> None:
    """Write ``data`` as indented JSON atomically (temporary file + rename)."""
    with atomic_write(path, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")


# --------------------------------------------------------------------------- output


def _rows(result: dict[str, Any]) -> list[tuple[str, str, str]]:
    """``(protocol, metric, value)`` rows of the headline numbers."""
    rows: list[tuple[str, str, str]] = []
    if "knn" in result:
        r = result["knn"]
        rows.append(("knn", f"top1 (k={r.get('k', '?')})", f"{r['top1']:.2f}"))
        rows += [("knn", key, f"{v:.2f}") for key, v in r.items() if key.startswith("top1@")]
    if "linear" in result:
        r = result["linear"]
        rows.append(("linear", "top1", f"{r['top1']:.2f}"))
        if "best_lr" in r:
            rows.append(("linear", "best lr (val top1)", f"{r['best_lr']:g} ({r['val_top1']:.2f})"))
    if "lowshot" in result:
        r = result["lowshot"]
        for key, v in r.items():
            if not key.endswith("_std"):
                label = f"{key}-shot" if key.isdigit() else key.replace("pct", "% labels")
                std = r.get(f"{key}_std")
                rows.append(("lowshot", label, f"{v:.2f}" + (f" ± {std:.2f}" if std else "")))
    if "cluster" in result:
        rows += [("cluster", key, f"{v:.2f}") for key, v in result["cluster"].items()]
    return rows


def format_table(result: dict[str, Any]) -> str:
    """The headline numbers of an ``eval.json`` (and the seconds per protocol) as a text table."""
    f = result.get("features", {})
    timing = result.get("timing", {})
    header = (
        f"{f.get('source', '?')} on {f.get('dataset', '?')}: {f.get('n_train', '?')} train / "
        f"{f.get('n_test', '?')} test, {f.get('pooling', '?')}"
        + (f" (block {f['layer']})" if f.get("layer") is not None else "")
        + (", standardised" if f.get("standardize") else "")
        + f", dim {f.get('dim', '?')}"
    )
    rows = _rows(result)
    names = (*PROTOCOLS, "extract", "plot", "total")
    seconds = {p: f"{timing[p]:.1f} s" for p in names if p in timing}
    lines = [header]
    width = max([len(r[1]) for r in rows] + [6])
    lines.append(f"{'protocol':<9} {'metric':<{width}} {'value':>14} {'time':>9}")
    previous = None
    for protocol, metric, value in rows:
        first = protocol != previous
        name, time_ = (protocol, seconds.get(protocol, "")) if first else ("", "")
        lines.append(f"{name:<9} {metric:<{width}} {value:>14} {time_:>9}".rstrip())
        previous = protocol
    extra = [f"{p} {seconds[p]}" for p in ("extract", "plot", "total") if p in seconds]
    if extra:
        lines.append("time: " + ", ".join(extra))
    return "\n".join(lines)


MAX_LEGEND_CLASSES = 20


def save_embedding_plot(
    x: torch.Tensor,
    y: torch.Tensor,
    path: Path,
    max_points: int,
    seed: int,
    title: str,
    class_names: Sequence[str] = (),
) -> None:
    """t-SNE of a class-balanced subset of ``max_points`` rows of ``x``, coloured by ``y``
    (legend entries named from ``class_names`` where given, else the label index; no legend
    beyond ``MAX_LEGEND_CLASSES`` classes).

    The features are L2-normalised (the k-NN geometry) and reduced to 50 dimensions by PCA
    before t-SNE (scikit-learn Barnes-Hut, PCA initialisation, perplexity 30 or less for few
    points).
    """
    from matplotlib.figure import Figure
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits

    idx = balanced_subset(y.cpu(), max_points, seed)
    points = F.normalize(x[idx.to(x.device)].float(), dim=1).cpu().numpy()
    labels = y.cpu()[idx].numpy()
    if points.shape[1] > 50 and points.shape[0] > 50:
        points = PCA(50, random_state=seed).fit_transform(points)
    perplexity = min(30.0, (points.shape[0] - 1) / 3)
    tsne = TSNE(2, perplexity=perplexity, init="pca", random_state=seed)
    # Per-iteration work is tiny at this size: OpenMP synchronisation would dominate (and is
    # catastrophic on a busy machine), so t-SNE runs on one thread.
    with threadpool_limits(1, user_api="openmp"):
        xy = tsne.fit_transform(points)
    fig = Figure(figsize=(6, 6), dpi=120)
    ax = fig.add_subplot()
    scatter = ax.scatter(xy[:, 0], xy[:, 1], c=labels, cmap="tab10", s=4, linewidths=0)
    present = sorted({int(label) for label in labels})
    if len(present) <= MAX_LEGEND_CLASSES:  # beyond that a legend is unreadable
        handles, _ = scatter.legend_elements(num=None)  # one handle per label present, sorted
        names = [class_names[c] if c < len(class_names) else str(c) for c in present]
        ax.legend(handles, names, loc="best", fontsize=7, title="class", markerscale=0.8)
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
