"""Streaming shards: any supported dataset written as litdata chunks, read back by index.

``write_shards`` writes the training split to ``DST/train`` and the evaluation split to
``DST/val``: litdata chunk files (``chunk-*.bin`` + ``index.json``) holding one item per image in
dataset order (``{"image": bytes, "label": int}``: the original file bytes of an image folder,
so nothing is re-encoded, or the raw uint8 array of an in-memory dataset), plus ``maect.json``
with the labels, class names and how the bytes decode. :class:`ShardDataset` reads a split from a
local folder or an object-store URL (``s3://``, ``gs://``, ``azure://``, ``local:`` ...; litdata
fetches what it needs into its cache, ``LITDATA_CACHE_DIR``) by random access, so the training
order stays :class:`maect.data.loader.EpochShuffleSampler`'s: sharded by rank, a function of
(seed, epoch) alone, exactly resumable.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from maect.config import DATASETS, ConfigError
from maect.data.datasets import (
    CLASS_NAMES,
    DataNotFoundError,
    ImageDataset,
    ImageFolderDataset,
    TensorImageDataset,
    build_dataset,
    decode_image,
)

os.environ.setdefault("LITDATA_DISABLE_VERSION_CHECK", "1")  # litdata would ask PyPI otherwise

SPLITS = {"train": True, "val": False}
META_FILE = "maect.json"
FORMAT_VERSION = 1


def is_url(location: str) -> bool:
    """Whether ``location`` names an object store (``scheme://...`` or litdata's ``local:``)."""
    return "://" in location or location.startswith("local:")


def join(location: str, name: str) -> str:
    """``location/name`` for a folder or a URL."""
    return f"{location.rstrip('/')}/{name}" if is_url(location) else str(Path(location) / name)


def _encoder(dataset: ImageDataset) -> tuple[dict[str, Any], Callable[[int], bytes]]:
    """How items of ``dataset`` are stored: the description for ``maect.json`` and a function
    from index to bytes."""
    if isinstance(dataset, ImageFolderDataset):
        return {"encoding": "file"}, lambda i: Path(dataset.files[i]).read_bytes()
    if isinstance(dataset, TensorImageDataset):
        shape = list(dataset.images.shape[1:])
        return {"encoding": "raw", "shape": shape}, lambda i: dataset.images[i].numpy().tobytes()
    raise ConfigError(f"cannot write {type(dataset).__name__} into shards")


def write_split(dataset: ImageDataset, out: Path, class_names: list[str], chunk_bytes: str) -> None:
    """Write ``dataset`` (in order) into litdata chunks under ``out``, then its ``maect.json``
    (last: a split without it is incomplete)."""
    from litdata.streaming.writer import BinaryWriter

    description, to_bytes = _encoder(dataset)
    writer = BinaryWriter(str(out), chunk_bytes=chunk_bytes)
    for index in range(len(dataset)):
        writer[index] = {"image": to_bytes(index), "label": int(dataset.labels[index])}
    writer.done()
    writer.merge()
    meta = {
        "format": FORMAT_VERSION,
        **description,
        "channels": dataset.channels,
        "num_classes": dataset.num_classes,
        "classes": class_names,
        "labels": dataset.labels.tolist(),
    }
    (out / META_FILE).write_text(json.dumps(meta))


def write_shards(
    source: str,
    dst: str | Path,
    root: str | None = None,
    chunk_bytes: str = "64MB",
    synthetic_size: int = 512,
    img_size: int = 28,
    channels: int = 1,
) -> dict[str, int]:
    """Write dataset ``source`` (a name of :func:`build_dataset`, or a folder with ``train/`` and
    ``val/``: an image folder) into shards under the local folder ``dst``.

    Args:
        source: ``fashion-mnist``, ``cifar10``, ``cifar100``, ``stl10``, ``imagefolder`` (with
            ``root``), ``synthetic``, or the path of an image folder.
        dst: New local folder; ``dst/train`` and ``dst/val`` are written. Copy it to an object
            store with the store's own tools to train from there.
        root: The source dataset's folder (as ``data.root``).
        chunk_bytes: Upper bound of a chunk file's size (litdata's ``chunk_bytes``).
        synthetic_size, img_size, channels: Of the ``synthetic`` dataset (tests).

    Returns:
        Images written per split.
    """
    if is_url(str(dst)):
        raise ConfigError(
            f"DST={dst}: shards are written to a local folder; copy it to the object store "
            "with the store's tools (e.g. `aws s3 sync DST s3://bucket/path`)"
        )
    if source not in DATASETS or source == "shards":
        if not Path(source).is_dir():
            known = ", ".join(d for d in DATASETS if d != "shards")
            raise ConfigError(f"SRC={source} is neither a dataset ({known}) nor a folder")
        source, root = "imagefolder", source
    dst = Path(dst)
    written = {}
    for split, train in SPLITS.items():
        out = dst / split
        if out.exists() and any(out.iterdir()):
            raise ConfigError(f"{out} is not empty; choose a new DST")
        dataset = build_dataset(
            source,
            root,
            train=train,
            synthetic_size=synthetic_size,
            img_size=img_size,
            channels=channels,
        )
        names = getattr(dataset, "classes", None) or CLASS_NAMES.get(source)
        names = list(names or (str(c) for c in range(dataset.num_classes)))
        out.mkdir(parents=True, exist_ok=True)
        write_split(dataset, out, names, chunk_bytes)
        written[split] = len(dataset)
    return written


def read_meta(location: str) -> dict[str, Any]:
    """``maect.json`` of a split, from a folder or through litdata's downloader for a URL."""
    if not is_url(location):
        path = Path(location) / META_FILE
        if not path.is_file():
            raise DataNotFoundError(
                f"no shards at {location} ({META_FILE} missing; write them with "
                "`maect shards SRC DST`, then data.root=DST)"
            )
        return json.loads(path.read_text())
    from litdata.streaming.downloader import get_downloader

    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, META_FILE)
        try:
            get_downloader(location, tmp, []).download_file(join(location, META_FILE), local)
            return json.loads(Path(local).read_text())
        except Exception as err:  # each store's client raises its own errors
            raise DataNotFoundError(f"cannot read {join(location, META_FILE)}: {err}") from err


class ShardDataset(ImageDataset):
    """One split written by :func:`write_shards`, from a folder or an object-store URL.

    Labels and class names come from ``maect.json``; images are read by index through a litdata
    ``StreamingDataset`` that each process (loader worker) opens for itself on first use. An
    image that cannot be decoded is ``None`` (skipped and counted), or an error when ``strict``.
    """

    def __init__(
        self, root: str | None, split: str, strict: bool = False, cache_dir: str | None = None
    ) -> None:
        if not root:
            raise DataNotFoundError(
                "shards needs data.root=<folder or URL written by maect shards>"
            )
        self.location = join(root, split)
        meta = read_meta(self.location)
        if meta.get("format") != FORMAT_VERSION:
            raise DataNotFoundError(
                f"{self.location}: unsupported shard format {meta.get('format')}"
            )
        super().__init__(torch.tensor(meta["labels"], dtype=torch.long))
        self.classes: list[str] = meta["classes"]
        self.num_classes = meta["num_classes"]
        self.channels = meta["channels"]
        self.encoding = meta["encoding"]
        self.shape = meta.get("shape")
        self.strict = strict
        self.cache_dir = cache_dir  # for URLs; None: litdata's default (LITDATA_CACHE_DIR)
        self._stream = None
        self._owner = -1

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_stream": None, "_owner": -1}  # reopened in the new process

    def stream(self):
        """This process's litdata ``StreamingDataset`` of the split."""
        if self._stream is None or self._owner != os.getpid():
            from litdata import StreamingDataset

            self._stream = StreamingDataset(self.location, cache_dir=self.cache_dir)
            self._owner = os.getpid()
            if len(self._stream) != len(self):
                raise DataNotFoundError(
                    f"{self.location}: {len(self._stream)} items but {len(self)} labels"
                )
        return self._stream

    def load_image(self, index: int) -> torch.Tensor | None:
        data = bytes(self.stream()[index]["image"])
        if self.encoding == "raw":
            return torch.frombuffer(bytearray(data), dtype=torch.uint8).view(self.shape)
        return decode_image(io.BytesIO(data), f"{self.location}[{index}]", self.strict)
