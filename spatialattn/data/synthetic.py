"""The built-in dataset: procedurally drawn shapes, generated from ``(seed, split, index)``.

Nothing is downloaded or stored: each image is drawn on the fly from a NumPy generator seeded with
``SeedSequence([seed, split_code, index])``, so image ``i`` is the same in every process, worker
and rank, and the ``train`` / ``val`` / ``test`` splits come from disjoint seed streams.

What is in an image (default ``image_size=160``):

* **Objects** of 5 classes - ``circle`` (an ellipse when the aspect ratio is not 1), ``rectangle``,
  ``triangle`` (pointing up or down), ``ring`` and ``cross`` - 0 to ``max_objects`` per image (about
  7 % of the images have none), side length about 10-64 px (log-uniform, scaled with the image
  size), aspect ratio 0.64-1.57. Colour is a hint, not the answer: 60 % of objects take their
  class's hue (jittered), the rest a random hue, so the outline decides; textures vary (solid,
  shading gradient, stripes, speckle, a dark outline).
* **Clutter**: a muted two-colour gradient with low-frequency blotches, random thin lines, and
  per-pixel sensor noise over the whole image.
* **Distractors**: shapes that are not classes (star, diamond, crescent, hollow frame), in random
  saturated colours, drawn behind objects or partially occluding them.

Boxes are exact: shapes are drawn without anti-aliasing and the box of an object is the pixel
extent of its *visible* mask (``x2``/``y2`` exclusive, so integer-valued). Placement keeps at least
60 % of every object visible. A sloppy box therefore costs IoU, and a weak model's AP75 falls well
below its AP50.
"""
from __future__ import annotations

import colorsys
import math
from typing import Dict, List, Optional, Tuple

import numpy as np

from .base import DetectionDataset, Record

__all__ = ["SyntheticShapes", "render_sample", "SYNTHETIC_CLASSES", "SPLIT_CODES"]

SYNTHETIC_CLASSES: Tuple[str, ...] = ("circle", "rectangle", "triangle", "ring", "cross")
_DISTRACTORS: Tuple[str, ...] = ("star", "diamond", "crescent", "frame")
_CLASS_HUES = (0.0, 0.17, 0.36, 0.58, 0.78)  # red, yellow, green, blue, purple
SPLIT_CODES: Dict[str, int] = {"train": 0, "val": 1, "test": 2}
_MIN_VISIBLE = 0.6
_CLASS_HUE_P = 0.6  # probability that an object takes its class hue (else a random hue)


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v), dtype=np.float32)


def _shape_mask(kind: str, w: int, h: int, rng: np.random.Generator) -> np.ndarray:
    """Boolean ``[h, w]`` mask of a shape filling (most of) a ``w x h`` box."""
    u = (np.arange(w, dtype=np.float32) + 0.5) / w * 2 - 1
    v = (np.arange(h, dtype=np.float32) + 0.5) / h * 2 - 1
    X, Y = np.meshgrid(u, v)
    r2 = X * X + Y * Y
    if kind == "circle":
        return r2 <= 1.0
    if kind == "rectangle":
        return np.ones((h, w), bool)
    if kind == "triangle":
        ax = np.abs(X) - 1.0 / w  # the apex row always keeps its centre pixel(s)
        return ax <= (Y + 1) / 2 if rng.random() < 0.5 else ax <= (1 - Y) / 2
    if kind == "ring":
        t = rng.uniform(0.45, 0.65)
        return (r2 <= 1.0) & (r2 >= t * t)
    if kind == "cross":
        a = rng.uniform(0.22, 0.36)
        return (np.abs(X) <= a) | (np.abs(Y) <= a)
    if kind == "star":
        n, inner = 5, rng.uniform(0.35, 0.5)
        theta = np.arctan2(Y, X) + rng.uniform(0, 2 * math.pi)
        frac = (theta * n / (2 * math.pi)) % 1.0
        return np.sqrt(r2) <= inner + (1 - inner) * np.abs(2 * frac - 1)
    if kind == "diamond":
        return np.abs(X) + np.abs(Y) <= 1.0
    if kind == "frame":
        a = rng.uniform(0.15, 0.3)
        return (np.abs(X) >= 1 - a) | (np.abs(Y) >= 1 - a)
    if kind == "crescent":
        d = rng.uniform(0.4, 0.7) * (1 if rng.random() < 0.5 else -1)
        return (r2 <= 1.0) & ((X - d) ** 2 + Y * Y > 0.8 ** 2)
    raise ValueError(f"unknown shape {kind!r}")


def _erode(mask: np.ndarray, k: int) -> np.ndarray:
    m = mask.copy()
    for _ in range(k):
        p = np.pad(m, 1, constant_values=False)
        m = m & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    return m


def _texture(rng: np.random.Generator, mask: np.ndarray, color: np.ndarray) -> np.ndarray:
    """Colour ``[h, w, 3]`` for a shape: solid / gradient / stripes / speckle, maybe outlined."""
    h, w = mask.shape
    fill = np.broadcast_to(color, (h, w, 3)).astype(np.float32).copy()
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    kind = rng.integers(0, 4)
    ang = rng.uniform(0, 2 * math.pi)
    proj = math.cos(ang) * xs + math.sin(ang) * ys
    if kind == 1:  # shading gradient
        ramp = (proj - proj.min()) / max(float(proj.max() - proj.min()), 1e-6)
        fill *= (0.7 + 0.5 * ramp)[..., None]
    elif kind == 2:  # stripes
        period = rng.uniform(3.0, 7.0)
        fill[((proj / period) % 1.0) < 0.5] *= 0.6
    elif kind == 3:  # speckle
        fill += rng.normal(0, 0.1, size=fill.shape).astype(np.float32)
    if rng.random() < 0.3 and min(h, w) >= 10:  # dark outline
        border = mask & ~_erode(mask, 1 + int(min(h, w) >= 24))
        fill[border] = color * 0.4
    return fill


class _Canvas:
    def __init__(self, rng: np.random.Generator, size: int) -> None:
        self.rng, self.size = rng, size
        self.img = self._background()
        self.owner = np.full((size, size), -1, np.int32)  # -1 background, -2 distractor, k object
        self.full_area: List[int] = []
        self.visible_area: List[int] = []
        self.placed: List[Tuple[int, int, int, int]] = []  # object boxes at placement (x0,y0,w,h)

    def _background(self) -> np.ndarray:
        rng, S = self.rng, self.size
        c1 = _hsv(rng.random(), rng.uniform(0, 0.45), rng.uniform(0.15, 0.9))
        c2 = _hsv(rng.random(), rng.uniform(0, 0.45), rng.uniform(0.15, 0.9))
        ys, xs = np.mgrid[0:S, 0:S].astype(np.float32) / S
        ang = rng.uniform(0, 2 * math.pi)
        t = (math.cos(ang) * xs + math.sin(ang) * ys)
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
        img = c1 * (1 - t[..., None]) + c2 * t[..., None]
        g = 5  # low-frequency blotches: bilinear upsampling of a g x g random grid
        grid = rng.normal(0, rng.uniform(0.02, 0.08), size=(g, g, 3)).astype(np.float32)
        pos = np.linspace(0, g - 1, S, dtype=np.float32)
        i0 = np.minimum(pos.astype(int), g - 2)
        f = pos - i0
        A = np.zeros((S, g), np.float32)
        A[np.arange(S), i0] = 1 - f
        A[np.arange(S), i0 + 1] = f
        img = img + np.stack([A @ grid[:, :, c] @ A.T for c in range(3)], axis=-1)
        return img.astype(np.float32)

    def lines(self, n: int) -> None:
        rng, S = self.rng, self.size
        ys, xs = np.mgrid[0:S, 0:S].astype(np.float32) + 0.5
        for _ in range(n):
            p = rng.uniform(-0.2 * S, 1.2 * S, size=2)
            q = rng.uniform(-0.2 * S, 1.2 * S, size=2)
            d = q - p
            L2 = float(d @ d) + 1e-6
            t = np.clip(((xs - p[0]) * d[0] + (ys - p[1]) * d[1]) / L2, 0, 1)
            dist2 = (xs - p[0] - t * d[0]) ** 2 + (ys - p[1] - t * d[1]) ** 2
            half = rng.uniform(0.5, 1.6)
            self.img[dist2 <= half * half] = _hsv(rng.random(), rng.uniform(0, 1), rng.uniform(0.2, 1))

    def _size(self, scale: float = 1.0) -> Tuple[int, int]:
        rng, S = self.rng, self.size
        lo, hi = 10.0 / 160 * S, 64.0 / 160 * S * scale
        s = math.exp(rng.uniform(math.log(lo), math.log(max(hi, lo + 1))))
        a = math.exp(rng.uniform(-0.45, 0.45))
        w = int(round(min(max(s * math.sqrt(a), 0.8 * lo), 70.0 / 160 * S)))
        h = int(round(min(max(s / math.sqrt(a), 0.8 * lo), 70.0 / 160 * S)))
        return max(w, 4), max(h, 4)

    def _visibility_ok(self, x0: int, y0: int, mask: np.ndarray) -> bool:
        h, w = mask.shape
        region = self.owner[y0:y0 + h, x0:x0 + w][mask]
        ks, lost = np.unique(region[region >= 0], return_counts=True)
        for k, n in zip(ks.tolist(), lost.tolist()):
            if self.visible_area[k] - n < _MIN_VISIBLE * self.full_area[k]:
                return False
        return True

    def _paint(self, x0: int, y0: int, mask: np.ndarray, color: np.ndarray, owner: int) -> None:
        h, w = mask.shape
        region = self.owner[y0:y0 + h, x0:x0 + w]
        covered = region[mask]
        ks, lost = np.unique(covered[covered >= 0], return_counts=True)
        for k, n in zip(ks.tolist(), lost.tolist()):
            self.visible_area[k] -= n
        region[mask] = owner
        tex = _texture(self.rng, mask, color)
        self.img[y0:y0 + h, x0:x0 + w][mask] = tex[mask]

    def add_object(self, label: int) -> bool:
        rng, S = self.rng, self.size
        for _ in range(20):
            w, h = self._size()
            x0, y0 = int(rng.integers(0, S - w + 1)), int(rng.integers(0, S - h + 1))
            if any(_iou((x0, y0, w, h), b) > 0.4 for b in self.placed):
                continue
            mask = _shape_mask(SYNTHETIC_CLASSES[label], w, h, rng)
            if not self._visibility_ok(x0, y0, mask):
                continue
            hue = _CLASS_HUES[label] + rng.normal(0, 0.03) if rng.random() < _CLASS_HUE_P else rng.random()
            color = _hsv(hue, rng.uniform(0.4, 1.0), rng.uniform(0.45, 1.0))
            k = len(self.full_area)
            self.full_area.append(int(mask.sum()))
            self.visible_area.append(int(mask.sum()))
            self.placed.append((x0, y0, w, h))
            self._paint(x0, y0, mask, color, k)
            return True
        return False

    def add_distractor(self, on_top: bool) -> None:
        rng, S = self.rng, self.size
        for _ in range(10):
            w, h = self._size(scale=0.6 if on_top else 1.0)
            x0, y0 = int(rng.integers(0, S - w + 1)), int(rng.integers(0, S - h + 1))
            mask = _shape_mask(_DISTRACTORS[int(rng.integers(0, len(_DISTRACTORS)))], w, h, rng)
            if on_top and not self._visibility_ok(x0, y0, mask):
                continue
            color = _hsv(rng.random(), rng.uniform(0.4, 1.0), rng.uniform(0.5, 1.0))
            self._paint(x0, y0, mask, color, -2)
            return

    def boxes(self) -> np.ndarray:
        out = np.zeros((len(self.placed), 4), np.float32)
        for k, (x0, y0, w, h) in enumerate(self.placed):
            vis = self.owner[y0:y0 + h, x0:x0 + w] == k
            cols, rows = np.nonzero(vis.any(0))[0], np.nonzero(vis.any(1))[0]
            out[k] = (x0 + cols[0], y0 + rows[0], x0 + cols[-1] + 1, y0 + rows[-1] + 1)
        return out


def _iou(a: Tuple[int, int, int, int], b: Tuple[int, int, int, int]) -> float:
    ix = max(0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / float(a[2] * a[3] + b[2] * b[3] - inter)


_NUM_OBJECTS_P = np.array([0.06, 0.2, 0.2, 0.18, 0.14, 0.12, 0.10])


def render_sample(seed: int, split: str, index: int, image_size: int = 160,
                  max_objects: int = 6) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Draw image ``index`` of ``split``.

    Returns:
        ``(image, boxes, labels)``: ``ndarray[S, S, 3]`` uint8, ``ndarray[N, 4]`` float32 ``xyxy``
        pixels (integer-valued), ``ndarray[N]`` int64 class indices into :data:`SYNTHETIC_CLASSES`.
    """
    if split not in SPLIT_CODES:
        raise ValueError(f"split must be one of {sorted(SPLIT_CODES)}, got {split!r}")
    if image_size < 32:
        raise ValueError(f"image_size must be >= 32, got {image_size}")
    if index < 0:
        raise ValueError(f"index must be >= 0, got {index}")
    rng = np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, SPLIT_CODES[split],
                                                        int(index)]))
    canvas = _Canvas(rng, image_size)
    canvas.lines(int(rng.integers(0, 9)))
    for _ in range(int(rng.integers(0, 4))):
        canvas.add_distractor(on_top=False)
    p = _NUM_OBJECTS_P[: max_objects + 1] / _NUM_OBJECTS_P[: max_objects + 1].sum()
    labels = []
    for _ in range(int(rng.choice(len(p), p=p))):
        label = int(rng.integers(0, len(SYNTHETIC_CLASSES)))
        if canvas.add_object(label):
            labels.append(label)
    if canvas.placed and rng.random() < 0.6:
        canvas.add_distractor(on_top=True)
        if rng.random() < 0.3:
            canvas.add_distractor(on_top=True)
    img = canvas.img + rng.normal(0, rng.uniform(0.005, 0.04), size=canvas.img.shape).astype(np.float32)
    img = (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    return img, canvas.boxes(), np.asarray(labels, np.int64)


class SyntheticShapes(DetectionDataset):
    """The built-in detection dataset (see the module docstring).

    Args:
        split: ``"train"``, ``"val"`` or ``"test"`` (disjoint seed streams).
        num_images: length; default 4000 for ``train``, 500 otherwise.
        image_size: side of the square images in pixels (object sizes scale with it).
        seed: dataset seed; the same ``(seed, split, index)`` gives the same image everywhere.
        max_objects: at most this many objects per image (0-6).

    Example:
        >>> ds = SyntheticShapes("val", num_images=8)
        >>> image, target = ds[0]
        >>> image.shape, target["boxes"].dtype
        (torch.Size([3, 160, 160]), torch.float32)
    """

    def __init__(self, split: str = "train", num_images: Optional[int] = None, image_size: int = 160,
                 seed: int = 0, max_objects: int = 6) -> None:
        if split not in SPLIT_CODES:
            raise ValueError(f"split must be one of {sorted(SPLIT_CODES)}, got {split!r}")
        if num_images is None:
            num_images = 4000 if split == "train" else 500
        if num_images < 0:
            raise ValueError(f"num_images must be >= 0, got {num_images}")
        if image_size < 32:
            raise ValueError(f"image_size must be >= 32, got {image_size}")
        if not 0 <= max_objects <= 6:
            raise ValueError(f"max_objects must be in [0, 6], got {max_objects}")
        self.split, self.num_images, self.image_size = split, int(num_images), int(image_size)
        self.seed, self.max_objects = int(seed), int(max_objects)
        self.classes = list(SYNTHETIC_CLASSES)

    def __len__(self) -> int:
        return self.num_images

    def _render(self, index: int) -> Tuple[np.ndarray, Record]:
        index = self._check_index(index)
        img, boxes, labels = render_sample(self.seed, self.split, index, self.image_size,
                                           self.max_objects)
        rec = Record(image_id=index, file_name=f"{self.split}_{index:06d}.png",
                     width=self.image_size, height=self.image_size, boxes=boxes, labels=labels)
        return img, rec

    def record(self, index: int) -> Record:
        return self._render(index)[1]

    def load_image(self, index: int) -> np.ndarray:
        return self._render(index)[0]

    def sample(self, index: int) -> Tuple[np.ndarray, Record]:
        return self._render(index)

    def __repr__(self) -> str:
        return (f"SyntheticShapes(split={self.split!r}, num_images={self.num_images}, "
                f"image_size={self.image_size}, seed={self.seed}, max_objects={self.max_objects})")
