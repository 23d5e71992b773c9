"""YOLO training loss that follows the options of Darknet's ``[yolo]`` sections.

Input: the *raw* inputs of the ``[yolo]`` layers (the output of the conv before each of them,
``Tensor[N, A*(5+K), H, W]``, per anchor ``[tx, ty, tw, th, obj, cls_0..cls_{K-1}]``), the
torchvision-style targets (``boxes`` xyxy pixels of the network input, ``labels`` 0-based) and the
input size. Per ``[yolo]`` layer (Darknet's ``forward_yolo_layer``):

* **Decoding** is the one of :mod:`spatialattn.detection.yolo_decode` (the layer's own forward,
  then ``cx = (col + x) / W * W_in``; ``w = exp(tw) * anchor_w``, or ``tw**2 * 4 * anchor_w``
  with ``new_coords=1``), so training and inference agree; ``scale_x_y`` is applied by the layer.
* **Assignment**: each truth goes to the anchor with the best width/height IoU among *all*
  ``anchors`` of the layer; if that anchor is in this layer's ``mask``, the truth is a positive of
  the cell holding its centre. With ``iou_thresh < 1`` every other masked anchor whose wh-IoU with
  the truth exceeds ``iou_thresh`` is a positive too. With ``truth_thresh < 1`` a prediction whose
  best IoU with a truth exceeds it is a positive of that truth. Two truths on one slot: the later
  one wins (Darknet's order).
* **Box**: ``iou_loss`` = ``mse`` (Darknet's: squared error of ``x, y`` offsets and ``log`` sizes,
  weighted by ``2 - w*h`` of the truth, relative to the input), ``iou`` (``1 - IoU``), ``giou`` /
  ``diou`` / ``ciou`` (:func:`torchvision.ops.generalized_box_iou_loss` /
  ``distance_box_iou_loss`` / ``complete_box_iou_loss``), times ``iou_normalizer``.
* **Objectness**: binary cross-entropy, target 1 on positives (the IoU of the prediction with
  its truth when ``objectness_smooth``), 0 elsewhere, except that predictions whose best IoU with
  any truth of their image exceeds ``ignore_thresh`` get no negative loss; times ``obj_normalizer``.
* **Classes**: binary cross-entropy per class on positives (``focal_loss=1``: focal, alpha 0.5,
  gamma 2 as in Darknet), targets smoothed to ``y * (1 - eps) + 0.5 * eps`` with
  ``label_smooth_eps``; times ``cls_normalizer``.

Each part is summed over predictions and divided by the batch size (Darknet divides its deltas by
the batch). With ``new_coords=0`` the layer applies the logistic itself, so BCE is computed from
logits; with ``new_coords=1`` the cfg's conv already ends in a logistic and BCE is computed from
those probabilities (clamped away from 0 and 1).

Caveats: ``tw``/``th`` are clamped at 8 before ``exp`` (``exp(8) ~ 3000`` times the anchor) so an
early, wild prediction cannot overflow; Darknet instead clips its deltas with ``max_delta``.
``iou_thresh_kind`` other than ``iou`` is treated as ``iou`` for the anchor test.
"""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import (box_iou, complete_box_iou_loss, distance_box_iou_loss,
                             generalized_box_iou_loss)

__all__ = ["YoloLoss", "YoloLayerSpec", "IOU_LOSSES"]

IOU_LOSSES = ("mse", "iou", "giou", "diou", "ciou")
_WH_CLAMP = 8.0
_EPS = 1e-7


class YoloLayerSpec:
    """The options of one ``[yolo]`` layer the loss needs (copied, so the loss holds no module)."""

    def __init__(self, layer: Any) -> None:
        g = lambda name, default: getattr(layer, name, default)  # noqa: E731
        self.anchors: List[Tuple[float, float]] = [tuple(map(float, a)) for a in layer.anchors]
        self.mask: List[int] = [int(m) for m in layer.mask]
        self.classes = int(layer.classes)
        self.scale_x_y = float(g("scale_x_y", 1.0))
        self.new_coords = bool(g("new_coords", False))
        self.ignore_thresh = float(g("ignore_thresh", 0.5))
        self.truth_thresh = float(g("truth_thresh", 1.0))
        self.iou_thresh = float(g("iou_thresh", 1.0))
        self.iou_loss = str(g("iou_loss", "mse")).lower()
        self.iou_normalizer = float(g("iou_normalizer", 1.0))
        self.cls_normalizer = float(g("cls_normalizer", 1.0))
        self.obj_normalizer = float(g("obj_normalizer", 1.0))
        self.label_smooth_eps = float(g("label_smooth_eps", 0.0))
        self.focal_loss = bool(g("focal_loss", False))
        self.objectness_smooth = bool(g("objectness_smooth", False))
        if self.iou_loss not in IOU_LOSSES:
            raise ValueError(f"[yolo] iou_loss: expected one of {', '.join(IOU_LOSSES)}, got {self.iou_loss!r}")
        if not self.mask:
            raise ValueError("[yolo]: empty mask")
        for m in self.mask:
            if not 0 <= m < len(self.anchors):
                raise ValueError(f"[yolo] mask index {m} outside the {len(self.anchors)} anchors")

    def __repr__(self) -> str:
        return (f"YoloLayerSpec(mask={self.mask}, classes={self.classes}, iou_loss={self.iou_loss}, "
                f"scale_x_y={self.scale_x_y}, new_coords={int(self.new_coords)}, "
                f"ignore_thresh={self.ignore_thresh}, iou_thresh={self.iou_thresh})")


def _bce(value: Tensor, target: Tensor, logits: bool) -> Tensor:
    if logits:
        return F.binary_cross_entropy_with_logits(value, target, reduction="none")
    p = value.clamp(_EPS, 1 - _EPS)
    return -(target * torch.log(p) + (1 - target) * torch.log(1 - p))


def _focal(value: Tensor, target: Tensor, logits: bool, alpha: float = 0.5, gamma: float = 2.0) -> Tensor:
    p = torch.sigmoid(value) if logits else value.clamp(_EPS, 1 - _EPS)
    ce = _bce(value, target, logits)
    p_t = p * target + (1 - p) * (1 - target)
    a_t = alpha * target + (1 - alpha) * (1 - target)
    return a_t * (1 - p_t) ** gamma * ce


def _wh_iou(wh1: Tensor, wh2: Tensor) -> Tensor:
    """IoU of boxes with the same centre: ``wh1 [M, 2]`` x ``wh2 [A, 2]`` -> ``[M, A]``."""
    inter = torch.min(wh1[:, None, 0], wh2[None, :, 0]) * torch.min(wh1[:, None, 1], wh2[None, :, 1])
    union = (wh1[:, 0] * wh1[:, 1])[:, None] + (wh2[:, 0] * wh2[:, 1])[None, :] - inter
    return inter / union.clamp_min(_EPS)


def _pair_iou(a: Tensor, b: Tensor) -> Tensor:
    """Element-wise IoU of ``a [P, 4]`` and ``b [P, 4]`` (xyxy)."""
    lt = torch.max(a[:, :2], b[:, :2])
    rb = torch.min(a[:, 2:], b[:, 2:])
    inter = (rb - lt).clamp_min(0).prod(1)
    area = lambda t: (t[:, 2] - t[:, 0]).clamp_min(0) * (t[:, 3] - t[:, 1]).clamp_min(0)  # noqa: E731
    return inter / (area(a) + area(b) - inter).clamp_min(_EPS)


class YoloLoss(torch.nn.Module):
    """Loss of a Darknet YOLO model from the raw ``[yolo]`` inputs (see the module docstring).

    Args:
        yolo_layers: the ``[yolo]`` modules (``DarknetModel.yolo_layers``) or :class:`YoloLayerSpec`.

    Example:
        >>> from spatialattn.darknet import bundled_model
        >>> model = bundled_model("sam-tiny", num_classes=5).train()
        >>> x = torch.rand(2, 3, 160, 160)
        >>> raw = model(x, return_layers=[i - 1 for i in model.yolo_indices])
        >>> targets = [{"boxes": torch.tensor([[10., 20., 60., 90.]]), "labels": torch.tensor([1])},
        ...            {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]
        >>> losses = YoloLoss(model.yolo_layers)(list(raw.values()), targets, (160, 160))
        >>> sorted(losses)
        ['box', 'cls', 'loss', 'num_pos', 'obj']
    """

    def __init__(self, yolo_layers: Sequence[Any]) -> None:
        super().__init__()
        self.specs = [s if isinstance(s, YoloLayerSpec) else YoloLayerSpec(s) for s in yolo_layers]
        if not self.specs:
            raise ValueError("YoloLoss needs at least one [yolo] layer")
        if len({s.classes for s in self.specs}) != 1:
            raise ValueError("all [yolo] layers must have the same number of classes")
        self.num_classes = self.specs[0].classes

    def extra_repr(self) -> str:
        return "\n".join(repr(s) for s in self.specs)

    # ------------------------------------------------------------------ decoding
    @staticmethod
    def decode(raw: Tensor, spec: YoloLayerSpec, input_size: Tuple[int, int]) -> Dict[str, Tensor]:
        """Decode one raw ``[yolo]`` input ``Tensor[N, A*(5+K), H, W]`` with gradients.

        Returns ``boxes [N, A, H, W, 4]`` (xyxy input pixels), ``xy`` (offsets in the cell after
        ``scale_x_y``), ``twh`` (raw size values), ``obj`` ``[N, A, H, W]`` and ``cls``
        ``[N, A, H, W, K]`` (logits if ``new_coords=0``, else probabilities).
        """
        n, c, h, w = raw.shape
        a, k = len(spec.mask), spec.classes
        if c != a * (5 + k):
            raise ValueError(f"raw [yolo] input: expected {a}*(5+{k}) = {a * (5 + k)} channels, got {c}")
        v = raw.float().reshape(n, a, 5 + k, h, w).permute(0, 1, 3, 4, 2)
        xy = v[..., 0:2] if spec.new_coords else torch.sigmoid(v[..., 0:2])
        s = spec.scale_x_y
        if s != 1.0:
            xy = xy * s + (-0.5 * (s - 1))
        twh = v[..., 2:4]
        anc = torch.tensor([spec.anchors[m] for m in spec.mask], dtype=torch.float32,
                           device=raw.device).view(1, a, 1, 1, 2)
        wh = twh * twh * 4 * anc if spec.new_coords else torch.exp(twh.clamp(max=_WH_CLAMP)) * anc
        in_h, in_w = input_size
        gy, gx = torch.meshgrid(torch.arange(h, device=raw.device, dtype=torch.float32),
                                torch.arange(w, device=raw.device, dtype=torch.float32), indexing="ij")
        cx = (gx + xy[..., 0]) / w * in_w
        cy = (gy + xy[..., 1]) / h * in_h
        boxes = torch.stack([cx - wh[..., 0] / 2, cy - wh[..., 1] / 2,
                             cx + wh[..., 0] / 2, cy + wh[..., 1] / 2], dim=-1)
        return {"boxes": boxes, "xy": xy, "twh": twh, "obj": v[..., 4], "cls": v[..., 5:]}

    # ------------------------------------------------------------------ loss
    def forward(self, raw_outputs: Sequence[Tensor], targets: Sequence[Mapping[str, Any]],
                input_size: Tuple[int, int]) -> Dict[str, Tensor]:
        """Loss of a batch.

        Args:
            raw_outputs: one ``Tensor[N, A*(5+K), H, W]`` per ``[yolo]`` layer (its input).
            targets: ``N`` dicts with ``boxes`` (``[M, 4]`` xyxy, input pixels) and ``labels``
                (``[M]`` int64, 0-based); entries with ``iscrowd = 1`` are not trained on.
            input_size: ``(H_in, W_in)`` of the network input.

        Returns:
            ``{"loss": total, "box", "obj", "cls": the parts (detached), "num_pos": positives}``.
        """
        if len(raw_outputs) != len(self.specs):
            raise ValueError(f"got {len(raw_outputs)} outputs for {len(self.specs)} [yolo] layers")
        n = raw_outputs[0].shape[0]
        if len(targets) != n:
            raise ValueError(f"got {len(targets)} targets for a batch of {n}")
        device = raw_outputs[0].device
        tb, tboxes, tlabels = [], [], []
        for b, t in enumerate(targets):
            boxes = torch.as_tensor(t["boxes"], dtype=torch.float32, device=device).reshape(-1, 4)
            labels = torch.as_tensor(t["labels"], dtype=torch.int64, device=device).reshape(-1)
            if "iscrowd" in t:
                keep = torch.as_tensor(t["iscrowd"], device=device).reshape(-1) == 0
                boxes, labels = boxes[keep], labels[keep]
            if len(labels) and (labels.min() < 0 or labels.max() >= self.num_classes):
                raise ValueError(f"target {b}: labels must be in [0, {self.num_classes - 1}], "
                                 f"found {labels.tolist()}")
            tb.append(torch.full((len(labels),), b, dtype=torch.int64, device=device))
            tboxes.append(boxes)
            tlabels.append(labels)
        tb_all, tbox_all, tlab_all = torch.cat(tb), torch.cat(tboxes), torch.cat(tlabels)

        zero = raw_outputs[0].new_zeros((), dtype=torch.float32)
        box_l, obj_l, cls_l = zero, zero, zero
        num_pos = 0
        for raw, spec in zip(raw_outputs, self.specs):
            lb, lo, lc, npos = self._layer(raw, spec, tb_all, tbox_all, tlab_all, input_size)
            box_l, obj_l, cls_l = box_l + lb, obj_l + lo, cls_l + lc
            num_pos += npos
        box_l, obj_l, cls_l = box_l / n, obj_l / n, cls_l / n
        total = box_l + obj_l + cls_l
        return {"loss": total, "box": box_l.detach(), "obj": obj_l.detach(), "cls": cls_l.detach(),
                "num_pos": torch.tensor(float(num_pos), device=device)}

    def _layer(self, raw: Tensor, spec: YoloLayerSpec, tb: Tensor, tbox: Tensor, tlab: Tensor,
               input_size: Tuple[int, int]) -> Tuple[Tensor, Tensor, Tensor, int]:
        d = self.decode(raw, spec, input_size)
        n, a, h, w = d["obj"].shape
        in_h, in_w = input_size
        device = raw.device
        logits = not spec.new_coords
        pred_boxes = d["boxes"]

        # --- best IoU of every prediction with the truths of its image (ignore / truth_thresh)
        best_iou = torch.zeros(n, a, h, w, device=device)
        best_idx = torch.full((n, a, h, w), -1, dtype=torch.int64, device=device)
        with torch.no_grad():
            flat = pred_boxes.detach().reshape(n, -1, 4)
            for b in range(n):
                sel = torch.nonzero(tb == b, as_tuple=True)[0]
                if len(sel) == 0:
                    continue
                iou = box_iou(flat[b], tbox[sel])  # [A*H*W, M_b]
                v, j = iou.max(1)
                best_iou[b] = v.view(a, h, w)
                best_idx[b] = sel[j].view(a, h, w)

        # --- positives: (b, a, i, j, truth)
        pos_b, pos_a, pos_i, pos_j, pos_t = [], [], [], [], []
        if spec.truth_thresh < 1.0:
            m = best_iou > spec.truth_thresh
            bb, aa, ii, jj = torch.nonzero(m, as_tuple=True)
            pos_b.append(bb); pos_a.append(aa); pos_i.append(ii); pos_j.append(jj)  # noqa: E702
            pos_t.append(best_idx[bb, aa, ii, jj])
        if len(tb):
            twh = (tbox[:, 2:] - tbox[:, :2]).clamp_min(_EPS)
            anchors = torch.tensor(spec.anchors, dtype=torch.float32, device=device)
            wh_iou = _wh_iou(twh, anchors)  # [M, num]
            best = wh_iou.argmax(1)
            cx = (tbox[:, 0] + tbox[:, 2]) / 2
            cy = (tbox[:, 1] + tbox[:, 3]) / 2
            gj = (cx / in_w * w).floor().long().clamp(0, w - 1)
            gi = (cy / in_h * h).floor().long().clamp(0, h - 1)
            tidx = torch.arange(len(tb), device=device)
            for ai, m in enumerate(spec.mask):
                hit = best == m
                if spec.iou_thresh < 1.0:
                    hit = hit | (wh_iou[:, m] > spec.iou_thresh)
                sel = torch.nonzero(hit, as_tuple=True)[0]
                # Darknet's loop runs per truth, then per anchor: order by truth index below
                pos_b.append(tb[sel]); pos_a.append(torch.full_like(sel, ai))  # noqa: E702
                pos_i.append(gi[sel]); pos_j.append(gj[sel]); pos_t.append(tidx[sel])  # noqa: E702
        if pos_b:
            pb, pa, pi, pj, pt = (torch.cat(x) for x in (pos_b, pos_a, pos_i, pos_j, pos_t))
        else:
            pb = pa = pi = pj = pt = torch.zeros(0, dtype=torch.int64, device=device)
        if len(pb):
            # later assignments win: truth_thresh matches first, then truths in order
            order = torch.arange(len(pb), device=device)
            n_tt = len(pos_b[0]) if spec.truth_thresh < 1.0 else 0
            rank = torch.where(order < n_tt, order - n_tt, pt * (a + 1) + pa)
            lin = ((pb * a + pa) * h + pi) * w + pj
            uniq, inv = torch.unique(lin, return_inverse=True)
            key = torch.full((len(uniq),), -(2 ** 62), dtype=torch.int64, device=device)
            key = key.scatter_reduce(0, inv, rank, reduce="amax")
            winner = torch.full((len(uniq),), -1, dtype=torch.int64, device=device)
            winner = winner.scatter_reduce(0, inv, torch.where(rank == key[inv], order, -1), reduce="amax")
            pb, pa, pi, pj, pt = pb[winner], pa[winner], pi[winner], pj[winner], pt[winner]

        # --- box
        if len(pb):
            pbox = pred_boxes[pb, pa, pi, pj]
            gbox = tbox[pt]
            if spec.iou_loss == "ciou":
                lbox = complete_box_iou_loss(pbox, gbox, reduction="none")
            elif spec.iou_loss == "diou":
                lbox = distance_box_iou_loss(pbox, gbox, reduction="none")
            elif spec.iou_loss == "giou":
                lbox = generalized_box_iou_loss(pbox, gbox, reduction="none")
            elif spec.iou_loss == "iou":
                lbox = 1 - _pair_iou(pbox, gbox)
            else:  # mse, Darknet's delta_yolo_box
                gw, gh = (gbox[:, 2] - gbox[:, 0]), (gbox[:, 3] - gbox[:, 1])
                tx = (gbox[:, 0] + gbox[:, 2]) / 2 / in_w * w - pj
                ty = (gbox[:, 1] + gbox[:, 3]) / 2 / in_h * h - pi
                anc = torch.tensor([spec.anchors[m] for m in spec.mask], dtype=torch.float32, device=device)[pa]
                if spec.new_coords:
                    ttw, tth = torch.sqrt(gw / anc[:, 0] / 4), torch.sqrt(gh / anc[:, 1] / 4)
                else:
                    ttw, tth = torch.log(gw / anc[:, 0]), torch.log(gh / anc[:, 1])
                scale = 2 - gw * gh / (in_w * in_h)
                xy = d["xy"][pb, pa, pi, pj]
                twh_p = d["twh"][pb, pa, pi, pj]
                lbox = scale * ((xy[:, 0] - tx) ** 2 + (xy[:, 1] - ty) ** 2
                                + (twh_p[:, 0] - ttw) ** 2 + (twh_p[:, 1] - tth) ** 2) / 2
            box_loss = spec.iou_normalizer * lbox.sum()
        else:
            box_loss = pred_boxes.sum() * 0.0

        # --- objectness
        obj = d["obj"]
        obj_t = torch.zeros_like(obj)
        weight = (best_iou <= spec.ignore_thresh).float()
        if len(pb):
            if spec.objectness_smooth:
                with torch.no_grad():
                    val = _pair_iou(pred_boxes[pb, pa, pi, pj].detach(), tbox[pt]).clamp(0, 1)
            else:
                val = torch.ones(len(pb), device=device)
            obj_t[pb, pa, pi, pj] = val
            weight[pb, pa, pi, pj] = 1.0
        obj_loss = spec.obj_normalizer * (weight * _bce(obj, obj_t, logits)).sum()

        # --- classes
        if len(pb):
            cls = d["cls"][pb, pa, pi, pj]
            cls_t = F.one_hot(tlab[pt], spec.classes).float()
            if spec.label_smooth_eps:
                cls_t = cls_t * (1 - spec.label_smooth_eps) + 0.5 * spec.label_smooth_eps
            lc = _focal(cls, cls_t, logits) if spec.focal_loss else _bce(cls, cls_t, logits)
            cls_loss = spec.cls_normalizer * lc.sum()
        else:
            cls_loss = d["cls"].sum() * 0.0
        return box_loss, obj_loss, cls_loss, int(len(pb))
