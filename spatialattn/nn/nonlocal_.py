"""Non-local (position-similarity) spatial attention.

Wang et al., "Non-local Neural Networks", CVPR 2018: every position is
re-weighted by its similarity to all (optionally sub-sampled) positions,
``z = x + W(sum_j f(x_i, x_j) g(x_j))``. The four pairwise functions of the
paper are available (``embedded_gaussian``, ``gaussian``, ``dot_product``,
``concatenation``). The output projection is followed by a BatchNorm whose
weight starts at zero (or, without norm, the projection starts at zero), so a
freshly inserted block is the identity, as the paper recommends.

Caveat: the attention is ``[N, HW, HW']``; memory grows with the square of the
map size (use ``sub_sample=True`` on large maps).
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

from torch import Tensor, nn
from torch.fx import Proxy

from .. import functional as SF
from .base import AttentionModule, _check_channels, _make_bn

__all__ = ["NonLocal2d"]

_MODES = ("embedded_gaussian", "gaussian", "dot_product", "concatenation")


class NonLocal2d(AttentionModule):
    """Non-local block (position-similarity spatial attention).

    Args:
        channels: ``C``.
        reduction: inner width ``C // reduction`` (paper: 2).
        inter_channels: overrides ``reduction``.
        mode: pairwise function, one of ``embedded_gaussian`` (default),
            ``gaussian``, ``dot_product``, ``concatenation``.
        sub_sample: 2x2 max-pool on the key / value paths (paper's option).
        use_scale: scale the dot products by ``inter_channels ** -0.5`` (not in
            the paper; off by default).
        norm: ``"bn"`` after the output projection (default) or ``None``.
        zero_init: start as the identity (default, as in the paper).

    Shape:
        input ``[N, C, H, W]`` -> output ``[N, C, H, W]``; attention ``[N, HW, HW']``.
    """

    def __init__(
        self,
        channels: int,
        reduction: int = 2,
        *,
        inter_channels: Optional[int] = None,
        mode: str = "embedded_gaussian",
        sub_sample: bool = False,
        use_scale: bool = False,
        norm: Optional[str] = "bn",
        zero_init: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        _check_channels(channels)
        if mode not in _MODES:
            raise ValueError(f"unknown non-local mode {mode!r}: expected one of {_MODES}")
        self.channels = channels
        self.mode = mode
        self.sub_sample = sub_sample
        self.use_scale = use_scale
        inter = inter_channels if inter_channels is not None else max(1, channels // reduction)
        self.inter_channels = inter
        fk = dict(device=device, dtype=dtype)
        self.g = nn.Conv2d(channels, inter, 1, **fk)
        if mode != "gaussian":
            self.theta = nn.Conv2d(channels, inter, 1, **fk)
            self.phi = nn.Conv2d(channels, inter, 1, **fk)
        if mode == "concatenation":
            self.concat_project = nn.Conv2d(2 * inter, 1, 1, bias=False, **fk)
        self.out = nn.Conv2d(inter, channels, 1, bias=norm is None, **fk)
        self.bn = _make_bn(channels, norm, 1e-5, 0.1, device=device, dtype=dtype)
        self.pool = nn.MaxPool2d(2) if sub_sample else None
        if zero_init:
            if self.bn is not None:
                nn.init.zeros_(self.bn.weight)
            else:
                nn.init.zeros_(self.out.weight)
                nn.init.zeros_(self.out.bias)

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, inter_channels={self.inter_channels}, mode={self.mode!r}, "
            f"sub_sample={self.sub_sample}"
        )

    def forward(self, x: Tensor, return_attention: bool = False) -> Union[Tensor, Tuple[Tensor, Tensor]]:
        if isinstance(x, Proxy):  # torch.fx symbolic tracing: one call_module node (see AttentionModule)
            return self._fx_leaf(x, return_attention)
        SF.check_input(x, self.channels)
        n, _, h, w = x.shape
        kv = x if self.pool is None else self.pool(x)
        value = self.g(kv).flatten(2)  # [N, D, M]
        if self.mode == "gaussian":
            query, key = x.flatten(2), kv.flatten(2)
        else:
            query, key = self.theta(x).flatten(2), self.phi(kv).flatten(2)
        scale = query.shape[1] ** -0.5 if self.use_scale else None
        concat_w = self.concat_project.weight if self.mode == "concatenation" else None
        z, attn = SF.position_attention(query, key, value, self.mode, scale=scale, concat_weight=concat_w,
                                        need_attention=return_attention or self.keep_attention)
        z = self.out(z.reshape(n, self.inter_channels, h, w))
        if self.bn is not None:
            z = self.bn(z)
        y = x + z
        self._remember(attn)
        return (y, attn) if return_attention else y
