"""``spatialattn detect`` end to end on the bundled cfg with saved weights."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from spatialattn.cli import main
from spatialattn.darknet import bundled_model


def test_detect_cli(tmp_path, capsys):
    torch.manual_seed(0)
    model = bundled_model("sam-tiny")
    # make the large-anchor head confident about class 2 in one cell of anchor 0:
    head = model.layers[13].conv  # 1x1 conv in front of [yolo] 14, 3 anchors x (5+3)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.fill_(-10.0)
        head.bias[[0, 1, 2, 3]] = 0.0   # x = y = 0.5 (sigmoid 0), w = h = anchor
        head.bias[4] = 10.0             # objectness ~1 everywhere for anchor 0
        head.bias[7] = 10.0             # class 2
        model.layers[22].conv.weight.zero_()
        model.layers[22].conv.bias.fill_(-10.0)
    wpath = tmp_path / "m.weights"
    model.save_darknet_weights(wpath)
    img = tmp_path / "img.png"
    Image.fromarray((np.random.RandomState(0).rand(80, 320, 3) * 255).astype(np.uint8)).save(img)
    rc = main(["detect", "--cfg", "bundled:sam-tiny", "--weights", str(wpath), "--out-dir", str(tmp_path / "out"),
               "--nms", "0.6", str(img)])
    assert rc == 0
    out = capsys.readouterr().out
    lines = out.strip().splitlines()
    assert lines[0].endswith("_det.png") and " boxes -> " in lines[0]
    n = int(lines[0].split(": ")[1].split(" ")[0])
    # 10x10 cells, anchor (36, 48) px in the 160x160 input -> boxes of 72 x 24 px in the 320x80 image, IoU of neighbours <= 0.5
    assert n == 100 and len(lines) == 101
    first = lines[1].split()
    assert first[0] == "2" and float(first[1]) > 0.99
    x1, y1, x2, y2 = (float(t.split("=")[1]) for t in first[2:6])
    assert (x2 - x1, y2 - y1) == pytest.approx((72.0, 24.0), abs=1e-3)
    saved = Image.open(tmp_path / "out" / "img_det.png")
    assert saved.size == (320, 80)


def test_detect_cli_errors(tmp_path, capsys):
    w = tmp_path / "short.weights"
    w.write_bytes(b"\x00" * 40)
    rc = main(["detect", "--cfg", "bundled:sam-tiny", "--weights", str(w), str(tmp_path / "x.png")])
    assert rc == 2 and "file too short" in capsys.readouterr().err
