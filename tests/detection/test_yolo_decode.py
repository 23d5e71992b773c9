"""YOLO decoding against hand-made outputs with known boxes."""
from __future__ import annotations

import math

import pytest
import torch

from spatialattn.darknet.layers import Yolo
from spatialattn.detection.yolo_decode import decode_yolo_output, scale_boxes, yolo_postprocess


def make_layer(new_coords=False, classes=2):
    return Yolo(classes=classes, anchors=[(10, 20), (30, 40), (50, 60)], mask=[1, 2], num=3, new_coords=new_coords)


def put(out, a, cell, values, classes=2):
    i, j = cell
    base = a * (5 + classes)
    for k, v in enumerate(values):
        out[0, base + k, i, j] = v


def test_decode_known_boxes_classic():
    layer = make_layer()
    out = torch.zeros(1, 2 * 7, 4, 4)
    out[:, 4::7] = 0.0  # objectness 0 everywhere
    # anchor index 0 of this layer = anchor (30, 40); cell row 1, col 2; x=0.5 y=0.25, tw=log 2, th=0
    put(out, 0, (1, 2), [0.5, 0.25, math.log(2.0), 0.0, 0.9, 0.1, 0.8])
    # anchor (50, 60) at row 3 col 0
    put(out, 1, (3, 0), [0.0, 1.0, 0.0, math.log(0.5), 0.6, 0.7, 0.2])
    boxes, obj, cls = decode_yolo_output(out, layer.masked_anchors, 2, (64, 64), False)
    assert boxes.shape == (1, 32, 4) and obj.shape == (1, 32) and cls.shape == (1, 32, 2)
    k = 0 * 16 + 1 * 4 + 2  # anchor, row, col
    cx, cy = (2 + 0.5) / 4 * 64, (1 + 0.25) / 4 * 64  # 40, 20
    torch.testing.assert_close(boxes[0, k], torch.tensor([cx - 30, cy - 20, cx + 30, cy + 20]))
    torch.testing.assert_close(obj[0, k], torch.tensor(0.9))
    res = yolo_postprocess([out], [layer], (64, 64), conf_thresh=0.25, nms_thresh=0.45)
    assert len(res) == 1
    r = res[0]
    assert r["labels"].dtype == torch.int64 and r["boxes"].dtype == torch.float32
    got = sorted(zip(r["scores"].tolist(), r["labels"].tolist(), r["boxes"].tolist()), reverse=True)
    assert [(round(s, 4), l) for s, l, _ in got] == [(0.72, 1), (0.42, 0)]
    torch.testing.assert_close(torch.tensor(got[0][2]), torch.tensor([10.0, 0.0, 70.0, 40.0]))
    # anchor (50, 60), cell (3, 0): cx = 0/4*64 = 0, cy = (3+1)/4*64 = 64, w = 50, h = 30
    torch.testing.assert_close(torch.tensor(got[1][2]), torch.tensor([-25.0, 49.0, 25.0, 79.0]))


def test_new_coords_and_thresholds_and_nms():
    layer = make_layer(new_coords=True, classes=1)
    out = torch.zeros(1, 2 * 6, 2, 2)
    # w = tw^2*4*aw: tw = 0.5 -> 1 * 30 ; th = 0.25 -> 0.25 * 40 = 10
    put(out, 0, (0, 0), [0.5, 0.5, 0.5, 0.25, 0.9, 0.9], classes=1)
    # an overlapping weaker box of the same class -> suppressed by NMS
    put(out, 0, (0, 1), [0.0, 0.5, 0.5, 0.25, 0.8, 0.8], classes=1)
    # low objectness: dropped even though the class prob is high
    put(out, 1, (1, 1), [0.5, 0.5, 0.5, 0.5, 0.2, 1.0], classes=1)
    r = yolo_postprocess([out], [layer], (32, 32), conf_thresh=0.25, nms_thresh=0.3)[0]
    assert r["boxes"].shape == (1, 4)
    torch.testing.assert_close(r["boxes"][0], torch.tensor([8.0 - 15, 8.0 - 5, 8.0 + 15, 8.0 + 5]))
    torch.testing.assert_close(r["scores"], torch.tensor([0.81]))
    r = yolo_postprocess([out], [layer], (32, 32), conf_thresh=0.25, nms_thresh=0.99)[0]
    assert r["boxes"].shape == (2, 4)


def test_batch_and_errors_and_scale():
    layer = make_layer()
    out = torch.zeros(3, 14, 2, 2)
    put(out[1:2], 0, (0, 0), [0.5, 0.5, 0.0, 0.0, 0.99, 0.99, 0.0])
    res = yolo_postprocess([out], [layer], (32, 32))
    assert [len(r["boxes"]) for r in res] == [0, 1, 0]
    with pytest.raises(ValueError, match=r"expected 2\*\(5\+2\) = 14 channels"):
        decode_yolo_output(torch.zeros(1, 13, 2, 2), layer.masked_anchors, 2, (32, 32))
    b = scale_boxes(torch.tensor([[10.0, 10.0, 20.0, 20.0]]), (100, 200), (50, 400))
    torch.testing.assert_close(b, torch.tensor([[20.0, 5.0, 40.0, 10.0]]))
