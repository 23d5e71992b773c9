"""YOLO txt + ``data.yaml`` datasets (ultralytics layout): :class:`YoloDataset`, :func:`export_yolo`.

``data.yaml`` keys: ``path`` (dataset root; default the yaml's folder, a relative ``path`` is taken
relative to the yaml's folder - ultralytics would take it relative to its ``datasets_dir``, so the
writer stores an absolute path), ``train`` / ``val`` / ``test`` (an image folder, a ``.txt`` list of
images, or a list of those; relative to the root), ``names`` (a list, or a dict ``{0: name, ...}``
with keys ``0..K-1``) and optionally ``nc`` (must equal the number of names).

The label file of ``.../images/.../x.png`` is ``.../labels/.../x.txt`` (the last ``images`` folder
swapped for ``labels``); a missing label file means an image without objects. Each non-blank line
is ``class x_center y_center width height`` with coordinates normalised to ``[0, 1]``.

Label files are validated at construction (fields, numbers, class range, values in ``[0, 1]``,
``width``/``height`` > 0); the pixel box is checked against the image size when the image (or its
header, for :meth:`~YoloDataset.record`) is read.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np
import yaml

from .base import (DetectionDataset, Record, check_boxes, image_size, progress_iter, read_image,
                   read_text_file, save_png)
from .errors import DatasetError

__all__ = ["YoloDataset", "export_yolo", "load_yaml", "IMAGE_EXTENSIONS", "label_path_for"]

PathLike = Union[str, os.PathLike]
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def load_yaml(path: PathLike) -> Any:
    """``yaml.safe_load`` of a file; errors name the file and line."""
    text = read_text_file(path)
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1} column {mark.column + 1}" if mark is not None else None
        problem = getattr(e, "problem", None) or str(e)
        raise DatasetError(f"malformed YAML: {problem}", path, where) from None


def label_path_for(image: Path) -> Path:
    """``.../images/.../x.jpg`` -> ``.../labels/.../x.txt`` (ultralytics convention)."""
    parts = list(image.parts)
    for k in range(len(parts) - 2, -1, -1):
        if parts[k] == "images":
            parts[k] = "labels"
            break
    return Path(*parts).with_suffix(".txt")


def _parse_names(names: Any, f: Path) -> List[str]:
    if isinstance(names, list):
        return [str(n) for n in names]
    if isinstance(names, dict):
        keys = sorted(names)
        if not all(isinstance(k, int) and not isinstance(k, bool) for k in keys) or keys != list(range(len(keys))):
            raise DatasetError(f"expected 'names' keys 0..{len(keys) - 1}, found {keys}", f)
        return [str(names[k]) for k in keys]
    raise DatasetError(f"expected 'names' as a list or a dict {{index: name}}, found "
                       f"{type(names).__name__ if names is not None else 'nothing'}", f)


def _parse_label_file(path: Path, num_classes: int) -> Tuple[np.ndarray, np.ndarray, List[int]]:
    """``(labels [N], cxcywh [N, 4] normalised, line numbers)`` of one label file."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"cannot read label file ({e})", path) from None
    labels, boxes, lines = [], [], []
    for ln, line in enumerate(text.splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        where = f"line {ln}"
        if len(fields) != 5:
            raise DatasetError(f"expected 5 fields 'class x_center y_center width height', found "
                               f"{len(fields)}: {line.strip()!r}", path, where)
        try:
            cls_f = float(fields[0])
            vals = [float(v) for v in fields[1:]]
        except ValueError:
            raise DatasetError(f"expected numbers, found {line.strip()!r}", path, where) from None
        if not cls_f.is_integer():
            raise DatasetError(f"expected an integer class id, found {fields[0]!r}", path, where)
        cls = int(cls_f)
        if not 0 <= cls < num_classes:
            raise DatasetError(f"class id {cls} out of range: expected 0..{num_classes - 1} "
                               f"({num_classes} names)", path, where)
        if not all(np.isfinite(v) and 0.0 <= v <= 1.0 for v in vals):
            raise DatasetError(f"expected normalised values in [0, 1], found {fields[1:]}", path, where)
        if vals[2] <= 0 or vals[3] <= 0:
            raise DatasetError(f"expected width > 0 and height > 0 (x2 > x1, y2 > y1), found "
                               f"width={fields[3]} height={fields[4]}", path, where)
        labels.append(cls)
        boxes.append(vals)
        lines.append(ln)
    return (np.asarray(labels, np.int64), np.asarray(boxes, np.float64).reshape(-1, 4), lines)


class YoloDataset(DetectionDataset):
    """A detection dataset in YOLO txt format described by an ultralytics-style ``data.yaml``.

    Args:
        data_yaml: the ``data.yaml`` file.
        split: key of the split to read (``"train"``, ``"val"`` or ``"test"``).

    Raises:
        DatasetError: malformed YAML, missing keys, missing image folders/files, or bad label lines
        (wrong field count, non-numbers, class id out of range, values outside ``[0, 1]``, zero
        width/height); the message names the file and line.
    """

    def __init__(self, data_yaml: PathLike, split: str = "train") -> None:
        self.data_yaml = f = Path(data_yaml)
        cfg = load_yaml(f)
        if not isinstance(cfg, dict):
            raise DatasetError(f"expected a mapping at the top level, found {type(cfg).__name__}", f)
        self.classes = _parse_names(cfg.get("names"), f)
        if "nc" in cfg and cfg["nc"] != len(self.classes):
            raise DatasetError(f"'nc' is {cfg['nc']!r} but 'names' has {len(self.classes)} entries", f)
        root = Path(cfg["path"]) if cfg.get("path") else Path(".")
        self.root = root if root.is_absolute() else (f.parent / root)
        if split not in cfg or cfg[split] in (None, ""):
            raise DatasetError(f"no '{split}' entry (expected a folder, .txt list or list of them; "
                               f"keys found: {sorted(map(str, cfg))})", f)
        self.split = split
        sources = cfg[split] if isinstance(cfg[split], list) else [cfg[split]]
        images: List[Path] = []
        for src in sources:
            images.extend(self._collect(self.root / str(src), f))
        self._images = images
        self._labels: List[np.ndarray] = []
        self._boxes: List[np.ndarray] = []
        self._lines: List[List[int]] = []
        self._label_files: List[Path] = []
        for img in images:
            lp = label_path_for(img)
            if lp.is_file():
                labels, boxes, lines = _parse_label_file(lp, len(self.classes))
            else:
                labels, boxes, lines = np.zeros(0, np.int64), np.zeros((0, 4)), []
            self._labels.append(labels)
            self._boxes.append(boxes)
            self._lines.append(lines)
            self._label_files.append(lp)
        self._sizes: Dict[int, Tuple[int, int]] = {}

    @staticmethod
    def _collect(src: Path, f: Path) -> List[Path]:
        if src.is_dir():
            return sorted(p for p in src.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        if src.is_file() and src.suffix.lower() == ".txt":
            out = []
            for ln, line in enumerate(src.read_text(encoding="utf-8").splitlines(), 1):
                line = line.strip()
                if not line:
                    continue
                p = Path(line)
                p = p if p.is_absolute() else src.parent / p
                if not p.is_file():
                    raise DatasetError(f"image file not found: {p}", src, f"line {ln}")
                out.append(p)
            return out
        raise DatasetError(f"split source {src} is neither an image folder nor a .txt list of images", f)

    def __len__(self) -> int:
        return len(self._images)

    def image_path(self, index: int) -> Path:
        return self._images[self._check_index(index)]

    def _record(self, index: int, width: int, height: int) -> Record:
        cx, cy, w, h = self._boxes[index].T
        xyxy = np.stack([(cx - w / 2) * width, (cy - h / 2) * height,
                         (cx + w / 2) * width, (cy + h / 2) * height], 1)
        lines = self._lines[index]
        boxes = check_boxes(xyxy, width, height, self._label_files[index], lambda i: f"line {lines[i]}")
        return Record(index, str(self._images[index]), width, height, boxes, self._labels[index])

    def record(self, index: int) -> Record:
        index = self._check_index(index)
        if index not in self._sizes:
            self._sizes[index] = image_size(self._images[index])
        return self._record(index, *self._sizes[index])

    def load_image(self, index: int) -> np.ndarray:
        return read_image(self.image_path(index))

    def sample(self, index: int) -> Tuple[np.ndarray, Record]:
        index = self._check_index(index)
        arr = self.load_image(index)
        return arr, self._record(index, arr.shape[1], arr.shape[0])

    def __repr__(self) -> str:
        return (f"YoloDataset(data_yaml='{self.data_yaml}', split={self.split!r}, images={len(self)}, "
                f"classes={self.classes})")


def export_yolo(dataset: DetectionDataset, out_dir: PathLike, split: str = "val",
                num_images: Optional[int] = None, progress: bool = False) -> Path:
    """Write ``dataset`` (its first ``num_images`` images) in YOLO format.

    Layout: ``OUT/images/{split}/{image_id:06d}.png``, ``OUT/labels/{split}/{image_id:06d}.txt``
    (``class cx cy w h``, 6 decimals, i.e. within ``1e-6 * image size`` px of the held boxes), and
    ``OUT/data.yaml`` (absolute ``path``, ``names``, ``nc``, and the splits written so far: an
    existing ``data.yaml`` with the same names is updated, so ``train`` and ``val`` can be written
    one after the other). Crowd boxes are written like the others (YOLO has no crowd flag).

    Returns:
        Path of ``OUT/data.yaml``.
    """
    out = Path(out_dir)
    n = len(dataset) if num_images is None else min(int(num_images), len(dataset))
    for i in progress_iter(range(n), progress, f"yolo {split}"):
        arr, rec = dataset.sample(i)
        stem = f"{rec.image_id:06d}"
        save_png(arr, out / "images" / split / f"{stem}.png")
        W, H = float(rec.width), float(rec.height)
        lines = []
        for (x1, y1, x2, y2), c in zip(rec.boxes.tolist(), rec.labels.tolist()):
            lines.append(f"{c} {(x1 + x2) / 2 / W:.6f} {(y1 + y2) / 2 / H:.6f} "
                         f"{(x2 - x1) / W:.6f} {(y2 - y1) / H:.6f}")
        lp = out / "labels" / split / f"{stem}.txt"
        lp.parent.mkdir(parents=True, exist_ok=True)
        lp.write_text("\n".join(lines) + ("\n" if lines else ""), encoding="utf-8")
    (out / "labels" / split).mkdir(parents=True, exist_ok=True)
    (out / "images" / split).mkdir(parents=True, exist_ok=True)
    yml = out / "data.yaml"
    cfg: Dict[str, Any] = {}
    if yml.is_file():
        old = load_yaml(yml)
        if isinstance(old, dict) and old.get("names") is not None and _parse_names(old["names"], yml) == list(dataset.classes):
            cfg = old
    cfg.update({"path": str(out.resolve()), split: f"images/{split}",
                "nc": len(dataset.classes), "names": list(dataset.classes)})
    ordered = {k: cfg[k] for k in ("path", "train", "val", "test") if k in cfg}
    ordered.update({k: v for k, v in cfg.items() if k not in ordered})
    yml.write_text(yaml.safe_dump(ordered, sort_keys=False), encoding="utf-8")
    return yml
