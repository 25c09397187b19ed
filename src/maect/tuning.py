"""``maect tune``: MAE-CT stage 2 (NNCLR head on the frozen encoder) then stage 3 (contrastive
tuning), in one run directory.

Layout: ``head/`` (stage 2: checkpoints, metrics.csv, ``head.pt`` when done), ``tune/`` (stage 3:
checkpoints, metrics.csv), and at the top ``config.yaml`` and ``encoder.pt`` (the encoder EMA, or
the online encoder when ``maect.encoder_ema=0``). Re-running the command resumes whichever stage
was interrupted.
"""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from maect.checkpoints import CheckpointError, atomic_save, load_encoder, save_encoder
from maect.config import ConfigError, RunConfig
from maect.engine import fit_module, prepare_run_dir, training_dataset
from maect.evaluation.monitor import build_monitor
from maect.methods.base import arch_from_config
from maect.methods.maect import ContrastiveTuning, NNCLRHeadTraining
from maect.models.vit import MaskedViT

log = logging.getLogger(__name__)


def load_init_encoder(cfg: RunConfig) -> MaskedViT:
    """The encoder named by ``maect.init``; its architecture must match ``cfg.model``."""
    if not cfg.maect.init:
        raise ConfigError("maect.init is empty: name the MAE run or checkpoint to tune (init=...)")
    encoder = load_encoder(cfg.maect.init, num_heads=cfg.model.num_heads)
    expected = arch_from_config(cfg)
    if encoder.arch != expected:
        diffs = [
            f"{field}: {getattr(encoder.arch, field)} (checkpoint) vs {getattr(expected, field)}"
            for field in expected.__dataclass_fields__
            if getattr(encoder.arch, field) != getattr(expected, field)
        ]
        raise CheckpointError(
            f"maect.init={cfg.maect.init} does not fit model.* of the recipe ({'; '.join(diffs)})"
        )
    return encoder.train()


def tune(
    cfg: RunConfig, out: str | Path, callbacks: list[Callback] | None = None, dev_run: int = 0
) -> Path:
    """Run MAE-CT stages 2 and 3 into ``out`` (resuming either stage); ``callbacks`` join the
    trainers of both stages."""
    run_dir = Path(out)
    prepare_run_dir(run_dir, cfg)
    if (run_dir / "encoder.pt").is_file() and not dev_run:
        log.warning("%s is complete (encoder.pt exists); nothing to do", run_dir)
        return run_dir
    load_init_encoder(cfg)  # fail early on a wrong checkpoint
    L.seed_everything(cfg.trainer.seed, workers=True, verbose=False)
    dataset = training_dataset(cfg)

    head_file = run_dir / "head" / "head.pt"
    head_state = None
    if cfg.maect.head_epochs > 0:
        if not head_file.is_file() or dev_run:
            head = NNCLRHeadTraining(cfg, load_init_encoder(cfg))
            dataset.transform = head.train_transform()
            trainer = fit_module(
                head.cfg, head, dataset, run_dir / "head", list(callbacks or []), dev_run
            )
            if trainer.is_global_zero and not dev_run:
                atomic_save(head.head_state(), head_file)
            trainer.strategy.barrier("head.pt")  # a resumed stage 3 on any rank reads it
            head_state = head.head_state()
        else:
            head_state = torch.load(head_file, map_location="cpu", weights_only=True)

    tuning = ContrastiveTuning(cfg, load_init_encoder(cfg), head_state)
    dataset.transform = tuning.train_transform()
    monitor = build_monitor(cfg, every=cfg.trainer.monitor_every)
    stage3_callbacks = [*([monitor] if monitor is not None else []), *(callbacks or [])]
    trainer = fit_module(cfg, tuning, dataset, run_dir / "tune", stage3_callbacks, dev_run)
    if trainer.is_global_zero and not dev_run:
        save_encoder(tuning.export_encoder(), run_dir / "encoder.pt")
    trainer.strategy.barrier("encoder.pt")  # a next stage on any rank reads it (maect run)
    return run_dir
