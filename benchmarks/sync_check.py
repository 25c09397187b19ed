"""Host synchronisations of real training steps: every method trains a few steps through the
engine (``fit_module``: Lightning, the guard, logging, progress bar; synthetic data) under
``torch.cuda.set_sync_debug_mode("warn")``, and every synchronising CUDA call is counted, split
into those inside ``optimizer_step`` (the training step: forward, backward, guard, AdamW, EMA
updates; must be none) and those elsewhere (loader, logging, progress bar, checkpoints), with the
Python line that made each. Then each method trains again with ``trainer.log_every_n_steps=1``
(the logger, the progress bar and the guard read the device every step, as the step did before
it became sync-free) and the images/s of both runs are compared.

Needs CUDA. ``--device cpu`` dry-runs the same code on CPU (no synchronisation to count) to check
the script itself. ``--error`` raises at the first synchronisation inside a step instead.

Usage::

    python benchmarks/sync_check.py [--methods mae,can,simclr,maect_head,maect] [--steps 30] \\
        [--batch 256] [--append]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import tempfile
import time
import warnings
from collections.abc import Iterator
from datetime import date
from pathlib import Path

import torch
from _common import append_rows, command_line, device_name, git_commit
from lightning import Callback

from maect.config import RunConfig, load_config
from maect.engine import fit_module, training_dataset
from maect.methods import CAN, MAE, PretrainMethod
from maect.methods.base import arch_from_config
from maect.methods.maect import ContrastiveTuning, NNCLRHeadTraining
from maect.models.vit import MaskedViT

SECTION = "### Host synchronisations of training steps (`benchmarks/sync_check.py`)"
HEADER = (
    "| date | commit | machine | torch | method | model, batch | steps | syncs in steps "
    "| other syncs per step | where | images/s | images/s, log every step | ratio | args |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
)
MARKER = "synchroniz"  # torch's warning: "called a synchronizing CUDA operation"
RECIPES = {
    "mae": "mae/fmnist_vit_t",
    "can": "can/fmnist_vit_t",
    "simclr": "simclr/fmnist_vit_t",
    "maect_head": "maect/fmnist_vit_t",
    "maect": "maect/fmnist_vit_t",
}


def build(method: str, cfg: RunConfig) -> PretrainMethod:
    """The module of ``method`` (MAE-CT stages on a freshly initialised encoder)."""
    if method == "mae":
        return MAE(cfg)
    if method in ("can", "simclr"):
        return CAN(cfg)
    encoder = MaskedViT(arch_from_config(cfg))
    return (
        NNCLRHeadTraining(cfg, encoder)
        if method == "maect_head"
        else ContrastiveTuning(cfg, encoder)
    )


def config(method: str, args: argparse.Namespace, log_every: int) -> RunConfig:
    """A short synthetic run of ``method``: ``--steps`` steps of ``--batch`` images, one epoch."""
    overrides = [
        "data.name=synthetic",
        f"data.synthetic_size={args.steps * args.batch}",
        f"data.batch_size={args.batch}",
        f"data.num_workers={args.workers}",
        "trainer.epochs=1",
        f"trainer.log_every_n_steps={log_every}",
        "trainer.monitor_every=0",
        f"trainer.accelerator={'gpu' if args.device == 'cuda' else 'cpu'}",
        "trainer.devices=1",
        "optim.warmup_epochs=0",
        *args.set,
    ]
    if method.startswith("maect"):
        overrides.append(f"maect.queue_size={args.batch * 16}")
    return load_config(RECIPES[method], overrides)


class StepTimer(Callback):
    """Wall time from the end of the second batch to the end of the last one, waiting for the
    device at those two points only (its own synchronisations are not counted)."""

    def __init__(self) -> None:
        self.start = self.end = 0.0
        self.images = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        last = batch_idx + 1 == trainer.num_training_batches
        if batch_idx == 1 or last:
            if pl_module.device.type == "cuda":
                torch.cuda.synchronize()
            if batch_idx == 1:
                self.start = time.perf_counter()
        if batch_idx > 1:
            self.images += len(batch["label"])
        if last:
            self.end = time.perf_counter()

    @property
    def images_per_s(self) -> float:
        return self.images / (self.end - self.start) if self.end > self.start else float("nan")


@contextlib.contextmanager
def sync_debug(mode: str) -> Iterator[None]:
    """``torch.cuda.set_sync_debug_mode(mode)`` while active (a no-op without CUDA)."""
    if not torch.cuda.is_available():
        yield
        return
    torch.cuda.set_sync_debug_mode(mode)
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(0)


def run(method: str, args: argparse.Namespace, log_every: int, count: bool) -> dict:
    """Train ``method`` for ``--steps`` steps; with ``count``, the synchronisations by place."""
    cfg = config(method, args, log_every)
    module = build(method, cfg)
    dataset = training_dataset(cfg)
    dataset.transform = module.train_transform()
    inside = {"now": False, "step": 0}
    found: list[tuple[bool, int, str]] = []
    step = module.optimizer_step

    def counted_step(*a, **kw) -> None:
        inside["now"], inside["step"] = True, module.global_step
        try:
            if count and args.error and module.global_step > 0:
                with sync_debug("error"):
                    step(*a, **kw)
            else:
                step(*a, **kw)
        finally:
            inside["now"] = False

    module.optimizer_step = counted_step

    def record(message, category, filename, lineno, file=None, line=None) -> None:
        if MARKER in str(message) and Path(filename).name != Path(__file__).name:
            found.append((inside["now"], inside["step"], f"{Path(filename).name}:{lineno}"))

    timer = StepTimer()
    with tempfile.TemporaryDirectory() as run_dir, warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record  # catch_warnings restores it
        with sync_debug("warn" if count else 0):
            fit_module(cfg, module, dataset, Path(run_dir), [timer])
    later = [(i, s, w) for i, s, w in found if s > 0]  # the first step allocates and sets up
    places = collections.Counter(w for _, _, w in later)
    return {
        "steps": module.global_step,
        "in_step": sum(i for i, _, _ in later),
        "other": sum(not i for i, _, _ in later),
        "where": ", ".join(f"{w} x{n}" for w, n in places.most_common(4)) or "-",
        "images_per_s": timer.images_per_s,
        "model": f"ViT {cfg.model.embed_dim}x{cfg.model.depth} {cfg.model.img_size}px",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default=",".join(RECIPES), help=f"from {', '.join(RECIPES)}")
    parser.add_argument("--steps", type=int, default=30, help="training steps per run")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--workers", type=int, default=4, help="loader workers")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
    parser.add_argument("--error", action="store_true", help="raise at a sync inside a step")
    parser.add_argument("--append", action="store_true", help="add rows to docs/benchmarks.md")
    args = parser.parse_args()
    command = command_line()
    device = torch.device(args.device)
    print(f"{command}\n{device_name(device)}, torch {torch.__version__}", flush=True)
    print("method  steps  syncs in steps  other syncs/step  where  img/s  img/s (log every step)")
    for method in args.methods.split(","):
        quiet = run(method, args, log_every=10_000, count=True)
        chatty = run(method, args, log_every=1, count=False)
        other = quiet["other"] / max(1, quiet["steps"] - 1)
        ratio = quiet["images_per_s"] / chatty["images_per_s"]
        cells = [
            method,
            f"{quiet['model']}, {args.batch}",
            str(quiet["steps"]),
            str(quiet["in_step"]),
            f"{other:.2f}",
            quiet["where"],
            f"{quiet['images_per_s']:.0f}",
            f"{chatty['images_per_s']:.0f}",
            f"{ratio:.2f}",
        ]
        print("  ".join(cells[:1] + cells[2:]), flush=True)
        if args.append:
            lead = [str(date.today()), git_commit(), device_name(device), torch.__version__]
            append_rows(
                SECTION, HEADER, ["| " + " | ".join([*lead, *cells, f"`{command}`"]) + " |"]
            )


if __name__ == "__main__":
    main()
