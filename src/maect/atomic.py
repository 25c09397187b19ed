"""Atomic file replacement: every file maect rewrites (checkpoints, ``encoder.pt``,
``config.yaml``, ``run.json``, ``eval.json``, the feature cache) is written to a uniquely named
temporary file in the same folder and renamed over its real name, so readers see the old or the
new file, never a partial one, and concurrent writers of one file never share a temporary name."""

from __future__ import annotations

import contextlib
import glob
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import IO


def temporary_path(path: Path) -> Path:
    """A new temporary name next to ``path``: ``.NAME.PID.RANDOM.tmp``."""
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def leftover_temporaries(path: Path) -> list[Path]:
    """The temporary files of ``path`` in its folder (of writers still running, or killed before
    their rename)."""
    return sorted(path.parent.glob(f".{glob.escape(path.name)}.*.tmp"))


@contextlib.contextmanager
def atomic_write(path: Path, mode: str = "wb", fsync: bool = False) -> Iterator[IO]:
    """Open a new temporary file next to ``path`` (``mode``: ``w`` or ``wb``; the folder is
    created) and rename it over ``path`` when the block ends without an error; on an error the
    temporary file is removed and ``path`` is unchanged. ``fsync``: flush the file to the disk
    before the rename (:func:`fsync_folder` then makes the rename itself durable)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    try:
        with open(tmp, mode.replace("w", "x")) as f:  # exclusive: never another writer's file
            yield f
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Replace ``path`` by a file holding ``text`` (see :func:`atomic_write`)."""
    with atomic_write(path, "w") as f:
        f.write(text)


def fsync_folder(folder: Path) -> None:
    """Flush ``folder``'s entries (a rename in it) to the disk."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
