"""Write any :class:`~spatialattn.data.base.DetectionDataset` as COCO JSON, YOLO txt or VOC XML."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

from .base import DetectionDataset
from .coco import export_coco
from .voc import export_voc
from .yolo import export_yolo

__all__ = ["export_dataset", "EXPORT_FORMATS"]

EXPORT_FORMATS = {"coco": export_coco, "yolo": export_yolo, "voc": export_voc}


def export_dataset(dataset: DetectionDataset, out_dir: Union[str, os.PathLike], fmt: str = "coco",
                   split: str = "val", num_images: Optional[int] = None, progress: bool = False) -> Path:
    """Write the first ``num_images`` images of ``dataset`` (all by default) in format ``fmt``.

    Images are written as PNG. Returns the file to point a reader at: the COCO ``instances_{split}
    .json``, the YOLO ``data.yaml``, or the VOC root folder.
    """
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"format must be one of {sorted(EXPORT_FORMATS)}, got {fmt!r}")
    return EXPORT_FORMATS[fmt](dataset, out_dir, split=split, num_images=num_images, progress=progress)
