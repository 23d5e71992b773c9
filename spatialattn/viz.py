"""Attention-map overlays and detection drawings as PNG (matplotlib, Agg backend).

* :func:`reduce_map` turns any attention map into an ``H x W`` array: ``[C, H, W]`` / ``[1, H, W]``
  maps are averaged over channels; channel-only maps (``[C, 1, 1]``, SE / CAM) have no spatial
  extent and give a constant map (their mean).
* :func:`overlay_attention` draws one grid: the image, then one heat-map overlay per map
  (``jet`` colour map, upsampled bilinearly to the image, alpha-blended), each panel titled with
  the map's name and its value range. Maps are min-max normalised per panel unless
  ``normalize=False`` (then values are clipped to ``[0, 1]``, the range of sigmoid gates).
* :func:`draw_detections` draws boxes with ``name score`` labels.
* :func:`heatmap_rgb` is the pixel-level blend the overlay uses (tested on its own).
"""
from __future__ import annotations

import os
from typing import Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch

__all__ = ["reduce_map", "heatmap_rgb", "overlay_attention", "draw_detections", "to_uint8_image"]

ArrayLike = Union[np.ndarray, torch.Tensor]


def to_uint8_image(image: ArrayLike) -> np.ndarray:
    """``Tensor[3, H, W]`` in ``[0, 1]`` or ``ndarray[H, W, 3]`` (uint8 or float in [0, 1]) ->
    ``ndarray[H, W, 3]`` uint8."""
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu()
        if image.dim() != 3 or image.shape[0] not in (1, 3):
            raise ValueError(f"image: expected Tensor[3, H, W], got shape {tuple(image.shape)}")
        image = image.expand(3, -1, -1).permute(1, 2, 0).float().numpy()
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"image: expected ndarray[H, W, 3], got shape {arr.shape}")
    if arr.dtype == np.uint8:
        return arr
    return (np.clip(arr, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def reduce_map(amap: ArrayLike) -> np.ndarray:
    """Attention map -> ``ndarray[h, w]`` float32.

    Accepts ``[h, w]``, ``[C, h, w]`` (mean over C) or ``[1, C, h, w]`` (a batch of one).
    """
    if isinstance(amap, torch.Tensor):
        amap = amap.detach().float().cpu().numpy()
    a = np.asarray(amap, dtype=np.float32)
    if a.ndim == 4:
        if a.shape[0] != 1:
            raise ValueError(f"map: expected one image, got a batch of {a.shape[0]}")
        a = a[0]
    if a.ndim == 3:
        a = a.mean(0)
    if a.ndim != 2:
        raise ValueError(f"map: expected [h, w], [C, h, w] or [1, C, h, w], got shape {a.shape}")
    return a


def _upsample(a: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
    t = torch.from_numpy(np.ascontiguousarray(a))[None, None]
    return torch.nn.functional.interpolate(t, size=size, mode="bilinear", align_corners=False)[0, 0].numpy()


def heatmap_rgb(image: ArrayLike, amap: ArrayLike, alpha: float = 0.5, normalize: bool = True,
                cmap: str = "jet") -> np.ndarray:
    """Blend ``amap`` (any shape :func:`reduce_map` takes) over ``image``; returns ``uint8 [H, W, 3]``.

    ``out = (1 - alpha) * image + alpha * colormap(m)`` with ``m`` the map upsampled to the image,
    scaled to ``[0, 1]`` (min-max if ``normalize``, else clipped). A constant map is drawn as 0.5.
    """
    import matplotlib

    img = to_uint8_image(image).astype(np.float32) / 255.0
    m = _upsample(reduce_map(amap), img.shape[:2])
    if normalize:
        lo, hi = float(m.min()), float(m.max())
        m = (m - lo) / (hi - lo) if hi - lo > 1e-12 else np.full_like(m, 0.5)
    else:
        m = np.clip(m, 0.0, 1.0)
    colors = matplotlib.colormaps[cmap](m)[..., :3].astype(np.float32)
    out = (1 - alpha) * img + alpha * colors
    return (np.clip(out, 0, 1) * 255 + 0.5).astype(np.uint8)


def overlay_attention(image: ArrayLike, maps: Union[Mapping[str, ArrayLike], Sequence[ArrayLike]],
                      path: Optional[Union[str, os.PathLike]] = None, alpha: float = 0.5,
                      normalize: bool = True, title: Optional[str] = None, panel_size: float = 2.6):
    """One grid: the image, then one overlay per attention map.

    Args:
        image: ``Tensor[3, H, W]`` in ``[0, 1]`` or ``ndarray[H, W, 3]``.
        maps: ``{name: map}`` (or a list), each ``[h, w]``, ``[C, h, w]`` or ``[1, C, h, w]``.
        path: write a PNG there (folders created); ``None``: only return the figure.
        alpha, normalize: see :func:`heatmap_rgb`.

    Returns:
        the matplotlib ``Figure`` (closed after saving when ``path`` is given).
    """
    import matplotlib
    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    if not isinstance(maps, Mapping):
        maps = {f"map {i}": m for i, m in enumerate(maps)}
    img = to_uint8_image(image)
    n = 1 + len(maps)
    cols = min(n, 4)
    rows = (n + cols - 1) // cols
    fig = Figure(figsize=(panel_size * cols, panel_size * rows + (0.3 if title else 0)), dpi=100)
    axes = [fig.add_subplot(rows, cols, k + 1) for k in range(n)]
    axes[0].imshow(img)
    axes[0].set_title("image", fontsize=8)
    for ax, (name, amap) in zip(axes[1:], maps.items()):
        red = reduce_map(amap)
        ax.imshow(heatmap_rgb(img, red, alpha=alpha, normalize=normalize))
        ax.set_title(f"{name}\n[{red.min():.3g}, {red.max():.3g}] {red.shape[0]}x{red.shape[1]}", fontsize=7)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    if path is not None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        fig.savefig(path)
    return fig


def draw_detections(image: ArrayLike, boxes: ArrayLike, labels: ArrayLike, scores: Optional[ArrayLike] = None,
                    names: Optional[Sequence[str]] = None, path: Optional[Union[str, os.PathLike]] = None,
                    width: int = 2) -> np.ndarray:
    """Draw ``boxes`` (``[N, 4]`` xyxy pixels) with ``name score`` labels; returns ``uint8 [H, W, 3]``
    (and writes a PNG to ``path`` if given). One colour per class."""
    import matplotlib
    from PIL import Image, ImageDraw

    img = Image.fromarray(to_uint8_image(image).copy())
    draw = ImageDraw.Draw(img)
    b = np.asarray(torch.as_tensor(boxes).detach().cpu(), dtype=np.float64).reshape(-1, 4)
    lab = np.asarray(torch.as_tensor(labels).detach().cpu()).reshape(-1).astype(int)
    sc = None if scores is None else np.asarray(torch.as_tensor(scores).detach().cpu(), dtype=np.float64).reshape(-1)
    if len(lab) != len(b) or (sc is not None and len(sc) != len(b)):
        raise ValueError(f"draw_detections: {len(b)} boxes, {len(lab)} labels, "
                         f"{'-' if sc is None else len(sc)} scores")
    palette = matplotlib.colormaps["tab10"]
    for k in range(len(b)):
        color = tuple(int(255 * c) for c in palette(lab[k] % 10)[:3])
        x1, y1, x2, y2 = b[k].tolist()
        draw.rectangle([x1, y1, x2, y2], outline=color, width=width)
        name = names[lab[k]] if names is not None and 0 <= lab[k] < len(names) else str(lab[k])
        text = name if sc is None else f"{name} {sc[k]:.2f}"
        draw.text((x1 + 2, max(0.0, y1 - 11)), text, fill=color)
    out = np.asarray(img)
    if path is not None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        img.save(path)
    return out
