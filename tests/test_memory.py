"""Memory knobs for large ViTs: activation checkpointing on every forward path, and the
out-of-memory error that names the batch size and the knobs instead of a CUDA traceback."""

from __future__ import annotations

import pytest
import torch

from maect.checkpoints import load_encoder
from maect.config import ConfigError, load_config
from maect.engine import pretrain
from maect.faults import DeviceMemoryError
from maect.methods.mae import MAE, build_autoencoder
from maect.models.vit import MaskedViT, ViTArch, set_grad_checkpointing
from tests.conftest import TINY_OVERRIDES

ARCH = ViTArch(img_size=16, patch_size=4, in_chans=3, embed_dim=32, depth=4, num_heads=2)


def _counted(blocks) -> list[int]:
    """Forward calls per block (a checkpointed block runs forward again in the backward pass;
    counted on entry, as the recomputation stops once it has what the backward pass needs)."""
    calls = [0] * len(blocks)
    for i, block in enumerate(blocks):
        block.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    return calls


PATHS = {
    "forward_masked": lambda m, x: m.forward_masked(x, 0.5, torch.Generator().manual_seed(0))[0],
    "forward_features": lambda m, x: m.forward_features(x),
    "forward_partially_frozen": lambda m, x: m.forward_partially_frozen(x, 1),
}


@pytest.mark.parametrize("path", list(PATHS))
def test_checkpointed_encoder_paths_recompute_and_match(path):
    torch.manual_seed(0)
    images = torch.randn(3, 3, 16, 16)
    results = {}
    for checkpointed in (False, True):
        torch.manual_seed(1)
        encoder = MaskedViT(ARCH)
        set_grad_checkpointing(encoder.modules(), checkpointed)
        calls = _counted(encoder.blocks)
        out = PATHS[path](encoder, images)
        out.square().mean().backward()
        grads = {n: p.grad.clone() for n, p in encoder.named_parameters() if p.grad is not None}
        results[checkpointed] = (out.detach(), grads, calls)
    (out0, grads0, calls0), (out1, grads1, calls1) = results[False], results[True]
    assert torch.equal(out0, out1) and grads0.keys() == grads1.keys() and grads0
    for name, grad in grads0.items():
        torch.testing.assert_close(grads1[name], grad, rtol=1e-6, atol=1e-7, msg=name)
    assert calls0 == [1, 1, 1, 1]
    # trained blocks run twice; the frozen block of forward_partially_frozen once (no autograd)
    assert calls1 == ([1, 2, 2, 2] if path == "forward_partially_frozen" else [2, 2, 2, 2])
    with torch.no_grad():  # nothing to recompute without autograd
        calls1[:] = [0] * 4
        PATHS[path](encoder, images)
    assert calls1 == [1, 1, 1, 1]


def test_checkpointed_decoder_recomputes_and_matches():
    cfg = load_config("mae/fmnist_vit_t", [*TINY_OVERRIDES, "model.decoder_depth=2"])
    images = torch.randn(4, 1, 28, 28)
    outputs = []
    for checkpointed in (False, True):
        torch.manual_seed(0)
        module = MAE(cfg)
        autoencoder = build_autoencoder(cfg, module.encoder, True)
        assert set_grad_checkpointing(autoencoder.modules(), checkpointed) == 2
        calls = _counted(autoencoder.decoder.blocks)
        out = autoencoder(images, 0.75, generator=torch.Generator().manual_seed(0))
        autoencoder.reconstruction_loss(out, images).backward()
        outputs.append((out.pred.detach(), autoencoder.decoder.embed.weight.grad.clone(), calls))
    assert torch.equal(outputs[0][0], outputs[1][0])
    torch.testing.assert_close(outputs[1][1], outputs[0][1], rtol=1e-6, atol=1e-7)
    assert outputs[0][2] == [1, 1] and outputs[1][2] == [2, 2]


def test_grad_checkpointing_trains_the_same_weights_and_resumes_across_the_switch(
    tiny_cfg, tmp_path
):
    runs = {}
    for flag in ("false", "true"):
        cfg = tiny_cfg("trainer.epochs=1", f"model.grad_checkpointing={flag}")
        runs[flag] = load_encoder(pretrain(cfg, tmp_path / flag)).state_dict()
    for key, value in runs["false"].items():
        torch.testing.assert_close(runs["true"][key], value, rtol=1e-5, atol=1e-6, msg=key)
    # a run may resume with the switch changed (it changes memory, not weights)
    (tmp_path / "true" / "encoder.pt").unlink()
    pretrain(tiny_cfg("trainer.epochs=1", "model.grad_checkpointing=false"), tmp_path / "true")


def test_out_of_memory_is_one_line_naming_batch_and_knobs(tiny_cfg, tmp_path, monkeypatch):
    def oom(self, batch):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 ...")

    monkeypatch.setattr(MAE, "compute_losses", oom)
    with pytest.raises(DeviceMemoryError) as err:
        pretrain(tiny_cfg("trainer.epochs=1"), tmp_path / "run")
    message = str(err.value)
    assert "\n" not in message and isinstance(err.value, ConfigError)
    assert "data.batch_size=16" in message and "Tried to allocate 2.00 GiB" in message
    for knob in (
        "trainer.accumulate_grad_batches",
        "model.grad_checkpointing=true",
        "trainer.strategy=fsdp",
        "trainer.precision",
    ):
        assert knob in message, knob
