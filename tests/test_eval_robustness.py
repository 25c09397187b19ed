"""Robustness protocols: the summary and mCE, evaluate_classifier, protocols=robustness."""

import json

import pytest
import torch
import yaml
from torch import nn

from maect.checkpoints import save_encoder
from maect.config import ConfigError
from maect.data.datasets import make_synthetic
from maect.data.transforms import to_normalized
from maect.evaluation import corruption_errors, evaluate_classifier, read_baseline
from maect.evaluation.command import evaluate, load_eval_config
from maect.evaluation.robustness import summarize
from maect.models.vit import MaskedViT, ViTArch

pytest.importorskip("imagecorruptions")

QUICK = ["linear.epochs=2", "plot=false", "progress=false"]
FEW = ["robustness.corruptions=gaussian_noise,defocus_blur", "robustness.severities=1,5"]


def test_summary_and_mce_by_hand():
    top1 = {"fog": {1: 80.0, 2: 60.0}, "snow": {1: 70.0, 2: 50.0}}
    r = summarize(top1, 90.0, "p", n_test=10)
    assert r["top1"]["fog"] == {"1": 80.0, "2": 60.0, "mean": 70.0}
    assert r["per_severity"] == {"1": 75.0, "2": 55.0} and r["mean"] == 65.0
    assert (r["clean"], r["n_test"], r["severities"]) == (90.0, 10, [1, 2])
    base = summarize({"fog": {1: 70.0, 2: 40.0}, "snow": {1: 60.0, 2: 50.0}}, 85.0, "p")
    e = corruption_errors(r, base)
    # fog: errors 20 + 40 over 30 + 60; snow: 30 + 50 over 40 + 50
    assert e["ce"]["fog"] == pytest.approx(100 * 60 / 90)
    assert e["ce"]["snow"] == pytest.approx(100 * 80 / 90)
    assert e["mce"] == pytest.approx((100 * 60 / 90 + 100 * 80 / 90) / 2)
    # relative: (20-10)+(40-10) over (30-15)+(60-15); (30-10)+(50-10) over (40-15)+(50-15)
    rel = (100 * 40 / 60 + 100 * 60 / 60) / 2
    assert e["relative_mce"] == pytest.approx(rel)
    assert corruption_errors(r, r)["mce"] == pytest.approx(100.0)
    with pytest.raises(ValueError, match="no accuracy for snow"):
        corruption_errors(r, summarize({"fog": {1: 1.0, 2: 1.0}}, 1.0, "p"))


class PixelTemplates(nn.Module):
    """Classifies normalised images by the nearest class template (a fixed 'model')."""

    def __init__(self, templates: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("templates", templates.flatten(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return -torch.cdist(x.flatten(1), self.templates)


class BiasTowards(nn.Module):
    def __init__(self, target: int) -> None:
        super().__init__()
        self.target = target

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return logits + 1e6 * (torch.arange(logits.shape[1]) == self.target)


def test_evaluate_classifier_and_class_restriction():
    data = make_synthetic(40, train=False)
    normalize = to_normalized((0.5,), (0.25,))
    templates = torch.stack([normalize(data.images[data.labels == c][0]) for c in range(10)])
    model = PixelTemplates(templates).train()
    kwargs = {"corruptions": ["contrast", "pixelate"], "severities": [1, 5], "seed": 3}
    r = evaluate_classifier(model, data, normalize, **kwargs)
    assert model.training  # mode restored
    assert r["clean"] == 100.0 and r["n_test"] == 40 and set(r["top1"]) == {"contrast", "pixelate"}
    assert r["top1"]["contrast"]["5"] < r["top1"]["contrast"]["1"] == 100.0
    assert r["protocol"] == "classifier on corrupted test images"
    assert evaluate_classifier(model, data, normalize, **kwargs) == r  # deterministic
    # A model that always prefers class 9: on the images of classes {0, 1} it is always wrong,
    # unless its argmax runs over the mapped classes {0, 1} only (ImageNet-R style).
    biased = nn.Sequential(model, BiasTowards(9))
    keep = torch.isin(data.labels, torch.tensor([0, 1]))
    only = make_synthetic(40, train=False)
    only.images, only.labels = data.images[keep], data.labels[keep]
    assert evaluate_classifier(biased, only, normalize, **kwargs)["clean"] == 0.0
    restricted = evaluate_classifier(
        biased, only, normalize, classes=torch.tensor([0, 1]), **kwargs
    )
    assert restricted["clean"] == 100.0 and restricted["n_test"] == int(keep.sum())
    with_base = evaluate_classifier(model, data, normalize, baseline=r, **kwargs)
    assert with_base["mce"] == pytest.approx(100.0)


@pytest.fixture
def run_dir(tiny_cfg, tmp_path):
    run = tmp_path / "run"
    save_encoder(MaskedViT(ViTArch(28, 4, 1, 32, 2, 2)), run / "encoder.pt")
    cfg = tiny_cfg("data.synthetic_size=60")
    (run / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    return run


def test_protocol_robustness_end_to_end_with_baseline(run_dir, tmp_path):
    items = [*QUICK, *FEW, "protocols=linear,robustness", "robustness.test_subset=10"]
    first = evaluate(run_dir, load_eval_config(items))["robustness"]
    assert first["n_test"] == 10 and first["corruptions"] == ["gaussian_noise", "defocus_blur"]
    assert "linear probe on clean" in first["protocol"] and "mce" not in first
    saved = json.loads((run_dir / "eval.json").read_text())
    assert saved["timing"]["extract_robustness"] >= 0
    assert read_baseline(run_dir)["top1"] == first["top1"]
    other = tmp_path / "other"
    again = evaluate(
        run_dir, load_eval_config([*items, f"robustness.baseline={run_dir}", f"out={other}"])
    )
    r = again["robustness"]
    assert r["top1"] == first["top1"]  # cached features, same probe
    assert r["mce"] == pytest.approx(100.0) and r["baseline"] == str(run_dir)
    wider = [*items, "robustness.corruptions=fog", f"robustness.baseline={run_dir}", f"out={other}"]
    with pytest.raises(ConfigError, match="robustness.baseline: .* has no result for fog"):
        evaluate(run_dir, load_eval_config(wider))
    with pytest.raises(ConfigError, match="robustness.baseline: .*holds no robustness result"):
        (tmp_path / "e.json").write_text("{}")
        evaluate(run_dir, load_eval_config([*items, f"robustness.baseline={tmp_path / 'e.json'}"]))
    with pytest.raises(ConfigError, match="robustness.test_subset=99 exceeds the 15 images"):
        evaluate(run_dir, load_eval_config([*items, "robustness.test_subset=99"]))
    with pytest.raises(ConfigError, match="robustness.corruptions has unknown"):
        load_eval_config(["robustness.corruptions=rain"])
