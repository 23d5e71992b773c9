"""The common shape of every detection dataset in :mod:`spatialattn.data`.

A dataset yields torchvision-style samples ``(image, target)``:

* ``image``: ``Tensor[3, H, W]`` float32 in ``[0, 1]`` (RGB);
* ``target``: ``dict`` with ``boxes`` (``Tensor[N, 4]`` float32, ``xyxy`` in pixels of this image),
  ``labels`` (``Tensor[N]`` int64, 0-based contiguous class index into ``dataset.classes``),
  ``iscrowd`` (``Tensor[N]`` int64; COCO ``iscrowd`` / VOC ``difficult``: such boxes are ignored by
  the COCO evaluation), ``image_id`` (``int``) and ``orig_size`` (``(H, W)``).

Annotations are kept apart from pixels (:class:`Record`), so ground truth for evaluation
(:meth:`DetectionDataset.coco_gt`) never decodes an image (only YOLO reads image headers for sizes).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from .errors import BOX_TOLERANCE_PX, DatasetError

__all__ = ["Record", "DetectionDataset", "DatasetSubset", "read_image", "image_size", "check_boxes",
           "image_to_tensor"]

PathLike = Union[str, os.PathLike]


@dataclass
class Record:
    """Annotation of one image, without its pixels.

    Attributes:
        image_id: integer id (COCO ``id``; the index for YOLO / VOC / built-in data).
        file_name: image path (or name, for the built-in dataset).
        width, height: image size in pixels.
        boxes: ``ndarray[N, 4]`` float32, ``xyxy`` pixels.
        labels: ``ndarray[N]`` int64, 0-based class index.
        iscrowd: ``ndarray[N]`` int64 (1 = ignore region in evaluation).
    """

    image_id: int
    file_name: str
    width: int
    height: int
    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))
    labels: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.int64))
    iscrowd: Optional[np.ndarray] = None

    def __post_init__(self) -> None:
        self.boxes = np.asarray(self.boxes, dtype=np.float32).reshape(-1, 4)
        self.labels = np.asarray(self.labels, dtype=np.int64).reshape(-1)
        if self.iscrowd is None:
            self.iscrowd = np.zeros(len(self.labels), np.int64)
        self.iscrowd = np.asarray(self.iscrowd, dtype=np.int64).reshape(-1)
        if not (len(self.boxes) == len(self.labels) == len(self.iscrowd)):
            raise ValueError(f"Record {self.image_id}: boxes/labels/iscrowd lengths differ: "
                             f"{len(self.boxes)}/{len(self.labels)}/{len(self.iscrowd)}")

    def target(self) -> Dict[str, Any]:
        """The torchvision-style target dict (new tensors, safe to modify)."""
        return {
            "boxes": torch.from_numpy(self.boxes.copy()),
            "labels": torch.from_numpy(self.labels.copy()),
            "iscrowd": torch.from_numpy(self.iscrowd.copy()),
            "image_id": int(self.image_id),
            "orig_size": (int(self.height), int(self.width)),
        }


def read_image(path: PathLike) -> np.ndarray:
    """Decode an image file to ``ndarray[H, W, 3]`` uint8 RGB.

    Raises:
        DatasetError: naming the file when it is missing or cannot be decoded.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            arr = np.array(im.convert("RGB"))
    except FileNotFoundError:
        raise DatasetError("image file not found", path) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise DatasetError(f"cannot read image ({type(e).__name__}: {e})", path) from None
    return arr


def read_text_file(path: PathLike, what: str = "file") -> str:
    """The UTF-8 text of ``path``; a missing or unreadable file is a :class:`DatasetError` naming it."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DatasetError(f"{what} not found", path) from None
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"cannot read {what} ({e})", path) from None


def image_size(path: PathLike) -> Tuple[int, int]:
    """``(width, height)`` from the image header only (no pixel decode)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return int(im.size[0]), int(im.size[1])
    except FileNotFoundError:
        raise DatasetError("image file not found", path) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise DatasetError(f"cannot read image ({type(e).__name__}: {e})", path) from None


def image_to_tensor(arr: np.ndarray) -> torch.Tensor:
    """``ndarray[H, W, 3]`` uint8 -> ``Tensor[3, H, W]`` float32 in ``[0, 1]``."""
    x = np.ascontiguousarray(np.asarray(arr).transpose(2, 0, 1), dtype=np.float32)
    np.divide(x, 255.0, out=x)
    return torch.from_numpy(x)


def check_boxes(boxes: np.ndarray, width: Union[float, np.ndarray], height: Union[float, np.ndarray],
                path: PathLike, where: Callable[[int], str],
                tolerance: float = BOX_TOLERANCE_PX) -> np.ndarray:
    """Validate ``xyxy`` pixel boxes against the image and clip them to it (vectorised).

    Args:
        boxes: ``ndarray[N, 4]``.
        width, height: image size in pixels (scalars, or ``ndarray[N]`` per box).
        path: file named in the error.
        where: maps a box index to its position in the file (``"line 4"``, ``"annotations[3]"``).
        tolerance: pixels a box may reach outside the image (see :data:`BOX_TOLERANCE_PX`).

    Returns:
        The boxes clipped to ``[0, width] x [0, height]`` (``ndarray[N, 4]`` float32).

    Raises:
        DatasetError: for the first box with non-finite values, ``x2 <= x1`` or ``y2 <= y1``, or
        that lies outside the image by more than ``tolerance``.
    """
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    W = np.broadcast_to(np.asarray(width, dtype=np.float64), (len(b),))
    H = np.broadcast_to(np.asarray(height, dtype=np.float64), (len(b),))
    x1, y1, x2, y2 = b.T
    finite = np.isfinite(b).all(1)
    ordered = finite & (x2 > x1) & (y2 > y1)
    inside = ordered & (x1 >= -tolerance) & (y1 >= -tolerance) & (x2 <= W + tolerance) & (y2 <= H + tolerance)
    out = b.copy()
    out[:, 0::2] = np.clip(out[:, 0::2], 0, W[:, None])
    out[:, 1::2] = np.clip(out[:, 1::2], 0, H[:, None])
    ok = inside & (out[:, 2] > out[:, 0]) & (out[:, 3] > out[:, 1])
    if not ok.all():
        i = int(np.nonzero(~ok)[0][0])
        xyxy = "[" + ", ".join(f"{v:g}" for v in b[i]) + "]"
        size = f"{W[i]:g}x{H[i]:g}"
        if not finite[i]:
            msg = f"box has non-finite coordinates xyxy={xyxy}"
        elif not ordered[i]:
            msg = f"expected a box with x2 > x1 and y2 > y1, found xyxy={xyxy}"
        elif not inside[i]:
            msg = f"box xyxy={xyxy} lies outside the {size} image (tolerance {tolerance:g} px)"
        else:
            msg = f"box xyxy={xyxy} has no area inside the {size} image"
        raise DatasetError(msg, path, where(i))
    return out.astype(np.float32)


class DetectionDataset(Dataset):
    """Base class: subclasses implement :meth:`__len__`, :meth:`record` and :meth:`load_image`.

    Attributes:
        classes: class names; ``labels`` index into this list.
    """

    classes: List[str]

    def __len__(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def record(self, index: int) -> Record:
        """Annotation of image ``index`` (validated), without decoding pixels."""
        raise NotImplementedError  # pragma: no cover - abstract

    def load_image(self, index: int) -> np.ndarray:
        """Pixels of image ``index`` as ``ndarray[H, W, 3]`` uint8 RGB."""
        raise NotImplementedError  # pragma: no cover - abstract

    def image_path(self, index: int) -> Optional[Path]:
        """File the image comes from (``None`` for generated images)."""
        return None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def _check_index(self, index: int) -> int:
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"{type(self).__name__}: index {index} out of range for {n} images")
        return index % n if n else index

    def sample(self, index: int) -> Tuple[np.ndarray, Record]:
        """``(pixels uint8 [H, W, 3], record)`` of image ``index``; checks that they agree."""
        index = self._check_index(index)
        rec = self.record(index)
        arr = self.load_image(index)
        h, w = arr.shape[:2]
        if (w, h) != (rec.width, rec.height):
            raise DatasetError(f"annotation says the image is {rec.width}x{rec.height}, the file is "
                               f"{w}x{h}", self.image_path(index) or rec.file_name)
        return arr, rec

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, Dict[str, Any]]:
        arr, rec = self.sample(index)
        return image_to_tensor(arr), rec.target()

    def records(self) -> List[Record]:
        """All annotations (cached after the first call)."""
        cache = getattr(self, "_records_cache", None)
        if cache is None:
            cache = [self.record(i) for i in range(len(self))]
            self._records_cache = cache
        return cache

    def image_ids(self) -> List[int]:
        return [r.image_id for r in self.records()]

    def coco_gt(self):
        """Ground truth as a ``pycocotools.coco.COCO`` object, for :func:`evaluate_coco`.

        Category ids are ``label + 1`` in class order (so ``sorted(coco.getCatIds())[label]``
        is the category of ``label``).
        """
        cache = getattr(self, "_coco_gt_cache", None)
        if cache is None:
            from .cocoapi import records_to_coco

            cache = records_to_coco(self.records(), self.classes)
            self._coco_gt_cache = cache
        return cache

    def __repr__(self) -> str:
        return f"{type(self).__name__}(images={len(self)}, classes={self.classes})"


class DatasetSubset(DetectionDataset):
    """The images ``indices`` of ``dataset``, keeping its classes, ids and ``coco_gt()``.

    Args:
        dataset: any :class:`DetectionDataset`.
        indices: positions in ``dataset`` (e.g. ``range(100)`` for the first 100 images).
    """

    def __init__(self, dataset: DetectionDataset, indices: Sequence[int]) -> None:
        n = len(dataset)
        self.indices = [int(i) for i in indices]
        bad = [i for i in self.indices if not 0 <= i < n]
        if bad:
            raise IndexError(f"DatasetSubset: indices {bad[:5]} out of range for {n} images")
        self.dataset = dataset
        self.classes = list(dataset.classes)

    def __len__(self) -> int:
        return len(self.indices)

    def record(self, index: int) -> Record:
        return self.dataset.record(self.indices[self._check_index(index)])

    def load_image(self, index: int) -> np.ndarray:
        return self.dataset.load_image(self.indices[self._check_index(index)])

    def sample(self, index: int) -> Tuple[np.ndarray, Record]:
        return self.dataset.sample(self.indices[self._check_index(index)])

    def image_path(self, index: int) -> Optional[Path]:
        return self.dataset.image_path(self.indices[self._check_index(index)])

    def __repr__(self) -> str:
        return f"DatasetSubset({self.dataset!r}, images={len(self)})"


def save_png(arr: np.ndarray, path: PathLike) -> None:
    """Write ``ndarray[H, W, 3]`` uint8 as PNG (creating folders)."""
    from PIL import Image

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, format="PNG")


def progress_iter(it: Sequence[int], enabled: bool, desc: str):
    """``it`` wrapped in a tqdm bar when ``enabled``."""
    if not enabled:
        return it
    from tqdm import tqdm

    return tqdm(it, desc=desc, unit="img")
