"""Data layer: IDX reader, missing-data errors, balanced subsets, bad images, channels."""

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from maect.config import load_config
from maect.data.datasets import (
    FMNIST_SYSTEM_ROOT,
    DataNotFoundError,
    ImageFolderDataset,
    UnreadableImageError,
    build_dataset,
    load_fashion_mnist,
    read_idx,
)
from maect.data.loader import build_loader
from maect.data.subset import balanced_subset
from maect.data.transforms import eval_transform, mae_transform
from maect.engine import pretrain
from maect.evaluation.command import evaluate, load_eval_config
from tests.conftest import TINY_OVERRIDES


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
    monkeypatch.setenv("MAECT_DATA", str(tmp_path / "mine"))
    with pytest.raises(DataNotFoundError) as err:
        load_fashion_mnist(None, train=True, download=False)
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
    with pytest.raises(UnreadableImageError, match=r"broken\.jpg.*data.strict=true"):
        [ds[i] for i in range(len(ds))]


def test_grayscale_replicated_for_rgb_model():
    image = torch.randint(0, 256, (1, 28, 28), dtype=torch.uint8)
    out = eval_transform(28, 3, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))(image)
    assert out.shape == (3, 28, 28) and torch.equal(out[0], out[2])
    aug = mae_transform(28, 1, (0.5,), (0.5,))(image)
    assert aug.shape == (1, 28, 28) and aug.dtype == torch.float32


# --------------------------------------------------------------------------- image modes


def _read_back(tmp_path, name: str, save) -> np.ndarray:
    """Save one image with ``save(path)`` into a one-class ImageFolder and read it as maect
    does: uint8 RGB ``[H, W, 3]``."""
    folder = tmp_path / name.replace(".", "_") / "cls"
    folder.mkdir(parents=True)
    save(folder / name)
    image = ImageFolderDataset(folder.parent, strict=True).load_image(0)
    assert image.dtype == torch.uint8 and image.shape[0] == 3
    return image.permute(1, 2, 0).numpy()


def _gray3(gray: np.ndarray) -> np.ndarray:
    return np.repeat(np.asarray(gray, dtype=np.uint8)[..., None], 3, axis=2)


def _over_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    a = alpha.astype(np.float64)[..., None] / 255
    return np.rint(rgb.astype(np.float64) * a + 255 * (1 - a)).astype(np.uint8)


def _png16_rgb(path, values: np.ndarray) -> None:
    """A 16-bit-per-channel RGB PNG written by hand (PIL cannot write one)."""
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    height, width, _ = values.shape
    rows = b"".join(b"\0" + row.astype(">u2").tobytes() for row in values)
    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def test_every_image_mode_is_converted_by_its_meaning(tmp_path):
    """Each PIL mode against a reference computed with numpy on the same pixel values. A 16-bit
    grayscale PNG was read as almost white (PIL's convert clips 0-65535 to 0-255)."""
    rng = np.random.default_rng(0)
    g16 = rng.integers(0, 65536, (6, 5)).astype(np.uint16)
    got = _read_back(tmp_path, "g16.png", lambda p: Image.fromarray(g16).save(p))
    np.testing.assert_array_equal(got, _gray3(np.round(g16 / 257)))
    assert got.mean() < 200  # not "almost white"

    i32 = rng.integers(0, 65536, (6, 5)).astype(np.int32)
    got = _read_back(tmp_path, "i32.tif", lambda p: Image.fromarray(i32, "I").save(p))
    np.testing.assert_array_equal(got, _gray3(np.round(i32 / 257)))

    f32 = rng.random((6, 5)).astype(np.float32)
    got = _read_back(tmp_path, "f32.tif", lambda p: Image.fromarray(f32, "F").save(p))
    np.testing.assert_array_equal(got, _gray3(np.rint(f32.astype(np.float64) * 255)))

    rgb16 = rng.integers(0, 65536, (4, 3, 3)).astype(np.uint16)
    got = _read_back(tmp_path, "rgb16.png", lambda p: _png16_rgb(p, rgb16))
    np.testing.assert_array_equal(got, (rgb16 >> 8).astype(np.uint8))  # PIL keeps the high byte

    rgba = rng.integers(0, 256, (4, 3, 4)).astype(np.uint8)
    got = _read_back(tmp_path, "rgba.png", lambda p: Image.fromarray(rgba, "RGBA").save(p))
    np.testing.assert_array_equal(got, _over_white(rgba[..., :3], rgba[..., 3]))

    la = rng.integers(0, 256, (4, 3, 2)).astype(np.uint8)
    got = _read_back(tmp_path, "la.png", lambda p: Image.fromarray(la, "LA").save(p))
    np.testing.assert_array_equal(got, _over_white(_gray3(la[..., 0]), la[..., 1]))

    palette = rng.integers(0, 256, (256, 3)).astype(np.uint8)
    index = rng.integers(0, 256, (4, 3)).astype(np.uint8)

    def save_palette(path, transparent: int | None = None) -> None:
        image = Image.fromarray(index, "P")
        image.putpalette(palette.flatten().tolist())
        if transparent is None:
            image.save(path)
        else:
            image.save(path, transparency=transparent)

    got = _read_back(tmp_path, "p.png", save_palette)
    np.testing.assert_array_equal(got, palette[index])
    got = _read_back(tmp_path, "pt.png", lambda p: save_palette(p, int(index[0, 0])))
    expected = palette[index].copy()
    expected[index == index[0, 0]] = 255  # the transparent colour shows the white background
    np.testing.assert_array_equal(got, expected)

    cmyk = rng.integers(0, 256, (4, 3, 4)).astype(np.uint8)
    got = _read_back(tmp_path, "cmyk.tif", lambda p: Image.fromarray(cmyk, "CMYK").save(p))
    c = cmyk.astype(np.float64)
    expected = np.rint((255 - c[..., :3]) * (255 - c[..., 3:]) / 255).astype(np.uint8)
    np.testing.assert_allclose(got, expected, atol=1)  # PIL's integer rounding

    bits = rng.random((4, 3)) > 0.5
    got = _read_back(tmp_path, "1.png", lambda p: Image.fromarray(bits).save(p))
    np.testing.assert_array_equal(got, _gray3(bits * 255))


def test_images_of_unknown_scale_are_refused_by_name(tmp_path):
    wide = np.array([[-5, 70000]], dtype=np.int32)
    folder = tmp_path / "cls"
    folder.mkdir()
    Image.fromarray(wide, "I").save(folder / "wide.tif")
    Image.fromarray(np.array([[0.0, 3.5]], dtype=np.float32), "F").save(folder / "hdr.tif")
    ds = ImageFolderDataset(tmp_path, strict=True)
    with pytest.raises(UnreadableImageError, match=r"hdr\.tif: mode F image .* only \[0, 1\]"):
        ds.load_image(0)
    with pytest.raises(UnreadableImageError, match=r"wide\.tif: mode I image .* only 0-65535"):
        ds.load_image(1)


# --------------------------------------------------------------------------- image sizes


def test_every_image_is_brought_to_the_model_size_whatever_the_first():
    """The evaluation view used to skip resizing for every image when the first one already had
    the model's size (so a batch failed to stack), and to pick the resize rule of all images
    from the first one's size."""
    transform = eval_transform(28, 3, (0.5,) * 3, (0.5,) * 3)
    sizes = [(28, 28), (40, 40), (20, 20), (28, 36), (60, 30)]
    images = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8) for h, w in sizes]
    out = [transform(image) for image in images]
    assert all(o.shape == (3, 28, 28) for o in out)
    torch.testing.assert_close(out[0], images[0].float().div(255).sub(0.5).div(0.5))  # as is
    reference = TF.center_crop(
        TF.resize(images[1], 32, interpolation=InterpolationMode.BICUBIC, antialias=True), 28
    )
    torch.testing.assert_close(out[1], reference.float().div(255).sub(0.5).div(0.5))
    reversed_out = [transform(image) for image in reversed(images)]
    assert all(torch.equal(a, b) for a, b in zip(out, reversed(reversed_out), strict=True))


def _mixed_size_tree(root, sizes) -> None:
    """An ImageFolder (train/ and val/, two classes) whose images have the given sizes, the
    first of each class at the model's 28 x 28."""
    for split in ("train", "val"):
        for c, cls in enumerate(("a", "b")):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i, (h, w) in enumerate(sizes):
                pixels = np.full((h, w, 3), 40 + 80 * c + 5 * i, dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i:02d}.png")


def test_mixed_image_sizes_train_and_evaluate(tmp_path):
    """Pretraining (preview grid, online k-NN monitor) and evaluation of an ImageFolder whose
    first image has the model's size and the others not: it crashed stacking the batch."""
    sizes = [(28, 28), (40, 40), (20, 24), (33, 50)] * 4
    _mixed_size_tree(tmp_path / "data", sizes)
    cfg = load_config(
        "mae/fmnist_vit_t",
        [
            *TINY_OVERRIDES,
            "data.name=imagefolder",
            f"data.root={tmp_path / 'data'}",
            "model.in_chans=3",
            "data.batch_size=8",
            "data.num_workers=0",
            "trainer.epochs=1",
        ],
    )
    run = pretrain(cfg, tmp_path / "run")
    assert (run / "reconstructions" / "epoch_0001.png").is_file()
    result = evaluate(run, load_eval_config(["protocols=knn", "knn.k=3", "plot=false"]))
    assert result["features"]["n_train"] == result["features"]["n_test"] == 32


# --------------------------------------------------------------------------- folders, roots


def test_explicit_fashion_mnist_root_without_the_data_is_an_error(tmp_path, monkeypatch):
    """An explicit data.root that does not hold the data used to fall back to the system copy
    while config.yaml recorded the given root."""
    monkeypatch.setenv("MAECT_DATA", str(tmp_path / "env"))
    images = np.zeros((10, 28, 28))
    for folder in (tmp_path / "env" / "fashion-mnist", tmp_path / "sys"):
        folder.mkdir(parents=True)
        _write_idx(folder / "train-images-idx3-ubyte.gz", images)
        _write_idx(folder / "train-labels-idx1-ubyte.gz", np.arange(10))
    monkeypatch.setattr("maect.data.datasets.FMNIST_SYSTEM_ROOT", str(tmp_path / "sys"))
    assert len(load_fashion_mnist(None, train=True, download=False)) == 10  # fallbacks
    for root in (tmp_path / "nowhere", tmp_path):
        with pytest.raises(DataNotFoundError) as err:
            load_fashion_mnist(str(root), train=True, download=False)
        message = str(err.value)
        assert message.startswith(f"data.root={root} does not hold Fashion-MNIST: expected")
        assert "train-images-idx3-ubyte[.gz]" in message and "\n" not in message
    with pytest.raises(DataNotFoundError, match="fashion-mnist needs data.root"):
        load_fashion_mnist(None, train=True, download=True)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "train-images-idx3-ubyte").write_bytes(b"\0\0\x08\x03" + bytes(20))
    (tmp_path / "bad" / "train-labels-idx1-ubyte").write_bytes(b"junk")
    with pytest.raises(DataNotFoundError, match="unreadable Fashion-MNIST file in .*truncated"):
        load_fashion_mnist(str(tmp_path / "bad"), train=True, download=False)


def test_imagefolder_labels_follow_the_training_classes(tmp_path):
    """val/ lacking a class kept its own folder order, so its labels meant other classes than
    train/'s; hidden folders became classes; empty class folders gave labels without images."""
    for split, classes in (("train", ("ant", "bee", "cat")), ("val", ("ant", "cat"))):
        for cls in classes:
            (tmp_path / split / cls / "sub").mkdir(parents=True)
            Image.new("RGB", (4, 4)).save(tmp_path / split / cls / "sub" / "1.png")
            Image.new("RGB", (4, 4)).save(tmp_path / split / cls / "0.png")
    (tmp_path / "val" / ".ipynb_checkpoints").mkdir()
    (tmp_path / "val" / "cat" / ".DS_Store").write_bytes(b"\0")
    (tmp_path / "val" / "cat" / "._0.png").write_bytes(b"\0")  # macOS resource fork
    val = build_dataset("imagefolder", str(tmp_path), train=False)
    assert val.labels.tolist() == [0, 0, 2, 2] and val.num_classes == 3
    assert [Path(f).relative_to(tmp_path / "val").as_posix() for f in val.files[:2]] == [
        "ant/0.png",
        "ant/sub/1.png",
    ]
    (tmp_path / "val" / "dog").mkdir()
    with pytest.raises(DataNotFoundError, match="the training split does not have: dog"):
        build_dataset("imagefolder", str(tmp_path), train=False)
    (tmp_path / "train" / "dog").mkdir()
    (tmp_path / "train" / "dog" / "notes.txt").write_text("no images here")
    with pytest.raises(DataNotFoundError, match="class folders of .*train without images.*: dog"):
        build_dataset("imagefolder", str(tmp_path), train=True)


def test_strict_error_from_a_loader_worker_is_one_line(tmp_path):
    """torch re-raises a worker's exception with the worker traceback as its message; the
    strict error comes back as its own single line."""
    _image_tree(tmp_path, bad=True)
    ds = ImageFolderDataset(tmp_path, strict=True)
    loader = build_loader(ds, batch_size=7, num_workers=1, shuffle=False, drop_last=False)
    with pytest.raises(UnreadableImageError) as err:
        next(iter(loader))
    message = str(err.value)
    assert message.startswith("unreadable image ") and "broken.jpg" in message
    assert message.endswith("(data.strict=true)") and "\n" not in message
