"""Data layer: IDX reader, missing-data errors, balanced subsets, bad images, channels."""

import gzip
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from maect.data.datasets import (
    FMNIST_SYSTEM_ROOT,
    DataNotFoundError,
    ImageFolderDataset,
    load_fashion_mnist,
    read_idx,
)
from maect.data.loader import build_loader
from maect.data.subset import balanced_subset
from maect.data.transforms import eval_transform, mae_transform


def _write_idx(path, array: np.ndarray) -> None:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_from_idx_files(tmp_path):
    images = np.random.randint(0, 256, size=(20, 28, 28))
    labels = np.arange(20) % 10
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", images)
    _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", labels)
    assert np.array_equal(read_idx(tmp_path / "train-images-idx3-ubyte.gz"), images)
    ds = load_fashion_mnist(str(tmp_path), train=True, download=False)
    image, label, index = ds[3]
    assert image.dtype == torch.uint8 and image.shape == (1, 28, 28)
    assert torch.equal(image[0], torch.from_numpy(images[3]).to(torch.uint8))
    assert (label, index) == (3, 3)


def test_truncated_idx_is_an_error(tmp_path):
    path = tmp_path / "x-idx3-ubyte"
    path.write_bytes(struct.pack(">HBB", 0, 8, 3) + struct.pack(">3I", 10, 28, 28) + b"\0" * 100)
    with pytest.raises(ValueError, match="truncated"):
        read_idx(path)


def test_missing_data_names_every_place_looked(tmp_path, monkeypatch):
    monkeypatch.setattr("maect.data.datasets.FMNIST_SYSTEM_ROOT", str(tmp_path / "nowhere"))
    with pytest.raises(DataNotFoundError) as err:
        load_fashion_mnist(str(tmp_path / "mine"), train=True, download=False)
    message = str(err.value)
    assert str(tmp_path / "mine") in message and str(tmp_path / "nowhere") in message
    assert "apt-get install dataset-fashion-mnist" in message and "data.download=true" in message


@pytest.mark.skipif(
    not (FMNIST_SYSTEM_ROOT and __import__("os").path.isdir(FMNIST_SYSTEM_ROOT)),
    reason="Debian's dataset-fashion-mnist is not installed",
)
def test_real_fashion_mnist_shapes():
    train = load_fashion_mnist(None, train=True, download=False)
    test = load_fashion_mnist(None, train=False, download=False)
    assert (len(train), len(test)) == (60000, 10000)
    assert torch.bincount(train.labels).tolist() == [6000] * 10


def test_balanced_subset_is_balanced_and_deterministic():
    labels = torch.arange(1000) % 10
    a = balanced_subset(labels, 95, seed=1)
    assert len(a) == 95 and len(set(a.tolist())) == 95
    counts = torch.bincount(labels[a], minlength=10)
    assert counts.max() - counts.min() <= 1
    assert torch.equal(a, balanced_subset(labels, 95, seed=1))
    assert not torch.equal(a, balanced_subset(labels, 95, seed=2))


def _image_tree(root, bad: bool):
    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((8, 8, 3), i * 40, dtype=np.uint8)).save(
                root / cls / f"{i}.png"
            )
    if bad:
        (root / "dog" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")


def test_imagefolder_skips_and_counts_unreadable_images(tmp_path, caplog):
    _image_tree(tmp_path, bad=True)
    ds = ImageFolderDataset(tmp_path)
    assert len(ds) == 7 and ds.classes == ["cat", "dog"]
    loader = build_loader(ds, batch_size=7, num_workers=0, shuffle=False, drop_last=False)
    batch = next(iter(loader))
    assert len(batch["label"]) == 6 and int(batch["skipped"]) == 1
    assert "broken.jpg" in caplog.text


def test_imagefolder_strict_names_the_file(tmp_path):
    _image_tree(tmp_path, bad=True)
    ds = ImageFolderDataset(tmp_path, strict=True)
    with pytest.raises(RuntimeError, match=r"broken\.jpg.*data.strict=true"):
        [ds[i] for i in range(len(ds))]


def test_grayscale_replicated_for_rgb_model():
    image = torch.randint(0, 256, (1, 28, 28), dtype=torch.uint8)
    out = eval_transform(28, 28, 3, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))(image)
    assert out.shape == (3, 28, 28) and torch.equal(out[0], out[2])
    aug = mae_transform(28, 1, (0.5,), (0.5,))(image)
    assert aug.shape == (1, 28, 28) and aug.dtype == torch.float32
