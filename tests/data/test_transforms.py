from __future__ import annotations

import pytest
import torch
import torchvision.transforms.functional as TF

from spatialattn.data import SyntheticShapes, TransformedDataset, build_transforms, detection_collate
from spatialattn.data.transforms import (ColorJitter, Compose, RandomHorizontalFlip,
                                         adjust_color, hflip, letterbox, resize, unletterbox_boxes)


def _image_with_rect(h, w, box):
    img = torch.zeros(3, h, w)
    x1, y1, x2, y2 = box
    img[:, y1:y2, x1:x2] = 1.0
    return img, {"boxes": torch.tensor([box], dtype=torch.float32), "labels": torch.tensor([0])}


def test_letterbox_wide_image_exact_scale():
    img, t = _image_with_rect(40, 80, (10, 5, 30, 25))
    out, t2 = letterbox(img, t, 160, fill=0.5)
    # s = 2, resized 160 x 80, pad_y = 40: box -> [20, 50, 60, 90]
    assert torch.equal(t2["boxes"], torch.tensor([[20.0, 50, 60, 90]]))
    assert torch.equal(t2["letterbox"], torch.tensor([2.0, 2.0, 0.0, 40.0], dtype=torch.float64))
    assert bool((out[:, :40] == 0.5).all() and (out[:, 120:] == 0.5).all())
    assert bool((out[:, 51:89, 21:59] == 1).all())  # inside the box: the rectangle
    assert float(out[:, 41:49].max()) < 0.05 and float(out[:, 91:119].max()) < 0.05
    assert torch.equal(t["boxes"], torch.tensor([[10.0, 5, 30, 25]]))  # input untouched


def test_letterbox_tall_image_rounding():
    img, t = _image_with_rect(30, 20, (3, 2, 9, 8))
    out, t2 = letterbox(img, t, 64)
    # s = 64/30; W' = round(20 * 64/30) = 43, H' = 64; pad_x = (64 - 43) // 2 = 10
    sx = 43 / 20
    expected = torch.tensor([[3 * sx + 10, 2 * 64 / 30, 9 * sx + 10, 8 * 64 / 30]])
    assert out.shape == (3, 64, 64)
    assert torch.allclose(t2["boxes"], expected)
    assert torch.allclose(unletterbox_boxes(t2["boxes"], t2["letterbox"]), t["boxes"], atol=1e-5)


def test_letterbox_same_size_is_identity():
    img = torch.rand(3, 32, 32)
    out, t = letterbox(img, {"boxes": torch.tensor([[1.0, 2, 3, 4]])}, 32)
    assert torch.equal(out, img) and torch.equal(t["boxes"], torch.tensor([[1.0, 2, 3, 4]]))


def test_resize_stretches_boxes():
    img, t = _image_with_rect(20, 40, (4, 2, 8, 10))
    out, t2 = resize(img, t, (40, 20))
    assert out.shape == (3, 40, 20)
    assert torch.equal(t2["boxes"], torch.tensor([[2.0, 4, 4, 20]]))


def test_hflip_boxes_and_pixels():
    img, t = _image_with_rect(20, 100, (10, 5, 30, 15))
    out, t2 = hflip(img, t)
    assert torch.equal(t2["boxes"], torch.tensor([[70.0, 5, 90, 15]]))
    cols = out[0].amax(0).nonzero().flatten()
    assert (int(cols.min()), int(cols.max()) + 1) == (70, 90)
    assert torch.equal(hflip(*hflip(img, t))[0], img)


def test_adjust_color_matches_torchvision():
    img = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(0))
    ref = TF.adjust_saturation(TF.adjust_contrast(TF.adjust_brightness(img, 1.2), 0.8), 1.3)
    assert torch.allclose(adjust_color(img, 1.2, 0.8, 1.3), ref, atol=1e-5)
    assert torch.equal(adjust_color(img), img)


def test_random_transforms_follow_the_generator():
    img, t = _image_with_rect(20, 30, (1, 2, 5, 6))
    tf = Compose([RandomHorizontalFlip(0.5), ColorJitter(0.3, 0.3, 0.3)])
    runs = [tf(img, t, torch.Generator().manual_seed(s)) for s in (1, 1, 2, 3, 4, 5)]
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1]["boxes"], runs[1][1]["boxes"])
    flipped = {bool(r[1]["boxes"][0, 0] == 25) for r in runs}
    assert flipped == {True, False}  # both outcomes happen over a few seeds
    jit = ColorJitter(0.2, 0.2, 0.2)
    out, t2 = jit(img, t, torch.Generator().manual_seed(0))
    assert torch.equal(t2["boxes"], t["boxes"]) and not torch.equal(out, img)
    with pytest.raises(ValueError, match="p must be"):
        RandomHorizontalFlip(1.5)
    with pytest.raises(ValueError, match=r"Tensor\[3, H, W\]"):
        letterbox(torch.zeros(1, 4, 4), {}, 8)


def test_transformed_dataset_seeded_by_epoch_and_index():
    base = SyntheticShapes("train", num_images=4)
    ds = TransformedDataset(base, build_transforms(train=True, size=96), seed=5)
    a = [ds[i] for i in range(4)]
    b = [ds[i] for i in reversed(range(4))][::-1]
    assert all(torch.equal(x[0], y[0]) for x, y in zip(a, b))
    ds.set_epoch(1)
    c = [ds[i] for i in range(4)]
    assert any(not torch.equal(x[0], y[0]) for x, y in zip(a, c))
    assert ds.classes == base.classes and a[0][0].shape == (3, 96, 96)
    # boxes are the letterboxed (scale 0.6) and possibly mirrored original boxes
    for (img, t), i in zip(c, range(4)):
        ob = base[i][1]["boxes"] * 0.6
        mirrored = torch.stack([96 - ob[:, 2], ob[:, 1], 96 - ob[:, 0], ob[:, 3]], 1)
        assert torch.allclose(t["boxes"], ob) or torch.allclose(t["boxes"], mirrored)


def test_detection_collate():
    s = [(torch.zeros(3, 8, 8), {"image_id": 0}), (torch.ones(3, 8, 8), {"image_id": 1})]
    images, targets = detection_collate(s)
    assert images.shape == (2, 3, 8, 8) and [t["image_id"] for t in targets] == [0, 1]
    images, _ = detection_collate([s[0], (torch.zeros(3, 8, 9), {"image_id": 2})])
    assert isinstance(images, list) and len(images) == 2
    with pytest.raises(ValueError, match="empty batch"):
        detection_collate([])
    loader = torch.utils.data.DataLoader(SyntheticShapes("val", 4), batch_size=2, collate_fn=detection_collate)
    images, targets = next(iter(loader))
    assert images.shape == (2, 3, 160, 160) and targets[1]["image_id"] == 1


from hypothesis import given, settings, strategies as st  # noqa: E402


@settings(max_examples=25, deadline=None)
@given(h=st.integers(4, 60), w=st.integers(4, 60), size=st.integers(8, 64),
       fx=st.tuples(st.floats(0, 1), st.floats(0, 1)), fy=st.tuples(st.floats(0, 1), st.floats(0, 1)))
def test_letterbox_round_trip_and_flip_involution(h, w, size, fx, fy):
    x1, x2 = sorted(v * w for v in fx)
    y1, y2 = sorted(v * h for v in fy)
    t = {"boxes": torch.tensor([[x1, y1, x2, y2]], dtype=torch.float64)}
    out, t2 = letterbox(torch.zeros(3, h, w), t, size)
    sx, sy, px, py = t2["letterbox"].tolist()
    b = t2["boxes"][0]
    # inside the pasted image region, and the inverse maps back
    assert px - 1e-6 <= b[0] and b[2] <= px + w * sx + 1e-6 and py - 1e-6 <= b[1] and b[3] <= py + h * sy + 1e-6
    assert torch.allclose(unletterbox_boxes(t2["boxes"], t2["letterbox"]), t["boxes"], atol=1e-9)
    img = torch.rand(3, h, w)
    back, tb = hflip(*hflip(img, t))
    assert torch.equal(back, img) and torch.allclose(tb["boxes"], t["boxes"])
