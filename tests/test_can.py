"""CAN: masking and noise per view, loss targets, InfoNCE vs lightly, gradients and optimizer
coverage, the MAE and SimCLR special cases, smoke runs, and the gathered loss on two gloo ranks."""

import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from lightly.loss import NTXentLoss

from maect.config import ConfigError, RunConfig, load_config
from maect.engine import pretrain
from maect.losses import info_nce, masked_mse, noise_prediction_mse, pixel_targets
from maect.methods import METHOD_CLASSES
from maect.methods.can import CAN, CANOutput
from maect.methods.mae import MAE
from maect.models.masking import num_visible
from maect.models.noise import NoiseLevelEmbedding, sinusoidal_embedding
from maect.models.patches import patchify
from tests.conftest import TINY_OVERRIDES
from tests.gloo import init_gloo

PATCH = 4  # tiny config: 28x28 images, 4x4 patches
NUM_PATCHES = 49


def can_cfg(*overrides: str, recipe: str = "can/fmnist_vit_t") -> RunConfig:
    return load_config(recipe, [*TINY_OVERRIDES, *overrides])


def two_views(batch: int = 8, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return list(torch.randn(2, batch, 1, 28, 28, generator=generator))


def batch_of(views: list[torch.Tensor]) -> dict:
    return {"image": views, "label": torch.zeros(len(views[0]), dtype=torch.long)}


class Recorder:
    """Records CAN's forward output, the encoder's input and the projector's input and output."""

    def __init__(self, module: CAN) -> None:
        self.out: CANOutput | None = None
        self.encoder_input: torch.Tensor | None = None
        self.pooled: torch.Tensor | None = None
        self.embeddings: torch.Tensor | None = None
        module.register_forward_hook(self._forward)
        module.encoder.patch_embed.register_forward_pre_hook(self._encoder)
        if module.projector is not None:
            module.projector.register_forward_hook(self._projector)

    def _forward(self, module, args, out) -> None:
        self.out = out

    def _encoder(self, module, args) -> None:
        self.encoder_input = args[0].detach().clone()

    def _projector(self, module, args, out) -> None:
        self.pooled, self.embeddings = args[0].detach(), out.detach()


# ----------------------------------------------------------------------------- pure pieces


def test_noise_prediction_mse_counts_visible_patches_only() -> None:
    pred, target = torch.randn(2, 2, 5, 6)
    mask = torch.tensor([[1.0, 0.0, 0.0, 1.0, 0.0], [0.0, 1.0, 1.0, 1.0, 0.0]])
    per_patch = (pred - target).pow(2).mean(-1)
    expected = per_patch[mask == 0].mean()
    torch.testing.assert_close(noise_prediction_mse(pred, target, mask), expected)
    changed = pred.clone()
    changed[mask == 1] += 10.0  # masked positions are not scored
    torch.testing.assert_close(noise_prediction_mse(changed, target, mask), expected)


def test_sinusoidal_embedding_values() -> None:
    values = torch.tensor([0.0, 1.0, 250.0])
    emb = sinusoidal_embedding(values, 8)
    omega = 10000.0 ** (-torch.arange(4) / 4)
    expected = torch.cat(
        [torch.sin(values[:, None] * omega), torch.cos(values[:, None] * omega)], 1
    )
    torch.testing.assert_close(emb, expected)
    assert emb.shape == (3, 8) and emb.dtype == torch.float32


def test_noise_level_embedding_separates_levels_within_range() -> None:
    embed = NoiseLevelEmbedding(16, sigma_max=0.05, scale=1000.0)
    sigma = torch.tensor([0.0, 0.01, 0.02, 0.05])
    out = embed(sigma)
    assert out.shape == (4, 16) and torch.isfinite(out).all()
    # rescaling by 1000 / sigma_max makes nearby levels distinguishable (raw sigma would not)
    raw = sinusoidal_embedding(sigma, 16)
    scaled = sinusoidal_embedding(sigma / 0.05 * 1000.0, 16)
    assert (raw[1] - raw[0]).abs().max() < 0.011
    assert (scaled[1] - scaled[0]).abs().max() > 0.5
    with pytest.raises(ValueError, match="sigma_max"):
        NoiseLevelEmbedding(16, sigma_max=0.0)


# ----------------------------------------------------------------------------- configuration


def test_modules_built_only_for_weighted_terms() -> None:
    full = CAN(can_cfg())
    assert full.projector is not None and full.autoencoder is not None
    assert full.noise_embed is not None
    simclr = CAN(can_cfg(recipe="simclr/fmnist_vit_t"))
    assert simclr.projector is not None
    assert simclr.autoencoder is None and simclr.noise_embed is None
    no_contrast = CAN(can_cfg("can.weight_contrastive=0"))
    assert no_contrast.projector is None
    noiseless = CAN(can_cfg("can.weight_denoising=0", "can.noise_std_max=0"))
    assert noiseless.noise_embed is None and noiseless.autoencoder is not None
    assert METHOD_CLASSES["can"] is CAN


def test_simclr_recipe_is_can_without_masking_noise_and_decoder_terms() -> None:
    simclr = load_config("simclr/in1k_vit_b16").to_dict()
    can = load_config(
        "can/in1k_vit_b16",
        [
            "can.mask_ratio=0",
            "can.noise_std_max=0",
            "can.weight_contrastive=1",
            "can.weight_reconstruction=0",
            "can.weight_denoising=0",
        ],
    ).to_dict()
    simclr.pop("recipe"), can.pop("recipe")
    assert simclr == can


@pytest.mark.parametrize("size", ["b16", "l16"])
def test_in1k_recipes_follow_the_paper(size: str) -> None:
    cfg = load_config(f"can/in1k_vit_{size}")
    c = cfg.can
    assert (c.mask_ratio, c.temperature) == (0.5, 0.1)
    assert (c.weight_contrastive, c.weight_reconstruction, c.weight_denoising) == (0.03, 0.67, 0.3)
    assert (cfg.model.decoder_dim, cfg.model.decoder_depth) == (512, 8)
    assert (cfg.trainer.epochs, cfg.optim.warmup_epochs) == (800, 40)
    assert cfg.model.embed_dim == {"b16": 768, "l16": 1024}[size]
    # peak lr at global batch 4096 = 2.5e-4 * 4096 / 256
    assert math.isclose(cfg.optim.base_lr * 4096 / 256, 4e-3)


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["can.mask_ratio=0"], "can.mask_ratio"),
        (["can.noise_std_max=0"], "can.noise_std_max"),
        (["can.projector=mlp9"], "can.projector"),
        (["can.noise_embed_scale=0"], "can.noise_embed_scale"),
    ],
)
def test_invalid_can_settings_name_the_key(overrides: list[str], key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        can_cfg(*overrides)


@pytest.mark.parametrize("condition_mask_tokens", [True, False])
def test_decoder_is_conditioned_on_the_noise_level_embedding(condition_mask_tokens: bool) -> None:
    module = CAN(can_cfg(f"can.condition_mask_tokens={str(condition_mask_tokens).lower()}"))
    record = Recorder(module)
    calls = []
    module.autoencoder.decoder.register_forward_pre_hook(lambda m, args: calls.append(args))
    module.compute_losses(batch_of(two_views()))
    (_, _, condition, flag), *rest = calls
    assert not rest  # one decoder pass for both views
    assert flag is condition_mask_tokens
    torch.testing.assert_close(condition, module.noise_embed(record.out.sigma))
    assert condition.shape == (16, 16)  # [2B, decoder width]


# ----------------------------------------------------------------------------- masking and noise


def test_each_view_masked_at_ratio_independently() -> None:
    module = CAN(can_cfg())
    record = Recorder(module)
    batch = 32
    module.compute_losses(batch_of(two_views(batch)))
    mask = record.out.mask
    assert mask.shape == (2 * batch, NUM_PATCHES)
    expected_masked = NUM_PATCHES - num_visible(NUM_PATCHES, 0.5)
    assert (mask.sum(dim=1) == expected_masked).all()
    assert record.out.tokens.shape[1] == 1 + NUM_PATCHES - expected_masked
    mask0, mask1 = mask.chunk(2)
    assert not (mask0 == mask1).all(dim=1).any()
    agreement = (mask0 == mask1).float().mean().item()
    assert 0.4 < agreement < 0.6  # ~0.5 for independent masks, 1 for shared ones


def test_noise_changes_encoder_input_only_not_the_target() -> None:
    module = CAN(can_cfg("can.noise_std_max=0.5"))
    record = Recorder(module)
    views = two_views(16)
    originals = [v.clone() for v in views]
    losses = module.compute_losses(batch_of(views))
    for view, original in zip(views, originals, strict=True):
        assert torch.equal(view, original)  # noise added out of place

    clean = torch.cat(originals)
    out, seen = record.out, record.encoder_input
    sigma = out.sigma
    assert ((sigma > 0) & (sigma <= 0.5)).all() and sigma.unique().numel() == len(sigma)
    torch.testing.assert_close(seen, clean + sigma.view(-1, 1, 1, 1) * out.noise)
    added_std = (seen - clean).flatten(1).std(dim=1)
    assert ((added_std / sigma - 1).abs() < 0.15).all()  # per-image noise of std sigma

    pred = out.decoded.pred
    clean_target = pixel_targets(patchify(clean, PATCH), normalize=True)
    noisy_target = pixel_targets(patchify(seen, PATCH), normalize=True)
    torch.testing.assert_close(losses["reconstruction"], masked_mse(pred, clean_target, out.mask))
    assert not torch.isclose(losses["reconstruction"], masked_mse(pred, noisy_target, out.mask))


def test_denoising_target_is_added_unit_noise_at_visible_patches() -> None:
    module = CAN(can_cfg("can.noise_std_max=0.5"))
    record = Recorder(module)
    views = two_views(16, seed=1)
    losses = module.compute_losses(batch_of(views))
    out = record.out
    sigma = out.sigma.view(-1, 1, 1, 1)
    unit_noise = patchify((record.encoder_input - torch.cat(views)) / sigma, PATCH)
    per_patch = (out.decoded.pred - unit_noise).pow(2).mean(dim=-1)
    torch.testing.assert_close(losses["denoising"], per_patch[out.mask == 0].mean())
    # the unscaled sigma * eps target would give another value
    scaled = (out.decoded.pred - unit_noise * out.sigma.view(-1, 1, 1)).pow(2).mean(dim=-1)
    assert not torch.isclose(losses["denoising"], scaled[out.mask == 0].mean())


def test_zero_noise_level_is_safe(monkeypatch: pytest.MonkeyPatch) -> None:
    module = CAN(can_cfg())
    record = Recorder(module)
    draw = module.draw_noise

    def zero_sigma(images, generator=None):
        sigma, noise = draw(images, generator)
        return torch.zeros_like(sigma), noise

    monkeypatch.setattr(module, "draw_noise", zero_sigma)
    views = two_views(8, seed=2)
    losses = module.compute_losses(batch_of(views))
    assert all(torch.isfinite(v) for v in losses.values())
    assert torch.equal(record.encoder_input, torch.cat(views))
    losses["loss"].backward()
    assert all(torch.isfinite(p.grad).all() for p in module.parameters() if p.grad is not None)


# ----------------------------------------------------------------------------- losses


def test_contrastive_term_equals_lightly_ntxent_on_mean_pooled_visible_tokens() -> None:
    module = CAN(can_cfg("can.temperature=0.2"))
    record = Recorder(module)
    losses = module.compute_losses(batch_of(two_views(12, seed=3)))
    torch.testing.assert_close(record.pooled, record.out.tokens[:, 1:, :].mean(dim=1).detach())
    assert record.embeddings.shape == (24, 128)
    z0, z1 = record.embeddings.chunk(2)
    expected = NTXentLoss(temperature=0.2)(z0, z1)
    torch.testing.assert_close(losses["contrastive"], expected)


def test_total_loss_is_weighted_sum_of_logged_terms() -> None:
    module = CAN(can_cfg())
    losses = module.compute_losses(batch_of(two_views()))
    assert set(losses) == {"loss", "contrastive", "reconstruction", "denoising"}
    expected = (
        0.03 * losses["contrastive"] + 0.67 * losses["reconstruction"] + 0.30 * losses["denoising"]
    )
    torch.testing.assert_close(losses["loss"], expected)
    simclr = CAN(can_cfg(recipe="simclr/fmnist_vit_t"))
    losses = simclr.compute_losses(batch_of(two_views()))
    assert set(losses) == {"loss", "contrastive"}
    torch.testing.assert_close(losses["loss"], losses["contrastive"])


def test_rejects_a_single_view() -> None:
    module = CAN(can_cfg())
    with pytest.raises(ValueError, match="two views"):
        module.compute_losses({"image": torch.randn(4, 1, 28, 28), "label": torch.zeros(4)})


def test_without_contrast_and_noise_equals_mae() -> None:
    mae = MAE(load_config("mae/fmnist_vit_t", [*TINY_OVERRIDES, "mae.mask_ratio=0.5"]))
    can = CAN(
        can_cfg(
            "can.weight_contrastive=0",
            "can.weight_denoising=0",
            "can.weight_reconstruction=1",
            "can.noise_std_max=0",
            "can.condition_mask_tokens=false",
        )
    )
    can.load_state_dict(mae.state_dict())  # strict: the same modules, nothing extra
    views = two_views(8, seed=4)
    torch.manual_seed(11)
    expected = mae.compute_losses({"image": torch.cat(views)})["loss"]
    torch.manual_seed(11)
    losses = can.compute_losses(batch_of(views))
    assert set(losses) == {"loss", "reconstruction"}
    torch.testing.assert_close(losses["loss"], expected, rtol=0, atol=0)


# ----------------------------------------------------------------------------- training plumbing


@pytest.mark.parametrize(
    ("recipe", "overrides"),
    [
        ("can/fmnist_vit_t", ()),
        ("can/fmnist_vit_t", ("can.projector=mlp3bn", "can.proj_hidden_dim=64")),
        ("simclr/fmnist_vit_t", ()),
    ],
    ids=["can", "can-mlp3bn", "simclr"],
)
def test_every_trainable_parameter_gets_a_gradient_and_an_optimizer_slot(
    recipe: str, overrides: tuple[str, ...]
) -> None:
    module = CAN(can_cfg(*overrides, recipe=recipe))
    module.compute_losses(batch_of(two_views()))["loss"].backward()
    trainable = dict((n, p) for n, p in module.named_parameters() if p.requires_grad)
    without = [n for n, p in trainable.items() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not without

    groups = module.param_groups()
    in_optimizer = [id(p) for g in groups for p in g["params"]]
    assert sorted(in_optimizer) == sorted(id(p) for p in trainable.values())
    no_decay = {id(p) for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    for name, param in trainable.items():
        expect_no_decay = param.ndim <= 1  # tokens decayed, as timm's add_weight_decay
        assert (id(param) in no_decay) == expect_no_decay, name
    names = set(trainable)
    assert any(n.startswith("projector.") for n in names)
    if recipe.startswith("can"):
        assert any(n.startswith("noise_embed.") for n in names)
        assert any(n.startswith("autoencoder.decoder.") for n in names)


@pytest.mark.parametrize("recipe", ["can/fmnist_vit_t", "simclr/fmnist_vit_t"])
def test_pretrain_dev_run(recipe: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict = {}
    configure = CAN.configure_optimizers

    def spy(self: CAN):
        result = configure(self)
        seen["module"], seen["optimizer"] = self, result["optimizer"]
        return result

    monkeypatch.setattr(CAN, "configure_optimizers", spy)
    run = pretrain(can_cfg(recipe=recipe), tmp_path / "dev", dev_run=2)
    assert (run / "config.yaml").is_file()
    module, optimizer = seen["module"], seen["optimizer"]
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert in_optimizer == {id(p) for p in module.parameters() if p.requires_grad}
    rows = module.preview(torch.randn(4, 1, 28, 28), torch.Generator().manual_seed(0))
    assert len(rows) == (5 if recipe.startswith("can") else 1)
    assert all(r.shape == (4, 1, 28, 28) and torch.isfinite(r).all() for r in rows)


def test_preview_is_reproducible_with_a_seeded_generator() -> None:
    module = CAN(can_cfg()).eval()
    images = torch.randn(4, 1, 28, 28)
    first = module.preview(images, torch.Generator().manual_seed(5))
    second = module.preview(images, torch.Generator().manual_seed(5))
    for a, b in zip(first, second, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(first[0], images)


# ----------------------------------------------------------------------------- two gloo ranks

WORLD = 2
LOCAL_BATCH = 4


def _gloo_module() -> CAN:
    torch.manual_seed(0)
    return CAN(can_cfg(recipe="simclr/fmnist_vit_t"))


def _loss_and_grads(module: CAN, views: list[torch.Tensor]) -> tuple[torch.Tensor, list]:
    loss = module.compute_losses(batch_of(views))["contrastive"]
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in module.parameters() if p.requires_grad]


def _gloo_worker(rank: int, init_file: str, out_dir: str) -> None:
    init_gloo(rank, init_file, WORLD)
    try:
        torch.set_num_threads(1)
        local = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
        views = [v[local] for v in two_views(WORLD * LOCAL_BATCH, seed=6)]
        module = _gloo_module()
        loss, grads = _loss_and_grads(module, views)
        for grad in grads:  # what DDP does: average the parameter gradients over ranks
            dist.all_reduce(grad)
            grad /= WORLD
        with torch.no_grad():  # the same embeddings with this rank's negatives only
            out = module(torch.cat(views))
            z0, z1 = module.projector(out.tokens[:, 1:, :].mean(dim=1)).chunk(2)
            per_rank = info_nce(z0, z1, module.cfg.can.temperature, gather=False)
        torch.save({"loss": loss, "grads": grads, "per_rank": per_rank}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_gathered_infonce_two_ranks_equals_one_rank_with_double_batch(tmp_path: Path) -> None:
    mp.spawn(_gloo_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    single_loss, single_grads = _loss_and_grads(
        _gloo_module(), two_views(WORLD * LOCAL_BATCH, seed=6)
    )
    mean_loss = torch.stack([r["loss"] for r in ranks]).mean()
    torch.testing.assert_close(mean_loss, single_loss)
    per_rank_mean = torch.stack([r["per_rank"] for r in ranks]).mean()
    assert not torch.isclose(per_rank_mean, single_loss)  # local negatives alone differ
    for r in ranks:
        for got, want in zip(r["grads"], single_grads, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
