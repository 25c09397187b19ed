"""float32 linear layers on CPU: PyTorch's default (MKL) against oneDNN, per product and shape.

For each ``[M, K] -> [M, N]`` layer of the Fashion-MNIST ViT-T (widths 192 and 128, MLP ratio 4,
qkv 3x) the script times, in GFLOP per CPU second (``time.process_time``, all threads; robust on
a shared machine), interleaved over rounds:

- ``forward``: ``F.linear`` vs ``_linear_pointwise(x, W)``;
- ``grad input``: ``g @ W`` vs ``_linear_pointwise(g, W.t())`` (a strided weight, no copy);
- ``grad weight``: ``g.t() @ x`` vs oneDNN in both orders, ``_linear_pointwise(g.t(), x.t())``
  ([N, K] out) and ``_linear_pointwise(x.t(), g.t()).t()`` ([K, N] out);
- ``layer``: forward + backward of ``F.linear`` vs ``maect.models.cpu_linear.onednn_linear``;

and the relative error of the oneDNN and MKL layer outputs and gradients against float64.

Usage::

    OMP_WAIT_POLICY=PASSIVE python benchmarks/cpu_linear.py [--tokens 832,12800] [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from _common import command_line, device_name, git_commit, load_average, step_times

from maect.models.cpu_linear import onednn_available, onednn_linear

SHAPES = ((192, 576), (192, 192), (192, 768), (768, 192), (128, 512), (512, 128), (192, 128))


def _onednn(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], "")


def products(m: int, k: int, n: int) -> dict[str, tuple[int, object]]:
    """``{label: (FLOPs, call)}`` of the compared products of one ``[m, k] -> [m, n]`` layer."""
    x, w, g = torch.randn(m, k), torch.randn(n, k), torch.randn(m, n)
    xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()

    def layer(fn):
        def run() -> None:
            xg.grad = wg.grad = None
            fn(xg, wg).backward(g)

        return run

    one = 2 * m * k * n
    return {
        "forward MKL": (one, lambda: F.linear(x, w)),
        "forward oneDNN": (one, lambda: _onednn(x, w)),
        "grad input MKL": (one, lambda: g @ w),
        "grad input oneDNN": (one, lambda: _onednn(g, w.t())),
        "grad weight MKL": (one, lambda: g.t() @ x),
        "grad weight oneDNN [N, K]": (one, lambda: _onednn(g.t(), x.t())),
        "grad weight oneDNN [K, N]": (one, lambda: _onednn(x.t(), g.t()).t()),
        "layer MKL": (3 * one, layer(F.linear)),
        "layer oneDNN": (3 * one, layer(onednn_linear)),
    }


def errors(m: int, k: int, n: int) -> dict[str, float]:
    """Largest relative error (Frobenius) over output and gradients, against float64."""
    x64, w64, g64 = (torch.randn(*s, dtype=torch.float64) for s in ((m, k), (n, k), (m, n)))
    out = {}
    for label, fn in (("MKL", F.linear), ("oneDNN", onednn_linear)):
        x, w = x64.float().requires_grad_(), w64.float().requires_grad_()
        xr, wr = x64.clone().requires_grad_(), w64.clone().requires_grad_()
        y, yr = fn(x, w), F.linear(xr, wr)
        y.backward(g64.float())
        yr.backward(g64)
        pairs = ((y, yr), (x.grad, xr.grad), (w.grad, wr.grad))
        out[label] = max(((a.double() - b).norm() / b.norm()).item() for a, b in pairs)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", default="832,12800", help="M values (tokens per step)")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (median)")
    args = parser.parse_args()
    if not onednn_available():
        raise SystemExit("this PyTorch has no oneDNN linear op")
    cpu = torch.device("cpu")
    print(f"{command_line()}\n{device_name(cpu)}, load average {load_average():.1f} at start")
    print("| M | K | N | " + " | ".join(products(8, 8, 8)) + " | rel. error MKL / oneDNN |")
    print("|---" * (len(products(8, 8, 8)) + 4) + "|")
    for m in (int(t) for t in args.tokens.split(",")):
        for k, n in SHAPES:
            calls = products(m, k, n)
            times = step_times(
                {label: fn for label, (_, fn) in calls.items()},
                args.rounds,
                1,
                cpu,
                clock=time.process_time,
            )
            rates = [calls[label][0] / statistics.median(t) / 1e9 for label, t in times.items()]
            err = errors(m, k, n)
            cells = " | ".join(f"{r:.0f}" for r in rates)
            print(f"| {m} | {k} | {n} | {cells} | {err['MKL']:.1e} / {err['oneDNN']:.1e} |")
    print(f"load average {load_average():.1f} at end, commit {git_commit()}")


if __name__ == "__main__":
    main()
