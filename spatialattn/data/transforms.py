"""Detection transforms that keep ``target["boxes"]`` consistent with the image.

Functional forms (:func:`letterbox`, :func:`resize`, :func:`hflip`, :func:`adjust_color`) are
deterministic; the classes draw their random choices from an explicit ``torch.Generator`` passed
at call time, so the same generator state gives the same result in every process.
:class:`TransformedDataset` seeds that generator from ``(seed, epoch, index)``, so augmentation
does not depend on the number of DataLoader workers or ranks and a resumed run replays it exactly.

All transforms take and return ``(image Tensor[3, H, W] float in [0, 1], target dict)``; the
target is copied, never modified in place.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["letterbox", "resize", "hflip", "adjust_color", "unletterbox_boxes", "Compose",
           "Letterbox", "Resize", "RandomHorizontalFlip", "ColorJitter", "TransformedDataset",
           "build_transforms"]

Target = Dict[str, Any]
Sample = Tuple[torch.Tensor, Target]


def _check_image(image: torch.Tensor) -> None:
    if not isinstance(image, torch.Tensor) or image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"expected an image Tensor[3, H, W], found "
                         f"{tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__}")


def _copy(target: Target) -> Target:
    return {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in target.items()}


def _interp(image: torch.Tensor, h: int, w: int) -> torch.Tensor:
    if (h, w) == tuple(image.shape[-2:]):
        return image.clone()
    return F.interpolate(image[None], size=(h, w), mode="bilinear", align_corners=False,
                         antialias=True)[0].clamp_(0, 1)


def resize(image: torch.Tensor, target: Target, size: Union[int, Tuple[int, int]]) -> Sample:
    """Stretch to ``size`` (``int`` for a square, or ``(H, W)``); boxes scale with ``(W'/W, H'/H)``."""
    _check_image(image)
    h, w = image.shape[-2:]
    nh, nw = (size, size) if isinstance(size, int) else size
    t = _copy(target)
    if "boxes" in t:
        scale = torch.tensor([nw / w, nh / h, nw / w, nh / h], dtype=t["boxes"].dtype)
        t["boxes"] = t["boxes"] * scale
    return _interp(image, nh, nw), t


def letterbox(image: torch.Tensor, target: Target, size: int, fill: float = 114 / 255) -> Sample:
    """Resize keeping the aspect ratio so the long side is ``size``, pad to ``size x size``.

    The resized image is ``round(W * s) x round(H * s)`` with ``s = size / max(H, W)``, placed at
    ``(pad_x, pad_y) = ((size - W') // 2, (size - H') // 2)``. Boxes map as
    ``x' = x * W'/W + pad_x``, ``y' = y * H'/H + pad_y``; ``target["letterbox"]`` holds
    ``Tensor[4] = (W'/W, H'/H, pad_x, pad_y)`` for :func:`unletterbox_boxes`.
    """
    _check_image(image)
    h, w = image.shape[-2:]
    s = size / max(h, w)
    nw, nh = max(1, int(round(w * s))), max(1, int(round(h * s)))
    px, py = (size - nw) // 2, (size - nh) // 2
    out = image.new_full((3, size, size), float(fill))
    out[:, py:py + nh, px:px + nw] = _interp(image, nh, nw)
    t = _copy(target)
    sx, sy = nw / w, nh / h
    if "boxes" in t:
        b = t["boxes"]
        t["boxes"] = b * torch.tensor([sx, sy, sx, sy], dtype=b.dtype) + torch.tensor([px, py, px, py], dtype=b.dtype)
    t["letterbox"] = torch.tensor([sx, sy, px, py], dtype=torch.float64)  # float32 would round sx, sy
    return out, t


def unletterbox_boxes(boxes: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """Map ``Tensor[N, 4]`` xyxy boxes from the letterboxed frame back to the original image.

    ``params`` is ``target["letterbox"]`` (``(sx, sy, pad_x, pad_y)``).
    """
    sx, sy, px, py = (float(v) for v in params)
    off = boxes.new_tensor([px, py, px, py])
    return (boxes - off) / boxes.new_tensor([sx, sy, sx, sy])


def hflip(image: torch.Tensor, target: Target) -> Sample:
    """Mirror left-right: ``x1' = W - x2``, ``x2' = W - x1``."""
    _check_image(image)
    w = image.shape[-1]
    t = _copy(target)
    if "boxes" in t:
        b = t["boxes"]
        t["boxes"] = torch.stack([w - b[:, 2], b[:, 1], w - b[:, 0], b[:, 3]], 1)
    return image.flip(-1), t


def adjust_color(image: torch.Tensor, brightness: float = 1.0, contrast: float = 1.0,
                 saturation: float = 1.0) -> torch.Tensor:
    """Multiply brightness, blend with the mean grey (contrast) and with the greyscale image
    (saturation), like ``torchvision.transforms.functional.adjust_*``; clamps to ``[0, 1]``."""
    _check_image(image)
    grey_w = image.new_tensor([0.2989, 0.587, 0.114]).view(3, 1, 1)  # as torchvision rgb_to_grayscale
    x = (image * brightness).clamp(0, 1)
    mean = (x * grey_w).sum(0).mean()
    x = (contrast * x + (1 - contrast) * mean).clamp(0, 1)
    grey = (x * grey_w).sum(0, keepdim=True)
    return (saturation * x + (1 - saturation) * grey).clamp(0, 1)


class Compose:
    """Apply transforms in order, passing the same generator to each."""

    def __init__(self, transforms: Sequence[Any]) -> None:
        self.transforms = list(transforms)

    def __call__(self, image: torch.Tensor, target: Target,
                 generator: Optional[torch.Generator] = None) -> Sample:
        for t in self.transforms:
            image, target = t(image, target, generator)
        return image, target

    def __repr__(self) -> str:
        return "Compose(" + ", ".join(repr(t) for t in self.transforms) + ")"


class Letterbox:
    """:func:`letterbox` to a ``size x size`` square."""

    def __init__(self, size: int, fill: float = 114 / 255) -> None:
        if size <= 0:
            raise ValueError(f"size must be positive, got {size}")
        self.size, self.fill = int(size), float(fill)

    def __call__(self, image: torch.Tensor, target: Target, generator: Optional[torch.Generator] = None) -> Sample:
        return letterbox(image, target, self.size, self.fill)

    def __repr__(self) -> str:
        return f"Letterbox(size={self.size}, fill={self.fill:.4f})"


class Resize:
    """:func:`resize` (stretch) to ``size``."""

    def __init__(self, size: Union[int, Tuple[int, int]]) -> None:
        self.size = size

    def __call__(self, image: torch.Tensor, target: Target, generator: Optional[torch.Generator] = None) -> Sample:
        return resize(image, target, self.size)

    def __repr__(self) -> str:
        return f"Resize(size={self.size})"


class RandomHorizontalFlip:
    """:func:`hflip` with probability ``p`` (one draw from ``generator``)."""

    def __init__(self, p: float = 0.5) -> None:
        if not 0 <= p <= 1:
            raise ValueError(f"p must be in [0, 1], got {p}")
        self.p = float(p)

    def __call__(self, image: torch.Tensor, target: Target, generator: Optional[torch.Generator] = None) -> Sample:
        if float(torch.rand((), generator=generator)) < self.p:
            return hflip(image, target)
        return image, target

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


class ColorJitter:
    """:func:`adjust_color` with factors drawn uniformly from ``[1 - a, 1 + a]`` (boxes unchanged)."""

    def __init__(self, brightness: float = 0.2, contrast: float = 0.2, saturation: float = 0.2) -> None:
        for n, v in (("brightness", brightness), ("contrast", contrast), ("saturation", saturation)):
            if not 0 <= v < 1:
                raise ValueError(f"{n} must be in [0, 1), got {v}")
        self.brightness, self.contrast, self.saturation = brightness, contrast, saturation

    def __call__(self, image: torch.Tensor, target: Target, generator: Optional[torch.Generator] = None) -> Sample:
        u = torch.rand(3, generator=generator, dtype=torch.float64).tolist()
        f = [1 + a * (2 * r - 1) for a, r in zip((self.brightness, self.contrast, self.saturation), u)]
        return adjust_color(image, *f), target

    def __repr__(self) -> str:
        return f"ColorJitter(brightness={self.brightness}, contrast={self.contrast}, saturation={self.saturation})"


def build_transforms(train: bool, size: int = 160) -> Compose:
    """The default pipeline: letterbox to ``size``; for training also a horizontal flip (p=0.5)
    and light colour jitter (0.2)."""
    ts: List[Any] = [Letterbox(size)]
    if train:
        ts += [RandomHorizontalFlip(0.5), ColorJitter(0.2, 0.2, 0.2)]
    return Compose(ts)


class TransformedDataset(torch.utils.data.Dataset):
    """``dataset`` with ``transform`` applied, random choices seeded by ``(seed, epoch, index)``.

    Call :meth:`set_epoch` at the start of each epoch (with ``persistent_workers=False``, so the
    workers see the new epoch) to get fresh augmentation every epoch. ``classes``, ``coco_gt()``,
    ``record()`` and the other dataset attributes are those of the wrapped dataset (untransformed).
    """

    def __init__(self, dataset: Any, transform: Any, seed: int = 0) -> None:
        self.dataset, self.transform, self.seed, self.epoch = dataset, transform, int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def generator(self, index: int) -> torch.Generator:
        state = np.random.SeedSequence([self.seed & 0xFFFFFFFF, self.epoch, int(index)]).generate_state(2)
        return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Sample:
        image, target = self.dataset[index]
        return self.transform(image, target, self.generator(index))

    def __getattr__(self, name: str) -> Any:
        if name in ("dataset", "__setstate__", "__getstate__"):
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __repr__(self) -> str:
        return f"TransformedDataset({self.dataset!r}, {self.transform!r}, seed={self.seed})"
