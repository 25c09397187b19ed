"""`maect finetune`: layer-wise lr against timm, mixup/cutmix against timm, learning on separable
data, label-fraction subsets, facebookresearch/mae and timm interop, transfer, bad inputs."""

from __future__ import annotations

import csv
import json
import random
import statistics
import types
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.multiprocessing as mp
import yaml
from PIL import Image
from timm.data import Mixup
from timm.models.vision_transformer import VisionTransformer
from timm.optim import param_groups_layer_decay

from maect.checkpoints import CheckpointError, load_classifier, save_encoder
from maect.cli import main
from maect.config import ConfigError, load_config
from maect.data.datasets import make_synthetic
from maect.finetuning import aggregate, finetune, finetune_datasets, label_subset
from maect.methods.base import arch_from_config
from maect.methods.finetune import FineTuning
from maect.models.classifier import ViTClassifier, classifier_from_state
from maect.models.vit import MaskedViT, ViTArch
from maect.pipeline import load_pipeline, run_pipeline
from maect.report import write_report
from tests.conftest import TINY_OVERRIDES, cli_error, free_port, rank_environment

RECIPE = "finetune/fmnist_vit_t"
# Tiny ViT on synthetic class templates; the spatial augmentations are off because the templates
# are pixel noise (a crop of one is not that class any more); mixup and cutmix stay on.
FT_TINY = [
    *TINY_OVERRIDES,
    "data.synthetic_size=512",
    "data.batch_size=32",
    "data.crop_scale=[1.0,1.0]",
    "data.hflip=false",
    "finetune.auto_augment=",
    "finetune.reprob=0",
    "optim.base_lr=4e-3",
]
TINY_ARCH = {"img_size": 28, "patch_size": 4, "in_chans": 1, "embed_dim": 32, "depth": 2}


def _cfg(*overrides: str, init: str = "scratch"):
    return load_config(RECIPE, [*FT_TINY, f"finetune.init={init}", *overrides])


def _module(cfg) -> FineTuning:
    classifier = classifier_from_state(
        MaskedViT(arch_from_config(cfg)).state_dict(), arch_from_config(cfg), 10, "avg", 0.1
    )
    return FineTuning(cfg, classifier, make_synthetic(20, train=False))


def test_layer_decay_lr_of_every_group(tmp_path):
    cfg = _cfg("model.depth=3", "finetune.layer_decay=0.6")
    module = _module(cfg)
    module.trainer = types.SimpleNamespace(
        accumulate_grad_batches=1, world_size=1, estimated_stepping_batches=10
    )
    optimizer = module.configure_optimizers()["optimizer"]
    depth, decay, base = 3, 0.6, module.peak_lr
    lr_of = {id(p): g["initial_lr"] for g in optimizer.param_groups for p in g["params"]}
    wd_of = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    skip = module.classifier.no_weight_decay()  # as fb/mae's param_groups_lrd call
    timm_groups = param_groups_layer_decay(module.classifier, 0.05, skip, layer_decay=decay)
    timm_scale = {id(p): g["lr_scale"] for g in timm_groups for p in g["params"]}
    timm_wd = {id(p): g["weight_decay"] for g in timm_groups for p in g["params"]}
    assert wd_of == timm_wd and wd_of[id(module.classifier.cls_token)] == 0.0
    names = dict(module.classifier.named_parameters())
    assert set(lr_of) == set(timm_scale) == {id(p) for p in names.values()}  # EMA-free, all
    for name, param in names.items():
        if name.startswith("blocks."):
            expected = decay ** (depth - int(name.split(".")[1]))
        elif name.startswith(("patch_embed", "cls_token", "pos_embed")):
            expected = decay ** (depth + 1)
        else:  # fc_norm and head
            expected = 1.0
        assert lr_of[id(param)] == pytest.approx(base * expected), name
        assert timm_scale[id(param)] == pytest.approx(expected), name
    assert names["pos_embed"].requires_grad  # learned while fine-tuning, as in fb/mae


@pytest.mark.parametrize("alphas", [(0.8, 1.0), (0.8, 0.0), (0.0, 1.0)])
def test_mixup_cutmix_targets_sum_to_one_and_match_timm(alphas):
    mixup, cutmix = alphas
    cfg = _cfg(f"finetune.mixup={mixup}", f"finetune.cutmix={cutmix}", "finetune.smoothing=0.1")
    module = _module(cfg)
    images, labels = torch.randn(8, 1, 28, 28), torch.arange(8) % 10
    reference = Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, label_smoothing=0.1, num_classes=10)
    for seed in range(4):
        np.random.seed(seed)
        got_x, got_y = module.mixup(images.clone(), labels)
        np.random.seed(seed)
        want_x, want_y = reference(images.clone(), labels)
        assert torch.equal(got_x, want_x) and torch.equal(got_y, want_y)
        assert torch.allclose(got_y.sum(dim=1), torch.ones(8))
        assert (got_y >= 0).all()


def test_training_step_seeds_numpy_by_position():
    """Mixup draws from NumPy: the base step seeds it from (seed, rank, epoch, batch)."""
    module = _module(_cfg())
    draws = []

    class Drawn(Exception):
        pass

    def losses(batch):
        draws.append(np.random.rand())
        raise Drawn  # the rest of the step is not under test

    module.compute_losses = losses
    module._trainer = types.SimpleNamespace(current_epoch=0, global_rank=0)
    batch = {"image": torch.zeros(2, 1, 28, 28), "label": torch.zeros(2, dtype=torch.long)}
    for batch_idx in (0, 1, 0):
        np.random.seed(123)  # whatever came before
        with pytest.raises(Drawn):
            module.training_step(batch, batch_idx)
    assert draws[0] == draws[2] != draws[1]


def test_finetuning_learns_separable_data_and_exports_timm_format(tmp_path):
    cfg = _cfg("trainer.epochs=3")
    run = finetune(cfg, tmp_path / "ft")
    result = json.loads((run / "finetune.json").read_text())
    assert result["top1"] >= 85.0  # chance is 10 %
    assert result["protocol"] == "fine-tuning" and result["epochs"] == 3
    assert result["label_fraction"] == 1.0 and result["source"] == "scratch"
    with open(run / "metrics.csv") as f:
        curve = [
            (int(r["epoch"]), float(r["val/top1"])) for r in csv.DictReader(f) if r["val/top1"]
        ]
    assert [epoch for epoch, _ in curve] == [0, 1, 2] and curve[-1][1] == result["top1"]

    saved = torch.load(run / "classifier.pt", weights_only=True)
    assert saved["global_pool"] == "avg" and saved["num_classes"] == 10
    model = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        num_classes=10,
        global_pool="avg",
        num_heads=2,
        **TINY_ARCH,
    )
    model.load_state_dict(saved["model"], strict=True)  # timm's own ViT, strict keys
    ours = load_classifier(run)
    x = torch.randn(4, 1, 28, 28)
    assert torch.allclose(model.eval()(x), ours(x), atol=1e-6)

    mtime = (run / "classifier.pt").stat().st_mtime
    finetune(cfg, run)  # complete: nothing is retrained
    assert (run / "classifier.pt").stat().st_mtime == mtime


def _fb_mae_finetuned(path, num_classes: int = 10) -> dict[str, torch.Tensor]:
    """A randomly initialised tiny ViT saved as facebookresearch/mae saves a fine-tuned
    ``global_pool`` model: ``{"model": ...}`` whose final ``norm`` was replaced by ``fc_norm``."""
    torch.manual_seed(3)
    vit = VisionTransformer(num_classes=num_classes, global_pool="token", num_heads=2, **TINY_ARCH)
    state = {}
    for key, value in vit.state_dict().items():
        key = key.replace("norm.", "fc_norm.") if key.startswith("norm.") else key
        state[key] = torch.randn_like(value) * 0.1 if value.ndim else value
    torch.save({"model": state, "epoch": 99, "args": None}, path)
    return state


def test_fb_mae_finetuned_checkpoint_logits_equal_timm_global_avg(tmp_path):
    state = _fb_mae_finetuned(tmp_path / "checkpoint-99.pth")
    ours = load_classifier(tmp_path / "checkpoint-99.pth", num_heads=2)  # not in the weights
    timm_avg = VisionTransformer(num_classes=10, global_pool="avg", num_heads=2, **TINY_ARCH)
    timm_avg.load_state_dict(state, strict=True)
    x = torch.randn(5, 1, 28, 28)
    with torch.no_grad():
        want = timm_avg.eval()(x)
        got = ours(x)
        # fb/mae's forward, written out: blocks, mean of the patch tokens, fc_norm, head
        tokens = timm_avg.blocks(timm_avg._pos_embed(timm_avg.patch_embed(x)))
        manual = timm_avg.head(timm_avg.fc_norm(tokens[:, 1:].mean(dim=1)))
    assert ours.global_pool == "avg" and torch.equal(got, want)
    assert torch.allclose(manual, want, atol=1e-6)


def test_fb_mae_finetuned_checkpoint_evaluates_with_zero_epochs(tmp_path):
    state = _fb_mae_finetuned(tmp_path / "ft.pth")
    run = tmp_path / "eval"
    assert (
        main(
            [
                "finetune",
                str(tmp_path / "ft.pth"),
                f"recipe={RECIPE}",
                f"out={run}",
                *FT_TINY,
                "model.num_heads=2",
                "trainer.epochs=0",
            ]
        )
        == 0
    )
    result = json.loads((run / "finetune.json").read_text())
    timm_avg = VisionTransformer(num_classes=10, global_pool="avg", num_heads=2, **TINY_ARCH)
    timm_avg.load_state_dict(state)
    _, test = finetune_datasets(_cfg())
    images = torch.stack([test[i][0] for i in range(len(test))])
    with torch.no_grad():
        predictions = timm_avg.eval()(images).argmax(dim=1)
    expected = 100.0 * (predictions == test.labels).float().mean().item()
    assert result["top1"] == pytest.approx(expected) and result["epochs"] == 0
    assert result["eval_images"] == len(test)


def test_label_fraction_is_class_balanced_and_seed_stable():
    dataset = make_synthetic(1000, train=True)
    a = label_subset(dataset, 0.1, seed=0)
    b = label_subset(dataset, 0.1, seed=0)
    c = label_subset(dataset, 0.1, seed=1)
    assert len(a) == 100 and torch.equal(a.indices, b.indices)
    assert not torch.equal(a.indices, c.indices)
    assert torch.bincount(a.labels, minlength=10).tolist() == [10] * 10
    assert label_subset(dataset, 1.0, seed=0) is dataset
    train, _ = finetune_datasets(_cfg("data.label_fraction=0.25"))
    assert len(train) == 128 and torch.bincount(train.labels).tolist() == [13] * 8 + [12] * 2


def test_aggregate_over_seeds(tmp_path):
    values = [81.0, 83.5, 82.0]
    for seed, top1 in enumerate(values):
        record = {
            "protocol": "fine-tuning",
            "dataset": "d",
            "label_fraction": 0.1,
            "epochs": 2,
            "seed": seed,
            "top1": top1,
            "top5": 99.0,
        }
        (tmp_path / f"s{seed}.json").write_text(json.dumps(record))
    summary = aggregate([tmp_path / f"s{s}.json" for s in range(3)])
    assert summary["top1"]["mean"] == pytest.approx(statistics.fmean(values))
    assert summary["top1"]["std"] == pytest.approx(statistics.stdev(values))
    assert summary["runs"] == 3 and summary["seeds"] == [0, 1, 2]
    assert "corruption_top1" not in summary  # no run has a robustness result
    for seed, mean in enumerate((60.0, 62.0, 61.0)):
        record = json.loads((tmp_path / f"s{seed}.json").read_text())
        (tmp_path / f"s{seed}.json").write_text(json.dumps(record | {"robustness": {"mean": mean}}))
    robust = aggregate([tmp_path / f"s{s}.json" for s in range(3)])["corruption_top1"]
    assert robust["mean"] == pytest.approx(61.0) and robust["std"] == pytest.approx(1.0)
    other = json.loads((tmp_path / "s0.json").read_text()) | {"label_fraction": 1.0}
    (tmp_path / "other.json").write_text(json.dumps(other))
    with pytest.raises(ConfigError, match="label_fraction"):
        aggregate([tmp_path / "s1.json", tmp_path / "other.json"])


def _rgb_folder(root, size: int = 32) -> None:
    """An ImageFolder tree of RGB images: class ``dark`` and class ``bright``."""
    for split, count in (("train", 16), ("val", 4)):
        for label, level in (("dark", 40), ("bright", 200)):
            folder = root / split / label
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = np.full((size, size, 3), level + i, dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")


def test_transfer_to_rgb_images_of_another_size(tmp_path):
    """A 1-channel 28-px encoder fine-tuned on 3-channel 32-px images: the images are converted
    to the encoder's channels, the position embeddings resampled to the new grid."""
    source = ViTArch(img_size=28, patch_size=4, in_chans=1, embed_dim=32, depth=2, num_heads=2)
    encoder = MaskedViT(source)
    save_encoder(encoder, tmp_path / "encoder.pt")
    _rgb_folder(tmp_path / "data")
    data = ["data.name=imagefolder", f"data.root={tmp_path / 'data'}", "data.batch_size=8"]
    cfg = _cfg("model.img_size=32", *data, "trainer.epochs=1", init=str(tmp_path / "encoder.pt"))
    run = finetune(cfg, tmp_path / "ft")
    model = load_classifier(run)
    assert model.pos_embed.shape == (1, 1 + 8 * 8, 32) and model.arch.in_chans == 1
    assert json.loads((run / "finetune.json").read_text())["eval_images"] == 8
    same = classifier_from_state(encoder.state_dict(), source, 10, "token")
    assert torch.equal(same.pos_embed, encoder.pos_embed)  # same grid: unchanged
    assert torch.equal(same.norm.weight, encoder.norm.weight)  # token pooling keeps the norm


def test_a_tune_run_directory_is_an_encoder_source(tmp_path):
    """A `maect tune` run keeps encoder.pt at its top and its checkpoints in head/ and tune/:
    fine-tuning it starts from encoder.pt (it once failed as 'a directory without
    classifier.pt or checkpoints/last.ckpt')."""
    from maect.finetuning import source_classifier

    cfg = _cfg()
    encoder = MaskedViT(arch_from_config(cfg))
    run = tmp_path / "maect"
    for stage in ("head", "tune"):
        (run / stage / "checkpoints").mkdir(parents=True)
        torch.save({"state_dict": {}}, run / stage / "checkpoints" / "last.ckpt")
    save_encoder(encoder, run / "encoder.pt")
    model = source_classifier(_cfg(init=str(run)), 10)
    assert torch.equal(model.pos_embed, encoder.pos_embed)
    assert torch.equal(model.blocks[-1].mlp.fc2.weight, encoder.blocks[-1].mlp.fc2.weight)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="without classifier.pt or .* or encoder.pt"):
        source_classifier(_cfg(init=str(tmp_path / "empty")), 10)


def test_classifier_source_keeps_its_head_unless_reset(tmp_path):
    _fb_mae_finetuned(tmp_path / "ft.pth", num_classes=10)
    cfg = _cfg("model.num_heads=2", "trainer.epochs=0", init=str(tmp_path / "ft.pth"))
    from maect.finetuning import source_classifier

    kept = source_classifier(cfg, 10)
    assert torch.equal(kept.head.weight, load_classifier(tmp_path / "ft.pth", 2).head.weight)
    reset = source_classifier(
        load_config(
            RECIPE,
            [
                *FT_TINY,
                "model.num_heads=2",
                f"finetune.init={tmp_path / 'ft.pth'}",
                "finetune.reset_head=true",
            ],
        ),
        7,
    )
    assert reset.head.weight.shape == (7, 32) and reset.head.weight.abs().max() < 1e-3
    assert isinstance(reset, ViTClassifier)


@pytest.mark.parametrize(
    ("source", "overrides", "message"),
    [
        ("pixels", [], "finetune.init is 'pixels'"),
        ("scratch", ["data.label_fraction=0"], "data.label_fraction must be in (0, 1]"),
        ("scratch", ["data.label_fraction=1.5"], "data.label_fraction must be in (0, 1]"),
        ("scratch", ["data.batch_size=15"], "data.batch_size must be even with mixup"),
        ("scratch", ["finetune.global_pool=max"], "finetune.global_pool must be one of"),
        ("scratch", ["data.augment_on=device"], "data.augment_on must be loader for fine-tuning"),
        ("scratch", ["trainer.strategy=fsdp"], "trainer.strategy fsdp is not supported"),
        ("{tmp}/five.pth", ["model.num_heads=2"], "has a 5-class head (head.weight)"),
        (
            "{tmp}/ft.pth",
            ["finetune.global_pool=token", "model.num_heads=2"],
            "set finetune.global_pool=avg",
        ),
        ("{tmp}/ft.pth", ["model.embed_dim=64"], "add model.embed_dim=32"),
        ("{tmp}/missing.pt", [], "checkpoint not found"),
    ],
)
def test_bad_input_gives_one_line_errors_naming_the_key(
    capsys, tmp_path, source, overrides, message
):
    _fb_mae_finetuned(tmp_path / "five.pth", num_classes=5)
    _fb_mae_finetuned(tmp_path / "ft.pth")
    source = source.format(tmp=tmp_path)
    args = ["finetune", source, f"recipe={RECIPE}", f"out={tmp_path / 'run'}", *FT_TINY, *overrides]
    assert message in cli_error(capsys, *args)
    assert not (tmp_path / "run").exists()  # refused before any work


def test_dataset_without_labels_is_refused(capsys, tmp_path, monkeypatch):
    unlabeled = make_synthetic(64, train=True)
    unlabeled.labels[:] = -1
    monkeypatch.setattr("maect.finetuning.training_dataset", lambda cfg: unlabeled)
    err = cli_error(
        capsys, "finetune", "scratch", f"recipe={RECIPE}", f"out={tmp_path}/r", *FT_TINY
    )
    assert "data.name=synthetic: the training split has unlabeled images" in err


def test_pretrain_refuses_a_finetune_recipe(tmp_path):
    from maect.engine import pretrain

    with pytest.raises(
        ConfigError, match="is not for maect pretrain: train it with `maect finetune SOURCE"
    ):
        pretrain(_cfg(), tmp_path / "run")
    with pytest.raises(ConfigError, match="applies to fine-tuning only"):
        load_config("mae/fmnist_vit_t", ["data.label_fraction=0.5"])
    with pytest.raises(CheckpointError, match="holds no classifier"):
        save_encoder(MaskedViT(ViTArch(**TINY_ARCH, num_heads=2)), tmp_path / "e.pt")
        load_classifier(tmp_path / "e.pt")


def test_augmentation_is_a_function_of_the_sample_seed():
    """timm's RandAugment / erasing draw from Python's and NumPy's generators: the loader seeds
    them per sample and restores the caller's states."""
    from maect.data.loader import SeededItems

    module = _module(load_config(RECIPE, ["finetune.init=scratch", "data.name=synthetic"]))
    dataset = make_synthetic(4, train=True)
    dataset.transform = module.train_transform()
    items = SeededItems(dataset)
    random.seed(5)
    np.random.seed(5)
    views = [items[(0, seed)][0] for seed in (7, 7, 8)]
    after = random.random(), np.random.rand()
    assert torch.equal(views[0], views[1]) and not torch.equal(views[0], views[2])
    random.seed(5)
    np.random.seed(5)
    assert (random.random(), np.random.rand()) == after  # the caller's streams are untouched


def test_pipeline_pretrains_then_finetunes_over_seeds(tmp_path):
    spec = {
        "description": "tiny pretrain -> fine-tune",
        "overrides": ["trainer.epochs=1", *TINY_OVERRIDES],
        "stages": [
            {"name": "mae", "command": "pretrain", "recipe": "mae/fmnist_vit_t"},
            {
                "name": "ft_mae",
                "command": "finetune",
                "recipe": RECIPE,
                "init": "mae",
                "seeds": [0, 1],
                "overrides": FT_TINY,
            },
            {
                "name": "ft_scratch",
                "command": "finetune",
                "recipe": RECIPE,
                "init": "scratch",
                "overrides": FT_TINY,
            },
        ],
        "comparisons": [
            {
                "method": "ft_mae",
                "baseline": "ft_scratch",
                "metrics": ["finetune.top1"],
                "claim": "pretraining helps",
            },
        ],
    }
    recipe = tmp_path / "pipe.yaml"
    recipe.write_text(yaml.safe_dump(spec))
    summary = run_pipeline(str(recipe), str(tmp_path / "out"))
    out = tmp_path / "out"
    runs = [json.loads((out / "ft_mae" / f"seed{s}" / "finetune.json").read_text()) for s in (0, 1)]
    assert [r["seed"] for r in runs] == [0, 1]
    assert runs[0]["source"] == str(out / "mae")
    result = summary["results"]["ft_mae"]["finetune"]
    assert result["top1"] == pytest.approx(statistics.fmean(r["top1"] for r in runs))
    assert result["runs"] == 2 and result["top1_std"] >= 0
    scratch = summary["results"]["ft_scratch"]["finetune"]
    delta = summary["comparisons"][0]["deltas"]["finetune.top1"]
    assert delta == pytest.approx(result["top1"] - scratch["top1"])
    table = (out / "results.md").read_text()
    assert "| ft_mae | mae | 100 % | 1 | 2 |" in table and "| ft_scratch | scratch |" in table
    html = write_report(out).read_text()
    assert "<h2>Fine-tuning</h2>" in html and "fine-tuning curves" in html
    single = write_report(out / "ft_scratch").read_text()
    assert "fine-tuning curve" in single and "Reconstructions" not in single


def test_pipeline_refuses_bad_finetune_stages(tmp_path):
    def load(stages, evaluate=()):
        path = tmp_path / "p.yaml"
        path.write_text(yaml.safe_dump({"stages": stages, "evaluate": list(evaluate)}))
        return load_pipeline(str(path))

    ft = {"name": "ft", "command": "finetune", "recipe": RECIPE, "init": "later"}
    with pytest.raises(
        ConfigError, match=r"stages\[0\].init must name an earlier stage or scratch"
    ):
        load([ft])
    with pytest.raises(ConfigError, match="'ft' is a finetune stage"):
        load([{**ft, "init": "scratch"}], evaluate=["ft"])
    pre = {"name": "mae", "command": "pretrain", "recipe": "mae/fmnist_vit_t", "seeds": [0]}
    with pytest.raises(ConfigError, match="seeds applies to finetune stages only"):
        load([pre])


# Values of the official recipes: (global batch, devices assumed in the recipe's comment).
# facebookresearch/mae FINETUNE.md (scripts for ViT-Base/-Large/-Huge) and main_finetune.py.
FB_MAE = {
    "finetune/in1k_vit_b16": dict(epochs=100, blr=5e-4, layer_decay=0.65, drop_path=0.1, gpus=32),
    "finetune/in1k_vit_l16": dict(epochs=50, blr=1e-3, layer_decay=0.75, drop_path=0.2, gpus=32),
    "finetune/in1k_vit_h14": dict(epochs=50, blr=1e-3, layer_decay=0.75, drop_path=0.3, gpus=64),
}
# ml-jku/MIM-Refiner src/yamls/eval/finetune_1p/template_tracked_{large16,huge14}_ijepamin.yaml,
# src/yamls/eval/finetune_10p/template_tracked_large16_ijepa.yaml and
# template_tracked_huge14_semivit.yaml: (lr, wd, batch, drop path, RandAugment, mixup, gpus)
MIM_REFINER = {
    "finetune/in1k_semisup_1pct_vit_l16": (3e-5, 0.05, 512, 0.0, False, False, 8),
    "finetune/in1k_semisup_10pct_vit_l16": (3e-5, 0.05, 512, 0.0, True, False, 8),
    "finetune/in1k_semisup_1pct_vit_h14": (3e-5, 0.4, 512, 0.0, False, False, 16),
    "finetune/in1k_semisup_10pct_vit_h14": (1e-3, 0.05, 256, 0.2, True, True, 16),
}


@pytest.mark.parametrize("name", sorted(FB_MAE))
def test_fb_mae_recipes_pin_finetune_md(name):
    want, cfg = FB_MAE[name], load_config(name)
    f, o = cfg.finetune, cfg.optim
    assert cfg.data.batch_size * want["gpus"] == 1024
    assert (cfg.trainer.epochs, o.base_lr) == (want["epochs"], want["blr"])
    assert (f.layer_decay, f.drop_path) == (want["layer_decay"], want["drop_path"])
    assert (o.weight_decay, o.warmup_epochs, o.min_lr, o.betas) == (0.05, 5, 1e-6, [0.9, 0.999])
    assert (f.reprob, f.mixup, f.cutmix, f.smoothing) == (0.25, 0.8, 1.0, 0.1)
    assert (f.mixup_prob, f.mixup_switch_prob) == (1.0, 0.5)
    assert f.auto_augment == "rand-m9-mstd0.5-inc1" and f.global_pool == "avg"
    assert cfg.data.crop_scale == [0.08, 1.0] and cfg.data.label_fraction == 1.0


@pytest.mark.parametrize("fraction", ["1pct", "10pct"])
def test_fmnist_semisupervised_recipes_take_mim_refiners_low_shot_choices(fraction):
    """The laptop 1 % / 10 % recipes keep MIM-Refiner's pooling and regularisation and its 1 %
    augmentation (its lr and epochs are for ImageNet ViT-L/H; its 10 % RandAugment cost 10
    points at the laptop budget) and the Fashion-MNIST model and data."""
    cfg = load_config(f"finetune/fmnist_semisup_{fraction}_vit_t")
    ref = load_config(f"finetune/in1k_semisup_{fraction}_vit_l16")
    keys = ("global_pool", "drop_path", "mixup", "cutmix", "smoothing", "reprob", "layer_decay")
    assert [getattr(cfg.finetune, k) for k in keys] == [getattr(ref.finetune, k) for k in keys]
    assert cfg.finetune.auto_augment == "" and cfg.finetune.reprob == 0
    assert cfg.data.label_fraction == ref.data.label_fraction and cfg.data.batch_size == 64
    assert cfg.model == load_config(RECIPE).model and cfg.data.name == "fashion-mnist"


@pytest.mark.parametrize("name", sorted(MIM_REFINER))
def test_semisupervised_recipes_pin_mim_refiner(name):
    lr, wd, batch, drop_path, randaug, mixup, gpus = MIM_REFINER[name]
    cfg = load_config(name)
    f, o = cfg.finetune, cfg.optim
    assert cfg.data.label_fraction == (0.01 if "1pct" in name else 0.1)
    assert (o.base_lr, o.weight_decay, cfg.data.batch_size * gpus) == (lr, wd, batch)
    assert (o.betas, o.warmup_epochs, o.min_lr, cfg.trainer.epochs) == ([0.9, 0.999], 5, 0, 50)
    assert (f.layer_decay, f.drop_path, f.smoothing, f.global_pool) == (
        0.75,
        drop_path,
        0.1,
        "token",
    )
    assert (f.auto_augment != "") == randaug and (f.mixup, f.cutmix) == (
        (0.8, 1.0) if mixup else (0, 0)
    )
    assert f.reprob == (0.25 if mixup else 0.0) and cfg.data.crop_scale == [0.08, 1.0]


def test_finetune_fmnist_pipeline_reuses_the_refinement_study_stages(tmp_path):
    from maect.pipeline import stage_config

    spec, stages, comparisons = load_pipeline("finetune_fmnist")
    refine, refine_stages, _ = load_pipeline("refine_fmnist")
    assert spec.out == refine.out
    pretrained = {s.name: stage_config(refine, s, tmp_path, []) for s in refine_stages}
    finetuned, shared = [], []
    for stage in stages:
        cfg = stage_config(spec, stage, tmp_path, [])
        if stage.command == "finetune":
            finetuned.append((stage.init, cfg.data.label_fraction))
            assert cfg.data.subset is None and cfg.finetune.init.endswith(stage.init)
            low_shot = cfg.data.label_fraction < 1  # MIM-Refiner's recipe, not fb/mae's mixing
            assert (cfg.finetune.mixup == 0) == low_shot and (cfg.finetune.cutmix == 0) == low_shot
        elif stage.name in pretrained:  # identical config: the finished stage is skipped
            assert cfg.to_dict() == pretrained[stage.name].to_dict(), stage.name
            shared.append(stage.name)
    assert shared == ["mae", "maect", "maectaug"]
    sources = ("mae", "maect", "maectaug", "can", "simclr", "scratch")
    assert sorted(finetuned) == sorted((s, f) for s in sources for f in (1.0, 0.1, 0.01))
    assert len(comparisons) == 9


def _ddp_worker(rank: int, port: int, out: str) -> None:
    rank_environment(rank, 2, port)
    torch.set_num_threads(1)
    cfg = _cfg("trainer.epochs=1", "trainer.accelerator=cpu", "trainer.devices=2",
               "trainer.strategy=ddp", "data.synthetic_size=128", "data.batch_size=16")  # fmt: skip
    finetune(cfg, Path(out) / "ft")


@pytest.mark.slow
def test_two_ranks_fine_tune_and_score_the_whole_evaluation_split(tmp_path):
    """Under DDP every rank scores its share of the evaluation split and the counts are summed:
    finetune.json equals one process scoring the exported classifier on every image."""
    mp.spawn(_ddp_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    run = tmp_path / "ft"
    result = json.loads((run / "finetune.json").read_text())
    _, test = finetune_datasets(_cfg("data.synthetic_size=128"))
    model = load_classifier(run)
    images = torch.stack([test[i][0] for i in range(len(test))])
    with torch.no_grad():
        logits = model(images)
    expected = 100.0 * (logits.argmax(dim=1) == test.labels).float().mean().item()
    assert result["eval_images"] == len(test) == 32
    assert result["top1"] == pytest.approx(expected)
    assert result["train_images"] == 128


def test_ema_is_scored_and_exported(tmp_path):
    cfg = _cfg("trainer.epochs=1", "data.synthetic_size=64", "finetune.model_ema=0.5")
    run = finetune(cfg, tmp_path / "ft")
    result = json.loads((run / "finetune.json").read_text())
    assert set(result["online"]) == {"top1", "top5", "loss", "images"}
    with open(run / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("val_ema/top1")]
    assert len(rows) == 1 and float(rows[0]["val_ema/top1"]) == result["top1"]
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    exported = torch.load(run / "classifier.pt", weights_only=True)["model"]
    assert torch.equal(exported["head.weight"], ckpt["ema.head.weight"])
    assert not torch.equal(exported["head.weight"], ckpt["encoder.head.weight"])


def test_epoch_means_of_the_training_loss_are_logged_per_epoch(tmp_path):
    """FineTuning's epoch-end hook keeps the base class's: ``train/loss_epoch`` is the mean of
    that epoch's steps only (the running sums start again every epoch)."""
    cfg = _cfg("trainer.epochs=2", "data.synthetic_size=64", "finetune.eval_every=0")
    run = finetune(cfg, tmp_path / "ft")
    with open(run / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    steps: dict[int, list[float]] = {}
    for row in rows:
        if row["train/loss_step"]:
            steps.setdefault(int(row["epoch"]), []).append(float(row["train/loss_step"]))
    means = {int(r["epoch"]): float(r["train/loss_epoch"]) for r in rows if r["train/loss_epoch"]}
    assert sorted(means) == sorted(steps) == [0, 1] and len(steps[1]) == 2
    for epoch, values in steps.items():
        assert means[epoch] == pytest.approx(statistics.fmean(values), rel=1e-6)


def test_a_run_finished_before_its_outputs_were_written_scores_again(tmp_path):
    cfg = _cfg("trainer.epochs=1", "data.synthetic_size=64")
    run = finetune(cfg, tmp_path / "ft")
    first = json.loads((run / "finetune.json").read_text())
    (run / "finetune.json").unlink()  # as if killed after the last checkpoint
    (run / "classifier.pt").unlink()
    finetune(cfg, run)
    again = json.loads((run / "finetune.json").read_text())
    assert again["top1"] == first["top1"] and again["loss"] == pytest.approx(first["loss"])


def test_robustness_of_the_fine_tuned_classifier(tmp_path):
    from maect.data.transforms import eval_view, to_normalized
    from maect.evaluation.robustness import CLASSIFIER_PROTOCOL, evaluate_classifier

    robust = ["finetune.robustness_subset=10", "finetune.robustness_corruptions=[gaussian_noise]"]
    cfg = _cfg(
        "trainer.epochs=1",
        "data.synthetic_size=64",
        *robust,
        "finetune.robustness_severities=[1,5]",
    )
    run = finetune(cfg, tmp_path / "ft")
    block = json.loads((run / "finetune.json").read_text())["robustness"]
    assert block["protocol"] == CLASSIFIER_PROTOCOL and block["n_test"] == 10
    assert set(block["top1"]["gaussian_noise"]) == {"1", "5", "mean"}
    _, test = finetune_datasets(cfg)
    subset = label_subset(test, 10 / len(test), seed=0)
    again = evaluate_classifier(
        load_classifier(run), subset, to_normalized((0.5,), (0.25,)), eval_view(28, 1),
        corruptions=["gaussian_noise"], severities=[1, 5], device="cpu",
    )  # fmt: skip
    assert again["top1"] == block["top1"] and again["clean"] == block["clean"]
    assert "Robustness of the fine-tuned classifier" in write_report(run).read_text()
    with pytest.raises(ConfigError, match="finetune.robustness_corruptions has unknown"):
        finetune(_cfg("finetune.robustness_corruptions=[fog2]"), tmp_path / "bad")
