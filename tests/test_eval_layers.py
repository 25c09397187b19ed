"""Per-block analysis: the features of every block from one forward pass, cached per layer."""

import json

import pytest
import torch
import yaml

from maect.checkpoints import save_encoder
from maect.config import ConfigError
from maect.data.datasets import make_synthetic
from maect.data.transforms import eval_transform
from maect.evaluation import features as features_module
from maect.evaluation.command import evaluate, load_eval_config
from maect.evaluation.features import (
    FeatureKey,
    cached_layer_features,
    extract_features,
    extract_layer_features,
)
from maect.models.pooling import pool_tokens
from maect.models.vit import MaskedViT, ViTArch

QUICK = ["linear.epochs=2", "lowshot.seeds=0", "plot=false", "progress=false"]


@pytest.fixture
def encoder():
    torch.manual_seed(0)
    return MaskedViT(
        ViTArch(img_size=28, patch_size=4, in_chans=1, embed_dim=32, depth=3, num_heads=2)
    )


@pytest.fixture
def images():
    dataset = make_synthetic(12, True)
    dataset.transform = eval_transform(28, 1, (0.5,), (0.25,))
    return dataset


def hooked_reference(encoder, dataset, pooling):
    """Every block's output caught by forward hooks during one forward_features pass, each
    through the final norm, then pooled: an implementation independent of maect's."""
    outputs = []
    handles = [b.register_forward_hook(lambda m, i, o: outputs.append(o)) for b in encoder.blocks]
    x = torch.stack([dataset[i][0] for i in range(len(dataset))])
    with torch.no_grad():
        encoder.eval().forward_features(x)
    for h in handles:
        h.remove()
    return [pool_tokens(encoder.norm(o), pooling) for o in outputs]


@pytest.mark.parametrize("pooling", ["cls", "cls+mean"])
def test_per_block_features_equal_separate_layer_extractions(encoder, images, pooling):
    layers = [0, 1, 2, None]
    calls = []
    original = encoder.forward_intermediates

    def counted(*args, **kwargs):
        calls.append(kwargs["indices"])
        return original(*args, **kwargs)

    encoder.forward_intermediates = counted
    per_block, labels = extract_layer_features(
        encoder, images, pooling, layers, batch_size=5, progress=False
    )
    assert calls == [[0, 1, 2]] * 3  # one forward pass per batch of 5, 5, 2 images
    encoder.forward_intermediates = original
    reference = hooked_reference(encoder, images, pooling)
    for i, layer in enumerate(layers):
        alone, alone_labels = extract_features(
            encoder, images, pooling, layer, batch_size=5, progress=False
        )
        torch.testing.assert_close(per_block[i], alone, rtol=0, atol=0)
        torch.testing.assert_close(per_block[i], reference[2 if layer is None else layer])
        assert torch.equal(labels, alone_labels)
    assert per_block[2].is_contiguous() and per_block[2].shape == (12, 32 * len(pooling.split("+")))


def test_cache_holds_one_file_per_layer(encoder, images, tmp_path, monkeypatch):
    def key(layer):
        return FeatureKey("w", "synthetic", "", "train", "all", "eval", "cls", layer)

    first, _ = cached_layer_features(encoder, images, [key(0), key(2)], tmp_path, progress=False)
    assert len(list(tmp_path.glob("*.pt"))) == 2
    asked = []
    real = features_module.extract_layer_features

    def recording(encoder, dataset, pooling, layers, **kwargs):
        asked.append(list(layers))
        return real(encoder, dataset, pooling, layers, **kwargs)

    monkeypatch.setattr(features_module, "extract_layer_features", recording)
    again, _ = cached_layer_features(
        encoder, images, [key(0), key(1), key(2)], tmp_path, progress=False
    )
    assert asked == [[1]]  # only the block not yet in the cache is extracted
    assert torch.equal(again[0], first[0]) and torch.equal(again[2], first[1])
    mean = FeatureKey("w", "synthetic", "", "train", "all", "eval", "mean", 1)
    with pytest.raises(ValueError, match="differ only in their layer"):
        cached_layer_features(encoder, images, [key(0), mean], tmp_path)


@pytest.fixture
def run_dir(tiny_cfg, encoder, tmp_path):
    run = tmp_path / "run"
    save_encoder(encoder, run / "encoder.pt")
    cfg = tiny_cfg("data.synthetic_size=60", "model.depth=3")
    (run / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    return run


def test_evaluate_layers_all_writes_every_block(run_dir):
    items = [*QUICK, "protocols=knn,linear", "layers=all", "layer_protocols=knn,linear"]
    result = evaluate(run_dir, load_eval_config(items))
    saved = json.loads((run_dir / "eval.json").read_text())
    layers = saved["layers"]
    assert set(layers["blocks"]) == {"0", "1", "2"} and layers["depth"] == 3
    assert layers["protocols"] == ["knn", "linear"] and "final norm" in layers["protocol"]
    last = layers["blocks"]["2"]
    # The last block through the final norm is the default feature: the same numbers.
    assert last["knn"]["top1"] == result["knn"]["top1"]
    assert last["linear"]["top1"] == result["linear"]["top1"]
    assert "layers" in saved["timing"]
    # main features + 3 blocks, for train and test
    assert len(list((run_dir / "features").glob("*.pt"))) == 8


def test_bad_layers_are_config_errors_before_extraction(run_dir, tmp_path, monkeypatch):
    def no_extraction(*args, **kwargs):
        raise AssertionError("extracted before checking the settings")

    monkeypatch.setattr(features_module, "extract_layer_features", no_extraction)
    for items, pattern in [
        (["layers=0,3"], r"layers: block 3 is out of range for 3 blocks"),
        (["layer=-4"], r"layer=-4 is out of range for an encoder with 3 blocks"),
    ]:
        with pytest.raises(ConfigError, match=pattern):
            evaluate(run_dir, load_eval_config([*QUICK, *items]))
    pixels = ["data=synthetic", f"out={tmp_path / 'px'}", "layers=all"]
    with pytest.raises(ConfigError, match="layers: the per-block analysis needs an encoder"):
        evaluate("pixels", load_eval_config([*QUICK, *pixels]))
    with pytest.raises(ConfigError, match="layers must be 'all' or a list"):
        load_eval_config(["layers=some"])
