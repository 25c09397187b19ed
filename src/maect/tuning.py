"""``maect tune``: stage 2 (heads on the frozen encoder) then stage 3 (tuning the encoder) of
MAE-CT or MIM-Refiner, in one run directory.

Layout: ``head/`` (stage 2: checkpoints, metrics.csv, ``head.pt`` when done), ``tune/`` (stage 3:
checkpoints, metrics.csv), and at the top ``config.yaml`` and ``encoder.pt`` (the encoder EMA, or
the online encoder when the method's ``encoder_ema=0``). Re-running the command resumes whichever
stage was interrupted.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import NamedTuple

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from maect.checkpoints import CheckpointError, atomic_save, load_encoder
from maect.config import (
    TUNING_METHODS,
    ConfigError,
    MAECTConfig,
    RefinerConfig,
    RunConfig,
    check_command,
)
from maect.engine import (
    finish_with_encoder,
    fit_module,
    train_run,
    training_dataset,
    with_monitor,
)
from maect.methods.base import PretrainMethod, arch_from_config
from maect.methods.maect import ContrastiveTuning, NNCLRHeadTraining
from maect.methods.refiner import RefinerHeadTraining, RefinerTuning
from maect.models.vit import MaskedViT
from maect.rundir import RunDirectory

log = logging.getLogger(__name__)


class TuningStages(NamedTuple):
    """The stage-2 and stage-3 modules of a tuning method."""

    head: type[NNCLRHeadTraining] | type[RefinerHeadTraining]
    tune: type[ContrastiveTuning] | type[RefinerTuning]


STAGES = {
    "maect": TuningStages(NNCLRHeadTraining, ContrastiveTuning),
    "refiner": TuningStages(RefinerHeadTraining, RefinerTuning),
}
assert set(STAGES) == set(TUNING_METHODS)


def tuning_section(cfg: RunConfig) -> MAECTConfig | RefinerConfig:
    """The config section of the tuning method ``cfg.method`` (``maect`` or ``refiner``)."""
    if cfg.method not in STAGES:
        raise ConfigError(
            f"maect tune runs {' and '.join(STAGES)} recipes; {cfg.recipe or 'this config'} has "
            f"method={cfg.method} (train it with maect pretrain)"
        )
    return getattr(cfg, cfg.method)


def with_init(cfg: RunConfig, init: str) -> RunConfig:
    """``cfg`` with the ``init`` of its tuning section set (the ``init=`` of ``maect tune``)."""
    section = dataclasses.replace(tuning_section(cfg), init=init)
    return dataclasses.replace(cfg, **{cfg.method: section})


def load_init_encoder(cfg: RunConfig) -> MaskedViT:
    """The encoder named by the method's ``init``; its architecture must match ``cfg.model``."""
    init = tuning_section(cfg).init
    if not init:
        raise ConfigError(
            f"{cfg.method}.init is empty: name the MAE run or checkpoint to tune (init=...)"
        )
    encoder = load_encoder(init, num_heads=cfg.model.num_heads)
    expected = arch_from_config(cfg)
    if encoder.arch != expected:
        diffs = [
            f"{field}: {getattr(encoder.arch, field)} (checkpoint) vs {getattr(expected, field)}"
            for field in expected.__dataclass_fields__
            if getattr(encoder.arch, field) != getattr(expected, field)
        ]
        raise CheckpointError(
            f"{cfg.method}.init={init} does not fit model.* of the recipe ({'; '.join(diffs)})"
        )
    return encoder.train()


def tune(
    cfg: RunConfig, out: str | Path, callbacks: list[Callback] | None = None, dev_run: int = 0
) -> Path:
    """Run stages 2 and 3 of ``cfg.method`` (MAE-CT or MIM-Refiner) into ``out`` (resuming
    either stage; raising ``trainer.epochs`` on a finished run continues stage 3); ``callbacks``
    join the trainers of both stages. Nothing is written before the checks pass."""
    check_command(cfg, "tune")
    return train_run(cfg, out, lambda run: _tune(cfg, run, callbacks, dev_run), dev_run)


def _tune(
    cfg: RunConfig, run: RunDirectory, callbacks: list[Callback] | None, dev_run: int
) -> None:
    section = tuning_section(cfg)
    stages = STAGES[cfg.method]
    run_dir = run.path
    load_init_encoder(cfg)  # fail early on a wrong checkpoint
    L.seed_everything(cfg.trainer.seed, workers=True, verbose=False)
    dataset = training_dataset(cfg)

    head_file = run_dir / "head" / "head.pt"
    head_state = None
    if section.head_epochs > 0:
        if not head_file.is_file() or dev_run:
            head = stages.head(cfg, load_init_encoder(cfg))
            dataset.transform = head.train_transform()
            trainer = fit_module(
                head.cfg, head, dataset, run_dir / "head", list(callbacks or []), dev_run, run
            )
            head_state = head.head_state()  # every rank: under FSDP a gather
            if trainer.is_global_zero and not dev_run:
                atomic_save(head_state, head_file)
            trainer.strategy.barrier("head.pt")  # a resumed stage 3 on any rank reads it
        else:
            head_state = torch.load(head_file, map_location="cpu", weights_only=True)

    tuning: PretrainMethod = stages.tune(cfg, load_init_encoder(cfg), head_state)
    dataset.transform = tuning.train_transform()
    stage3 = with_monitor(cfg, callbacks)
    trainer = fit_module(cfg, tuning, dataset, run_dir / "tune", stage3, dev_run, run)
    finish_with_encoder(run, trainer, tuning, dev_run)
