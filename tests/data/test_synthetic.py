from __future__ import annotations

import multiprocessing as mp

import numpy as np
import pytest
import torch

from spatialattn.data import SYNTHETIC_CLASSES, SyntheticShapes, render_sample
from spatialattn.data.synthetic import _shape_mask


def _render_sum(args):
    img, boxes, labels = render_sample(*args)
    return img.tobytes(), boxes.tobytes(), labels.tobytes()


def test_same_seed_identical_across_instances_and_order():
    a = SyntheticShapes("val", num_images=6, seed=3)
    b = SyntheticShapes("val", num_images=6, seed=3)
    forward = [a[i] for i in range(6)]
    backward = [b[i] for i in reversed(range(6))][::-1]  # no hidden state: order does not matter
    for (ia, ta), (ib, tb) in zip(forward, backward):
        assert torch.equal(ia, ib)
        assert torch.equal(ta["boxes"], tb["boxes"]) and torch.equal(ta["labels"], tb["labels"])


def test_identical_in_another_process():
    args = [(7, "train", i, 96) for i in range(3)]
    with mp.get_context("fork").Pool(2) as pool:
        remote = pool.map(_render_sum, args)
    assert remote == [_render_sum(a) for a in args]


def test_different_index_seed_split_differ():
    img = lambda **kw: SyntheticShapes(**{"split": "val", "num_images": 4, "seed": 0, **kw})[1][0]
    base = img()
    assert not torch.equal(base, SyntheticShapes("val", 4, seed=0)[2][0])
    assert not torch.equal(base, img(seed=1))
    assert not torch.equal(base, img(split="train"))


def test_sample_format_and_statistics():
    ds = SyntheticShapes("train", num_images=60, image_size=160, seed=0)
    assert ds.classes == list(SYNTHETIC_CLASSES) and 4 <= len(ds.classes) <= 6
    counts, sides = [], []
    for i in range(len(ds)):
        image, t = ds[i]
        assert image.shape == (3, 160, 160) and image.dtype == torch.float32
        assert 0 <= float(image.min()) and float(image.max()) <= 1
        b = t["boxes"]
        assert b.dtype == torch.float32 and t["labels"].dtype == torch.int64 and t["image_id"] == i
        assert torch.equal(b, b.round())  # crisp, integer pixel extents
        assert bool(((b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])).all())
        assert bool((b >= 0).all() and (b <= 160).all())
        assert bool(((t["labels"] >= 0) & (t["labels"] < len(ds.classes))).all())
        counts.append(len(b))
        sides += (b[:, 2:] - b[:, :2]).flatten().tolist()
    counts = np.array(counts)
    assert counts.max() <= 6 and (counts == 0).any() and counts.mean() > 2
    sides = np.array(sides)
    assert sides.min() >= 4 and sides.max() <= 70
    assert (sides >= 40).mean() > 0.1 and (sides <= 20).mean() > 0.1  # varied scale


def test_image_size_scales_objects():
    ds = SyntheticShapes("val", num_images=8, image_size=320)
    b = torch.cat([ds[i][1]["boxes"] for i in range(len(ds))])
    assert ds[0][0].shape == (3, 320, 320)
    assert float(b.max()) <= 320 and float((b[:, 2:] - b[:, :2]).max()) > 70


@pytest.mark.parametrize("kind", SYNTHETIC_CLASSES)
def test_class_shapes_touch_all_four_sides(kind):
    # an unoccluded object's box is then exactly the box it was drawn in
    rng = np.random.default_rng(0)
    for w, h in [(8, 8), (13, 29), (64, 40)]:
        m = _shape_mask(kind, w, h, rng)
        assert m[0].any() and m[-1].any() and m[:, 0].any() and m[:, -1].any(), (kind, w, h)


def test_coco_gt_matches_targets():
    ds = SyntheticShapes("val", num_images=10)
    gt = ds.coco_gt()
    assert sorted(gt.getCatIds()) == [1, 2, 3, 4, 5] and sorted(gt.getImgIds()) == list(range(10))
    for i in range(10):
        t = ds[i][1]
        anns = gt.loadAnns(gt.getAnnIds(imgIds=[i]))
        got = torch.tensor([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2],
                             a["bbox"][1] + a["bbox"][3]] for a in anns]).reshape(-1, 4)
        assert torch.equal(got, t["boxes"])
        assert [a["category_id"] - 1 for a in anns] == t["labels"].tolist()


def test_bad_arguments():
    with pytest.raises(ValueError, match="split"):
        SyntheticShapes("validation")
    with pytest.raises(ValueError, match="image_size"):
        SyntheticShapes("val", image_size=16)
    with pytest.raises(IndexError):
        SyntheticShapes("val", num_images=3)[3]
