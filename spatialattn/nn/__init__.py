"""Attention modules (``nn.Module``), one concept per file."""
from __future__ import annotations

from .base import AttentionModule
from .cbam import CBAM, CBAM_PRESETS
from .channel import ChannelAttention, SqueezeExcite, reduced_channels
from .factory import ATTENTION_NAMES, NoAttention, create_attention, get_attention_class, register_attention
from .nonlocal_ import NonLocal2d
from .spatial import PointwiseSpatialAttention, SpatialAttention

__all__ = [
    "AttentionModule",
    "SpatialAttention",
    "PointwiseSpatialAttention",
    "ChannelAttention",
    "SqueezeExcite",
    "CBAM",
    "CBAM_PRESETS",
    "NonLocal2d",
    "NoAttention",
    "create_attention",
    "get_attention_class",
    "register_attention",
    "reduced_channels",
    "ATTENTION_NAMES",
]
