"""load_encoder: own runs, facebookresearch/mae, MAE-CT .th and timm state dicts; clear errors."""

import argparse
import re

import pytest
import timm
import torch
from safetensors.torch import save_file

from maect.checkpoints import (
    HEADS_BY_WIDTH,
    CheckpointError,
    infer_arch,
    load_encoder,
    save_encoder,
)
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
    with pytest.raises(CheckpointError, match="not a readable checkpoint: a text file"):
        load_encoder(tmp_path / "junk.pt")
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_encoder(tmp_path / "missing.pt")
    (tmp_path / "tb").mkdir()
    with pytest.raises(CheckpointError, match=r"without encoder.pt .* \(it holds junk.pt, tb/;"):
        load_encoder(tmp_path)
    with pytest.raises(CheckpointError, match="not a ViT encoder"):
        load_encoder({"weight": torch.zeros(3)})
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="not a state dict"):
        load_encoder(tmp_path / "list.pt")


def test_head_count_is_never_guessed(tmp_path):
    """A 96-wide 3-head ViT: width 96 is not a standard width, so loading without the head count
    is an error naming model.num_heads (it was silently loaded with 96 // 64 = 1 head)."""
    arch = ViTArch(img_size=16, patch_size=8, in_chans=3, embed_dim=96, depth=1, num_heads=3)
    ref = _randomized(arch)
    torch.save({"model": ref.state_dict()}, tmp_path / "vit96.pth")
    with pytest.raises(CheckpointError) as err:
        load_encoder(tmp_path / "vit96.pth")
    message = str(err.value)
    assert "vit96.pth" in message and "model.num_heads=N" in message and "\n" not in message
    enc = load_encoder(tmp_path / "vit96.pth", num_heads=3)
    assert enc.arch.num_heads == 3
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(enc.forward_features(x), ref.forward_features(x), rtol=0, atol=1e-6)
    with pytest.raises(CheckpointError, match="model.num_heads=5 does not divide the width 96"):
        load_encoder(tmp_path / "vit96.pth", num_heads=5)


def test_recorded_head_count_wins_and_must_agree(tmp_path, tiny_arch):
    """maect encoder.pt, maect Lightning checkpoints and MAE-CT .th record the head count; a
    contradicting num_heads is an error, not silently ignored or applied."""
    save_encoder(MaskedViT(tiny_arch), tmp_path / "encoder.pt")  # 32 wide: not in the table
    assert load_encoder(tmp_path / "encoder.pt").arch.num_heads == 2
    with pytest.raises(CheckpointError, match="records 2 attention heads, but model.num_heads=4"):
        load_encoder(tmp_path / "encoder.pt", num_heads=4)
    state = {f"encoder.{k}": v for k, v in MaskedViT(tiny_arch).state_dict().items()}
    hparams = {"config": {"model": {"num_heads": 2}}}
    torch.save({"state_dict": state, "hyper_parameters": hparams}, tmp_path / "last.ckpt")
    assert load_encoder(tmp_path / "last.ckpt").arch == tiny_arch
    plain = MaskedViT(tiny_arch).state_dict()
    kwargs = {"kind": "vit.masked_encoder", "attention_heads": 2}
    torch.save({"state_dict": plain, "ctor_kwargs": kwargs}, tmp_path / "enc.th")
    assert load_encoder(tmp_path / "enc.th").arch == tiny_arch


def test_standard_widths_match_timm():
    """The table agrees with timm's named models (ViT-Ti ... ViT-G/14)."""
    for name in (
        "vit_tiny_patch16_224",
        "vit_small_patch16_224",
        "vit_medium_patch16_clip_224",
        "vit_base_patch16_224",
        "vit_large_patch16_224",
        "vit_huge_patch14_224",
        "vit_giant_patch14_224",
        "vit_gigantic_patch14_224",
    ):
        with torch.device("meta"):
            model = timm.create_model(name, pretrained=False)
        width, heads = model.embed_dim, model.blocks[0].attn.num_heads
        assert HEADS_BY_WIDTH[width] == heads, name
    assert HEADS_BY_WIDTH[1280] == 16 and 1536 not in HEADS_BY_WIDTH  # 1536: 12, 16 or 24


def test_unreadable_files_say_what_they_are(tmp_path, arch):
    torch.save({"model": _randomized(arch).state_dict()}, tmp_path / "full.pth")
    data = (tmp_path / "full.pth").read_bytes()
    cases = {
        "empty.pt": (b"", "the file is empty"),
        "number.pt": (b"101\n", r"a text file \(starts with '101'\)"),
        "cut.pth": (data[: len(data) // 2], "zip archive .* truncated or corrupt"),
        "image.pt": (b"\x89PNG\r\n\x1a\n" + bytes(40), "unknown format .first bytes 89 50 4e 47"),
    }
    for name, (content, found) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(CheckpointError) as err:
            load_encoder(tmp_path / name)
        message = str(err.value)
        assert re.search(found, message), message
        assert name in message and "accepted: a maect run directory" in message
        assert "\n" not in message
    legacy = tmp_path / "legacy.pth"
    torch.save({"model": {}}, legacy, _use_new_zipfile_serialization=False)
    legacy.write_bytes(legacy.read_bytes()[:-5])
    with pytest.raises(CheckpointError, match="legacy PyTorch pickle, truncated or corrupt"):
        load_encoder(legacy)
    torch.save({"model": {}, "data_dir": tmp_path}, tmp_path / "code.pth")
    with pytest.raises(CheckpointError, match=r"refuses \(pathlib\.\w*Path\)"):
        load_encoder(tmp_path / "code.pth")


def test_training_checkpoints_with_arguments_and_safetensors(arch, tmp_path):
    """facebookresearch/mae and timm training checkpoints keep an argparse.Namespace; timm
    publishes weights as .safetensors: both load (they were 'not a readable checkpoint')."""
    ref = _randomized(arch)
    args = argparse.Namespace(model="mae_vit_base_patch16", lr=1e-3)
    torch.save({"model": ref.state_dict(), "epoch": 3, "args": args}, tmp_path / "ckpt-3.pth")
    save_file(ref.state_dict(), tmp_path / "model.safetensors")
    x = torch.randn(2, 3, 32, 32)
    for name in ("ckpt-3.pth", "model.safetensors"):
        enc = load_encoder(tmp_path / name)
        torch.testing.assert_close(enc.forward_features(x), ref.forward_features(x))
