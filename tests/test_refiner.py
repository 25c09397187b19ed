"""MIM-Refiner: recipes pinned to the official yamls, local crops through the ViT, multi-crop
views and which views feed which terms, per-head queues (FIFO, self excluded), stage freezing and
learning rates, learning on synthetic data, end-to-end tune with exact resume."""

from __future__ import annotations

import copy
import shutil

import pytest
import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed

from maect.checkpoints import save_encoder
from maect.config import ConfigError, load_config
from maect.data.datasets import make_synthetic
from maect.engine import pretrain
from maect.methods.base import arch_from_config
from maect.methods.refiner import RefinerHeadTraining, RefinerTuning
from maect.models.vit import MaskedViT
from maect.tuning import tune, with_init
from tests.conftest import TINY_OVERRIDES

REFINER_TINY = [
    *TINY_OVERRIDES,
    "refiner.blocks=[0,1]",
    "refiner.local_views=3",
    "refiner.local_size=12",
    "refiner.queue_size=64",
    "refiner.topk=2",
    "refiner.proj_hidden_dim=32",
    "refiner.proj_dim=16",
    "refiner.pred_hidden_dim=32",
    "refiner.head_epochs=1",
    "refiner.head_warmup_epochs=0",
    "refiner.encoder_ema=0.9",
    "optim.warmup_epochs=0",
    "trainer.epochs=1",
    "trainer.monitor_every=0",
]
B = 8


@pytest.fixture
def refiner_cfg(tmp_path):
    init = tmp_path / "mae" / "encoder.pt"

    def make(*overrides: str):
        cfg = load_config("refiner/fmnist_vit_t", [*REFINER_TINY, *overrides])
        if not init.exists():
            save_encoder(MaskedViT(arch_from_config(cfg)), init)
        return with_init(cfg, str(init))

    return make


def _batch(cfg, seed: int = 0, ids: torch.Tensor | None = None) -> dict:
    g = torch.Generator().manual_seed(seed)
    r, size = cfg.refiner, cfg.model.img_size
    views = [torch.randn(B, 1, size, size, generator=g) for _ in range(2)]
    views += [
        torch.randn(B, 1, r.local_size, r.local_size, generator=g) for _ in range(r.local_views)
    ]
    ids = torch.arange(B) if ids is None else ids
    return {"image": views, "label": ids % 10, "index": ids}


# --------------------------------------------------------------------------- recipes

# (official yaml, blocks, tau, global batch, local size): ml-jku/MIM-Refiner src/yamls/stage2/*.yaml
# and src/yamls/stage3/*.yaml with the templates they name
OFFICIAL = {
    "refiner/in1k_vit_l16": ("l16_mae.yaml", [*range(16, 23), 23], 0.2, 1024, 96),
    "refiner/in1k_vit_h14": ("h14_mae.yaml", [*range(20, 31), 31], 0.3, 512, 98),
}


@pytest.mark.parametrize("recipe", list(OFFICIAL))
def test_paper_recipes_pin_the_official_values(recipe):
    _, blocks, tau, global_batch, local = OFFICIAL[recipe]
    cfg = load_config(recipe)
    r, o = cfg.refiner, cfg.optim
    assert cfg.method == "refiner"
    assert r.blocks == blocks and r.temperature == tau and r.local_size == local
    assert cfg.data.batch_size * 8 == global_batch  # per device x 8 GPUs
    # stage 2 (heads on the frozen encoder): 20 epochs, lr 2e-4 x batch/256, wd 1e-5, warmup 4
    assert (r.head_epochs, r.head_base_lr, r.head_weight_decay, r.head_warmup_epochs) == (
        20,
        2e-4,
        1e-5,
        4,
    )
    # stage 3: 30 epochs, lr 4e-4 (encoder and heads), wd 0.05 / 1e-5, warmup 4, cosine to 1e-6
    assert (cfg.trainer.epochs, o.base_lr, o.weight_decay, o.warmup_epochs, o.min_lr) == (
        30,
        4e-4,
        0.05,
        4,
        1e-6,
    )
    assert o.betas == [0.9, 0.95]
    assert (r.tune_head_base_lr, r.tune_head_weight_decay) == (4e-4, 1e-5)
    assert (r.layer_decay, r.frozen_blocks, r.encoder_ema) == (0.65, 0, 0.9999)
    # heads: models/nnclr "base", GELU, queue 65536, top-20 in stage 3, NNA loss, CLS pooling
    assert (r.proj_hidden_dim, r.proj_dim, r.pred_hidden_dim, r.queue_size) == (
        2048,
        256,
        4096,
        65536,
    )
    assert (r.head_activation, r.topk, r.loss, r.pooling) == ("gelu", 20, "nna", "cls")
    # datasets/imagenet/train_byolaug_localviews: 2 global byol views, 10 local views
    assert (r.views, r.local_views, r.local_terms) == ("byol", 10, "official")
    assert cfg.data.crop_scale == [0.25, 1.0] and r.local_crop_scale == [0.05, 0.25]


def test_fmnist_recipe_is_valid_and_small():
    cfg = load_config("refiner/fmnist_vit_t")
    assert cfg.model.depth == 6 and cfg.refiner.blocks == [3, 4, 5]
    assert cfg.refiner.local_size % cfg.model.patch_size == 0
    assert cfg.refiner.queue_size % cfg.data.batch_size == 0


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("refiner.blocks=[2]", "refiner.blocks must be a non-empty list"),
        ("refiner.blocks=[1,-1]", "refiner.blocks must not name a block twice"),
        ("refiner.local_size=10", "refiner.local_size must be a multiple of model.patch_size=4"),
        ("refiner.loss=byol", "refiner.loss must be nna or nnclr"),
        ("refiner.local_terms=all", "refiner.local_terms must be fixed or official"),
        ("data.augment_on=device", "data.augment_on must be loader for method=refiner"),
    ],
)
def test_bad_refiner_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("refiner/fmnist_vit_t", [*REFINER_TINY, override])


def test_tune_and_pretrain_refuse_each_others_recipes(tmp_path):
    cfg = load_config("mae/fmnist_vit_t", TINY_OVERRIDES)
    with pytest.raises(ConfigError, match=r"\(method mae\) is not for maect tune: .*pretrain"):
        tune(cfg, tmp_path / "run")
    cfg = load_config("refiner/fmnist_vit_t", REFINER_TINY)
    with pytest.raises(ConfigError, match=r"\(method refiner\) is not for maect pretrain: .*tune"):
        pretrain(cfg, tmp_path / "run")


# --------------------------------------------------------------------------- encoder


def test_forward_blocks_and_local_crops(tiny_arch):
    encoder = MaskedViT(tiny_arch).eval()
    images = torch.randn(3, 1, 28, 28)
    last, first = encoder.forward_blocks(images, [1, 0])
    torch.testing.assert_close(last, encoder.forward_features(images))
    x = encoder._pos_embed(encoder.patch_embed(images))
    torch.testing.assert_close(first, encoder.blocks[0](x))  # raw output, not normed
    assert torch.equal(encoder.forward_partially_frozen(images, 1), last)

    # a 12-pixel crop: 3 x 3 patches, positions = the 7 x 7 sin-cos table resampled bicubically
    crops = torch.randn(2, 1, 12, 12)
    tokens = encoder.embed(crops)
    table = encoder.pos_embed[:, 1:].reshape(1, 7, 7, -1).permute(0, 3, 1, 2)
    positions = F.interpolate(table, size=(3, 3), mode="bicubic", align_corners=False)
    patches = encoder.patch_embed.proj(crops).flatten(2).transpose(1, 2)
    torch.testing.assert_close(tokens[:, 1:], patches + positions.flatten(2).transpose(1, 2))
    cls = encoder.cls_token + encoder.pos_embed[:, :1]
    torch.testing.assert_close(tokens[:, :1], cls.expand(2, -1, -1))
    pos = resample_abs_pos_embed(encoder.pos_embed, [3, 3], num_prefix_tokens=1, antialias=False)
    assert pos.shape == (1, 10, tiny_arch.embed_dim)
    assert encoder.forward_blocks(crops, [1])[0].shape == (2, 10, tiny_arch.embed_dim)
    assert set(encoder.state_dict()) == set(MaskedViT(tiny_arch).state_dict())


def test_frozen_blocks_run_without_autograd(tiny_arch):
    encoder = MaskedViT(tiny_arch)
    images = torch.randn(2, 1, 28, 28)
    (out,) = encoder.forward_blocks(images, [1], frozen_blocks=1)
    out.sum().backward()
    assert encoder.blocks[0].attn.qkv.weight.grad is None
    assert encoder.patch_embed.proj.weight.grad is None
    assert encoder.blocks[1].attn.qkv.weight.grad is not None
    encoder.zero_grad()
    encoder.forward_blocks(images, [1])[0].sum().backward()
    assert encoder.patch_embed.proj.weight.grad is not None


# --------------------------------------------------------------------------- views and terms


def test_multi_crop_views_shapes(refiner_cfg):
    cfg = refiner_cfg()
    module = RefinerTuning(cfg, MaskedViT(arch_from_config(cfg)))
    dataset = make_synthetic(4, train=True)
    dataset.transform = module.train_transform()
    views, label, index = dataset[1]
    r = cfg.refiner
    assert len(views) == len(module.view_specs()) == 2 + r.local_views
    assert [v.shape[-1] for v in views] == [28, 28] + [r.local_size] * r.local_views
    assert all(v.dtype == torch.float32 and v.shape[0] == 1 for v in views)


@pytest.mark.parametrize("terms", ["fixed", "official"])
def test_which_views_feed_which_terms(refiner_cfg, terms):
    """Local views only give predictions: changing them leaves the queues and the neighbours
    unchanged; every local view gets a gradient with ``fixed``, the official indexing leaves the
    last two local views out. The heads' BatchNorm runs on its running statistics here: in
    training mode its batch statistics over all views couple every view to every output (as in
    the official code, where the head also sees all views as one batch)."""
    cfg = refiner_cfg(f"refiner.local_terms={terms}", "refiner.topk=1")
    module = RefinerTuning(cfg, MaskedViT(arch_from_config(cfg))).train()
    module.heads.eval()
    twin = copy.deepcopy(module)
    batch, other = _batch(cfg, 0), _batch(cfg, 0)
    other["image"][2:] = [torch.randn_like(v) for v in other["image"][2:]]
    images = [v.clone().requires_grad_(True) for v in batch["image"]]
    loss = module.compute_losses({**batch, "image": images})["loss"]
    loss_other = twin.compute_losses(other)["loss"]
    assert not torch.allclose(loss, loss_other)
    for key, value in module.heads.state_dict().items():
        if ".queue." in key:
            assert torch.equal(value, twin.heads.state_dict()[key]), key
    loss.backward()
    has_grad = [bool(v.grad.abs().sum() > 0) for v in images]
    expected_local = [True, True, True] if terms == "fixed" else [True, False, False]
    assert has_grad == [True, True, *expected_local]


# --------------------------------------------------------------------------- queues


def test_every_head_has_its_own_fifo_queue_without_self(refiner_cfg):
    cfg = refiner_cfg("refiner.queue_size=16", "refiner.topk=1")
    module = RefinerTuning(cfg, MaskedViT(arch_from_config(cfg))).train()
    assert list(module.heads) == ["block0", "block1"]
    queues = [head.queue for head in module.heads.values()]
    assert not torch.equal(queues[0].embeddings, queues[1].embeddings)  # own seeds
    batches = [_batch(cfg, s, torch.arange(B) + 100 * s) for s in range(3)]
    for step, batch in enumerate(batches):
        with torch.no_grad():
            pooled = module.pooled_features(batch["image"])
        projectors = [copy.deepcopy(h.projector) for h in module.heads.values()]
        module.compute_losses(batch)
        window = slice(0, B) if step % 2 == 0 else slice(B, 2 * B)
        for queue, projector, features in zip(queues, projectors, pooled, strict=True):
            expected = F.normalize(projector(features)[:B], dim=-1)  # view 0, same BN batch
            torch.testing.assert_close(queue.embeddings[window], expected)
            assert torch.equal(queue.ids[window], batch["index"])
            assert torch.equal(queue.labels[window], batch["label"])
            assert int(queue.ptr) == (step + 1) * B % 16
    # third batch sits at 0..B-1 and the second at B..2B-1 (FIFO); a sample never finds itself
    for queue in queues:
        assert queue.ids.tolist() == [*range(200, 200 + B), *range(100, 100 + B)]
    repeat = _batch(cfg, 5, torch.arange(B) + 200)  # the ids of the newest queue entries
    pooled = module.pooled_features(repeat["image"])
    for head, features in zip(module.heads.values(), pooled, strict=True):
        _, _, index = module.head_loss(head, features, repeat["index"])
        assert (head.queue.ids[index] != repeat["index"].repeat(2)).all()


# --------------------------------------------------------------------------- stages


def test_heads_are_the_official_nnclr_heads(refiner_cfg):
    cfg = refiner_cfg()
    module = RefinerTuning(cfg, MaskedViT(arch_from_config(cfg)))
    head = module.heads["block1"]
    kinds = [type(m).__name__ for m in head.predictor]
    assert kinds == ["Linear", "BatchNorm1d", "GELU", "Linear", "BatchNorm1d"]
    assert [type(m).__name__ for m in head.projector].count("GELU") == 2
    linears = [m for m in head.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 5 and all(m.bias is None for m in linears)
    assert head.queue.size == cfg.refiner.queue_size and head.queue.embeddings.shape[1] == 16


def test_head_stage_trains_only_the_heads(refiner_cfg):
    cfg = refiner_cfg()
    encoder = MaskedViT(arch_from_config(cfg))
    before = copy.deepcopy(encoder.state_dict())
    module = RefinerHeadTraining(cfg, encoder).train()
    assert module.topk == 1 and not module.encoder.training
    assert module.cfg.optim.base_lr == cfg.refiner.head_base_lr
    groups = module.param_groups()
    trained = {id(p) for g in groups for p in g["params"]}
    assert trained == {id(p) for p in module.heads.parameters()}
    optimizer = torch.optim.AdamW(groups, lr=1e-3)
    module.compute_losses(_batch(cfg))["loss"].backward()
    optimizer.step()
    for key, value in encoder.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_tuning_stage_groups_ema_and_frozen_blocks(refiner_cfg):
    cfg = refiner_cfg("refiner.frozen_blocks=1")
    module = RefinerTuning(cfg, MaskedViT(arch_from_config(cfg))).train()
    assert module.topk == cfg.refiner.topk
    assert not module.encoder.blocks[0].training and module.encoder.blocks[1].training
    scale = {id(p): g["lr_scale"] for g in module.param_groups() for p in g["params"]}
    encoder = module.encoder
    assert id(encoder.blocks[0].attn.qkv.weight) not in scale
    assert id(encoder.cls_token) not in scale and id(encoder.patch_embed.proj.weight) not in scale
    assert scale[id(encoder.blocks[1].attn.qkv.weight)] == pytest.approx(0.65)
    assert scale[id(encoder.norm.weight)] == 1.0
    head_scale = cfg.refiner.tune_head_base_lr / cfg.optim.base_lr
    assert all(scale[id(p)] == head_scale for p in module.heads.parameters())

    lower = RefinerTuning(refiner_cfg("refiner.blocks=[0]"), MaskedViT(arch_from_config(cfg)))
    trained = {id(p) for g in lower.param_groups() for p in g["params"]}
    encoder = lower.encoder
    assert not any(id(p) in trained for p in [*encoder.blocks[1].parameters(), encoder.norm.weight])
    assert id(encoder.blocks[0].attn.qkv.weight) in trained

    whole = RefinerTuning(refiner_cfg(), MaskedViT(arch_from_config(cfg)))
    scale = {id(p): g["lr_scale"] for g in whole.param_groups() for p in g["params"]}
    assert scale[id(whole.encoder.cls_token)] == pytest.approx(0.65**3)  # depth 2: stem 0.65^3
    assert scale[id(whole.encoder.patch_embed.proj.weight)] == pytest.approx(0.65**3)
    decay = {id(p): g["weight_decay"] for g in whole.param_groups() for p in g["params"]}
    assert decay[id(whole.encoder.cls_token)] == 0.0  # the official ViT exempts it
    assert decay[id(whole.encoder.patch_embed.proj.weight)] == cfg.optim.weight_decay

    optimizer = torch.optim.AdamW(module.param_groups(), lr=1e-2)
    ema_before = copy.deepcopy(module.ema_encoder.state_dict())
    module.compute_losses(_batch(cfg))["loss"].backward()
    module.optimizer_step(0, 0, optimizer, lambda: None)
    online, ema = module.encoder.state_dict(), module.ema_encoder.state_dict()
    key = "blocks.1.attn.qkv.weight"
    torch.testing.assert_close(ema[key], 0.9 * ema_before[key] + 0.1 * online[key])
    assert module.export_encoder() is module.ema_encoder


def test_tiny_run_learns_on_synthetic_data(refiner_cfg):
    cfg = refiner_cfg("refiner.queue_size=32", "refiner.local_views=2")
    torch.manual_seed(0)
    module = RefinerTuning(cfg, MaskedViT(arch_from_config(cfg))).train()
    dataset = make_synthetic(32, train=True)
    dataset.transform = module.train_transform()
    optimizer = torch.optim.AdamW(module.param_groups(), lr=2e-3)
    losses = []
    for step in range(40):
        ids = torch.arange(B) + B * (step % 4)
        items = [dataset[int(i)] for i in ids]
        views = [torch.stack([item[0][v] for item in items]) for v in range(4)]
        batch = {"image": views, "label": ids % 10, "index": ids}
        loss = module.compute_losses(batch)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-8:]) < 0.8 * sum(losses[:8]), losses


def test_tune_end_to_end_and_exact_resume(refiner_cfg, tmp_path):
    cfg = refiner_cfg("trainer.epochs=2", "trainer.checkpoint_every=1")
    run = tmp_path / "refiner"
    tune(cfg, run)
    for name in ("encoder.pt", "head/head.pt", "tune/checkpoints/epoch0001.ckpt"):
        assert (run / name).is_file(), name
    heads = torch.load(run / "head/head.pt", weights_only=True)["heads"]
    assert {k.split(".")[0] for k in heads} == {"block0", "block1"}
    finished = torch.load(run / "tune/checkpoints/last.ckpt", weights_only=True)
    state = finished["state_dict"]
    for block in ("block0", "block1"):
        assert int(state[f"heads.{block}.queue.ptr"]) == 0  # 64 images x 2 epochs, queue 64
        assert (state[f"heads.{block}.queue.ids"] >= 0).all()
    assert any(k.startswith("ema_encoder.") for k in state)
    exported = torch.load(run / "encoder.pt", weights_only=True)["model"]
    for key, value in exported.items():
        assert torch.equal(value, state[f"ema_encoder.{key}"]), key

    (run / "encoder.pt").unlink()
    shutil.copy(run / "tune/checkpoints/epoch0001.ckpt", run / "tune/checkpoints/last.ckpt")
    tune(cfg, run)
    resumed = torch.load(run / "tune/checkpoints/last.ckpt", weights_only=True)
    assert resumed["state_dict"].keys() == state.keys()
    for key, value in state.items():  # every head, queue, EMA
        assert torch.equal(resumed["state_dict"][key], value), key
    for got, want in zip(
        resumed["optimizer_states"][0]["state"].values(),
        finished["optimizer_states"][0]["state"].values(),
        strict=True,
    ):
        assert all(torch.equal(got[k], want[k]) for k in want)
