"""load_encoder: own runs, facebookresearch/mae, MAE-CT .th and timm state dicts; clear errors."""

import pytest
import timm
import torch

from maect.checkpoints import CheckpointError, infer_arch, load_encoder, save_encoder
from maect.models.vit import MaskedViT, ViTArch


def _timm_vit(arch: ViTArch):
    return timm.models.vision_transformer.VisionTransformer(
        img_size=arch.img_size,
        patch_size=arch.patch_size,
        in_chans=arch.in_chans,
        num_classes=0,
        embed_dim=arch.embed_dim,
        depth=arch.depth,
        num_heads=arch.num_heads,
    ).eval()


@pytest.fixture
def arch() -> ViTArch:
    # width 192 -> 3 heads is inferable from the standard table
    return ViTArch(img_size=32, patch_size=8, in_chans=3, embed_dim=192, depth=2, num_heads=3)


def _randomized(arch):
    ref = _timm_vit(arch)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return ref


def test_facebook_mae_format_gives_identical_features(arch, tmp_path):
    ref = _randomized(arch)
    state = {k: v.clone() for k, v in ref.state_dict().items()}
    state.update(
        {
            "mask_token": torch.zeros(1, 1, 16),
            "decoder_embed.weight": torch.zeros(16, 192),
            "decoder_pos_embed": torch.zeros(1, 17, 16),
            "decoder_pred.weight": torch.zeros(192, 16),
        }
    )
    torch.save({"model": state, "optimizer": {}, "epoch": 799}, tmp_path / "mae.pth")
    enc = load_encoder(tmp_path / "mae.pth")
    assert isinstance(enc, timm.models.VisionTransformer)
    assert enc.arch == arch
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(enc.forward_features(x), ref.forward_features(x), rtol=0, atol=1e-6)


def test_maect_th_format_without_cls_pos_slot(arch, tmp_path):
    ref = _randomized(arch)
    with torch.no_grad():
        ref.pos_embed[:, 0].zero_()  # MAE-CT keeps no CLS position (it is zero in MAE)
    state = {k: v.clone() for k, v in ref.state_dict().items()}
    state["pos_embed"] = state["pos_embed"][:, 1:]
    torch.save({"state_dict": state, "ctor_kwargs": {"kind": "vit"}}, tmp_path / "enc.th")
    enc = load_encoder(tmp_path / "enc.th")
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(enc.forward_features(x), ref.forward_features(x), rtol=0, atol=1e-6)


def test_timm_state_dict_and_own_export_round_trip(arch, tmp_path):
    ref = _randomized(arch)
    enc = load_encoder(ref.state_dict())
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(enc.forward_features(x), ref.forward_features(x))
    odd = ViTArch(img_size=28, patch_size=4, in_chans=1, embed_dim=64, depth=1, num_heads=8)
    save_encoder(MaskedViT(odd), tmp_path / "run" / "encoder.pt")
    assert load_encoder(tmp_path / "run").arch == odd  # run directory, saved arch (8 heads)
    payload = torch.load(tmp_path / "run" / "encoder.pt", weights_only=True)
    timm_model = _timm_vit(odd)
    timm_model.load_state_dict(payload["model"])  # timm-format keys


def test_infer_arch_from_shapes(arch):
    assert infer_arch(_timm_vit(arch).state_dict()) == arch


def test_errors_are_clear(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        load_encoder(tmp_path / "junk.pt")
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_encoder(tmp_path / "missing.pt")
    with pytest.raises(CheckpointError, match="without encoder.pt"):
        load_encoder(tmp_path)
    with pytest.raises(CheckpointError, match="not a ViT encoder"):
        load_encoder({"weight": torch.zeros(3)})
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="not a state dict"):
        load_encoder(tmp_path / "list.pt")
