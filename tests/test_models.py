"""Masking, patchify, position embeddings, encoder equivalence with timm, decoder."""

import pytest
import timm
import torch

from maect.losses.reconstruction import masked_mse
from maect.models.decoder import MAEDecoder
from maect.models.masking import num_visible, random_masking
from maect.models.patches import patchify, unpatchify
from maect.models.pos_embed import sincos_2d
from maect.models.vit import MaskedViT


@pytest.mark.parametrize("ratio,length", [(0.75, 49), (0.5, 196), (0.9, 16), (0.3, 10)])
def test_masking_keeps_exact_count(ratio, length):
    tokens = torch.randn(8, length, 6)
    out = random_masking(tokens, ratio)
    keep = round(length * (1 - ratio))
    assert out.visible.shape == (8, keep, 6)
    assert out.ids_keep.shape == (8, keep)
    assert (out.mask.sum(dim=1) == length - keep).all()
    assert num_visible(length, ratio) == keep


def test_masking_differs_per_sample_and_restores_order():
    tokens = torch.arange(49.0).view(1, 49, 1).repeat(16, 1, 3)
    out = random_masking(tokens, 0.75)
    assert len({tuple(row.tolist()) for row in out.ids_keep}) > 1
    # visible tokens are the ones at ids_keep
    assert torch.equal(out.visible[..., 0], out.ids_keep.float())
    # ids_restore undoes the shuffle: mask==0 exactly at the kept positions
    for b in range(16):
        kept = set(out.ids_keep[b].tolist())
        assert {i for i in range(49) if out.mask[b, i] == 0} == kept
    full = torch.cat([out.visible, torch.zeros(16, 49 - out.visible.shape[1], 3)], dim=1)
    restored = torch.gather(full, 1, out.ids_restore.unsqueeze(-1).expand(-1, -1, 3))
    visible_positions = out.mask == 0
    assert torch.equal(restored[visible_positions], tokens[visible_positions])


def test_masking_rejects_bad_ratio():
    with pytest.raises(ValueError, match="mask_ratio"):
        random_masking(torch.randn(2, 4, 3), 1.0)


@pytest.mark.parametrize("channels,size,patch", [(1, 28, 4), (3, 32, 8), (3, 16, 16)])
def test_patchify_round_trip(channels, size, patch):
    images = torch.randn(2, channels, size, size)
    patches = patchify(images, patch)
    assert patches.shape == (2, (size // patch) ** 2, patch * patch * channels)
    assert torch.equal(unpatchify(patches, patch, channels), images)


def test_patchify_layout_matches_mae():
    # facebookresearch/mae: x.reshape(N, C, h, p, w, p) -> einsum nchpwq->nhwpqc
    images = torch.randn(2, 3, 8, 8)
    ref = images.reshape(2, 3, 2, 4, 2, 4).permute(0, 2, 4, 3, 5, 1).reshape(2, 4, 48)
    assert torch.equal(patchify(images, 4), ref)


def test_loss_only_on_masked_patches():
    pred, target = torch.randn(4, 10, 5), torch.randn(4, 10, 5)
    mask = (torch.rand(4, 10) > 0.5).float()
    mask[0, 0] = 1
    loss = masked_mse(pred, target, mask)
    changed = pred.clone()
    changed[mask == 0] += 100.0  # visible positions must not matter
    assert torch.allclose(masked_mse(changed, target, mask), loss)
    expected = ((pred - target) ** 2).mean(-1)[mask == 1].mean()
    assert torch.allclose(loss, expected)


def test_sincos_matches_numpy_reference():
    import numpy as np

    dim, grid = 16, 3

    def emb_1d(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    gw, gh = np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32))
    ref = np.concatenate([emb_1d(dim // 2, gw), emb_1d(dim // 2, gh)], axis=1)
    ref = np.concatenate([np.zeros([1, dim]), ref], axis=0)
    assert torch.allclose(sincos_2d(dim, grid)[0].double(), torch.from_numpy(ref), atol=1e-6)


def test_encoder_ratio_zero_equals_timm(tiny_arch):
    ours = MaskedViT(tiny_arch).eval()
    ref = timm.models.vision_transformer.VisionTransformer(
        img_size=28, patch_size=4, in_chans=1, num_classes=0, embed_dim=32, depth=2, num_heads=2
    ).eval()
    ref.load_state_dict(ours.state_dict())
    images = torch.randn(3, 1, 28, 28)
    tokens, masking = ours.forward_masked(images, 0.0)
    assert masking.mask.sum() == 0
    torch.testing.assert_close(tokens, ref.forward_features(images), rtol=0, atol=1e-6)
    torch.testing.assert_close(ours.forward_features(images), ref.forward_features(images))


def test_encoder_masked_tokens_equal_full_encoder_on_same_subset(tiny_arch):
    """Encoding the visible subset equals timm run on the same tokens (position embedding kept)."""
    enc = MaskedViT(tiny_arch).eval()
    images = torch.randn(2, 1, 28, 28)
    tokens, masking = enc.forward_masked(images, 0.75)
    x = enc.patch_embed(images) + enc.pos_embed[:, 1:]
    x = torch.gather(x, 1, masking.ids_keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
    x = torch.cat([(enc.cls_token + enc.pos_embed[:, :1]).expand(2, -1, -1), x], dim=1)
    torch.testing.assert_close(tokens, enc.norm(enc.blocks(x)))


def test_encoder_init_and_frozen_pos_embed(tiny_arch):
    enc = MaskedViT(tiny_arch)
    assert not enc.pos_embed.requires_grad
    assert torch.equal(enc.pos_embed, sincos_2d(32, 7))
    for block in enc.blocks:
        assert torch.all(block.attn.qkv.bias == 0)


def test_decoder_condition_reaches_only_chosen_tokens():
    dec = MAEDecoder(num_patches=16, encoder_dim=8, out_dim=4, embed_dim=8, depth=1, num_heads=2)
    dec.eval()
    tokens = torch.randn(2, 1 + 4, 8)
    masking = random_masking(torch.randn(2, 16, 8), 0.75)
    base = dec(tokens, masking.ids_restore)
    cond = torch.randn(2, 8)
    assert not torch.allclose(dec(tokens, masking.ids_restore, cond), base)
    # zero condition is a no-op
    torch.testing.assert_close(dec(tokens, masking.ids_restore, torch.zeros(2, 8)), base)
    # the no-mask-token variant differs from the all-token variant
    only_visible = dec(tokens, masking.ids_restore, cond, condition_mask_tokens=False)
    assert not torch.allclose(only_visible, dec(tokens, masking.ids_restore, cond))
