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
    "synthetic": ((0.5,), (0.25,)),
}


class DataNotFoundError(FileNotFoundError):
    """The dataset is not where it was looked for; the message says where and how to get it."""


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


class ImageFolderDataset(ImageDataset):
    """A class-per-subfolder image tree; unreadable files are skipped (or raise when strict)."""

    def __init__(self, root: Path, transform=None, strict: bool = False) -> None:
        classes = sorted(p.name for p in root.iterdir() if p.is_dir())
        if not classes:
            raise DataNotFoundError(f"no class folders in {root} (expected {root}/<class>/<image>)")
        files: list[str] = []
        labels: list[int] = []
        for label, name in enumerate(classes):
            for dirpath, _, names in os.walk(root / name, followlinks=True):
                for fname in sorted(names):
                    if fname.lower().endswith(IMAGE_EXTENSIONS):
                        files.append(os.path.join(dirpath, fname))
                        labels.append(label)
        if not files:
            raise DataNotFoundError(f"no images with extensions {IMAGE_EXTENSIONS} under {root}")
        super().__init__(torch.tensor(labels), transform)
        self.files = files
        self.classes = classes
        self.num_classes = len(classes)
        self.strict = strict
        self.channels = 3

    def load_image(self, index: int) -> torch.Tensor | None:
        path = self.files[index]
        try:
            with Image.open(path) as img:
                array = np.asarray(img.convert("RGB"), dtype=np.uint8)
        except (OSError, ValueError, SyntaxError) as err:
            if self.strict:
                raise RuntimeError(f"unreadable image {path}: {err} (data.strict=true)") from err
            log.warning("skipping unreadable image %s: %s", path, err)
            return None
        return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


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
    """Every folder searched for the Fashion-MNIST IDX files, in order."""
    candidates = []
    if root:
        candidates += [
            Path(root),
            Path(root) / "FashionMNIST" / "raw",
            Path(root) / "fashion-mnist",
        ]
    if os.environ.get("MAECT_DATA"):
        candidates.append(Path(os.environ["MAECT_DATA"]) / "fashion-mnist")
    candidates.append(Path(FMNIST_SYSTEM_ROOT))
    return candidates


def load_fashion_mnist(root: str | None, train: bool, download: bool) -> TensorImageDataset:
    """Fashion-MNIST from the original IDX files (60k train / 10k test, 28x28 grayscale)."""
    prefix = "train" if train else "t10k"
    if download:
        from torchvision.datasets import FashionMNIST

        FashionMNIST(root or ".", train=train, download=True)
    for folder in fashion_mnist_roots(root):
        images = _find_idx(folder, f"{prefix}-images-idx3-ubyte")
        labels = _find_idx(folder, f"{prefix}-labels-idx1-ubyte")
        if images and labels:
            x = torch.from_numpy(read_idx(images).copy()).unsqueeze(1)
            y = torch.from_numpy(read_idx(labels).astype(np.int64))
            return TensorImageDataset(x, y, num_classes=10)
    looked = "\n  ".join(str(p) for p in fashion_mnist_roots(root))
    raise DataNotFoundError(
        f"Fashion-MNIST ({prefix}-images-idx3-ubyte[.gz]) not found. Looked in:\n  {looked}\n"
        "Get it with `sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu, installs to "
        f"{FMNIST_SYSTEM_ROOT}), point data.root at a folder holding the IDX files, "
        "or set data.download=true to let torchvision download it into data.root."
    )


def _torchvision_root(name: str, root: str | None) -> str:
    if not root:
        raise DataNotFoundError(
            f"{name} needs data.root (a folder in torchvision's layout); add data.download=true "
            "to download it there"
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
            f"{name} not found under {path} ({err}). Set data.download=true to download it there."
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
            f"stl10 not found under {path} ({err}). Set data.download=true to download it there."
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

    For ``imagefolder``, ``root`` holds ``train/`` and ``val/`` subfolders (ImageNet layout).
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
                f"imagefolder split not found: {split} (expected train/ and val/)"
            )
        return ImageFolderDataset(split, strict=strict)
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
