"""Evaluation: data pipelines, COCO metrics of a detector on a dataset (DDP-aware), metric
tables, and saving attention maps of a few images."""
from __future__ import annotations

import json
import os
import sys
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..data import TransformedDataset, build_dataset, build_transforms, detection_collate
from ..data.base import image_to_tensor
from ..data.transforms import unletterbox_boxes
from .config import DEFAULTS
from .metrics import CocoEvaluator
from . import distributed as D

__all__ = ["CachedDataset", "open_dataset", "make_eval_loader", "evaluate", "format_metrics",
           "METRIC_KEYS", "save_attention_maps"]

METRIC_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


class CachedDataset(Dataset):
    """Keeps the decoded ``uint8`` pixels and record of the images read (per process), so later
    epochs skip decoding / rendering. Same samples as the wrapped dataset (``uint8 / 255``).

    Args:
        dataset: a :class:`~spatialattn.data.DetectionDataset` (its ``sample(index)``).
        max_bytes: the most pixel bytes kept (``None``: no limit). Images read once the cache is
            full are decoded again on every read; the ones kept stay.
    """

    def __init__(self, dataset: Any, max_bytes: Optional[int] = None) -> None:
        if max_bytes is not None and max_bytes < 0:
            raise ValueError(f"max_bytes: expected >= 0 or None, got {max_bytes}")
        self.dataset = dataset
        self.max_bytes = max_bytes
        self.cached_bytes = 0
        self._cache: Dict[int, Any] = {}

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        hit = self._cache.get(index)
        if hit is None:
            hit = self.dataset.sample(index)
            size = hit[0].nbytes
            if self.max_bytes is None or self.cached_bytes + size <= self.max_bytes:
                self._cache[index] = hit
                self.cached_bytes += size
        arr, rec = hit
        return image_to_tensor(arr), rec.target()

    def __getattr__(self, name: str) -> Any:
        if name in ("dataset", "_cache", "__setstate__", "__getstate__"):
            raise AttributeError(name)
        return getattr(self.dataset, name)


def open_dataset(cfg: Mapping[str, Any], split_key: str, count_key: str, train: bool,
                 cache: bool = True) -> TransformedDataset:
    """The dataset of ``cfg[split_key]`` with the default transforms (letterbox to image_size;
    flip + colour jitter when ``train``).

    Its decoded images are kept in memory (:class:`CachedDataset`, up to ``cfg["cache_gb"]``)
    when ``cache`` (a dataset read more than once) and ``cfg["cache"]``, and only with
    ``cfg["workers"] == 0``: the worker processes of a ``DataLoader`` (``persistent_workers=False``,
    so that they see each epoch's :meth:`~TransformedDataset.set_epoch`) end with every epoch,
    and their caches with them.
    """
    ds = build_dataset(cfg["data"], cfg[split_key], image_dir=cfg.get("image_dir"),
                       num_images=cfg.get(count_key), image_size=cfg["image_size"], seed=cfg["seed"])
    cache_gb = cfg.get("cache_gb", DEFAULTS["cache_gb"])
    if cache and cfg.get("cache", True) and not cfg.get("workers", 0) and cache_gb > 0:
        ds = CachedDataset(ds, max_bytes=int(cache_gb * 1e9))
    return TransformedDataset(ds, build_transforms(train=train, size=cfg["image_size"]), seed=cfg["seed"])


def make_eval_loader(dataset: Dataset, batch_size: int, workers: int = 0) -> DataLoader:
    """Sequential loader; under DDP a ``DistributedSampler`` without shuffling (its padding
    repeats images, which :meth:`CocoEvaluator.gather` de-duplicates)."""
    sampler = None
    rank, ws = D.world()
    if ws > 1:
        sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=ws, rank=rank, shuffle=False)
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, sampler=sampler,
                      num_workers=workers, collate_fn=detection_collate)


def _to_device(images: Any, device: torch.device) -> Any:
    if isinstance(images, torch.Tensor):
        return images.to(device, non_blocking=True)
    return [im.to(device, non_blocking=True) for im in images]


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: DataLoader, ground_truth: Any, device: torch.device,
             progress: bool = False, autocast_dtype: Optional[torch.dtype] = None) -> Dict[str, Any]:
    """COCO metrics of ``model`` (a detector of :mod:`spatialattn.engine.models`, unwrapped) on
    ``loader``'s images against ``ground_truth`` (the untransformed dataset or a ``COCO``).

    Predictions are mapped back through the letterbox to the original image frame and clipped to
    it. Every rank evaluates its shard; predictions are all-gathered and de-duplicated; every rank
    returns the same numbers. Images with zero detections count (AP 0, not a crash).
    """
    was = model.training
    model.eval()
    ev = CocoEvaluator()
    it = loader
    if progress and D.is_main():
        from tqdm import tqdm

        it = tqdm(loader, desc="eval", leave=False, dynamic_ncols=True,
                  mininterval=0.1 if sys.stderr.isatty() else 30.0)
    try:
        for images, targets in it:
            images = _to_device(images, device)
            if autocast_dtype is not None:
                with torch.autocast(device.type, dtype=autocast_dtype):
                    dets = model(images)
            else:
                dets = model(images)
            preds = []
            for d, t in zip(dets, targets):
                boxes = d["boxes"].float().cpu()
                if "letterbox" in t:
                    boxes = unletterbox_boxes(boxes, t["letterbox"])
                h, w = t["orig_size"]
                boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
                boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
                preds.append({"boxes": boxes, "scores": d["scores"].float().cpu(), "labels": d["labels"].cpu()})
            ev.update(preds, [{"image_id": t["image_id"]} for t in targets])
    finally:
        model.train(was)
    ev.gather()
    metrics = ev.compute(ground_truth)
    metrics["images"] = len(ev)
    metrics["detections"] = int(sum(len(p["scores"]) for p in ev.predictions.values()))
    return metrics


def format_metrics(metrics: Mapping[str, Any], title: str = "COCO bbox") -> str:
    """A plain-text table of AP, AP50, AP75, APs, APm, APl (x100; ``-`` when undefined)."""
    head = " | ".join(f"{k:>6s}" for k in METRIC_KEYS)
    vals = " | ".join(f"{100 * metrics[k]:6.2f}" if metrics.get(k, -1) >= 0 else f"{'-':>6s}" for k in METRIC_KEYS)
    extra = ""
    if "images" in metrics:
        extra = f"  ({metrics['images']} images, {metrics.get('detections', 0)} detections)"
    return f"{title}{extra}\n{head}\n{'-' * len(head)}\n{vals}"


def save_metrics_json(metrics: Mapping[str, Any], path: str) -> None:
    from .checkpoint import atomic_write_text

    clean = {k: (float(v) if isinstance(v, (int, float, np.floating)) else v) for k, v in metrics.items()
             if isinstance(v, (int, float, str, np.floating, dict, list))}
    atomic_write_text(path, json.dumps(clean, indent=2))


@torch.no_grad()
def save_attention_maps(model: torch.nn.Module, images: Sequence[torch.Tensor], names: Sequence[str],
                        out_dir: str, device: torch.device) -> List[str]:
    """For each image: ``{name}_attention.png`` (the image + one overlay per attention layer) and
    the raw maps, one ``{name}_maps/<layer>.npy`` per layer (batch dim removed).
    Returns the PNG paths (empty if the model has no attention layer)."""
    from ..viz import overlay_attention

    was = model.training
    model.eval()
    paths = []
    try:
        for img, name in zip(images, names):
            maps = model.attention_maps(img[None].to(device))
            if not maps:
                return []
            os.makedirs(os.path.join(out_dir, f"{name}_maps"), exist_ok=True)
            for k, m in maps.items():
                np.save(os.path.join(out_dir, f"{name}_maps", f"{k}.npy"), m[0].float().cpu().numpy())
            png = os.path.join(out_dir, f"{name}_attention.png")
            overlay_attention(img, {k: m[0] for k, m in maps.items()}, path=png, title=name)
            paths.append(png)
    finally:
        model.train(was)
    return paths
