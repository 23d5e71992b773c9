"""``create_attention``: build any attention module from a name (or class) and a channel count."""
from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple, Type, Union

from torch import Tensor, nn
from torch.fx import Proxy

from .base import AttentionModule
from .cbam import CBAM
from .channel import ChannelAttention, SqueezeExcite
from .nonlocal_ import NonLocal2d
from .spatial import PointwiseSpatialAttention, SpatialAttention

__all__ = ["create_attention", "get_attention_class", "register_attention", "NoAttention", "ATTENTION_NAMES"]


class NoAttention(AttentionModule):
    """Identity with the attention-module interface (``"none"``): the map is all ones ``[N, 1, H, W]``."""

    def __init__(self, channels: Optional[int] = None, **kwargs) -> None:
        super().__init__()
        if kwargs:
            raise TypeError(f"'none' attention takes no options, got {sorted(kwargs)}")
        self.channels = channels

    def forward(self, x: Tensor, return_attention: bool = False) -> Union[Tensor, Tuple[Tensor, Tensor]]:
        if return_attention:
            if isinstance(x, Proxy):  # torch.fx: one call_module node (a Proxy's shape is no tuple)
                return self._fx_leaf(x, return_attention)
            return x, x.new_ones((x.shape[0], 1) + tuple(x.shape[2:]))
        return x


_REGISTRY: Dict[str, Callable[..., nn.Module]] = {
    "sam": SpatialAttention,
    "spatial": SpatialAttention,
    "sam_pointwise": PointwiseSpatialAttention,
    "modified_sam": PointwiseSpatialAttention,
    "pointwise": PointwiseSpatialAttention,
    "cam": ChannelAttention,
    "channel": ChannelAttention,
    "cbam": CBAM,
    "se": SqueezeExcite,
    "nonlocal": NonLocal2d,
    "non_local": NonLocal2d,
    "none": NoAttention,
}

ATTENTION_NAMES = ("sam", "sam_pointwise", "modified_sam", "cam", "cbam", "se", "nonlocal", "none")


def register_attention(name: str, cls: Callable[..., nn.Module]) -> None:
    """Add a name to the registry (``cls(channels, **kw)`` must build the module)."""
    _REGISTRY[name.lower()] = cls


def get_attention_class(name_or_class: Union[str, Type[nn.Module]]) -> Callable[..., nn.Module]:
    """Resolve a registered name (case-insensitive, ``-`` = ``_``) or pass a class through."""
    if not isinstance(name_or_class, str):
        return name_or_class
    key = name_or_class.lower().replace("-", "_")
    if key not in _REGISTRY:
        raise ValueError(f"unknown attention {name_or_class!r}: expected one of {sorted(_REGISTRY)} or a class")
    return _REGISTRY[key]


def create_attention(name_or_class: Union[str, Type[nn.Module]], channels: int, **kwargs) -> nn.Module:
    """Build an attention module: ``create_attention("cbam", 256)``.

    ``channels`` is the first positional argument of every module; keyword
    arguments go to the module (paper defaults otherwise). Names: ``"sam"``
    (CBAM spatial), ``"sam_pointwise"`` / ``"modified_sam"`` (YOLOv4), ``"cam"``,
    ``"cbam"``, ``"se"``, ``"nonlocal"``, ``"none"``.
    """
    return get_attention_class(name_or_class)(channels, **kwargs)
