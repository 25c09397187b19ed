"""The OpenMP wait policy of a direct ``maect pretrain`` call, idle and with busy neighbours.

Times the training steps of a short ``maect pretrain`` (the Fashion-MNIST ViT of
``mae/fmnist_vit_t``, real data when installed, else synthetic) started two ways:

- ``maect``: as a user starts it; the package sets ``OMP_WAIT_POLICY=PASSIVE`` before torch loads
  (the variable is removed from the environment first, so the package's default applies);
- ``libgomp default``: torch imported before maect, so the package leaves the policy alone and
  libgomp's default (spin for a while at every barrier, then sleep) applies, as before.

Each is run on the machine as it is and with ``--busy`` extra processes spinning on the cores
(other jobs on a shared CPU). The runs alternate round by round, so a change of machine load
affects both alike. Images/s is the median of the per-step ``img_per_s`` in ``metrics.csv``
(first step excluded). Measures, never asserts.

    python benchmarks/wait_policy.py [--rounds 2] [--batch 64] [--steps 10] [--busy 2] [--append]
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from datetime import date
from pathlib import Path

from _common import ROOT, append_rows, command_line, git_commit, load_average

from maect.data.datasets import DataNotFoundError, load_fashion_mnist
from maect.pipeline import cpu_name

SECTION = "### OpenMP wait policy of direct `maect` calls (`benchmarks/wait_policy.py`)"
HEADER = (
    "| date | commit | CPU | cores | load avg | busy processes | policy | images/s | ms/step | "
    "command |\n|---|---|---|---|---|---|---|---|---|---|"
)
LAUNCHERS = {
    "maect (PASSIVE)": "import sys; from maect.cli import main; sys.exit(main())",
    "libgomp default": "import torch, sys; from maect.cli import main; sys.exit(main())",
}


@contextmanager
def busy_processes(count: int):
    """``count`` Python processes spinning on the CPU while the block runs."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]
    try:
        yield
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def data_overrides(images: int) -> list[str]:
    """Fashion-MNIST when installed, else the synthetic dataset of the same size."""
    try:
        load_fashion_mnist(None, train=False, download=False)
        return [f"data.subset={images}"]
    except DataNotFoundError:
        return ["data.name=synthetic", f"data.synthetic_size={images}"]


def step_rate(launcher: str, out: Path, batch: int, steps: int) -> float:
    """Median images/s of one short ``maect pretrain`` started by ``launcher``."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    command = [
        sys.executable,
        "-c",
        launcher,
        "pretrain",
        "recipe=mae/fmnist_vit_t",
        f"out={out}",
        *data_overrides(batch * steps),
        f"data.batch_size={batch}",
        "data.num_workers=0",
        "trainer.epochs=1",
        "trainer.log_every_n_steps=1",
        "trainer.progress_bar=false",
        "trainer.monitor_every=0",
        "trainer.recon_every=100",
        "optim.warmup_epochs=0",
    ]
    subprocess.run(command, check=True, env=env, cwd=ROOT, capture_output=True)
    with open(out / "metrics.csv") as f:
        rates = [float(r["img_per_s"]) for r in csv.DictReader(f) if r.get("img_per_s")]
    return statistics.median(rates[1:] or rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2, help="runs per policy and load")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10, help="training steps per run")
    parser.add_argument("--busy", type=int, default=os.cpu_count() or 2, help="busy processes")
    parser.add_argument("--append", action="store_true", help="log the rows to docs/benchmarks.md")
    args = parser.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for busy in sorted({0, args.busy}):
            rates: dict[str, list[float]] = {name: [] for name in LAUNCHERS}
            loads = []
            with busy_processes(busy):
                for r in range(args.rounds):
                    for i, (name, launcher) in enumerate(LAUNCHERS.items()):
                        out = Path(tmp) / f"busy{busy}-round{r}-{i}"
                        rates[name].append(step_rate(launcher, out, args.batch, args.steps))
                        loads.append(load_average())
            for name, values in rates.items():
                rate = statistics.median(values)
                load = statistics.mean(loads)
                print(
                    f"{name:<18} busy={busy}  load {load:4.1f}  {rate:8.1f} images/s  "
                    f"{1000 * args.batch / rate:8.1f} ms/step"
                )
                rows.append(
                    f"| {date.today()} | {git_commit()} | {cpu_name()} | {os.cpu_count()} | "
                    f"{load:.1f} | {busy} | {name} | {rate:.1f} | {1000 * args.batch / rate:.1f} "
                    f"| `{command_line()}` |"
                )
    if args.append:
        append_rows(SECTION, HEADER, rows)


if __name__ == "__main__":
    main()
