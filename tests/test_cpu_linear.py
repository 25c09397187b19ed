"""nn.Linear through oneDNN on CPU (maect.models.cpu_linear, ``trainer.cpu_matmul``): outputs and
all three gradients against float64 references, the fallbacks to ``F.linear``, unchanged state
dicts, the config switch, DDP (gloo) and a training step of a method."""

from __future__ import annotations

import copy
import itertools
import logging

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from maect.config import ConfigError, load_config
from maect.methods import METHOD_CLASSES
from maect.models import cpu_linear
from maect.models.cpu_linear import (
    OneDNNLinear,
    apply_cpu_matmul,
    onednn_available,
    onednn_linear,
    route_linears,
)
from tests.conftest import TINY_OVERRIDES
from tests.gloo import init_gloo

pytestmark = pytest.mark.skipif(not onednn_available(), reason="PyTorch without oneDNN linear")
CPU = torch.device("cpu")


def _relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return ((value.double() - reference).norm() / reference.norm()).item()


def _inputs(shape: tuple[int, ...], dim: int, strided: bool) -> torch.Tensor:
    """A float64 tensor of ``shape + (dim,)``; ``strided``: its last dimension is not the
    contiguous one."""
    if strided:
        return torch.randn(dim, *shape, dtype=torch.float64).movedim(0, -1)
    return torch.randn(*shape, dim, dtype=torch.float64)


@pytest.mark.parametrize(
    ("shape", "bias", "strided"),
    list(itertools.product([(37,), (3, 4, 7)], [True, False], [False, True])),
)
@pytest.mark.parametrize(("k", "n"), [(24, 72), (72, 24)])  # both weight-gradient orders
def test_output_and_gradients_match_float64_to_float32_rounding(shape, bias, strided, k, n):
    x64 = _inputs(shape, k, strided).requires_grad_()
    w64 = torch.randn(n, k, dtype=torch.float64, requires_grad=True)
    b64 = torch.randn(n, dtype=torch.float64, requires_grad=True) if bias else None
    grad64 = _inputs(shape, n, strided)  # a non-contiguous upstream gradient too
    expected = F.linear(x64, w64, b64)
    expected.backward(grad64)

    x, w = x64.detach().float().requires_grad_(), w64.detach().float().requires_grad_()
    b = b64.detach().float().requires_grad_() if bias else None
    out = onednn_linear(x, w, b)
    out.backward(grad64.float())

    pairs = [(out, expected), (x.grad, x64.grad), (w.grad, w64.grad)]
    if bias:
        pairs.append((b.grad, b64.grad))
    for value, reference in pairs:
        assert value.shape == reference.shape and value.dtype == torch.float32
        assert _relative_error(value, reference) < 2e-6  # float32 rounding: ~1e-7


@pytest.mark.parametrize("needs", list(itertools.product([False, True], repeat=3)))
def test_gradients_only_for_what_requires_them(needs):
    shapes = [(9, 5), (4, 5), (4,)]
    x, w, b = (torch.randn(*s).requires_grad_(r) for s, r in zip(shapes, needs, strict=True))
    out = onednn_linear(x, w, b)
    assert out.requires_grad == any(needs)
    torch.testing.assert_close(out, F.linear(x, w, b))
    if any(needs):
        out.square().sum().backward()
        inputs = [t for t, r in zip((x, w, b), needs, strict=True) if r]
        expected = torch.autograd.grad(F.linear(x, w, b).square().sum(), inputs)
        assert [t.grad is not None for t in (x, w, b)] == list(needs)
        for t, e in zip(inputs, expected, strict=True):
            torch.testing.assert_close(t.grad, e)


def test_inference_and_no_grad_build_no_graph():
    x, w = torch.randn(9, 5), torch.randn(4, 5, requires_grad=True)
    for context in (torch.inference_mode(), torch.no_grad()):
        with context:
            out = onednn_linear(x, w)
        assert not out.requires_grad
        torch.testing.assert_close(out, x @ w.detach().T)


def test_falls_back_to_f_linear_where_onednn_does_not_apply(monkeypatch):
    monkeypatch.setattr(cpu_linear, "_product", lambda *a: pytest.fail("oneDNN used"))
    x, w, b = torch.randn(9, 5), torch.randn(4, 5), torch.randn(4)
    double = onednn_linear(x.double(), w.double(), b.double())
    assert torch.equal(double, F.linear(x.double(), w.double(), b.double()))
    with torch.autocast("cpu", torch.bfloat16):
        assert onednn_linear(x, w, b).dtype == torch.bfloat16  # autocast's cast, as F.linear
    with FlopCounterMode(display=False) as counter:  # dispatch modes see F.linear's ops
        onednn_linear(x, w, b)
    assert counter.get_total_flops() == 2 * 9 * 5 * 4
    for x_shape, w_shape in (((0, 5), (4, 5)), ((2, 0, 5), (4, 5)), ((9, 0), (4, 0))):
        x0 = torch.randn(*x_shape, requires_grad=True)
        w0 = torch.randn(*w_shape, requires_grad=True)
        onednn_linear(x0, w0).sum().backward()  # oneDNN has no empty products
        assert torch.equal(w0.grad, torch.zeros_like(w0))


def test_routed_module_keeps_state_dict_and_subclasses():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 3, bias=False))
    attention = nn.MultiheadAttention(6, 2)  # its out_proj is an nn.Linear subclass
    model.append(attention)
    before = copy.deepcopy(model.state_dict())
    assert route_linears(model) == 2 and route_linears(model) == 0  # idempotent
    assert type(model[0]) is OneDNNLinear and isinstance(model[2], nn.Linear)
    assert type(attention.out_proj) is not OneDNNLinear
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], v) for k, v in before.items())
    clone = copy.deepcopy(model[:3])  # EMA teachers are deep copies
    x = torch.randn(8, 5)
    torch.testing.assert_close(clone(x), model[:3](x))


def test_apply_cpu_matmul_follows_the_switch(monkeypatch, caplog):
    def layers() -> nn.Module:
        return nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))

    monkeypatch.setattr(cpu_linear, "cpu_vendor", lambda: "AuthenticAMD")
    assert apply_cpu_matmul(layers(), "auto", CPU) == 2
    assert apply_cpu_matmul(layers(), "default", CPU) == 0
    assert apply_cpu_matmul(layers(), "onednn", torch.device("cuda")) == 0
    monkeypatch.setattr(cpu_linear, "cpu_vendor", lambda: "GenuineIntel")
    assert apply_cpu_matmul(layers(), "auto", CPU) == 0  # MKL has its AVX-512 path on Intel
    assert apply_cpu_matmul(layers(), "onednn", CPU) == 2
    monkeypatch.setattr(cpu_linear, "onednn_available", lambda: False)
    with caplog.at_level(logging.WARNING):
        assert apply_cpu_matmul(layers(), "onednn", CPU) == 0
    assert "no oneDNN linear op" in caplog.text


def test_config_rejects_unknown_cpu_matmul(tiny_cfg):
    assert tiny_cfg().trainer.cpu_matmul == "auto"
    with pytest.raises(ConfigError, match="trainer.cpu_matmul.*auto, onednn, default"):
        tiny_cfg("trainer.cpu_matmul=mkl")


@pytest.mark.parametrize("method", ["mae", "can"])
def test_method_step_matches_mkl_to_float32_rounding(method, monkeypatch):
    """A full forward + backward of a method: the same loss and gradients (up to float32
    rounding) with its linear layers in oneDNN (all three products of every layer), and the
    oneDNN step is repeatable bit for bit."""
    torch.manual_seed(0)
    plain = METHOD_CLASSES[method](load_config(f"{method}/fmnist_vit_t", TINY_OVERRIDES))
    routed = copy.deepcopy(plain)
    layers = route_linears(routed)
    assert layers > 0
    products = []
    product = cpu_linear._product
    monkeypatch.setattr(cpu_linear, "_product", lambda *a: products.append(a) or product(*a))
    images = torch.randn(2, 8, 1, 28, 28)
    views = list(images) if method == "can" else images[0]
    batch = {"image": views, "label": torch.zeros(8), "index": torch.arange(8)}

    def step(module: nn.Module) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        module.zero_grad(set_to_none=True)
        torch.manual_seed(1)
        loss = module.compute_losses(batch)["loss"]
        loss.backward()
        grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
        return loss.detach(), grads

    loss, grads = step(plain)
    assert not products
    routed_loss, routed_grads = step(routed)
    assert 3 * layers - 1 <= len(products) <= 3 * layers  # CAN: noise MLP input needs no grad
    again_loss, again_grads = step(routed)
    torch.testing.assert_close(routed_loss, loss, rtol=1e-5, atol=1e-6)
    assert routed_grads.keys() == grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(routed_grads[name], grad, rtol=1e-3, atol=1e-5, msg=name)
        assert torch.equal(again_grads[name], routed_grads[name]), name
    assert torch.equal(again_loss, routed_loss)


def _ddp_worker(rank: int, init_file: str, out: str) -> None:
    init_gloo(rank, init_file, 2)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.GELU(), nn.Linear(16, 3))
    route_linears(model)
    ddp = nn.parallel.DistributedDataParallel(model)
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(10))  # same on both ranks
    ddp(x[rank * 4 : (rank + 1) * 4]).square().mean().backward()
    if rank == 0:
        torch.save({n: p.grad for n, p in model.named_parameters()}, out)
    dist.destroy_process_group()


def test_ddp_gloo_averages_onednn_gradients(tmp_path):
    out = tmp_path / "grads.pt"
    mp.spawn(_ddp_worker, args=(str(tmp_path / "init"), str(out)), nprocs=2, join=True)
    grads = torch.load(out, weights_only=True)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.GELU(), nn.Linear(16, 3)).double()
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(10)).double()
    model(x).square().mean().backward()  # the mean over both ranks' halves
    for name, p in model.named_parameters():
        assert _relative_error(grads[name], p.grad) < 1e-6, name


@pytest.mark.parametrize("choice", ["onednn", "default"])
def test_fit_module_applies_the_switch_and_keeps_the_state_dict(tiny_cfg, tmp_path, choice):
    from maect.engine import fit_module, training_dataset

    cfg = tiny_cfg(f"trainer.cpu_matmul={choice}", "trainer.monitor_every=0")
    module = METHOD_CLASSES["mae"](cfg)
    keys = list(module.state_dict())
    dataset = training_dataset(cfg)
    dataset.transform = module.train_transform()
    fit_module(cfg, module, dataset, tmp_path, [], dev_run=1)
    routed = [m for m in module.modules() if type(m) is OneDNNLinear]
    assert bool(routed) == (choice == "onednn")
    assert list(module.state_dict()) == keys


def test_feature_extraction_routes_for_the_pass_only(monkeypatch):
    """Evaluation encodes through oneDNN where training would (AMD) and gives the encoder its
    plain linear layers back; the features agree with MKL's to float32 rounding."""
    from maect.data.datasets import make_synthetic
    from maect.data.transforms import eval_transform
    from maect.evaluation import features as features_module
    from maect.models.vit import ViTArch, build_encoder

    encoder = build_encoder(ViTArch(img_size=28, patch_size=7, in_chans=1, embed_dim=32,
                                    depth=2, num_heads=2, mlp_ratio=2.0))  # fmt: skip
    data = make_synthetic(64, train=False, num_classes=4)
    data.transform = eval_transform(28, 1, (0.5,), (0.25,))
    monkeypatch.setattr(cpu_linear, "cpu_vendor", lambda: "AuthenticAMD")
    routed_during = []
    original = features_module.encode_layers

    def spy(enc, *args, **kwargs):
        routed_during.append(type(enc.blocks[0].mlp.fc1) is cpu_linear.OneDNNLinear)
        return original(enc, *args, **kwargs)

    monkeypatch.setattr(features_module, "encode_layers", spy)
    fast, _ = features_module.extract_features(encoder, data, device="cpu", progress=False)
    assert routed_during and all(routed_during) == cpu_linear.onednn_available()
    assert all(type(m) is not cpu_linear.OneDNNLinear for m in encoder.modules())
    monkeypatch.setattr(cpu_linear, "cpu_vendor", lambda: "GenuineIntel")
    plain, _ = features_module.extract_features(encoder, data, device="cpu", progress=False)
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-5)
