"""viz: overlays put heat where the map is high; detections drawn where the boxes are."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from spatialattn.viz import draw_detections, heatmap_rgb, overlay_attention, reduce_map


def test_reduce_map_shapes():
    m = torch.arange(8.0).view(2, 2, 2)
    np.testing.assert_allclose(reduce_map(m), m.mean(0).numpy())
    assert reduce_map(torch.ones(1, 3, 4, 5)).shape == (4, 5)
    assert reduce_map(torch.ones(3, 1, 1)).shape == (1, 1)
    with pytest.raises(ValueError, match="expected"):
        reduce_map(torch.ones(2, 3, 4, 5))


def test_left_half_hot_gives_hotter_left_half():
    img = np.full((32, 32, 3), 128, np.uint8)
    m = torch.zeros(4, 8, 8)
    m[:, :, :4] = 1.0  # left half
    out = heatmap_rgb(img, m, alpha=0.6).astype(int)
    left, right = out[:, :10], out[:, 22:]
    # jet: high = red, low = blue
    assert (left[..., 0] > left[..., 2] + 60).all()
    assert (right[..., 2] > right[..., 0] + 60).all()
    # alpha 0 gives the image back
    np.testing.assert_array_equal(heatmap_rgb(img, m, alpha=0.0), img)


def test_overlay_writes_png_grid(tmp_path):
    img = torch.full((3, 40, 40), 0.5)
    m = torch.zeros(1, 5, 5)
    m[..., :, :2] = 1
    path = tmp_path / "a" / "grid.png"
    overlay_attention(img, {"layer1.sam": m, "layer2.se": torch.rand(8, 1, 1)}, path=path)
    arr = np.asarray(Image.open(path).convert("RGB"))
    assert arr.shape[0] > 100 and arr.shape[1] > 3 * arr.shape[0] // 2  # 3 panels in a row
    red = (arr[..., 0] > 180) & (arr[..., 2] < 100)
    assert red.sum() > 100  # the hot half of the first map is drawn


def test_draw_detections_pixels(tmp_path):
    img = np.zeros((50, 60, 3), np.uint8)
    out = draw_detections(img, torch.tensor([[10.0, 12.0, 40.0, 30.0]]), torch.tensor([1]), torch.tensor([0.9]),
                          names=["a", "b"], path=tmp_path / "d.png", width=1)
    assert out[12, 25].any() and out[30, 25].any() and out[20, 10].any() and out[20, 40].any()  # edges
    assert not out[20, 25].any() and not out[45, 55].any()  # inside and outside untouched
    assert (tmp_path / "d.png").is_file()
    with pytest.raises(ValueError, match="1 boxes, 2 labels"):
        draw_detections(img, torch.zeros(1, 4), torch.tensor([0, 1]))
