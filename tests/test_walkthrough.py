"""A new user's walkthrough: scripts/walkthrough.sh clones the repository (its committed HEAD) and
runs the README top to bottom at tiny sizes, in this environment (no PyPI install)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from maect.data.datasets import DataNotFoundError, load_fashion_mnist

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_readme_walkthrough_runs_in_a_fresh_clone(tmp_path):
    try:
        load_fashion_mnist(None, train=False, download=False)
    except DataNotFoundError:
        pytest.skip("Fashion-MNIST is not installed")
    env = {**os.environ, "MAECT_PYTHON": sys.executable, "TMPDIR": str(tmp_path)}
    env.pop("PYTHONPATH", None)  # the clone's own source, not this checkout's
    done = subprocess.run(
        [str(ROOT / "scripts" / "walkthrough.sh"), str(ROOT)],
        capture_output=True,
        text=True,
        env=env,
        timeout=3600,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "=== walkthrough OK" in done.stdout
    for step in ("maect recipes", "maect tune", "maect run", "maect report", "Python example"):
        assert f"=== {step}" in done.stdout or f"=== README's {step}" in done.stdout, step
