"""Shared fixtures: a tiny ViT configuration on synthetic data; helpers for spawned ranks."""

import logging
import os
import socket

import pytest
import torch

from maect.cli import main
from maect.config import load_config
from maect.models.vit import ViTArch

TINY_OVERRIDES = [
    "data.name=synthetic",
    "data.synthetic_size=64",
    "data.batch_size=16",
    "model.embed_dim=32",
    "model.depth=2",
    "model.num_heads=2",
    "model.decoder_dim=16",
    "model.decoder_depth=1",
    "model.decoder_heads=2",
    "trainer.progress_bar=false",
    "trainer.log_every_n_steps=1",
]


def run_cli(*argv: str) -> int:
    """``maect.cli.main(argv)``; the ``maect`` logger keeps its handlers (main adds one bound to
    the stderr that pytest captures)."""
    logger = logging.getLogger("maect")
    handlers = list(logger.handlers)
    try:
        return main(list(argv))
    finally:
        logger.handlers = handlers


def cli_error(capsys, *argv: str) -> str:
    """The error line of a failing CLI call ``maect COMMAND ...`` (exit 2; log lines before it,
    e.g. a fallback, are allowed)."""
    assert run_cli(*argv) == 2
    *_, err = capsys.readouterr().err.strip().splitlines()
    assert err.startswith(f"maect {argv[0]}: error: "), err
    return err


@pytest.fixture
def tiny_arch() -> ViTArch:
    return ViTArch(img_size=28, patch_size=4, in_chans=1, embed_dim=32, depth=2, num_heads=2)


@pytest.fixture
def tiny_cfg():
    def make(*overrides: str):
        return load_config("mae/fmnist_vit_t", [*TINY_OVERRIDES, *overrides])

    return make


@pytest.fixture(autouse=True)
def _seed_and_private_cache(tmp_path_factory, monkeypatch):
    """Fixed seed, and a feature cache that never touches the user's ~/.cache."""
    torch.manual_seed(0)
    monkeypatch.setenv("MAECT_CACHE", str(tmp_path_factory.mktemp("maect_cache")))


def free_port() -> int:
    """A TCP port on localhost that nothing listens on (for a spawned process group)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_environment(rank: int, world: int, port: int) -> None:
    """Set the variables ``torchrun`` gives rank ``rank`` of ``world`` on one machine."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        WORLD_SIZE=str(world),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        GROUP_RANK="0",
        LOCAL_WORLD_SIZE=str(world),
    )
