"""YOLO loss: exact-match minimum, gradients, ignore_thresh, assignment, and overfitting a batch."""
from __future__ import annotations

import math
import types

import pytest
import torch

from spatialattn.engine.yolo_loss import YoloLoss

IN = (64, 64)


def _layer(**kw):
    d = dict(anchors=[(10, 12), (16, 22), (26, 32), (36, 48)], mask=[0, 1], classes=3, scale_x_y=1.05,
             new_coords=False, ignore_thresh=0.7, truth_thresh=1.0, iou_thresh=1.0, iou_loss="ciou",
             iou_normalizer=0.07, cls_normalizer=1.0, obj_normalizer=1.0)
    d.update(kw)
    return types.SimpleNamespace(**d)


def _logit(p):
    return math.log(p / (1 - p))


def _exact_raw(layer, box, label, grid=8, obj=20.0, cls_off=-20.0):
    """Raw [yolo] input that decodes to ``box`` at the assigned cell / anchor (anchor 1 here)."""
    a, k = len(layer.mask), layer.classes
    raw = torch.full((1, a * (5 + k), grid, grid), 0.0)
    v = raw.view(1, a, 5 + k, grid, grid)
    v[:, :, 4] = -20.0  # no object anywhere else
    v[:, :, 5:] = cls_off
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    w, h = box[2] - box[0], box[3] - box[1]
    j, i = int(cx / IN[1] * grid), int(cy / IN[0] * grid)
    fx, fy = cx / IN[1] * grid - j, cy / IN[0] * grid - i
    s = layer.scale_x_y
    ai = 1
    aw, ah = layer.anchors[layer.mask[ai]]
    v[0, ai, 0, i, j] = _logit((fx + 0.5 * (s - 1)) / s)
    v[0, ai, 1, i, j] = _logit((fy + 0.5 * (s - 1)) / s)
    v[0, ai, 2, i, j] = math.log(w / aw)
    v[0, ai, 3, i, j] = math.log(h / ah)
    v[0, ai, 4, i, j] = obj
    v[0, ai, 5 + label, i, j] = -cls_off
    return raw


@pytest.mark.parametrize("iou_loss", ["ciou", "diou", "giou", "iou", "mse"])
def test_exact_prediction_gives_minimal_loss(iou_loss):
    layer = _layer(iou_loss=iou_loss, iou_normalizer=1.0)
    box = [20.0, 22.0, 36.0, 44.0]  # 16 x 22: anchor (16, 22) = mask index 1
    tgt = [{"boxes": torch.tensor([box]), "labels": torch.tensor([2])}]
    loss = YoloLoss([layer])
    raw = _exact_raw(layer, box, 2)
    exact = loss([raw], tgt, IN)
    assert exact["num_pos"].item() == 1
    assert exact["box"].item() < 1e-5
    assert exact["cls"].item() < 1e-6
    assert exact["obj"].item() < 1e-6
    # decoded box equals the target
    d = loss.decode(raw, loss.specs[0], IN)
    cx, cy = int(28 / 8), int(33 / 8)
    torch.testing.assert_close(d["boxes"][0, 1, cy, cx], torch.tensor(box), atol=1e-4, rtol=0)
    for delta in ([2.0, 0, 0, 0], [0, 0, 4.0, 0], [0, -3.0, 0, 3.0]):
        moved = [b + e for b, e in zip(box, delta)]
        off = loss([_exact_raw(layer, moved, 2)], tgt, IN)
        assert off["box"].item() > exact["box"].item() + 1e-3
    wrong_cls = loss([_exact_raw(layer, box, 0)], tgt, IN)
    assert wrong_cls["cls"].item() > 10


def test_gradients_flow_to_every_part():
    layer = _layer()
    loss = YoloLoss([layer])
    raw = torch.randn(2, 2 * 8, 8, 8, requires_grad=True)
    tgt = [{"boxes": torch.tensor([[5.0, 6.0, 20.0, 30.0], [30.0, 30.0, 60.0, 62.0]]), "labels": torch.tensor([0, 1])},
           {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]
    out = loss([raw], tgt, IN)
    out["loss"].backward()
    g = raw.grad.view(2, 2, 8, 8, 8)
    assert torch.isfinite(raw.grad).all()
    assert g[0, :, 0:4].abs().sum() > 0   # box
    assert g[:, :, 4].abs().sum() > 0     # objectness (image 1 has only negatives)
    assert g[1, :, 4].abs().sum() > 0
    assert g[0, :, 5:].abs().sum() > 0    # classes
    assert g[1, :, 5:].abs().sum() == 0   # no positive in image 1: no class gradient


def test_ignore_thresh_removes_negative_objectness():
    box = [20.0, 22.0, 36.0, 44.0]
    tgt = [{"boxes": torch.tensor([box]), "labels": torch.tensor([1])}]
    # a second prediction (anchor 0, another cell) that overlaps the truth with IoU ~0.8, objectness high
    def raw_with_overlap(layer):
        raw = _exact_raw(layer, box, 1)
        v = raw.view(1, 2, 8, 8, 8)
        j, i = int(29 / 8), int(33 / 8)  # the same cell, other anchor, box 90% of the truth
        s, (aw, ah) = layer.scale_x_y, layer.anchors[layer.mask[0]]
        fx, fy = 28 / 8 - j, 33 / 8 - i
        v[0, 0, 0, i, j] = _logit((fx + 0.5 * (s - 1)) / s)
        v[0, 0, 1, i, j] = _logit((fy + 0.5 * (s - 1)) / s)
        v[0, 0, 2, i, j] = math.log(16 * 0.9 / aw)
        v[0, 0, 3, i, j] = math.log(22 * 0.9 / ah)
        v[0, 0, 4, i, j] = 3.0
        return raw
    high = YoloLoss([_layer(ignore_thresh=0.7)])([raw_with_overlap(_layer())], tgt, IN)
    low = YoloLoss([_layer(ignore_thresh=0.9)])([raw_with_overlap(_layer())], tgt, IN)
    expected_neg = torch.nn.functional.softplus(torch.tensor(3.0)).item()  # BCE(logit 3, target 0)
    assert high["obj"].item() < 1e-3          # IoU 0.81 > 0.7: ignored
    assert low["obj"].item() == pytest.approx(expected_neg, rel=1e-3)  # 0.81 < 0.9: penalised


def test_anchor_assignment_best_wh_and_iou_thresh():
    box = [10.0, 10.0, 46.0, 58.0]  # 36 x 48: best anchor 3, not in mask [0, 1] -> no positive
    tgt = [{"boxes": torch.tensor([box]), "labels": torch.tensor([0])}]
    raw = torch.zeros(1, 16, 8, 8)
    assert YoloLoss([_layer()])([raw], tgt, IN)["num_pos"].item() == 0
    assert YoloLoss([_layer(mask=[2, 3])])([raw], tgt, IN)["num_pos"].item() == 1
    # iou_thresh: anchor 2 (26x32) has wh-IoU 0.48 with 36x48: also positive above 0.4
    assert YoloLoss([_layer(mask=[2, 3], iou_thresh=0.4)])([raw], tgt, IN)["num_pos"].item() == 2
    with pytest.raises(ValueError, match="labels must be in"):
        YoloLoss([_layer()])([raw], [{"boxes": torch.tensor([box]), "labels": torch.tensor([7])}], IN)


def test_label_smoothing_targets():
    layer = _layer(label_smooth_eps=0.1)
    box = [20.0, 22.0, 36.0, 44.0]
    tgt = [{"boxes": torch.tensor([box]), "labels": torch.tensor([2])}]
    raw = _exact_raw(layer, box, 2, cls_off=0.0)  # class logits 0: BCE(0.5, y) = log 2 whatever y
    out = YoloLoss([layer])([raw], tgt, IN)
    assert out["cls"].item() == pytest.approx(3 * math.log(2), rel=1e-5)
    # at the smoothed optimum p = 1 - 0.05 / 0.05 the loss is the entropy, not 0
    raw2 = _exact_raw(layer, box, 2, cls_off=_logit(0.05))
    out2 = YoloLoss([layer])([raw2], tgt, IN)
    h = -(0.95 * math.log(0.95) + 0.05 * math.log(0.05))
    assert out2["cls"].item() == pytest.approx(3 * h, rel=1e-4)


def test_tiny_model_overfits_a_batch():
    torch.manual_seed(0)
    from spatialattn.engine.models import build_model

    model = build_model({"num_classes": 2}).train()
    x = torch.rand(2, 3, 64, 64)
    tgt = [{"boxes": torch.tensor([[8.0, 8.0, 30.0, 36.0]]), "labels": torch.tensor([0])},
           {"boxes": torch.tensor([[30.0, 20.0, 60.0, 44.0], [2.0, 40.0, 20.0, 60.0]]), "labels": torch.tensor([1, 0])}]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        out = model(x, tgt)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["loss"].item())
    assert losses[-1] < 0.25 * losses[0], losses
