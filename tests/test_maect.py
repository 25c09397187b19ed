"""MAE-CT: stage 2 trains only the head, stage 3 freezes what it must, layer-wise lr, EMAs,
queue-size check, end-to-end tune with exact resume."""

import shutil

import pytest
import torch

from maect.checkpoints import CheckpointError, save_encoder
from maect.config import ConfigError, load_config
from maect.methods.base import arch_from_config
from maect.methods.maect import ContrastiveTuning, NNCLRHeadTraining
from maect.models.ema import ema_update
from maect.models.heads import NNCLRProjector
from maect.models.vit import MaskedViT
from maect.tuning import load_init_encoder, tune
from tests.conftest import TINY_OVERRIDES

MAECT_TINY = [
    *TINY_OVERRIDES,
    "maect.queue_size=64",
    "maect.topk=2",
    "maect.proj_hidden_dim=32",
    "maect.proj_dim=16",
    "maect.pred_hidden_dim=32",
    "maect.frozen_blocks=1",
    "maect.head_epochs=1",
    "maect.head_warmup_epochs=0",
    "optim.warmup_epochs=0",
    "trainer.epochs=1",
]


@pytest.fixture
def maect_cfg(tmp_path):
    init = tmp_path / "mae" / "encoder.pt"

    def make(*overrides: str):
        cfg = load_config("maect/fmnist_vit_t", [*MAECT_TINY, f"maect.init={init}", *overrides])
        if not init.exists():
            save_encoder(MaskedViT(arch_from_config(cfg)), init)
        return cfg

    return make


def _batch(n: int = 16):
    views = [torch.randn(n, 1, 28, 28), torch.randn(n, 1, 28, 28)]
    return {"image": views, "label": torch.arange(n) % 10, "index": torch.arange(n)}


def _steps(module, steps: int, lr: float = 1e-3):
    groups = module.param_groups()
    optimizer = torch.optim.AdamW(groups, lr=lr)
    module.train()
    for _ in range(steps):
        loss = module.compute_losses(_batch())["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return optimizer


def test_stage2_trains_only_the_head(maect_cfg):
    cfg = maect_cfg()
    encoder = MaskedViT(arch_from_config(cfg))
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    head = NNCLRHeadTraining(cfg, encoder)
    projector_before = head.projector[0].weight.clone()
    optimizer = _steps(head, 3)
    trained = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert trained == {id(p) for p in [*head.projector.parameters(), *head.predictor.parameters()]}
    assert not head.encoder.training and head.projector.training
    for key, value in encoder.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert not torch.equal(head.projector[0].weight, projector_before)
    assert head.cfg.trainer.epochs == cfg.maect.head_epochs
    assert head.cfg.optim.base_lr == cfg.maect.head_base_lr


def test_stage3_frozen_parts_bit_identical_and_in_eval(maect_cfg):
    cfg = maect_cfg()
    module = ContrastiveTuning(cfg, MaskedViT(arch_from_config(cfg)))
    enc = module.encoder
    frozen = {
        name: p.clone()
        for name, p in enc.named_parameters()
        if name.startswith(("patch_embed", "cls_token", "pos_embed", "blocks.0."))
    }
    top = enc.blocks[1].attn.qkv.weight.clone()
    _steps(module, 3)
    for name, value in frozen.items():
        assert torch.equal(dict(enc.named_parameters())[name], value), name
    assert not torch.equal(enc.blocks[1].attn.qkv.weight, top)
    assert not enc.blocks[0].training and not enc.patch_embed.training
    assert enc.blocks[1].training
    # no activations are kept for the frozen part: its output does not require grad
    tokens = enc.forward_partially_frozen(torch.randn(2, 1, 28, 28), 1)
    assert tokens.requires_grad


def test_layer_wise_learning_rates(maect_cfg):
    cfg = maect_cfg("maect.frozen_blocks=0", "maect.layer_decay=0.5")
    module = ContrastiveTuning(cfg, MaskedViT(arch_from_config(cfg)))
    depth = cfg.model.depth
    scale_of = {}
    for group in module.param_groups():
        for p in group["params"]:
            scale_of[id(p)] = (group["lr_scale"], group["weight_decay"])
    enc = module.encoder
    for j, block in enumerate(enc.blocks):
        assert scale_of[id(block.attn.qkv.weight)] == (0.5 ** (depth - j), cfg.optim.weight_decay)
        assert scale_of[id(block.attn.qkv.bias)] == (0.5 ** (depth - j), 0.0)
    assert scale_of[id(enc.norm.weight)] == (1.0, 0.0)
    head_scale = cfg.maect.tune_head_base_lr / cfg.optim.base_lr
    w = module.projector[0].weight
    assert scale_of[id(w)] == (pytest.approx(head_scale), cfg.maect.tune_head_weight_decay)
    # no frozen block: the stem trains too (the official VitBlockFreezer freezes it with block 0)
    stem_scale = 0.5 ** (depth + 1)
    assert scale_of[id(enc.patch_embed.proj.weight)] == (stem_scale, cfg.optim.weight_decay)
    assert scale_of[id(enc.patch_embed.proj.bias)] == (stem_scale, 0.0)
    assert scale_of[id(enc.cls_token)][0] == stem_scale
    assert not enc.pos_embed.requires_grad
    for p in [*module.target_projector.parameters(), *module.ema_encoder.parameters()]:
        assert id(p) not in scale_of


def test_stage3_without_frozen_blocks_trains_the_stem(maect_cfg):
    """models/vit: forward_partially_frozen keeps autograd for the embedding when no block is
    frozen; ContrastiveTuning then trains patch embedding and CLS token like the blocks."""
    cfg = maect_cfg("maect.frozen_blocks=0")
    module = ContrastiveTuning(cfg, MaskedViT(arch_from_config(cfg)))
    enc = module.encoder
    stem = {"patch": enc.patch_embed.proj.weight.clone(), "cls": enc.cls_token.clone()}
    _steps(module, 3)
    assert not torch.equal(enc.patch_embed.proj.weight, stem["patch"])
    assert not torch.equal(enc.cls_token, stem["cls"])
    assert enc.patch_embed.training and enc.blocks[0].training


def test_ema_update_math():
    online, target = NNCLRProjector(4, 8, 3), NNCLRProjector(4, 8, 3)
    online(torch.randn(5, 4))  # moves BatchNorm statistics
    pairs = zip(target.parameters(), online.parameters(), strict=True)
    expected = [0.9 * t + 0.1 * o for t, o in pairs]
    ema_update(target, online, 0.9)
    for got, want in zip(target.parameters(), expected, strict=True):
        torch.testing.assert_close(got, want)
    for t, o in zip(target.buffers(), online.buffers(), strict=True):
        assert torch.equal(t, o)


def test_tune_end_to_end_and_exact_resume(maect_cfg, tmp_path):
    cfg = maect_cfg("trainer.epochs=2", "trainer.checkpoint_every=1")
    run = tmp_path / "maect"
    tune(cfg, run)
    for name in (
        "config.yaml",
        "encoder.pt",
        "head/head.pt",
        "head/metrics.csv",
        "tune/checkpoints/epoch0001.ckpt",
        "tune/checkpoints/last.ckpt",
    ):
        assert (run / name).is_file(), name
    finished = torch.load(run / "tune/checkpoints/last.ckpt", weights_only=True)["state_dict"]
    assert any(k.startswith("target_projector.") for k in finished)
    assert any(k.startswith("ema_encoder.") for k in finished)

    (run / "encoder.pt").unlink()
    shutil.copy(run / "tune/checkpoints/epoch0001.ckpt", run / "tune/checkpoints/last.ckpt")
    tune(cfg, run)
    resumed = torch.load(run / "tune/checkpoints/last.ckpt", weights_only=True)["state_dict"]
    assert resumed.keys() == finished.keys()
    for key in finished:
        torch.testing.assert_close(resumed[key], finished[key], rtol=0, atol=0, msg=key)


def test_queue_size_must_divide_global_batch(maect_cfg, tmp_path):
    cfg = maect_cfg("maect.queue_size=60")
    with pytest.raises(ConfigError, match="queue_size=60 is not a multiple of the global batch 16"):
        tune(cfg, tmp_path / "bad")


def test_init_of_another_architecture_is_refused(maect_cfg, tmp_path):
    cfg = maect_cfg()
    other = load_config(
        "maect/fmnist_vit_t",
        [*MAECT_TINY, "model.embed_dim=64", "model.num_heads=2", f"maect.init={cfg.maect.init}"],
    )
    with pytest.raises(CheckpointError, match="embed_dim: 32 \\(checkpoint\\) vs 64"):
        tune(other, tmp_path / "other")
    with pytest.raises(ConfigError, match="maect.init is empty"):
        tune(load_config("maect/fmnist_vit_t", MAECT_TINY), tmp_path / "noinit")


def test_each_stage_uses_its_own_temperature(maect_cfg, monkeypatch):
    """Stage 2 trains at maect.head_temperature (0.15 in every official stage-2 yaml), stage 3 at
    maect.temperature."""
    import maect.methods.maect as maect_module

    seen = []
    real = maect_module.nnclr_loss

    def spy(*args, **kwargs):
        seen.append(args[4])
        return real(*args, **kwargs)

    monkeypatch.setattr(maect_module, "nnclr_loss", spy)
    cfg = maect_cfg("maect.temperature=0.3", "maect.head_temperature=0.15")
    NNCLRHeadTraining(cfg, MaskedViT(arch_from_config(cfg))).compute_losses(_batch())
    ContrastiveTuning(cfg, MaskedViT(arch_from_config(cfg))).compute_losses(_batch())
    assert seen == [0.15, 0.3]


def test_head_with_legacy_predictor_bias_is_refused(maect_cfg):
    """Heads written before the predictor lost its last-layer bias cannot be loaded: as head.pt
    (stage 3's start) nor as a checkpoint to resume."""
    cfg = maect_cfg()
    head = NNCLRHeadTraining(cfg, MaskedViT(arch_from_config(cfg)))
    state = head.head_state()
    ContrastiveTuning(cfg, MaskedViT(arch_from_config(cfg)), state)  # the current format loads
    state["predictor"]["3.bias"] = torch.zeros(cfg.maect.proj_dim)
    with pytest.raises(CheckpointError, match="head/head.pt holds an NNCLR predictor whose last"):
        ContrastiveTuning(cfg, MaskedViT(arch_from_config(cfg)), state)
    checkpoint = {"state_dict": {**head.state_dict(), "predictor.3.bias": torch.zeros(16)}}
    with pytest.raises(CheckpointError, match="checkpoint to resume from holds an NNCLR predictor"):
        head.on_load_checkpoint(checkpoint)
    head.on_load_checkpoint({"state_dict": head.state_dict()})


def test_run_directory_of_an_older_maect_is_refused(maect_cfg, tmp_path):
    """An older run's config.yaml has no maect.head_temperature (its stage 2 used stage 3's τ and
    a predictor with a bias): re-running it is refused naming the key, before anything loads."""
    import yaml

    cfg = maect_cfg()
    old = cfg.to_dict()
    del old["maect"]["head_temperature"]
    run = tmp_path / "old"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(old))
    with pytest.raises(ConfigError, match="another config.*maect.head_temperature"):
        tune(cfg, run)


def test_resume_from_checkpoint_with_legacy_predictor_bias_is_refused(maect_cfg, tmp_path):
    cfg = maect_cfg()
    run = tmp_path / "maect"
    tune(cfg, run)
    (run / "encoder.pt").unlink()
    last = run / "tune/checkpoints/last.ckpt"
    ckpt = torch.load(last, weights_only=False)
    ckpt["state_dict"]["predictor.3.bias"] = torch.zeros(cfg.maect.proj_dim)
    torch.save(ckpt, last)
    with pytest.raises(CheckpointError, match="checkpoint to resume from holds an NNCLR predictor"):
        tune(cfg, run)


def test_foreign_init_takes_model_num_heads(maect_cfg, tmp_path):
    """init= a timm state dict (no recorded head count, width 32 not in the standard table):
    the recipe's model.num_heads builds it; a saved encoder's head count must agree with it."""
    cfg = maect_cfg()
    ref = MaskedViT(arch_from_config(cfg))
    torch.save({"model": ref.state_dict()}, tmp_path / "foreign.pth")
    foreign = load_config("maect/fmnist_vit_t", [*MAECT_TINY, f"maect.init={tmp_path}/foreign.pth"])
    assert load_init_encoder(foreign).arch.num_heads == foreign.model.num_heads == 2
    four = load_config(
        "maect/fmnist_vit_t", [*MAECT_TINY, "model.num_heads=4", f"maect.init={cfg.maect.init}"]
    )
    with pytest.raises(CheckpointError, match="records 2 attention heads, but model.num_heads=4"):
        load_init_encoder(four)
