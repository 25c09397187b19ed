"""``maect evaluate``: frozen-feature protocols on a run, a checkpoint or raw pixels.

``evaluate(source, cfg)`` loads the encoder, extracts (or reads cached) train and test features
once, runs the selected protocols (k-NN, linear probe, low-shot, clustering, robustness) and the
per-block analysis, saves a t-SNE plot and writes ``eval.json``::

    {"knn": {"protocol": "weighted k-NN on frozen features", "top1": ..},
     "linear": {"protocol": .., "top1": ..},
     "lowshot": {"protocol": "logistic regression on frozen features", "1": .., "1pct": ..},
     "cluster": {"protocol": .., "acc": .., "nmi": .., "ami": .., "ari": .., "silhouette": ..},
     "robustness": {"protocol": .., "clean": .., "mean": .., "top1": {..}, "mce": ..},
     "layers": {"protocol": .., "blocks": {"0": {"knn": {..}}, ..}},
     "features": {"pooling": .., "arch": {..}, "n_train": .., ...},
     "timing": {"extract": s, "knn": s, ...}, "config": {...}}

Accuracies and clustering scores are in percent (silhouette and Davies-Bouldin as they are);
timings in seconds (docs/evaluation.md has the full schema). The parts live in their
own modules: settings (:mod:`~maect.evaluation.config`), what is evaluated
(:mod:`~maect.evaluation.sources`), the splits (:mod:`~maect.evaluation.splits`), the features
(:mod:`~maect.evaluation.featureset`), the protocol dispatch
(:mod:`~maect.evaluation.protocols`), the printed table (:mod:`~maect.evaluation.table`) and the
plot (:mod:`~maect.evaluation.plots`).
"""

from __future__ import annotations

import dataclasses
import json
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from maect.atomic import atomic_write_text
from maect.data.datasets import CLASS_NAMES
from maect.evaluation._common import timed
from maect.evaluation.config import EvalConfig, load_eval_config, validate_eval_config
from maect.evaluation.featureset import load_features
from maect.evaluation.plots import save_embedding_plot
from maect.evaluation.protocols import run_layers, run_protocols
from maect.evaluation.table import format_table

__all__ = ["EvalConfig", "evaluate", "format_table", "load_eval_config", "write_json"]


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
    layers = run_layers(features, cfg, timing)
    if layers is not None:
        result["layers"] = layers
    out = Path(features.info["out"])
    if cfg.plot:
        info = features.info
        title = f"{source} ({info['dataset']} test, {info['pooling']})"
        path = out / "embedding.png"
        timed(
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
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")
