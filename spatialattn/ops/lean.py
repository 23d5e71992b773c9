"""Memory-lean autograd for the attention primitives (pure PyTorch).

The straightforward composition of CBAM keeps ``x * channel_gate`` alive for the
backward pass (the input of the spatial pooling and of the final product). The
functions here save only the input ``x`` and the small gates / pooled maps, and
recompute the scaled tensor in backward. Numbers are identical to
:mod:`spatialattn.ops.reference` in the forward pass; the backward follows the
gradient of that composition (``amax`` semantics: ties share the gradient
evenly).
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor


def _sum_to(t: Tensor, like: Tensor) -> Tensor:
    """Sum ``t`` (shape of x) down to the broadcast shape of ``like``."""
    dims = [d for d in range(t.dim()) if like.shape[d] == 1 and t.shape[d] != 1]
    return t.sum(dim=dims, keepdim=True) if dims else t


class ChannelPoolFunction(torch.autograd.Function):
    """``channel_pool`` that saves ``x``, the channel scale and the max map only."""

    @staticmethod
    def forward(ctx, x: Tensor, channel_scale: Optional[Tensor], order: Tuple[str, ...], dtype: torch.dtype):
        xs = x if channel_scale is None else x * channel_scale
        maps = []
        max_map = None
        for kind in order:
            if kind == "max":
                max_map = xs.amax(dim=1, keepdim=True)
                maps.append(max_map.to(dtype))
            else:
                maps.append(xs.mean(dim=1, keepdim=True, dtype=dtype))
        ctx.order = order
        ctx.save_for_backward(x, channel_scale, max_map)
        return torch.cat(maps, dim=1)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, channel_scale, max_map = ctx.saved_tensors
        xs = x if channel_scale is None else x * channel_scale
        channels = x.shape[1]
        grad_xs = None
        for i, kind in enumerate(ctx.order):
            g = grad[:, i : i + 1]
            if kind == "max":
                mask = xs == max_map
                count = mask.sum(dim=1, keepdim=True, dtype=g.dtype)
                part = mask.to(g.dtype) * (g / count)
            else:
                part = (g / channels).expand_as(xs)
            grad_xs = part if grad_xs is None else grad_xs + part
        grad_xs = grad_xs.to(x.dtype)
        grad_x = grad_scale = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_xs if channel_scale is None else grad_xs * channel_scale
        if channel_scale is not None and ctx.needs_input_grad[1]:
            grad_scale = _sum_to(grad_xs * x, channel_scale)
        return grad_x, grad_scale, None, None


class GateMultiplyFunction(torch.autograd.Function):
    """``(x * channel_gate) * spatial_gate`` saving ``x`` and the two small gates."""

    @staticmethod
    def forward(ctx, x: Tensor, spatial_gate: Tensor, channel_gate: Optional[Tensor]):
        sg = spatial_gate.to(x.dtype)
        cg = None if channel_gate is None else channel_gate.to(x.dtype)
        y = x if cg is None else x * cg
        y = y * sg
        ctx.save_for_backward(x, spatial_gate, channel_gate)
        return y

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        x, spatial_gate, channel_gate = ctx.saved_tensors
        sg = spatial_gate.to(x.dtype)
        cg = None if channel_gate is None else channel_gate.to(x.dtype)
        grad_x = grad_sg = grad_cg = None
        g_sg = grad_y * sg  # d/d(x*cg)
        if ctx.needs_input_grad[0]:
            grad_x = g_sg if cg is None else g_sg * cg
        if ctx.needs_input_grad[1]:
            xc = x if cg is None else x * cg
            grad_sg = (grad_y * xc).sum(dim=1, keepdim=True, dtype=spatial_gate.dtype)
            grad_sg = _sum_to(grad_sg, spatial_gate)
        if channel_gate is not None and ctx.needs_input_grad[2]:
            grad_cg = (g_sg * x).sum(dim=(2, 3), keepdim=True, dtype=channel_gate.dtype)
            grad_cg = _sum_to(grad_cg, channel_gate)
        return grad_x, grad_sg, grad_cg


def channel_pool(
    x: Tensor,
    order: Sequence[str],
    channel_scale: Optional[Tensor],
    dtype: torch.dtype,
) -> Tensor:
    return ChannelPoolFunction.apply(x, channel_scale, tuple(order), dtype)


def gate_multiply(x: Tensor, spatial_gate: Tensor, channel_gate: Optional[Tensor] = None) -> Tensor:
    return GateMultiplyFunction.apply(x, spatial_gate, channel_gate)
