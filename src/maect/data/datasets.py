"""Datasets that yield ``(uint8 image [C, H, W], label, index)``.

Fashion-MNIST is read from the original IDX files; CIFAR-10/100 and STL-10 from torchvision's
on-disk formats; any class-per-folder tree (ImageNet layout) through :class:`ImageFolderDataset`;
a small synthetic dataset exists for tests. Nothing downloads unless ``download=True``.
"""

from __future__ import annotations

import gzip
import logging
import os
import struct
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

log = logging.getLogger(__name__)

FMNIST_SYSTEM_ROOT = "/usr/share/datasets/fashion-mnist"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

# Class names of the built-in labelled datasets, by label index (plots and per-class tables).
CLASS_NAMES: dict[str, tuple[str, ...]] = {
    "fashion-mnist": (
        "T-shirt/top",
        "Trouser",
        "Pullover",
        "Dress",
        "Coat",
        "Sandal",
        "Shirt",
        "Sneaker",
        "Bag",
        "Ankle boot",
    ),
    "cifar10": (
        "airplane",
        "automobile",
        "bird",
        "cat",
        "deer",
        "dog",
        "frog",
        "horse",
        "ship",
        "truck",
    ),
    "stl10": (
        "airplane",
        "bird",
        "car",
        "cat",
        "deer",
        "dog",
        "horse",
        "monkey",
        "ship",
        "truck",
    ),
}
# Per-channel mean and std on the [0, 1] scale, used for normalisation.
NORMALIZATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "fashion-mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "stl10": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "imagefolder": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "shards": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "synthetic": ((0.5,), (0.25,)),
}


class DataNotFoundError(FileNotFoundError):
    """The dataset is not where it was looked for; the message says where and how to get it."""


class UnreadableImageError(DataNotFoundError):
    """An image cannot be read and ``data.strict=true``; the message names the file.

    Raised in a DataLoader worker, torch re-raises it in the main process as
    ``UnreadableImageError("Caught UnreadableImageError in DataLoader worker process N. Original
    Traceback ...")``; the constructor cuts that back to the original one-line message.
    """

    def __init__(self, message: str) -> None:
        marker = f"{type(self).__name__}: "
        if message.startswith("Caught ") and marker in message:
            message = message.rsplit(marker, 1)[1].strip()
        super().__init__(message)


class ImageDataset(Dataset):
    """Base class: images as uint8 ``[C, H, W]`` tensors with integer labels (-1 if unlabeled).

    Subclasses implement :meth:`load_image`; ``transform`` is applied to the uint8 tensor and may
    return one tensor or a tuple of views. Items are ``(image_or_views, label, index)``; an image
    that cannot be read yields ``None`` (the collate function drops and counts it) unless strict.
    """

    num_classes: int
    channels: int

    def __init__(self, labels: torch.Tensor, transform: Callable | None = None) -> None:
        self.labels = labels.long()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def load_image(self, index: int) -> torch.Tensor | None:
        """The uint8 image at ``index``, or None when it cannot be read."""
        raise NotImplementedError

    def __getitem__(self, index: int):
        image = self.load_image(index)
        if image is None:
            return None
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.labels[index]), index


class TensorImageDataset(ImageDataset):
    """All images held in memory as one uint8 tensor ``[N, C, H, W]``."""

    def __init__(
        self, images: torch.Tensor, labels: torch.Tensor, num_classes: int, transform=None
    ) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4 or len(images) != len(labels):
            raise ValueError("images must be uint8 [N, C, H, W] with one label per image")
        super().__init__(labels, transform)
        self.images = images
        self.num_classes = num_classes
        self.channels = images.shape[1]

    def load_image(self, index: int) -> torch.Tensor:
        return self.images[index]


# Transparent pixels are composited onto white (as a page shows them).
ALPHA_BACKGROUND = 255.0


def pil_to_rgb(img: Image.Image) -> np.ndarray:
    """An opened image as uint8 RGB ``[H, W, 3]``, every PIL mode by its meaning.

    - 16-bit and 32-bit integer grayscale (``I;16*``, ``I``): values 0-65535 scaled to 0-255
      (``round(v / 257)``); values outside that range are refused (their scale is unknown);
    - 32-bit float grayscale (``F``): values in [0, 1] scaled to 0-255; others are refused;
    - anything with an alpha channel or a transparent colour (``RGBA``, ``LA``, ``PA``,
      ``RGBa``, ``P``/``L``/``RGB`` with ``transparency``): composited onto white;
    - the rest (``1``, ``L``, ``P``, ``CMYK``, ``YCbCr``, ``LAB``, ``HSV``, ``RGBX``, 16-bit RGB
      PNGs, which PIL reads as 8-bit ``RGB``): PIL's conversion to RGB.

    Raises:
        ValueError: a mode or value range that cannot be converted, named in the message.
    """
    mode = img.mode
    if mode == "F" or mode == "I" or mode.startswith("I;"):
        values = np.asarray(img, dtype=np.float64)
        low, high = (1.0, "[0, 1]") if mode == "F" else (65535.0, "0-65535")
        if not np.isfinite(values).all() or values.min() < 0 or values.max() > low:
            raise ValueError(
                f"mode {mode} image with values from {values.min():g} to {values.max():g}; "
                f"only {high} is read (convert it to 8-bit)"
            )
        gray = np.rint(values * (255.0 / low)).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if "A" in mode or "a" in mode or "transparency" in img.info:
        rgba = np.asarray(img.convert("RGBA"), dtype=np.float64)
        alpha = rgba[..., 3:] / 255.0
        rgb = rgba[..., :3] * alpha + ALPHA_BACKGROUND * (1.0 - alpha)
        return np.rint(rgb).astype(np.uint8)
    return np.asarray(img.convert("RGB"), dtype=np.uint8)


def _visible(name: str) -> bool:
    return not name.startswith(".")


def class_folders(root: Path) -> list[str]:
    """The class names of an ImageFolder split: its non-hidden subfolders, sorted."""
    return sorted(p.name for p in root.iterdir() if p.is_dir() and _visible(p.name))


class ImageFolderDataset(ImageDataset):
    """A class-per-subfolder image tree; unreadable files are skipped (or raise when strict).

    ``classes`` fixes the label of each class name (the training split's classes, so that the
    validation split labels the same class alike even when it lacks some); by default the split's
    own class folders. Hidden files and folders (``.DS_Store``, ``.ipynb_checkpoints``) are not
    read; subfolders are walked in sorted order, so the sample order is the same on every machine.
    """

    def __init__(
        self,
        root: Path,
        transform=None,
        strict: bool = False,
        classes: list[str] | None = None,
    ) -> None:
        present = class_folders(root)
        if not present:
            raise DataNotFoundError(f"no class folders in {root} (expected {root}/<class>/<image>)")
        classes = present if classes is None else classes
        unknown = sorted(set(present) - set(classes))
        if unknown:
            raise DataNotFoundError(
                f"class folders of {root} that the training split does not have: "
                f"{', '.join(unknown)} (labels must mean the same classes in train/ and val/)"
            )
        files: list[str] = []
        labels: list[int] = []
        empty: list[str] = []
        for name in present:
            found = [
                os.path.join(dirpath, fname)
                for dirpath, dirnames, names in _sorted_walk(root / name)
                for fname in names
                if _visible(fname) and fname.lower().endswith(IMAGE_EXTENSIONS)
            ]
            if not found:
                empty.append(name)
            files += found
            labels += [classes.index(name)] * len(found)
        if empty:
            raise DataNotFoundError(
                f"class folders of {root} without images ({', '.join(IMAGE_EXTENSIONS)}): "
                f"{', '.join(empty)}"
            )
        super().__init__(torch.tensor(labels), transform)
        self.files = files
        self.classes = classes
        self.num_classes = len(classes)
        self.strict = strict
        self.channels = 3

    def load_image(self, index: int) -> torch.Tensor | None:
        path = self.files[index]
        return decode_image(path, path, self.strict)


def decode_image(source: str | BinaryIO, name: str, strict: bool) -> torch.Tensor | None:
    """An encoded image file (path or file object) as RGB uint8 ``[3, H, W]`` (:func:`pil_to_rgb`);
    ``None`` (logged, naming ``name``) when it cannot be read, or :class:`UnreadableImageError`
    when ``strict``."""
    try:
        with Image.open(source) as img:
            array = pil_to_rgb(img)
    except (OSError, ValueError, SyntaxError) as err:
        if strict:
            raise UnreadableImageError(
                f"unreadable image {name}: {err} (data.strict=true)"
            ) from None
        log.warning("skipping unreadable image %s: %s", name, err)
        return None
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


def _sorted_walk(folder: Path):
    """``os.walk`` (following links) with folders and files in sorted order, hidden folders
    skipped."""
    for dirpath, dirnames, names in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if _visible(d))
        yield dirpath, dirnames, sorted(names)


# --------------------------------------------------------------------------- readers


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped), the format of MNIST and Fashion-MNIST."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file")
    shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path} is truncated: expected {shape}, found {data.size} bytes")
    return data.reshape(shape)


def _find_idx(folder: Path, stem: str) -> Path | None:
    for name in (stem, f"{stem}.gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def fashion_mnist_roots(root: str | None) -> list[Path]:
    """Every folder searched for the Fashion-MNIST IDX files, in order: only under ``root`` when
    one is given (an explicit root that does not hold the data is an error, never a fallback),
    else ``$MAECT_DATA/fashion-mnist`` and the system copy."""
    if root:
        return [Path(root), Path(root) / "FashionMNIST" / "raw", Path(root) / "fashion-mnist"]
    candidates = []
    if os.environ.get("MAECT_DATA"):
        candidates.append(Path(os.environ["MAECT_DATA"]) / "fashion-mnist")
    candidates.append(Path(FMNIST_SYSTEM_ROOT))
    return candidates


def load_fashion_mnist(root: str | None, train: bool, download: bool) -> TensorImageDataset:
    """Fashion-MNIST from the original IDX files (60k train / 10k test, 28x28 grayscale)."""
    prefix = "train" if train else "t10k"
    if download:
        from torchvision.datasets import FashionMNIST

        FashionMNIST(_torchvision_root("fashion-mnist", root), train=train, download=True)
    for folder in fashion_mnist_roots(root):
        images = _find_idx(folder, f"{prefix}-images-idx3-ubyte")
        labels = _find_idx(folder, f"{prefix}-labels-idx1-ubyte")
        if images and labels:
            try:
                x = torch.from_numpy(read_idx(images).copy()).unsqueeze(1)
                y = torch.from_numpy(read_idx(labels).astype(np.int64))
            except (ValueError, OSError, EOFError) as err:  # truncated, not IDX, bad gzip
                message = f"unreadable Fashion-MNIST file in {folder}: {err}"
                raise DataNotFoundError(message) from None
            if len(x) != len(y):
                raise DataNotFoundError(
                    f"Fashion-MNIST in {folder}: {len(x)} images but {len(y)} labels"
                )
            return TensorImageDataset(x, y, num_classes=10)
    files = f"{prefix}-images-idx3-ubyte[.gz] and {prefix}-labels-idx1-ubyte[.gz]"
    looked = ", ".join(str(p) for p in fashion_mnist_roots(root))
    if root:
        raise DataNotFoundError(
            f"data.root={root} does not hold Fashion-MNIST: expected {files} in one of {looked} "
            "(add data.download=true to download it there, or leave data.root unset to use "
            f"$MAECT_DATA/fashion-mnist or {FMNIST_SYSTEM_ROOT})"
        )
    raise DataNotFoundError(
        f"Fashion-MNIST ({files}) not found in {looked}. "
        "Get it with `sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu, installs to "
        f"{FMNIST_SYSTEM_ROOT}), point data.root at a folder holding the IDX files, "
        "or set data.root and data.download=true to let torchvision download it there."
    )


def _torchvision_root(name: str, root: str | None) -> str:
    if not root:
        raise DataNotFoundError(
            f"{name} needs data.root (a folder in torchvision's layout, or the folder that "
            "data.download=true downloads into)"
        )
    return root


def load_cifar(name: str, root: str | None, train: bool, download: bool) -> TensorImageDataset:
    """CIFAR-10/100 from torchvision's python-pickle layout under ``root``."""
    from torchvision.datasets import CIFAR10, CIFAR100

    cls = CIFAR10 if name == "cifar10" else CIFAR100
    path = _torchvision_root(name, root)
    try:
        ds = cls(path, train=train, download=download)
    except RuntimeError as err:
        raise DataNotFoundError(
            f"data.root={path} does not hold {name} in torchvision's layout ({err}); add "
            "data.download=true to download it there"
        ) from err
    x = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
    return TensorImageDataset(x, torch.tensor(ds.targets), num_classes=len(ds.classes))


def load_stl10(root: str | None, split: str, download: bool) -> TensorImageDataset:
    """STL-10 (``train``, ``test`` or ``unlabeled``) from torchvision's binary layout."""
    from torchvision.datasets import STL10

    path = _torchvision_root("stl10", root)
    try:
        ds = STL10(path, split=split, download=download)
    except RuntimeError as err:
        raise DataNotFoundError(
            f"data.root={path} does not hold stl10 in torchvision's layout ({err}); add "
            "data.download=true to download it there"
        ) from err
    return TensorImageDataset(torch.from_numpy(ds.data), torch.from_numpy(ds.labels), 10)


def make_synthetic(
    size: int, train: bool, num_classes: int = 10, img_size: int = 28, channels: int = 1
) -> TensorImageDataset:
    """Deterministic class-structured noise images, for tests only (never for quality claims).

    Each class has a fixed random template; samples are the template plus noise.
    """
    templates = (
        torch.rand(
            num_classes, channels, img_size, img_size, generator=torch.Generator().manual_seed(1234)
        )
        * 255
    )
    gen = torch.Generator().manual_seed(0 if train else 1)
    labels = torch.arange(size) % num_classes
    noise = torch.randn(size, channels, img_size, img_size, generator=gen) * 40
    images = (templates[labels] + noise).clamp(0, 255).to(torch.uint8)
    return TensorImageDataset(images, labels, num_classes=num_classes)


def build_dataset(
    name: str,
    root: str | None,
    train: bool,
    download: bool = False,
    strict: bool = False,
    synthetic_size: int = 512,
    img_size: int = 28,
    channels: int = 1,
) -> ImageDataset:
    """Build a dataset by name; ``train`` selects the training or the evaluation split.

    For ``imagefolder``, ``root`` holds ``train/`` and ``val/`` subfolders (ImageNet layout); for
    ``shards``, ``root`` (a folder or an object-store URL) holds what ``maect shards`` wrote.
    """
    if name == "fashion-mnist":
        return load_fashion_mnist(root, train, download)
    if name in ("cifar10", "cifar100"):
        return load_cifar(name, root, train, download)
    if name == "stl10":
        return load_stl10(root, "train" if train else "test", download)
    if name == "synthetic":
        return make_synthetic(
            synthetic_size if train else max(synthetic_size // 4, 10),
            train,
            img_size=img_size,
            channels=channels,
        )
    if name == "imagefolder":
        if not root:
            raise DataNotFoundError("imagefolder needs data.root=<folder with train/ and val/>")
        split = Path(root) / ("train" if train else "val")
        if not split.is_dir():
            raise DataNotFoundError(
                f"imagefolder split not found: {split} (data.root={root} must hold train/ and "
                "val/, each with one folder per class)"
            )
        train_split = Path(root) / "train"
        classes = None if train or not train_split.is_dir() else class_folders(train_split)
        return ImageFolderDataset(split, strict=strict, classes=classes)
    if name == "shards":
        from maect.data.shards import ShardDataset  # imports litdata (seconds) only when used

        return ShardDataset(root, "train" if train else "val", strict=strict)
    raise ValueError(f"unknown dataset '{name}'")


def normalization_stats(name: str, channels: int) -> tuple[Sequence[float], Sequence[float]]:
    """Mean and std for ``channels`` channels (grayscale stats are replicated for RGB models)."""
    mean, std = NORMALIZATION[name]
    if len(mean) == channels:
        return mean, std
    if len(mean) == 1:
        return mean * channels, std * channels
    gray = (sum(mean) / len(mean),), (sum(std) / len(std),)
    return gray


class SubsetDataset(ImageDataset):
    """A fixed selection of another dataset's samples; indices are renumbered from 0."""

    def __init__(self, base: ImageDataset, indices: torch.Tensor) -> None:
        super().__init__(base.labels[indices], base.transform)
        self.base = base
        self.indices = indices
        self.num_classes = base.num_classes
        self.channels = base.channels

    def load_image(self, index: int) -> torch.Tensor | None:
        return self.base.load_image(int(self.indices[index]))
