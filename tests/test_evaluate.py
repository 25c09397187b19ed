"""Feature extraction and its cache, ``maect evaluate`` end to end, and the online k-NN monitor."""

import json

import lightning as L
import pytest
import torch
import yaml

from maect.checkpoints import CheckpointError, save_encoder
from maect.cli import main
from maect.config import ConfigError
from maect.data.datasets import make_synthetic
from maect.data.transforms import eval_transform
from maect.evaluation import features as features_module
from maect.evaluation.command import evaluate, load_eval_config
from maect.evaluation.features import (
    FeatureKey,
    cached_features,
    extract_features,
    standardize,
    weights_fingerprint,
)
from maect.evaluation.monitor import METRIC, OnlineKNN, build_monitor
from maect.models.vit import MaskedViT

SCHEMA = {
    "knn": {"protocol", "top1"},
    "linear": {"protocol", "top1"},
    "lowshot": {"protocol", "1", "2", "5", "1pct"},
    "cluster": {"protocol", "acc", "nmi", "ami", "ari", "silhouette", "davies_bouldin"},
    "features": {"pooling", "n_train", "arch"},
    "timing": {"extract", "knn", "linear", "lowshot", "cluster", "total"},
}
QUICK = ["linear.epochs=2", "lowshot.seeds=0", "plot_points=40", "progress=false"]


def synthetic(size: int, train: bool = True):
    dataset = make_synthetic(size, train)
    dataset.transform = eval_transform(28, 1, (0.5,), (0.25,))
    return dataset


@pytest.fixture
def encoder(tiny_arch):
    return MaskedViT(tiny_arch)


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("MAECT_CACHE", str(tmp_path / "cache"))


def make_key(**changes) -> FeatureKey:
    fields = {
        "weights": "w",
        "dataset": "synthetic",
        "root": "",
        "split": "train",
        "subset": "all",
        "transform": "eval",
        "pooling": "cls",
        "layer": None,
    }
    return FeatureKey(**{**fields, **changes})


def test_cached_features_equal_fresh_and_hit_the_cache(encoder, tmp_path, monkeypatch):
    dataset = synthetic(24)
    fresh = extract_features(encoder, dataset, batch_size=8, progress=False)
    first = cached_features(encoder, dataset, make_key(), tmp_path, batch_size=8, progress=False)
    assert len(list(tmp_path.glob("*.pt"))) == 1 and not list(tmp_path.glob("*.tmp"))

    def no_extraction(*args, **kwargs):
        raise AssertionError("extracted although the cache holds these features")

    monkeypatch.setattr(features_module, "extract_layer_features", no_extraction)
    second = cached_features(encoder, dataset, make_key(), tmp_path, progress=False)
    for a, b, c in zip(fresh, first, second, strict=True):
        assert torch.equal(a, b) and torch.equal(a, c)
    for other in (make_key(pooling="mean"), make_key(layer=0), make_key(weights="v")):
        with pytest.raises(AssertionError, match="extracted although"):
            cached_features(encoder, dataset, other, tmp_path, progress=False)


def test_pooling_and_layer_shapes(encoder):
    dataset = synthetic(10)
    encoder.train()
    x, y = extract_features(encoder, dataset, "cls", progress=False)
    assert x.shape == (10, 32) and x.dtype == torch.float32 and torch.equal(y, dataset.labels)
    assert encoder.training  # mode restored
    both, _ = extract_features(encoder, dataset, "cls+mean", progress=False)
    mean, _ = extract_features(encoder, dataset, "mean", progress=False)
    assert both.shape == (10, 64)
    torch.testing.assert_close(both, torch.cat([x, mean], dim=1))
    last, _ = extract_features(encoder, dataset, "cls", layer=-1, progress=False)
    torch.testing.assert_close(last, x)
    early, _ = extract_features(encoder, dataset, "cls", layer=0, progress=False)
    assert early.shape == x.shape and not torch.allclose(early, x)
    with pytest.raises(ValueError, match="layer=2 is out of range"):
        extract_features(encoder, dataset, layer=2, progress=False)
    pixels, _ = extract_features(None, dataset, progress=False)
    assert pixels.shape == (10, 28 * 28)


def test_weights_fingerprint_and_standardize(encoder, tmp_path):
    path = tmp_path / "encoder.pt"
    save_encoder(encoder, path)
    assert weights_fingerprint(path) == weights_fingerprint(tmp_path)  # a run directory
    assert weights_fingerprint(encoder) == weights_fingerprint(encoder.state_dict())
    before = weights_fingerprint(encoder)
    with torch.no_grad():
        encoder.cls_token.add_(1.0)
    assert weights_fingerprint(encoder) != before
    train, test = torch.randn(50, 4) * 3 + 1, torch.randn(20, 4)
    train_s, test_s = standardize(train, test)
    torch.testing.assert_close(train_s.mean(0), torch.zeros(4), atol=1e-5, rtol=0)
    torch.testing.assert_close(train_s.std(0, unbiased=False), torch.ones(4), atol=1e-4, rtol=0)
    torch.testing.assert_close(test_s, (test - train.mean(0)) / train.std(0, unbiased=False))


@pytest.fixture
def run_dir(tiny_cfg, encoder, tmp_path):
    run = tmp_path / "run"
    save_encoder(encoder, run / "encoder.pt")
    cfg = tiny_cfg("data.synthetic_size=80")
    (run / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    return run


def test_evaluate_run_dir_writes_every_schema_key(run_dir):
    result = evaluate(run_dir, load_eval_config(QUICK))
    saved = json.loads((run_dir / "eval.json").read_text())
    for section, keys in SCHEMA.items():
        assert keys <= set(saved[section]), section
    features = saved["features"]
    assert (features["dataset"], features["pooling"], features["dim"]) == ("synthetic", "cls", 32)
    assert (features["n_train"], features["n_test"]) == (80, 20)  # from the run's config.yaml
    assert (run_dir / "embedding.png").stat().st_size > 0
    assert len(list((run_dir / "features").glob("*.pt"))) == 2
    assert result["knn"]["top1"] == saved["knn"]["top1"]
    assert saved["lowshot"]["protocol"] == "logistic regression on frozen features"
    assert features["arch"]["num_heads"] == 2 and features["arch"]["depth"] == 2
    assert 0 <= saved["knn"]["top1"] <= 100 and 0 <= saved["cluster"]["acc"] <= 100

    again = evaluate(run_dir, load_eval_config([*QUICK, "protocols=knn", "plot=false"]))
    assert again["knn"]["top1"] == result["knn"]["top1"]  # from the cached features
    assert "linear" not in again


def test_pixels_baseline(tmp_path):
    out = tmp_path / "pixels"
    items = ["data=synthetic", f"out={out}", "protocols=knn,cluster", "plot=false"]
    cfg = load_eval_config([*items, *QUICK])
    result = evaluate("pixels", cfg)
    assert result["features"]["dim"] == 784 and result["features"]["pooling"] == "flatten"
    assert result["knn"]["top1"] > 90  # class templates are far apart in pixel space
    assert (out / "eval.json").is_file()
    assert len(list((tmp_path / "cache" / "features").glob("*.pt"))) == 2


def test_unlabeled_split_is_a_config_error(tmp_path, monkeypatch):
    from maect.evaluation import splits

    def unlabeled(*args, **kwargs):
        dataset = make_synthetic(64, True)
        dataset.labels[::2] = -1
        return dataset

    monkeypatch.setattr(splits, "build_dataset", unlabeled)
    items = ["data=synthetic", f"out={tmp_path / 'px'}", "protocols=knn", "plot=false"]
    with pytest.raises(ConfigError, match="32 of 64 train images have no label"):
        evaluate("pixels", load_eval_config([*items, *QUICK]))


def test_settings_the_splits_refute_fail_before_extraction(run_dir, monkeypatch):
    """The run's synthetic splits hold 80 train images (8 per class) and 20 test images."""

    def no_extraction(*args, **kwargs):
        raise AssertionError("extracted before checking the settings")

    monkeypatch.setattr(features_module, "extract_layer_features", no_extraction)
    for items, pattern in [
        (["data.train_subset=81"], r"data.train_subset=81 exceeds the 80 images of the train"),
        (["data.test_subset=21"], r"data.test_subset=21 exceeds the 20 images of the test"),
        (["knn.k=81"], r"knn.k=81 exceeds the 80 train images"),
        (["lowshot.shots=1,9"], r"lowshot.shots=9 exceeds the 8 images of the smallest"),
        (["linear.val_fraction=0.01"], r"linear.val_fraction=0.01 leaves 0 of the 80 train"),
        (["model.num_heads=4"], r"records 2 attention heads, but model.num_heads=4 was given"),
    ]:
        with pytest.raises((ConfigError, CheckpointError), match=pattern):
            evaluate(run_dir, load_eval_config([*QUICK, *items]))


def test_config_parsing_and_errors():
    cfg = load_eval_config(["data=fashion-mnist", "protocols=knn,cluster", "knn.ks=5,10"])
    assert (cfg.data.name, cfg.protocols, cfg.knn.ks) == (
        "fashion-mnist",
        ["knn", "cluster"],
        [5, 10],
    )
    for items, pattern in [
        (["protocols=knn,probe"], r"protocols has unknown \['probe'\]"),
        (["knn.kk=3"], r"unknown key 'knn.kk'; did you mean 'knn.k'"),
        (["pooling=max"], r"pooling must be one of"),
        (["data.name=mnist"], r"data.name must be one of"),
        (["lowshot.shots=a"], r"lowshot.shots\[0\] expects int"),
        (["cluster.split=val"], r"cluster.split must be train or test"),
    ]:
        with pytest.raises(ConfigError, match=pattern):
            load_eval_config(items)


def test_cli_prints_table_and_reports_errors(run_dir, capsys):
    assert main(["evaluate", str(run_dir), *QUICK, "protocols=knn", "plot=false"]) == 0
    main(["evaluate", str(run_dir / "eval.json")])
    table = capsys.readouterr().out
    assert "knn" in table and "top1 (k=20)" in table
    assert main(["evaluate", str(run_dir), "protocols=svm"]) == 2
    assert "protocols has unknown" in capsys.readouterr().err


class _TinyModule(L.LightningModule):
    def __init__(self, encoder: MaskedViT) -> None:
        super().__init__()
        self.encoder = encoder

    def training_step(self, batch, batch_idx):
        return self.encoder.forward_features(batch["image"]).square().mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-3)


def test_online_knn_logs_on_a_one_epoch_fit(encoder):
    from maect.data.loader import build_loader

    module = _TinyModule(encoder)
    frozen = encoder.patch_embed.proj.weight.requires_grad_(False)
    monitor = OnlineKNN(synthetic(40), synthetic(20, train=False), every=1, k=5)
    trainer = L.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[monitor],
    )
    trainer.fit(module, build_loader(synthetic(16), 8, 0, shuffle=True, drop_last=True))
    assert 0.0 <= float(trainer.callback_metrics[METRIC]) <= 100.0
    assert encoder.training and not frozen.requires_grad and encoder.cls_token.requires_grad


def test_build_monitor(tiny_cfg):
    cfg = tiny_cfg()
    monitor = build_monitor(cfg, bank_size=30, query_size=10)
    assert isinstance(monitor, OnlineKNN)
    assert (len(monitor.bank), len(monitor.queries), monitor.every) == (30, 10, 1)
    assert monitor.bank[0][0].shape == (1, 28, 28) and monitor.bank[0][0].dtype == torch.float32
    assert build_monitor(cfg, every=0) is None


@pytest.mark.parametrize(("classes", "legend"), [(10, True), (30, False)])
def test_embedding_plot_legend_names_classes(tmp_path, monkeypatch, classes, legend):
    from matplotlib.figure import Figure

    from maect.evaluation.plots import save_embedding_plot

    saved = []
    monkeypatch.setattr(Figure, "savefig", lambda fig, path, **kw: saved.append(fig))
    x = torch.randn(6 * classes, 8, generator=torch.Generator().manual_seed(0))
    y = torch.arange(6 * classes) % classes
    names = tuple(f"class-{c}" for c in range(5))  # fewer names than classes: indices fill in
    save_embedding_plot(x, y, tmp_path / "e.png", 6 * classes, 0, "t", names)
    box = saved[0].axes[0].get_legend()
    if not legend:
        assert box is None
        return
    texts = [t.get_text() for t in box.get_texts()]
    assert texts == [*names, *(str(c) for c in range(5, classes))]
