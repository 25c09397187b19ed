"""Run directories: what a training command would do in one (start, resume, nothing, extend),
the lock that admits one maect process per directory, and the files that record the run.

Planning only reads. A training command opens :class:`RunDirectory` first (the lock is taken at
once when the directory exists, so a second process is refused before any work), runs its own
checks (dataset, one full batch, ``init=``, Lightning's trainer settings), and only then calls
:meth:`RunDirectory.commit`, which creates the directory and writes ``config.yaml`` and
``run.json``. A command that fails its checks leaves the directory as it was.

``run.json``::

    {"started": "2026-11-30T01:02:03Z", "finished": "2026-11-30T01:09:41Z" or null,
     "resumed": [ISO times of later starts], "extended": [{"at": .., "epochs_before": ..,
     "epochs": ..}], "command": .., "maect_version": .., "host": .., "cpu": ..}
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shlex
import socket
import sys
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from maect.atomic import atomic_write_text
from maect.config import ConfigError, diff_configs

log = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
RUN_FILE = "run.json"
LOCK_FILE = ".lock"
ENCODER_FILE = "encoder.pt"
# Keys that may change between an interrupted run and its resumption.
RESUMABLE_KEYS = (
    "data.num_workers",
    "data.root",
    "trainer.progress_bar",
    "trainer.devices",
    "trainer.accelerator",
    "trainer.num_nodes",
    "trainer.strategy",
    "trainer.checkpoint_every_steps",
    "trainer.skip_nonfinite",
    "trainer.compile",
    "model.grad_checkpointing",
    "trainer.cpu_matmul",
)
# The one key that may change on a finished run: raising it continues the run.
EXTENDABLE_KEY = "trainer.epochs"
# Outputs of a finished run that an extension replaces; kept as NAME.epochNNNN.SUFFIX.
FINAL_OUTPUTS = (ENCODER_FILE, "eval.json", "embedding.png")


class RunDirectoryError(ConfigError):
    """A run directory cannot be used: not a directory, not writable, in use by another process,
    or holding a run with another config."""


def utc_now() -> str:
    """The current time as ISO 8601 UTC with a ``Z``, e.g. ``2026-11-30T01:02:03Z``."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def check_out_dir(out: str | Path) -> None:
    """Refuse an ``out=`` that is a file, lies under a file, or cannot be written (checked by
    creating and removing a probe file in it or in its nearest existing parent)."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise RunDirectoryError(f"out={out} is a file, not a directory")
    existing = path.absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise RunDirectoryError(f"out={out}: {existing} is a file, not a directory")
    try:  # a probe file, removed at once: permissions, read-only mounts, quotas, root
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".maect-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise RunDirectoryError(f"out={out} is not writable ({existing}: {err.strerror})") from None


def is_launch_leader() -> bool:
    """Whether this process is the first one of its launch (global rank 0 under torchrun, SLURM
    or Lightning's own launcher): the one that locks and writes the run directory."""
    for key in ("RANK", "SLURM_PROCID"):
        if key in os.environ:
            return os.environ[key] == "0"
    node = os.environ.get("NODE_RANK", os.environ.get("GROUP_RANK", "0"))
    return os.environ.get("LOCAL_RANK", "0") == "0" and node == "0"


# --------------------------------------------------------------------------- planning


@dataclass(frozen=True)
class RunPlan:
    """What a training command does in a run directory.

    Attributes:
        action: ``new``, ``resume`` (an interrupted run), ``complete`` (nothing to do) or
            ``extend`` (a finished run continues to a raised ``trainer.epochs``).
        epochs_before: For ``extend``: the epochs the finished run was trained for.
        epochs: For ``extend``: the new ``trainer.epochs``.
    """

    action: str
    epochs_before: int | None = None
    epochs: int | None = None

    def describe(self) -> str:
        """One line for a dry run."""
        return {
            "new": "a new run",
            "resume": "resumes the interrupted run from its newest checkpoint",
            "complete": "finished: nothing to do",
            "extend": f"finished after {self.epochs_before} epochs: continues to "
            f"trainer.epochs={self.epochs} from its last checkpoint",
        }[self.action]


def read_saved_config(run_dir: Path) -> dict[str, Any] | None:
    """``config.yaml`` of ``run_dir`` (``None`` when there is none)."""
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        return None
    try:
        saved = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, OSError) as err:
        raise RunDirectoryError(f"{path} cannot be read ({err}); use another out=") from None
    if not isinstance(saved, dict):
        raise RunDirectoryError(f"{path} is not a maect config; use another out=")
    return saved


def plan_run(
    out: str | Path, config: dict[str, Any], done_file: str = ENCODER_FILE, extendable: bool = True
) -> RunPlan:
    """What running ``config`` (a :meth:`RunConfig.to_dict`) in ``out`` does; reads only.

    Args:
        out: The run directory.
        config: The command's config.
        done_file: The file whose presence marks the run as finished.
        extendable: Whether raising ``trainer.epochs`` continues a finished run.

    Raises:
        RunDirectoryError: If ``out`` holds a run with another config (other than the
            resumable keys, or a raised ``trainer.epochs`` on a finished run).
    """
    run_dir = Path(out)
    complete = (run_dir / done_file).is_file()
    saved = read_saved_config(run_dir)
    if saved is None:
        return RunPlan("complete" if complete else "new")
    changed = [d for d in diff_configs(saved, config) if not d.startswith(RESUMABLE_KEYS)]
    if not changed:
        return RunPlan("complete" if complete else "resume")
    if extendable and complete and all(d.startswith(f"{EXTENDABLE_KEY}:") for d in changed):
        before, after = saved["trainer"]["epochs"], config["trainer"]["epochs"]
        if after > before:
            return RunPlan("extend", before, after)
        raise RunDirectoryError(
            f"{run_dir} finished after {before} epochs; trainer.epochs={after} cannot shorten "
            "it (raising trainer.epochs continues it). Use a new out= directory."
        )
    advice = (
        "Use a new out= directory (on a finished run only trainer.epochs may be raised)."
        if complete and extendable
        else "Use a new out= directory."
        if complete
        else "Use a new out= directory, or repeat the original command to resume."
    )
    raise RunDirectoryError(
        f"{run_dir} already holds a run with another config ({'; '.join(changed)}). {advice}"
    )


# --------------------------------------------------------------------------- lock


class RunLock:
    """An exclusive lock on ``RUN_DIR/.lock``: a POSIX record lock (``fcntl.lockf``), which
    belongs to the process. The kernel releases it when the process exits or is killed, so a
    killed run never leaves a stale lock, and unlike ``flock`` it is not inherited by forked
    loader workers, which outlive a killed parent by seconds. The file only says who holds it
    (pid, host, start, command)."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / LOCK_FILE
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        """Take the lock now, or raise :class:`RunDirectoryError` naming the holder."""
        if self.held:
            return
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except (BlockingIOError, PermissionError):  # EAGAIN or EACCES: held by another process
            holder = os.read(fd, 4096).decode(errors="replace").strip() or "a process"
            os.close(fd)
            raise RunDirectoryError(
                f"{self.path.parent} is in use by another maect process ({holder}); "
                "wait for it to finish or stop it"
            ) from None
        os.ftruncate(fd, 0)
        command = shlex.join(sys.argv)
        os.write(
            fd,
            f"pid {os.getpid()} on {socket.gethostname()} since {utc_now()}: {command}\n".encode(),
        )
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fcntl.lockf(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


# --------------------------------------------------------------------------- lifecycle


class RunDirectory:
    """One training command's use of a run directory (a context manager that holds the lock).

    Only the launch leader (:func:`is_launch_leader`) locks and writes; the other ranks of the
    same launch read the plan and never refuse (the leader does), so they cannot refuse each
    other. ``dev_run`` (Lightning's fast_dev_run) writes only a new ``config.yaml``. ``done_file``
    marks a finished run (``encoder.pt``; ``finetune.json`` for fine-tuning), whose
    ``final_outputs`` an extension keeps under an epoch-suffixed name (``extendable=False``:
    finished runs are never extended).
    """

    def __init__(
        self,
        out: str | Path,
        config: dict[str, Any],
        dev_run: bool = False,
        done_file: str = ENCODER_FILE,
        final_outputs: tuple[str, ...] = FINAL_OUTPUTS,
        extendable: bool = True,
    ) -> None:
        self.path = Path(out)
        self.config = config
        self.dev_run = dev_run
        self.done_file = done_file
        self.final_outputs = final_outputs
        self.extendable = extendable
        self.leader = is_launch_leader()
        self.lock = RunLock(self.path)
        self.committed = False
        check_out_dir(self.path)
        if self.leader and self.path.is_dir():
            self.lock.acquire()  # at once: a second process is refused before any work
        try:
            self.plan = self._plan()
        except BaseException:
            self.lock.release()
            raise
        if self.complete:
            log.warning("%s is complete (%s exists); nothing to do", self.path, self.done_file)

    def _plan(self) -> RunPlan:
        plan = (self.path, self.config, self.done_file, self.extendable)
        if self.leader:
            return plan_run(*plan)
        try:
            return plan_run(*plan)
        except RunDirectoryError:
            return RunPlan("resume")  # the leader decides, and refuses

    def __enter__(self) -> RunDirectory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.lock.release()

    @property
    def complete(self) -> bool:
        """A finished run with the same config: the command has nothing to do."""
        return self.plan.action == "complete" and not self.dev_run

    def commit(self) -> None:
        """Create the directory and record the run (``config.yaml``, ``run.json``); call it once
        every check has passed, right before training. A no-op after the first call and on
        ranks other than the leader."""
        if self.committed or not self.leader:
            return
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise RunDirectoryError(f"out={self.path} cannot be created: {err.strerror}") from None
        if not self.lock.held:  # a new directory: another process may have started meanwhile
            self.lock.acquire()
            self.plan = self._plan()
            if self.complete:
                raise RunDirectoryError(f"{self.path} was completed by another process meanwhile")
        config_file = self.path / CONFIG_FILE
        text = yaml.safe_dump(self.config, sort_keys=False)
        if self.dev_run:
            if not config_file.is_file():
                atomic_write_text(config_file, text)
            self.committed = True
            return
        if self.plan.action == "extend":
            self._keep_final_outputs(self.plan.epochs_before)  # before config.yaml changes
        if not config_file.is_file() or config_file.read_text() != text:
            atomic_write_text(config_file, text)
        self._record_start()
        self.committed = True

    def finish(self) -> None:
        """Record the end time in ``run.json`` (leader only, not for dev runs)."""
        if self.committed and not self.dev_run:
            record = self.read_record()
            record["finished"] = utc_now()
            atomic_write_text(self.path / RUN_FILE, json.dumps(record, indent=2) + "\n")

    def read_record(self) -> dict[str, Any]:
        """``run.json`` (empty if missing or unreadable)."""
        try:
            record = json.loads((self.path / RUN_FILE).read_text())
        except (OSError, ValueError):
            return {}
        return record if isinstance(record, dict) else {}

    def _record_start(self) -> None:
        record = self.read_record()
        now = utc_now()
        if "started" not in record or self.plan.action == "new":
            from maect.pipeline import cpu_name

            record = {
                "started": now,
                "finished": None,
                "resumed": [],
                "extended": [],
                "command": shlex.join(sys.argv),
                "maect_version": _version(),
                "host": socket.gethostname(),
                "cpu": cpu_name(),
            }
        elif self.plan.action == "extend":
            record.setdefault("extended", []).append(
                {"at": now, "epochs_before": self.plan.epochs_before, "epochs": self.plan.epochs}
            )
            record["finished"] = None
        else:
            record.setdefault("resumed", []).append(now)
        atomic_write_text(self.path / RUN_FILE, json.dumps(record, indent=2) + "\n")

    def _keep_final_outputs(self, epochs_before: int | None) -> None:
        """Rename the finished run's outputs (encoder, evaluation) to ``NAME.epochNNNN.SUFFIX``
        so that the extended run is not mistaken for complete, and the result stays."""
        for name in self.final_outputs:
            path = self.path / name
            if path.is_file():
                kept = path.with_name(f"{path.stem}.epoch{epochs_before:04d}{path.suffix}")
                os.replace(path, kept)
                log.warning(
                    "extending %s: kept the finished run's %s as %s", self.path, name, kept.name
                )


def _version() -> str:
    import maect

    return maect.__version__
