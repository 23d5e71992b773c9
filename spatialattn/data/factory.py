"""``build_dataset``: one entry point from a command-line string to a dataset.

``source`` is ``"synthetic"`` (the built-in dataset; aliases ``"builtin"``, ``"shapes"``) or a path:

* ``*.json`` - COCO annotation file (images in ``image_dir``, default the JSON's folder);
* ``*.yaml`` / ``*.yml`` - YOLO ``data.yaml``;
* a folder holding ``data.yaml`` - YOLO;
* a folder holding ``annotations/instances_{split}.json`` - COCO, images in ``images/{split}``
  (the :func:`~spatialattn.data.export_coco` layout) or ``{split}2017`` (the COCO 2017 layout);
* a folder holding ``Annotations/`` - Pascal VOC.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence, Union

from .base import DatasetSubset, DetectionDataset
from .coco import CocoDataset
from .errors import DatasetError
from .synthetic import SyntheticShapes
from .voc import VocDataset
from .yolo import YoloDataset

__all__ = ["build_dataset", "SYNTHETIC_NAMES"]

SYNTHETIC_NAMES = ("synthetic", "builtin", "shapes")


def build_dataset(source: Union[str, os.PathLike] = "synthetic", split: str = "train", *,
                  image_dir: Optional[Union[str, os.PathLike]] = None,
                  classes: Optional[Sequence[str]] = None, num_images: Optional[int] = None,
                  image_size: int = 160, seed: int = 0) -> DetectionDataset:
    """Open the dataset ``source`` (see the module docstring) for ``split``.

    Args:
        source: ``"synthetic"`` or a path.
        split: ``"train"`` / ``"val"`` / ``"test"``.
        image_dir: COCO image folder (overrides the default).
        classes: VOC class names (overrides ``classes.txt`` / the 20 VOC classes).
        num_images: built-in dataset: its length; files: keep only the first ``num_images``.
        image_size, seed: built-in dataset only.
    """
    s = os.fspath(source)
    if s.lower() in SYNTHETIC_NAMES:
        return SyntheticShapes(split, num_images=num_images, image_size=image_size, seed=seed)
    p = Path(s)
    ds: DetectionDataset
    if p.is_file() and p.suffix.lower() == ".json":
        ds = CocoDataset(p, image_dir)
    elif p.is_file() and p.suffix.lower() in (".yaml", ".yml"):
        ds = YoloDataset(p, split)
    elif p.is_dir() and (p / "data.yaml").is_file():
        ds = YoloDataset(p / "data.yaml", split)
    elif p.is_dir() and (p / "annotations" / f"instances_{split}.json").is_file():
        if image_dir is None:
            cands = [p / "images" / split, p / f"{split}2017", p / split]
            image_dir = next((c for c in cands if c.is_dir()), cands[0])
        ds = CocoDataset(p / "annotations" / f"instances_{split}.json", image_dir)
    elif p.is_dir() and (p / "Annotations").is_dir():
        ds = VocDataset(p, split, classes=classes)
    elif not p.exists():
        raise DatasetError(f"no such file or folder (expected one of {list(SYNTHETIC_NAMES)} or a "
                           "dataset path)", p)
    else:
        raise DatasetError(f"cannot tell the format of '{p}' for split '{split}': expected a COCO "
                           f".json, a YOLO data.yaml, a folder with data.yaml, a folder with "
                           f"annotations/instances_{split}.json, or a VOC folder with Annotations/", p)
    if num_images is not None and num_images < len(ds):
        ds = DatasetSubset(ds, range(int(num_images)))
    return ds
