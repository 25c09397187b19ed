"""Streaming shards: written from a dataset, read back identically from a folder or a URL,
trained and evaluated on, and split over two gloo ranks with every sample read once per epoch."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image

from maect.cli import main
from maect.config import ConfigError
from maect.data.datasets import (
    DataNotFoundError,
    UnreadableImageError,
    build_dataset,
    make_synthetic,
)
from maect.data.loader import build_loader
from maect.data.shards import ShardDataset, write_shards
from maect.evaluation.command import evaluate, load_eval_config
from tests.gloo import init_gloo

SYNTHETIC = {"synthetic_size": 40, "img_size": 12, "channels": 3}


@pytest.fixture(scope="module")
def synthetic_shards(tmp_path_factory) -> Path:
    dst = tmp_path_factory.mktemp("shards") / "synthetic"
    assert write_shards("synthetic", dst, chunk_bytes="4kb", **SYNTHETIC) == {
        "train": 40,
        "val": 10,
    }
    return dst


def _image_folder(root: Path) -> None:
    """``train/`` and ``val/`` with two classes of JPEG/PNG images of mixed sizes, one broken."""
    rng = np.random.default_rng(0)
    for split, count in (("train", 4), ("val", 2)):
        for cls in ("cat", "dog"):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 256, (10 + i, 14, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.{'png' if i % 2 else 'jpg'}")
    (root / "train" / "dog" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")


def test_synthetic_shards_hold_the_images_labels_and_order(synthetic_shards):
    for train, split in ((True, "train"), (False, "val")):
        source = make_synthetic(40 if train else 10, train, img_size=12, channels=3)
        shards = build_dataset("shards", str(synthetic_shards), train=train)
        assert len(shards) == len(source) and torch.equal(shards.labels, source.labels)
        assert (shards.num_classes, shards.channels) == (10, 3)
        assert shards.classes == [str(c) for c in range(10)]
        for i in range(len(source)):
            assert torch.equal(shards.load_image(i), source.load_image(i)), (split, i)
    assert len(list((synthetic_shards / "train").glob("chunk-*.bin"))) > 1  # several chunks


def test_image_folder_shards_keep_the_file_bytes_and_skip_what_cannot_be_read(tmp_path, caplog):
    _image_folder(tmp_path / "src")
    write_shards(str(tmp_path / "src"), tmp_path / "dst")
    for train in (True, False):
        source = build_dataset("imagefolder", str(tmp_path / "src"), train=train)
        shards = build_dataset("shards", str(tmp_path / "dst"), train=train)
        assert shards.classes == source.classes == ["cat", "dog"]
        assert torch.equal(shards.labels, source.labels)
        for i in range(len(source)):
            a, b = source.load_image(i), shards.load_image(i)
            assert (a is None and b is None) or torch.equal(a, b)
    train = build_dataset("shards", str(tmp_path / "dst"), train=True)
    files = build_dataset("imagefolder", str(tmp_path / "src"), train=True).files
    bad = files.index(str(tmp_path / "src" / "train" / "dog" / "broken.jpg"))
    assert train.load_image(bad) is None and "train[" in caplog.text
    with pytest.raises(UnreadableImageError, match=r"train\[\d+\].*data.strict=true"):
        ShardDataset(str(tmp_path / "dst"), "train", strict=True).load_image(bad)


def test_shards_read_through_a_url_with_a_cache(synthetic_shards, tmp_path):
    """litdata's ``local:`` scheme takes the object-store path: index, metadata and chunks are
    fetched into the cache rather than read in place."""
    remote = ShardDataset(f"local:{synthetic_shards}", "train", cache_dir=str(tmp_path / "cache"))
    local = ShardDataset(str(synthetic_shards), "train")
    assert torch.equal(remote.labels, local.labels)
    for i in (0, 17, 39, 3):
        assert torch.equal(remote.load_image(i), local.load_image(i))
    assert any((tmp_path / "cache").rglob("chunk-*.bin"))


def test_bad_sources_and_destinations_are_one_line_errors(synthetic_shards, tmp_path, capsys):
    with pytest.raises(DataNotFoundError, match="maect shards"):
        ShardDataset(str(tmp_path), "train")
    with pytest.raises(DataNotFoundError, match="data.root"):
        build_dataset("shards", None, train=True)
    with pytest.raises(ConfigError, match="not empty"):
        write_shards("synthetic", synthetic_shards)
    with pytest.raises(ConfigError, match="local folder"):
        write_shards("synthetic", "s3://bucket/shards")
    assert main(["shards", "no-such-dataset", str(tmp_path / "x")]) == 2
    assert main(["shards", "synthetic", str(tmp_path / "y"), "chunk=1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "neither a dataset" in err[0] and "chunk=1" in err[1]


def test_cli_writes_shards(tmp_path, capsys):
    assert main(["shards", "synthetic", str(tmp_path / "s"), "synthetic_size=20"]) == 0
    assert "train: 20 images, val: 10 images" in capsys.readouterr().out
    meta = json.loads((tmp_path / "s" / "train" / "maect.json").read_text())
    assert meta["encoding"] == "raw" and len(meta["labels"]) == 20


def test_evaluate_on_shards_equals_evaluate_on_the_source(tmp_path):
    write_shards("synthetic", tmp_path / "s", synthetic_size=512, img_size=28, channels=1)
    common = ["protocols=knn", "plot=false", "progress=false", "cache=false"]
    source = evaluate("pixels", load_eval_config([*common, "data.name=synthetic"]))
    shards = evaluate(
        "pixels",
        load_eval_config(
            [
                *common,
                "data.name=shards",
                f"data.root={tmp_path / 's'}",
                "data.normalization=synthetic",
            ]
        ),
    )
    assert shards["features"]["n_train"] == source["features"]["n_train"] == 512
    assert shards["knn"] == source["knn"]


def _epoch_worker(rank: int, init_file: str, root: str, out: str) -> None:
    init_gloo(rank, init_file, 2)
    try:
        dataset = ShardDataset(root, "train")
        loader = build_loader(dataset, 4, num_workers=1, shuffle=True, drop_last=True, seed=5)
        loader.sampler.set_epoch(1)
        seen = [(batch["index"], batch["image"]) for batch in loader]
        torch.save(
            {"index": torch.cat([s[0] for s in seen]), "image": torch.cat([s[1] for s in seen])},
            Path(out) / f"rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_read_every_sample_once_per_epoch(synthetic_shards, tmp_path):
    args = (str(tmp_path / "init"), str(synthetic_shards), str(tmp_path))
    mp.spawn(_epoch_worker, args=args, nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    indices = torch.cat([r["index"] for r in ranks])
    assert sorted(indices.tolist()) == list(range(40))  # 40 = 5 global batches of 2 x 4
    assert not set(ranks[0]["index"].tolist()) & set(ranks[1]["index"].tolist())
    source = make_synthetic(40, True, img_size=12, channels=3)
    for r in ranks:
        for index, image in zip(r["index"], r["image"], strict=True):
            assert torch.equal(image, source.load_image(int(index)))
