"""Detection datasets: the built-in :class:`SyntheticShapes`, COCO JSON, YOLO txt and Pascal VOC
readers and writers, detection transforms, and batching.

Every dataset yields ``(image Tensor[3, H, W] in [0, 1], target)`` with ``target["boxes"]``
(``[N, 4]`` float32 xyxy pixels) and ``target["labels"]`` (``[N]`` int64, 0-based), exposes
``.classes`` and ``.coco_gt()``, and raises :class:`DatasetError` on bad data.
"""
from __future__ import annotations

from .base import DatasetSubset, DetectionDataset, Record
from .coco import CocoDataset, export_coco
from .collate import detection_collate
from .errors import BOX_TOLERANCE_PX, DatasetError
from .export import EXPORT_FORMATS, export_dataset
from .factory import build_dataset
from .synthetic import SYNTHETIC_CLASSES, SyntheticShapes, render_sample
from .transforms import TransformedDataset, build_transforms
from .voc import VOC_CLASSES, VocDataset, export_voc
from .yolo import YoloDataset, export_yolo

__all__ = [
    "BOX_TOLERANCE_PX", "CocoDataset", "DatasetError", "DatasetSubset", "DetectionDataset",
    "EXPORT_FORMATS", "Record", "SYNTHETIC_CLASSES", "SyntheticShapes", "TransformedDataset",
    "VOC_CLASSES", "VocDataset", "YoloDataset", "build_dataset", "build_transforms",
    "detection_collate", "export_coco", "export_dataset", "export_voc", "export_yolo",
    "render_sample",
]
