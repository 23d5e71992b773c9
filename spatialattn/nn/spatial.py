"""Spatial attention modules.

* :class:`SpatialAttention` -- CBAM's spatial attention module (SAM), Woo et
  al., "CBAM: Convolutional Block Attention Module", ECCV 2018: pool over
  channels (max and mean), k x k conv, BatchNorm, sigmoid, multiply.
* :class:`PointwiseSpatialAttention` -- the "modified SAM" of YOLOv4
  (Bochkovskiy et al., 2020) and Darknet's ``[convolutional] + [sam]`` pair:
  point-wise C -> C conv, BatchNorm, sigmoid, element-wise multiply.

Caveats: implementations differ. The defaults here follow the CBAM authors'
code (pooling order ``("max", "mean")``, BatchNorm with momentum 0.01 and no
conv bias); timm / ultralytics / mmyolo use ``("mean", "max")`` and other
conv / norm choices -- see :class:`spatialattn.nn.CBAM` presets and
:func:`spatialattn.convert_state_dict`.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn
from torch.fx import Proxy

from .. import functional as SF
from ._fast_eval import sam_eval
from .base import AttentionModule, _check_channels, _make_bn, run_pruning_hooks

__all__ = ["SpatialAttention", "PointwiseSpatialAttention"]


class SpatialAttention(AttentionModule):
    """CBAM spatial attention: ``y = x * sigmoid(BN(conv_kxk([max_c(x), mean_c(x)])))``.

    Args:
        channels: input channels ``C`` (checked on every call; ``None`` accepts any).
        kernel_size: odd size ``k`` of the conv on the pooled maps (paper: 7).
        order: pooling order; ``("max", "mean")`` (official code, default) or
            ``("mean", "max")`` (timm, ultralytics, mmyolo), or a single pool.
        norm: ``"bn"`` (official code, default) or ``None``.
        bias: conv bias (default: ``False``, the official code has BN instead).
        dilation: conv dilation (padding keeps the size).
        gate: ``"sigmoid"`` (default), ``"hard_sigmoid"``, ``"tanh"`` or a callable.
        bn_eps, bn_momentum: BatchNorm settings (official code: 1e-5, 0.01).

    Shape:
        input ``[N, C, H, W]`` -> output ``[N, C, H, W]``; attention ``[N, 1, H, W]``.

    Example:
        >>> import torch
        >>> m = SpatialAttention(64)
        >>> y, attn = m(torch.randn(2, 64, 16, 16), return_attention=True)
        >>> attn.shape
        torch.Size([2, 1, 16, 16])
    """

    def __init__(
        self,
        channels: Optional[int] = None,
        kernel_size: int = 7,
        *,
        order: Union[str, Sequence[str]] = ("max", "mean"),
        norm: Optional[str] = "bn",
        bias: bool = False,
        dilation: int = 1,
        gate: SF.GateLike = "sigmoid",
        bn_eps: float = 1e-5,
        bn_momentum: float = 0.01,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        _check_channels(channels)
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd int, got {kernel_size}")
        if dilation < 1:
            raise ValueError(f"dilation must be >= 1, got {dilation}")
        self.channels = channels
        self.kernel_size = kernel_size
        self.order = SF.normalize_pool_order(order)
        self.dilation = dilation
        self.gate = gate
        self.conv = nn.Conv2d(
            len(self.order), 1, kernel_size, padding=dilation * (kernel_size // 2),
            dilation=dilation, bias=bias, device=device, dtype=dtype,
        )
        self.bn = _make_bn(1, norm, bn_eps, bn_momentum, device=device, dtype=dtype)
        SF.get_gate(gate)  # validate early

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, kernel_size={self.kernel_size}, order={self.order}, "
            f"norm={'bn' if self.bn is not None else None}, bias={self.conv.bias is not None}, "
            f"dilation={self.dilation}, gate={self.gate if isinstance(self.gate, str) else 'custom'}"
        )

    def attention_map(self, x: Tensor, channel_scale: Optional[Tensor] = None) -> Tensor:
        """The attention map ``[N, 1, H, W]`` of ``x * channel_scale`` (nothing multiplied)."""
        SF.check_input(x, self.channels)
        run_pruning_hooks(self._modules["conv"])
        return SF.spatial_attention_map(
            x, self.conv.weight, self.conv.bias, order=self.order, dilation=self.dilation,
            norm=self.bn, gate=self.gate, channel_scale=channel_scale,
        )

    def attend(self, x: Tensor, channel_scale: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """``(x * channel_scale) * attention`` and the attention ``[N, 1, H, W]`` (see functional)."""
        if not torch.is_grad_enabled():  # on CPU: one direct kernel call where it applies (_fast_eval)
            out = sam_eval(self, x, channel_scale)
            if out is not None:
                return out
        SF.check_input(x, self.channels)
        conv = self._modules["conv"]
        run_pruning_hooks(conv)
        y, attn = SF.spatial_attention(
            x, conv.weight, conv.bias, order=self.order, dilation=self.dilation,
            norm=self.bn, gate=self.gate, channel_scale=channel_scale, return_attention=True,
        )
        return y, attn

    def forward(self, x: Tensor, return_attention: bool = False) -> Union[Tensor, Tuple[Tensor, Tensor]]:
        if isinstance(x, Proxy):  # torch.fx symbolic tracing: one call_module node (see AttentionModule)
            return self._fx_leaf(x, return_attention)
        y, attn = self.attend(x)
        self._remember(attn)
        return (y, attn) if return_attention else y


class PointwiseSpatialAttention(AttentionModule):
    """YOLOv4 modified SAM / Darknet ``[sam]``: ``y = x * sigmoid(BN(conv1x1(x)))``, C -> C.

    The attention map has the full shape of ``x`` (point-wise, no pooling).
    Matches Darknet's ``[convolutional] size=1 filters=C batch_normalize=1
    activation=logistic`` followed by ``[sam] from=-2``.

    Args:
        channels: ``C``.
        norm: ``"bn"`` (Darknet cfgs, default) or ``None`` (then the conv has a bias).
        bias: conv bias; default: ``norm is None``.
        groups: conv groups (1: full C -> C).
        gate: ``"sigmoid"`` (default) or another gate.
        bn_eps, bn_momentum: Darknet uses eps 1e-5 and a 0.99 rolling average (momentum 0.01).

    Shape:
        input ``[N, C, H, W]`` -> output ``[N, C, H, W]``; attention ``[N, C, H, W]``.
    """

    def __init__(
        self,
        channels: int,
        *,
        norm: Optional[str] = "bn",
        bias: Optional[bool] = None,
        groups: int = 1,
        gate: SF.GateLike = "sigmoid",
        bn_eps: float = 1e-5,
        bn_momentum: float = 0.01,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        _check_channels(channels, owner=type(self).__name__)
        if channels % groups:
            raise ValueError(f"channels ({channels}) must be divisible by groups ({groups})")
        self.channels = channels
        self.gate = gate
        self.conv = nn.Conv2d(
            channels, channels, 1, groups=groups, bias=(norm is None) if bias is None else bias,
            device=device, dtype=dtype,
        )
        self.bn = _make_bn(channels, norm, bn_eps, bn_momentum, device=device, dtype=dtype)
        SF.get_gate(gate)

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, norm={'bn' if self.bn is not None else None}, "
            f"groups={self.conv.groups}, gate={self.gate if isinstance(self.gate, str) else 'custom'}"
        )

    def forward(self, x: Tensor, return_attention: bool = False) -> Union[Tensor, Tuple[Tensor, Tensor]]:
        if isinstance(x, Proxy):  # torch.fx symbolic tracing: one call_module node (see AttentionModule)
            return self._fx_leaf(x, return_attention)
        SF.check_input(x, self.channels)
        run_pruning_hooks(self._modules["conv"])
        y, attn = SF.pointwise_spatial_attention(
            x, self.conv.weight, self.conv.bias, norm=self.bn, gate=self.gate, return_attention=True
        )
        self._remember(attn)
        return (y, attn) if return_attention else y
