"""Helpers shared by the benchmark scripts: machine description, git commit, load average,
interleaved median timing, FLOP counting and the ``docs/benchmarks.md`` writers."""

from __future__ import annotations

import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol, TypeVar

import torch
from torch.utils.flop_counter import FlopCounterMode

from maect.pipeline import cpu_name

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS_MD = ROOT / "docs" / "benchmarks.md"
T = TypeVar("T")


class LossModule(Protocol):
    """A module with the ``compute_losses(batch) -> {"loss": ...}`` of the methods."""

    def compute_losses(self, batch: dict) -> dict[str, torch.Tensor]: ...

    def zero_grad(self, set_to_none: bool = True) -> None: ...


def load_average() -> float:
    """1-minute load average (NaN where the OS has none)."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else math.nan


def device_name(device: torch.device) -> str:
    """GPU name, or the CPU model and the number of threads torch uses."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()}, {torch.get_num_threads()} threads"


def machine(device: torch.device) -> str:
    """:func:`device_name` plus, on CPU, the 1-minute load (CPU timings on a loaded machine are
    not comparable)."""
    if device.type == "cuda":
        return device_name(device)
    return f"{device_name(device)}, load average {load_average():.1f}"


def git_commit() -> str:
    """Short commit hash, marked ``+dirty`` when the work tree has uncommitted changes;
    ``MAECT_COMMIT`` when set (a copy of the tree on another machine, whose .git may be stale)."""
    if os.environ.get("MAECT_COMMIT"):
        return os.environ["MAECT_COMMIT"]
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(["git", "diff-index", "--quiet", "HEAD", "--"], cwd=ROOT).returncode
    except OSError:
        commit, dirty = "", 0
    if not commit:
        return "unknown"
    return f"{commit}+dirty" if dirty else commit


def command_line() -> str:
    """How this script was started (relative to the repository), prefixed with the OpenMP wait
    policy when set: CPU timings on a shared machine depend on it."""
    policy = os.environ.get("OMP_WAIT_POLICY")
    prefix = f"OMP_WAIT_POLICY={policy} " if policy else ""
    script = Path(sys.argv[0]).resolve()
    shown = script.relative_to(ROOT) if script.is_relative_to(ROOT) else script
    return f"{prefix}python {shown} {' '.join(sys.argv[1:])}".rstrip()


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], T], device: torch.device) -> tuple[T, float]:
    """``fn()`` and its wall time, synchronising ``device`` before and after."""
    synchronize(device)
    start = time.perf_counter()
    out = fn()
    synchronize(device)
    return out, time.perf_counter() - start


def step_times(
    steps: dict[str, Callable[[], None]],
    rounds: int,
    warmup: int,
    device: torch.device | None = None,
    inner: int = 1,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, list[float]]:
    """Seconds per call of each function, one sample per round after ``warmup`` untimed calls.

    The functions take turns within each round, so a change of machine load affects them alike.
    A sample runs ``inner`` calls back to back and synchronises ``device`` once at its end, so
    the calls themselves need not synchronise. ``clock``: wall time by default;
    ``time.process_time`` (CPU seconds of all threads) holds up better on a shared CPU.
    """
    device = device or torch.device("cpu")
    for fn in steps.values():
        for _ in range(warmup):
            fn()
    synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, fn in steps.items():
            start = clock()
            for _ in range(inner):
                fn()
            synchronize(device)
            times[name].append((clock() - start) / inner)
    return times


def images_per_second(
    steps: dict[str, Callable[[], None]], batch: int, rounds: int, warmup: int
) -> dict[str, float]:
    """Median images/s of each training step over ``rounds`` timed rounds after ``warmup``
    (see :func:`step_times`)."""
    times = step_times(steps, rounds, warmup)
    return {name: batch / statistics.median(t) for name, t in times.items()}


def training_flops(module: LossModule, batch: dict) -> int:
    """FLOPs of one forward + backward of the loss (matrix products, convolutions, attention)."""
    with FlopCounterMode(display=False) as counter:
        module.compute_losses(batch)["loss"].backward()
    module.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def append_section(text: str, path: Path = BENCHMARKS_MD) -> None:
    """Append a markdown section to ``path`` (created with a title if missing)."""
    header = "" if path.is_file() else "# Benchmarks\n"
    with path.open("a") as f:
        f.write(f"{header}\n{text}")


def append_rows(section: str, header: str, rows: list[str], path: Path = BENCHMARKS_MD) -> None:
    """Add table ``rows`` at the end of the table under the heading ``section`` of ``path``; the
    section (heading, blank line, ``header``) is added at the end of the file when missing."""
    lines = path.read_text().splitlines() if path.is_file() else ["# Benchmarks"]
    if section not in lines:
        lines += ["", section, "", *header.splitlines()]
    start = lines.index(section)
    stop = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("#")), len(lines))
    last_row = max(i for i in range(start + 1, stop) if lines[i].startswith("|"))
    lines[last_row + 1 : last_row + 1] = rows
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
