"""Plain PyTorch compositions of the attention primitives.

These are the reference semantics (and the path used for ONNX export, where a
decomposition into standard operators is wanted). Every fast path in
:mod:`spatialattn.ops` must agree with these functions.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import Tensor


def channel_pool(
    x: Tensor,
    order: Sequence[str] = ("max", "mean"),
    channel_scale: Optional[Tensor] = None,
    dtype: Optional[torch.dtype] = None,
) -> Tensor:
    """Pool ``x * channel_scale`` over channels: ``Tensor[N, C, H, W] -> Tensor[N, len(order), H, W]``.

    ``order`` holds ``"max"`` / ``"mean"`` (already normalised). ``dtype`` is the
    dtype of the pooled maps (the mean is accumulated in it; the max is exact in
    any dtype and cast). ``amax`` is used for the max: its gradient at ties is
    split evenly between the tied channels and it exports to ONNX as ReduceMax
    (no ArgMax).
    """
    if channel_scale is not None:
        x = x * channel_scale
    dtype = x.dtype if dtype is None else dtype
    maps = []
    for kind in order:
        if kind == "max":
            maps.append(x.amax(dim=1, keepdim=True).to(dtype))
        else:
            maps.append(x.mean(dim=1, keepdim=True, dtype=dtype))
    return torch.cat(maps, dim=1)


def gate_multiply(x: Tensor, spatial_gate: Tensor, channel_gate: Optional[Tensor] = None) -> Tensor:
    """``(x * channel_gate) * spatial_gate`` with both gates cast to ``x.dtype``.

    Shapes: ``x`` ``[N, C, H, W]``, ``spatial_gate`` ``[N, 1, H, W]``, ``channel_gate``
    ``[N, C, 1, 1]`` or ``None``.
    """
    if channel_gate is not None:
        x = x * channel_gate.to(x.dtype)
    return x * spatial_gate.to(x.dtype)


def channel_mlp_logits(
    pooled: Tensor,
    weight1: Tensor,
    bias1: Optional[Tensor] = None,
    weight2: Optional[Tensor] = None,
    bias2: Optional[Tensor] = None,
    activation: Callable[[Tensor], Tensor] = torch.relu,
) -> Tensor:
    """``sum_p mlp(pooled[p])`` -> ``Tensor[N, C]``, the logits of :func:`channel_mlp_gate`.

    ``mlp(v) = fc2(activation(fc1(v)))`` (``fc1(v)`` alone without ``weight2``), on all pools
    at once as matrix products (a 1x1 conv on ``[N, C, 1, 1]`` maps is the same product;
    torch's conv path was 4x slower at N = 8), the results added in pool order as every
    reference implementation does. ``activation``: ``torch.relu`` runs on the ``[P * N, R]``
    rows; any other callable sees them as the ``[P * N, R, 1, 1]`` maps of the 1x1-conv form.
    """
    p, n, c = pooled.shape
    h = torch.nn.functional.linear(pooled.reshape(p * n, c), weight1, bias1)
    if weight2 is not None:
        if activation is torch.relu:
            h = torch.relu(h)  # elementwise: no view needed
        else:
            r = h.shape[1]
            h = activation(h.reshape(p * n, r, 1, 1)).reshape(p * n, r)
        h = torch.nn.functional.linear(h, weight2, bias2)
    logits = h[:n]
    for k in range(1, p):
        logits = logits + h[k * n:(k + 1) * n]
    return logits


def channel_mlp_gate(
    pooled: Tensor,
    weight1: Tensor,
    bias1: Optional[Tensor] = None,
    weight2: Optional[Tensor] = None,
    bias2: Optional[Tensor] = None,
) -> Tensor:
    """CBAM's channel gate from pooled maps: ``sigmoid(sum_p mlp(pooled[p]))``.

    ``pooled`` ``[P, N, C]``; ``mlp(v) = fc2(relu(fc1(v)))`` with Linear weights
    ``weight1`` ``[R, C]``, ``weight2`` ``[C, R]``, or ``fc1(v)`` alone when
    ``weight2`` is None (then ``weight1`` is ``[C, C]``). The per-pool outputs are
    added in pool order. Returns ``Tensor[N, C]``.
    """
    return torch.sigmoid(channel_mlp_logits(pooled, weight1, bias1, weight2, bias2))
