"""COCO detection metrics (AP, AP50, AP75, APs/m/l, AR) with ``pycocotools``.

:func:`evaluate_coco` scores torchvision-style predictions against ground truth given as a
``pycocotools.coco.COCO`` object, a dataset of :mod:`spatialattn.data` (anything with
``coco_gt()``), or a list of target dicts. :class:`CocoEvaluator` collects predictions over
batches and merges them across distributed ranks, dropping the duplicates that
``DistributedSampler`` pads with.

Numbers are those of ``COCOeval.summarize()`` (101-point interpolated AP averaged over IoU
0.50:0.95, ``maxDets=100``); ``-1`` means undefined (no ground truth in that area range), as in
pycocotools. No detections at all is not an error: every defined AP is 0.
"""
from __future__ import annotations

import contextlib
import io
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Union

import numpy as np
import torch

from spatialattn.data.base import Record
from spatialattn.data.cocoapi import coco_from_dict, records_to_coco

__all__ = ["evaluate_coco", "CocoEvaluator", "merge_predictions", "targets_to_coco", "METRIC_NAMES"]

#: Keys of the dict :func:`evaluate_coco` returns, in ``COCOeval.stats`` order.
METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl",
                "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")

Prediction = Mapping[str, Any]


def _np(x: Any, dtype: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)


def targets_to_coco(targets: Sequence[Mapping[str, Any]], classes: Optional[Sequence[str]] = None):
    """Ground truth ``COCO`` from torchvision-style targets.

    Args:
        targets: dicts with ``image_id`` (int), ``boxes`` (``[N, 4]`` xyxy), ``labels`` (``[N]``,
            0-based) and optionally ``iscrowd`` (``[N]``) and ``orig_size`` (``(H, W)``).
        classes: class names; default ``class_0 ... class_{K-1}`` with ``K = max label + 1``.
    """
    records = []
    seen = set()
    max_label = -1
    for t in targets:
        if "image_id" not in t:
            raise ValueError(f"each target needs an 'image_id', found keys {sorted(t)}")
        iid = int(t["image_id"])
        if iid in seen:
            raise ValueError(f"image_id {iid} appears twice in the targets")
        seen.add(iid)
        boxes = _np(t.get("boxes", np.zeros((0, 4))), np.float32).reshape(-1, 4)
        labels = _np(t.get("labels", np.zeros((0,))), np.int64).reshape(-1)
        crowd = t.get("iscrowd")
        h, w = t.get("orig_size", (0, 0))
        records.append(Record(iid, str(iid), int(w), int(h), boxes, labels,
                              None if crowd is None else _np(crowd, np.int64)))
        if len(labels):
            max_label = max(max_label, int(labels.max()))
    if classes is None:
        classes = [f"class_{i}" for i in range(max_label + 1)]
    elif max_label >= len(classes):
        raise ValueError(f"target label {max_label} out of range for {len(classes)} classes")
    return records_to_coco(records, classes)


def _resolve_gt(ground_truth: Any, classes: Optional[Sequence[str]]):
    from pycocotools.coco import COCO

    if isinstance(ground_truth, COCO):
        return ground_truth
    if hasattr(ground_truth, "coco_gt"):
        return ground_truth.coco_gt()
    if isinstance(ground_truth, Sequence):
        return targets_to_coco(ground_truth, classes)
    raise TypeError("ground_truth must be a pycocotools COCO, a dataset with coco_gt(), or a list "
                    f"of target dicts; got {type(ground_truth).__name__}")


def _normalise_predictions(predictions: Union[Mapping[int, Prediction], Sequence[Prediction]],
                           image_ids: Optional[Sequence[int]]) -> Dict[int, Prediction]:
    if isinstance(predictions, Mapping):
        if image_ids is not None:
            raise ValueError("pass image_ids only with a list of predictions, not a dict")
        return {int(k): v for k, v in predictions.items()}
    preds = list(predictions)
    if image_ids is not None:
        ids = [int(i) for i in image_ids]
        if len(ids) != len(preds):
            raise ValueError(f"{len(preds)} predictions but {len(ids)} image_ids")
    else:
        missing = [i for i, p in enumerate(preds) if "image_id" not in p]
        if missing:
            raise ValueError(f"prediction {missing[0]} has no 'image_id'; pass image_ids= aligned "
                             "with the predictions or a dict {image_id: prediction}")
        ids = [int(p["image_id"]) for p in preds]
    out: Dict[int, Prediction] = {}
    for iid, p in zip(ids, preds):
        if iid in out:
            raise ValueError(f"two predictions for image_id {iid}")
        out[iid] = p
    return out


def evaluate_coco(predictions: Union[Mapping[int, Prediction], Sequence[Prediction]],
                  ground_truth: Any, *, image_ids: Optional[Sequence[int]] = None,
                  classes: Optional[Sequence[str]] = None, per_class: bool = False,
                  verbose: bool = False) -> Dict[str, Any]:
    """COCO box metrics of ``predictions``.

    Args:
        predictions: per image a dict with ``boxes`` (``[D, 4]`` xyxy pixels, same frame as the
            ground truth), ``scores`` (``[D]``) and ``labels`` (``[D]``, 0-based class index);
            either ``{image_id: dict}``, a list of dicts each with ``image_id``, or a list aligned
            with ``image_ids``.
        ground_truth: ``pycocotools.coco.COCO``, a dataset with ``coco_gt()``, or a list of
            target dicts (see :func:`targets_to_coco`). Class index ``label`` maps to the
            category ``sorted(coco.getCatIds())[label]`` (``label + 1`` for spatialattn datasets).
        image_ids: ids aligned with a list of predictions.
        classes: class names when ``ground_truth`` is a list of targets.
        per_class: also return ``AP_per_class`` (``{class name: AP}``, ``-1`` if undefined).
        verbose: let pycocotools print its summary table.

    Returns:
        ``{"AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm",
        "ARl"}`` as floats (``-1`` where undefined), plus ``num_images`` and ``num_detections``.
        The evaluated images are those with a prediction entry (an empty prediction counts); with
        no entries at all, every ground-truth image.
    """
    from pycocotools.cocoeval import COCOeval

    gt = _resolve_gt(ground_truth, classes)
    preds = _normalise_predictions(predictions, image_ids)
    gt_img_ids = set(gt.getImgIds())
    unknown = sorted(set(preds) - gt_img_ids)
    if unknown:
        raise ValueError(f"predictions for image ids not in the ground truth: {unknown[:10]}")
    eval_ids = sorted(preds) if preds else sorted(gt_img_ids)
    cat_ids = sorted(gt.getCatIds())

    anns: List[Dict[str, Any]] = []
    for iid in eval_ids:
        p = preds.get(iid)
        if p is None:
            continue
        boxes = _np(p["boxes"], np.float64).reshape(-1, 4)
        scores = _np(p["scores"], np.float64).reshape(-1)
        labels = _np(p["labels"], np.int64).reshape(-1)
        if not (len(boxes) == len(scores) == len(labels)):
            raise ValueError(f"image {iid}: {len(boxes)} boxes, {len(scores)} scores, "
                             f"{len(labels)} labels; expected equal counts")
        if len(labels) and (labels.min() < 0 or labels.max() >= len(cat_ids)):
            raise ValueError(f"image {iid}: predicted label {int(labels.max())} out of range for "
                             f"{len(cat_ids)} categories")
        for (x1, y1, x2, y2), s, l in zip(boxes.tolist(), scores.tolist(), labels.tolist()):
            w, h = x2 - x1, y2 - y1
            anns.append({"id": len(anns) + 1, "image_id": iid, "category_id": cat_ids[l],
                         "bbox": [x1, y1, w, h], "area": w * h, "score": s, "iscrowd": 0})
    dt = coco_from_dict({"images": [gt.imgs[i] for i in eval_ids], "annotations": anns,
                         "categories": list(gt.dataset.get("categories", []))})

    sink = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
    with sink:
        ev = COCOeval(gt, dt, iouType="bbox")
        ev.params.imgIds = eval_ids
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    out: Dict[str, Any] = {k: float(v) for k, v in zip(METRIC_NAMES, ev.stats)}
    out["num_images"] = len(eval_ids)
    out["num_detections"] = len(anns)
    if per_class:
        prec = ev.eval["precision"][:, :, :, 0, -1]  # [T, R, K] for area "all", maxDets 100
        names = {c["id"]: c.get("name", str(c["id"])) for c in gt.dataset.get("categories", [])}
        per = {}
        for k, cid in enumerate(ev.params.catIds):
            p = prec[:, :, k]
            p = p[p > -1]
            per[names.get(cid, str(cid))] = float(p.mean()) if p.size else -1.0
        out["AP_per_class"] = per
    return out


def merge_predictions(parts: Iterable[Mapping[int, Prediction]]) -> Dict[int, Prediction]:
    """Merge ``{image_id: prediction}`` dicts (e.g. one per rank); the first copy of an id wins.

    ``DistributedSampler`` pads the last batch by repeating images, so the same id can arrive from
    two ranks; it is counted once.
    """
    out: Dict[int, Prediction] = {}
    for part in parts:
        for iid, p in part.items():
            out.setdefault(int(iid), p)
    return out


def _to_cpu(d: Mapping[str, Any]) -> Dict[str, Any]:
    return {k: (v.detach().cpu() if isinstance(v, torch.Tensor) else v) for k, v in d.items()}


class CocoEvaluator:
    """Accumulate predictions (and targets) over batches, then compute COCO metrics.

    Example:
        >>> ev = CocoEvaluator()
        >>> for images, targets in loader:                   # doctest: +SKIP
        ...     ev.update(model(images), targets)
        >>> ev.gather()                                      # no-op unless torch.distributed is up
        >>> metrics = ev.compute(dataset)                    # or ev.compute() against the targets

    ``update`` expects predictions and targets in the same coordinate frame; ``compute(dataset)``
    needs them in the dataset's original image frame.
    """

    def __init__(self, classes: Optional[Sequence[str]] = None) -> None:
        self.classes = None if classes is None else list(classes)
        self.predictions: Dict[int, Dict[str, Any]] = {}
        self.targets: Dict[int, Dict[str, Any]] = {}

    def __len__(self) -> int:
        return len(self.predictions)

    def update(self, predictions: Sequence[Prediction], targets: Sequence[Mapping[str, Any]]) -> None:
        """Add one batch: ``predictions[i]`` belongs to ``targets[i]["image_id"]``."""
        if len(predictions) != len(targets):
            raise ValueError(f"{len(predictions)} predictions for {len(targets)} targets")
        for p, t in zip(predictions, targets):
            iid = int(t["image_id"])
            self.predictions.setdefault(iid, _to_cpu(p))
            self.targets.setdefault(iid, _to_cpu(t))

    def merge(self, others: Iterable["CocoEvaluator"]) -> "CocoEvaluator":
        """Fold the contents of other evaluators into this one (duplicates by image_id dropped)."""
        others = list(others)
        self.predictions = merge_predictions([self.predictions] + [o.predictions for o in others])
        self.targets = merge_predictions([self.targets] + [o.targets for o in others])
        return self

    def gather(self) -> None:
        """All-gather every rank's entries so each rank holds the full, de-duplicated set.

        A no-op when ``torch.distributed`` is not initialised or has one process.
        """
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        parts: List[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(parts, (self.predictions, self.targets))
        self.predictions = merge_predictions([p for p, _ in parts])
        self.targets = merge_predictions([t for _, t in parts])

    def compute(self, ground_truth: Any = None, **kwargs: Any) -> Dict[str, Any]:
        """:func:`evaluate_coco` of the collected predictions; ground truth defaults to the
        collected targets."""
        if ground_truth is None:
            ground_truth = [self.targets[i] for i in sorted(self.targets)]
            kwargs.setdefault("classes", self.classes)
        return evaluate_coco(self.predictions, ground_truth, **kwargs)
