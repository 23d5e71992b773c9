"""Build ``pycocotools`` objects in memory (no temporary files, no printing).

Conventions used across :mod:`spatialattn`: the COCO category id of class index ``label`` is
``label + 1``; annotation ids start at 1 (``COCOeval`` treats id 0 as "unmatched").
"""
from __future__ import annotations

import contextlib
import io
from typing import Any, Dict, Sequence

from .base import Record

__all__ = ["records_to_coco_dict", "records_to_coco", "coco_from_dict"]


def records_to_coco_dict(records: Sequence[Record], classes: Sequence[str]) -> Dict[str, Any]:
    """COCO JSON structure (``images``, ``annotations``, ``categories``) for ``records``.

    Boxes become ``[x, y, w, h]``; ``area`` is the box area; category id is ``label + 1``.
    """
    images, anns = [], []
    for rec in records:
        images.append({"id": int(rec.image_id), "file_name": str(rec.file_name),
                       "width": int(rec.width), "height": int(rec.height)})
        for box, label, crowd in zip(rec.boxes.tolist(), rec.labels.tolist(), rec.iscrowd.tolist()):
            x1, y1, x2, y2 = box
            w, h = x2 - x1, y2 - y1
            anns.append({"id": len(anns) + 1, "image_id": int(rec.image_id),
                         "category_id": int(label) + 1, "bbox": [x1, y1, w, h],
                         "area": w * h, "iscrowd": int(crowd)})
    cats = [{"id": i + 1, "name": str(n), "supercategory": "object"} for i, n in enumerate(classes)]
    return {"images": images, "annotations": anns, "categories": cats}


def coco_from_dict(dataset: Dict[str, Any]):
    """A ``pycocotools.coco.COCO`` built from an in-memory dict, silently."""
    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def records_to_coco(records: Sequence[Record], classes: Sequence[str]):
    """``pycocotools.coco.COCO`` ground truth for ``records``."""
    return coco_from_dict(records_to_coco_dict(records, classes))
