"""Fault tolerance: atomic checkpoint writes, choosing a readable checkpoint to resume from, the
non-finite-loss guard (decided on the device) and the errors it and an out-of-memory step raise."""

from __future__ import annotations

import logging
import zipfile
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from lightning.fabric.plugins import TorchCheckpointIO

from maect.atomic import leftover_temporaries
from maect.checkpoints import CheckpointError, atomic_save
from maect.config import ConfigError, RunConfig
from maect.distributed import world_size

log = logging.getLogger(__name__)
# model.* keys that change how a model runs, not its weights: a checkpoint resumes across them
RUNTIME_MODEL_KEYS = ("grad_checkpointing",)


class NonFiniteLossError(FloatingPointError):
    """A training step produced a NaN or infinite loss; the message names the step and terms."""


class DeviceMemoryError(ConfigError):
    """A training step ran out of device memory; the message names the batch size and the knobs
    that lower memory per device (printed by the CLI as one line, like any ConfigError)."""

    @classmethod
    def from_oom(cls, cfg: RunConfig, precision: str, err: BaseException) -> DeviceMemoryError:
        """The error for ``err`` (a ``torch.OutOfMemoryError``) in a run of ``cfg``."""
        m, t = cfg.model, cfg.trainer
        cause = str(err).strip().split("\n")[0].split(". GPU")[0]
        return cls(
            f"out of memory at data.batch_size={cfg.data.batch_size} per device "
            f"(ViT {m.embed_dim}x{m.depth} p{m.patch_size} {m.img_size}px, {cfg.method}, "
            f"precision {precision}, strategy {t.strategy}, model.grad_checkpointing="
            f"{str(m.grad_checkpointing).lower()}): {cause}. Lower data.batch_size and raise "
            "trainer.accumulate_grad_batches to keep the global batch, or set "
            "model.grad_checkpointing=true (recompute activations), trainer.strategy=fsdp "
            "(shard weights, gradients and AdamW state over the GPUs) or "
            "trainer.precision=bf16-mixed (see docs/performance.md, Memory)"
        )


class NonFiniteGuard:
    """The non-finite-loss guard of a training run, decided on the device: no host read per step.

    :meth:`observe` (every batch) reduces the loss terms over all ranks in one collective together
    with a flag saying whether any rank's loss is NaN or infinite, and records the first such step
    (step, epoch, batch, this rank's terms). :meth:`update_flag` (before every optimizer step)
    sets :attr:`drop`, a float tensor that fused AdamW reads as ``found_inf``: 1 leaves parameters,
    moments and step count unchanged. Without ``skip`` every step from the first bad one on is
    dropped, as the run is about to stop. The host reads the guard only in :meth:`check`, which
    the training loop calls every ``trainer.log_every_n_steps`` steps, before a checkpoint is
    written and at the end of each epoch: it raises :class:`NonFiniteLossError` naming the first
    bad step and its terms (``on another rank`` where this rank's loss was finite), or, with
    ``skip``, counts the dropped steps in :attr:`skipped` and logs a warning.

    Args:
        skip: Skip non-finite steps (``trainer.skip_nonfinite``) instead of stopping.
    """

    def __init__(self, skip: bool) -> None:
        self.skip = skip
        self.skipped = 0  # steps dropped, as of the last check
        self._state: dict[str, torch.Tensor] = {}
        self._first_terms: dict[str, torch.Tensor] = {}
        self._term_since: dict[str, int] = {}  # first step each term was seen since the last check

    def _init_state(self, device: torch.device) -> None:
        def scalar(value: float, dtype: torch.dtype) -> torch.Tensor:
            return torch.full((), value, dtype=dtype, device=device)

        self._state = {
            "step": scalar(-1, torch.long),  # first bad step since the last check, -1: none
            "epoch": scalar(-1, torch.long),
            "batch": scalar(-1, torch.long),
            "local": scalar(False, torch.bool),  # whether this rank's loss was bad at that step
            "count": scalar(0, torch.long),  # optimizer steps dropped since the last check
            "pending": scalar(False, torch.bool),  # a bad batch in the current accumulation window
        }
        self.drop = scalar(0.0, torch.float32)

    def observe(
        self, losses: dict[str, torch.Tensor], step: int, epoch: int, batch: int
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Record one batch's loss terms; returns whether the loss is non-finite on any rank
        (a device bool) and each term's mean over ranks (what is logged)."""
        local_terms = {name: value.detach().float().mean() for name, value in losses.items()}
        if not self._state:
            self._init_state(local_terms["loss"].device)
        state = self._state
        local_bad = ~torch.isfinite(local_terms["loss"])
        stats = torch.stack([local_bad.float(), *local_terms.values()])
        if world_size() > 1:
            dist.all_reduce(stats)  # one collective: agreement on the flag, sums of the terms
            stats = torch.cat([stats[:1], stats[1:] / world_size()])
        bad = stats[0] > 0
        first_now = bad & (state["step"] < 0)
        for key, value in (("step", step), ("epoch", epoch), ("batch", batch)):
            state[key].masked_fill_(first_now, value)
        state["local"].copy_(torch.where(first_now, local_bad, state["local"]))
        for name, value in local_terms.items():
            if name not in self._first_terms:
                self._first_terms[name] = torch.full_like(value, float("nan"))
            self._term_since.setdefault(name, step)
            self._first_terms[name].copy_(torch.where(first_now, value, self._first_terms[name]))
        state["pending"].logical_or_(bad)
        return bad, dict(zip(local_terms, stats[1:], strict=True))

    def update_flag(self) -> None:
        """Set :attr:`drop` for the optimizer step that follows (called once per step)."""
        state = self._state
        if not state:
            return
        state["count"].add_(state["pending"])
        dropped = state["pending"] if self.skip else state["pending"] | (state["step"] >= 0)
        self.drop.copy_(dropped)
        state["pending"].zero_()

    def check(self, log: logging.Logger) -> None:
        """Read the guard on the host (one synchronisation): raise or count, see the class."""
        state = self._state
        if not state:
            return
        keys = ("step", "epoch", "batch", "local", "count")
        step, epoch, batch, local, count = torch.stack([state[k].long() for k in keys]).tolist()
        if step < 0:
            self._term_since.clear()
            return
        where = (
            ", ".join(
                f"{name}={value.item():.4g}"
                for name, value in self._first_terms.items()
                if self._term_since.get(name, step + 1) <= step
            )
            if local
            else "on another rank"
        )
        at = f"step {step} (epoch {epoch}, batch {batch})"
        if not self.skip:
            raise NonFiniteLossError(
                f"non-finite loss at {at}: {where}. Training stopped; checkpoints written "
                "before this step are intact. trainer.skip_nonfinite=true skips such steps."
            )
        self.skipped += count
        log.warning(
            "skipped %d step(s) with a non-finite loss, the first at %s (%s)", count, at, where
        )
        state["step"].fill_(-1)
        state["count"].zero_()
        self._term_since.clear()


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint I/O through :func:`maect.checkpoints.atomic_save`: a kill or a full
    disk never leaves a half-written file under the real name. The temporary files of the same
    checkpoint that a killed run left are removed first: Lightning writes one checkpoint at a
    time, from the one process that holds the run directory (:class:`maect.rundir.RunLock`)."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO takes no storage_options")
        for leftover in leftover_temporaries(Path(path)):
            leftover.unlink(missing_ok=True)
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
    if saved is None:
        return
    saved, model = (
        {k: v for k, v in m.items() if k not in RUNTIME_MODEL_KEYS} for m in (saved, model)
    )
    if saved == model:
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
