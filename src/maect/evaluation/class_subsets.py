"""Test sets whose classes are a subset of the training classes (ImageNet-A/-R/-Sketch layout).

ImageNet-R and -A hold 200 of ImageNet's 1000 classes, one folder per class named by its
WordNet id like the training folders. :func:`map_classes` gives each test folder the index of
its training class (same name, or renamed by a class map); the protocols then score among those
classes only: a classifier's or probe's argmax runs over the mapped classes (the ImageNet-R
protocol), and k-NN searches only the train images of those classes.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import yaml

from maect.config import ConfigError
from maect.data.datasets import CLASS_NAMES, ImageDataset, ImageFolderDataset


def class_names(dataset: ImageDataset, name: str) -> list[str]:
    """The training classes' names by label index: the folder names of an image folder, the
    known names of a built-in dataset (:data:`~maect.data.datasets.CLASS_NAMES`), else the
    indices as strings."""
    if isinstance(dataset, ImageFolderDataset):
        return list(dataset.classes)
    base = getattr(dataset, "base", None)  # a SubsetDataset of an image folder
    if isinstance(base, ImageFolderDataset):
        return list(base.classes)
    known = CLASS_NAMES.get(name, ())
    return [known[i] if i < len(known) else str(i) for i in range(dataset.num_classes)]


def read_class_map(path: str | Path, key: str = "data.class_map") -> dict[str, str | int]:
    """A ``{test class name: training class name or index}`` mapping from a YAML/JSON file.

    Raises:
        ConfigError: Naming ``key``, when the file is missing or not such a mapping.
    """
    try:
        text = Path(path).read_text()
        data = json.loads(text) if str(path).endswith(".json") else yaml.safe_load(text)
    except (OSError, ValueError, yaml.YAMLError) as err:
        raise ConfigError(f"{key}: cannot read {path}: {err}") from None
    if not isinstance(data, dict) or not all(
        isinstance(k, str) and isinstance(v, str | int) and not isinstance(v, bool)
        for k, v in data.items()
    ):
        raise ConfigError(f"{key}: {path} must map test class names to training class names")
    return data


def map_classes(
    test_classes: Sequence[str],
    train_classes: Sequence[str],
    class_map: Mapping[str, str | int] | None = None,
    key: str = "data.class_map",
    folder_key: str = "data.test_folder",
) -> torch.Tensor:
    """The training class index of every test class.

    Args:
        test_classes: Names of the test set's classes, by its label index.
        train_classes: Names of the training classes, by label index.
        class_map: Renames test classes: ``{test name: training name or index}``; a test class
            it does not name keeps its own name.
        key: Config key of ``class_map`` (named in errors).
        folder_key: Config key of the test folder (named in errors).

    Returns:
        int64 ``[len(test_classes)]``: test label ``i`` is training class ``result[i]``.

    Raises:
        ConfigError: A class map entry names a class the test set does not have or a training
            class that does not exist, or a test class is no training class.
    """
    class_map = dict(class_map or {})
    index = {name: i for i, name in enumerate(train_classes)}
    for source, target in class_map.items():
        if source not in test_classes:
            raise ConfigError(
                f"{key}: '{source}' is not a class of {folder_key} "
                f"({len(test_classes)} classes, e.g. {', '.join(test_classes[:3])})"
            )
        if isinstance(target, int):
            if not 0 <= target < len(train_classes):
                raise ConfigError(
                    f"{key}: '{source}' maps to index {target}, outside the "
                    f"{len(train_classes)} training classes"
                )
        elif target not in index:
            raise ConfigError(
                f"{key}: '{source}' maps to '{target}', which is not a training class "
                f"({len(train_classes)} classes, e.g. {', '.join(train_classes[:3])})"
            )
    targets = []
    for name in test_classes:
        target = class_map.get(name, name)
        targets.append(target if isinstance(target, int) else index.get(target, -1))
    unknown = [name for name, t in zip(test_classes, targets, strict=True) if t < 0]
    if unknown:
        raise ConfigError(
            f"{folder_key}: {len(unknown)} of its {len(test_classes)} classes are no training "
            f"class (e.g. '{unknown[0]}'); name them in {key}"
        )
    return torch.tensor(targets, dtype=torch.long)


class RelabeledDataset(ImageDataset):
    """``base`` with label ``c`` replaced by ``mapping[c]`` (images and transform unchanged)."""

    def __init__(self, base: ImageDataset, mapping: torch.Tensor, num_classes: int) -> None:
        super().__init__(mapping[base.labels], base.transform)
        self.base = base
        self.num_classes = num_classes
        self.channels = base.channels

    def load_image(self, index: int) -> torch.Tensor | None:
        return self.base.load_image(index)
