"""Fault tolerance: atomic checkpoint writes, choosing a readable checkpoint to resume from, and the
error raised for a non-finite loss."""

from __future__ import annotations

import logging
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins import TorchCheckpointIO

from maect.checkpoints import CheckpointError, atomic_save

log = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """A training step produced a NaN or infinite loss; the message names the step and terms."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint I/O through :func:`maect.checkpoints.atomic_save`: a kill or a full
    disk never leaves a half-written file under the real name."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO takes no storage_options")
        atomic_save(checkpoint, Path(path))


def read_checkpoint_meta(path: Path) -> dict[str, Any]:
    """A training checkpoint's contents with tensors memory-mapped (not read), after checking
    every record's CRC.

    Raises:
        CheckpointError: Naming ``path``, if it is truncated, corrupt or not a training checkpoint.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError) as err:
        raise CheckpointError(f"{path} is truncated or not a checkpoint ({err})") from err
    if bad is not None:
        raise CheckpointError(f"{path} is corrupt: record {bad} fails its checksum")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # torch raises many types for foreign content
        raise CheckpointError(f"{path} cannot be loaded: {err}") from err
    if not isinstance(ckpt, dict) or not {"state_dict", "global_step"} <= ckpt.keys():
        raise CheckpointError(f"{path} is not a training checkpoint (no state_dict/global_step)")
    return ckpt


def check_model_config(path: Path, ckpt: dict[str, Any], model: dict[str, Any]) -> None:
    """Refuse a checkpoint whose saved ``model`` section differs from the run's ``model``."""
    saved = ckpt.get("hyper_parameters", {}).get("config", {}).get("model")
    if saved is None or saved == model:
        return
    diffs = [
        f"model.{k}: {saved.get(k)!r} (checkpoint) vs {model.get(k)!r} (config)"
        for k in sorted(set(saved) | set(model))
        if saved.get(k) != model.get(k)
    ]
    raise CheckpointError(f"{path} belongs to another architecture: {'; '.join(diffs)}")


def resume_checkpoint(ckpt_dir: Path, model: dict[str, Any]) -> tuple[Path, dict[str, Any]] | None:
    """The checkpoint to resume from: ``last.ckpt``, else (if it is unreadable, logged as an error
    naming the file) the newest readable ``epochNNNN.ckpt``; ``None`` if there is none at all.

    Args:
        ckpt_dir: A run's ``checkpoints/`` folder.
        model: The run's ``model`` config section; checkpoints of another architecture are refused.

    Returns:
        The path and its contents (see :func:`read_checkpoint_meta`).

    Raises:
        CheckpointError: If checkpoints exist but none is readable, or one is of another model.
    """
    candidates = [ckpt_dir / "last.ckpt", *sorted(ckpt_dir.glob("epoch*.ckpt"), reverse=True)]
    candidates = [p for p in candidates if p.is_file()]
    errors = []
    for path in candidates:
        try:
            ckpt = read_checkpoint_meta(path)
        except CheckpointError as err:
            log.error("%s; falling back to the previous checkpoint", err)
            errors.append(str(err))
            continue
        check_model_config(path, ckpt, model)
        return path, ckpt
    if errors:
        raise CheckpointError(
            f"no readable checkpoint in {ckpt_dir} ({'; '.join(errors)}); "
            "move the folder away to train from scratch"
        )
    return None
