"""COCO JSON detection datasets: reader (:class:`CocoDataset`) and writer (:func:`export_coco`).

Reading validates the whole annotation file at construction (cheap) and images lazily at
``__getitem__``. Category ids may be any integers; they map to 0-based contiguous ``labels`` in
ascending id order (``dataset.category_ids[label]`` gives the original id back). Crowd annotations
are kept with ``iscrowd = 1`` (evaluation ignores them; a training loop may drop them).

Layout written by :func:`export_coco`::

    OUT/annotations/instances_{split}.json
    OUT/images/{split}/{image_id:06d}.png
"""
from __future__ import annotations

import json
import math
import os
from numbers import Integral, Real
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import numpy as np

from .base import DetectionDataset, Record, check_boxes, progress_iter, read_image, read_text_file, save_png
from .errors import DatasetError

__all__ = ["CocoDataset", "export_coco", "load_json"]

PathLike = Union[str, os.PathLike]


def load_json(path: PathLike) -> Any:
    """Parse a JSON file; errors name the file and the line/column."""
    text = read_text_file(path, "annotation file")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DatasetError(f"malformed JSON: {e.msg}", path, f"line {e.lineno} column {e.colno}") from None


def _is_int(v: Any) -> bool:
    return isinstance(v, Integral) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, Real) and not isinstance(v, bool) and math.isfinite(float(v))


class CocoDataset(DetectionDataset):
    """A detection dataset in COCO JSON format.

    Args:
        ann_file: the ``instances_*.json`` file.
        image_dir: folder that ``file_name`` is relative to; default the folder of ``ann_file``.

    Raises:
        DatasetError: malformed JSON, missing/ill-typed fields, duplicate ids, annotations that
        reference unknown images or categories, or boxes with ``w <= 0`` / ``h <= 0`` / outside the
        image (see :data:`~spatialattn.data.errors.BOX_TOLERANCE_PX`); the message names the file
        and ``images[i]`` / ``annotations[i] (id=...)`` / ``categories[i]``.
    """

    def __init__(self, ann_file: PathLike, image_dir: Optional[PathLike] = None) -> None:
        self.ann_file = Path(ann_file)
        self.image_dir = Path(image_dir) if image_dir is not None else self.ann_file.parent
        data = load_json(self.ann_file)
        f = self.ann_file
        if not isinstance(data, dict):
            raise DatasetError(f"expected a JSON object at the top level, found {type(data).__name__}", f)
        for key in ("images", "categories"):
            if not isinstance(data.get(key), list):
                raise DatasetError(f"expected a list under '{key}', found "
                                   f"{type(data.get(key)).__name__ if key in data else 'nothing'}", f)
        anns = data.get("annotations", [])
        if not isinstance(anns, list):
            raise DatasetError(f"expected a list under 'annotations', found {type(anns).__name__}", f)

        cats: Dict[int, str] = {}
        for i, c in enumerate(data["categories"]):
            if not isinstance(c, dict) or not _is_int(c.get("id")):
                raise DatasetError("expected an object with an integer 'id'", f, f"categories[{i}]")
            if c["id"] in cats:
                raise DatasetError(f"duplicate category id {c['id']}", f, f"categories[{i}]")
            cats[int(c["id"])] = str(c.get("name", c["id"]))
        self.category_ids: List[int] = sorted(cats)
        self.classes = [cats[c] for c in self.category_ids]
        cat_to_label = {c: k for k, c in enumerate(self.category_ids)}

        self._images: List[Dict[str, Any]] = []
        index_of: Dict[int, int] = {}
        for i, im in enumerate(data["images"]):
            where = f"images[{i}]"
            if not isinstance(im, dict):
                raise DatasetError(f"expected an object, found {type(im).__name__}", f, where)
            if not _is_int(im.get("id")):
                raise DatasetError(f"expected an integer 'id', found {im.get('id')!r}", f, where)
            if not isinstance(im.get("file_name"), str) or not im["file_name"]:
                raise DatasetError(f"expected a string 'file_name', found {im.get('file_name')!r}", f, where)
            for k in ("width", "height"):
                if not _is_int(im.get(k)) or im[k] <= 0:
                    raise DatasetError(f"expected a positive integer '{k}', found {im.get(k)!r}", f, where)
            if im["id"] in index_of:
                raise DatasetError(f"duplicate image id {im['id']}", f, where)
            index_of[int(im["id"])] = len(self._images)
            self._images.append({"id": int(im["id"]), "file_name": im["file_name"],
                                 "width": int(im["width"]), "height": int(im["height"])})

        n = len(anns)
        boxes = np.zeros((n, 4), np.float64)
        labels = np.zeros(n, np.int64)
        crowd = np.zeros(n, np.int64)
        owner = np.zeros(n, np.int64)
        for j, a in enumerate(anns):
            where = f"annotations[{j}]" + (f" (id={a.get('id')})" if isinstance(a, dict) and "id" in a else "")
            if not isinstance(a, dict):
                raise DatasetError(f"expected an object, found {type(a).__name__}", f, where)
            if a.get("image_id") not in index_of:
                raise DatasetError(f"image_id {a.get('image_id')!r} is not in 'images'", f, where)
            if a.get("category_id") not in cat_to_label:
                raise DatasetError(f"category_id {a.get('category_id')!r} is not in 'categories' "
                                   f"(ids {self.category_ids})", f, where)
            bb = a.get("bbox")
            if not isinstance(bb, list) or len(bb) != 4 or not all(_is_num(v) for v in bb):
                raise DatasetError(f"expected 'bbox' as 4 finite numbers [x, y, w, h], found {bb!r}", f, where)
            ic = a.get("iscrowd", 0)
            if ic not in (0, 1) or isinstance(ic, bool):
                raise DatasetError(f"expected 'iscrowd' 0 or 1, found {ic!r}", f, where)
            x, y, w, h = (float(v) for v in bb)
            boxes[j] = (x, y, x + w, y + h)
            labels[j] = cat_to_label[a["category_id"]]
            crowd[j] = ic
            owner[j] = index_of[a["image_id"]]

        def where_ann(j: int) -> str:
            a = anns[j]
            return f"annotations[{j}]" + (f" (id={a['id']})" if "id" in a else "")

        widths = np.array([im["width"] for im in self._images], np.float64)
        heights = np.array([im["height"] for im in self._images], np.float64)
        if n:
            boxes = check_boxes(boxes, widths[owner], heights[owner], f, where_ann)
        order = np.argsort(owner, kind="stable")
        splits = np.searchsorted(owner[order], np.arange(len(self._images) + 1))
        self._ann_index = [order[splits[i]:splits[i + 1]] for i in range(len(self._images))]
        self._boxes, self._labels, self._crowd = boxes.astype(np.float32), labels, crowd

    def __len__(self) -> int:
        return len(self._images)

    def image_path(self, index: int) -> Path:
        return self.image_dir / self._images[self._check_index(index)]["file_name"]

    def record(self, index: int) -> Record:
        index = self._check_index(index)
        im, sel = self._images[index], self._ann_index[index]
        return Record(im["id"], str(self.image_dir / im["file_name"]), im["width"], im["height"],
                      self._boxes[sel], self._labels[sel], self._crowd[sel])

    def load_image(self, index: int) -> np.ndarray:
        return read_image(self.image_path(index))

    def __repr__(self) -> str:
        return (f"CocoDataset(ann_file='{self.ann_file}', image_dir='{self.image_dir}', "
                f"images={len(self)}, classes={self.classes})")


def export_coco(dataset: DetectionDataset, out_dir: PathLike, split: str = "val",
                num_images: Optional[int] = None, progress: bool = False) -> Path:
    """Write ``dataset`` (its first ``num_images`` images) as COCO JSON + PNG images.

    Category id of class ``label`` is ``label + 1``; image ids are the dataset's; boxes are written
    as ``[x, y, w, h]`` floats exactly as held (integers for the built-in dataset).

    Returns:
        Path of ``OUT/annotations/instances_{split}.json``; images go to ``OUT/images/{split}/``.
    """
    from .cocoapi import records_to_coco_dict

    out = Path(out_dir)
    img_dir = out / "images" / split
    n = len(dataset) if num_images is None else min(int(num_images), len(dataset))
    records: List[Record] = []
    for i in progress_iter(range(n), progress, f"coco {split}"):
        arr, rec = dataset.sample(i)
        name = f"{rec.image_id:06d}.png"
        save_png(arr, img_dir / name)
        records.append(Record(rec.image_id, name, rec.width, rec.height, rec.boxes, rec.labels, rec.iscrowd))
    data = records_to_coco_dict(records, dataset.classes)
    ann_file = out / "annotations" / f"instances_{split}.json"
    ann_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = ann_file.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data), encoding="utf-8")
    os.replace(tmp, ann_file)
    return ann_file

