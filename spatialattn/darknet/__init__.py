"""Darknet networks in PyTorch: cfg parser, model builder, ``.weights`` I/O, bundled cfgs.

Numerically identical to Darknet's CPU forward pass (AlexeyAB/darknet), including ``[sam]``
(YOLOv4's point-wise spatial attention) and ``[scale_channels]``. See ``docs/darknet.md``.
"""
from __future__ import annotations

from .bundled import ATTENTION_VARIANTS, bundled_cfg, bundled_model, list_bundled, rewrite_cfg
from .cfg import DarknetCfgError, parse_cfg, parse_cfg_text
from .model import DarknetModel
from .weights import DarknetWeightsError, load_darknet_weights, save_darknet_weights

__all__ = [
    "DarknetModel",
    "DarknetCfgError",
    "DarknetWeightsError",
    "parse_cfg",
    "parse_cfg_text",
    "load_darknet_weights",
    "save_darknet_weights",
    "bundled_cfg",
    "bundled_model",
    "list_bundled",
    "rewrite_cfg",
    "ATTENTION_VARIANTS",
]
