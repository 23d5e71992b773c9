"""Attention on the RoI features of torchvision Faster R-CNN / Mask R-CNN.

Where. torchvision's ``RoIHeads`` computes ``box_head(box_roi_pool(features,
proposals, image_shapes))`` (and the same with ``mask_roi_pool`` /
``mask_head``). :func:`add_roi_attention` replaces the pooler by
:class:`RoIAlignWithAttention` -- the same pooler followed by an attention
module -- so attention sees the RoI-pooled features ``[K, C, 7, 7]`` (box head)
and the RoIAlign features ``[K, C, 14, 14]`` (mask head) and feeds its output to
the unchanged ``TwoMLPHead`` / ``FastRCNNConvFCHead`` / ``MaskRCNNHeads``. No
torchvision code is forked; the poolers have no state, so every existing
state_dict key is unchanged and the new ones are
``roi_heads.box_roi_pool.attention.*`` / ``roi_heads.mask_roi_pool.attention.*``.

Per-detection maps (for the visualiser). The box head runs on proposals;
postprocessing then regresses, filters by score, and applies NMS, and torchvision
does not say which proposal a detection came from. So the maps are recomputed on
the *final* boxes: after ``RoIHeads`` has produced its detections (boxes still in
the resized-image frame), the box (and mask) pooler + attention run again on
those boxes, and each detection dict gets

* ``"attention"``: ``[D, *map]`` from the box-head attention (``[D, 1, 7, 7]``
  for SAM / CBAM; ``[D, C, 1, 1]`` for channel attention; ``[D, C, 7, 7]`` for
  the point-wise SAM), row ``i`` for ``boxes[i]``;
* ``"mask_attention"``: the same from the mask-head attention (``[D, 1, 14, 14]``).

The maps lie on the RoI grid of each box (row-major, top-left first): upsample
``[7, 7]`` into the box to overlay it. For the mask head this is exactly what the
mask head saw (in eval it runs on the final boxes); for the box head it is the
attention of the final box, not of the proposal it was regressed from. Maps are
computed under ``torch.no_grad()`` and only in eval mode, and only when enabled:
``add_roi_attention(..., attach_maps=True)``, ``model.roi_heads.attach_attention_maps = True``
or ``with roi_attention_maps(model): detections = model(images)``.
"""
from __future__ import annotations

import warnings

import contextlib
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Type, Union

import torch
from torch import Tensor, nn
from torchvision.models.detection.roi_heads import RoIHeads

from ..nn import create_attention

__all__ = [
    "RoIAlignWithAttention",
    "RoIHeadsWithAttention",
    "add_roi_attention",
    "roi_attention_maps",
    "roi_attention_names",
    "ROI_HEADS",
]

ROI_HEADS = ("box", "mask")
_MAP_KEYS = {"box": "attention", "mask": "mask_attention"}


class RoIAlignWithAttention(nn.Module):
    """A RoI pooler followed by an attention module.

    Args:
        pool: the pooler, e.g. torchvision ``MultiScaleRoIAlign`` (called as
            ``pool(features, boxes, image_shapes)``).
        attention: an attention module (``forward(x, return_attention=False)``).

    Shape:
        ``features``: ``Dict[str, Tensor[N, C, H_l, W_l]]``; ``boxes``: list of
        ``Tensor[K_i, 4]`` (xyxy, resized-image pixels); output ``Tensor[sum K_i, C, S, S]``
        (and the attention map ``[sum K_i, ...]`` with ``return_attention=True``).
    """

    def __init__(self, pool: nn.Module, attention: nn.Module) -> None:
        super().__init__()
        self.pool = pool
        self.attention = attention

    def forward(
        self,
        features: Dict[str, Tensor],
        boxes: List[Tensor],
        image_shapes: List[Tuple[int, int]],
        return_attention: bool = False,
    ) -> Union[Tensor, Tuple[Tensor, Tensor]]:
        x = self.pool(features, boxes, image_shapes)
        return self.attention(x, return_attention=return_attention)


class RoIHeadsWithAttention(RoIHeads):
    """torchvision ``RoIHeads`` that can attach per-detection attention maps (see module doc).

    Made by :func:`add_roi_attention` by swapping the class of an existing
    ``RoIHeads``; training and the detections themselves are unchanged, except
    that a training batch with no RoI at all (no proposal and no ground-truth
    box) reports box losses of 0 where torchvision computes 0 / 0 = NaN.
    """

    attach_attention_maps: bool = False

    def forward(
        self,
        features: Dict[str, Tensor],
        proposals: List[Tensor],
        image_shapes: List[Tuple[int, int]],
        targets: Optional[List[Dict[str, Tensor]]] = None,
    ) -> Tuple[List[Dict[str, Tensor]], Dict[str, Tensor]]:
        result, losses = super().forward(features, proposals, image_shapes, targets)
        if self.training and targets is not None and _no_rois(proposals, targets):
            # torchvision's fastrcnn_loss is 0 / 0 = NaN when no RoI was sampled (no proposal and
            # no ground-truth box in the whole batch): that batch has nothing to learn, report 0.
            for k in ("loss_classifier", "loss_box_reg"):
                if k in losses:
                    losses[k] = torch.nan_to_num(losses[k], nan=0.0)
        if not self.training and self.attach_attention_maps:
            self.attach_maps(features, result, image_shapes)
        return result, losses

    @torch.no_grad()
    def attach_maps(
        self, features: Dict[str, Tensor], result: List[Dict[str, Tensor]], image_shapes: List[Tuple[int, int]]
    ) -> None:
        """Add ``"attention"`` / ``"mask_attention"`` to each detection dict, recomputed on its final boxes."""
        boxes = [r["boxes"] for r in result]
        counts = [int(b.shape[0]) for b in boxes]
        for head, pool in (("box", self.box_roi_pool), ("mask", self.mask_roi_pool)):
            if not isinstance(pool, RoIAlignWithAttention):
                continue
            _, maps = pool(features, boxes, image_shapes, return_attention=True)
            for r, m in zip(result, maps.split(counts, dim=0)):
                r[_MAP_KEYS[head]] = m


def _no_rois(proposals: List[Tensor], targets: List[Dict[str, Tensor]]) -> bool:
    return sum(int(p.shape[0]) for p in proposals) + sum(int(t["boxes"].shape[0]) for t in targets) == 0


def _pool_attr(head: str) -> str:
    return f"{head}_roi_pool"


def _heads_of(roi_heads: nn.Module) -> Tuple[str, ...]:
    have = []
    if getattr(roi_heads, "box_roi_pool", None) is not None:
        have.append("box")
    if getattr(roi_heads, "mask_roi_pool", None) is not None and getattr(roi_heads, "mask_head", None) is not None:
        have.append("mask")
    return tuple(have)


_DEFAULT_HEADS: Tuple[str, ...] = ("box", "mask")  # identity marks "not given": no warning then


def add_roi_attention(
    model: nn.Module,
    kind: Union[str, Type[nn.Module]],
    heads: Optional[Sequence[str]] = _DEFAULT_HEADS,
    *,
    channels: Optional[int] = None,
    attach_maps: Optional[bool] = None,
    **kwargs: Any,
) -> nn.Module:
    """Put attention on the RoI features of a torchvision two-stage detector, in place.

    Args:
        model: torchvision ``FasterRCNN`` / ``MaskRCNN`` (anything with
            ``roi_heads: RoIHeads`` and ``backbone.out_channels``).
        kind: attention name for :func:`spatialattn.nn.create_attention`
            (``"sam"``, ``"cbam"``, ...) or a class ``cls(channels, **kwargs)``.
        heads: ``"box"`` and / or ``"mask"``. Default ``("box", "mask")``: those of
            the two the model has (``None`` means the same). An explicitly requested
            head the model lacks (``"mask"`` on a Faster R-CNN) is skipped with a
            ``UserWarning`` naming it; if none of the requested heads exists it is
            an error.
        channels: RoI feature channels; default ``model.backbone.out_channels``.
        attach_maps: set ``model.roi_heads.attach_attention_maps`` (per-detection
            maps in eval; see the module doc). ``None`` leaves it as it is (off).
        **kwargs: passed to the attention constructor (one module per head).

    Returns:
        the same model. New state_dict keys: ``roi_heads.box_roi_pool.attention.*``
        and ``roi_heads.mask_roi_pool.attention.*``; all others unchanged.

    Raises:
        ValueError: not a torchvision R-CNN, unknown head, a head the model does
            not have, or attention already on that head.
    """
    roi_heads = getattr(model, "roi_heads", None)
    if not isinstance(roi_heads, RoIHeads):
        raise ValueError(
            f"add_roi_attention: expected a torchvision two-stage detector with a RoIHeads "
            f"'roi_heads' (FasterRCNN, MaskRCNN), got {type(model).__name__} with roi_heads of type "
            f"{type(roi_heads).__name__}"
        )
    available = _heads_of(roi_heads)
    if heads is None:
        selected: Tuple[str, ...] = available
    else:
        if isinstance(heads, str):
            heads = (heads,)
        selected = tuple(dict.fromkeys(heads))
        unknown = [h for h in selected if h not in ROI_HEADS]
        if unknown:
            raise ValueError(f"add_roi_attention: unknown head(s) {unknown}: expected some of {ROI_HEADS}")
        lacking = [h for h in selected if h not in available]
        if lacking:
            msg = (
                f"add_roi_attention: {type(model).__name__} has no {' or '.join(lacking)} head "
                f"(heads present: {available}); e.g. Faster R-CNN has only 'box'"
            )
            explicit = heads is not _DEFAULT_HEADS
            selected = tuple(h for h in selected if h in available)
            if not selected:
                raise ValueError(msg)
            if explicit:
                warnings.warn(msg + f"; attention added to {selected} only", UserWarning, stacklevel=2)
    if not selected:
        raise ValueError("add_roi_attention: no head selected")
    doubled = [h for h in selected if isinstance(getattr(roi_heads, _pool_attr(h)), RoIAlignWithAttention)]
    if doubled:
        raise ValueError(f"add_roi_attention: the {doubled} head(s) already have RoI attention; refusing to add twice")

    if channels is None:
        channels = getattr(getattr(model, "backbone", None), "out_channels", None)
        if not isinstance(channels, int):
            raise ValueError(
                "add_roi_attention: cannot read the RoI feature channels from model.backbone.out_channels; "
                "pass channels="
            )
    ref = next(roi_heads.parameters(), None)
    built = {}
    for h in selected:  # build all first: a constructor error leaves the model unchanged
        att = create_attention(kind, channels, **kwargs)
        if ref is not None:
            att.to(device=ref.device, dtype=ref.dtype)
        att.train(roi_heads.training)
        built[h] = att
    swappable = type(roi_heads) is RoIHeads or isinstance(roi_heads, RoIHeadsWithAttention)
    if attach_maps and not swappable:
        raise ValueError(
            f"add_roi_attention: attach_maps needs torchvision's RoIHeads, got the subclass "
            f"{type(roi_heads).__name__} (its forward is kept; attention is still applied to the RoI features)"
        )
    for h, att in built.items():
        setattr(roi_heads, _pool_attr(h), RoIAlignWithAttention(getattr(roi_heads, _pool_attr(h)), att))
    if type(roi_heads) is RoIHeads:
        # A user subclass of RoIHeads keeps its own forward (and class): only the poolers change.
        roi_heads.__class__ = RoIHeadsWithAttention
    if attach_maps is not None:
        roi_heads.attach_attention_maps = bool(attach_maps)
    return model


def roi_attention_names(model: nn.Module) -> List[str]:
    """Names of the RoI attention modules of ``model`` (``roi_heads.box_roi_pool.attention``, ...)."""
    return [f"{n}.attention" for n, m in model.named_modules() if isinstance(m, RoIAlignWithAttention)]


@contextlib.contextmanager
def roi_attention_maps(model: nn.Module, enabled: bool = True) -> Iterator[nn.Module]:
    """Within the block, eval-mode detections carry ``"attention"`` (and ``"mask_attention"``) maps.

    Example::

        with roi_attention_maps(model):
            detections = model(images)
        detections[0]["attention"].shape   # [D, 1, 7, 7], one per detections[0]["boxes"] row
    """
    roi_heads = getattr(model, "roi_heads", None)
    if not isinstance(roi_heads, RoIHeadsWithAttention):
        raise ValueError(
            f"roi_attention_maps: {type(model).__name__} has no RoI attention; call add_roi_attention first"
        )
    before = roi_heads.attach_attention_maps
    roi_heads.attach_attention_maps = enabled
    try:
        yield model
    finally:
        roi_heads.attach_attention_maps = before
