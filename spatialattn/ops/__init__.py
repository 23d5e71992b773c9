"""Fast paths behind :mod:`spatialattn.functional`.

Every primitive here has one public entry point that picks an implementation by
context (autograd needed or not, export, device, dtype) and a plain PyTorch
reference (:mod:`spatialattn.ops.reference`) that is always available.

* :func:`channel_pool` -- max / mean over channels of ``x * channel_scale``.
* :func:`gate_multiply` -- ``(x * channel_gate) * spatial_gate``.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from . import lean, reference

__all__ = ["channel_pool", "gate_multiply", "is_exporting"]


def is_exporting() -> bool:
    """True while ``torch.onnx.export`` / ``torch.export`` trace the model."""
    return bool(torch.onnx.is_in_onnx_export() or torch.compiler.is_exporting())


def _needs_autograd(*tensors: Optional[Tensor]) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def channel_pool(
    x: Tensor,
    order: Sequence[str] = ("max", "mean"),
    *,
    channel_scale: Optional[Tensor] = None,
    dtype: Optional[torch.dtype] = None,
) -> Tensor:
    """Max / mean over channels: ``Tensor[N, C, H, W] -> Tensor[N, len(order), H, W]``.

    ``order`` must already be normalised to ``"max"`` / ``"mean"`` entries;
    ``channel_scale`` (``Tensor[N, C, 1, 1]``, same dtype as ``x``) multiplies ``x``
    first without keeping the product for backward.
    """
    dtype = x.dtype if dtype is None else dtype
    if is_exporting() or not _needs_autograd(x, channel_scale):
        return reference.channel_pool(x, order, channel_scale, dtype)
    return lean.channel_pool(x, order, channel_scale, dtype)


def gate_multiply(x: Tensor, spatial_gate: Tensor, channel_gate: Optional[Tensor] = None) -> Tensor:
    """``(x * channel_gate) * spatial_gate``, gates cast to ``x.dtype``; saves only ``x`` and the gates."""
    if is_exporting() or not _needs_autograd(x, spatial_gate, channel_gate):
        return reference.gate_multiply(x, spatial_gate, channel_gate)
    return lean.gate_multiply(x, spatial_gate, channel_gate)
