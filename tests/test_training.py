"""MAE training: loss goes down, fast_dev_run, run-directory outputs, exact resume."""

import ast
import csv
import inspect
import shutil
import textwrap

import pytest
import torch

from maect.checkpoints import load_encoder
from maect.engine import METHOD_CLASSES, pretrain
from maect.methods.base import PretrainMethod
from maect.methods.finetune import FineTuning
from maect.methods.mae import MAE
from maect.methods.maect import ContrastiveTuning, NNCLRHeadTraining
from maect.methods.refiner import RefinerHeadTraining, RefinerTuning

# PretrainMethod's Lightning hooks: an override that skips the base class's loses the guard
# checks, the epoch means or the resume state.
BASE_HOOKS = (
    "setup",
    "on_after_batch_transfer",
    "on_save_checkpoint",
    "on_load_checkpoint",
    "on_fit_start",
    "on_train_start",
    "on_train_epoch_start",
    "on_train_batch_end",
    "on_train_epoch_end",
    "on_before_optimizer_step",
    "optimizer_step",
    "train",
)
METHODS = (
    *METHOD_CLASSES.values(),
    NNCLRHeadTraining,
    ContrastiveTuning,
    RefinerHeadTraining,
    RefinerTuning,
    FineTuning,
)


def test_loss_goes_down_on_fixed_batch(tiny_cfg):
    cfg = tiny_cfg()
    module = MAE(cfg)
    images = torch.randn(16, 1, 28, 28)

    def fixed_loss() -> float:
        out = module.autoencoder(images, 0.75, generator=torch.Generator().manual_seed(0))
        return module.autoencoder.reconstruction_loss(out, images).item()

    before = fixed_loss()
    optimizer = torch.optim.AdamW(module.parameters(), lr=2e-3)
    for _ in range(40):
        loss = module.compute_losses({"image": images, "label": torch.zeros(16)})["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert fixed_loss() < 0.8 * before


def test_fast_dev_run_two_steps(tiny_cfg, tmp_path):
    pretrain(tiny_cfg(), tmp_path / "dev", dev_run=2)
    assert (tmp_path / "dev" / "config.yaml").is_file()
    assert not (tmp_path / "dev" / "encoder.pt").exists()


def test_run_directory_and_exact_resume(tiny_cfg, tmp_path):
    cfg = tiny_cfg("trainer.epochs=2", "trainer.checkpoint_every=1", "optim.warmup_epochs=1")
    run = tmp_path / "run"
    pretrain(cfg, run)
    for name in (
        "config.yaml",
        "encoder.pt",
        "metrics.csv",
        "checkpoints/last.ckpt",
        "checkpoints/epoch0001.ckpt",
        "reconstructions/epoch_0001.png",
        "reconstructions/epoch_0002.png",
    ):
        assert (run / name).is_file(), name
    with open(run / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    epoch_losses = [float(r["train/loss_epoch"]) for r in rows if r.get("train/loss_epoch")]
    assert len(epoch_losses) == 2
    finished = load_encoder(run).state_dict()

    # interrupt after epoch 1: the run has only its epoch-1 checkpoint and no encoder.pt
    (run / "encoder.pt").unlink()
    shutil.copy(run / "checkpoints" / "epoch0001.ckpt", run / "checkpoints" / "last.ckpt")
    pretrain(cfg, run)
    resumed = load_encoder(run).state_dict()
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["epoch"] == 1 and ckpt["global_step"] == 2 * (64 // 16)
    for key, value in finished.items():
        torch.testing.assert_close(resumed[key], value, rtol=0, atol=0, msg=key)


def test_rerun_with_other_config_is_refused(tiny_cfg, tmp_path):
    import pytest

    from maect.config import ConfigError

    pretrain(tiny_cfg(), tmp_path / "dev", dev_run=1)
    with pytest.raises(ConfigError, match="another config.*mae.mask_ratio"):
        pretrain(tiny_cfg("mae.mask_ratio=0.5"), tmp_path / "dev", dev_run=1)


@pytest.mark.skipif(
    shutil.which("c++") is None and shutil.which("g++") is None,
    reason="torch.compile (inductor) needs a C++ compiler on CPU",
)
def test_compiled_blocks_train_like_eager_blocks(tiny_cfg, tmp_path, monkeypatch):
    """trainer.compile=true compiles the transformer blocks in place: same state-dict keys, same
    weights after training up to float32 reassociation."""
    import torch._dynamo

    from maect import engine

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = []
    original = engine.compile_blocks
    monkeypatch.setattr(engine, "compile_blocks", lambda m: compiled.append(original(m)) or 0)
    runs = {}
    for flag in ("false", "true"):
        cfg = tiny_cfg("trainer.epochs=1", f"trainer.compile={flag}", "trainer.monitor_every=0")
        runs[flag] = load_encoder(pretrain(cfg, tmp_path / flag)).state_dict()
    assert compiled == [cfg.model.depth + cfg.model.decoder_depth]  # only the compiled run
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # dynamo really traced
    assert runs["true"].keys() == runs["false"].keys()
    for key, value in runs["false"].items():
        torch.testing.assert_close(runs["true"][key], value, rtol=1e-4, atol=1e-5, msg=key)


def test_compile_blocks_counts_encoder_and_decoder_blocks(tiny_cfg):
    from maect.engine import compile_blocks

    cfg = tiny_cfg()
    module = METHOD_CLASSES["mae"](cfg)
    expected = cfg.model.depth + cfg.model.decoder_depth
    assert compile_blocks(module) == expected


def test_mae_views_are_independent_crops_in_one_batch(tiny_cfg):
    """mae.views=2 (MAE-CT's stage 1): two independently cropped views per image, reconstructed
    as one batch of 2B, and the lr counts both (base_lr x 2 x batch / 256)."""
    cfg = tiny_cfg("mae.views=2", "data.crop_scale=[0.2,0.5]")
    module = MAE(cfg)
    assert module.lr_views == 2 and MAE(tiny_cfg()).lr_views == 1
    image = torch.randint(0, 256, (1, 28, 28), dtype=torch.uint8)
    view0, view1 = module.train_transform()(image)
    assert view0.shape == view1.shape == (1, 28, 28) and not torch.equal(view0, view1)

    views = [torch.randn(4, 1, 28, 28), torch.randn(4, 1, 28, 28)]
    torch.manual_seed(3)
    loss = module.compute_losses({"image": views, "label": torch.zeros(4)})["loss"]
    torch.manual_seed(3)
    joint = module.compute_losses({"image": torch.cat(views), "label": torch.zeros(8)})["loss"]
    assert torch.equal(loss, joint)


def test_fast_dev_run_with_two_mae_views(tiny_cfg, tmp_path):
    pretrain(tiny_cfg("mae.views=2"), tmp_path / "dev", dev_run=1)


def _calls_super(function, name: str) -> bool:
    tree = ast.parse(textwrap.dedent(inspect.getsource(function)))
    return any(
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == name
        and isinstance(node.func.value, ast.Call)
        and getattr(node.func.value.func, "id", None) == "super"
        for node in ast.walk(tree)
    )


@pytest.mark.parametrize("method", METHODS, ids=lambda c: c.__name__)
def test_hook_overrides_call_the_base_class(method):
    """Every override of a PretrainMethod hook in a method (or a class between it and the base)
    calls ``super()``'s: e.g. fine-tuning's epoch end must keep the guard and the epoch means."""
    assert issubclass(method, PretrainMethod)
    for cls in method.__mro__[: method.__mro__.index(PretrainMethod)]:
        for name in BASE_HOOKS:
            if name in vars(cls):
                assert _calls_super(vars(cls)[name], name), f"{cls.__name__}.{name}"
