"""CBAM: channel attention then spatial attention (Woo et al., ECCV 2018).

Presets reproduce the layouts of the implementations people have weights for,
so that their checkpoints load (through :func:`spatialattn.convert_state_dict`)
and give the same outputs:

========== ============================ =========================== ==================
preset     channel MLP                  spatial pooling / conv      source
========== ============================ =========================== ==================
paper      C->C/16->C (floor), bias     [max, mean], no bias + BN   CBAM authors' code
           avg + max                    (eps 1e-5, momentum 0.01)   (Jongchan/attention-module)
timm       C->round(C/16)->C, no bias   [mean, max], no bias + BN   timm ``CbamModule``
           avg + max                    (momentum 0.1)
ultralytics single C->C 1x1 conv, bias  [mean, max], no bias, no BN ultralytics ``CBAM``
           avg only
mmyolo     C->int(C/16)->C, bias        [mean, max], bias, no BN    mmyolo / mmdet ``CBAM``
           avg + max
========== ============================ =========================== ==================

Arrangements (paper, Table 3): ``"channel_spatial"`` (default, best in the
paper), ``"spatial_channel"``, and ``"parallel"`` (both gates computed from the
input and applied together: ``y = x * Mc(x) * Ms(x)``).

Memory: in the default arrangement the forward saves no full-size tensor
besides its input for backward: ``x * Mc`` is recomputed in backward.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple, Union

import torch
from torch import Tensor
from torch.fx import Proxy

from .. import functional as SF
from .. import ops
from ._fast_eval import cbam_eval
from ._fast_train import cbam_train

from .base import AttentionModule
from .channel import ChannelAttention
from .spatial import SpatialAttention

__all__ = ["CBAM", "CBAM_PRESETS"]

CBAM_PRESETS: Dict[str, Dict[str, Dict[str, Any]]] = {
    "paper": {
        "channel": dict(rd_rounding="floor", mlp_bias=True, pool_types=("avg", "max"), num_layers=2),
        "spatial": dict(order=("max", "mean"), norm="bn", bias=False, bn_momentum=0.01),
    },
    "timm": {
        "channel": dict(rd_rounding="round", mlp_bias=False, pool_types=("avg", "max"), num_layers=2),
        "spatial": dict(order=("mean", "max"), norm="bn", bias=False, bn_momentum=0.1),
    },
    "ultralytics": {
        "channel": dict(mlp_bias=True, pool_types=("avg",), num_layers=1),
        "spatial": dict(order=("mean", "max"), norm=None, bias=False),
    },
    "mmyolo": {
        "channel": dict(rd_rounding="floor", mlp_bias=True, pool_types=("avg", "max"), num_layers=2),
        "spatial": dict(order=("mean", "max"), norm=None, bias=True),
    },
}
CBAM_PRESETS["official"] = CBAM_PRESETS["paper"]

_ARRANGEMENTS = ("channel_spatial", "spatial_channel", "parallel")


class CBAM(AttentionModule):
    """Convolutional Block Attention Module.

    Args:
        channels: ``C``.
        reduction: channel MLP reduction ratio (paper: 16).
        kernel_size: spatial conv size (paper: 7).
        preset: ``"paper"`` (default; alias ``"official"``), ``"timm"``,
            ``"ultralytics"`` or ``"mmyolo"`` (see the module docstring).
        arrangement: ``"channel_spatial"`` (default), ``"spatial_channel"`` or ``"parallel"``.
        no_spatial: channel attention only (the official code's option).
        channel_kwargs / spatial_kwargs: override any argument of
            :class:`ChannelAttention` / :class:`SpatialAttention`.

    Shape:
        input ``[N, C, H, W]`` -> output ``[N, C, H, W]``; attention: the
        spatial map ``[N, 1, H, W]`` (the channel gate ``[N, C, 1, 1]`` is kept
        in ``last_channel_attention`` when ``keep_attention`` is on).
    """

    def __init__(
        self,
        channels: int,
        reduction: float = 16,
        kernel_size: int = 7,
        *,
        preset: str = "paper",
        arrangement: str = "channel_spatial",
        no_spatial: bool = False,
        channel_kwargs: Optional[Dict[str, Any]] = None,
        spatial_kwargs: Optional[Dict[str, Any]] = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if preset not in CBAM_PRESETS:
            raise ValueError(f"unknown CBAM preset {preset!r}: expected one of {sorted(CBAM_PRESETS)}")
        if arrangement not in _ARRANGEMENTS:
            raise ValueError(f"unknown arrangement {arrangement!r}: expected one of {_ARRANGEMENTS}")
        self.channels = channels
        self.preset = preset
        self.arrangement = arrangement
        ckw = dict(CBAM_PRESETS[preset]["channel"], **(channel_kwargs or {}))
        skw = dict(CBAM_PRESETS[preset]["spatial"], **(spatial_kwargs or {}))
        self.channel = ChannelAttention(channels, reduction, device=device, dtype=dtype, **ckw)
        self.spatial = None if no_spatial else SpatialAttention(
            channels, kernel_size, device=device, dtype=dtype, **skw
        )
        self.last_channel_attention: Optional[Tensor] = None

    def _channel_spatial(self, x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """``(y, spatial map, channel gate)``. Both gates read ``x``; through
        :func:`spatialattn.ops.with_global_pool` their two gradients w.r.t. ``x`` are summed
        in one pass in training (not written separately and added by autograd)."""
        SF.check_input(x, self.channels)

        def body(t: Tensor, pooled: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
            cg = self.channel.gate_from_pooled(pooled)
            y, sa = self.spatial.attend(t, channel_scale=cg)  # (in t's dtype there)
            return y, sa, cg

        y, sa, cg = ops.with_global_pool(x, body, order=self.channel.pool_types, dtype=SF.accumulate_dtype(x))
        return y, sa, cg

    def extra_repr(self) -> str:
        return f"channels={self.channels}, preset={self.preset!r}, arrangement={self.arrangement!r}"

    def forward(self, x: Tensor, return_attention: bool = False) -> Union[Tensor, Tuple[Tensor, Tensor]]:
        if isinstance(x, Proxy):  # torch.fx symbolic tracing: one call_module node (see AttentionModule)
            return self._fx_leaf(x, return_attention)
        if self.spatial is None:
            y, cg = self.channel(x, return_attention=True)
            self._remember(cg)
            return (y, cg) if return_attention else y
        if self.arrangement == "channel_spatial":
            # on CPU where the C++ kernels apply: without autograd, direct kernel calls (see
            # _fast_eval); with it, one autograd node (see _fast_train). Same numbers.
            out = cbam_train(self, x) if torch.is_grad_enabled() else cbam_eval(self, x)
            y, sa, cg = self._channel_spatial(x) if out is None else out
        elif self.arrangement == "parallel":
            cg = self.channel.channel_gate(x)
            sa = self.spatial.attention_map(x)
            y = ops.gate_multiply(x, sa, cg.to(x.dtype))
        else:  # spatial_channel
            x1, sa = self.spatial.attend(x)
            cg = self.channel.channel_gate(x1)
            y = x1 * cg.to(x1.dtype)
        if self.keep_attention:
            self.last_channel_attention = cg.detach()
        self._remember(sa)
        return (y, sa) if return_attention else y
