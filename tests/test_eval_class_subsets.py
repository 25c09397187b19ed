"""A test folder whose classes are a subset of the training classes (ImageNet-R layout)."""

import json

import numpy as np
import pytest
from PIL import Image

from maect.config import ConfigError
from maect.evaluation.class_subsets import map_classes
from maect.evaluation.command import evaluate, load_eval_config

TRAIN = {"n001": 200, "n002": 150, "n003": 60, "n004": 20}  # class folder: gray level


def write_folder(root, levels: dict[str, int], per_class: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for name, level in levels.items():
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = np.clip(level + rng.normal(0, 3, (16, 16, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")


def test_map_classes():
    train = ["n001", "n002", "n003", "n004"]
    assert map_classes(["n002", "n004"], train).tolist() == [1, 3]
    assert map_classes(["dog", "n003"], train, {"dog": "n001"}).tolist() == [0, 2]
    assert map_classes(["dog"], train, {"dog": 3}).tolist() == [3]
    with pytest.raises(ConfigError, match="data.class_map: 'cow' is not a class of data.test_"):
        map_classes(["dog"], train, {"cow": "n001"})
    with pytest.raises(ConfigError, match="data.class_map: 'dog' maps to 'n009', which is not"):
        map_classes(["dog"], train, {"dog": "n009"})
    with pytest.raises(ConfigError, match="data.class_map: 'dog' maps to index 7, outside"):
        map_classes(["dog"], train, {"dog": 7})
    with pytest.raises(
        ConfigError,
        match=r"data.test_folder: 1 of its 2 classes are no training class \(e.g. 'dog'\)",
    ):
        map_classes(["dog", "n001"], train)


def test_evaluate_scores_only_the_mapped_classes(tmp_path):
    root = tmp_path / "data"
    write_folder(root / "train", TRAIN, 6, seed=0)
    write_folder(root / "val", TRAIN, 2, seed=1)
    # "dog" images look like n001 (190) but are n002: only a classifier restricted to the
    # mapped classes {n002, n004} gets them right; "cat" (30) are n004 either way.
    write_folder(tmp_path / "r", {"dog": 190, "cat": 30}, 3, seed=2)
    (tmp_path / "map.yaml").write_text("dog: n002\ncat: n004\n")
    items = [
        "data=imagefolder",
        f"data.root={root}",
        f"data.test_folder={tmp_path / 'r'}",
        f"data.class_map={tmp_path / 'map.yaml'}",
        f"out={tmp_path / 'out'}",
        "protocols=knn,linear,lowshot,cluster",
        "knn.k=3",
        "lowshot.shots=1",
        "lowshot.percents=50",
        "lowshot.seeds=0",
        "linear.epochs=30",
        "plot=false",
        "progress=false",
    ]
    result = evaluate("pixels", load_eval_config(items))
    f = result["features"]
    assert (f["n_test"], f["test_classes"], f["test_folder"]) == (6, 2, str(tmp_path / "r"))
    assert result["knn"]["top1"] == 100.0  # searched among the n002 and n004 images only
    assert result["linear"]["top1"] == 100.0 and result["lowshot"]["1"] == 100.0
    saved = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert saved["knn"]["top1"] == 100.0

    (tmp_path / "bad.yaml").write_text("dog: n002\ncat: n999\n")
    bad = [*items[:3], f"data.class_map={tmp_path / 'bad.yaml'}", *items[4:]]
    with pytest.raises(ConfigError, match="data.class_map: 'cat' maps to 'n999'"):
        evaluate("pixels", load_eval_config(bad))
    with pytest.raises(ConfigError, match="data.class_map maps the classes of data.test_folder"):
        load_eval_config(["data.class_map=x.yaml"])
