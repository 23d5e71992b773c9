"""Channel attention: CBAM's channel attention module and Squeeze-and-Excitation.

* :class:`ChannelAttention` -- Woo et al., CBAM (ECCV 2018): average- and
  max-pooled descriptors through a shared MLP (reduction 16), summed, sigmoid.
  Options cover the variants in the wild: MLP bias (official code: yes; timm:
  no), the hidden width rounding, a single C -> C layer with average pooling
  only (ultralytics).
* :class:`SqueezeExcite` -- Hu et al., "Squeeze-and-Excitation Networks"
  (CVPR 2018): average pooling only.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence, Tuple, Type, Union

from torch import Tensor, nn
from torch.fx import Proxy

from .. import functional as SF
from .. import ops
from .base import AttentionModule, _check_channels, run_pruning_hooks

__all__ = ["ChannelAttention", "SqueezeExcite", "reduced_channels"]


def reduced_channels(channels: int, reduction: float, rounding: str = "floor", min_channels: int = 1) -> int:
    """Hidden width of the MLP: ``channels / reduction`` rounded (``"floor"``: official code,
    ``int(C / r)``; ``"round"``: timm's ``make_divisible(C / r, 1)``), at least ``min_channels``."""
    v = channels / reduction
    if rounding == "floor":
        n = int(v)
    elif rounding == "round":
        n = int(v + 0.5)
    elif rounding == "ceil":
        n = math.ceil(v)
    else:
        raise ValueError(f"unknown rounding {rounding!r}: expected 'floor', 'round' or 'ceil'")
    return max(min_channels, n)


class ChannelAttention(AttentionModule):
    """CBAM channel attention: ``y = x * sigmoid(sum_p MLP(pool_p(x)))``.

    Args:
        channels: ``C``.
        reduction: MLP reduction ratio ``r`` (paper: 16).
        rd_channels: hidden width; overrides ``reduction``.
        rd_rounding: ``"floor"`` (official code) or ``"round"`` (timm).
        min_channels: lower bound of the hidden width.
        num_layers: 2 (MLP ``C -> C/r -> C``, default) or 1 (a single ``C -> C``
            layer, as in ultralytics' ``ChannelAttention``).
        pool_types: pools fed to the shared MLP (default ``("avg", "max")``).
        mlp_bias: biases in the MLP (official code: ``True``; timm: ``False``).
        act_layer: hidden activation class (default ``nn.ReLU``).
        gate: gate (default sigmoid).

    Parameters are 1x1 convs ``fc1`` / ``fc2`` (or ``fc`` with one layer).

    Shape:
        input ``[N, C, H, W]`` -> output ``[N, C, H, W]``; attention ``[N, C, 1, 1]``.
    """

    def __init__(
        self,
        channels: int,
        reduction: float = 16,
        *,
        rd_channels: Optional[int] = None,
        rd_rounding: str = "floor",
        min_channels: int = 1,
        num_layers: int = 2,
        pool_types: Union[str, Sequence[str]] = ("avg", "max"),
        mlp_bias: bool = True,
        act_layer: Union[Type[nn.Module], Callable[[], nn.Module]] = nn.ReLU,
        gate: SF.GateLike = "sigmoid",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        _check_channels(channels, owner=type(self).__name__)
        if num_layers not in (1, 2):
            raise ValueError(f"num_layers must be 1 or 2, got {num_layers}")
        self.channels = channels
        self.pool_types = SF.normalize_pool_order(pool_types)
        self.gate = gate
        self.num_layers = num_layers
        if num_layers == 2:
            rd = rd_channels if rd_channels is not None else reduced_channels(
                channels, reduction, rd_rounding, min_channels
            )
            self.rd_channels = rd
            self.fc1 = nn.Conv2d(channels, rd, 1, bias=mlp_bias, device=device, dtype=dtype)
            self.act = act_layer()
            self.fc2 = nn.Conv2d(rd, channels, 1, bias=mlp_bias, device=device, dtype=dtype)
        else:
            self.rd_channels = channels
            self.fc = nn.Conv2d(channels, channels, 1, bias=mlp_bias, device=device, dtype=dtype)
        SF.get_gate(gate)

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, rd_channels={self.rd_channels}, num_layers={self.num_layers}, "
            f"pool_types={self.pool_types}, gate={self.gate if isinstance(self.gate, str) else 'custom'}"
        )

    def channel_gate(self, x: Tensor) -> Tensor:
        """The gate ``Tensor[N, C, 1, 1]`` (float32 for half inputs)."""
        SF.check_input(x, self.channels)
        return self.gate_from_pooled(ops.global_pool(x, self.pool_types, dtype=SF.accumulate_dtype(x)))

    def gate_from_pooled(self, pooled: Tensor) -> Tensor:
        """The gate from pooled maps ``Tensor[P, N, C]`` (``ops.global_pool(x, self.pool_types)``)."""
        mods = self._modules
        if self.num_layers == 2:
            run_pruning_hooks(mods["fc1"], mods["fc2"])
            return SF.channel_gate_from_pooled(
                pooled, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias, activation=self.act,
                gate=self.gate,
            )
        run_pruning_hooks(mods["fc"])
        return SF.channel_gate_from_pooled(pooled, self.fc.weight, self.fc.bias, gate=self.gate)

    def forward(self, x: Tensor, return_attention: bool = False) -> Union[Tensor, Tuple[Tensor, Tensor]]:
        if isinstance(x, Proxy):  # torch.fx symbolic tracing: one call_module node (see AttentionModule)
            return self._fx_leaf(x, return_attention)
        g = self.channel_gate(x)
        y = x * g.to(x.dtype)
        self._remember(g)
        return (y, g) if return_attention else y


class SqueezeExcite(ChannelAttention):
    """Squeeze-and-Excitation: :class:`ChannelAttention` with average pooling only.

    ``y = x * sigmoid(fc2(relu(fc1(mean_hw(x)))))``, reduction 16 (SE paper).
    """

    def __init__(self, channels: int, reduction: float = 16, **kwargs) -> None:
        kwargs.setdefault("pool_types", ("avg",))
        super().__init__(channels, reduction, **kwargs)
