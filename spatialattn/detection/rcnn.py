"""Faster / Mask R-CNN builders with attention in the backbone and on the RoI features.

The builders construct the plain torchvision model, then apply
:func:`spatialattn.surgery.insert_attention` to the backbone's residual blocks
(``backbone_attention``) and :func:`spatialattn.detection.roi_heads.add_roi_attention`
to the RoI heads (``roi_attention``). With both set to ``None`` the result is the
torchvision model itself. Every torchvision state_dict key is unchanged, so a
checkpoint of the plain model of the same configuration loads with
:func:`load_detection_checkpoint` (strict, except the new attention keys).

``fasterrcnn_resnet18_fpn`` / ``maskrcnn_resnet18_fpn`` are small variants
(ResNet-18 + FPN, 256 channels) for quick CPU experiments and tests; torchvision
has no weights for them.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from os import PathLike
from typing import Any, Dict, List, Mapping, Optional, Sequence, Type, Union

import torch
from torch import nn
from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.models.detection import faster_rcnn as _tv_faster
from torchvision.models.detection import mask_rcnn as _tv_mask
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.ops import misc as misc_nn_ops

from ..convert import unwrap_state_dict
from ..surgery import _AttentionBlockMixin, insert_attention
from .roi_heads import RoIAlignWithAttention, add_roi_attention, roi_attention_maps

__all__ = [
    "fasterrcnn_resnet50_fpn",
    "maskrcnn_resnet50_fpn",
    "fasterrcnn_resnet18_fpn",
    "maskrcnn_resnet18_fpn",
    "load_detection_checkpoint",
    "CheckpointReport",
    "attention_state_keys",
    "add_roi_attention",  # re-exported from .roi_heads
    "roi_attention_maps",
]

AttentionSpec = Union[None, str, Type[nn.Module]]


def _augment(
    model: nn.Module,
    roi_attention: AttentionSpec,
    backbone_attention: AttentionSpec,
    roi_attention_kwargs: Optional[Dict[str, Any]],
    backbone_attention_kwargs: Optional[Dict[str, Any]],
    backbone_stages: Any,
    roi_heads: Optional[Sequence[str]],
) -> nn.Module:
    if backbone_attention is not None:
        insert_attention(model.backbone.body, backbone_attention, stages=backbone_stages,
                         **(backbone_attention_kwargs or {}))
    elif backbone_attention_kwargs or backbone_stages is not None:
        raise ValueError("backbone_attention_kwargs / backbone_stages given without backbone_attention")
    if roi_attention is not None:
        add_roi_attention(model, roi_attention, heads=roi_heads, **(roi_attention_kwargs or {}))
    elif roi_attention_kwargs or roi_heads is not None:
        raise ValueError("roi_attention_kwargs / roi_heads given without roi_attention")
    return model


def fasterrcnn_resnet50_fpn(
    *,
    roi_attention: AttentionSpec = None,
    backbone_attention: AttentionSpec = None,
    num_classes: int = 91,
    weights: Any = None,
    weights_backbone: Any = None,
    roi_attention_kwargs: Optional[Dict[str, Any]] = None,
    backbone_attention_kwargs: Optional[Dict[str, Any]] = None,
    backbone_stages: Any = None,
    **kwargs: Any,
) -> FasterRCNN:
    """torchvision ``fasterrcnn_resnet50_fpn`` with optional attention.

    Args:
        roi_attention: attention on the box head's RoI features (``"cbam"``, ``"sam"``, ...; ``None``: none).
        backbone_attention: attention after the last conv + norm of every residual
            block of the ResNet-50 body (``None``: none).
        num_classes, weights, weights_backbone, **kwargs: as torchvision's builder
            (``min_size``, ``box_score_thresh``, ``trainable_backbone_layers``, ...).
            Weights are loaded *before* attention is added, so pretrained weights work.
        roi_attention_kwargs / backbone_attention_kwargs: options of the attention modules.
        backbone_stages: stages for the backbone attention (e.g. ``(3, 4)``; default all).
    """
    model = _tv_faster.fasterrcnn_resnet50_fpn(
        weights=weights, weights_backbone=weights_backbone, num_classes=num_classes, **kwargs
    )
    return _augment(model, roi_attention, backbone_attention, roi_attention_kwargs,
                    backbone_attention_kwargs, backbone_stages, None)


def maskrcnn_resnet50_fpn(
    *,
    roi_attention: AttentionSpec = None,
    backbone_attention: AttentionSpec = None,
    num_classes: int = 91,
    weights: Any = None,
    weights_backbone: Any = None,
    roi_heads: Optional[Sequence[str]] = None,
    roi_attention_kwargs: Optional[Dict[str, Any]] = None,
    backbone_attention_kwargs: Optional[Dict[str, Any]] = None,
    backbone_stages: Any = None,
    **kwargs: Any,
) -> MaskRCNN:
    """torchvision ``maskrcnn_resnet50_fpn`` with optional attention.

    ``roi_attention`` goes on both the box and the mask head's RoI features
    unless ``roi_heads`` (``("box",)`` or ``("mask",)``) says otherwise. Other
    arguments as :func:`fasterrcnn_resnet50_fpn`.
    """
    model = _tv_mask.maskrcnn_resnet50_fpn(
        weights=weights, weights_backbone=weights_backbone, num_classes=num_classes, **kwargs
    )
    return _augment(model, roi_attention, backbone_attention, roi_attention_kwargs,
                    backbone_attention_kwargs, backbone_stages, roi_heads)


def _small_backbone(weights_backbone: Any, trainable_backbone_layers: Optional[int]) -> nn.Module:
    is_trained = weights_backbone is not None
    if trainable_backbone_layers is None:
        trainable_backbone_layers = 3 if is_trained else 5
    if not 0 <= trainable_backbone_layers <= 5:
        raise ValueError(f"trainable_backbone_layers must be in [0, 5], got {trainable_backbone_layers}")
    norm_layer = misc_nn_ops.FrozenBatchNorm2d if is_trained else nn.BatchNorm2d
    return resnet_fpn_backbone(
        backbone_name="resnet18", weights=weights_backbone, norm_layer=norm_layer,
        trainable_layers=trainable_backbone_layers,
    )


def fasterrcnn_resnet18_fpn(
    *,
    roi_attention: AttentionSpec = None,
    backbone_attention: AttentionSpec = None,
    num_classes: int = 91,
    weights_backbone: Any = None,
    trainable_backbone_layers: Optional[int] = None,
    roi_attention_kwargs: Optional[Dict[str, Any]] = None,
    backbone_attention_kwargs: Optional[Dict[str, Any]] = None,
    backbone_stages: Any = None,
    **kwargs: Any,
) -> FasterRCNN:
    """Small Faster R-CNN: ResNet-18 + FPN (256 channels), torchvision ``FasterRCNN`` heads.

    BatchNorm is frozen (``FrozenBatchNorm2d``) when ``weights_backbone`` is
    given and ordinary ``BatchNorm2d`` otherwise, as torchvision's builders do.
    ``**kwargs`` go to ``FasterRCNN`` (``min_size``, ``max_size``, ``rpn_*``,
    ``box_*``). Other arguments as :func:`fasterrcnn_resnet50_fpn`.
    """
    backbone = _small_backbone(weights_backbone, trainable_backbone_layers)
    model = FasterRCNN(backbone, num_classes=num_classes, **kwargs)
    return _augment(model, roi_attention, backbone_attention, roi_attention_kwargs,
                    backbone_attention_kwargs, backbone_stages, None)


def maskrcnn_resnet18_fpn(
    *,
    roi_attention: AttentionSpec = None,
    backbone_attention: AttentionSpec = None,
    num_classes: int = 91,
    weights_backbone: Any = None,
    trainable_backbone_layers: Optional[int] = None,
    roi_heads: Optional[Sequence[str]] = None,
    roi_attention_kwargs: Optional[Dict[str, Any]] = None,
    backbone_attention_kwargs: Optional[Dict[str, Any]] = None,
    backbone_stages: Any = None,
    **kwargs: Any,
) -> MaskRCNN:
    """Small Mask R-CNN: ResNet-18 + FPN, torchvision ``MaskRCNN`` heads (see :func:`fasterrcnn_resnet18_fpn`)."""
    backbone = _small_backbone(weights_backbone, trainable_backbone_layers)
    model = MaskRCNN(backbone, num_classes=num_classes, **kwargs)
    return _augment(model, roi_attention, backbone_attention, roi_attention_kwargs,
                    backbone_attention_kwargs, backbone_stages, roi_heads)


# --------------------------------------------------------------------------- checkpoints


def attention_state_keys(model: nn.Module) -> List[str]:
    """The state_dict keys of ``model`` that belong to inserted attention modules
    (residual-block ``...attention.*`` and RoI ``...roi_pool.attention.*``)."""
    prefixes = [
        (f"{name}." if name else "") + "attention."
        for name, m in model.named_modules()
        if isinstance(m, (_AttentionBlockMixin, RoIAlignWithAttention))
    ]
    return [k for k in model.state_dict() if any(k.startswith(p) for p in prefixes)]


@dataclass
class CheckpointReport:
    """What :func:`load_detection_checkpoint` did.

    Attributes:
        attention_keys: keys of the new attention modules the checkpoint did not
            have (left at their initial values).
        missing_keys: other keys of the model absent from the checkpoint.
        unexpected_keys: checkpoint keys the model does not have.
    """

    attention_keys: List[str] = field(default_factory=list)
    missing_keys: List[str] = field(default_factory=list)
    unexpected_keys: List[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.missing_keys and not self.unexpected_keys


def _extract_state_dict(obj: Any) -> Mapping[str, torch.Tensor]:
    obj = unwrap_state_dict(obj) if isinstance(obj, Mapping) else obj
    if not isinstance(obj, Mapping):
        raise TypeError(f"expected a state_dict (mapping of tensors), got {type(obj).__name__}")
    if obj and all(k.startswith("module.") for k in obj):  # DataParallel / DDP
        obj = OrderedDict((k[len("module."):], v) for k, v in obj.items())
    return obj


def _short(keys: List[str], n: int = 10) -> str:
    return ", ".join(keys[:n]) + (f", ... ({len(keys)} in all)" if len(keys) > n else "")


def load_detection_checkpoint(
    model: nn.Module,
    path_or_state_dict: Union[str, PathLike, Mapping[str, torch.Tensor]],
    *,
    strict: bool = True,
    map_location: Union[str, torch.device, None] = "cpu",
) -> CheckpointReport:
    """Load a checkpoint of the plain (or the augmented) model into a model with attention.

    Strict on every key except those of the inserted attention modules, which
    may be absent (they keep their initial values). Shapes must match
    (``load_state_dict`` raises on a mismatch, e.g. another ``num_classes``).

    Args:
        model: e.g. ``fasterrcnn_resnet50_fpn(roi_attention="cbam")``.
        path_or_state_dict: a file saved with ``torch.save(model.state_dict(), path)``
            (read with ``weights_only=True``), optionally wrapped as
            ``{"model": state_dict}`` and / or with a ``module.`` prefix; or the state_dict.
        strict: raise ``RuntimeError`` listing the keys when other keys are
            missing or unexpected (default; as with ``load_state_dict(strict=True)``
            the matching keys are loaded before it raises); with ``False`` load
            what matches and return the report.

    Returns:
        a :class:`CheckpointReport`.
    """
    if isinstance(path_or_state_dict, (str, PathLike)):
        obj = torch.load(path_or_state_dict, map_location=map_location, weights_only=True)
    else:
        obj = path_or_state_dict
    state_dict = _extract_state_dict(obj)
    attn = set(attention_state_keys(model))
    # Like ``load_state_dict(strict=True)``: load what matches, then raise on a mismatch
    # (this lets BatchNorm fill ``num_batches_tracked`` absent from old checkpoints).
    result = model.load_state_dict(state_dict, strict=False)
    report = CheckpointReport(
        attention_keys=[k for k in result.missing_keys if k in attn],
        missing_keys=[k for k in result.missing_keys if k not in attn],
        unexpected_keys=list(result.unexpected_keys),
    )
    if strict and not report.ok:
        msg = ["load_detection_checkpoint: the checkpoint does not match the model"]
        if report.missing_keys:
            msg.append(f"missing keys (not attention): {_short(report.missing_keys)}")
        if report.unexpected_keys:
            msg.append(f"unexpected keys: {_short(report.unexpected_keys)}")
        raise RuntimeError("; ".join(msg))
    return report
