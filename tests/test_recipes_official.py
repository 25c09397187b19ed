"""The ImageNet recipes pinned value by value against the official sources they reproduce.

Read (not fetched at test time) from:
- ml-jku/MAE-CT at commit 6c82cb6ff79365e795672ea18a9051232ce53c24: ``yamls/stage1_mae/*.yaml``,
  ``yamls/stage2_maect{,aug}_prepare_head/*.yaml``, ``yamls/stage3_maect{,aug}_contrastive_tuning/
  *.yaml`` and the code that reads them (paths named where a value comes from code);
- facebookresearch/mae at commit efb2a8062c206524e35e47d04501ed4f544c0ae8: ``PRETRAIN.md``,
  ``main_pretrain.py``.

The official ``effective_batch_size`` is global; maect's ``data.batch_size`` is per device, so the
recipes assume a device count (8 GPUs for MAE-CT, as the repository's README commands; 64 for
facebookresearch/mae, as PRETRAIN.md) and the global batch is pinned as ``global_batch``. Warmup
lengths are the yamls' ``end_percent: 20`` of ``max_epochs``. Each learning rate is pinned as the
absolute peak value the official code computes: ``lr x n_views x effective_batch_size / 256``
(``trainers/base/trainer_base.py``: ``initialize_model``;
``optimizers/lr_scalers/linear_lr_scaler.py``).
"""

from types import SimpleNamespace

import pytest
import torch
from timm.optim import param_groups_weight_decay
from torch import nn
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2 as T

from maect.config import RunConfig, load_config
from maect.data.transforms import VIEW_PAIRS, loader_views
from maect.methods.base import PretrainMethod, arch_from_config
from maect.methods.mae import MAE
from maect.methods.maect import (
    ContrastiveTuning,
    NNCLRHeadTraining,
    NNCLRMethod,
    head_stage_config,
)
from maect.models.heads import NNCLRPredictor, NNCLRProjector
from maect.models.vit import MaskedViT
from tests.conftest import TINY_OVERRIDES

MAECT_COMMIT = "6c82cb6ff79365e795672ea18a9051232ce53c24"
MAE_COMMIT = "efb2a8062c206524e35e47d04501ed4f544c0ae8"
MAECT_DEVICES = 8
MAE_DEVICES = 64


def _vit(patch: int, width: int, depth: int, heads: int) -> dict:
    """The yamls' ``encoder`` patch_size, embedding_dim, depth, attention_heads."""
    keys = ("model.patch_size", "model.embed_dim", "model.depth", "model.num_heads")
    return dict(zip(keys, (patch, width, depth, heads), strict=True))


VIT = {
    "b16": _vit(16, 768, 12, 12),
    "l16": _vit(16, 1024, 24, 16),
    "h16": _vit(16, 1280, 32, 16),
    "h14": _vit(14, 1280, 32, 16),
}

# Identical in all eight yamls/stage2_maect{,aug}_prepare_head/*.yaml (contrastive_heads.nnclr:
# kind nnclr_head (topk 0 = exact nearest neighbour), proj/pred hidden dims, output_dim, queue_size,
# temperature, optim; trainer.max_epochs; kd_random_resized_crop scale/size; mask_ratio 0.0).
STAGE2_ALL = {
    "model.img_size": 224,
    "maect.proj_hidden_dim": 2048,
    "maect.pred_hidden_dim": 4096,
    "maect.proj_dim": 256,
    "maect.queue_size": 65536,
    "maect.head_temperature": 0.15,
    "maect.head_base_lr": 1.0e-4,
    "maect.head_weight_decay": 1.0e-5,
    "optim.betas": [0.9, 0.95],
    "maect.head_epochs": 20,
    "maect.head_warmup_epochs": 4.0,  # end_percent 20 of 20 epochs
    "optim.min_lr": 0.0,  # cosine_decreasing down to 0
    "data.crop_scale": [0.08, 1.0],
    "data.hflip": True,
}

# Identical in all eight yamls/stage3_maect{,aug}_contrastive_tuning/*.yaml (encoder optim with
# layerwise_lr_decay_modifier, nnclr_ema_queue_head sizes and optim, ema_logger target_factors).
STAGE3_ALL = {
    "model.img_size": 224,
    "optim.base_lr": 1.0e-4,
    "optim.weight_decay": 0.05,
    "optim.betas": [0.9, 0.95],
    "optim.min_lr": 0.0,
    "maect.layer_decay": 0.65,
    "maect.proj_hidden_dim": 2048,
    "maect.pred_hidden_dim": 4096,
    "maect.proj_dim": 256,
    "maect.queue_size": 65536,
    "maect.tune_head_weight_decay": 1.0e-5,
    "maect.encoder_ema": 0.9999,
    "data.crop_scale": [0.08, 1.0],
    "data.hflip": True,
}


def _maect_yamls(variant: str, size: str, vit: str, both: dict, stage3: dict) -> dict[str, dict]:
    """Expected values of ``yamls/stage2_{variant}_prepare_head/{size}.yaml`` and
    ``yamls/stage3_{variant}_contrastive_tuning/{size}.yaml``: ``both`` holds what the two files
    of one model share, ``stage3`` the contrastive tuning's own values."""
    both = {**VIT[vit], **both}
    return {
        f"yamls/stage2_{variant}_prepare_head/{size}.yaml": {**STAGE2_ALL, **both},
        f"yamls/stage3_{variant}_contrastive_tuning/{size}.yaml": {**STAGE3_ALL, **both, **stage3},
    }


# The huge16 and huge14 yamls of each variant differ only in the patch size.
MAECT_HUGE = (
    {"maect.pooling": "cls", "maect.views": "min", "global_batch": 512, "lr": 4e-4},
    {
        "trainer.epochs": 30,
        "optim.warmup_epochs": 6.0,
        "maect.frozen_blocks": 16,
        "maect.temperature": 0.3,
        "maect.topk": 20,
        "maect.target_ema": 0.995,
        "maect.tune_head_base_lr": 1e-4,
        "head_lr": 4e-4,
    },
)
MAECTAUG_HUGE = (
    {"maect.pooling": "cls", "maect.views": "byol", "global_batch": 512, "lr": 4e-4},
    {
        "trainer.epochs": 40,
        "optim.warmup_epochs": 8.0,
        "maect.frozen_blocks": 16,
        "maect.temperature": 0.35,
        "maect.topk": 20,
        "maect.target_ema": 0.995,
        "maect.tune_head_base_lr": 5e-4,
        "head_lr": 2e-3,
    },
)
# recipe -> official file -> expected values; "global_batch", "lr", "head_lr" are derived below.
MAECT_RECIPES: dict[str, dict[str, dict]] = {
    "maect/in1k_vit_b16": _maect_yamls(
        "maect",
        "base16",
        "b16",
        {"maect.pooling": "mean", "maect.views": "min", "global_batch": 1024, "lr": 8e-4},
        {
            "trainer.epochs": 20,
            "optim.warmup_epochs": 4.0,
            "maect.frozen_blocks": 6,
            "maect.temperature": 0.15,
            "maect.topk": 20,
            "maect.target_ema": 0.99,
            "maect.tune_head_base_lr": 1e-4,
            "head_lr": 8e-4,
        },
    ),
    "maect/in1k_vit_l16": _maect_yamls(
        "maect",
        "large16",
        "l16",
        {"maect.pooling": "cls", "maect.views": "min", "global_batch": 1024, "lr": 8e-4},
        {
            "trainer.epochs": 20,
            "optim.warmup_epochs": 4.0,
            "maect.frozen_blocks": 12,
            "maect.temperature": 0.2,
            "maect.topk": 20,
            "maect.target_ema": 0.99,
            "maect.tune_head_base_lr": 1e-4,
            "head_lr": 8e-4,
        },
    ),
    "maect/in1k_vit_h16": _maect_yamls("maect", "huge16", "h16", *MAECT_HUGE),
    "maect/in1k_vit_h14": _maect_yamls("maect", "huge14", "h14", *MAECT_HUGE),
    "maectaug/in1k_vit_b16": _maect_yamls(
        "maectaug",
        "base16",
        "b16",
        {"maect.pooling": "mean", "maect.views": "byol", "global_batch": 1024, "lr": 8e-4},
        {
            "trainer.epochs": 80,
            "optim.warmup_epochs": 16.0,
            "maect.frozen_blocks": 6,
            "maect.temperature": 0.15,
            "maect.topk": 10,
            "maect.target_ema": 0.99,
            "maect.tune_head_base_lr": 5e-4,
            "head_lr": 4e-3,
        },
    ),
    "maectaug/in1k_vit_l16": _maect_yamls(
        "maectaug",
        "large16",
        "l16",
        {"maect.pooling": "cls", "maect.views": "byol", "global_batch": 1024, "lr": 8e-4},
        {
            "trainer.epochs": 40,
            "optim.warmup_epochs": 8.0,
            "maect.frozen_blocks": 12,
            "maect.temperature": 0.15,
            "maect.topk": 10,
            "maect.target_ema": 0.99,
            "maect.tune_head_base_lr": 5e-4,
            "head_lr": 4e-3,
        },
    ),
    "maectaug/in1k_vit_h16": _maect_yamls("maectaug", "huge16", "h16", *MAECTAUG_HUGE),
    "maectaug/in1k_vit_h14": _maect_yamls("maectaug", "huge14", "h14", *MAECTAUG_HUGE),
}

# yamls/stage1_mae/*.yaml: multi_view_wrapper n_views 2, kd_random_resized_crop 0.2-1 bicubic +
# flip, adamw lr 1.5e-4 wd 0.05 betas (0.9, 0.95), 20 warmup epochs then cosine, 800 epochs, mask
# 0.75, normalize_pixels, decoder 8 blocks x 512 wide x 16 heads.
STAGE1_ALL = {
    "model.img_size": 224,
    "model.decoder_dim": 512,
    "model.decoder_depth": 8,
    "model.decoder_heads": 16,
    "mae.views": 2,
    "mae.mask_ratio": 0.75,
    "mae.norm_pix_loss": True,
    "optim.base_lr": 1.5e-4,
    "optim.weight_decay": 0.05,
    "optim.betas": [0.9, 0.95],
    "optim.warmup_epochs": 20.0,
    "optim.min_lr": 0.0,
    "trainer.epochs": 800,
    "data.crop_scale": [0.2, 1.0],
    "data.hflip": True,
}
MAE_RECIPES: dict[str, dict[str, dict]] = {
    "mae/maect_stage1_b16": {
        "yamls/stage1_mae/base16.yaml": {
            **STAGE1_ALL,
            **VIT["b16"],
            "global_batch": 1024,
            "lr": 1.2e-3,
        },
    },
    "mae/maect_stage1_l16": {
        "yamls/stage1_mae/large16.yaml": {
            **STAGE1_ALL,
            **VIT["l16"],
            "global_batch": 1024,
            "lr": 1.2e-3,
        },
    },
    "mae/maect_stage1_h16": {
        "yamls/stage1_mae/huge16.yaml": {
            **STAGE1_ALL,
            **VIT["h16"],
            "global_batch": 512,
            "lr": 6e-4,
        },
    },
}
# facebookresearch/mae: PRETRAIN.md (8 nodes x 8 GPUs x batch 64, --epochs 800, --warmup_epochs 40,
# --blr 1.5e-4, --weight_decay 0.05, --mask_ratio 0.75, --norm_pix_loss) and main_pretrain.py
# (AdamW betas (0.9, 0.95), RandomResizedCrop scale (0.2, 1.0) bicubic + flip, min_lr 0).
FB_MAE_ALL = {
    "model.img_size": 224,
    "model.decoder_dim": 512,
    "model.decoder_depth": 8,
    "model.decoder_heads": 16,
    "mae.views": 1,
    "mae.mask_ratio": 0.75,
    "mae.norm_pix_loss": True,
    "optim.base_lr": 1.5e-4,
    "optim.weight_decay": 0.05,
    "optim.betas": [0.9, 0.95],
    "optim.warmup_epochs": 40.0,
    "optim.min_lr": 0.0,
    "data.crop_scale": [0.2, 1.0],
    "data.hflip": True,
    "global_batch": 4096,
    "lr": 2.4e-3,
}
FB_MAE_RECIPES: dict[str, dict[str, dict]] = {
    "mae/in1k_vit_b16": {"PRETRAIN.md": {**FB_MAE_ALL, **VIT["b16"], "trainer.epochs": 800}},
    "mae/in1k_vit_l16": {"PRETRAIN.md": {**FB_MAE_ALL, **VIT["l16"], "trainer.epochs": 800}},
    # the released ViT-H/14 weights (MAE-CT's H/14 starting point) were trained 1600 epochs, the
    # MAE paper's system-level schedule; PRETRAIN.md's example command runs 800
    "mae/in1k_vit_h14": {"PRETRAIN.md": {**FB_MAE_ALL, **VIT["h14"], "trainer.epochs": 1600}},
}


def _value(cfg: RunConfig, key: str):
    node = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node


def _peak_lr(cfg: RunConfig, lr_views: int, devices: int) -> float:
    """``PretrainMethod.peak_lr`` for ``devices`` devices, without building the model."""
    fake = SimpleNamespace(
        cfg=cfg, lr_views=lr_views, global_batch_size=cfg.data.batch_size * devices
    )
    return PretrainMethod.peak_lr.fget(fake)


def _check(cfg: RunConfig, expected: dict, derived: dict, where: str) -> None:
    for key, want in expected.items():
        got = derived[key] if key in derived else _value(cfg, key)
        if isinstance(want, float):
            assert got == pytest.approx(want, rel=1e-9), f"{key} ({where})"
        else:
            assert got == want, f"{key} ({where})"


def _cases(table: dict[str, dict[str, dict]]) -> list[tuple[str, str, dict]]:
    return [
        (recipe, file, values) for recipe, files in table.items() for file, values in files.items()
    ]


@pytest.mark.parametrize("recipe,official,expected", _cases(MAECT_RECIPES))
def test_maect_recipes_match_official_yamls(recipe, official, expected):
    cfg = load_config(recipe)
    assert cfg.method == "maect"
    where = f"{recipe} vs ml-jku/MAE-CT@{MAECT_COMMIT[:7]}:{official}"
    if "stage2" in official:
        stage = head_stage_config(cfg)  # what stage 2 trains with
        assert stage.maect.temperature == cfg.maect.head_temperature
        derived = {
            "global_batch": cfg.data.batch_size * MAECT_DEVICES,
            "lr": _peak_lr(stage, NNCLRMethod.lr_views, MAECT_DEVICES),
        }
    else:
        peak = _peak_lr(cfg, NNCLRMethod.lr_views, MAECT_DEVICES)
        head_scale = cfg.maect.tune_head_base_lr / cfg.optim.base_lr  # ContrastiveTuning groups
        derived = {
            "global_batch": cfg.data.batch_size * MAECT_DEVICES,
            "lr": peak,
            "head_lr": peak * head_scale,
        }
    _check(cfg, expected, derived, where)


@pytest.mark.parametrize("recipe,official,expected", _cases(MAE_RECIPES))
def test_maect_stage1_recipes_match_official_yamls(recipe, official, expected):
    cfg = load_config(recipe)
    assert cfg.method == "mae"
    lr_views = MAE.lr_views.fget(SimpleNamespace(cfg=cfg))
    derived = {
        "global_batch": cfg.data.batch_size * MAECT_DEVICES,
        "lr": _peak_lr(cfg, lr_views, MAECT_DEVICES),
    }
    _check(cfg, expected, derived, f"{recipe} vs ml-jku/MAE-CT@{MAECT_COMMIT[:7]}:{official}")


@pytest.mark.parametrize("recipe,official,expected", _cases(FB_MAE_RECIPES))
def test_mae_recipes_match_facebookresearch_mae(recipe, official, expected):
    cfg = load_config(recipe)
    lr_views = MAE.lr_views.fget(SimpleNamespace(cfg=cfg))
    derived = {
        "global_batch": cfg.data.batch_size * MAE_DEVICES,
        "lr": _peak_lr(cfg, lr_views, MAE_DEVICES),
    }
    _check(cfg, expected, derived, f"{recipe} vs facebookresearch/mae@{MAE_COMMIT[:7]}:{official}")


def test_every_imagenet_recipe_is_pinned():
    from maect.config import available_recipes

    pinned = {*MAECT_RECIPES, *MAE_RECIPES, *FB_MAE_RECIPES}
    imagenet = {
        name
        for name in available_recipes()
        if name.split("/")[0] in ("mae", "maect", "maectaug")
        and ("in1k" in name or "stage1" in name)
    }
    assert imagenet == pinned


def _signature(module: nn.Module) -> list[tuple]:
    rows: list[tuple] = []
    for layer in module:
        if isinstance(layer, nn.Linear):
            rows.append(("Linear", layer.in_features, layer.out_features, layer.bias is not None))
        elif isinstance(layer, nn.BatchNorm1d):
            rows.append(("BatchNorm1d", layer.num_features, layer.affine))
        else:
            rows.append((type(layer).__name__,))
    return rows


def test_nnclr_head_matches_official_structure():
    """models/contrastive_heads/base/contrastive_head_base.py: create_projector (no biases, BN
    with affine after every Linear, the last one included) and create_predictor (no bias on
    either Linear, no BN at the end); sizes from the yamls (2048, 4096, 256)."""
    cfg = load_config("maect/in1k_vit_b16")
    t, width = cfg.maect, cfg.model.embed_dim
    projector = NNCLRProjector(width, t.proj_hidden_dim, t.proj_dim)
    assert _signature(projector) == [
        ("Linear", 768, 2048, False), ("BatchNorm1d", 2048, True), ("ReLU",),
        ("Linear", 2048, 2048, False), ("BatchNorm1d", 2048, True), ("ReLU",),
        ("Linear", 2048, 256, False), ("BatchNorm1d", 256, True),
    ]  # fmt: skip
    predictor = NNCLRPredictor(t.proj_dim, t.pred_hidden_dim, t.proj_dim)
    assert _signature(predictor) == [
        ("Linear", 256, 4096, False), ("BatchNorm1d", 4096, True), ("ReLU",),
        ("Linear", 4096, 256, False),
    ]  # fmt: skip


def test_lr_counts_both_views():
    """trainers/base/trainer_base.py: initialize_model scales every stage's lr by
    n_views x effective_batch_size (2 views in stages 2 and 3)."""
    assert NNCLRMethod.lr_views == 2


def _ops(view: T.Compose) -> list[tuple]:
    """(name, parameters) of each op of one view, unwrapping RandomApply into its probability."""
    rows: list[tuple] = []
    for op in view.transforms:
        p = 1.0
        if isinstance(op, T.RandomApply):
            p, (op,) = op.p, op.transforms
        if isinstance(op, T.RandomResizedCrop):
            rows.append(("crop", tuple(op.size), tuple(op.scale), op.interpolation))
        elif isinstance(op, T.RandomHorizontalFlip):
            rows.append(("flip", op.p))
        elif isinstance(op, T.ColorJitter):
            jitter = (op.brightness, op.contrast, op.saturation, op.hue)
            rows.append(("jitter", p, tuple(tuple(round(v, 6) for v in r) for r in jitter)))
        elif isinstance(op, T.GaussianBlur):
            rows.append(("blur", p, tuple(op.sigma)))
        elif isinstance(op, T.RandomGrayscale):
            rows.append(("gray", op.p))
        elif isinstance(op, T.RandomSolarize):
            rows.append(("solarize", op.p, op.threshold))
    return rows


CROP = ("crop", (224, 224), (0.08, 1.0), InterpolationMode.BICUBIC)
JITTER = ("jitter", 0.8, ((0.6, 1.4), (0.6, 1.4), (0.8, 1.2), (-0.1, 0.1)))


@pytest.mark.parametrize(
    "recipe,expected",
    [
        # yamls/stage{2,3}_maect_*/base16.yaml: kd_random_resized_crop (224, 0.08-1, bicubic) +
        # kd_random_horizontal_flip per view, nothing else
        ("maect/in1k_vit_b16", ([CROP, ("flip", 0.5)], [CROP, ("flip", 0.5)])),
        # yamls/stage{2,3}_maectaug_*/base16.yaml: view 0 jitter p 0.8 (0.4, 0.4, 0.2, 0.1),
        # kd_gaussian_blur_pil sigma 0.1-2 always, grayscale p 0.2; view 1 the same jitter,
        # blur p 0.1, grayscale p 0.2, solarize p 0.2 at 128 (maect's grayscale comes before the
        # blur; both are linear, so the order does not matter beyond uint8 rounding)
        (
            "maectaug/in1k_vit_b16",
            (
                [CROP, ("flip", 0.5), JITTER, ("gray", 0.2), ("blur", 1.0, (0.1, 2.0))],
                [
                    CROP, ("flip", 0.5), JITTER, ("gray", 0.2), ("blur", 0.1, (0.1, 2.0)),
                    ("solarize", 0.2, 128.0),
                ],
            ),
        ),
    ],
)  # fmt: skip
def test_views_match_official_transforms(recipe, expected):
    cfg = load_config(recipe)
    m, d = cfg.model, cfg.data
    pair = loader_views(VIEW_PAIRS[cfg.maect.views], m.img_size, m.in_chans, (0.5,) * 3,
                        (0.5,) * 3, d.crop_scale, d.hflip)  # fmt: skip
    assert [_ops(view) for view in pair.views] == list(expected)
    views = pair(torch.randint(0, 256, (3, 256, 300), dtype=torch.uint8))
    assert [tuple(v.shape) for v in views] == [(3, 224, 224), (3, 224, 224)]


def test_weight_decay_split_matches_timm_add_weight_decay():
    """facebookresearch/mae ``main_pretrain.py`` (``optim_factory.add_weight_decay`` of timm
    0.3.2) and MAE-CT's ``optimizers/optimizer_wrapper.py`` (``exclude_bias_from_wd``,
    ``exclude_norm_from_wd``) exempt only biases and 1-D parameters: the CLS and mask tokens are
    decayed. timm's ``param_groups_weight_decay`` keeps that rule and is the reference here."""
    module = MAE(load_config("mae/maect_stage1_b16", [*TINY_OVERRIDES, "model.img_size=32"]))
    groups = module.param_groups()
    ours = {id(p) for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    reference = param_groups_weight_decay(module, weight_decay=0.05)
    theirs = {id(p) for g in reference if g["weight_decay"] == 0 for p in g["params"]}
    assert ours == theirs
    decayed = {id(p) for g in groups if g["weight_decay"] == 0.05 for p in g["params"]}
    assert id(module.encoder.cls_token) in decayed
    assert id(module.autoencoder.decoder.mask_token) in decayed


def test_neighbour_pick_per_stage():
    """Stage 2's ``contrastive_heads.nnclr_head`` has no ``topk`` in the yamls, so
    ``find_nn`` takes the exact nearest entry (``models/contrastive_heads/nnclr_head.py``, topk 0);
    stage 3's ``nnclr_ema_queue_head`` draws uniformly among the yaml's ``topk`` (20 here)."""
    small = ["model.img_size=32", "maect.queue_size=64", "maect.frozen_blocks=1"]
    small += ["maect.proj_hidden_dim=8", "maect.pred_hidden_dim=8", "maect.proj_dim=4"]
    cfg = load_config("maect/in1k_vit_l16", [*TINY_OVERRIDES, *small])
    assert cfg.maect.topk == 20
    assert NNCLRHeadTraining(cfg, MaskedViT(arch_from_config(cfg))).topk == 1
    assert ContrastiveTuning(cfg, MaskedViT(arch_from_config(cfg))).topk == 20
