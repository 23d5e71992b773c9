"""Pascal VOC XML detection datasets: :class:`VocDataset` and :func:`export_voc`.

Layout::

    ROOT/Annotations/<id>.xml
    ROOT/JPEGImages/<filename from the XML>     (or <id>.jpg when the XML has no <filename>)
    ROOT/ImageSets/Main/<split>.txt             (optional: one <id> per line)
    ROOT/classes.txt                            (optional: one class name per line)

Without ``ImageSets/Main`` every XML under ``Annotations/`` (or directly under ``ROOT``) is read.
Classes come from the ``classes`` argument, else ``ROOT/classes.txt``, else the 20 Pascal VOC
classes. VOC pixel coordinates are 1-based and inclusive; they become ``xyxy`` as
``(xmin - 1, ymin - 1, xmax, ymax)`` (the detectron2 convention; the writer inverts it).
``<difficult>1</difficult>`` objects are kept with ``iscrowd = 1``, so the COCO evaluation ignores
them as the VOC protocol does (or drop them with ``keep_difficult=False``).
"""
from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np

from .base import DetectionDataset, Record, check_boxes, image_size, progress_iter, read_image, save_png
from .errors import DatasetError

__all__ = ["VocDataset", "export_voc", "VOC_CLASSES"]

PathLike = Union[str, os.PathLike]

VOC_CLASSES: Tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor")


def _text(el: ET.Element, tag: str) -> Optional[str]:
    child = el.find(tag)
    return None if child is None or child.text is None else child.text.strip()


class _Ann:
    __slots__ = ("xml", "image", "width", "height", "boxes", "labels", "difficult", "where")

    def __init__(self, xml: Path, image: Path, width: Optional[int], height: Optional[int],
                 boxes: np.ndarray, labels: np.ndarray, difficult: np.ndarray, where: List[str]) -> None:
        self.xml, self.image, self.width, self.height = xml, image, width, height
        self.boxes, self.labels, self.difficult, self.where = boxes, labels, difficult, where


class VocDataset(DetectionDataset):
    """A detection dataset in Pascal VOC XML format.

    Args:
        root: dataset root (see the module docstring for the layout).
        split: ``ImageSets/Main/<split>.txt`` to read; ``None`` reads every XML.
        classes: class names (order = label index); default ``classes.txt`` or :data:`VOC_CLASSES`.
        image_dir: image folder relative to ``root``.
        keep_difficult: keep ``difficult`` objects (as ``iscrowd = 1``).

    Raises:
        DatasetError: malformed XML (with line/column), missing ``<name>``/``<bndbox>`` fields,
        non-numeric coordinates, unknown class names, ``xmax < xmin`` / ``ymax < ymin``, boxes
        outside the ``<size>`` of the image, ids in the split file without an XML.
    """

    def __init__(self, root: PathLike, split: Optional[str] = "train",
                 classes: Optional[Sequence[str]] = None, image_dir: str = "JPEGImages",
                 keep_difficult: bool = True) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise DatasetError("VOC root folder not found", self.root)
        ann_dir = self.root / "Annotations"
        if not ann_dir.is_dir():
            ann_dir = self.root
        self.image_dir = self.root / image_dir
        if classes is None:
            cf = self.root / "classes.txt"
            classes = ([ln.strip() for ln in cf.read_text(encoding="utf-8").splitlines() if ln.strip()]
                       if cf.is_file() else list(VOC_CLASSES))
        self.classes = list(classes)
        self.split = split
        self.keep_difficult = keep_difficult
        sets = self.root / "ImageSets" / "Main"
        xmls: List[Path] = []
        if split is not None and sets.is_dir():
            sf = sets / f"{split}.txt"
            if not sf.is_file():
                raise DatasetError(f"split file for '{split}' not found (have: "
                                   f"{sorted(p.stem for p in sets.glob('*.txt'))})", sf)
            for ln, line in enumerate(sf.read_text(encoding="utf-8").splitlines(), 1):
                if not line.strip():
                    continue
                x = ann_dir / f"{line.split()[0]}.xml"
                if not x.is_file():
                    raise DatasetError(f"annotation file not found: {x}", sf, f"line {ln}")
                xmls.append(x)
        else:
            xmls = sorted(ann_dir.glob("*.xml"))
        self._anns = [self._parse(x) for x in xmls]

    def _parse(self, xml: Path) -> _Ann:
        try:
            root = ET.parse(xml).getroot()
        except ET.ParseError as e:
            line, col = e.position
            raise DatasetError(f"malformed XML: {e}", xml, f"line {line} column {col + 1}") from None
        except OSError as e:
            raise DatasetError(f"cannot read annotation file ({e})", xml) from None
        if root.tag != "annotation":
            raise DatasetError(f"expected root element <annotation>, found <{root.tag}>", xml)
        fname = _text(root, "filename") or f"{xml.stem}.jpg"
        width = height = None
        size = root.find("size")
        if size is not None:
            try:
                width, height = int(float(_text(size, "width") or 0)), int(float(_text(size, "height") or 0))
            except ValueError:
                raise DatasetError("expected numeric <size><width>/<height>", xml) from None
            if width <= 0 or height <= 0:
                width = height = None  # unknown: taken from the image header
        name_to_label = {n: k for k, n in enumerate(self.classes)}
        boxes, labels, diff, where = [], [], [], []
        for k, obj in enumerate(root.findall("object")):
            name = _text(obj, "name")
            w = f"object[{k}]" + (f" ({name})" if name else "")
            if not name:
                raise DatasetError("expected a <name>", xml, w)
            if name not in name_to_label:
                raise DatasetError(f"class {name!r} is not one of the {len(self.classes)} classes "
                                   f"{self.classes}", xml, w)
            d = _text(obj, "difficult") or "0"
            if d not in ("0", "1"):
                raise DatasetError(f"expected <difficult> 0 or 1, found {d!r}", xml, w)
            if d == "1" and not self.keep_difficult:
                continue
            bb = obj.find("bndbox")
            if bb is None:
                raise DatasetError("expected a <bndbox>", xml, w)
            try:
                vals = [float(_text(bb, t)) for t in ("xmin", "ymin", "xmax", "ymax")]  # type: ignore[arg-type]
            except (TypeError, ValueError):
                raise DatasetError("expected numeric <xmin> <ymin> <xmax> <ymax> in <bndbox>, found "
                                   f"{[_text(bb, t) for t in ('xmin', 'ymin', 'xmax', 'ymax')]}", xml, w) from None
            xmin, ymin, xmax, ymax = vals
            if xmax < xmin or ymax < ymin:
                raise DatasetError(f"expected xmax >= xmin and ymax >= ymin, found xmin={xmin:g} "
                                   f"ymin={ymin:g} xmax={xmax:g} ymax={ymax:g}", xml, w)
            boxes.append((xmin - 1, ymin - 1, xmax, ymax))
            labels.append(name_to_label[name])
            diff.append(int(d))
            where.append(w)
        b = np.asarray(boxes, np.float64).reshape(-1, 4)
        if width is not None and len(b):
            b = check_boxes(b, width, height, xml, lambda i: where[i])
        return _Ann(xml, self.image_dir / fname, width, height, b.astype(np.float32),
                    np.asarray(labels, np.int64), np.asarray(diff, np.int64), where)

    def __len__(self) -> int:
        return len(self._anns)

    def image_path(self, index: int) -> Path:
        return self._anns[self._check_index(index)].image

    def _record(self, index: int, width: int, height: int) -> Record:
        a = self._anns[index]
        boxes = check_boxes(a.boxes, width, height, a.xml, lambda i: a.where[i])
        return Record(index, str(a.image), width, height, boxes, a.labels, a.difficult)

    def record(self, index: int) -> Record:
        index = self._check_index(index)
        a = self._anns[index]
        if a.width is None:
            a.width, a.height = image_size(a.image)
        return self._record(index, a.width, a.height)

    def load_image(self, index: int) -> np.ndarray:
        return read_image(self.image_path(index))

    def __repr__(self) -> str:
        return (f"VocDataset(root='{self.root}', split={self.split!r}, images={len(self)}, "
                f"classes={self.classes})")


def export_voc(dataset: DetectionDataset, out_dir: PathLike, split: str = "val",
               num_images: Optional[int] = None, progress: bool = False) -> Path:
    """Write ``dataset`` (its first ``num_images`` images) in Pascal VOC layout.

    Files: ``OUT/Annotations/{split}_{image_id:06d}.xml``, ``OUT/JPEGImages/<same stem>.png``,
    ``OUT/ImageSets/Main/{split}.txt`` and ``OUT/classes.txt``. Coordinates are written as
    ``xmin = x1 + 1, ymin = y1 + 1, xmax = x2, ymax = y2`` (exact for integer boxes; others keep
    their fraction); crowd boxes become ``difficult``.

    Returns:
        The root folder ``OUT``.
    """
    out = Path(out_dir)
    (out / "Annotations").mkdir(parents=True, exist_ok=True)
    (out / "ImageSets" / "Main").mkdir(parents=True, exist_ok=True)
    n = len(dataset) if num_images is None else min(int(num_images), len(dataset))
    ids = []
    for i in progress_iter(range(n), progress, f"voc {split}"):
        arr, rec = dataset.sample(i)
        stem = f"{split}_{rec.image_id:06d}"
        save_png(arr, out / "JPEGImages" / f"{stem}.png")
        ann = ET.Element("annotation")
        ET.SubElement(ann, "folder").text = "JPEGImages"
        ET.SubElement(ann, "filename").text = f"{stem}.png"
        size = ET.SubElement(ann, "size")
        for tag, v in (("width", rec.width), ("height", rec.height), ("depth", 3)):
            ET.SubElement(size, tag).text = str(int(v))
        for (x1, y1, x2, y2), c, crowd in zip(rec.boxes.tolist(), rec.labels.tolist(), rec.iscrowd.tolist()):
            obj = ET.SubElement(ann, "object")
            ET.SubElement(obj, "name").text = dataset.classes[c]
            ET.SubElement(obj, "difficult").text = str(int(crowd))
            bb = ET.SubElement(obj, "bndbox")
            for tag, v in (("xmin", x1 + 1), ("ymin", y1 + 1), ("xmax", x2), ("ymax", y2)):
                ET.SubElement(bb, tag).text = f"{v:g}" if float(v).is_integer() else f"{v:.3f}"
        ET.indent(ann)
        ET.ElementTree(ann).write(out / "Annotations" / f"{stem}.xml", encoding="utf-8", xml_declaration=False)
        ids.append(stem)
    (out / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(s + "\n" for s in ids), encoding="utf-8")
    (out / "classes.txt").write_text("".join(c + "\n" for c in dataset.classes), encoding="utf-8")
    return out
