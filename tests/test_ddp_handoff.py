"""Under DDP a stage's encoder.pt is on disk for every rank when the stage returns.

Without that, the next stage of ``maect run`` on rank 1 would read the run directory before rank 0
has written its encoder (``load_encoder`` would then fall back to ``checkpoints/last.ckpt``, and a
sharded evaluation would encode with other weights on each rank).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from maect import engine, tuning
from maect.config import load_config
from maect.engine import pretrain
from maect.tuning import tune
from tests.conftest import TINY_OVERRIDES, free_port, rank_environment

pytestmark = pytest.mark.slow  # two spawned processes training two tiny stages, ~30 s

WORLD = 2
COMMON = [
    *TINY_OVERRIDES,
    "data.synthetic_size=32",
    "data.batch_size=8",
    "data.num_workers=0",
    "trainer.epochs=1",
    "trainer.accelerator=cpu",
    f"trainer.devices={WORLD}",
    "trainer.strategy=ddp",
    "trainer.progress_bar=false",
    "trainer.monitor_every=0",
]


def _worker(rank: int, port: int, out: str) -> None:
    rank_environment(rank, WORLD, port)
    torch.set_num_threads(1)
    save = engine.save_encoder

    def slow_save(*args, **kwargs) -> None:  # rank 0 writes late: a reader must wait for it
        time.sleep(2.0)
        save(*args, **kwargs)

    engine.save_encoder = tuning.save_encoder = slow_save
    mae = pretrain(load_config("mae/fmnist_vit_t", COMMON), Path(out) / "mae")
    assert (mae / "encoder.pt").is_file(), f"rank {rank}: pretrain returned before encoder.pt"
    maect_cfg = load_config(
        "maect/fmnist_vit_t",
        [*COMMON, f"maect.init={mae}", "maect.head_epochs=1", "maect.queue_size=64"],
    )
    maect = tune(maect_cfg, Path(out) / "maect")
    assert (maect / "encoder.pt").is_file(), f"rank {rank}: tune returned before encoder.pt"
    (Path(out) / f"done{rank}").touch()


def test_next_stage_on_every_rank_finds_the_encoder(tmp_path):
    mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    assert (tmp_path / "done0").is_file() and (tmp_path / "done1").is_file()
    assert (tmp_path / "maect" / "encoder.pt").is_file()
