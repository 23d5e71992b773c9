"""Decode Darknet ``[yolo]`` outputs into boxes, as Darknet's ``get_yolo_detections`` does.

Input: the ``[yolo]`` layer output (``l.output`` semantics: x, y already squashed and scaled by
``scale_x_y``), ``Tensor[N, A*(5+K), H, W]`` with ``A = len(mask)`` anchors laid out per anchor as
``[x, y, w, h, obj, cls_0..cls_{K-1}]``. For cell ``(i, j)`` and anchor ``a`` (pixels ``(aw, ah)``)
in an input of ``W_in x H_in`` pixels:

* ``cx = (j + x) / W * W_in``, ``cy = (i + y) / H * H_in``
* ``new_coords=0``: ``w = exp(tw) * aw``, ``h = exp(th) * ah``
* ``new_coords=1``: ``w = tw**2 * 4 * aw``, ``h = th**2 * 4 * ah``
* score of class ``k`` = ``obj * cls_k`` (kept if ``obj > conf_thresh`` and score > conf_thresh).

Boxes are ``xyxy`` floats in input pixels; NMS per class with :func:`torchvision.ops.batched_nms`.
Output follows torchvision: a list (one per image) of dicts ``boxes`` (float ``[M, 4]``),
``scores`` (float ``[M]``), ``labels`` (int64 ``[M]``).
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch
from torch import Tensor
from torchvision.ops import batched_nms

__all__ = ["decode_yolo_output", "yolo_postprocess", "scale_boxes"]


def decode_yolo_output(
    output: Tensor,
    anchors: Sequence[Tuple[float, float]],
    num_classes: int,
    input_size: Tuple[int, int],
    new_coords: bool = False,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Decode one ``[yolo]`` output.

    Args:
        output: ``Tensor[N, A*(5+K), H, W]``, the ``[yolo]`` layer output.
        anchors: the ``A`` masked anchors ``(w, h)`` in input pixels (``Yolo.masked_anchors``).
        num_classes: ``K``.
        input_size: ``(H_in, W_in)`` of the network input in pixels.
        new_coords: the layer's ``new_coords``.

    Returns:
        ``boxes Tensor[N, A*H*W, 4]`` (xyxy, input pixels), ``objectness Tensor[N, A*H*W]``,
        ``class_probs Tensor[N, A*H*W, K]``; the order is anchor, row, column (Darknet's).
    """
    if output.dim() != 4:
        raise ValueError(f"output: expected Tensor[N, A*(5+K), H, W], got shape {tuple(output.shape)}")
    n, c, h, w = output.shape
    a = len(anchors)
    if c != a * (5 + num_classes):
        raise ValueError(f"output: expected {a}*(5+{num_classes}) = {a * (5 + num_classes)} channels "
                         f"for {a} anchors and {num_classes} classes, got {c}")
    in_h, in_w = input_size
    v = output.reshape(n, a, 5 + num_classes, h, w).to(torch.float32)
    gy, gx = torch.meshgrid(torch.arange(h, dtype=torch.float32, device=output.device),
                            torch.arange(w, dtype=torch.float32, device=output.device), indexing="ij")
    anc = torch.tensor(anchors, dtype=torch.float32, device=output.device).view(1, a, 2, 1, 1)
    cx = (gx + v[:, :, 0]) / w * in_w
    cy = (gy + v[:, :, 1]) / h * in_h
    if new_coords:
        wh = v[:, :, 2:4] * v[:, :, 2:4] * 4 * anc
    else:
        wh = torch.exp(v[:, :, 2:4]) * anc
    bw, bh = wh[:, :, 0], wh[:, :, 1]
    boxes = torch.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], dim=-1).reshape(n, -1, 4)
    obj = v[:, :, 4].reshape(n, -1)
    cls = v[:, :, 5:].permute(0, 1, 3, 4, 2).reshape(n, -1, num_classes)
    return boxes, obj, cls


def yolo_postprocess(
    outputs: Sequence[Tensor],
    yolo_layers: Sequence,
    input_size: Tuple[int, int],
    conf_thresh: float = 0.25,
    nms_thresh: float = 0.45,
    max_detections: int = 300,
) -> List[Dict[str, Tensor]]:
    """Boxes for a batch from all ``[yolo]`` outputs of a model.

    Args:
        outputs: the ``[yolo]`` outputs (``DarknetModel(x)``), each ``Tensor[N, A*(5+K), H, W]``.
        yolo_layers: matching layer objects with ``masked_anchors``, ``classes``, ``new_coords``
            (``DarknetModel.yolo_layers``).
        input_size: ``(H_in, W_in)`` of the input tensor.
        conf_thresh: keep a (box, class) pair if ``obj > conf_thresh`` and ``obj*cls > conf_thresh``.
        nms_thresh: IoU threshold of the per-class NMS.
        max_detections: keep at most this many per image (highest scores).

    Returns:
        list of ``{"boxes": Tensor[M, 4] xyxy float, "scores": Tensor[M], "labels": int64 Tensor[M]}``.
    """
    if len(outputs) != len(yolo_layers):
        raise ValueError(f"got {len(outputs)} outputs for {len(yolo_layers)} [yolo] layers")
    all_boxes, all_scores = [], []
    num_classes = None
    for out, layer in zip(outputs, yolo_layers):
        if num_classes is not None and layer.classes != num_classes:
            raise ValueError("all [yolo] layers must have the same number of classes")
        num_classes = layer.classes
        b, o, c = decode_yolo_output(out, layer.masked_anchors, layer.classes, input_size, layer.new_coords)
        all_boxes.append(b)
        all_scores.append(o.unsqueeze(-1) * c * (o.unsqueeze(-1) > conf_thresh))
    boxes = torch.cat(all_boxes, 1)
    scores = torch.cat(all_scores, 1)
    results = []
    for bi in range(boxes.shape[0]):
        idx, cls = torch.nonzero(scores[bi] > conf_thresh, as_tuple=True)
        bxs, scs = boxes[bi, idx], scores[bi, idx, cls]
        keep = batched_nms(bxs, scs, cls, nms_thresh)[:max_detections]
        results.append({"boxes": bxs[keep], "scores": scs[keep], "labels": cls[keep].to(torch.int64)})
    return results


def scale_boxes(boxes: Tensor, from_size: Tuple[int, int], to_size: Tuple[int, int]) -> Tensor:
    """Rescale xyxy ``boxes`` from a ``(H, W)`` image to another ``(H, W)`` (plain resize)."""
    sy, sx = to_size[0] / from_size[0], to_size[1] / from_size[1]
    return boxes * torch.tensor([sx, sy, sx, sy], dtype=boxes.dtype, device=boxes.device)
