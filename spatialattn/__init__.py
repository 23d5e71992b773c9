"""spatialattn: spatial attention for convolutional networks in PyTorch.

Public API (kept small):

* modules: :class:`SpatialAttention` (CBAM SAM), :class:`PointwiseSpatialAttention`
  (YOLOv4 modified SAM / Darknet ``[sam]``), :class:`ChannelAttention`,
  :class:`SqueezeExcite`, :class:`CBAM`, :class:`NonLocal2d`, :func:`create_attention`;
* :mod:`spatialattn.functional` -- the functional forms;
* :func:`convert_state_dict` -- load weights of other CBAM implementations;
* :func:`insert_attention` (residual blocks) and :func:`add_roi_attention`
  (R-CNN RoI heads);
* :mod:`spatialattn.darknet` -- Darknet ``.cfg`` / ``.weights`` networks.
"""
from __future__ import annotations

__version__ = "0.1.0"

from . import functional
from .convert import convert_state_dict
from .detection.roi_heads import add_roi_attention
from .nn import (
    CBAM,
    ChannelAttention,
    NonLocal2d,
    PointwiseSpatialAttention,
    SpatialAttention,
    SqueezeExcite,
    create_attention,
)
from .surgery import insert_attention

__all__ = [
    "functional",
    "SpatialAttention",
    "PointwiseSpatialAttention",
    "ChannelAttention",
    "SqueezeExcite",
    "CBAM",
    "NonLocal2d",
    "create_attention",
    "convert_state_dict",
    "insert_attention",
    "add_roi_attention",
]

