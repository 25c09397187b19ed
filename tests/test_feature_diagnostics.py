"""scripts/feature_diagnostics.py: neighbour purity and representation shift."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "feature_diagnostics.py"


@pytest.fixture(scope="module")
def diagnostics():
    spec = importlib.util.spec_from_file_location("feature_diagnostics", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_neighbour_purity_matches_bruteforce(diagnostics):
    gen = torch.Generator().manual_seed(0)
    train_x, test_x = torch.randn(200, 8, generator=gen), torch.randn(50, 8, generator=gen)
    train_y, test_y = (
        torch.randint(3, (200,), generator=gen),
        torch.randint(3, (50,), generator=gen),
    )
    bank = train_x.numpy() / np.linalg.norm(train_x.numpy(), axis=1, keepdims=True)
    hits = 0
    for q, label in zip(test_x.numpy(), test_y.numpy(), strict=True):
        nearest = np.argsort(-(bank @ (q / np.linalg.norm(q))))[:5]
        hits += int((train_y.numpy()[nearest] == label).sum())
    expected = 100.0 * hits / (50 * 5)
    purity = diagnostics.neighbour_purity(train_x, train_y, test_x, test_y, (1, 5))
    assert purity[5] == pytest.approx(expected)
    nearest = np.argmax(
        bank @ (test_x.numpy() / np.linalg.norm(test_x.numpy(), axis=1)[:, None]).T, 0
    )
    assert purity[1] == pytest.approx(100.0 * np.mean(train_y.numpy()[nearest] == test_y.numpy()))


def test_moved_is_one_for_a_rotation_and_lower_for_other_features(diagnostics):
    gen = torch.Generator().manual_seed(1)
    train, test = torch.randn(500, 16, generator=gen), torch.randn(100, 16, generator=gen)
    rotation, _ = torch.linalg.qr(torch.randn(16, 16, generator=gen))
    assert diagnostics.moved(train, test, train @ rotation, test @ rotation) == pytest.approx(1.0)
    other_train, other_test = (
        torch.randn(500, 16, generator=gen),
        torch.randn(100, 16, generator=gen),
    )
    assert diagnostics.moved(train, test, other_train, other_test) < 0.5
