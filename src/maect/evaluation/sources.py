"""What ``maect evaluate`` evaluates: a run directory, a checkpoint file or raw pixels, opened
as an encoder with the fingerprint of its weights and the folders its outputs and features go to."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from maect.checkpoints import load_encoder
from maect.config import RunConfig, config_from_yaml
from maect.evaluation.config import EvalConfig
from maect.evaluation.features import default_cache_dir, weights_fingerprint

PIXELS = "pixels"


@dataclass
class Source:
    """What is evaluated: the encoder (``None`` for pixels) and where its outputs go."""

    encoder: torch.nn.Module | None
    weights: str
    run_cfg: RunConfig | None
    out: Path
    cache_dir: Path


def open_source(source: str, cfg: EvalConfig) -> Source:
    """Load ``source`` (a run directory, a checkpoint file or ``"pixels"``; ``model.num_heads``
    for a checkpoint whose head count cannot be inferred) and decide where its ``eval.json``
    (``cfg.out`` or a default next to it) and its feature cache go."""
    cache_dir = default_cache_dir(None)
    if source == PIXELS:
        out = Path(cfg.out or Path("runs") / f"pixels-{cfg.data.name or 'fashion-mnist'}")
        return Source(None, PIXELS, None, out, cache_dir)
    path = Path(source)
    encoder = load_encoder(path, num_heads=cfg.model.num_heads)  # refuses a contradiction
    weights = weights_fingerprint(path)
    if path.is_dir():
        config = path / "config.yaml"
        run_cfg = config_from_yaml(config) if config.is_file() else None
        return Source(encoder, weights, run_cfg, Path(cfg.out or path), default_cache_dir(path))
    out = Path(cfg.out or path.with_name(f"{path.stem}-eval"))
    return Source(encoder, weights, None, out, cache_dir)
