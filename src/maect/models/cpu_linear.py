"""float32 ``nn.Linear`` on CPU through oneDNN instead of MKL (``trainer.cpu_matmul``).

PyTorch multiplies float32 matrices on CPU with MKL, which takes its AVX2 code path on AMD
processors; oneDNN (``torch.ops.mkldnn._linear_pointwise``, ``x @ weight.T (+ bias)``) runs the
same products with AVX-512 there (docs/performance.md). :func:`route_linears` switches the
``nn.Linear`` layers of a module to :class:`OneDNNLinear`, a subclass with the same parameters
(state dicts and checkpoints are unchanged) whose forward and backward products run in oneDNN
when the input is a non-empty float32 CPU tensor outside autocast, ``torch.compile`` and dispatch
modes (FLOP counters, fake tensors); anything else goes through ``F.linear`` as before.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable
from torch.utils._python_dispatch import _get_current_dispatch_mode

log = logging.getLogger(__name__)


def onednn_available() -> bool:
    """Whether this PyTorch build has oneDNN's dense linear op."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _product(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``a @ b.T (+ bias)`` in oneDNN (``a`` [..., K], ``b`` [N, K], any strides)."""
    return torch.ops.mkldnn._linear_pointwise(a, b, bias, "none", [], "")


def _weight_grad(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``grad.T @ x`` ([M, N], [M, K] -> [N, K]) in oneDNN. oneDNN copies its transposed first
    operand, so that is the narrower of the two: ``x`` when N >= K (the product then comes out
    as [K, N] and is returned transposed). On an AMD EPYC this order ran at 1.3-2.2x MKL, the
    other at 0.7-1.7x, for M of 512 to 25,600 (benchmarks/cpu_linear.py)."""
    if grad.shape[1] >= x.shape[1]:
        return _product(x.t(), grad.t()).t()
    return _product(grad.t(), x.t())


class _OneDNNLinearFunction(torch.autograd.Function):
    """``F.linear`` with all three products (output, input and weight gradients) in oneDNN."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
    ) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _product(x, weight, bias)

    @staticmethod
    @once_differentiable
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        need_x, need_weight, need_bias = ctx.needs_input_grad
        grad_x = _product(grad, weight.t()) if need_x else None
        grad_2d = grad.reshape(-1, grad.shape[-1])
        grad_weight = grad_bias = None
        if need_weight:
            grad_weight = _weight_grad(grad_2d, x.reshape(-1, x.shape[-1]))
        if need_bias and ctx.has_bias:
            grad_bias = grad_2d.sum(0)
        return grad_x, grad_weight, grad_bias


_PLAIN = (torch.Tensor, nn.Parameter)  # not tensor subclasses (DTensor, fake tensors, ...)


def _use_onednn(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (
        not torch.compiler.is_compiling()
        and type(x) in _PLAIN
        and type(weight) in _PLAIN
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and x.dim() >= 2
        and x.numel() > 0  # oneDNN has no primitive for empty products
        and weight.numel() > 0
        and not torch.is_autocast_enabled("cpu")
        and _get_current_dispatch_mode() is None
    )


def onednn_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, through oneDNN for float32 CPU tensors (see the module
    docstring for when it falls back to ``F.linear``)."""
    if not _use_onednn(x, weight):
        return F.linear(x, weight, bias)
    tensors = (x, weight) if bias is None else (x, weight, bias)
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return _OneDNNLinearFunction.apply(x, weight, bias)
    return _product(x, weight, bias)


class OneDNNLinear(nn.Linear):
    """``nn.Linear`` whose float32 CPU products run in oneDNN (same parameters and state dict)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return onednn_linear(x, self.weight, self.bias)


def route_linears(module: nn.Module) -> int:
    """Switch every plain ``nn.Linear`` in ``module`` to :class:`OneDNNLinear` in place (subclasses
    of ``nn.Linear`` are left alone); returns how many. A no-op without oneDNN."""
    if not onednn_available():
        return 0
    linears = [m for m in module.modules() if type(m) is nn.Linear]
    for linear in linears:
        linear.__class__ = OneDNNLinear
    return len(linears)


def cpu_vendor() -> str:
    """The x86 vendor id in ``/proc/cpuinfo`` (``AuthenticAMD``, ``GenuineIntel``), else ``""``."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("vendor_id"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def apply_cpu_matmul(module: nn.Module, choice: str, device: torch.device) -> int:
    """Apply ``trainer.cpu_matmul`` (``auto``, ``onednn``, ``default``) to ``module`` trained on
    ``device``; returns how many linear layers now run through oneDNN.

    ``auto`` routes only on AMD processors: that is where oneDNN was measured faster than MKL
    (MKL's AVX2 path there; docs/performance.md). On Intel MKL uses AVX-512 and on other
    processors PyTorch's CPU backends differ; neither was measured, so ``auto`` keeps PyTorch's
    default there.
    """
    if device.type != "cpu" or choice == "default":
        return 0
    if choice == "auto" and cpu_vendor() != "AuthenticAMD":
        return 0
    if not onednn_available():
        if choice == "onednn":
            log.warning("trainer.cpu_matmul=onednn: PyTorch has no oneDNN linear op; using MKL")
        return 0
    return route_linears(module)


@contextlib.contextmanager
def cpu_matmul(module: nn.Module, choice: str, device: torch.device) -> Iterator[int]:
    """:func:`apply_cpu_matmul` for the duration of the block (e.g. a feature extraction); the
    routed layers get their class back afterwards. Yields how many layers were routed."""
    plain = [m for m in module.modules() if type(m) is nn.Linear]
    routed = apply_cpu_matmul(module, choice, device)
    try:
        yield routed
    finally:
        for linear in plain:
            linear.__class__ = nn.Linear
